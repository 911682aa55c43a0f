"""Empirical Bayes on a grid: the marginal likelihood by quadrature, for models with at most two
parameters besides the signal scale (MSDKI's D and K).

Every voxel's likelihood of its shell means is tabulated once on a fixed grid of cell centres
over the prior's bounded coordinates, with the signal scale S0 integrated out in closed form
(:func:`mixmap.quadrature.scale_integrated_loglik`; Rician noise adds
:func:`mixmap.quadrature.rician_scale_term`). The prior's components become discrete
distributions on the grid (each Gaussian normalised over the grid points, so truncation to the
bounds is exact) and the scan's evidence is Σ_i log Σ_g L_ig P_g: deterministic, exact up to
the grid's resolution. :func:`grid_em` climbs it by EM with SQUAREM, :func:`polish` by L-BFGS,
:func:`relocate` moves a component to the best grid point; S0's own prior coordinates are left
as importance-sampled EM (:mod:`~.monte_carlo`) set them.

Why the grid, and the measurements behind its settings: docs/design/evaluation-and-quadrature.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixmap.acquisition import Acquisition
from mixmap.fitting.empirical_bayes.monte_carlo import Reduce, squarem
from mixmap.models import SignalModel
from mixmap.nn.likelihoods import RiceTable
from mixmap.nn.priors import MixturePrior
from mixmap.quadrature import (
    cell_centres,
    grid_points,
    rician_h,
    rician_scale_term,
    scale_integral_terms,
    scale_integrated_loglik,
    subtract_max,
    tabulate_signal,
)

#: Grid points in all (per axis: this to the power 1 / number of gridded parameters).
GRID_POINTS = 9216
#: At most this many voxels (over all processes) enter the grid's likelihood table, which
#: holds voxels × live grid points float32 values (MSDKI: about 8,000 × 4,400, 140 MB).
GRID_VOXELS = 8000
#: Relative likelihood below which a table entry is 0, and prior mass per grid point below which
#: it is 0 in the float32 sums (so no product of the two is a float32 denormal, slow on CPUs).
TABLE_FLOOR = 1e-15
MASS_FLOOR = 1e-20
#: EM updates at most, and the gain per voxel (nats) over a block of 20 below which it stops.
GRID_MAX_STEPS = 2000
GRID_TOL = 1e-5


@dataclass
class GridLikelihood:
    """Voxels' likelihoods on a grid: ``x`` (G, k) the grid points in the prior's coordinates
    ``dims``, ``step`` (k,) their spacing; ``lik`` (n, L) float32 the likelihood at the
    ``live`` (L,) points only (those where some voxel's likelihood is above
    :data:`TABLE_FLOOR` of its best: elsewhere it adds nothing to any voxel's evidence or EM
    update), each row divided by its maximum (``log_scale`` (n,) float64, so that the
    evidence is Σ log(lik @ P[live]) + Σ log_scale).
    The prior's components are normalised over the whole grid."""

    lik: torch.Tensor
    log_scale: torch.Tensor
    x: torch.Tensor
    dims: list[int]
    step: torch.Tensor
    live: torch.Tensor


def grid_dims(model: SignalModel) -> list[int] | None:
    """The latent coordinates a grid covers (:meth:`SignalModel.grid_parameters`: every
    scalar parameter but the signal scale). None where the grid does not apply (a direction,
    no scale parameter, more than two others)."""
    names = model.grid_parameters()
    dims = [i for i, p in enumerate(model.parameters) if p.name in names]
    return dims if 1 <= len(dims) <= 2 else None


def _cell_grid(prior: MixturePrior, dims: list[int]) -> tuple[torch.Tensor, list[float]]:
    """The grid's points (G, k) float64, :data:`GRID_POINTS` cell centres over the prior's
    bounds in the coordinates ``dims``, and their spacing per coordinate."""
    per_axis = max(2, round(GRID_POINTS ** (1.0 / len(dims))))
    axes, steps = [], []
    for j in dims:
        axis, step = cell_centres(float(prior.lo[j]), float(prior.span[j]), per_axis)
        axes.append(axis)
        steps.append(step)
    return grid_points(axes), steps


