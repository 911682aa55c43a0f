"""Quadrature on a regular grid over a model's bounded parameters: the pieces shared by the
Bayes reference (:mod:`mixmap.evaluation.bayes`) and the grid refit of a learned prior
(:mod:`mixmap.fitting.empirical_bayes.grid`).

Both tabulate the model signal on a grid of parameter values, add a per-voxel log-likelihood
(Gaussian on the means of groups of identical measurements, plus the Rician part of
:class:`~mixmap.nn.likelihoods.RiceTable` per group) and exponentiate it relative to each
voxel's best grid point. The grid refit also integrates the signal scale (S0) out in closed
form. Everything is float64 until the exponentiation, which is float32.
"""

from __future__ import annotations

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.models import SignalModel
from mixmap.nn.likelihoods import RiceTable


# ------------------------------------------------------------------------------- grids
def node_axis(lower: float, upper: float, step: float) -> np.ndarray:
    """Nodes from ``lower`` to ``upper``, both included, spaced at most ``step`` (float64):
    the points of a trapezoid rule."""
    return np.linspace(lower, upper, int(np.ceil((upper - lower) / step)) + 1)


def cell_centres(lower: float, span: float, per_axis: int) -> tuple[torch.Tensor, float]:
    """The centres (``per_axis``,) float64 of ``per_axis`` equal cells over [lower, lower +
    span], and their spacing: the points of a midpoint rule."""
    step = span / per_axis
    return lower + step * (torch.arange(per_axis, dtype=torch.float64) + 0.5), step


def grid_points(axes: list[torch.Tensor] | list[np.ndarray]) -> torch.Tensor:
    """(G, k) every combination of the k ``axes``' values, the last axis varying fastest."""
    mesh = torch.meshgrid(*[torch.as_tensor(a) for a in axes], indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], 1)


def trapezoid_log_weights(axes: list[np.ndarray], mesh: list[np.ndarray]) -> np.ndarray:
    """(G,) log trapezoid weight of each point of ``mesh`` (one coordinate array per axis),
    relative to an inner point: log ½ per coordinate at a bound."""
    log_w = np.zeros(mesh[0].size)
    for a, x in zip(axes, mesh, strict=True):
        log_w += np.where((x == a[0]) | (x == a[-1]), np.log(0.5), 0.0)
    return log_w


# ------------------------------------------------------------------------------- signal
@torch.no_grad()
def tabulate_signal(model: SignalModel, acquisition: Acquisition,
                    points: dict[str, torch.Tensor], fixed: dict[str, float]) -> torch.Tensor:
    """(P, m) float64 model signal at P points: ``points`` name -> (P,) float64 values of the
    gridded parameters, ``fixed`` name -> one value for every point (the scale parameter at 1
    for a signal at unit scale)."""
    size = next(iter(points.values())).numel()
    params = dict(points)
    params.update({k: torch.full((size,), v, dtype=torch.float64) for k, v in fixed.items()})
    return model.forward(params, acquisition).double()


# ------------------------------------------------------------------------------- Gaussian
def scale_integral_terms(f: torch.Tensor, counts: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the signal at unit scale ``f`` (G, m') of m' groups of ``counts`` (m',)
    measurements: A = Σ_b n_b f_b² (G,), the matrix n_b f_b (m', G) and ½ log A (G,) of
    :func:`scale_integrated_loglik`."""
    n_b = counts.double().cpu()
    A = (n_b * f * f).sum(1).clamp_min(1e-300)  # (G,)
    nf = (n_b * f).T.contiguous()  # (m', G)
    return A, nf, 0.5 * torch.log(A)


def scale_integrated_loglik(y: torch.Tensor, A: torch.Tensor, nf: torch.Tensor,
                            half_log_a: torch.Tensor, sigma: float
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian log-likelihood (c, G) of group means ``y`` (c, m') float64 with the signal
    scale S0 integrated out under a flat prior, up to a per-voxel constant, and B (c, G):

        ∫ exp(−Σ_b n_b (ȳ_b − S0 f_b)² / 2σ²) dS0 ∝ A^(−1/2) exp(B² / 2σ²A),  B = Σ_b n_b ȳ_b f_b.

    S0's conditional given a grid point is N(B/A, σ²/A)."""
    s2 = 2.0 * float(sigma) ** 2
    B = y @ nf  # (c, G)
    return B * B / (s2 * A) - half_log_a, B


# ------------------------------------------------------------------------------- Rician
def rician_h(tables: list[RiceTable], y: torch.Tensor | np.ndarray,
             members: list) -> list[torch.Tensor]:
    """Per group, (c, knots) float32 Σ over its measurements of log i0e(y s / σ²) at each knot
    s of its table (:meth:`RiceTable.h`): the part of the Rician log-likelihood that is not
    the Gaussian form. ``y`` (c, m) every measurement; ``members`` each group's columns."""
    y = torch.as_tensor(y).float().cpu()
    return [t.h(y[:, torch.as_tensor(cols).cpu()])
            for t, cols in zip(tables, members, strict=True)]


def rician_scale_term(tables: list[RiceTable], hs: list[torch.Tensor], f: torch.Tensor,
                      s0_mean: torch.Tensor, s0_var: torch.Tensor) -> torch.Tensor:
    """log E[exp(H(S0))] (c, G) float64, H(S0) = Σ_b h_b(S0 f_gb), over S0 ~ N(``s0_mean``
    (c, G), ``s0_var`` (G,) or (c, G)): the Rician factor of the likelihood with S0 integrated
    out (``hs`` of :func:`rician_h` per shell; f (G, m') the signal at S0 = 1, or (c, G, m')
    for points of each voxel's own).

    Laplace's method with H quadratic: H and H' at the Gaussian's mean m0 and at m1 = m0 +
    v H'(m0) (the mode were H linear), H'' their secant; the integral of the Gaussian times
    exp(that quadratic) is closed, and exact for a linear H."""
    v = s0_var.float()
    v = v[None] if v.dim() == 1 else v  # (1 or c, G)
    m0 = s0_mean.float()
    fb = f.float()

    def value_and_slope(s0):
        val, der = torch.zeros_like(s0), torch.zeros_like(s0)
        for b, (table, h) in enumerate(zip(tables, hs, strict=True)):
            hv, hd = table.lookup(h, s0 * fb[..., b])
            val += hv
            der += hd * fb[..., b]
        return val, der

    _, g0 = value_and_slope(m0)
    d = v * g0  # m1 − m0
    h1, g1 = value_and_slope(m0 + d)
    c = torch.where(d.abs() > 1e-12, (g1 - g0) / torch.where(d.abs() > 1e-12, d, 1.0), 0.0)
    prec = 1.0 / v - torch.minimum(c, 0.5 / v)  # the integrand's precision, kept positive
    a = g1 - d / v
    return (h1 - d * d / (2 * v) + a * a / (2 * prec) - 0.5 * torch.log(v * prec)).double()


# ------------------------------------------------------------------------------- weights
def subtract_max(ll: torch.Tensor, out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract each row's maximum from the log-likelihoods ``ll`` (c, G) float64, in place,
    and return them as float32 (into ``out`` (c, G) where given) with the maxima (c, 1)."""
    top = ll.amax(1, keepdim=True)
    ll -= top
    rel = ll.float() if out is None else out.copy_(ll)
    return rel, top


__all__ = [
    "cell_centres",
    "grid_points",
    "node_axis",
    "rician_h",
    "rician_scale_term",
    "scale_integral_terms",
    "scale_integrated_loglik",
    "subtract_max",
    "tabulate_signal",
    "trapezoid_log_weights",
]
