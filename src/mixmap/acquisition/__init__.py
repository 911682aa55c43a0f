"""Acquisition schemes: what was measured in each volume, validated once."""

from mixmap.acquisition.base import (
    B0_THRESHOLD,
    SHELL_RELATIVE_TOLERANCE,
    SHELL_TOLERANCE,
    AcquisitionError,
)
from mixmap.acquisition.core import (
    FIELDS,
    Acquisition,
    Field,
    Shell,
    VolumeGroup,
    group_values,
)
from mixmap.acquisition.schemes import (
    SCHEMES,
    clinical_scheme,
    example_scheme,
    fibonacci_sphere,
    hcp_scheme,
    ivim_scheme,
    multi_echo_scheme,
)

__all__ = [
    "B0_THRESHOLD",
    "SCHEMES",
    "SHELL_RELATIVE_TOLERANCE",
    "SHELL_TOLERANCE",
    "Acquisition",
    "AcquisitionError",
    "FIELDS",
    "Field",
    "Shell",
    "VolumeGroup",
    "clinical_scheme",
    "example_scheme",
    "fibonacci_sphere",
    "group_values",
    "hcp_scheme",
    "ivim_scheme",
    "multi_echo_scheme",
]
