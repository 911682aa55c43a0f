"""The learned mixture prior: a proper density in bounded coordinates, exact sampling, and the
M-step update shared by the ELBO's EM and the empirical-Bayes refit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import truncnorm

from mixmap.nn.priors import MixturePrior

torch.set_num_threads(1)


def _prior() -> MixturePrior:
    """Two components in 2-D: coordinate 0 bounded to [0, 3] (one component cut by the upper
    bound), coordinate 1 unbounded."""
    p = MixturePrior(2, 2, lower=torch.tensor([0.0, float("nan")]),
                     upper=torch.tensor([3.0, float("nan")]))
    with torch.no_grad():
        p.mu.copy_(torch.tensor([[1.0, -1.0], [2.8, 2.0]]))
        p.log_std.copy_(torch.tensor([[0.3, 0.5], [0.5, 0.2]]).log())
        p.logits.copy_(torch.tensor([0.3, 0.7]).log())
    for t in p.parameters():
        t.requires_grad_(False)
    return p


def test_the_prior_integrates_to_one_over_the_latent_space():
    p = _prior()
    z0 = torch.linspace(-25, 25, 4001, dtype=torch.float64)
    z1 = torch.linspace(-8, 8, 801, dtype=torch.float64)
    g0, g1 = torch.meshgrid(z0, z1, indexing="ij")
    dens = p.log_prob(torch.stack([g0, g1], -1).float()).double().exp()
    total = torch.trapezoid(torch.trapezoid(dens, z1, dim=1), z0)
    assert float(total) == pytest.approx(1.0, abs=2e-3)
    # without the truncation's renormalisation the cut component would lose mass
    cut = p.log_mass()
    assert float(cut[1].exp()) == pytest.approx(
        truncnorm.cdf(3, -np.inf, np.inf, loc=2.8, scale=0.5), rel=1e-4)
    inside = np.diff(truncnorm.cdf([0, 3], -np.inf, np.inf, 1.0, 0.3))[0]
    assert float(cut[0]) == pytest.approx(np.log(inside), abs=1e-6)


def test_samples_follow_the_truncated_mixture():
    p = _prior()
    z = p.sample((200_000,), torch.Generator().manual_seed(0))
    assert z.shape == (200_000, 2) and torch.isfinite(z).all()
    x = p.to_prior_space(z).double().numpy()
    assert x[:, 0].min() >= 0 and x[:, 0].max() <= 3
    # the bounded coordinate: a mixture of truncated normals, mean and variance by scipy
    pi = np.array([0.3, 0.7])
    comps = [truncnorm((0 - m) / s, (3 - m) / s, loc=m, scale=s)
             for m, s in ((1.0, 0.3), (2.8, 0.5))]
    mean = sum(w * c.mean() for w, c in zip(pi, comps, strict=True))
    second = sum(w * (c.var() + c.mean() ** 2) for w, c in zip(pi, comps, strict=True))
    assert x[:, 0].mean() == pytest.approx(mean, abs=0.005)
    assert x[:, 0].var() == pytest.approx(second - mean**2, rel=0.02)
    assert x[:, 1].mean() == pytest.approx(0.3 * -1.0 + 0.7 * 2.0, abs=0.01)
    # the draws' density is the prior's: E_p[1/p] over a box = its volume (importance check)
    box = (x[:, 0] > 0.5) & (x[:, 0] < 1.5) & (x[:, 1] > -2) & (x[:, 1] < 0)
    inv = torch.exp(p.log_jacobian(z) - p.log_prob(z)).double().numpy()  # 1 / p(x)
    assert np.mean(np.where(box, inv, 0.0)) == pytest.approx(1.0 * 2.0, rel=0.05)


def test_m_step_floors_spreads_and_keeps_unplaced_components():
    p = _prior()
    before_mu, before_sd = p.mu.clone(), p.log_std.clone()
    nk = torch.tensor([1000.0, 1e-6])
    p.set_moments(nk, torch.tensor([[1.5, 0.0], [9.0, 9.0]]),
                  torch.tensor([[0.0, 4.0], [1.0, 1.0]]), min_share=1e-3)
    assert p.log_pi().exp()[0] == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(p.mu[0], torch.tensor([1.5, 0.0]))
    # a zero variance is floored at a thousandth of the range, not collapsed to a point
    assert float(p.log_std[0, 0].exp()) == pytest.approx(3e-3, rel=1e-4)
    assert float(p.log_std[0, 1].exp()) == pytest.approx(2.0, rel=1e-5)
    # the empty component keeps where it was
    assert torch.equal(p.mu[1], before_mu[1]) and torch.equal(p.log_std[1], before_sd[1])


def test_matched_log_prob_is_the_diagonal_of_all_components():
    """The ELBO's KL terms evaluate component k at q's k-th draws only; the same numbers as
    the full (draws x components) table's diagonal."""
    p = _prior()
    z = torch.randn(5, 2, 7, 2) * 2  # (S, K, n, d)
    full = p.component_log_prob(z)  # (S, K, n, K)
    diag = torch.diagonal(full, dim1=1, dim2=-1).permute(0, 2, 1)  # (S, K, n)
    torch.testing.assert_close(p.matched_log_prob(z), diag)


def test_draw_helpers_on_a_cpu_generator_make_the_draws_of_the_plain_calls():
    """A CPU fit's maps stay reproducible to the bit: on a CPU generator each helper of
    mixmap.nn.rng draws exactly what the torch call it stands for draws, and only CUDA gets
    a generator on the device."""
    from mixmap.nn import rng

    assert rng.draw_generator(3, "cpu").device.type == "cpu"
    assert rng.draw_generator(3, "mps").device.type == "cpu"
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    a, b = rng.draw_generator(3, "cpu"), torch.Generator().manual_seed(3)
    torch.testing.assert_close(rng.randn((4, 5), a, torch.device("cpu")),
                               torch.randn(4, 5, generator=b), rtol=0, atol=0)
    torch.testing.assert_close(rng.rand((4, 5), a, torch.device("cpu")),
                               torch.rand(4, 5, generator=b), rtol=0, atol=0)
    torch.testing.assert_close(rng.multinomial(probs, 7, a),
                               torch.multinomial(probs, 7, replacement=True, generator=b))
