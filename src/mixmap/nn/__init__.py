"""Building blocks of the learned fitters: feature maps and encoders, priors, likelihoods, and
the shared training loop."""

from mixmap.nn.encoders import Decoder, FeatureMap, MixtureEncoder, mlp
from mixmap.nn.likelihoods import LIKELIHOODS, NoiseModel, gaussian_loglik, rician_loglik
from mixmap.nn.priors import MixturePrior, standard_normal_prior

__all__ = [
    "LIKELIHOODS",
    "Decoder",
    "FeatureMap",
    "MixtureEncoder",
    "MixturePrior",
    "NoiseModel",
    "gaussian_loglik",
    "mlp",
    "rician_loglik",
    "standard_normal_prior",
]
