"""Ball-and-stick model (Behrens et al., 2003).

S = S0 · [f · exp(−b·Dpar·(g·n)²) + (1 − f) · exp(−b·Diso)], with b in ms/µm², diffusivities in
µm²/ms, the stick fraction f and the unit stick direction n (written as a 4-D map of its x, y, z
components, like FSL's dyads).
"""

from __future__ import annotations

import torch

from mixmap.acquisition import Acquisition
from mixmap.models.base import Params, UnsupportedAcquisition
from mixmap.models.diffusion import tensor as T
from mixmap.models.diffusion.base import DiffusionModel
from mixmap.parameters import Parameter

#: Dpar and Diso values (µm²/ms) of the initial grid: every pair is tried for each candidate
#: direction.
GRID_DPAR = (1.0, 1.7, 2.4)
GRID_DISO = (0.6, 1.2, 2.0, 3.0)


class BallStick(DiffusionModel):
    name = "ball-stick"
    required_fields = ("b", "direction")
    direction_brightness = {"n": "f"}
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

    def normal_equations(self, u, signals, acquisition, sqrt_weights=None):
        """JᵀJ, Jᵀr and the cost without the (n, m, 7) Jacobian (least squares' inner loop).

        Every column of J is a per-voxel factor times one of six (n, m) arrays: the model over
        S0, stick − ball, b·c²·stick, b·ball and, for the direction, b·c·stick times the
        cosine with each of two unit vectors t1, t2 orthogonal to n (the radial coordinate of
        the unbounded direction has zero derivative). One batched Gram matrix of those arrays
        and the residual gives everything; the factors and the map from (t1, t2) back to the
        3 unbounded direction coordinates are applied to the small matrices afterwards.
        """
        k = u.shape[0]
        dev, dt = u.device, u.dtype
        b, g = acquisition.torch(dev, dt)
        p = self.split(u)
        S0, f, dpar, diso, n = p["S0"], p["f"], p["Dpar"], p["Diso"], p["n"]
        t1, t2 = _tangents(n)
        cos = torch.stack([n, t1, t2], 1) @ g.T  # (k, 3, m): g·n, g·t1, g·t2
        c = cos[:, 0]
        bc = b * c
        stick = torch.exp(-(dpar[:, None] * bc) * c)
        ball = torch.exp(-diso[:, None] * b)
        rows = torch.empty(k, 7, b.shape[0], device=dev, dtype=dt)
        torch.sub(stick, ball, out=rows[:, 1])
        torch.addcmul(ball, rows[:, 1], f[:, None], out=rows[:, 0])  # signal / S0
        bcs = bc.mul_(stick)
        torch.mul(bcs, c, out=rows[:, 2])
        torch.mul(ball, b, out=rows[:, 3])
        torch.mul(bcs, cos[:, 1], out=rows[:, 4])
        torch.mul(bcs, cos[:, 2], out=rows[:, 5])
        torch.sub(rows[:, 0] * S0[:, None], signals, out=rows[:, 6])  # residual
        if sqrt_weights is not None:
            rows *= sqrt_weights
        gram = (rows @ rows.transpose(1, 2)).double()  # (k, 7, 7)
        # Column factors: bounded derivative factors times d(bounded)/d(unbounded).
        x = torch.stack([S0, f, dpar, diso], 1).double()
        lo = torch.tensor([q.lower for q in self.parameters[:4]], device=dev, dtype=x.dtype)
        hi = torch.tensor([q.upper for q in self.parameters[:4]], device=dev, dtype=x.dtype)
        d = (x - lo) * (hi - x) / (hi - lo)  # sigmoid' in bounded terms: (x−lo)(hi−x)/(hi−lo)
        S0d, fd = x[:, 0], x[:, 1]
        kappa = -2 * S0d * fd * x[:, 2]
        one = torch.ones_like(S0d)
        w = torch.stack([d[:, 0], S0d * d[:, 1], -S0d * fd * d[:, 2],
                         -S0d * (1 - fd) * d[:, 3], kappa, kappa, one], 1)
        gram = gram * w[:, :, None] * w[:, None, :]
        cost = gram[:, 6, 6]
        # (S0, f, Dpar, Diso, t1, t2) -> the 7 unbounded coordinates: the direction's
        # derivative is (I − n nᵀ)/|u| = (t1 t1ᵀ + t2 t2ᵀ)/|u|, so its block is T = [t1; t2]/|u|.
        T = (torch.stack([t1, t2], 1) / u[:, None, 4:].norm(dim=2, keepdim=True)).double()
        A = torch.empty(k, 7, 7, device=dev, dtype=torch.float64)
        A[:, :4, :4] = gram[:, :4, :4]
        A[:, :4, 4:] = (gram[:, :4, 4:6, None] * T[:, None]).sum(2)
        A[:, 4:, :4] = A[:, :4, 4:].transpose(1, 2)
        GT = (gram[:, 4:6, 4:6, None] * T[:, None]).sum(2)  # (k, 2, 3)
        A[:, 4:, 4:] = (T[..., None] * GT[:, :, None, :]).sum(1)
        grad = torch.cat([gram[:, :4, 6], (gram[:, 4:6, 6, None] * T).sum(1)], 1)
        bad = ~torch.isfinite(cost)
        if bool(bad.any()):
            cost = torch.where(bad, torch.full_like(cost, float("inf")), cost)
        return cost, A, grad

    def check_scheme(self, acquisition: Acquisition) -> None:
        self.require_directions(acquisition)
        if acquisition.n_b0 == 0 and len(acquisition.dw_shells()) < 2:
            raise UnsupportedAcquisition(
                "ball-stick needs a b=0 volume or at least 2 shells to determine S0"
            )

    def initial_estimates(self, signals: torch.Tensor, acquisition: Acquisition) -> Params:
        """Two candidate stick directions, each with a (Dpar, Diso) grid; the best fit is kept.

        The candidates are cheap closed forms: the principal eigenvector of a weighted
        log-linear tensor fit (the direction of fastest decay; best where the stick fraction is
        large) and the least-signal axis of the high-b signal's second moment (linear in the
        signal, so still informative where a small stick fraction leaves the log-linear fit to
        noise). For each candidate n and each (Dpar, Diso) pair of :data:`GRID_DPAR` ×
        :data:`GRID_DISO`, the stick and ball weights (S0·f, S0·(1−f)) are solved in
        closed form (non-negative); the candidate with the least squared error is kept.
        """
        dev, dt = signals.device, signals.dtype
        b, g = acquisition.torch(dev, dt)
        dpars = torch.tensor(GRID_DPAR, device=dev, dtype=dt)
        disos = torch.tensor(GRID_DISO, device=dev, dtype=dt)
        B = torch.exp(-b[:, None] * disos)  # (m, Ni) ball signals
        yb = signals @ B  # (n, Ni)
        bb = (B * B).sum(0)  # (Ni,)
        best_cost = torch.full((signals.shape[0],), float("inf"), device=dev, dtype=dt)
        best = {k: torch.zeros_like(best_cost) for k in ("S0", "f", "Dpar", "Diso")}
        best["n"] = torch.zeros(signals.shape[0], 3, device=dev, dtype=dt)
        for n_dir in (tensor_direction(signals, acquisition),
                      high_b_direction(signals, acquisition)):
            cos2 = (n_dir @ g.T) ** 2  # (n, m)
            for dpar in dpars:
                S = torch.exp(-(b * dpar) * cos2)  # (n, m) stick signals
                ys = (signals * S).sum(1, keepdim=True)  # (n, 1)
                ss = (S * S).sum(1, keepdim=True)
                sb = S @ B  # (n, Ni)
                cs, cb, cost = two_compartment_weights(ys, yb, ss, sb, bb)
                c, j = cost.min(dim=1)
                better = c < best_cost
                best_cost = torch.where(better, c, best_cost)
                csj = cs.gather(1, j[:, None])[:, 0]
                cbj = cb.gather(1, j[:, None])[:, 0]
                s0 = csj + cbj
                best["S0"] = torch.where(better, s0, best["S0"])
                best["f"] = torch.where(better, csj / s0.clamp_min(1e-12), best["f"])
                best["Dpar"] = torch.where(better, dpar.expand_as(s0), best["Dpar"])
                best["Diso"] = torch.where(better, disos[j], best["Diso"])
                best["n"] = torch.where(better[:, None], n_dir, best["n"])
        best["f"] = best["f"].clamp(0.01, 0.99)
        best["S0"] = best["S0"].clamp(1e-3, self.parameter("S0").upper * 0.99)
        return best


