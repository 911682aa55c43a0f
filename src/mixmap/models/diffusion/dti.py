"""Diffusion tensor imaging (DTI; Basser et al., 1994).

S = S0 · exp(−b · gᵀDg), with b in ms/µm², the tensor D in µm²/ms parametrised by its Cholesky
factor (D = L·Lᵀ, positive semi-definite by construction; :mod:`.tensor`). The maps written are
S0 and the derived FA, MD, AD, RD and the principal direction v1 (a 4-D map of its x, y, z
components, like FSL's V1); the factor's six elements are kept in the fit, not written. Least
squares starts from the weighted log-linear fit (WLLS) and refines it non-linearly.
"""

from __future__ import annotations

import torch

from mixmap.acquisition import Acquisition
from mixmap.models.base import Params, UnsupportedAcquisition
from mixmap.models.diffusion import tensor as T
from mixmap.models.diffusion.base import DiffusionModel
from mixmap.parameters import Parameter

S0_PARAMETER = Parameter("S0", "a.u.", 0.0, 4.0,
                         "signal at b=0 (bounds relative to the scan scale)", scaled=True)


class TensorModel(DiffusionModel):
    """What DTI and DKI share: the Cholesky-parametrised tensor, the scheme's checks, the
    WLLS start and the warning beyond :attr:`max_b`."""

    required_fields = ("b", "direction")
    hidden = frozenset(name for name, _, _ in T.CHOLESKY)
    direction_brightness = {"v1": "fa"}
    max_b = 1.5
    max_b_reason = "the Gaussian (tensor) approximation holds: MD is biased low"
    max_b_remedy = " (or fit dki)"

    def check_scheme(self, acquisition: Acquisition) -> None:
        rank2, _ = T.direction_ranks(acquisition)
        if rank2 < 6:
            n_dw = int((~acquisition.b0_mask).sum())
            raise UnsupportedAcquisition(
                f"{self.name} needs diffusion-weighted directions that determine a tensor (6 "
                f"non-collinear, non-coplanar ones); this scheme's {n_dw} directions "
                f"determine {rank2} of its 6 elements")
        if acquisition.n_b0 == 0 and len(acquisition.dw_shells()) < 2:
            raise UnsupportedAcquisition(
                f"{self.name} needs a b=0 volume or at least 2 shells to determine S0")

    def _start_tensor(self, signals: torch.Tensor, coef: torch.Tensor) -> Params:
        """S0 and the factor's elements of a log-linear fit's coefficients."""
        s0 = self.parameter("S0")
        start = T.cholesky_start(T.tensor_of(coef))
        start["S0"] = torch.exp(coef[:, 0].clamp(-20, 20)).clamp(1e-3, 0.99 * s0.upper)
        return {k: v.to(signals.dtype) for k, v in start.items()}


class DTI(TensorModel):
    name = "dti"
    description = "Diffusion tensor: S0·exp(−b·gᵀDg), D = L·Lᵀ; maps FA, MD, AD, RD, V1"
    parameters = (S0_PARAMETER,) + T.cholesky_parameters()
    derived = T.tensor_derived()

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        dev, dt = params["Lxx"].device, params["Lxx"].dtype
        b, g = acquisition.torch(dev, dt)
        adc = (T.projections(params, g) ** 2).sum(-1)
        return params["S0"][..., None] * torch.exp(-b * adc)

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        dev, dt = params["Lxx"].device, params["Lxx"].dtype
        b, g = acquisition.torch(dev, dt)
        q = T.projections(params, g)
        e = torch.exp(-b * (q * q).sum(-1))
        out = {"S0": e}
        de = -b * params["S0"][..., None] * e
        for name, d in T.projection_jacobian(q, g).items():
            out[name] = de * d
        return out

    def derive(self, params: Params) -> Params:
        return T.tensor_maps(params)

    def initial_estimates(self, signals: torch.Tensor, acquisition: Acquisition) -> Params:
        """The weighted log-linear tensor fit, projected to a positive tensor."""
        return self._start_tensor(signals, T.weighted_log_fit(signals, acquisition))
