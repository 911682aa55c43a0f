"""A non-parametric prior on the grid: the maximum-likelihood distribution of the gridded
parameters over the scan's voxels (NPMLE, by EM from a uniform start), and every voxel's
posterior under it, with the signal scale S0 integrated out.

Real tissue's parameters are continuous, skewed and partly overlapping; a mixture of a few
Gaussians shrinks them towards its components. On a grid the prior can take any shape the
data support. Models with two parameters besides the scale (MSDKI's D and K) only; the
likelihood is that of the shell means (Gaussian), times the Rician factor per shell
(:func:`mixmap.quadrature.rician_scale_term`) when the data are magnitudes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mixmap.fitting.base import Scheme
from mixmap.fitting.empirical_bayes.grid import rice_tables, tabulate_likelihood
from mixmap.models import SignalModel
from mixmap.quadrature import (
    cell_centres,
    grid_points,
    rician_h,
    rician_scale_term,
    scale_integral_terms,
    scale_integrated_loglik,
    tabulate_signal,
)

#: Grid points per axis (96 × 96, as the grid refit).
PER_AXIS = 96
#: EM updates of the grid weights, from uniform (EM's slow convergence regularises the NPMLE,
#: whose exact maximiser is a few spikes).
NPMLE_STEPS = 300
#: Each EM update is followed by a Gaussian blur of this many grid cells (smoothed EM): the
#: plain NPMLE is spiky and its posterior sd too small (±1.96 sd held 87 % of the CSF-like
#: truth on a phantom of an example scan; 92–95 % in every class with this blur).
SMOOTH_CELLS = 0.5
#: Voxels the weights are fitted on at most (the posterior is then computed for all).
NPMLE_VOXELS = 20_000
#: A scan whose signals hold fewer negative values than this share is taken as magnitude
#: data (Rician noise); Gaussian noise around a signal near zero makes many negative.
NEGATIVE_SHARE = 1e-4
#: Voxels per chunk of the posterior.
CHUNK = 512
#: A voxel whose posterior sd along a gridded parameter is below this many grid steps gets its
#: posterior again on a finer grid of its own: at high SNR the posterior is narrower than a
#: cell, and the cell centres quantise its mean and understate its sd.
REFINE_BELOW = 1.0
#: Points per axis of that grid, over the coarse posterior mean ± REFINE_SDS coarse sds (at
#: least ± REFINE_MIN_CELLS steps of the grid it refines); the prior between cell centres is
#: interpolated bilinearly.
REFINE_POINTS = 17
REFINE_SDS = 4.0
REFINE_MIN_CELLS = 1.5
#: Passes at most: a voxel still narrower than its own grid's step is refined again.
REFINE_PASSES = 3
#: The grid weights' name among a trained fitter's tensors.
STATE_KEY = "grid_prior.weights"


@dataclass
class GridPrior:
    """Weights ``P`` (G,) float64 over grid points ``x`` (G, k) of the parameters ``names``
    (working units); ``rician``: whether the likelihood has the Rician factor."""

    names: list[str]
    x: torch.Tensor
    P: torch.Tensor
    rician: bool

    def state(self) -> dict[str, torch.Tensor]:
        """The weights as a trained fitter's tensor (float64 kept: they span many decades)."""
        return {STATE_KEY: self.P.contiguous()}

    def describe(self) -> dict:
        """JSON-ready: what a model folder's config records (the grid follows from it)."""
        return {"parameters": self.names, "likelihood": "rician" if self.rician else "gaussian",
                "grid_points": int(self.x.shape[0]), "support": int((self.P > 0).sum())}

    @classmethod
    def from_state(cls, model: SignalModel, described: dict, weights: torch.Tensor) -> GridPrior:
        """The prior of :meth:`describe` and :meth:`state` (a saved fitter's)."""
        names = list(described["parameters"])
        x = grid_of(model, names)
        if weights.numel() != x.shape[0]:
            raise ValueError(f"grid prior: {weights.numel()} weights for a grid of "
                             f"{x.shape[0]} points")
        return cls(names, x, weights.double().cpu(), described["likelihood"] == "rician")


