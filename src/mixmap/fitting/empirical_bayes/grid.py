"""Empirical Bayes on a grid: the marginal likelihood by quadrature, for models with at most
two parameters besides the signal scale (MSDKI's D and K).

Importance-sampled EM (:mod:`~.monte_carlo`) estimates each voxel's evidence from draws
near the current posterior. Where the data leave a direction nearly free (MSDKI's CSF-like
voxels: the b = 1000 s/mm² shell fixes −bD + b²D²K/6 and the higher shells are noise) the
evidence of the scan prefers one place of a component along that ridge by about 0.01 nats
per voxel, below the Monte-Carlo error of the estimate; EM moves the component along the ridge
by a vanishing step per update, and the draws never cover the places it should try.

Here every voxel's likelihood is tabulated once on a fixed grid over the prior's coordinates
(the bounded parameters) with the signal scale S0 integrated out in closed form (the signal is
S0 times a function of the others, the noise Gaussian on shell means, S0 flat):

    ∫ exp(−Σ_b n_b (ȳ_b − S0 f_b)² / 2σ²) dS0 ∝ A^(−1/2) exp(B² / 2σ²A),
    A = Σ_b n_b f_b²,  B = Σ_b n_b ȳ_b f_b.

The prior's components become discrete distributions on the grid (each Gaussian's density at
the grid points, normalised over them: truncation to the bounds is exact), so the evidence of
the scan is Σ_i log Σ_g L_ig P_g: exact up to the grid's resolution, deterministic, and as
cheap to evaluate for a far-away prior as for a near one. EM on it needs two matrix-vector
products per update (:func:`grid_em_step`), so thousands of updates, sped up by SQUAREM,
cost seconds (along the flattest ridges EM stops short of the maximum; :func:`polish`
finishes the climb by L-BFGS, in vae-gmm's refit under the Rician likelihood only). S0's own
prior coordinates are left as importance-sampled EM set them.

With Rician noise the likelihood is the Gaussian one of the shell means times a smooth
per-shell factor (:class:`~mixmap.nn.likelihoods.RiceTable`), integrated over S0 by Laplace's
method around the Gaussian closed form (:func:`grid_likelihood`, ``rician``).
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

#: Grid points in all (per axis: this to the power 1 / number of gridded parameters).
GRID_POINTS = 9216
#: At most this many voxels (over all processes) enter the grid's likelihood table, which
#: holds voxels × live grid points float32 values (MSDKI: about 8,000 × 4,400, 140 MB). Along
#: a flat ridge the refit's answer has a sampling error that the subset sets (Rician noise, SNR
#: 20: the maximum-evidence CSF-like D of one 10,000-voxel scan was 2.99 on all its voxels and
#: 2.95 on its first 8,000); 20,000 was tried only together with :func:`polish` (see there).
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
    update; about half of MSDKI's grid, where the signal would grow with b), each row divided
    by its maximum
    (``log_scale`` (n,) float64, so that the evidence is Σ log(lik @ P[live]) + Σ log_scale).
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


@torch.no_grad()
def grid_likelihood(model: SignalModel, prior: MixturePrior, dims: list[int],
                    yw: torch.Tensor, work: Acquisition, counts: torch.Tensor,
                    sigma: float, reduce: Reduce = lambda t: t,
                    chunk: int = 1024, *,
                    rician: tuple[torch.Tensor, list[torch.Tensor]] | None = None
                    ) -> GridLikelihood:
    """Tabulate the likelihood of shell means ``yw`` (n, m') (``counts`` (m',) measurements
    per shell, noise σ, all in working units) on a grid of cell centres over the prior's
    bounded coordinates ``dims``, S0 integrated out (see the module's docstring). ``reduce``
    sums over processes (the live points are those of any process).

    ``rician``: (y (n, m) every measurement, the columns of y behind each shell mean) for
    Rician noise. Its log-likelihood is the Gaussian one of the shell means plus, per shell,
    h(s) = Σ_j log i0e(y_j s/σ²) (:class:`~mixmap.nn.likelihoods.RiceTable`), smooth and
    slowly varying in s; so the S0 integral is the Gaussian closed form times the mean of
    exp(Σ_b h_b(S0 f_b)) over S0's Gaussian conditional N(B/A, σ²/A), by Laplace's method
    (:func:`_rician_term`)."""
    dev = yw.device
    per_axis = max(2, round(GRID_POINTS ** (1.0 / len(dims))))
    axes, steps = [], []
    for j in dims:
        lo, span = float(prior.lo[j]), float(prior.span[j])
        step = span / per_axis
        axes.append(lo + step * (torch.arange(per_axis, dtype=torch.float64) + 0.5))
        steps.append(step)
    mesh = torch.meshgrid(*axes, indexing="ij")
    x = torch.stack([m.reshape(-1) for m in mesh], 1)  # (G, k)
    params = {model.scale_parameter: torch.ones(x.shape[0], dtype=torch.float64)}
    for col, j in enumerate(dims):
        params[model.parameters[j].name] = x[:, col]
    f = model.forward(params, work).double()  # (G, m'), the signal at S0 = 1
    n_b = counts.double().cpu()
    A = (n_b * f * f).sum(1).clamp_min(1e-300)  # (G,)
    nf = (n_b * f).T.contiguous()  # (m', G)
    half_log_a = 0.5 * torch.log(A)
    s2 = 2.0 * float(sigma) ** 2
    n = yw.shape[0]
    if rician is not None:
        # each shell's table spans its signals S0 f_b for S0 up to 4 (the scan's scale is 1)
        tables = [RiceTable(float(sigma), 0.0, 4.0 * float(f[:, b].max()))
                  for b in range(f.shape[1])]
    lik = torch.empty(n, x.shape[0], dtype=torch.float32)
    log_scale = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        y = yw[start:start + chunk].double().cpu()
        B = y @ nf  # (c, G)
        ll = B * B / (s2 * A) - half_log_a
        if rician is not None:
            ll += _rician_term(tables, rician[0][start:start + chunk], rician[1], f,
                               B / A, float(sigma) ** 2 / A)
        top = ll.amax(1, keepdim=True)
        log_scale[start:start + chunk] = top[:, 0]
        rel = (ll - top).float()
        # below 10⁻¹⁵ of a voxel's best point: 0 (its evidence never rests there), which also
        # keeps every product in the EM and relocation sums above float32's denormals (slow)
        lik[start:start + chunk] = torch.where(rel >= math.log(TABLE_FLOOR), rel.exp(), 0.0)
    top = lik.amax(0) if n else lik.new_zeros(lik.shape[1])
    live = torch.nonzero(reduce((top > 0).double().to(dev)).cpu() > 0).flatten()
    return GridLikelihood(lik[:, live].contiguous().to(dev), log_scale.to(dev), x.to(dev),
                          list(dims), torch.tensor(steps, dtype=torch.float64, device=dev),
                          live.to(dev))


def _rician_term(tables: list[RiceTable], y: torch.Tensor, members: list[torch.Tensor],
                 f: torch.Tensor, s0_mean: torch.Tensor, s0_var: torch.Tensor) -> torch.Tensor:
    """log E[exp(H(S0))], H(S0) = Σ_b h_b(S0 f_gb), over S0 ~ N(``s0_mean``, ``s0_var``)
    (c, G) and (G,), per voxel of ``y`` (c, m) and grid point g (f (G, m') the signal at
    S0 = 1; h_b each shell's :class:`RiceTable` of the voxel's measurements).

    Laplace's method with H quadratic: H and H' at the Gaussian's mean m0 and at m1 = m0 +
    v H'(m0) (the mode were H linear), H'' their secant; the integral of the Gaussian times
    exp(that quadratic) is closed. Exact for a linear H; H'' is about Σ_b n_b / 2S0² (h_b ≈
    −n_b/2 log s at high SNR), so the error ½ H'' v stays near 0.005 nats at SNR 20 and it
    needs two table look-ups per shell where quadrature on the raw Gaussian needs five
    (exp(H) varies by e^{±1.2} over ±1 sd there)."""
    y = y.float().cpu()
    hs = [table.h(y[:, cols.cpu()]) for table, cols in zip(tables, members, strict=True)]
    v = s0_var.float()[None]  # (1, G)
    m0 = s0_mean.float()
    fb = f.float()

    def value_and_slope(s0):
        val, der = torch.zeros_like(s0), torch.zeros_like(s0)
        for b, (table, h) in enumerate(zip(tables, hs, strict=True)):
            hv, hd = table.lookup(h, s0 * fb[:, b])
            val += hv
            der += hd * fb[:, b]
        return val, der

    _, g0 = value_and_slope(m0)
    d = v * g0  # m1 − m0
    h1, g1 = value_and_slope(m0 + d)
    c = torch.where(d.abs() > 1e-12, (g1 - g0) / torch.where(d.abs() > 1e-12, d, 1.0), 0.0)
    prec = 1.0 / v - torch.minimum(c, 0.5 / v)  # the integrand's precision, kept positive
    a = g1 - d / v
    return (h1 - d * d / (2 * v) + a * a / (2 * prec) - 0.5 * torch.log(v * prec)).double()


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
    spreads directly, by L-BFGS from where EM stopped; keep the result only if the evidence
    rose. Along MSDKI's D–K ridge the evidence is so flat that EM, even with SQUAREM, moves the
    CSF-like component by a vanishing step per update and its stopping rule ends it far from
    the maximum (0.08 µm²/ms short in D at SNR 20 with Rician noise, where it moves the maps:
    the CSF-like voxels' posteriors follow the prior along the ridge); L-BFGS learns the
    ridge's curvature and gets there in tens of evaluations. vae-gmm's refit runs it under
    the Rician likelihood only (with σ re-estimated with the prior: on the seed-0 SNR 20
    scan, maps 1.05× the Bayes floor in D where EM's stop gave 1.42×). Not with the Gaussian
    one: run after EM from where vae-gmm's training left the prior on the SNR 10
    ``paper-msdki`` scan (with 20,000 grid voxels) it climbed to a CSF-like component with
    its K spread at the grid's floor and D spread twice the truth's (maps 1.59× the Bayes
    floor in D, where EM's early stop gives 1.03×): the evidence has more than one maximum
    there, and the exact climb does not choose the better one. ``benchmarks/eb_spread.py``
    uses it to find the maximum near a given start. The spreads keep EM's floor smoothly:
    sd = √(floor² + s²), floor half a grid step. Gradients and the objective are summed
    over processes (each holds the same prior, so all take the same steps). Returns the
    objective's evaluations.

    ``margin``: keep the result only if it raises the log evidence by more than this many
    nats per voxel (vae-gmm: :data:`RELOCATE_MARGIN`, as for a relocation). Along the ridge
    the evidence is so flat that the climb can carry the CSF-like component far for almost
    nothing: on the seed-1 SNR 20 Rician scan from D 2.95 to 2.74 for 4·10⁻⁵ nats per voxel
    (8,000 grid voxels), where the maps went to 3.0× the Bayes floor; on the seed-0 scan the
    climb gained 2–3·10⁻⁴ and took the maps from 1.4× to 1.05×."""
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
    1/(2K) of the voxels is tried with that share); then EM from there
    (:func:`grid_em`). EM climbs only to the nearest optimum, and along a likelihood ridge
    the optimum that training left a component in can be far from the best (MSDKI's
    CSF-like component at D 2.6, K −0.4 instead of 3.0, 0.0 at SNR 10: 0.012 nats per voxel
    apart, with a valley between). Every voxel's likelihood on the grid convolved with the
    component's Gaussian (separable: one small matrix product per axis) gives the
    evidence of every candidate centre at once. Returns the moves made."""
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
