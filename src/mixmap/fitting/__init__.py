"""Fitters: ``lsq`` (least squares) and the learned fitters, behind one interface."""

from __future__ import annotations

from mixmap.fitting.base import FitResult, Fitter, resolve_device
from mixmap.fitting.learned.ssl import SelfSupervisedFitter
from mixmap.fitting.learned.vae import GaussianVAEFitter, MixtureVAEFitter
from mixmap.fitting.lsq import LeastSquaresFitter

FITTERS: dict[str, type[Fitter]] = {LeastSquaresFitter.name: LeastSquaresFitter}
FITTERS[SelfSupervisedFitter.name] = SelfSupervisedFitter
FITTERS[GaussianVAEFitter.name] = GaussianVAEFitter
FITTERS[MixtureVAEFitter.name] = MixtureVAEFitter


def get_fitter(method: str, model, **options) -> Fitter:
    """An instance of fitter ``method`` for ``model`` with the given hyper-parameters."""
    try:
        cls = FITTERS[method]
    except KeyError:
        choices = ", ".join(FITTERS)
        raise ValueError(f"unknown method {method!r}; choose one of: {choices}") from None
    return cls(model, **options)


__all__ = ["FITTERS", "FitResult", "Fitter", "LeastSquaresFitter", "get_fitter", "resolve_device"]