@torch.no_grad()
def grid_likelihood(model: SignalModel, prior: MixturePrior, dims: list[int],
                    yw: torch.Tensor, work: Acquisition, counts: torch.Tensor,
                    sigma: float, reduce: Reduce = lambda t: t,
                    chunk: int = 1024, *,
                    rician: tuple[torch.Tensor, list[torch.Tensor]] | None = None
                    ) -> GridLikelihood:
    """Tabulate the likelihood of shell means ``yw`` (n, m') (``counts`` (m',) measurements
    per shell, noise σ, all in working units) on a grid of cell centres over the prior's
    bounded coordinates ``dims``, S0 integrated out. ``reduce`` sums over processes (the live
    points are those of any process).

    ``rician``: (y (n, m) every measurement, the columns of y behind each shell mean) for
    Rician noise: the Gaussian likelihood of the shell means times, per shell, the
    :class:`~mixmap.nn.likelihoods.RiceTable` factor, integrated over S0 by Laplace's method
    (:func:`mixmap.quadrature.rician_scale_term`)."""
    dev = yw.device
    x, steps = _cell_grid(prior, dims)  # (G, k)
    points = {model.parameters[j].name: x[:, col] for col, j in enumerate(dims)}
    f = tabulate_signal(model, work, points, {model.scale_parameter: 1.0})  # (G, m'), S0 = 1
    lik, log_scale = tabulate_likelihood(f, counts, yw, sigma, chunk, rician)
    top = lik.amax(0) if yw.shape[0] else lik.new_zeros(lik.shape[1])
    live = torch.nonzero(reduce((top > 0).double().to(dev)).cpu() > 0).flatten()
    return GridLikelihood(lik[:, live].contiguous().to(dev), log_scale.to(dev), x.to(dev),
                          list(dims), torch.tensor(steps, dtype=torch.float64, device=dev),
                          live.to(dev))


def rice_tables(f: torch.Tensor, sigma: float) -> list[RiceTable]:
    """One :class:`RiceTable` per shell of the unit-scale signal ``f`` (G, m'), spanning its
    signals S0 f_b for S0 up to 4 (the scan's scale is 1)."""
    return [RiceTable(float(sigma), 0.0, 4.0 * float(f[:, b].max())) for b in range(f.shape[1])]


def tabulate_likelihood(f: torch.Tensor, counts: torch.Tensor, yw: torch.Tensor, sigma: float,
              chunk: int, rician) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, G) float32 likelihood of every voxel at every grid point relative to the voxel's
    best point (0 below :data:`TABLE_FLOOR` of it), and the best log-likelihoods (n,) float64;
    voxels in chunks of ``chunk``."""
    A, nf, half_log_a = scale_integral_terms(f, counts)
    n = yw.shape[0]
    if rician is not None:
        tables = rice_tables(f, sigma)
    lik = torch.empty(n, f.shape[0], dtype=torch.float32)
    log_scale = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        y = yw[start:start + chunk].double().cpu()
        ll, B = scale_integrated_loglik(y, A, nf, half_log_a, sigma)
        if rician is not None:
            hs = rician_h(tables, rician[0][start:start + chunk], rician[1])
            ll += rician_scale_term(tables, hs, f, B / A, float(sigma) ** 2 / A)
        rel, top = subtract_max(ll)
        log_scale[start:start + chunk] = top[:, 0]
        # below 10⁻¹⁵ of a voxel's best point: 0 (its evidence never rests there), which also
        # keeps every product in the EM and relocation sums above float32's denormals (slow)
        lik[start:start + chunk] = torch.where(rel >= math.log(TABLE_FLOOR), rel.exp(), 0.0)
    return lik, log_scale


def _f32(p: torch.Tensor) -> torch.Tensor:
    """Masses (float64) as float32 with those below :data:`MASS_FLOOR` set to 0."""
    return torch.where(p >= MASS_FLOOR, p, 0.0).float()


def _components(grid: GridLikelihood, mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """(K, L) each component's Gaussian (means ``mu``, spreads ``sd`` (K, k) in the gridded
    coordinates) at the live grid points, normalised over the whole grid (so truncation to the
    bounds, and a component narrower than a cell, are exact). Differentiable."""
    d = (grid.x[None] - mu[:, None]) / sd[:, None]  # (K, G, k)
    return torch.softmax(-0.5 * (d * d).sum(-1), 1)[:, grid.live]


def _joint(prior: MixturePrior, grid: GridLikelihood) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior's weights π (K,) and π_k times each component's Gaussian at the live grid
    points (K, L) (:func:`_components`)."""
    table = _components(grid, prior.mu.detach().double()[:, grid.dims],
                        prior.log_std.detach().double()[:, grid.dims].exp())
    pi = prior.log_pi().detach().double().exp()
    return pi, pi[:, None] * table


def _set_gridded(prior: MixturePrior, grid: GridLikelihood, share: torch.Tensor,
                 mean_g: torch.Tensor, var_g: torch.Tensor, min_share: float = 0.0) -> None:
    """Set the weights and the gridded coordinates' means and variances (K, k); S0's
    coordinates keep theirs (see :meth:`MixturePrior.set_moments`)."""
    mean = prior.mu.detach().double().clone()
    var = (2 * prior.log_std.detach().double()).exp()
    mean[:, grid.dims] = mean_g
    var[:, grid.dims] = var_g
    prior.set_moments(share, mean, var, min_share=min_share)


