"""Ball-and-stick model (Behrens et al., 2003).

S = S0 · [f · exp(−b·Dpar·(g·n)²) + (1 − f) · exp(−b·Diso)], with b in ms/µm², diffusivities in
µm²/ms, the stick fraction f and the unit stick direction n (written as a 4-D map of its x, y, z
components, like FSL's dyads).
"""

from __future__ import annotations

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.models.base import Params, SignalModel, UnsupportedAcquisition, sphere_directions
from mixmap.parameters import Parameter

#: Directions of the initial grid (on a hemisphere: n and −n give the same signal).
N_GRID_DIRECTIONS = 256
#: (Dpar, Diso) pairs of the initial grid, µm²/ms.
GRID_DIFFUSIVITIES = [(dp, di) for dp in (1.0, 1.7, 2.4) for di in (0.6, 1.2, 2.0, 3.0)]


class BallStick(SignalModel):
    name = "ball-stick"
    description = "Ball and stick: S0·[f·exp(−b·Dpar·(g·n)²) + (1−f)·exp(−b·Diso)]"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 4.0, "signal at b=0 (bounds relative to the scan scale)",
                  scaled=True),
        Parameter("f", "1", 0.0, 1.0, "stick (intra-axonal) signal fraction"),
        Parameter("Dpar", "µm²/ms", 0.0, 4.0, "diffusivity along the stick"),
        Parameter("Diso", "µm²/ms", 0.0, 4.0, "diffusivity of the isotropic ball"),
        Parameter("n", "1", -1.0, 1.0, "stick direction, unit vector (x, y, z)", size=3),
    )

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        dev, dt = params["f"].device, params["f"].dtype
        b, g = acquisition.torch(dev, dt)
        cos2 = (params["n"] @ g.T) ** 2  # (..., m)
        stick = torch.exp(-b * params["Dpar"][..., None] * cos2)
        ball = torch.exp(-b * params["Diso"][..., None])
        f = params["f"][..., None]
        return params["S0"][..., None] * (f * stick + (1 - f) * ball)

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        """Analytic derivatives (used by least squares: one pass instead of 7 AD passes)."""
        dev, dt = params["f"].device, params["f"].dtype
        b, g = acquisition.torch(dev, dt)
        c = params["n"] @ g.T  # (n, m) cosines
        S0, f = params["S0"][:, None], params["f"][:, None]
        dpar, diso = params["Dpar"][:, None], params["Diso"][:, None]
        stick = torch.exp(-b * dpar * c * c)
        ball = torch.exp(-b * diso)
        d_c = S0 * f * stick * (-2 * b * dpar * c)  # dS/dc, c = g·n
        return {
            "S0": f * stick + (1 - f) * ball,
            "f": S0 * (stick - ball),
            "Dpar": -S0 * f * b * c * c * stick,
            "Diso": -S0 * (1 - f) * b * ball,
            "n": d_c[..., None] * g,  # (n, m, 3)
        }

    def check_acquisition(self, acquisition: Acquisition) -> None:
        dw = ~acquisition.b0_mask
        dirs = acquisition.bvecs[dw]
        rank = int(np.linalg.matrix_rank(dirs)) if dirs.size else 0
        if rank < 3 or dw.sum() < 6:
            raise UnsupportedAcquisition(
                f"ball-stick needs at least 6 diffusion-weighted directions spanning 3-D; this "
                f"scheme has {int(dw.sum())} directions of rank {rank}"
            )
        if acquisition.n_b0 == 0 and len(acquisition.dw_shells()) < 2:
            raise UnsupportedAcquisition(
                "ball-stick needs a b=0 volume or at least 2 shells to determine S0"
            )

    def initial_estimates(self, signals: torch.Tensor, acquisition: Acquisition) -> Params:
        """Grid over stick directions and (Dpar, Diso) pairs; the two compartment weights are
        solved per voxel in closed form (non-negative), the best candidate kept."""
        dev, dt = signals.device, signals.dtype
        b, g = acquisition.torch(dev, dt)
        dirs = sphere_directions(N_GRID_DIRECTIONS, dev, dt)
        cos2 = (dirs @ g.T) ** 2  # (Nd, m)
        best_cost = torch.full((signals.shape[0],), float("inf"), device=dev, dtype=dt)
        best = {k: torch.zeros(signals.shape[0], device=dev, dtype=dt)
                for k in ("S0", "f", "Dpar", "Diso")}
        best_dir = torch.zeros(signals.shape[0], dtype=torch.long, device=dev)
        for dpar, diso in GRID_DIFFUSIVITIES:
            S = torch.exp(-b * dpar * cos2)  # (Nd, m) stick basis
            B = torch.exp(-b * diso)  # (m,) ball basis
            ys = signals @ S.T  # (n, Nd)
            yb = signals @ B  # (n,)
            ss = (S * S).sum(-1)  # (Nd,)
            sb = S @ B  # (Nd,)
            bb = (B * B).sum()
            det = (ss * bb - sb * sb).clamp_min(1e-12)
            cs = (ys * bb - yb[:, None] * sb) / det
            cb = (yb[:, None] * ss - ys * sb) / det
            # Where a weight is negative, fall back to the better single-compartment fit.
            neg = (cs < 0) | (cb < 0)
            cs_only = (ys / ss).clamp_min(0)
            cb_only = (yb / bb).clamp_min(0)[:, None].expand_as(cs)
            cost_s = -2 * cs_only * ys + cs_only**2 * ss
            cost_b = -2 * cb_only * yb[:, None] + cb_only**2 * bb
            use_s = cost_s < cost_b
            cs = torch.where(neg, torch.where(use_s, cs_only, torch.zeros_like(cs)), cs)
            cb = torch.where(neg, torch.where(use_s, torch.zeros_like(cb), cb_only), cb)
            cost = (-2 * cs * ys - 2 * cb * yb[:, None] + cs**2 * ss[None]
                    + 2 * cs * cb * sb[None] + cb**2 * bb)
            c, j = cost.min(dim=1)
            better = c < best_cost
            best_cost = torch.where(better, c, best_cost)
            csj = cs.gather(1, j[:, None])[:, 0]
            cbj = cb.gather(1, j[:, None])[:, 0]
            s0 = csj + cbj
            best["S0"] = torch.where(better, s0, best["S0"])
            best["f"] = torch.where(better, csj / s0.clamp_min(1e-12), best["f"])
            best["Dpar"] = torch.where(better, torch.full_like(s0, dpar), best["Dpar"])
            best["Diso"] = torch.where(better, torch.full_like(s0, diso), best["Diso"])
            best_dir = torch.where(better, j, best_dir)
        best["f"] = best["f"].clamp(0.01, 0.99)
        best["S0"] = best["S0"].clamp(1e-3, self.parameter("S0").upper * 0.99)
        best["n"] = dirs[best_dir]
        return best