def gridded(model: SignalModel) -> list[str] | None:
    """The parameters a grid prior covers (:meth:`SignalModel.grid_parameters`: two of them,
    in a direction-independent model with a scale parameter, as MSDKI), or None. One
    parameter (T2) is left to the mixture: on a 1,500-voxel three-class T2 simulation the
    grid prior's grey-matter-like RMSE was 4 % above the mixture's."""
    names = list(model.grid_parameters())
    if not model.direction_independent or len(names) != 2:
        return None
    return names


def grid_of(model: SignalModel, names: list[str]) -> torch.Tensor:
    """(G, k) float64 cell centres over the declared bounds of ``names``."""
    axes = []
    for name in names:
        p = model.parameter(name)
        axis, _ = cell_centres(float(p.lower), float(p.upper - p.lower), PER_AXIS)
        axes.append(axis)
    return grid_points(axes)


def is_magnitude(y: torch.Tensor, reduce=lambda t: t) -> bool:
    """True when the signals ``y`` look like magnitudes: fewer than :data:`NEGATIVE_SHARE`
    negative values (Gaussian noise about a signal near zero makes many). ``reduce`` sums
    over processes."""
    counts = reduce(torch.tensor([float((y < 0).sum()), float(y.numel())],
                                 dtype=torch.float64, device=y.device)).cpu()
    return bool(counts[0] < NEGATIVE_SHARE * counts[1])


def _shells(model: SignalModel, scheme: Scheme) -> Scheme:
    """One column per shell (the fitter's scheme may keep every measurement)."""
    if scheme.weights is None:
        scheme = Scheme.build(model, scheme.full, True, "cpu")
    return scheme.by_shell


def _signal(model: SignalModel, names: list[str], x: torch.Tensor, shells: Scheme
            ) -> torch.Tensor:
    """(G, m') the model's signal at unit scale at the grid points ``x`` on the shells."""
    return tabulate_signal(model, shells.work, {k: x[:, i] for i, k in enumerate(names)},
                           {model.scale_parameter: 1.0})


def _table(f: torch.Tensor, shells: Scheme, y: torch.Tensor, sigma: float, rician: bool):
    """(lik (c, G) relative likelihood float32 of voxels ``y`` (c, m) at the grid points whose
    unit-scale signal is ``f``, their shell means (c, m') float64)."""
    yw, _ = shells.working_signals(y)
    extra = (y.float().cpu(), shells.groups) if rician else None
    yw = yw.double().cpu()
    lik, _ = tabulate_likelihood(f, shells.weights, yw, sigma, CHUNK, extra)
    return lik, yw


@torch.no_grad()
def fit_grid_prior(model: SignalModel, scheme: Scheme, y: torch.Tensor, sigma: float, *,
                   gen: torch.Generator | None = None, rician: bool | None = None,
                   steps: int = NPMLE_STEPS, max_voxels: int = NPMLE_VOXELS,
                   smooth: float = SMOOTH_CELLS, reduce=lambda t: t) -> GridPrior:
    """The NPMLE of the gridded parameters' distribution over voxels ``y`` (n, m) in working
    units (noise σ), at most ``max_voxels`` of them (drawn with ``gen``). ``rician`` None:
    whether the data are magnitudes (fewer than :data:`NEGATIVE_SHARE` negative values).
    ``reduce`` sums over processes (each holds its own voxels)."""
    names = gridded(model)
    if names is None:
        raise ValueError(f"{model.name}: no grid prior (it needs 2 parameters besides the "
                         f"scale, and direction-independent signals)")
    if rician is None:
        rician = is_magnitude(y, reduce)
    if y.shape[0] > max_voxels:
        y = y[torch.randperm(y.shape[0], generator=gen)[:max_voxels].to(y.device)]
    x = grid_of(model, names)
    shells = _shells(model, scheme)
    lik, _ = _table(_signal(model, names, x, shells), shells, y.cpu(), sigma, rician)
    lik = lik.double()
    dev = y.device
    live = reduce(lik.amax(0).to(dev)).cpu() > 0
    L = lik[:, live]
    n = float(reduce(torch.tensor(float(L.shape[0]), dtype=torch.float64, device=dev)))
    full = torch.zeros(x.shape[0], dtype=torch.float64)
    full[live] = 1.0 / int(live.sum())
    blur = _blur(x, smooth) if smooth > 0 else None
    for _ in range(int(steps)):
        P = full[live]
        P = P * reduce((L.T @ (1.0 / (L @ P).clamp_min(1e-300))).to(dev)).cpu() / n
        full = torch.zeros_like(full)
        full[live] = P
        if blur is not None:
            full = blur(full) * live
            full /= full.sum()
    return GridPrior(names, x, full, bool(rician))


