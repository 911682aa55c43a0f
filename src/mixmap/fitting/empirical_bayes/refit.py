"""Empirical Bayes after training a ``vae-gmm``: the learned mixture prior refitted to the scan
by maximum marginal likelihood (:func:`empirical_bayes`): Monte-Carlo EM rounds on
importance-sampled draws (:func:`em_rounds`, with :mod:`~.monte_carlo`), the Rician noise level
re-estimated with the prior (:func:`sigma_em`), and a grid refit where the model allows it
(:func:`grid_eb`, with :mod:`~.grid`). Each takes the trained fitter, whose prior it updates
in place, and returns the record that goes into the fit's settings.
"""

from __future__ import annotations

import math

import torch

import mixmap.fitting.learned.distributed as distributed
import mixmap.fitting.learned.posterior as posterior
from mixmap.fitting.base import Scheme
from mixmap.fitting.empirical_bayes import grid as eb_grid
from mixmap.fitting.empirical_bayes import monte_carlo as eb
from mixmap.fitting.learned.distributed import all_reduce_sum
from mixmap.nn import rng
from mixmap.nn.likelihoods import rician_sigma

#: Posterior draws per voxel (picked by importance weight) in the Rician σ update
#: (:func:`sigma_em`), and the distance from the median voxel, in standard errors,
#: beyond which a voxel's own update is left out of it.
SIGMA_DRAWS = 4
SIGMA_OUTLIER = 5.0


