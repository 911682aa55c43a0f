"""Intravoxel incoherent motion (IVIM), bi-exponential form (Le Bihan et al., 1988).

S(b) = S0 · [f · exp(−b·D*) + (1 − f) · exp(−b·D)], with b in ms/µm², the tissue diffusivity D
and the pseudo-diffusion coefficient D* in µm²/ms (1 µm²/ms = 10⁻³ mm²/s) and the perfusion
fraction f. It declares nothing but its parameters and physics: least squares starts from the
generic quasi-random grid, which shows that a new model needs no fitter-specific code.
"""

from __future__ import annotations

import numpy as np
import torch

from mixmap.acquisition import Acquisition, ivim_scheme
from mixmap.models.base import Params, UnsupportedAcquisition
from mixmap.models.diffusion.base import DiffusionModel
from mixmap.parameters import Parameter

#: The largest b (ms/µm²) of IVIM's reference (S0) volumes.
IVIM_REFERENCE_B = 0.005


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

    #: b (ms/µm²) below which the perfusion signal is measured (D* ≥ 4 µm²/ms has decayed
    #: to under a half by then): without such a volume f and D* are not determined.
    perfusion_b = 0.2

    def check_scheme(self, acquisition: Acquisition) -> None:
        n_b = len(acquisition.shells())
        if n_b < 4:
            raise UnsupportedAcquisition(
                f"IVIM needs at least 4 distinct b-values (including low ones below 200 s/mm²); "
                f"this scheme has {n_b}"
            )
        dw = [s.bval for s in acquisition.dw_shells()]
        if not any(b <= self.perfusion_b * 1.05 for b in dw):
            raise UnsupportedAcquisition(
                f"IVIM needs b-values in the perfusion range (0 < b ≤ "
                f"{self.perfusion_b * 1000:g} s/mm²) to determine f and D*; the lowest "
                f"non-zero b here is {round(min(dw) * 1000)} s/mm²"
            )

    def reference_volumes(self, acquisition: Acquisition) -> np.ndarray:
        """b ≤ 5 s/mm² only: at b = 10-50 s/mm² (b=0 for other diffusion models) the perfusion
        signal has already decayed, so they are neither S0 nor repeats of it."""
        return acquisition.bvals <= IVIM_REFERENCE_B

    def example_acquisition(self) -> Acquisition:
        return ivim_scheme()
