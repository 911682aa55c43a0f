"""Diffusion kurtosis imaging (DKI; Jensen et al., 2005).

S = S0 · exp(−b·gᵀDg + b²·MD²·W(g)/6), with b in ms/µm², D in µm²/ms (Cholesky-parametrised,
:mod:`.tensor`), MD = tr(D)/3 and W(g) = Σ W_ijkl g_i g_j g_k g_l the kurtosis tensor's
projection (15 independent elements, dimensionless). Maps: S0, the tensor's FA, MD, AD, RD and
v1, and MK, AK, RK (each directional kurtosis kept in [−3/7, 10], as dipy does). Like MSDKI the
exponent goes through :func:`~mixmap.models.base.safe_exp` (a large W makes it grow with b²).
"""

from __future__ import annotations

import torch

from mixmap.acquisition import Acquisition
from mixmap.models.base import SAFE_EXP_CAP, Params, UnsupportedAcquisition, safe_exp
from mixmap.models.diffusion import tensor as T
from mixmap.models.diffusion.dti import S0_PARAMETER, TensorModel


class DKI(TensorModel):
    name = "dki"
    description = ("Diffusion kurtosis: S0·exp(−b·gᵀDg + b²·MD²·W(g)/6); maps FA, MD, AD, RD, "
                   "V1, MK, AK, RK")
    parameters = (S0_PARAMETER,) + T.cholesky_parameters() + T.kurtosis_parameters()
    derived = T.tensor_derived() + T.kurtosis_derived()
    hidden = TensorModel.hidden | frozenset(T.KURTOSIS_NAMES)
    max_b = 3.0
    max_b_reason = "the kurtosis expansion holds: MD and the kurtosis maps are biased"
    max_b_remedy = ""

    def _terms(self, params: Params, acquisition: Acquisition):
        """b, g, the kurtosis design (m, 15), Lᵀg (..., m, 3), MD (...,), W(g) (..., m) and
        the exponent x (..., m)."""
        dev, dt = params["Lxx"].device, params["Lxx"].dtype
        b, g = acquisition.torch(dev, dt)
        design = T.kurtosis_design(g)
        q = T.projections(params, g)
        md = T.mean_diffusivity(params)
        wn = T.kurtosis_vector(params) @ design.T
        x = -b * (q * q).sum(-1) + (b * b / 6.0) * (md * md)[..., None] * wn
        return b, g, design, q, md, wn, x

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        x = self._terms(params, acquisition)[-1]
        return params["S0"][..., None] * safe_exp(x)

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        """Analytic derivatives; safe_exp(x)' = safe_exp(x)·sigmoid(cap − x)."""
        b, g, design, q, md, wn, x = self._terms(params, acquisition)
        e = safe_exp(x)
        de = params["S0"][..., None] * e * torch.sigmoid(SAFE_EXP_CAP - x)
        out = {"S0": e}
        kurt = (b * b / 6.0) * wn * (2.0 * md)[..., None]  # d(second term)/dMD
        for name, d in T.projection_jacobian(q, g).items():
            out[name] = de * (-b * d + kurt * (2.0 / 3.0) * params[name][..., None])
        w_factor = de * (b * b / 6.0) * (md * md)[..., None]
        for k, name in enumerate(T.KURTOSIS_NAMES):
            out[name] = w_factor * design[:, k]
        return out

    def derive(self, params: Params) -> Params:
        eig = T.eigen(params)
        return {**T.tensor_maps(params, eig), **T.kurtosis_maps(params, eig)}

    def check_scheme(self, acquisition: Acquisition) -> None:
        super().check_scheme(acquisition)
        self.require_shells(acquisition, "separate diffusion from kurtosis")
        _, rank4 = T.direction_ranks(acquisition)
        if rank4 < 15:
            raise UnsupportedAcquisition(
                f"dki needs at least 15 diffusion-weighted directions that determine the 15 "
                f"elements of the kurtosis tensor; this scheme's directions determine {rank4}")

    def initial_estimates(self, signals: torch.Tensor, acquisition: Acquisition) -> Params:
        """The weighted log-linear DKI fit: the tensor projected to a positive one, W = the
        fitted MD²·W over that tensor's MD², kept inside the bounds."""
        coef = T.weighted_log_fit(signals, acquisition, kurtosis=True)
        start = self._start_tensor(signals, coef)
        md = T.mean_diffusivity({k: v.double() for k, v in start.items()})
        w = coef[:, 7:] / (md * md)[:, None].clamp_min(1e-4)
        lim = 0.99 * T.KURTOSIS_BOUND
        for k, name in enumerate(T.KURTOSIS_NAMES):
            start[name] = torch.nan_to_num(w[:, k]).clamp(-lim, lim).to(signals.dtype)
        return start