def empirical_bayes(self, data, scheme: Scheme) -> dict:
    """Refit the mixture prior to the scan by maximum marginal likelihood (Monte-Carlo EM).

    The ELBO's own M-step (:meth:`_end_epoch`) fits the prior to the aggregate of the
    amortised q, so where q is too wide or misplaced (a long likelihood ridge: CSF-like
    voxels in MSDKI) the prior inherits its error. Here the E-step is importance sampling
    from the defensive proposal (:meth:`_propose`), which converges to the exact posterior,
    so EM climbs the marginal likelihood p(x) = ∫ p(x|z) p(z) dz of the data itself. Each
    round draws once; its EM updates reweight the same draws by the changed prior (the
    likelihood, the expensive part, is computed once per round). Moments are accumulated
    in float64 about the current means (a float32 E[x²] − E[x]² loses a spread of 10⁻³
    to cancellation). On several processes the sums are added over processes.

    Returns what a user needs to judge it: the mean log evidence estimate per voxel and
    the median effective sample size after each round, and the voxels used."""
    local = self._local(data)
    world = distributed.world_size() if distributed.active() else 1
    gen = torch.Generator().manual_seed(distributed.rank_seed(self.seed + 7))
    n_use = min(local.n, -(-int(self.eb_voxels) // world))
    if n_use < local.n:
        idx = torch.randperm(local.n, generator=gen)[:n_use].sort().values
        local = local.rows(idx.to(local.y.device))
    qs = []
    chunk, per_slice = posterior.maps_sizes(local.y.device)
    step = max(1, min(chunk, per_slice // int(self.eb_samples)))
    with self._frozen():
        for start in range(0, local.n, step):
            batch = local.rows(slice(start, start + step))
            qs.append((batch, *self._q_chunk(batch, scheme)))
    with torch.no_grad():
        return em_rounds(self, qs, scheme, gen, local.n)


def em_rounds(self, qs, scheme: Scheme, gen: torch.Generator, n_local: int) -> dict:
    """``eb_rounds`` rounds: draw, then ``eb_steps`` EM updates on those draws, sped up by
    SQUAREM (:func:`~.monte_carlo.squarem`). With ``eb_split_merge`` and three or more
    components, after each round but the last one split-and-merge move is tried
    (:func:`~.monte_carlo.split_merge`): EM alone cannot move
    a component from a cluster that two of them share to two clusters that one of them
    spans, and which clusters end up sharing depends on the path of training. The next
    round's fresh draws then measure the moved prior. Each round's entry records the move
    (None: none paid).

    From the second round on, the proposal has one more part per voxel: a Gaussian on the
    last round's importance-weighted posterior under the updated prior
    (:func:`~.monte_carlo.posterior_gaussian`). q was refined under the prior that
    training left, so where EM moves the prior the posterior leaves q behind; this part
    follows it (adaptive importance sampling)."""
    prior = self.net.prior
    n_all = float(all_reduce_sum(torch.tensor(float(n_local), device=prior.mu.device)))
    history = []
    rounds = int(self.eb_rounds)
    moving = bool(self.eb_split_merge) and prior.n_components >= 3  # K < 3: no move
    laplace = [self._extra_parts(batch, scheme, log_qy, L) for batch, log_qy, _, L in qs]
    adapted = [None] * len(qs)
    for round_ in range(rounds):
        draws, zs = [], []
        for (batch, log_qy, mu, L), lp, a in zip(qs, laplace, adapted, strict=True):
            extra = lp + ([a] if a is not None else [])
            z, log_r = self._propose(log_qy, mu, L, int(self.eb_samples), gen, extra)
            base = self._loglik(self.net.decoder(z), batch, scheme) - log_r
            draws.append(eb.prepare(prior, z, base))
            zs.append(z)
        log_ev, ess = eb.squarem(prior, draws, all_reduce_sum, int(self.eb_steps))
        entry = {"log_evidence_per_voxel": log_ev / n_all,
                 "median_ess": float(torch.cat(ess).median())}
        if moving and round_ < rounds - 1:
            move = eb.split_merge(prior, draws, all_reduce_sum, int(self.eb_steps), n_all)
            entry["split_merge"] = move
        history.append(entry)
        if round_ < rounds - 1:  # the next round's proposal part; none after the last
            adapted = [eb.posterior_gaussian(prior, dr, z)
                       for dr, z in zip(draws, zs, strict=True)]
    out = {"voxels": int(n_all), "rounds": history}
    if self.likelihood == "rician" and not self.net.noise.learned:
        out["noise_sigma"] = sigma_em(self, qs, draws, zs, scheme, gen)
    if self.eb_grid:
        grid = grid_eb(self, qs, scheme, gen)
        if grid is not None:
            out["grid"] = grid
    return out


def sigma_em(self, qs, draws, zs, scheme: Scheme, gen: torch.Generator) -> dict:
    """Re-estimate the Rician noise level with the prior, from the last round's draws: σ
    that maximises Σ_i E[log p(x_i | z, σ)] over each voxel's importance-weighted
    posterior (one EM update of σ, with the prior's; :func:`rician_sigma` maximises over
    the Rician's lost phase), from :data:`SIGMA_DRAWS` draws per voxel picked by weight.
    Three parameters per voxel against hundreds of measurements leave σ little missing
    information, so one update lands near the maximum of the marginal likelihood.

    Voxels whose own update is off the median voxel's by more than :data:`SIGMA_OUTLIER`
    standard errors (√(2/m) relative, m measurements) are left out: where the signal
    grows many times S0 by b = 3000 s/mm² (large D·K) a draw's signal errs by far more
    than σ at any finite number of draws.

    Why: under Rician noise the noise floor fixes where CSF-like voxels' evidence peaks
    along MSDKI's D–K ridge, and σ from the b = 0 volumes alone is off by its sampling error
    (docs/design/learned-fitters.md). Returns σ before and after (working units) and the
    voxels left out."""
    prior = self.net.prior
    noise = self.net.noise
    before = float(noise.sigma)
    ys, nus = [], []
    for (batch, *_), dr, z in zip(qs, draws, zs, strict=True):
        w = eb.posterior_weights(prior, dr)  # (S, n)
        pick = rng.multinomial(w.T.float(), SIGMA_DRAWS, gen).T  # (R, n)
        zp = z.gather(0, pick[..., None].expand(-1, -1, z.shape[-1]))
        nus.append(self.model.forward(self.model.split(self.net.decoder(zp)), scheme.work))
        ys.append(batch.yw)
    sigma, left = rician_sigma(torch.cat(ys), torch.cat(nus, 1), before, all_reduce_sum,
                               outlier=SIGMA_OUTLIER,
                               gather=lambda t: distributed.all_gather_object(t.cpu()))
    noise.log_sigma.fill_(math.log(sigma))
    return {"before": before, "after": sigma, "voxels_left_out": left}


def grid_eb(self, qs, scheme: Scheme, gen: torch.Generator) -> dict | None:
    """The grid refit of :mod:`~.empirical_bayes.grid` on up to ``GRID_VOXELS`` of the
    empirical-Bayes voxels (a random share on each process); None where it does not
    apply. Returns its log evidence per voxel before and after, and the moves made."""
    dims = eb_grid.grid_dims(self.model)
    prior = self.net.prior
    rician = self.likelihood == "rician"
    if (dims is None or not self.model.direction_independent
            or (scheme.weights is None and not rician)
            or self.net.decoder.kind != "identity" or prior.analytic):
        return None
    # one column per shell within tolerance (Scheme.by_shell): with jittered b-values, not
    # one per distinct value; every measurement where the scheme keeps them (Rician)
    shells = (scheme if scheme.weights is not None
              else Scheme.build(self.model, scheme.full, True, prior.mu.device)).by_shell
    own = shells is scheme  # the working signals are already the shell means
    y = torch.cat([batch.yw if own else batch.y for batch, *_ in qs])
    world = distributed.world_size() if distributed.active() else 1
    n_use = min(y.shape[0], -(-eb_grid.GRID_VOXELS // world))
    if n_use < y.shape[0]:
        y = y[torch.randperm(y.shape[0], generator=gen)[:n_use].to(y.device)]
    n_all = float(all_reduce_sum(torch.tensor(float(y.shape[0]), device=prior.mu.device)))
    yw = y if own else shells.working_signals(y)[0]
    extra = {"rician": (y, shells.groups)} if rician else {}
    grid = eb_grid.grid_likelihood(self.model, prior, dims, yw, shells.work,
                                   shells.weights, float(self.net.noise.sigma),
                                   all_reduce_sum, **extra)
    first = eb_grid.grid_em(prior, grid, all_reduce_sum, n_all)
    # EM stops short along the CSF-like ridge; L-BFGS finishes the climb where that pays
    if rician:
        eb_grid.polish(prior, grid, all_reduce_sum, n_all, margin=eb_grid.RELOCATE_MARGIN)
    moves = eb_grid.relocate(prior, grid, all_reduce_sum, n_all)
    if rician and moves:
        eb_grid.polish(prior, grid, all_reduce_sum, n_all, margin=eb_grid.RELOCATE_MARGIN)
    last, _ = eb_grid.grid_em_step(prior, grid, all_reduce_sum, update=False)
    return {**first, "log_evidence_per_voxel": last / n_all, "relocations": moves}
