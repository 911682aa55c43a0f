"""Monte-Carlo empirical Bayes on fixed draws: the importance-sampled evidence is the
mixture's own density where the draws are the data, EM climbs it, and a split-and-merge move
takes EM out of the local optimum where two components share one cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmap.fitting.empirical_bayes import monte_carlo as eb
from mixmap.nn.priors import MixturePrior

torch.set_num_threads(1)

CENTRES = torch.tensor([[1.0, 1.0], [2.0, 3.0], [3.0, 1.0]])


def same(t: torch.Tensor) -> torch.Tensor:
    return t


def _points(n_per: int = 400, seed: int = 0) -> torch.Tensor:
    """Three clusters in [0, 4]², std 0.1, as latent coordinates (logits of the bounded
    values): the prior's Gaussians live in the bounded ones."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([c + 0.1 * torch.randn(n_per, 2, generator=gen) for c in CENTRES])
    frac = x / 4.0
    return torch.log(frac) - torch.log1p(-frac)


def _prior(mu, std, pi=None) -> MixturePrior:
    p = MixturePrior(2, len(mu), lower=torch.zeros(2), upper=torch.full((2,), 4.0))
    with torch.no_grad():
        p.mu.copy_(torch.as_tensor(mu, dtype=torch.float32))
        p.log_std.copy_(torch.as_tensor(std, dtype=torch.float32).log())
        if pi is not None:
            p.logits.copy_(torch.as_tensor(pi, dtype=torch.float32).log())
    for t in p.parameters():
        t.requires_grad_(False)
    return p


def _draws(prior, z, slices=3):
    """One draw per point (S = 1) with base 0: the evidence is the mixture's log density of
    the points, and EM is a plain Gaussian-mixture fit."""
    return [eb.prepare(prior, part[None], torch.zeros(1, part.shape[0]))
            for part in torch.tensor_split(z, slices)]


def _stuck() -> MixturePrior:
    """Two components on the first cluster, one spanning the other two."""
    return _prior([[0.95, 1.0], [1.05, 1.0], [2.5, 2.0]],
                  [[0.1, 0.1], [0.1, 0.1], [0.6, 1.1]])


def _nearest(prior) -> np.ndarray:
    """Distance from each true centre to the nearest component mean."""
    return torch.cdist(CENTRES, prior.mu).min(1).values.numpy()


def test_evidence_is_the_mixtures_density_and_em_climbs_it():
    z = _points()
    prior = _stuck()
    draws = _draws(prior, z)
    log_ev, ess = eb.em_step(prior, draws, same, update=False)
    assert log_ev == pytest.approx(float(prior.log_prob(z).double().sum()), rel=1e-6)
    assert torch.cat(ess).eq(1).all()  # one draw per voxel
    evs = [eb.em_step(prior, draws, same)[0] for _ in range(8)]
    assert all(b >= a - 1e-6 for a, b in zip(evs, evs[1:], strict=False)), evs
    # the M-step on one draw per point is the weighted moments of the points
    prior2 = _prior([[1.0, 1.0], [2.0, 3.0], [3.0, 1.0]], [[0.2, 0.2]] * 3)
    eb.squarem(prior2, _draws(prior2, z), same, 20)
    np.testing.assert_allclose(prior2.mu.numpy(), CENTRES.numpy(), atol=0.02)
    np.testing.assert_allclose(prior2.log_std.exp().numpy(), 0.1, atol=0.015)
    np.testing.assert_allclose(prior2.log_pi().exp().numpy(), 1 / 3, atol=0.01)


def test_split_merge_leaves_the_local_optimum_that_em_cannot():
    z = _points()
    prior = _stuck()
    draws = _draws(prior, z)
    eb.squarem(prior, draws, same, 30)
    assert _nearest(prior).max() > 0.5  # plain EM: still two on one cluster, one on two
    stuck_ev, _ = eb.em_step(prior, draws, same, update=False)
    move = eb.split_merge(prior, draws, same, 10, z.shape[0])
    assert move is not None and sorted(move["merge"]) == [0, 1] and move["split"] == 2
    eb.squarem(prior, draws, same, 20)
    assert _nearest(prior).max() < 0.05, prior.mu
    ev, _ = eb.em_step(prior, draws, same, update=False)
    assert (ev - stuck_ev) / z.shape[0] > 0.1
    assert move["gain_per_voxel"] > eb.MOVE_MARGIN


def test_split_merge_keeps_a_prior_that_fits():
    z = _points()
    prior = _prior(CENTRES.tolist(), [[0.1, 0.1]] * 3)
    draws = _draws(prior, z)
    eb.squarem(prior, draws, same, 10)
    before = prior.packed()
    assert eb.split_merge(prior, draws, same, 10, z.shape[0]) is None
    # nothing moved but the reference's own EM steps, which change a converged prior little
    assert float((prior.packed() - before).abs().max()) < 1e-2


def test_an_empty_component_is_the_first_to_merge():
    z = _points()
    prior = _prior([[1.0, 1.0], [2.5, 2.0], [3.9, 3.9]], [[0.1, 0.1], [0.6, 1.1], [0.05, 0.05]],
                   pi=[0.5, 0.4999, 0.0001])
    draws = _draws(prior, z)
    moves = eb.candidates(prior, draws, same)
    assert len(moves) == 3 and all(2 in m[:2] for m in moves[:2])  # the empty one merges first
    eb.squarem(prior, draws, same, 10)
    assert eb.split_merge(prior, draws, same, 10, z.shape[0]) is not None
    eb.squarem(prior, draws, same, 20)
    assert _nearest(prior).max() < 0.05, prior.mu


def test_two_components_have_no_move():
    z = _points()
    prior = _prior([[1.0, 1.0], [2.5, 2.0]], [[0.1, 0.1], [0.6, 1.1]])
    assert eb.candidates(prior, _draws(prior, z), same) == []
    assert eb.split_merge(prior, _draws(prior, z), same, 5, z.shape[0]) is None


def test_posterior_gaussian_is_the_weighted_moments_of_the_draws():
    """The adaptive part of the next round's proposal: mean and covariance of the draws under
    their importance weights at the current prior (here all draws weigh the same: a flat
    prior and equal base), widened by ``inflate`` and ``jitter``."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4000, 3, 2, generator=gen) @ torch.tensor([[1.0, 0.0], [0.6, 0.5]]).T + 2.0
    prior = MixturePrior(2, 1)  # unbounded coordinates: no Jacobian
    with torch.no_grad():
        prior.log_std.fill_(30.0)  # flat over the draws
    dr = eb.prepare(prior, z, torch.zeros(z.shape[:2]))
    mean, chol = eb.posterior_gaussian(prior, dr, z, inflate=1.0, jitter=0.0)
    np.testing.assert_allclose(mean.numpy(), 2.0, atol=0.05)
    cov = chol @ chol.transpose(-1, -2)
    np.testing.assert_allclose(cov.numpy(), np.broadcast_to([[1.0, 0.6], [0.6, 0.61]], (3, 2, 2)),
                               atol=0.06)
    _, wide = eb.posterior_gaussian(prior, dr, z, inflate=2.0, jitter=0.1)
    np.testing.assert_allclose((wide @ wide.transpose(-1, -2)).numpy(),
                               4 * cov.numpy() + 0.01 * np.eye(2), rtol=1e-4, atol=1e-5)
