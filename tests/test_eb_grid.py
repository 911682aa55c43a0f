"""Empirical Bayes on a grid (mixmap.fitting.empirical_bayes.grid): the tabulated likelihood is the
Gaussian likelihood of the shell means with S0 integrated out, EM on it climbs the evidence,
and relocation moves a component that EM leaves far from its voxels to them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixmap.fitting.base import Scheme
from mixmap.fitting.empirical_bayes import grid as eb_grid
from mixmap.fitting.learned.latent import latent_bounds
from mixmap.models import get_model
from mixmap.nn.likelihoods import rician_loglik
from mixmap.nn.priors import MixturePrior
from mixmap.simulation import get_scheme

torch.set_num_threads(1)

SIGMA = 0.02
MODEL = get_model("msdki")
SCHEME = Scheme.build(MODEL, get_scheme("hcp"), True, "cpu")


def same(t: torch.Tensor) -> torch.Tensor:
    return t


def _voxels(centres, n_per: int, sd: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Shell means (n, shells) of MSDKI voxels with S0 = 1 and (D, K) around ``centres``,
    Gaussian noise of σ on every measurement (so σ / √count on a shell's mean)."""
    gen = torch.Generator().manual_seed(seed)
    dk = torch.cat([torch.tensor(c) + sd * torch.randn(n_per, 2, generator=gen)
                    for c in centres])
    params = {"S0": torch.ones(dk.shape[0]), "D": dk[:, 0], "K": dk[:, 1]}
    clean = MODEL.forward(params, SCHEME.work)
    noise = SIGMA / SCHEME.weights.sqrt() * torch.randn(clean.shape, generator=gen)
    return clean + noise


def _prior(mu, std) -> MixturePrior:
    lo, hi = latent_bounds(MODEL)
    p = MixturePrior(3, len(mu), lower=lo, upper=hi)
    with torch.no_grad():
        p.mu.copy_(torch.tensor([[1.0, *m] for m in mu]))
        p.log_std.copy_(torch.tensor([[0.01, *s] for s in std]).log())
    for t in p.parameters():
        t.requires_grad_(False)
    return p


def _grid(prior, yw):
    return eb_grid.grid_likelihood(MODEL, prior, eb_grid.grid_dims(MODEL), yw, SCHEME.work,
                                   SCHEME.weights, SIGMA)


def test_grid_covers_every_parameter_but_s0_and_only_where_it_can():
    assert eb_grid.grid_dims(MODEL) == [1, 2]
    assert eb_grid.grid_dims(get_model("ball-stick")) is None  # a direction


def test_the_table_is_the_likelihood_with_s0_integrated_out():
    prior = _prior([[1.0, 1.0]], [[0.3, 0.3]])
    yw = _voxels([(1.0, 1.0)], 1)
    g = _grid(prior, yw)
    row = torch.zeros(g.x.shape[0])
    row[g.live] = g.lik[0]  # the table holds the live grid points only
    assert float(row.max()) == 1.0 and (row > 0).sum() < 0.5 * row.numel()
    # brute force: integrate the likelihood over S0 on a fine line at a few grid points
    order = torch.argsort(row, descending=True)
    pts = [int(j) for j in order[:5]]  # the best point and the next (a sharp likelihood)
    s0 = torch.linspace(0.0, 4.0, 40001, dtype=torch.float64)
    out = []
    for i in pts:
        d, k = g.x[i]
        f = MODEL.forward({"S0": torch.ones(1, dtype=torch.float64), "D": d[None],
                           "K": k[None]}, SCHEME.work).double()[0]
        r = yw[0].double()[None] - s0[:, None] * f[None]
        ll = -(SCHEME.weights.double() * r * r).sum(1) / (2 * SIGMA**2)
        out.append(float(torch.logsumexp(ll, 0)) + math.log(float(s0[1] - s0[0])))
    tab = [math.log(float(row[i])) + float(g.log_scale[0]) for i in pts]
    # the same up to one constant (the Gaussian's normalisation): compare differences
    assert all(float(row[i]) > 0 for i in pts)  # none below the table's floor
    for j in range(1, len(pts)):
        assert tab[j] - tab[0] == pytest.approx(out[j] - out[0], abs=1e-3)
    assert len({round(t, 3) for t in tab}) == len(pts)  # the points differ


