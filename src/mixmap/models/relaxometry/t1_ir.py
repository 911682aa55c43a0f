"""T1 by magnitude inversion recovery over inversion times, in the general form of Barral et
al. 2010 (the form of qMRLab's ``inversion_recovery``):

S(TI) = |M0 · (1 − k · exp(−TI/T1))|, TI and T1 in ms,

with k = 2 for a perfect inversion and full recovery between repetitions; k absorbs an
imperfect inversion and a finite TR (S ∝ 1 − 2·exp(−TI/T1) + exp(−TR/T1) gives
k = 2 / (1 + exp(−TR/T1)) < 2), so no TR is needed; its range, 1 to 2.2, keeps the fit out of
the (long T1, small k) valley that magnitude data near the null otherwise fall into. The
magnitude makes the sign of the signal before the null unknown: least squares starts from a
grid over (T1, k) with M0 solved in closed form, which restores the polarity without a
separate search.
"""

from __future__ import annotations

import torch

from mixmap.acquisition import Acquisition, inversion_recovery_scheme
from mixmap.models.base import Params
from mixmap.models.relaxometry.base import RelaxometryModel
from mixmap.parameters import Parameter


class InversionRecoveryT1(RelaxometryModel):
    name = "t1-ir"
    description = "magnitude inversion recovery: |M0·(1 − k·exp(−TI/T1))|"
    required_fields = ("TI",)
    group_field = "TI"
    output_suffix = "T1map"
    min_distinct = 3
    reference = None  # near its null a long TI says little of M0: each voxel's largest signal
    parameters = (
        Parameter("M0", "a.u.", 0.0, 4.0, "signal at full recovery (bounds relative to the scan "
                  "scale)", scaled=True, bids_suffix="M0map"),
        Parameter("T1", "ms", 50.0, 6000.0, "longitudinal relaxation time", bids_suffix="T1map"),
        Parameter("k", "1", 1.0, 2.2, "inversion factor −b/a (2: perfect inversion, full "
                  "recovery)"),
    )
    scale_parameter = "M0"

    def _terms(self, params: Params, acquisition: Acquisition):
        t1 = params["T1"][..., None]
        ti = acquisition.tensor("TI", t1.device, t1.dtype)
        e = torch.exp(-ti / t1)
        return ti, t1, e, 1 - params["k"][..., None] * e

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        _, _, _, inner = self._terms(params, acquisition)
        return (params["M0"][..., None] * inner).abs()

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        ti, t1, e, inner = self._terms(params, acquisition)
        m0, k = params["M0"][..., None], params["k"][..., None]
        sign = torch.sign(m0 * inner)
        return {"M0": sign * inner, "T1": -sign * m0 * k * e * ti / t1**2,
                "k": -sign * m0 * e}

    def example_acquisition(self) -> Acquisition:
        return inversion_recovery_scheme(10)