def grid_em_step(prior: MixturePrior, grid: GridLikelihood, reduce: Reduce, *,
                 update: bool = True) -> tuple[float, list]:
    """The grid's log evidence Σ_i log Σ_g L_ig P_g at the current prior (summed over
    processes) and, with ``update``, one EM update of the weights and of the gridded
    coordinates' means and variances (S0's stay). Variances are floored at a quarter of the
    grid's spacing squared. Returns (log evidence, []) like :func:`~.monte_carlo.em_step`
    (there are no importance weights to report)."""
    _, joint = _joint(prior, grid)  # (K, L)
    P = joint.sum(0)  # (L,)
    # floored so that 1/v stays a float32 (a voxel whose likelihood sits where the prior has
    # under 1e-30 of its mass weighs less in the update than it should; its evidence is floored)
    v = (grid.lik @ _f32(P)).double().clamp_min(1e-30)  # (n,)
    log_ev = reduce((torch.log(v) + grid.log_scale).sum())
    if not update:
        return float(log_ev), []
    u = reduce((grid.lik.T @ (1.0 / v).float()).double())  # (L,)
    W = joint * u[None]  # (K, L): expected voxels at each point from each component
    nk = W.sum(1)
    tot = nk.clamp_min(1e-300)[:, None]
    x = grid.x[grid.live]
    mean_g = (W @ x) / tot
    var_g = (W @ (x * x)) / tot - mean_g**2
    var_g = torch.maximum(var_g, (grid.step / 2) ** 2)
    _set_gridded(prior, grid, nk, mean_g, var_g, min_share=1e-3)
    return float(log_ev), []


def grid_em(prior: MixturePrior, grid: GridLikelihood, reduce: Reduce, n_voxels: float,
            *, max_steps: int = GRID_MAX_STEPS, tol: float = GRID_TOL) -> dict:
    """EM on the grid with SQUAREM (:func:`~.monte_carlo.squarem`) in blocks of 20
    updates, until a block gains under ``tol`` nats per voxel. Returns the log evidence per
    voxel before and after, and the updates made."""
    start, _ = grid_em_step(prior, grid, reduce, update=False)
    last, steps = start, 0
    while steps < max_steps:
        squarem(prior, grid, reduce, 20, em=grid_em_step)
        steps += 20
        now, _ = grid_em_step(prior, grid, reduce, update=False)
        gain = (now - last) / n_voxels
        last = now
        if not math.isfinite(now) or gain < tol:
            break
    return {"voxels": int(n_voxels), "grid_points": int(grid.x.shape[0]), "updates": steps,
            "log_evidence_per_voxel_before": start / n_voxels,
            "log_evidence_per_voxel": last / n_voxels}


#: Iterations of :func:`polish` at most.
POLISH_ITERATIONS = 100


