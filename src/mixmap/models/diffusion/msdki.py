"""Mean signal diffusion kurtosis imaging (MSDKI).

S(b) = S0 · exp(−b·D + b²·D²·K / 6)  (Henriques et al., 2021; dipy ``reconst.msdki``), with b in
ms/µm², the mean diffusivity D in µm²/ms and the mean kurtosis K dimensionless. The signal does
not depend on the gradient direction: fitting all measurements of a shell by least squares equals
fitting the shell's mean (the powder average) weighted by its number of directions.

For K > 0 the exponent is a parabola in b that rises again above b = 3/(D·K); inside the bounds it
can reach about 100 at b = 3 ms/µm², where exp() overflows float32. The exponent is therefore
passed through :func:`safe_exp`, which equals exp() for exponents below about 4 (every value the
paper's simulation produces, where white-matter signals above S0 at b=3000 s/mm² occur) and levels
off smoothly below 15, so the signal and its gradient stay finite for every allowed parameter.

K is declared down to −0.5 (the paper's simulation draws its CSF-like cluster's K around 0, half
of it negative), but least squares keeps K ≥ 0 by default (:attr:`MSDKI.lsq_bounds`): the
kurtosis of any mixture of Gaussian compartments is 3·Var(D)/E(D)² ≥ 0, and constrained DKI fits
impose K ≥ 0 for that reason (Tabesh et al., 2011). Where the data do not determine K (no signal
left at the higher shells: CSF) the unconstrained minimum runs along the D-K ridge to the bound:
22-38 % of the paper's CSF-like voxels end below K = −0.45 at SNR 50-10 (``benchmarks/lsq.py``).
``mixmap fit --bounds K=-0.5,4`` fits the declared range.
"""

from __future__ import annotations

import torch

from mixmap.acquisition import Acquisition
from mixmap.models.base import (
    SAFE_EXP_CAP,
    Params,
    safe_exp,
)
from mixmap.models.diffusion.base import DiffusionModel
from mixmap.parameters import Parameter


class MSDKI(DiffusionModel):
    name = "msdki"
    description = "Mean signal DKI: S0·exp(−bD + b²D²K/6), powder-averaged kurtosis"
    direction_independent = True
    parameters = (
        Parameter("S0", "a.u.", 0.0, 4.0, "signal at b=0 (bounds relative to the scan scale)",
                  scaled=True),
        Parameter("D", "µm²/ms", 0.0, 4.0, "mean diffusivity"),
        Parameter("K", "1", -0.5, 4.0, "mean kurtosis"),
    )
    lsq_bounds = {"K": (0.0, 4.0)}
    #: b (ms/µm²) up to which the second-order (kurtosis) expansion of the log signal holds
    #: in brain tissue (about 2500-3000 s/mm²; Jensen & Helpern 2010).
    max_b = 3.0
    max_b_reason = "the kurtosis expansion holds: D and K are biased"

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        b, _ = acquisition.torch(params["D"].device, params["D"].dtype)
        D = params["D"][..., None]
        K = params["K"][..., None]
        bd = b * D
        return params["S0"][..., None] * safe_exp(-bd + bd * bd * K / 6.0)

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        """Analytic derivatives; safe_exp(x)' = safe_exp(x)·sigmoid(cap − x)."""
        b, _ = acquisition.torch(params["D"].device, params["D"].dtype)
        D = params["D"][..., None]
        K = params["K"][..., None]
        x = -b * D + (b * D) ** 2 * K / 6.0
        e = safe_exp(x)
        de = e * torch.sigmoid(SAFE_EXP_CAP - x) * params["S0"][..., None]
        return {"S0": e, "D": de * (-b + b * b * D * K / 3.0), "K": de * (b * D) ** 2 / 6.0}

    def check_scheme(self, acquisition: Acquisition) -> None:
        self.require_shells(acquisition, "separate D and K", label="MSDKI")

    def initial_estimates(self, signals: torch.Tensor, acquisition: Acquisition) -> Params:
        """Log-linear fit of log(shell mean) = log S0 − bD + b²D²K/6 (as dipy's MSDKI does)."""
        shells = acquisition.shells()
        dev, dt = signals.device, signals.dtype
        means = torch.stack(
            [signals[:, torch.as_tensor(s.indices, device=dev)].mean(1) for s in shells], 1
        )
        weights = torch.tensor([float(s.n) for s in shells], device=dev, dtype=dt)
        bs = torch.tensor([s.bval for s in shells], device=dev, dtype=dt)
        floor = 1e-3 * self.reference_signal(signals, acquisition).clamp_min(1e-6)[:, None]
        y = torch.log(torch.maximum(means, floor))
        X = torch.stack([torch.ones_like(bs), -bs, bs * bs / 6.0], 1)  # (S, 3)
        # One weighted design shared by all voxels: solve its 3x3 normal equations once (in
        # float64) and apply the solution to every voxel with a matrix product. (A batched
        # torch.linalg.lstsq over an expanded design was not bit-reproducible between calls.)
        Xd, wd = X.double(), weights.double()
        pinv = torch.linalg.solve(Xd.T @ (Xd * wd[:, None]), (Xd * wd[:, None]).T)  # (3, S)
        coef = (y.double() @ pinv.T).to(dt)
        S0 = torch.exp(coef[:, 0])
        D = coef[:, 1]
        K = coef[:, 2] / D.clamp_min(1e-3) ** 2
        p = {name: self.parameter(name) for name in ("S0", "D", "K")}

        def inside(x, par, margin=1e-3):
            span = par.upper - par.lower
            lo, hi = par.lower + margin * span, par.upper - margin * span
            return torch.nan_to_num(x, nan=(lo + hi) / 2).clamp(lo, hi)

        return {"S0": inside(S0, p["S0"]), "D": inside(D, p["D"], 0.01),
                "K": inside(K, p["K"], 0.01)}
