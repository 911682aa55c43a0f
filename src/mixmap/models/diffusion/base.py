"""What diffusion models share: b-values (and directions) as the acquisition, b=0 volumes as
the reference, shells as the groups of repeated measurements."""

from __future__ import annotations

import numpy as np

from mixmap.acquisition import Acquisition, Shell
from mixmap.models.base import SignalModel

#: Shell tolerance for an exact reduction (ms/µm², i.e. 0.001 s/mm²: the same b up to the
#: rounding of a unit conversion, so that each volume keeps its own b in the physics).
EXACT_SHELL_TOLERANCE = 1e-6


class DiffusionModel(SignalModel):
    """A signal model over b-values (ms/µm²) and, unless direction-independent, directions."""

    required_fields: tuple[str, ...] = ("b",)
    output_suffix = "dwimap"
    group_field = "b"

    def reference_volumes(self, acquisition: Acquisition) -> np.ndarray:
        return acquisition.b0_mask

    def volume_groups(self, acquisition: Acquisition, exact: bool = False) -> list[Shell]:
        """Shells within :data:`~mixmap.acquisition.base.SHELL_TOLERANCE`; ``exact``: equal
        b-values only."""
        if exact:
            return acquisition.shells(tolerance=EXACT_SHELL_TOLERANCE, relative=0.0)
        return acquisition.shells()
