"""What diffusion models share: b-values (and directions) as the acquisition, b=0 volumes as
the reference, shells as the groups of repeated measurements."""

from __future__ import annotations

import numpy as np

from mixmap.acquisition import Acquisition, Shell
from mixmap.models.base import SignalModel, UnsupportedAcquisition

#: Shell tolerance for an exact reduction (ms/µm², i.e. 0.001 s/mm²: the same b up to the
#: rounding of a unit conversion, so that each volume keeps its own b in the physics).
EXACT_SHELL_TOLERANCE = 1e-6


class DiffusionModel(SignalModel):
    """A signal model over b-values (ms/µm²) and, unless direction-independent, directions."""

    required_fields: tuple[str, ...] = ("b",)
    output_suffix = "dwimap"
    group_field = "b"
    #: b (ms/µm²) up to which the model holds in brain tissue (None: everywhere); beyond it
    #: :meth:`scheme_warnings` names the volumes, what goes wrong (:attr:`max_b_reason`) and
    #: the remedy (``--max-b``, and :attr:`max_b_remedy`).
    max_b: float | None = None
    max_b_reason: str = ""
    max_b_remedy: str = ""

    def scheme_warnings(self, acquisition: Acquisition) -> list[str]:
        if self.max_b is None:
            return []
        above = [s for s in acquisition.dw_shells() if s.bval > self.max_b * 1.05]
        if not above:
            return []
        n = sum(s.n for s in above)
        bs = ", ".join(str(round(s.bval * 1000)) for s in above)
        limit = f"{self.max_b * 1000:g}"
        return [f"{n} volumes at b = {bs} s/mm², beyond b ≈ {limit} s/mm² where "
                f"{self.max_b_reason}; leave them out with --max-b {limit}{self.max_b_remedy}"]

    def require_shells(self, acquisition: Acquisition, purpose: str, label: str = "") -> None:
        """Refuse a scheme with fewer than 2 non-zero shells, saying what they are for."""
        shells = acquisition.dw_shells()
        if len(shells) < 2:
            bs = ", ".join(str(round(s.bval * 1000)) for s in shells)
            raise UnsupportedAcquisition(
                f"{label or self.name} needs at least 2 non-zero b-value shells to {purpose}; "
                f"this scheme has {len(shells)} ({bs} s/mm²)")

    def require_directions(self, acquisition: Acquisition) -> None:
        """Refuse a scheme without 6 diffusion-weighted directions spanning 3-D (a model with
        a fibre direction)."""
        dw = ~acquisition.b0_mask
        rank = int(np.linalg.matrix_rank(acquisition.bvecs[dw])) if dw.any() else 0
        if rank < 3 or dw.sum() < 6:
            raise UnsupportedAcquisition(
                f"{self.name} needs at least 6 diffusion-weighted directions spanning 3-D; this "
                f"scheme has {int(dw.sum())} directions of rank {rank}")

    def reference_volumes(self, acquisition: Acquisition) -> np.ndarray:
        return acquisition.b0_mask

    def volume_groups(self, acquisition: Acquisition, exact: bool = False) -> list[Shell]:
        """Shells within :data:`~mixmap.acquisition.base.SHELL_TOLERANCE`; ``exact``: equal
        b-values only."""
        if exact:
            return acquisition.shells(tolerance=EXACT_SHELL_TOLERANCE, relative=0.0)
        return acquisition.shells()
