"""Empirical Bayes for a learned mixture prior: Monte-Carlo EM on fixed importance draws.

Given, for every voxel, S draws z_s from a proposal r and their weights without the prior,
``base_s = log p(x|z_s) − log r(z_s)``, the importance-sampled marginal likelihood of the scan
under a mixture prior p is

    Σ_voxels log (1/S) Σ_s exp(base_s) p(z_s).

:func:`em_step` raises it by the EM update of p's weights, means and variances (a weighted
mixture fit in the prior's coordinates); :func:`squarem` chains such steps with SQUAREM
extrapolation; :func:`split_merge` escapes EM's local optima, where two components share one
cluster while another component spans two (Ueda et al. 2000, "SMEM algorithm for mixture
models"): it tries merging a pair and splitting a third, runs EM from there, and keeps the move
only if the marginal likelihood ends higher than the same number of plain EM steps reach. None
of this evaluates the likelihood again: a round's draws are reused for every update.

Everything the prior does not change is computed once per round (:func:`prepare`): the draws in
the prior's coordinates and the log Jacobian of the map to those coordinates, folded into
``base`` (kept in float32, the size of the draws; each step works in float64 on one slice at a
time). Each step is then a few small matrix products per slice of voxels. On several
processes the sums are added over processes (``reduce``), so every process makes the same
update and the same choice of move.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mixmap.nn.priors import MixturePrior

Reduce = Callable[[torch.Tensor], torch.Tensor]

#: At most this many (merge pair, split component) candidates are tried per move.
MAX_CANDIDATES = 6
#: A move is kept only if it raises the log evidence by more than this many nats per voxel
#: over plain EM from the same start (the same number of free parameters either way, so no
#: complexity penalty is owed; the margin only keeps Monte-Carlo ties from flipping).
MOVE_MARGIN = 1e-4


@dataclass
class Draws:
    """One slice of voxels' draws as EM uses them: ``x`` (S, n, d) in the prior's
    coordinates, ``base`` (S, n) = log p(x|z) − log r(z) + log |dθ/dz|."""

    x: torch.Tensor
    base: torch.Tensor

    def float64(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, x² and base in float64."""
        x = self.x.double()
        return x, x * x, self.base.double()

    @property
    def n_draws(self) -> int:
        return int(self.x.shape[0])


def prepare(prior: MixturePrior, z: torch.Tensor, base: torch.Tensor) -> Draws:
    """The prior-independent part of draws z (S, n, d) with weights ``base`` (S, n)."""
    return Draws(prior.to_prior_space(z), base + prior.log_jacobian(z))


