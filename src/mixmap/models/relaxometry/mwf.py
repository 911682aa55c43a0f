"""Two-pool myelin water model over the echoes of a multi-echo spin echo (MacKay et al. 1994):

S(TE) = S0 · [MWF · exp(−TE/T2my) + (1 − MWF) · exp(−TE/T2ie)], TE and T2 in ms.

Myelin water (T2my) and intra- and extracellular water (T2ie) are identifiable because their
T2 ranges do not overlap (:data:`MYELIN_T2_MAX` ms apart); CSF-like voxels have MWF near 0 and
a long T2ie. Stimulated echoes (imperfect refocusing) are not modelled.
"""

from __future__ import annotations

import numpy as np
import torch

from mixmap.acquisition import Acquisition, multi_echo_scheme
from mixmap.models.base import Params
from mixmap.models.relaxometry.base import RelaxometryModel
from mixmap.parameters import Parameter

#: The longest myelin-water T2 (ms) and the shortest intra/extracellular one: the boundary of
#: the two pools' ranges (the usual 40 ms cut-off of multi-component T2 analyses).
MYELIN_T2_MAX = 40.0


#: (T2my, T2ie) points of the least-squares start's log grid.
START_GRID = (16, 48)


def two_pool_nnls(basis: torch.Tensor, signals: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative amplitudes of two decays for each of P basis pairs ``basis`` (P, 2, m) and
    each voxel of ``signals`` (n, m): ((n, P, 2) amplitudes, (n, P) residual sum of squares),
    from the 2×2 normal equations, a negative amplitude set to 0 and the other refitted."""
    gram = basis @ basis.transpose(1, 2)  # (P, 2, 2)
    proj = torch.einsum("nm,pkm->npk", signals, basis)  # (n, P, 2)
    g00, g01, g11 = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    det = (g00 * g11 - g01 * g01).clamp_min(1e-30)
    a = (g11 * proj[..., 0] - g01 * proj[..., 1]) / det
    b = (g00 * proj[..., 1] - g01 * proj[..., 0]) / det
    only_b = (proj[..., 1] / g11).clamp_min(0)
    only_a = (proj[..., 0] / g00).clamp_min(0)
    a, b = (torch.where(a < 0, torch.zeros_like(a), torch.where(b < 0, only_a, a)),
            torch.where(a < 0, only_b, torch.where(b < 0, torch.zeros_like(b), b)))
    coef = torch.stack([a, b], -1)
    yy = (signals * signals).sum(1, keepdim=True)
    rss = yy - 2 * (coef * proj).sum(-1) + torch.einsum("npk,pkl,npl->np", coef, gram, coef)
    return coef, rss


def _best_pair(coef, rss, t2my, t2ie, mwf_max) -> Params:
    """Per voxel the pair of least residual (:func:`two_pool_nnls`) as bounded parameters."""
    idx = rss.argmin(1)
    best = coef.gather(1, idx[:, None, None].expand(-1, 1, 2))[:, 0]
    total = best.sum(1).clamp_min(1e-6)
    return {"S0": total, "MWF": (best[:, 0] / total).clamp(1e-4, mwf_max * 0.999),
            "T2my": t2my[idx], "T2ie": t2ie[idx]}


class MyelinWaterFraction(RelaxometryModel):
    name = "mwf"
    description = "two-pool myelin water: S0·[MWF·exp(−TE/T2my) + (1−MWF)·exp(−TE/T2ie)]"
    required_fields = ("TE",)
    group_field = "TE"
    output_suffix = "MWFmap"
    min_distinct = 8
    parameters = (
        Parameter("S0", "a.u.", 0.0, 4.0, "signal at TE = 0 (bounds relative to the scan scale)",
                  scaled=True, bids_suffix="M0map"),
        Parameter("MWF", "1", 0.0, 0.5, "myelin water fraction", bids_suffix="MWFmap"),
        Parameter("T2my", "ms", 5.0, MYELIN_T2_MAX, "T2 of myelin water"),
        Parameter("T2ie", "ms", MYELIN_T2_MAX, 3000.0,
                  "T2 of intra- and extracellular water (and of CSF)"),
    )

    def _pools(self, params: Params, acquisition: Acquisition):
        t2my, t2ie = params["T2my"][..., None], params["T2ie"][..., None]
        te = acquisition.tensor("TE", t2my.device, t2my.dtype)
        return te, t2my, t2ie, torch.exp(-te / t2my), torch.exp(-te / t2ie)

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        _, _, _, e_my, e_ie = self._pools(params, acquisition)
        f = params["MWF"][..., None]
        return params["S0"][..., None] * (f * e_my + (1 - f) * e_ie)

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        te, t2my, t2ie, e_my, e_ie = self._pools(params, acquisition)
        s0, f = params["S0"][..., None], params["MWF"][..., None]
        return {"S0": f * e_my + (1 - f) * e_ie, "MWF": s0 * (e_my - e_ie),
                "T2my": s0 * f * e_my * te / t2my**2,
                "T2ie": s0 * (1 - f) * e_ie * te / t2ie**2}

    def initial_estimates(self, signals: torch.Tensor, acquisition: Acquisition) -> Params:
        """Variable projection on a log grid of (T2my, T2ie) pairs: per pair, the two pool
        amplitudes by non-negative least squares in closed form, and per voxel the best pair
        (a 3-D quasi-random grid misses the narrow valleys of a two-exponential fit)."""
        dtype, dev = signals.dtype, signals.device
        my = torch.logspace(np.log10(self.parameter("T2my").lower * 1.05),
                            np.log10(MYELIN_T2_MAX * 0.95), START_GRID[0], dtype=dtype,
                            device=dev)
        ie = torch.logspace(np.log10(MYELIN_T2_MAX * 1.05),
                            np.log10(self.parameter("T2ie").upper * 0.95), START_GRID[1],
                            dtype=dtype, device=dev)
        t2my, t2ie = (g.reshape(-1) for g in torch.meshgrid(my, ie, indexing="ij"))
        te = acquisition.tensor("TE", dev, dtype)
        basis = torch.stack([torch.exp(-te / t2my[:, None]), torch.exp(-te / t2ie[:, None])],
                            1)  # (P, 2, m)
        coef, rss = two_pool_nnls(basis, signals)
        return _best_pair(coef, rss, t2my, t2ie, self.parameter("MWF").upper)

    def example_acquisition(self) -> Acquisition:
        return multi_echo_scheme(32)
