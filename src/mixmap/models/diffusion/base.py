"""What diffusion models share: b-values (and directions) as the acquisition, b=0 volumes as
the reference, shells as the groups of repeated measurements."""

from __future__ import annotations

import numpy as np

from mixmap.acquisition import Acquisition, Shell
from mixmap.models.base import SignalModel

#: Shell tolerance for an exact reduction (ms/µm², i.e. 1 s/mm²: the same b only).
EXACT_SHELL_TOLERANCE = 1e-3


class DiffusionModel(SignalModel):
    """A signal model over b-values (ms/µm²) and, unless direction-independent, directions."""

    required_fields: tuple[str, ...] = ("b",)
    output_suffix = "dwimap"
    group_field = "b"

    def reference_volumes(self, acquisition: Acquisition) -> np.ndarray:
        return acquisition.b0_mask

    def volume_groups(self, acquisition: Acquisition, exact: bool = False) -> list[Shell]:
        if exact:
            return acquisition.shells(tolerance=EXACT_SHELL_TOLERANCE)
        return acquisition.shells()
