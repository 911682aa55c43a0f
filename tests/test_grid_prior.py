"""The non-parametric prior on the grid (NPMLE) that vae-gmm's MSDKI maps end with: it finds a
distribution's shape, picks the likelihood from the data, and beats least squares per tissue
class on a realistic phantom."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmap.acquisition.schemes import clinical_scheme
from mixmap.fitting import get_fitter
from mixmap.fitting.base import Scheme
from mixmap.fitting.empirical_bayes import npmle
from mixmap.models import get_model
from mixmap.simulation import add_noise, simulate_brain
from mixmap.simulation.phantom import CLASS_NAMES, make_phantom


def _signals(D, K, acq, sigma, noise, seed=0):
    model = get_model("msdki")
    n = D.size
    with torch.no_grad():
        clean = model.forward({"S0": torch.ones(n, dtype=torch.float64),
                               "D": torch.as_tensor(D), "K": torch.as_tensor(K)}, acq).numpy()
    return add_noise(clean, sigma, noise, np.random.default_rng(seed)).astype(np.float32)


def test_npmle_finds_two_atoms_and_the_likelihood_from_the_data():
    acq = clinical_scheme()
    rng = np.random.default_rng(1)
    atoms = np.array([[0.8, 1.2], [2.5, 0.3]])
    pick = rng.integers(0, 2, 3000)
    D, K = atoms[pick, 0], atoms[pick, 1]
    model = get_model("msdki")
    scheme = Scheme.build(model, acq, True, "cpu")
    for noise, rician in (("gaussian", False), ("rician", True)):
        y = torch.as_tensor(_signals(D, K, acq, 0.02, noise))
        prior = npmle.fit_grid_prior(model, scheme, y, 0.02)
        assert prior.rician is rician
        assert prior.P.sum() == pytest.approx(1.0)
        for d, k in atoms:  # the mass sits within four cells of each atom
            near = ((prior.x[:, 0] - d).abs() < 4 * 4 / 96) & ((prior.x[:, 1] - k).abs()
                                                                 < 4 * 4.5 / 96)
            assert float(prior.P[near].sum()) > 0.4
        mean, sd = npmle.grid_posterior(prior, model, scheme, y, 0.02)
        lsq = get_fitter("lsq", model).fit(y.numpy(), acq).params
        for p, t in (("D", D), ("K", K)):  # a prior of two atoms: well below least squares
            assert np.sqrt(np.mean((mean[p] - t) ** 2)) < 0.6 * np.sqrt(np.mean(
                (lsq[p] - t) ** 2)), p
        assert np.sqrt(np.mean((mean["S0"] - 1.0) ** 2)) < 0.015
        assert np.all(sd["D"] >= 0)


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_a_posterior_narrower_than_a_cell_is_not_quantised(noise):
    """At high SNR each voxel's posterior is narrower than a grid cell (0.042 µm²/ms in D):
    its mean and sd come from a finer grid of its own, so the error is least squares' (not
    the cell centres' spacing) and ±1.96 sd covers about 95 %."""
    acq = clinical_scheme()
    rng = np.random.default_rng(3)
    D, K = rng.uniform(0.8, 1.6, 2000), rng.uniform(0.4, 1.2, 2000)
    model = get_model("msdki")
    scheme = Scheme.build(model, acq, True, "cpu")
    y = torch.as_tensor(_signals(D, K, acq, 0.002, noise, seed=4))
    prior = npmle.fit_grid_prior(model, scheme, y, 0.002, rician=noise == "rician")
    mean, sd = npmle.grid_posterior(prior, model, scheme, y, 0.002)
    lsq = get_fitter("lsq", model).fit(y.numpy(), acq).params
    for p, t, cell in (("D", D, 4 / 96), ("K", K, 4.5 / 96)):
        ours = np.sqrt(np.mean((mean[p] - t) ** 2))
        theirs = np.sqrt(np.mean((lsq[p] - t) ** 2))
        assert theirs < 0.2 * cell  # the scheme: a posterior well inside one cell
        assert ours < 1.1 * theirs, (p, ours, theirs)
        cover = np.mean(np.abs(mean[p] - t) <= 1.96 * sd[p])
        assert 0.92 <= cover <= 0.98, (p, cover)


