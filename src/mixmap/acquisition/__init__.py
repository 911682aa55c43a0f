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
    RELAXOMETRY_SCHEMES,
    SCHEMES,
    clinical_scheme,
    example_scheme,
    fibonacci_sphere,
    hcp_scheme,
    inversion_recovery_scheme,
    ivim_scheme,
    multi_echo_scheme,
    multi_gradient_echo_scheme,
    variable_flip_angle_scheme,
)

__all__ = [
    "B0_THRESHOLD",
    "RELAXOMETRY_SCHEMES",
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
    "inversion_recovery_scheme",
    "multi_echo_scheme",
    "multi_gradient_echo_scheme",
    "variable_flip_angle_scheme",
]