def polish(prior: MixturePrior, grid: GridLikelihood, reduce: Reduce, n_voxels: float,
           *, max_iter: int = POLISH_ITERATIONS, margin: float = 0.0) -> int:
    """Maximise the grid's log evidence over the weights and the gridded coordinates' means and
    spreads directly, by L-BFGS from where EM stopped (along a flat ridge EM's steps vanish and
    its stopping rule ends it short of the maximum; L-BFGS learns the ridge's curvature). The
    spreads keep EM's floor smoothly: sd = √(floor² + s²), floor half a grid step. Gradients
    and the objective are summed over processes (each holds the same prior, so all take the
    same steps). The result is kept only if it raises the log evidence by more than
    ``margin`` nats per voxel; otherwise the prior is restored. Returns the objective's
    evaluations."""
    dims = grid.dims
    floor2 = (grid.step / 2) ** 2
    mu = prior.mu.detach().double()[:, dims].clone().requires_grad_(True)
    var = (2 * prior.log_std.detach().double()[:, dims]).exp()
    log_s = (0.5 * torch.log((var - floor2).clamp_min(1e-12 * floor2))).requires_grad_(True)
    logits = prior.log_pi().detach().double().clone().requires_grad_(True)
    before, _ = grid_em_step(prior, grid, reduce, update=False)
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        opt.zero_grad()
        table = _components(grid, mu, torch.sqrt(floor2 + torch.exp(2 * log_s)))
        mass = (torch.softmax(logits, 0)[:, None] * table).sum(0)
        v = (grid.lik @ mass.float()).double().clamp_min(1e-30)
        loss = -torch.log(v).sum()
        loss.backward()
        for t in (mu, log_s, logits):
            t.grad = reduce(t.grad) / n_voxels
        return reduce(loss.detach()) / n_voxels

    opt = torch.optim.LBFGS([mu, log_s, logits], lr=1.0, max_iter=int(max_iter),
                            history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    kept = [t.detach().clone() for t in (prior.mu, prior.log_std, prior.logits)]
    opt.step(closure)
    with torch.no_grad():
        if all(bool(torch.isfinite(t).all()) for t in (mu, log_s, logits)):
            sd = torch.sqrt(floor2 + torch.exp(2 * log_s))
            _set_gridded(prior, grid, torch.softmax(logits, 0), mu, sd**2, min_share=1e-3)
        after, _ = grid_em_step(prior, grid, reduce, update=False)
        if not after - before > margin * n_voxels:  # too small a gain (or not finite)
            for t, k in zip((prior.mu, prior.log_std, prior.logits), kept, strict=True):
                t.copy_(k)
    return evals


#: A relocation is kept only if it raises the log evidence by more than this per voxel.
RELOCATE_MARGIN = 1e-4


def _blur_matrix(axis: torch.Tensor, sd: float) -> torch.Tensor:
    """(a, a) row m: a Gaussian of ``sd`` centred on grid point m, over the grid points,
    normalised over them (truncation to the bounds is exact)."""
    d = (axis[None, :] - axis[:, None]) / sd
    return torch.softmax(-0.5 * d * d, 1)


@torch.no_grad()
def relocate(prior: MixturePrior, grid: GridLikelihood, reduce: Reduce, n_voxels: float,
             *, margin: float = RELOCATE_MARGIN, chunk: int = 1024) -> list[dict]:
    """Move each component, in turn, to the grid point where the scan's evidence is highest
    with the component centred there (its spread kept, at least two grid steps), when that
    beats its present place by more than ``margin`` nats per voxel (a component with under
    1/(2K) of the voxels is tried with that share); then EM from there (:func:`grid_em`).
    EM climbs only to the nearest optimum; along a likelihood ridge that can be far from the
    best. Every voxel's likelihood on the grid convolved with the component's Gaussian
    (separable: one small matrix product per axis) gives the evidence of every candidate
    centre at once. Returns the moves made (component, from, to, gain per voxel)."""
    moves = []
    K = prior.mu.shape[0]
    axes = [torch.unique(grid.x[:, j]) for j in range(len(grid.dims))]
    shape = [a.numel() for a in axes]
    n = grid.lik.shape[0]
    for k in range(K):
        pi, joint = _joint(prior, grid)
        v = (grid.lik @ _f32(joint.sum(0))).double()
        # A nearly empty component is tried with a share of 1/(2K), taken from the others
        # in proportion, so that it can take over the voxels of a cluster another one spans.
        w = max(float(pi[k]), 0.5 / K)
        rest = (v - (grid.lik @ _f32(joint[k])).double()).clamp_min(0.0)
        rest = rest * (1.0 - w) / max(1.0 - float(pi[k]), 1e-12)
        now = float(reduce(torch.log(v.clamp_min(1e-30)).sum()))
        sd = torch.maximum(prior.log_std.detach().double()[k, grid.dims].exp(),
                           2.0 * grid.step)
        blur = [_f32(_blur_matrix(a, float(s))) for a, s in zip(axes, sd, strict=True)]
        ev = torch.zeros(grid.x.shape[0], dtype=torch.float64, device=v.device)
        rest32 = rest.float()
        for start in range(0, n, chunk):
            part = grid.lik[start:start + chunk]
            c = part.new_zeros(part.shape[0], grid.x.shape[0])
            c[:, grid.live] = part
            if len(shape) == 2:  # C[m0, m1] = Σ_g0 Σ_g1 B0[m0, g0] L[g0, g1] B1[m1, g1],
                # as two plain matrix products (one per axis) over all voxels of the chunk
                a, b = shape
                c = (c.view(-1, b) @ blur[1].T).view(-1, a, b).transpose(1, 2)
                c = (c.reshape(-1, a) @ blur[0].T).view(-1, b, a).transpose(1, 2)
            else:
                c = c @ blur[0].T
            c = c.reshape(part.shape[0], -1) * w
            c += rest32[start:start + chunk, None]
            ev += torch.log(c.clamp_min_(1e-30)).sum(0, dtype=torch.float64)
        ev = reduce(ev)
        best = int(torch.argmax(ev))
        gain = (float(ev[best]) - now) / n_voxels
        if not gain > margin:
            continue
        before = prior.mu.detach()[k].clone()
        mean_g = prior.mu.detach().double()[:, grid.dims].clone()
        var_g = (2 * prior.log_std.detach().double()[:, grid.dims]).exp()
        mean_g[k], var_g[k] = grid.x[best], sd**2
        share = pi * (1.0 - w) / max(1.0 - float(pi[k]), 1e-12)
        share[k] = w
        _set_gridded(prior, grid, share, mean_g, var_g)
        grid_em(prior, grid, reduce, n_voxels)
        moves.append({"component": k, "from": [round(float(x), 4) for x in before],
                      "to": [round(float(x), 4) for x in prior.mu.detach()[k]],
                      "gain_per_voxel": gain})
    return moves