def _blur(x: torch.Tensor, cells: float):
    """A function blurring weights on the grid ``x`` by a Gaussian of ``cells`` grid steps
    along each axis (separable; mass at the bounds stays inside)."""
    axes = [torch.unique(x[:, j]) for j in range(x.shape[1])]
    shape = [a.numel() for a in axes]
    mats = []
    for a in axes:
        d = (a[:, None] - a[None]) / (cells * (a[1] - a[0]))
        k = torch.exp(-0.5 * d * d)
        mats.append(k / k.sum(0, keepdim=True))  # column g: where g's mass goes

    def apply(w: torch.Tensor) -> torch.Tensor:
        v = w.reshape(shape)
        if len(shape) == 2:
            v = mats[0] @ v @ mats[1].T
        else:
            v = mats[0] @ v
        return v.reshape(-1)

    return apply


@torch.no_grad()
def grid_posterior(prior: GridPrior, model: SignalModel, scheme: Scheme, y: torch.Tensor,
                   sigma: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Posterior means and standard deviations (name -> (n,) float64, working units) of the
    gridded parameters and of the scale parameter for voxels ``y`` (n, m) under ``prior``.
    S0 given a grid point is Gaussian, N(B/A, σ²/A) (:func:`scale_integrated_loglik`)."""
    names, x = prior.names, prior.x
    keep = prior.P > 0
    xs, P = x[keep], prior.P[keep]
    shells = _shells(model, scheme)
    f = _signal(model, names, xs, shells)
    A, nf, half_log_a = scale_integral_terms(f, shells.weights)
    tables = rice_tables(_signal(model, names, x, shells), sigma) if prior.rician else None
    steps = _steps(x)
    chunks = []
    for start in range(0, y.shape[0], CHUNK):
        yc = y[start:start + CHUNK].cpu()
        yw = shells.working_signals(yc)[0].double().cpu()
        ll, B = scale_integrated_loglik(yw, A, nf, half_log_a, sigma)
        hs = rician_h(tables, yc, shells.groups) if tables is not None else None
        if tables is not None:
            ll += rician_scale_term(tables, hs, f, B / A, float(sigma) ** 2 / A)
        w = (ll - ll.amax(1, keepdim=True)).exp() * P[None]
        w /= w.sum(1, keepdim=True).clamp_min(1e-300)
        mean, var = _moments(w, xs, B / A, sigma**2 / A)  # B/A: S0's conditional mean
        fine = (var[:, :-1].sqrt() < REFINE_BELOW * steps).any(1)
        step = steps[None].expand(fine.shape[0], -1)
        for _ in range(REFINE_PASSES):
            if not fine.any():
                break
            hf = [h[fine] for h in hs] if hs is not None else None
            half = torch.maximum(REFINE_SDS * var[fine, :-1].sqrt(), REFINE_MIN_CELLS * step[fine])
            mean[fine], var[fine] = _refined(prior, model, shells, yw[fine], hf, tables, sigma,
                                             mean[fine], var[fine], half)
            step = step.clone()
            step[fine] = 2 * half / (REFINE_POINTS - 1)
            fine = fine & (var[:, :-1].sqrt() < REFINE_BELOW * step).any(1)
        chunks.append((mean, var))
    mean = torch.cat([c[0] for c in chunks])
    sd = torch.cat([c[1] for c in chunks]).clamp_min(0).sqrt()
    keys = [*names, model.scale_parameter]
    return ({k: mean[:, i].numpy() for i, k in enumerate(keys)},
            {k: sd[:, i].numpy() for i, k in enumerate(keys)})


def _moments(w: torch.Tensor, x: torch.Tensor, cond: torch.Tensor, cond_var: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and variances (c, k + 1) of the gridded parameters and the scale from
    normalised weights ``w`` (c, G) over points ``x`` (G, k) or (c, G, k), with the scale's
    conditional mean ``cond`` (c, G) and variance ``cond_var`` (G,) or (c, G) at each point."""
    xk = x if x.dim() == 3 else x[None].expand(w.shape[0], -1, -1)
    m = torch.einsum("cg,cgk->ck", w, xk)
    v = torch.einsum("cg,cgk->ck", w, xk * xk) - m * m
    ms = (w * cond).sum(1)
    vs = (w * (cond * cond + cond_var)).sum(1) - ms * ms
    return torch.cat([m, ms[:, None]], 1), torch.cat([v, vs[:, None]], 1).clamp_min(0)


def _steps(x: torch.Tensor) -> torch.Tensor:
    """(k,) the grid's spacing along each axis."""
    return torch.stack([torch.unique(x[:, j]).diff()[0] for j in range(x.shape[1])])


def _refined(prior: GridPrior, model: SignalModel, shells: Scheme, yw: torch.Tensor, hs,
             tables, sigma: float, mean: torch.Tensor, var: torch.Tensor, half: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and variances (c, k + 1) as :func:`_moments`, for voxels with shell means ``yw``
    (c, m') on a grid of their own: :data:`REFINE_POINTS` per axis over ``mean`` ± ``half``
    (c, k), the prior interpolated between cell centres and zero outside the bounds."""
    c, k = yw.shape[0], len(prior.names)
    u = torch.linspace(-1.0, 1.0, REFINE_POINTS, dtype=torch.float64)
    offsets = grid_points([u] * k)  # (S, k)
    pts = mean[:, None, :k] + offsets[None] * half[:, None]  # (c, S, k)
    density = _interpolate(prior, pts)
    # the signal at the bound where the local grid reaches past it (density 0 there), so that
    # it stays finite (a decay time below 0 overflows)
    lo_hi = torch.tensor([(model.parameter(n).lower, model.parameter(n).upper)
                          for n in prior.names], dtype=pts.dtype)
    inside = torch.maximum(torch.minimum(pts, lo_hi[:, 1]), lo_hi[:, 0])
    f = _signal(model, prior.names, inside.reshape(-1, k), shells).reshape(c, -1, yw.shape[1])
    n_b = shells.weights.double().cpu()
    A = (n_b * f * f).sum(-1).clamp_min(1e-300)  # (c, S)
    B = torch.einsum("cb,csb->cs", yw * n_b, f)
    ll = B * B / (2.0 * sigma**2 * A) - 0.5 * torch.log(A)
    if tables is not None:
        ll = ll + rician_scale_term(tables, hs, f, B / A, float(sigma) ** 2 / A)
    ll = ll - ll.amax(1, keepdim=True)
    w = ll.exp() * density
    total = w.sum(1, keepdim=True)
    ok = total[:, 0] > 0  # a voxel whose local grid missed the prior keeps the coarse answer
    w = w / total.clamp_min(1e-300)
    m, v = _moments(w, pts, B / A, sigma**2 / A)
    return torch.where(ok[:, None], m, mean), torch.where(ok[:, None], v, var)


def _interpolate(prior: GridPrior, pts: torch.Tensor) -> torch.Tensor:
    """(c, S) the prior's density (weight per cell) at points ``pts`` (c, S, k), bilinear
    between cell centres, constant out to the bounds, zero beyond them."""
    axes = [torch.unique(prior.x[:, j]) for j in range(prior.x.shape[1])]
    shape = [a.numel() for a in axes]
    P = prior.P.reshape(shape)
    idx, frac, inside = [], [], torch.ones(pts.shape[:2], dtype=torch.bool)
    for j, a in enumerate(axes):
        step = float(a[1] - a[0])
        q = (pts[..., j] - float(a[0])) / step
        inside &= (q >= -0.5) & (q <= a.numel() - 0.5)
        i = q.floor().clamp(0, a.numel() - 2)
        idx.append(i.long())
        frac.append((q - i).clamp(0.0, 1.0))
    if len(axes) == 1:
        out = P[idx[0]] * (1 - frac[0]) + P[idx[0] + 1] * frac[0]
    else:
        i, j, s, t = idx[0], idx[1], frac[0], frac[1]
        out = ((1 - s) * (1 - t) * P[i, j] + s * (1 - t) * P[i + 1, j]
               + (1 - s) * t * P[i, j + 1] + s * t * P[i + 1, j + 1])
    return torch.where(inside, out, 0.0)


__all__ = ["GridPrior", "fit_grid_prior", "grid_of", "grid_posterior", "gridded",
           "is_magnitude"]
