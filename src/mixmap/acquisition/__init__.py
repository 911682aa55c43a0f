"""Acquisition schemes: what was measured in each volume, validated once."""

from mixmap.acquisition.core import (
    B0_THRESHOLD,
    SHELL_TOLERANCE,
    Acquisition,
    AcquisitionError,
    Shell,
)
from mixmap.acquisition.schemes import SCHEMES, clinical_scheme, fibonacci_sphere, hcp_scheme

__all__ = [
    "B0_THRESHOLD",
    "SCHEMES",
    "SHELL_TOLERANCE",
    "Acquisition",
    "AcquisitionError",
    "Shell",
    "clinical_scheme",
    "fibonacci_sphere",
    "hcp_scheme",
]