def two_compartment_weights(ys, yb, ss, sb, bb):
    """Non-negative least-squares weights of a stick and a ball signal, broadcast over voxels
    and candidates: ys = y·S, yb = y·B, ss = |S|², sb = S·B, bb = |B|² (broadcastable).
    Returns (stick weight, ball weight, cost − |y|²)."""
    det = (ss * bb - sb * sb).clamp_min(1e-12)
    cs = (ys * bb - yb * sb) / det
    cb = (yb * ss - ys * sb) / det
    # Where a weight is negative, fall back to the better single-compartment fit.
    neg = (cs < 0) | (cb < 0)
    cs_only = (ys / ss).clamp_min(0)
    cb_only = (yb / bb).clamp_min(0)
    cost_s = -2 * cs_only * ys + cs_only**2 * ss
    cost_b = -2 * cb_only * yb + cb_only**2 * bb
    use_s = cost_s < cost_b
    zero = torch.zeros((), dtype=cs.dtype, device=cs.device)
    cs = torch.where(neg, torch.where(use_s, cs_only, zero), cs)
    cb = torch.where(neg, torch.where(use_s, zero, cb_only), cb)
    cost = -2 * cs * ys - 2 * cb * yb + cs**2 * ss + 2 * cs * cb * sb + cb**2 * bb
    return cs, cb, cost


def high_b_direction(signals: torch.Tensor, acquisition: Acquisition) -> torch.Tensor:
    """(n, 3) axis of least signal at the highest shell: the eigenvector of Σ y g gᵀ with the
    smallest eigenvalue. A stick attenuates most along itself, the ball not at all."""
    b, g = acquisition.torch(signals.device, torch.float64)
    top = b > 0.5 * float(b.max())
    gg = (g[top, :, None] * g[top, None, :]).reshape(-1, 9)
    M = (signals[:, top].double() @ gg).reshape(-1, 3, 3)
    _, vecs = torch.linalg.eigh(M)
    return vecs[:, :, 0].to(signals.dtype)


def tensor_direction(signals: torch.Tensor, acquisition: Acquisition) -> torch.Tensor:
    """(n, 3) principal eigenvector of the weighted log-linear tensor fit
    (:func:`~mixmap.models.diffusion.tensor.weighted_log_fit`)."""
    coef = T.weighted_log_fit(signals, acquisition)
    return T.principal_direction(T.tensor_of(coef)).to(signals.dtype)


def _tangents(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors (k, 3) orthogonal to the unit vectors n (k, 3) and to each other."""
    # Cross with the coordinate axis least aligned with n, so the product is never tiny.
    axis = torch.zeros_like(n)
    axis.scatter_(1, n.abs().argmin(1, keepdim=True), 1.0)
    t1 = torch.linalg.cross(n, axis)
    t1 = t1 / t1.norm(dim=1, keepdim=True)
    return t1, torch.linalg.cross(n, t1)
