"""NODDI with Watson dispersion (Zhang et al., 2012, NeuroImage 61:1000).

S = S0 · [(1 − isovf) · (icvf · A_ic + (1 − icvf) · A_ec) + isovf · exp(−b·d_iso)], b in ms/µm²:

* A_ic: sticks of diffusivity d_par dispersed about the direction μ by a Watson distribution
  of concentration κ, with od = (2/π)·arctan(1/κ) (ODI);
* A_ec: the tortuous extra-neurite zeppelin, exp(−b·gᵀD_ec g) with D_ec the Watson average
  of a zeppelin of d_par along and d_par·(1 − icvf) across (averaging the tensor, as the NODDI
  toolbox and AMICO do);
* an isotropic free-water compartment of diffusivity d_iso.

The intrinsic diffusivities are the usual in-vivo constants (d_par 1.7, d_iso 3.0 µm²/ms),
overridable (``--constant dpar=0.6`` ex vivo). Maps: icvf (NDI), od (ODI), isovf (FISO) and
the direction (a 4-D map of its x, y, z components); AMICO 2 calls the three NDI, ODI and
FWF, the NODDI toolbox ficvf, odi and fiso.

The Watson-dispersed stick is a zonal convolution on the sphere, so by the Funk–Hecke theorem
A_ic(t = g·μ) = Σ_l (2l+1)/2 · a_l(b·d_par) · w_l(κ) · P_l(t) over even l, with a_l and w_l the
Legendre coefficients of exp(−β x²) and of the normalised Watson density in x = cos θ, both
computed by Gauss–Legendre quadrature. Orders to :data:`LEGENDRE_ORDER` with
:data:`QUADRATURE_NODES` nodes agree with direct integration over the sphere to 1e-7 for
b·d_par ≤ 6.8 (b ≤ 4000 s/mm² at d_par 1.7) and every od in range.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.models.base import Params
from mixmap.models.diffusion.ball_stick import tensor_direction, two_compartment_weights
from mixmap.models.diffusion.base import DiffusionModel
from mixmap.parameters import Constant, Parameter

#: Highest (even) Legendre order of the dispersed stick's expansion.
LEGENDRE_ORDER = 20
#: Gauss–Legendre nodes on x ∈ [0, 1] for the Legendre coefficients.
QUADRATURE_NODES = 64
#: Candidate (icvf, od) values of least squares' start (every pair is tried).
GRID_ICVF = (0.2, 0.45, 0.7)
GRID_OD = (0.05, 0.15, 0.35, 0.7)


def _quadrature() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes x and weights on [0, 1], and P_l(x) for even l: (N,), (N,), (N, L)."""
    x, w = np.polynomial.legendre.leggauss(QUADRATURE_NODES)
    x, w = 0.5 * (x + 1), 0.5 * w
    orders = np.arange(0, LEGENDRE_ORDER + 1, 2)
    P = np.stack([np.polynomial.legendre.Legendre.basis(int(n))(x) for n in orders], 1)
    return x, w, P


_X, _W, _P = _quadrature()


def _tables(device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(_X, device=device, dtype=dtype),
            torch.as_tensor(_W, device=device, dtype=dtype),
            torch.as_tensor(_P, device=device, dtype=dtype))


def kappa_of(od: torch.Tensor) -> torch.Tensor:
    """Watson concentration κ of the orientation dispersion index od ∈ (0, 1]:
    κ = 1 / tan(π·od/2) (0 at od = 1)."""
    half = 0.5 * math.pi * od
    return torch.cos(half) / torch.sin(half)


def watson_moments(kappa: torch.Tensor, derivatives: bool = False) -> tuple[torch.Tensor, ...]:
    """Legendre coefficients w_l (even l, w_0 = 1) of the Watson density in x = cos θ, and
    τ = E[x²] (the extra-neurite tensor's share along μ): (..., L), (...,); with
    ``derivatives`` also dw_l/dκ = Cov(P_l, x²) and dτ/dκ = Var(x²)."""
    x, w, P = _tables(kappa.device, kappa.dtype)
    dens = torch.exp(kappa[..., None] * (x * x - 1)) * w  # (..., N), max 1: no overflow
    dens = dens / dens.sum(-1, keepdim=True)
    x2 = x * x
    wl, tau = dens @ P, dens @ x2
    if not derivatives:
        return wl, tau
    return wl, tau, dens @ (P * x2[:, None]) - wl * tau[..., None], dens @ (x2 * x2) - tau**2


def stick_coefficients(beta: torch.Tensor) -> torch.Tensor:
    """(2l+1)/2 · a_l for β = b·d_par (m,): a_l = ∫₋₁¹ exp(−β x²) P_l(x) dx, even l: (m, L)."""
    x, w, P = _tables(beta.device, beta.dtype)
    # (2l+1)/2 times 2: the even integrand over [−1, 1] is twice the quadrature over [0, 1]
    scale = torch.as_tensor(2 * np.arange(0, LEGENDRE_ORDER + 1, 2) + 1.0,
                            device=beta.device, dtype=beta.dtype)
    return (torch.exp(-beta[:, None] * (x * x)) * w) @ (P * scale)


