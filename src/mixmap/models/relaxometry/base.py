"""What the relaxometry models share: volumes grouped by the one acquisition field they vary
(echo time, inversion time or flip angle), a minimum number of distinct values, and the
reference volumes that set the signal scale."""

from __future__ import annotations

import numpy as np

from mixmap.acquisition import FIELDS, Acquisition, VolumeGroup
from mixmap.models.base import SignalModel, UnsupportedAcquisition

#: Values of the varied field within this of a group's lowest count as one (ms for TE and TI,
#: degrees for flip angles): repeats of one volume for the encoder and the reductions.
GROUP_TOLERANCE = 0.5


class RelaxometryModel(SignalModel):
    """A signal that depends on one varied field (:attr:`group_field`) and on per-scan fields.

    Subclasses set :attr:`group_field`, :attr:`min_distinct` and :attr:`reference` (``"min"``:
    the volumes of the smallest value set the scale, as the first echo; ``"max"``: the largest,
    as the longest inversion time; None: the largest signal of each voxel).
    """

    direction_independent = True
    #: The fewest distinct values of :attr:`group_field` that determine the parameters.
    min_distinct: int = 2
    reference: str | None = "min"

    def check_scheme(self, acquisition: Acquisition) -> None:
        groups = acquisition.groups(self.group_field, GROUP_TOLERANCE)
        if len(groups) < self.min_distinct:
            what = FIELDS[self.group_field].description
            raise UnsupportedAcquisition(
                f"{self.name} needs at least {self.min_distinct} distinct {what}s "
                f"({self.group_field}); this acquisition has {len(groups)}")

    def reference_volumes(self, acquisition: Acquisition) -> np.ndarray:
        if self.reference is None:
            return np.zeros(acquisition.n, dtype=bool)
        v = acquisition.field(self.group_field)
        return v == (v.min() if self.reference == "min" else v.max())

    def volume_groups(self, acquisition: Acquisition, exact: bool = False) -> list[VolumeGroup]:
        return acquisition.groups(self.group_field, 0.0 if exact else GROUP_TOLERANCE)


__all__ = ["GROUP_TOLERANCE", "RelaxometryModel"]
