"""Intravoxel incoherent motion (IVIM), bi-exponential form (Le Bihan et al., 1988).

S(b) = S0 · [f · exp(−b·D*) + (1 − f) · exp(−b·D)], with b in ms/µm², the tissue diffusivity D
and the pseudo-diffusion coefficient D* in µm²/ms (1 µm²/ms = 10⁻³ mm²/s) and the perfusion
fraction f. It declares nothing but its parameters and physics: least squares starts from the
generic quasi-random grid, which shows that a new model needs no fitter-specific code.
"""

from __future__ import annotations

import torch

from mixmap.acquisition import Acquisition
from mixmap.models.base import Params, UnsupportedAcquisition
from mixmap.models.diffusion.base import DiffusionModel
from mixmap.parameters import Parameter


class IVIM(DiffusionModel):
    name = "ivim"
    description = "IVIM: S0·[f·exp(−b·D*) + (1−f)·exp(−b·D)]"
    direction_independent = True
    parameters = (
        Parameter("S0", "a.u.", 0.0, 4.0, "signal at b=0 (bounds relative to the scan scale)",
                  scaled=True),
        Parameter("f", "1", 0.0, 1.0, "perfusion (pseudo-diffusion) fraction"),
        Parameter("D", "µm²/ms", 0.0, 4.0, "tissue diffusivity"),
        Parameter("Dstar", "µm²/ms", 4.0, 200.0, "pseudo-diffusion coefficient D*"),
    )

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        b, _ = acquisition.torch(params["D"].device, params["D"].dtype)
        f = params["f"][..., None]
        return params["S0"][..., None] * (
            f * torch.exp(-b * params["Dstar"][..., None])
            + (1 - f) * torch.exp(-b * params["D"][..., None])
        )

    def check_scheme(self, acquisition: Acquisition) -> None:
        n_b = len(acquisition.shells())
        if n_b < 4:
            raise UnsupportedAcquisition(
                f"IVIM needs at least 4 distinct b-values (including low ones below 200 s/mm²); "
                f"this scheme has {n_b}"
            )