def legendre_series(t: torch.Tensor, coef: torch.Tensor, *more: torch.Tensor,
                    slope: bool = False) -> list[torch.Tensor]:
    """Σ_l c[l/2] · P_l(t) over even l ≤ :data:`LEGENDRE_ORDER` for t (...) and each
    coefficient array c (L, ...) of ``coef`` and ``more`` (order first, so each order's slice
    is contiguous), in one pass of the three-term recurrence; with ``slope``, also d/dt of
    the first series (P'_{n+1} = P'_{n−1} + (2n+1)·P_n), last in the list."""
    coefs = (coef, *more)
    p_prev, p = torch.ones_like(t), t
    out = [c[0] for c in coefs]
    if slope:
        d_prev, d = torch.zeros_like(t), torch.ones_like(t)  # P'_0, P'_1
        dsum = torch.zeros_like(t)
    for n in range(1, LEGENDRE_ORDER):
        if slope:
            d_prev, d = d, d_prev + (2 * n + 1) * p  # P'_{n+1}
        p_prev, p = p, t * p * ((2 * n + 1) / (n + 1)) - p_prev * (n / (n + 1))  # P_{n+1}
        if (n + 1) % 2 == 0:
            k = (n + 1) // 2
            out = [o + c[k] * p for o, c in zip(out, coefs, strict=True)]
            if slope:
                dsum = dsum + coef[k] * d
    return out + ([dsum] if slope else [])