def _component_terms(prior: MixturePrior, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """log π_k + log N(x; μ_k, σ_k²) − log mass_k for every draw and component, (S, n, K):
    the expanded square, so one product with (d, K) matrices per term."""
    mu = prior.mu.detach().double()
    prec = torch.exp(-2 * prior.log_std.detach().double())  # (K, d)
    const = (prior.log_pi().detach().double() - prior.log_mass().detach().double()
             - prior.log_std.detach().double().sum(-1) - 0.5 * mu.shape[1] * math.log(2 * math.pi)
             - 0.5 * (mu * mu * prec).sum(-1))
    quad = x2 @ prec.T - 2 * (x @ (mu * prec).T)
    return const - 0.5 * quad


def _weighted(prior: MixturePrior, dr: Draws):
    """What every use of a slice's draws starts from, in float64: x (S, n, d), x², the
    per-component terms (S, n, K), their log-sum over components (S, n) (the log prior
    density) and the unnormalised log weights (S, n)."""
    x, x2, base = dr.float64()
    lpk = _component_terms(prior, x, x2)
    lse = torch.logsumexp(lpk, -1)
    return x, x2, lpk, lse, base + lse


def em_step(prior: MixturePrior, draws: Sequence[Draws], reduce: Reduce, *,
            update: bool = True) -> tuple[float, list[torch.Tensor]]:
    """The importance-sampled log evidence Σ log p(x) at the current prior (float64, summed
    over processes) and each voxel's effective sample size; with ``update``, then one EM
    update of the prior (weights, means and variances; a component with under 0.1 % of the
    voxels keeps its place, see :meth:`MixturePrior.set_moments`)."""
    K, d = prior.mu.shape
    dev = prior.mu.device
    nk = torch.zeros(K, dtype=torch.float64, device=dev)
    s1 = torch.zeros(K, d, dtype=torch.float64, device=dev)
    s2 = torch.zeros_like(s1)
    log_ev = torch.zeros((), dtype=torch.float64, device=dev)
    ess = []
    for dr in draws:
        x, x2, lpk, lse, logw = _weighted(prior, dr)
        log_ev += (torch.logsumexp(logw, 0) - math.log(dr.n_draws)).sum()
        w = torch.softmax(logw, 0)
        ess.append(1.0 / (w * w).sum(0))
        if not update:
            continue
        r = (w[..., None] * torch.exp(lpk - lse[..., None])).reshape(-1, K)  # (S n, K)
        nk += r.sum(0)
        s1 += r.T @ x.reshape(-1, d)
        s2 += r.T @ x2.reshape(-1, d)
    log_ev = reduce(log_ev)
    if update:
        nk, s1, s2 = reduce(nk), reduce(s1), reduce(s2)
        mean = s1 / nk[:, None].clamp_min(1e-30)
        var = s2 / nk[:, None].clamp_min(1e-30) - mean**2  # float64: no cancellation to fear
        prior.set_moments(nk, mean, var, min_share=1e-3)
    return float(log_ev), ess


def squarem(prior: MixturePrior, draws, reduce: Reduce, steps: int, *,
            em: Callable | None = None) -> tuple[float, list[torch.Tensor]]:
    """``steps`` EM updates sped up by SQUAREM (Varadhan & Roland 2008). Where the data leave a
    direction nearly free (along MSDKI's D–K ridge in CSF-like voxels) plain EM moves the prior
    by a small fraction of the way per step and stalls far from the maximum; SQUAREM
    extrapolates along the path of two EM steps and keeps the result only if the marginal
    likelihood does not fall, so it never does worse than EM. Returns the log evidence and the
    effective sample sizes at the start of the last group of steps. ``em`` is the update
    (default :func:`em_step` on importance draws; :func:`~.grid.grid_em_step`
    on a grid)."""
    em_step_ = em_step if em is None else em
    left = int(steps)
    log_ev0, ess = float("nan"), []
    while left > 0:
        theta0 = prior.packed()
        log_ev0, ess = em_step_(prior, draws, reduce)
        left -= 1
        if left < 2:
            continue
        theta1 = prior.packed()
        em_step_(prior, draws, reduce)
        theta2 = prior.packed()
        r, v = theta1 - theta0, theta2 - 2 * theta1 + theta0
        if float(v.norm()) == 0.0:
            left -= 1
            continue
        alpha = min(-1.0, -float(r.norm() / v.norm()))
        prior.unpack(theta0 - 2 * alpha * r + alpha**2 * v)
        log_ev, _ = em_step_(prior, draws, reduce)  # the extrapolated point, then one EM step
        left -= 2
        if not math.isfinite(log_ev) or log_ev < log_ev0:
            prior.unpack(theta2)  # extrapolation overshot: plain EM's two steps
    return log_ev0, ess


def posterior_weights(prior: MixturePrior, dr: Draws) -> torch.Tensor:
    """Each voxel's normalised importance weights under the current prior, (S, n) float64."""
    return torch.softmax(_weighted(prior, dr)[-1], 0)


@torch.no_grad()
def posterior_gaussian(prior: MixturePrior, dr: Draws, z: torch.Tensor, *,
                       inflate: float = 1.5, jitter: float = 1e-2
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian per voxel on the importance-weighted posterior of draws z (S, n, d) under
    the current prior: mean (n, d) and the Cholesky factor (n, d, d) of the weighted
    covariance, its standard deviations widened ×``inflate`` plus ``jitter`` (so a voxel
    whose weight rests on one draw still gets a proper Gaussian around it). As a part of the
    next round's proposal it follows the posterior wherever EM moves the prior, where the
    amortised q, fitted under the prior before empirical Bayes, stays behind (adaptive
    importance sampling; Cappé et al. 2004, "Population Monte Carlo")."""
    w = posterior_weights(prior, dr)[..., None]  # (S, n, 1)
    zd = z.double()
    mean = (w * zd).sum(0)
    c = zd - mean
    cov = torch.einsum("sni,snj->nij", w * c, c) * inflate**2
    cov = cov + jitter**2 * torch.eye(z.shape[-1], dtype=cov.dtype, device=cov.device)
    return mean.to(z.dtype), torch.linalg.cholesky(cov).to(z.dtype)


def _responsibility_gram(prior: MixturePrior, draws: Sequence[Draws],
                         reduce: Reduce) -> torch.Tensor:
    """(K, K) Σ_voxels P(y=i|x) P(y=j|x), the posterior cluster probabilities under the prior:
    SMEM's merge criterion is its normalised off-diagonal."""
    K = prior.mu.shape[0]
    gram = torch.zeros(K, K, dtype=torch.float64, device=prior.mu.device)
    for dr in draws:
        _, _, lpk, lse, logw = _weighted(prior, dr)
        w = torch.softmax(logw, 0)
        p = (w[..., None] * torch.exp(lpk - lse[..., None])).sum(0)  # (n, K)
        gram += p.T @ p
    return reduce(gram)


def candidates(prior: MixturePrior, draws: Sequence[Draws], reduce: Reduce,
               limit: int = MAX_CANDIDATES) -> list[tuple[int, int, int]]:
    """Moves (i, j, k): merge components i and j, split k. Pairs in order of SMEM's merge
    criterion (how alike their voxels' posterior cluster probabilities are; a nearly empty
    component first, it is free to move), then k by its share."""
    K = prior.mu.shape[0]
    if K < 3:
        return []
    gram = _responsibility_gram(prior, draws, reduce)
    norm = gram.diagonal().clamp_min(0).sqrt()
    share = prior.log_pi().detach().exp()
    pairs = []
    for i, j in itertools.combinations(range(K), 2):
        empty = bool(min(share[i], share[j]) < 1e-2)
        alike = float(gram[i, j] / (norm[i] * norm[j]).clamp_min(1e-300))
        pairs.append((1.0 if empty else 0.0, alike, i, j))
    pairs.sort(reverse=True)
    out = []
    for _, _, i, j in pairs:
        for k in sorted((k for k in range(K) if k not in (i, j)), key=lambda k: -float(share[k])):
            out.append((i, j, k))
    return out[:limit]


@torch.no_grad()
def apply_move(prior: MixturePrior, i: int, j: int, k: int) -> None:
    """Merge components i and j into i (moments matched) and split k into k and j: the two
    halves share k's weight and sit at μ ∓ 0.6 σ along k's widest coordinate (relative to its
    range), with σ narrowed there so the pair keeps k's variance."""
    pi = prior.log_pi().exp()
    mu, var = prior.mu.clone(), (2 * prior.log_std).exp()
    w_i, w_j = pi[i], pi[j]
    tot = (w_i + w_j).clamp_min(1e-30)
    m = (w_i * mu[i] + w_j * mu[j]) / tot
    v = (w_i * (var[i] + mu[i] ** 2) + w_j * (var[j] + mu[j] ** 2)) / tot - m**2
    pi_new, mu_new, var_new = pi.clone(), mu.clone(), var.clone()
    pi_new[i], mu_new[i], var_new[i] = tot, m, v.clamp_min(1e-12)
    axis = int(torch.argmax(var[k].sqrt() / prior.span))
    delta = 0.6 * var[k, axis].sqrt()
    pi_new[k] = pi_new[j] = pi[k] / 2
    mu_new[j] = mu[k]
    var_new[j] = var[k]
    mu_new[k, axis] = mu[k, axis] - delta
    mu_new[j, axis] = mu[k, axis] + delta
    var_new[k, axis] = var_new[j, axis] = var[k, axis] - delta**2
    prior.set_moments(pi_new, mu_new, var_new)


def split_merge(prior: MixturePrior, draws: Sequence[Draws], reduce: Reduce, steps: int,
                n_voxels: float) -> dict | None:
    """One SMEM move, if one pays: from the current prior, ``steps`` EM updates as they are
    (the reference), and from each candidate move the same number; the best move is kept
    when its log evidence beats the reference by more than :data:`MOVE_MARGIN` per voxel.
    Returns what was done (the move and its gain per voxel), or None when nothing changed
    but the reference's EM steps."""
    start = prior.packed()
    moves = candidates(prior, draws, reduce)
    if not moves:
        return None
    squarem(prior, draws, reduce, steps)
    ref_ev, _ = em_step(prior, draws, reduce, update=False)
    ref = prior.packed()
    best = None
    for move in moves:
        prior.unpack(start)
        apply_move(prior, *move)
        squarem(prior, draws, reduce, steps)
        ev, _ = em_step(prior, draws, reduce, update=False)
        if math.isfinite(ev) and (best is None or ev > best[0]):
            best = (ev, prior.packed(), move)
    gain = (best[0] - ref_ev) / n_voxels if best else -math.inf
    if gain > MOVE_MARGIN:
        prior.unpack(best[1])
        i, j, k = best[2]
        return {"merge": [i, j], "split": k, "gain_per_voxel": gain}
    prior.unpack(ref)
    return None