@pytest.mark.parametrize("centre", [(3.0, 0.0), (1.0, 1.5)])
def test_the_rician_table_is_the_rician_likelihood_with_s0_integrated_out(centre):
    # SNR 20 Rician noise: the CSF-like voxel's signal at b >= 2000 s/mm² is at the noise
    # floor, where the Gaussian form of the shell means is far off
    sigma = 0.05
    full = get_scheme("hcp")
    gen = torch.Generator().manual_seed(1)
    prm = {"S0": torch.ones(1, dtype=torch.float64), "D": torch.tensor([centre[0]]).double(),
           "K": torch.tensor([centre[1]]).double()}
    clean = MODEL.forward(prm, full).double()
    y = (clean + sigma * torch.randn(clean.shape, generator=gen, dtype=torch.float64)).hypot(
        sigma * torch.randn(clean.shape, generator=gen, dtype=torch.float64))
    yw, _ = SCHEME.working_signals(y)
    prior = _prior([[1.0, 1.0]], [[0.3, 0.3]])
    g = eb_grid.grid_likelihood(MODEL, prior, eb_grid.grid_dims(MODEL), yw, SCHEME.work,
                                SCHEME.weights, sigma, rician=(y, SCHEME.groups))
    row = torch.zeros(g.x.shape[0])
    row[g.live] = g.lik[0]
    order = torch.argsort(row, descending=True)
    alive = int((row > 0).sum())
    # the best point, its neighbours, and points down to 1e-9 of it
    pts = [int(order[j]) for j in (0, 1, 2, alive // 50, alive // 10, alive // 3)]
    s0 = torch.linspace(0.5, 1.5, 20001, dtype=torch.float64)
    out = []
    for i in pts:
        d, k = g.x[i]
        f = MODEL.forward({"S0": torch.ones(1, dtype=torch.float64), "D": d[None],
                           "K": k[None]}, full).double()[0]
        ll = rician_loglik(y, s0[:, None] * f[None], torch.tensor(sigma, dtype=torch.float64))
        out.append(float(torch.logsumexp(ll, 0)))
    tab = [math.log(float(row[i])) + float(g.log_scale[0]) for i in pts]
    assert all(float(row[i]) > 0 for i in pts)
    assert out[0] >= max(out) - 1e-3  # the table's best point is (nearly) the true best
    for j in range(1, len(pts)):
        assert tab[j] - tab[0] == pytest.approx(out[j] - out[0], abs=0.01, rel=0.01)
    # ... and the Gaussian table of the same shell means is not (the floor biases it)
    gauss = _grid_sigma(prior, yw, sigma)
    row_g = torch.zeros(g.x.shape[0])
    row_g[gauss.live] = gauss.lik[0]
    if centre[0] == 3.0:
        assert int(torch.argmax(row_g)) != int(order[0])


def _grid_sigma(prior, yw, sigma):
    return eb_grid.grid_likelihood(MODEL, prior, eb_grid.grid_dims(MODEL), yw, SCHEME.work,
                                   SCHEME.weights, sigma)


def test_grid_em_climbs_the_evidence_and_finds_the_clusters():
    yw = _voxels([(1.0, 1.5), (2.5, 0.5)], 300)
    prior = _prior([[1.3, 1.2], [2.2, 0.8]], [[0.4, 0.4], [0.4, 0.4]])
    g = _grid(prior, yw)
    evs = []
    for _ in range(30):
        ev, _ = eb_grid.grid_em_step(prior, g, same)
        evs.append(ev)
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(evs, evs[1:], strict=False))
    mu = prior.mu[:, 1:].numpy()
    assert np.allclose(sorted(mu.tolist()), [[1.0, 1.5], [2.5, 0.5]], atol=0.05)
    assert np.allclose(prior.log_pi().exp().numpy(), 0.5, atol=0.02)


def test_polish_finishes_the_climb_where_em_stops_and_never_descends():
    # a CSF-like cluster on MSDKI's ridge (SNR 20 with these σ: its higher shells are noise)
    # next to a tissue-like one; EM started off the CSF-like place creeps along the ridge
    yw = _voxels([(1.0, 1.5), (3.0, 0.0)], 400, sd=0.1, seed=3)
    starts = {"off": ([[1.2, 1.3], [2.8, -0.2]], [[0.3, 0.3], [0.2, 0.2]]),
              "true": ([[1.0, 1.5], [3.0, 0.0]], [[0.1, 0.1], [0.1, 0.1]])}
    ends = {}
    for name, (mu, sd) in starts.items():
        prior = _prior(mu, sd)
        g = _grid(prior, yw)
        for _ in range(15):
            eb_grid.grid_em_step(prior, g, same)
        before, _ = eb_grid.grid_em_step(prior, g, same, update=False)
        evals = eb_grid.polish(prior, g, same, float(yw.shape[0]))
        after, _ = eb_grid.grid_em_step(prior, g, same, update=False)
        assert evals > 1 and after >= before
        ends[name] = (after, prior.mu[:, 1:].clone())
    # from both starts: one maximum (the same evidence and place)
    assert ends["off"][0] == pytest.approx(ends["true"][0], abs=1e-3)
    assert torch.allclose(ends["off"][1], ends["true"][1], atol=0.02)
    # and a polished prior that is already at the maximum stays there
    prior = _prior(ends["true"][1].tolist(), [[0.1, 0.1], [0.1, 0.1]])
    g = _grid(prior, yw)
    eb_grid.grid_em(prior, g, same, float(yw.shape[0]))
    kept = prior.mu.clone()
    eb_grid.polish(prior, g, same, float(yw.shape[0]))
    assert torch.allclose(prior.mu, kept, atol=1e-3)


def test_relocation_moves_a_stranded_component_to_its_voxels():
    yw = _voxels([(1.0, 1.5), (2.5, 0.5)], 300)
    # the second component far from every voxel, narrow: EM cannot bring it over
    prior = _prior([[1.0, 1.5], [0.4, 3.5]], [[0.1, 0.1], [0.05, 0.05]])
    g = _grid(prior, yw)
    n = float(yw.shape[0])
    eb_grid.grid_em(prior, g, same, n)
    stranded = torch.cdist(torch.tensor([[2.5, 0.5]]), prior.mu[:, 1:]).min()
    assert stranded > 0.5  # EM alone did not reach the second cluster
    before, _ = eb_grid.grid_em_step(prior, g, same, update=False)
    moves = eb_grid.relocate(prior, g, same, n)
    after, _ = eb_grid.grid_em_step(prior, g, same, update=False)
    assert moves and after > before
    centres = torch.tensor([[1.0, 1.5], [2.5, 0.5]])
    assert torch.cdist(centres, prior.mu[:, 1:]).min(1).values.max() < 0.05


def test_relocation_leaves_a_prior_that_fits():
    yw = _voxels([(1.0, 1.5), (2.5, 0.5)], 300)
    prior = _prior([[1.0, 1.5], [2.5, 0.5]], [[0.05, 0.05], [0.05, 0.05]])
    g = _grid(prior, yw)
    eb_grid.grid_em(prior, g, same, float(yw.shape[0]))
    assert eb_grid.relocate(prior, g, same, float(yw.shape[0])) == []