def _series_coefficients(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(L, ..., m) products of the stick's a (m, L) and the Watson's w (..., L) coefficients."""
    stick = a.T.reshape(a.shape[1], *(1,) * (w.dim() - 1), a.shape[0])  # (L, 1..., m)
    return stick * torch.movedim(w, -1, 0)[..., None]


def _zeppelin(dpar: float, v: torch.Tensor, tau: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """gᵀD_ec g of the Watson-averaged tortuous zeppelin (d_par along, d_par·(1 − v) across)
    for the direction cosine t: its diffusivity across μ plus (along − across)·t²."""
    dperp = dpar * (1 - v)
    across = dperp + (dpar - dperp) * (1 - tau) / 2
    along = dperp + (dpar - dperp) * tau
    return across + (along - across) * t * t


class NODDI(DiffusionModel):
    name = "noddi"
    required_fields = ("b", "direction")
    direction_brightness = {"direction": "icvf"}
    description = ("NODDI (Watson): S0·[(1−isovf)(icvf·stick⊛Watson + (1−icvf)·tortuous "
                   "zeppelin) + isovf·free water]")
    parameters = (
        Parameter("S0", "a.u.", 0.0, 4.0, "signal at b=0 (bounds relative to the scan scale)",
                  scaled=True),
        Parameter("icvf", "1", 0.0, 1.0,
                  "neurite density index (NDI): intra-neurite fraction of the tissue signal"),
        Parameter("od", "1", 0.02, 1.0,
                  "orientation dispersion index (ODI) = (2/π)·arctan(1/κ) of the Watson "
                  "distribution"),
        Parameter("isovf", "1", 0.0, 1.0, "isotropic (free-water) signal fraction (FISO)"),
        Parameter("direction", "1", -1.0, 1.0, "mean neurite direction μ, unit vector "
                  "(x, y, z)", size=3),
    )
    constants = (
        Constant("dpar", 1.7, "µm²/ms", 0.0, 4.0,
                 "intrinsic diffusivity along neurites (stick and zeppelin)"),
        Constant("diso", 3.0, "µm²/ms", 0.0, 4.0, "free-water diffusivity"),
    )

    def _compartments(self, params: Params, acquisition: Acquisition,
                      derivatives: bool = False) -> dict[str, torch.Tensor]:
        """Per voxel and measurement (..., m): b, the cosine t = g·μ, the dispersed stick
        ``intra``, the zeppelin ``extra`` and free water ``iso``, and Watson's τ (..., 1);
        with ``derivatives`` also the stick's d/dκ and d/dt and dτ/dκ (voxels (n,) only)."""
        dev, dt = params["icvf"].device, params["icvf"].dtype
        b, g = acquisition.torch(dev, dt)
        dpar = self.constant("dpar")
        t = params["direction"] @ g.T  # (..., m)
        a = stick_coefficients(b * dpar)
        out = {"b": b, "g": g, "t": t}
        if derivatives:
            wl, tau, dwl, dtau = watson_moments(kappa_of(params["od"]), derivatives=True)
            out["intra"], out["intra_k"], out["intra_t"] = legendre_series(
                t, _series_coefficients(a, wl), _series_coefficients(a, dwl), slope=True)
            out["dtau"] = dtau[..., None]
        else:
            wl, tau = watson_moments(kappa_of(params["od"]))
            out["intra"], = legendre_series(t, _series_coefficients(a, wl))
        out["tau"] = tau[..., None]
        out["extra"] = torch.exp(-b * _zeppelin(dpar, params["icvf"][..., None], out["tau"], t))
        out["iso"] = torch.exp(-b * self.constant("diso"))
        return out

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        c = self._compartments(params, acquisition)
        v, fiso = params["icvf"][..., None], params["isovf"][..., None]
        tissue = v * c["intra"] + (1 - v) * c["extra"]
        return params["S0"][..., None] * ((1 - fiso) * tissue + fiso * c["iso"])

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        return self.signal_and_jacobian(params, acquisition)[1]

    def signal_and_jacobian(self, params: Params, acquisition: Acquisition
                            ) -> tuple[torch.Tensor, Params]:
        """The signal and its analytic derivatives in one pass (least squares: instead of a
        forward pass and 7 forward-mode ones). The dispersed stick's derivatives in κ and t
        are Legendre series too (dw_l/dκ from :func:`watson_moments`, P'_l from the
        recurrence)."""
        c = self._compartments(params, acquisition, derivatives=True)
        b, t, tau, extra = c["b"], c["t"], c["tau"], c["extra"]
        dpar = self.constant("dpar")
        v = params["icvf"][:, None]
        t2 = t * t
        # d(exponent)/d(icvf, τ, t) of the zeppelin's −b·gᵀD_ec g
        e_v = b * dpar * ((1 + tau) / 2 + (1 - 3 * tau) / 2 * t2)
        e_tau = -b * dpar * v * (1.5 * t2 - 0.5)
        e_t = -b * dpar * v * (3 * tau - 1) * t
        S0, fiso = params["S0"][:, None], params["isovf"][:, None]
        tissue = v * c["intra"] + (1 - v) * extra
        wt = S0 * (1 - fiso)
        half = 0.5 * math.pi * params["od"][:, None]
        dkappa = -0.5 * math.pi / torch.sin(half) ** 2
        d_t = wt * (v * c["intra_t"] + (1 - v) * extra * e_t)
        per_s0 = (1 - fiso) * tissue + fiso * c["iso"]
        return S0 * per_s0, {
            "S0": per_s0,
            "icvf": wt * (c["intra"] - extra + (1 - v) * extra * e_v),
            "od": wt * dkappa * (v * c["intra_k"] + (1 - v) * extra * e_tau * c["dtau"]),
            "isovf": S0 * (c["iso"] - tissue),
            "direction": d_t[..., None] * c["g"],
        }

    def check_scheme(self, acquisition: Acquisition) -> None:
        self.require_directions(acquisition)
        self.require_shells(acquisition, "tell neurite density from free water and dispersion")

    def initial_estimates(self, signals: torch.Tensor, acquisition: Acquisition) -> Params:
        """The direction of a weighted log-linear tensor fit; then, for each (icvf, od) pair
        of :data:`GRID_ICVF` × :data:`GRID_OD`, the tissue and free-water weights (S0·(1 −
        isovf), S0·isovf) solved in closed form (non-negative); the best pair is kept."""
        dev, dt = signals.device, signals.dtype
        b, _ = acquisition.torch(dev, dt)
        n = signals.shape[0]
        mu = tensor_direction(signals, acquisition)
        iso = torch.exp(-b * self.constant("diso"))[None, :]  # (1, m)
        yb = signals @ iso.T  # (n, 1)
        bb = (iso * iso).sum(1)
        best_cost = torch.full((n,), float("inf"), device=dev, dtype=dt)
        best = {k: torch.zeros(n, device=dev, dtype=dt) for k in ("S0", "icvf", "od", "isovf")}
        for od in GRID_OD:
            for v in GRID_ICVF:
                cand = {"S0": torch.ones(n, device=dev, dtype=dt),
                        "icvf": torch.full((n,), v, device=dev, dtype=dt),
                        "od": torch.full((n,), od, device=dev, dtype=dt),
                        "isovf": torch.zeros(n, device=dev, dtype=dt), "direction": mu}
                S = self.forward(cand, acquisition)  # tissue signal, S0 = 1
                ys = (signals * S).sum(1, keepdim=True)
                ss = (S * S).sum(1, keepdim=True)
                sb = S @ iso.T
                ct, ci, cost = two_compartment_weights(ys, yb, ss, sb, bb)
                cost, ct, ci = cost[:, 0], ct[:, 0], ci[:, 0]
                better = cost < best_cost
                best_cost = torch.where(better, cost, best_cost)
                s0 = ct + ci
                best["S0"] = torch.where(better, s0, best["S0"])
                best["isovf"] = torch.where(better, ci / s0.clamp_min(1e-12), best["isovf"])
                best["icvf"] = torch.where(better, cand["icvf"], best["icvf"])
                best["od"] = torch.where(better, cand["od"], best["od"])
        best["isovf"] = best["isovf"].clamp(0.01, 0.99)
        best["S0"] = best["S0"].clamp(1e-3, self.parameter("S0").upper * 0.99)
        best["direction"] = mu
        return best
