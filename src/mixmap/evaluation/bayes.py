"""The Bayes-optimal reference: the posterior mean under a preset's true mixture prior and the
true noise model, by quadrature (:mod:`mixmap.quadrature`). On average no method can have a
lower squared error, so it says how much of an error is the data's and how much the method's.

Settings and their measured accuracy and cost: docs/design/evaluation-and-quadrature.md.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from scipy.special import ndtr

from mixmap.acquisition import Acquisition, VolumeGroup
from mixmap.models import get_model
from mixmap.nn.likelihoods import RiceTable
from mixmap.quadrature import (
    grid_points,
    node_axis,
    rician_h,
    subtract_max,
    tabulate_signal,
    trapezoid_log_weights,
)
from mixmap.simulation import NOISE_TYPES, Preset, get_preset

log = logging.getLogger(__name__)

#: Default parameter-grid step of :func:`bayes_reference` (in each parameter's unit).
GRID_STEP = {"gaussian": 0.01, "rician": 0.01}
#: Points per axis of the local grids on which narrow posteriors are integrated again.
REFINE_POINTS = 32
#: Successive local grids (each centred and shaped by the previous one's posterior).
REFINE_ITERATIONS = 10
#: Elements of one (voxels × grid points) block: bounds the memory of a chunk (4 bytes each).
CHUNK_ELEMENTS = 2**25


def _log_prior(preset: Preset, names: list[str], points: list[np.ndarray], model) -> np.ndarray:
    """log density of the preset's mixture of truncated Gaussians at ``points`` (one array per
    varying parameter, all of one shape); −inf outside the bounds. float64."""
    inside = np.ones(points[0].shape, dtype=bool)
    for name, x in zip(names, points, strict=True):
        p = model.parameter(name)
        inside &= (x >= p.lower) & (x <= p.upper)
    terms = []
    for c, w in zip(preset.clusters, preset.weights, strict=True):
        lp = np.full(points[0].shape, np.log(w))
        for name, x in zip(names, points, strict=True):
            p = model.parameter(name)
            mu, sd = c.mean.get(name, 1.0), c.std.get(name, 0.0)
            if sd <= 0:
                raise ValueError(
                    f"preset {preset.name}: cluster {c.name} fixes {name} = {mu} (no spread); "
                    f"the grid integration needs a spread in every varying parameter"
                )
            mass = ndtr((p.upper - mu) / sd) - ndtr((p.lower - mu) / sd)  # truncation
            lp = lp - 0.5 * ((x - mu) / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi) * mass)
        terms.append(lp)
    return np.where(inside, np.logaddexp.reduce(np.stack(terms), axis=0), -np.inf)


def check_preset(preset: Preset, model) -> list[str]:
    """The parameters ``preset`` varies (1 to 3, no direction; the others one value in every
    cluster), or ValueError saying why the reference does not apply."""
    if any(p.is_direction for p in model.parameters):
        raise ValueError(
            f"no Bayes reference for model {model.name}: it has a direction parameter"
        )
    names = preset.varying()
    if not 1 <= len(names) <= 3:
        raise ValueError(
            f"no Bayes reference for preset {preset.name}: its clusters vary {len(names)} "
            f"parameters ({names}); the grid integration handles 1 to 3"
        )
    for p in model.parameters:
        if p.name in names:
            continue
        vals = {c.mean.get(p.name, 1.0) for c in preset.clusters}
        if len(vals) > 1 or any(c.std.get(p.name, 0.0) > 0 for c in preset.clusters):
            raise ValueError(
                f"no Bayes reference for preset {preset.name}: {p.name} differs between or "
                f"within clusters"
            )
    return names


def _fixed_values(preset: Preset, model, names: list[str]) -> dict[str, float]:
    """The simulated value of every parameter the preset does not vary (the scale at 1)."""
    return {p.name: preset.clusters[0].mean.get(p.name, 1.0)
            for p in model.parameters if p.name not in names}


def _measurement_groups(model, acquisition: Acquisition) -> list[VolumeGroup]:
    """The groups of measurements whose means the reference's likelihood uses: a
    direction-independent model's :meth:`~mixmap.models.base.SignalModel.volume_groups`
    (shells within tolerance, as the fitters pool them, so jittered b-values do not split a
    shell), one group a measurement otherwise."""
    if model.direction_independent:
        return model.volume_groups(acquisition)
    return [VolumeGroup(float(i), (i,)) for i in range(acquisition.n)]


class _Posterior:
    """Log-posterior of a preset's parameters for given voxels, at any parameter values.

    Holds what does not depend on the voxel: the model on one measurement per group of
    measurements (``acquisition``, at the group's mean value), the members of each group
    (``groups``: index arrays into the scan's measurements), the fixed parameters, the prior
    and the noise model.
    """

    def __init__(self, model, preset, names, acquisition, groups, sigma, noise):
        self.model, self.preset, self.names = model, preset, names
        self.fixed = _fixed_values(preset, model, names)
        self.acq = acquisition
        self.groups = groups
        self.counts = np.array([g.size for g in groups], dtype=np.float64)
        self.sigma, self.noise = float(sigma), noise
        self.table: list[RiceTable] = []  # Rician: one per group

    def signal(self, points: list[np.ndarray]) -> np.ndarray:
        """(..., G) float64 model signal of each group at the points."""
        prm = {n: torch.as_tensor(x.reshape(-1), dtype=torch.float64)
               for n, x in zip(self.names, points, strict=True)}
        s = tabulate_signal(self.model, self.acq, prm, self.fixed)
        return s.numpy().reshape(*points[0].shape, -1)

    def set_knots(self, S: np.ndarray) -> None:
        """One :class:`~mixmap.nn.likelihoods.RiceTable` per group over the group's signal
        range on the grid ``S`` (capped at the table's default: σ <= 1 for S0 = 1)."""
        self.table = [RiceTable(self.sigma, float(np.clip(S[..., g], 0, None).min()),
                                float(S[..., g].max())) for g in range(S.shape[-1])]

    def rician_h(self, y: np.ndarray) -> list[torch.Tensor]:
        """Per group, (c, knots) the non-Gaussian part of the Rician log-likelihood of voxels
        ``y`` (c, m) (:func:`mixmap.quadrature.rician_h`)."""
        return rician_h(self.table, y, self.groups)

    def rician_positions(self, s: np.ndarray, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Knot index and linear weight of signals ``s`` in group ``g``'s table."""
        return self.table[g].positions(torch.as_tensor(s, dtype=torch.float64))

    def moments(self, pts: np.ndarray, means: np.ndarray, y: np.ndarray | None):
        """Posterior mean (c, k) and covariance (c, k, k) from per-voxel points (c, Q, k) with
        equal quadrature weights; ``means`` (c, G) are the voxels' group means."""
        lp = _log_prior(self.preset, self.names, list(np.moveaxis(pts, -1, 0)), self.model)
        # a local grid may reach past the bounds (prior 0 there): the signal is taken at the
        # bound, so that it stays finite (a decay time below 0 overflows)
        lo_hi = np.array([(self.model.parameter(n).lower, self.model.parameter(n).upper)
                          for n in self.names])
        inside = np.clip(pts, lo_hi[:, 0], lo_hi[:, 1])
        s = self.signal(list(np.moveaxis(inside, -1, 0)))  # (c, Q, G)
        lp = lp - ((means[:, None, :] - s) ** 2 * self.counts).sum(-1) / (2 * self.sigma**2)
        if self.noise == "rician":
            for g, h in enumerate(self.rician_h(y)):
                i, w = self.rician_positions(s[..., g], g)
                lo = torch.gather(h, 1, i)
                lp = lp + (lo + w * (torch.gather(h, 1, i + 1) - lo)).double().numpy()
        w = np.exp(lp - lp.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        mean = np.einsum("cq,cqk->ck", w, pts)
        d = pts - mean[:, None, :]
        return mean, np.einsum("cq,cqi,cqj->cij", w, d, d)


#: Nodes per axis of the global grid over three parameters (their ranges differ by orders of
#: magnitude, IVIM's D* spans 4-200 µm²/ms: one step in every unit would need ~10¹⁰ nodes);
#: narrow posteriors are integrated again on local grids of :data:`REFINE_POINTS_3D` per axis.
#: On ivim-body at SNR 20 (Rician) the RMSEs with 32, 40 and 64 nodes agree to 0.2 %.
GRID_NODES_3D = 40
REFINE_POINTS_3D = 16
#: The most nodes of one axis over one or two parameters: a coarser step where the range in
#: the parameter's unit is wide (T1 over 50-6000 ms: about 10 ms; narrower posteriors are
#: refined locally), so a grid over MSDKI's (D, K) keeps its 0.01 step.
GRID_NODES_MAX = 601


def _global_grid(preset: Preset, model, names: list[str], step: float):
    """The trapezoid grid over the varying parameters' bounds: axes, mesh (one contiguous
    (P,) array per parameter) and the log prior times the trapezoid weights (P,). Over one or
    two parameters the step is ``step`` in each one's unit; over three, each range in
    :data:`GRID_NODES_3D` nodes; never more than :data:`GRID_NODES_MAX` on an axis."""
    axes = []
    for name in names:
        p = model.parameter(name)
        span = p.upper - p.lower
        axis_step = (span / (GRID_NODES_3D - 1) if len(names) == 3
                     else max(step, span / (GRID_NODES_MAX - 1)))
        axes.append(node_axis(p.lower, p.upper, axis_step))
    mesh = list(np.ascontiguousarray(grid_points(axes).numpy().T))
    log_prior = _log_prior(preset, names, mesh, model) + trapezoid_log_weights(axes, mesh)
    return axes, mesh, log_prior


def _posterior(model, preset: Preset, names, acquisition: Acquisition, mesh, sigma, noise):
    """The :class:`_Posterior` over the groups of measurements (:func:`_measurement_groups`)
    whose signal varies on the grid (a group constant everywhere, b=0 with S0 known, adds a
    constant), and the groups' signal (P, G) float64 on the grid."""
    shells = _measurement_groups(model, acquisition)
    reduced = (acquisition.reduced(shells, by=model.group_field)
               if model.direction_independent else acquisition)
    groups = [np.asarray(s.indices) for s in shells]
    S = _Posterior(model, preset, names, reduced, groups, sigma, noise).signal(mesh)
    varies = np.flatnonzero(S.max(0) - S.min(0) > 0)
    post = _Posterior(model, preset, names, reduced.subset(varies),
                      [groups[i] for i in varies], sigma, noise)
    return post, S[:, varies]


def _linear_terms(S, log_prior, mesh, means, counts, sigma):
    """The reference signal r (G,), the log-posterior's matrix (G+1, P) float64 such that
    [(ȳ − r) n / σ², 1] times it is the log-posterior up to a per-voxel constant, and the
    moments' matrix θ = [1, x, x x'] (P, 1 + k + k(k+1)/2) float32."""
    # Centred on r, formed in float64: voxels whose signal at b = 3000 s/mm² is many times S0
    # reach 1e7 with differences of order 1 that matter.
    ref = means.mean(0)
    Sc = S - ref
    bias = log_prior - (counts * Sc**2).sum(1) / (2 * sigma**2)
    # the bias rides along as one more row: one matmul gives the log-posterior
    Sb = torch.as_tensor(np.concatenate([Sc.T, bias[None]], 0), dtype=torch.float64)
    k = len(mesh)
    x = np.stack(mesh, 1)
    x2 = np.stack([x[:, i] * x[:, j] for i in range(k) for j in range(i, k)], 1)
    theta = torch.as_tensor(np.concatenate([np.ones((x.shape[0], 1)), x, x2], 1),
                            dtype=torch.float32)
    return ref, Sb, theta


def _global_moments(post: _Posterior, S, log_prior, mesh, means, signals, sigma,
                    chunk_elements: int) -> np.ndarray:
    """Per voxel (n, k + k(k+1)/2) the posterior's E[x] and E[x x'] on the global grid, voxels
    in chunks of at most ``chunk_elements`` (voxel, grid point) pairs through reused buffers
    (log-posterior float64, weights float32)."""
    ref, Sb, theta = _linear_terms(S, log_prior, mesh, means, post.counts, sigma)
    if post.noise == "rician":
        post.set_knots(S)
        idx_w = [post.rician_positions(S[:, g], g) for g in range(len(post.groups))]
    n, n_grid = signals.shape[0], S.shape[0]
    chunk = max(1, min(n, chunk_elements // n_grid))
    buf64 = torch.empty(chunk, n_grid, dtype=torch.float64)
    buf = torch.empty(chunk, n_grid)
    moments = np.empty((n, theta.shape[1] - 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        u = np.concatenate([(means[start:stop] - ref) * post.counts / sigma**2,
                            np.ones((stop - start, 1))], 1)
        L64 = buf64[: stop - start]
        torch.mm(torch.as_tensor(u), Sb, out=L64)  # (c, P)
        if post.noise == "rician":
            for h, (i, w) in zip(post.rician_h(signals[start:stop]), idx_w, strict=True):
                lo = h[:, i]
                L64 += lo + w * (h[:, i + 1] - lo)
        L, _ = subtract_max(L64, buf[: stop - start])
        # exp() below −87 gives float32 denormals, many times slower; their weight is nil.
        L.clamp_(min=-80.0).exp_()
        m = (L @ theta).double()
        moments[start:stop] = (m[:, 1:] / m[:, :1]).numpy()
    return moments


def _mean_cov(moments: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (n, k) and covariance (n, k, k) from E[x] and the upper triangle of E[x x']."""
    mean = moments[:, :k]
    cov = np.empty((moments.shape[0], k, k))
    col = k
    for i in range(k):
        for j in range(i, k):
            cov[:, i, j] = cov[:, j, i] = moments[:, col] - mean[:, i] * mean[:, j]
            col += 1
    return mean, cov


def _refine_narrow(post: _Posterior, mean, cov, steps, means, signals,
                   chunk_elements: int) -> int:
    """Integrate again, in place in ``mean`` and ``cov``, the posteriors whose smallest sd
    along their principal axes is below one global step (:func:`_refine`); returns how many."""
    k = mean.shape[1]
    scaled = cov / np.outer(steps, steps)
    # (from below one step the grid's error grows on thin tilted ridges)
    narrow = np.flatnonzero(np.linalg.eigvalsh(scaled)[:, 0] < 1.0)
    rchunk = max(1, chunk_elements // (8 * _refine_points(k)**k * max(1, len(post.groups))))
    for start in range(0, narrow.size, rchunk):
        sel = narrow[start : start + rchunk]
        mean[sel], cov[sel] = _refine(post, mean[sel], cov[sel], steps, means[sel],
                                      signals[sel] if post.noise == "rician" else None)
    return int(narrow.size)


def _validated(signals, acquisition: Acquisition, preset, sigma, noise):
    """(preset, model, varying names, float64 signals), or ValueError for bad input."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if noise not in NOISE_TYPES:
        raise ValueError(f"unknown noise {noise!r}; choose one of: {', '.join(NOISE_TYPES)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    model = get_model(preset.model)
    names = check_preset(preset, model)
    signals = np.asarray(signals, dtype=np.float64)
    if signals.ndim != 2 or signals.shape[1] != acquisition.n:
        raise ValueError(
            f"signals must be (n_voxels, {acquisition.n}) for this acquisition, got "
            f"{signals.shape}"
        )
    return preset, model, names, signals


def bayes_reference(
    signals: np.ndarray,
    acquisition: Acquisition,
    preset: Preset | str,
    sigma: float,
    noise: str = "gaussian",
    grid: float | None = None,
    *,
    return_std: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, np.ndarray]:
    """Bayes-optimal estimate: the posterior mean under the preset's true prior and noise model.

    For presets whose clusters vary one to three scalar parameters and no direction (the
    MSDKI presets, IVIM's); every other parameter is fixed at its simulated value (S0 = 1).
    The prior is the preset's mixture of per-cluster independent Gaussians truncated to the
    parameters' bounds.
    It is integrated by the trapezoid rule on a regular grid over the bounds, step ``grid``,
    with the likelihood of the mean signal of each group of measurements (shells: see
    :func:`_measurement_groups`); posteriors narrower than one step are integrated again on
    local grids (:func:`_refine`). Rician noise uses the exact log Rice density, per group.

    Parameters
    ----------
    signals
        (n_voxels, n_meas) simulated signals (S0 = 1 scale).
    acquisition
        The scheme the signals were simulated with.
    preset
        A :class:`~mixmap.simulation.Preset` or its name.
    sigma
        Noise standard deviation (per real/imaginary channel for Rician), signal units.
    noise
        ``"gaussian"`` or ``"rician"``.
    grid
        Step of the global grid in each varying parameter's unit (None: :data:`GRID_STEP`;
        over three parameters :data:`GRID_NODES_3D` nodes per axis instead);
        ``chunk_elements`` bounds the (voxel, grid point) pairs of one block (memory).
    return_std
        Also return the posterior standard deviation as ``"<name>:std"``.

    Returns
    -------
    name -> (n_voxels,) float32 posterior mean of each varying parameter (``D``, ``K``).
    """
    preset, model, names, signals = _validated(signals, acquisition, preset, sigma, noise)
    t0 = time.perf_counter()
    axes, mesh, log_prior = _global_grid(preset, model, names, float(grid or GRID_STEP[noise]))
    steps = np.array([a[1] - a[0] for a in axes])
    post, S = _posterior(model, preset, names, acquisition, mesh, sigma, noise)
    means = np.stack([signals[:, g].mean(1) for g in post.groups], 1)  # (n, G)
    moments = _global_moments(post, S, log_prior, mesh, means, signals, sigma, chunk_elements)
    mean, cov = _mean_cov(moments, len(names))
    n_narrow = _refine_narrow(post, mean, cov, steps, means, signals, chunk_elements)
    log.info("Bayes reference: %d voxels, %d grid points, %d measurement groups, %d refined, "
             "%.1f s", signals.shape[0], mesh[0].size, len(post.groups), n_narrow,
             time.perf_counter() - t0)
    out = {name: mean[:, i].astype(np.float32) for i, name in enumerate(names)}
    if return_std:
        for i, name in enumerate(names):
            out[f"{name}:std"] = np.sqrt(np.clip(cov[:, i, i], 0, None)).astype(np.float32)
    return out


def _refine(post: _Posterior, mean, cov, steps, means, y):
    """Posterior mean and covariance on local grids (``REFINE_POINTS`` per axis, along the
    principal axes, ±6 sd), each centred and shaped by the previous one's posterior, starting
    from the global grid's, until the window was built from a resolved posterior and held it
    (at most ``REFINE_ITERATIONS`` times).

    Widths are in global-grid steps, so that D and K (or any pair) are treated alike. An axis
    along which the posterior reached the window's edge (mean + 3 sd beyond 90 % of the
    half-width: a long ridge that the previous window cut) is doubled; an sd below the
    window's spacing, not yet resolved, is floored at half that spacing (1 step at first).
    """
    mean, cov = mean.copy(), cov.copy()
    k = mean.shape[1]
    points = _refine_points(k)
    u = np.linspace(-1.0, 1.0, points)
    offs = np.stack(np.meshgrid(*[u] * k, indexing="ij"), -1).reshape(-1, k)  # (Q, k)
    active = np.arange(mean.shape[0])
    floor = np.ones(mean.shape[0])
    old_vecs = old_sd = old_fill = None
    for _ in range(REFINE_ITERATIONS):
        evals, evecs = np.linalg.eigh(cov[active] / np.outer(steps, steps))
        raw = np.sqrt(np.clip(evals, 0, None))
        sd = np.maximum(raw, floor[:, None])
        if old_vecs is not None:
            # each new axis inherits a cut from the old axis it is most aligned with
            align = np.abs(np.einsum("cki,ckj->cij", evecs, old_vecs)).argmax(2)  # (c, k)
            cut = np.take_along_axis(old_fill, align, 1) > 0.9
            sd = np.where(cut, np.maximum(sd, 2.0 * np.take_along_axis(old_sd, align, 1)), sd)
        half = evecs * (6.0 * sd[:, None, :]) * steps[None, :, None]  # columns: frame axes
        pts = mean[active, None, :] + np.einsum("cij,qj->cqi", half, offs)
        m, c = post.moments(pts, means[active], None if y is None else y[active])
        # how far the posterior reaches along each frame axis, in half-widths
        inv = np.linalg.inv(half)
        spread = np.sqrt(np.clip(np.einsum("cij,cjk,cik->ci", inv, c, inv), 0, None))
        fill = np.abs(np.einsum("cij,cj->ci", inv, m - mean[active])) + 3.0 * spread
        mean[active], cov[active] = m, c
        done = (sd == raw).all(1) & (fill <= 0.9).all(1)
        keep = ~done
        active = active[keep]
        if active.size == 0:
            break
        old_vecs, old_sd, old_fill = evecs[keep], sd[keep], fill[keep]
        floor = 0.5 * (12.0 * sd[keep].min(1)) / (points - 1)
    return mean, cov


def _refine_points(k: int) -> int:
    """Points per axis of a local grid over ``k`` parameters."""
    return REFINE_POINTS if k <= 2 else REFINE_POINTS_3D


__all__ = ["CHUNK_ELEMENTS", "GRID_STEP", "REFINE_ITERATIONS", "REFINE_POINTS",
           "bayes_reference", "check_preset"]
