"""Learned fitters: a network shared by all voxels of a scan, trained on the scan itself."""

from mixmap.fitting.learned.base import LearnedFitter
from mixmap.fitting.learned.ssl import SelfSupervisedFitter
from mixmap.fitting.learned.training import TrainingDiverged
from mixmap.fitting.learned.vae import (
    GaussianVAEFitter,
    LatentSamples,
    MixtureVAEFitter,
    VAEFitter,
)

__all__ = [
    "GaussianVAEFitter",
    "LatentSamples",
    "LearnedFitter",
    "MixtureVAEFitter",
    "SelfSupervisedFitter",
    "TrainingDiverged",
    "VAEFitter",
]