def test_grid_prior_refuses_a_model_it_cannot_grid():
    with pytest.raises(ValueError, match="no grid prior"):
        npmle.fit_grid_prior(get_model("ball-stick"), None, torch.zeros(2, 3), 0.1)


@pytest.fixture(scope="module")
def phantom():
    brain = simulate_brain("paper-msdki", "clinical", shape=(24, 28, 6), snr=30, seed=5)
    return make_phantom(brain.signals, brain.acquisition, brain.mask, np.eye(4), "msdki",
                        snr=15, noise="rician", smooth=1.0, seed=2)


def test_vae_gmm_beats_lsq_on_a_phantom(phantom):
    """Overall and in the grey-matter-like class (most of this small phantom); whether it also
    holds in every class of the example scans' phantoms is measured by
    benchmarks/phantoms.py."""
    model = get_model("msdki")
    lsq = get_fitter("lsq", model).fit(phantom.signals, phantom.acquisition)
    gmm = get_fitter("vae-gmm", model, epochs=60, min_epochs=20, eb_rounds=2, seed=0)
    res = gmm.fit(phantom.signals, phantom.acquisition)
    assert res.settings["grid_prior"]["likelihood"] == "rician"
    gm = phantom.labels == CLASS_NAMES.index("grey-matter-like")
    for p in ("D", "K"):
        for sel in (np.ones_like(gm), gm):
            t = phantom.truth[p][sel]
            ours = np.sqrt(np.mean((res.params[p][sel] - t) ** 2))
            theirs = np.sqrt(np.mean((lsq.params[p][sel] - t) ** 2))
            assert ours < theirs, (p, ours, theirs)
        cover = np.mean(np.abs(res.params[p] - phantom.truth[p]) <= 1.96 * res.std[p])
        assert 0.85 <= cover <= 0.99, (p, cover)


def test_auto_uses_the_grid_prior_for_magnitudes_and_it_survives_save_and_apply(tmp_path):
    from mixmap.fitting import load_fitter
    from mixmap.simulation import simulate

    opts = dict(epochs=8, min_epochs=2, eb_rounds=1, refine_steps=5, n_samples=32)
    gauss = simulate("paper-msdki", "clinical", snr=20, noise="gaussian", n_voxels=800, seed=1)
    res = get_fitter("vae-gmm", "msdki", **opts).fit(gauss.signals, gauss.acquisition)
    assert "grid_prior" not in res.settings  # Gaussian noise: negative values, auto is off
    on = get_fitter("vae-gmm", "msdki", grid_posterior="on", **opts)
    assert on.fit(gauss.signals, gauss.acquisition).settings["grid_prior"]["likelihood"] \
        == "gaussian"
    rice = simulate("paper-msdki", "clinical", snr=20, noise="rician", n_voxels=800, seed=1)
    fitter = get_fitter("vae-gmm", "msdki", likelihood="rician", **opts)  # all measurements
    res = fitter.fit(rice.signals, rice.acquisition)
    assert res.settings["grid_prior"]["likelihood"] == "rician"
    folder = fitter.save(tmp_path / "model")
    assert '"grid_prior"' in (folder / "config.json").read_text()
    again = load_fitter(folder).apply(rice.signals, rice.acquisition)
    for k in res.params:
        assert np.array_equal(again.params[k], res.params[k]), k
        assert np.array_equal(again.std[k], res.std[k]), k
    with pytest.raises(ValueError, match="grid_posterior"):
        get_fitter("vae-gmm", "msdki", grid_posterior="sometimes")
