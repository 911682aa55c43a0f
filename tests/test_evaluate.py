"""Metrics, the Bayes-optimal reference, `evaluate_dirs` on a written simulation, and plots."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy.stats import rice, truncnorm

import mixmap.evaluation.bayes as bayes_module
from mixmap.evaluation import (
    angular_error,
    bayes_reference,
    evaluate_dirs,
    metrics,
    metrics_markdown,
)
from mixmap.io import map_name
from mixmap.models import get_model
from mixmap.plots import latent_scatter, loss_curves, map_panels, scatter_truth_vs_estimate
from mixmap.simulation import simulate, write_simulation


# ------------------------------------------------------------------------------ metrics
def test_metrics_hand_made_example():
    truth = {"D": np.array([1.0, 2.0, 3.0, 4.0])}
    est = {"D": np.array([1.5, 2.0, 2.0, np.nan])}
    labels = np.array([0, 0, 1, 1])
    m = metrics(est, truth, labels, ["a", "b"])
    allm = m["D"]["all"]
    # errors 0.5, 0, -1 on the 3 finite voxels
    assert allm["n"] == 3 and allm["n_nan"] == 1
    assert allm["rmse"] == pytest.approx(np.sqrt(1.25 / 3), abs=1e-12)
    assert allm["bias"] == pytest.approx(-0.5 / 3, abs=1e-12)
    # r of (1,2,3) against (1.5,2,2): Σdxdy = 1/2, Σdx² = 2, Σdy² = 1/6
    x, y = np.array([1.0, 2, 3]), np.array([1.5, 2, 2])
    assert allm["r"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert allm["r"] == pytest.approx(0.5 / np.sqrt(2 * 1 / 6), abs=1e-12)
    a, b = m["D"]["clusters"]["a"], m["D"]["clusters"]["b"]
    assert a["rmse"] == pytest.approx(np.sqrt(0.125)) and a["bias"] == pytest.approx(0.25)
    assert a["r"] == pytest.approx(1.0)
    assert b["n"] == 1 and b["n_nan"] == 1 and b["rmse"] == pytest.approx(1.0)
    assert b["bias"] == pytest.approx(-1.0) and b["r"] is None  # one voxel: no r
    json.dumps(m)  # JSON-ready: no NaN, no numpy types


def test_metrics_scores_the_reported_std():
    truth = {"D": np.zeros(5), "K": np.zeros(5)}
    est = {"D": np.array([0.5, -1.5, 2.5, 0.0, 3.0]), "K": np.zeros(5)}
    std = {"D": np.array([1.0, 1.0, 1.0, np.nan, 2.0])}
    m = metrics(est, truth, np.array([0, 0, 0, 1, 1]), ["a", "b"], std=std)
    d = m["D"]["all"]
    # the RMSE keeps the voxel without an sd; coverage and sd_rms are over the other four:
    # |err| / sd = 0.5, 1.5, 2.5, 1.5
    assert d["n"] == 5 and d["rmse"] == pytest.approx(np.sqrt((0.25 + 2.25 + 6.25 + 9) / 5))
    assert d["sd_rms"] == pytest.approx(np.sqrt(7 / 4))
    assert d["coverage_68"] == pytest.approx(1 / 4) and d["coverage_95"] == pytest.approx(3 / 4)
    b = m["D"]["clusters"]["b"]
    assert b["coverage_68"] == 0.0 and b["coverage_95"] == 1.0 and b["sd_rms"] == 2.0
    assert "sd_rms" not in m["K"]["all"]  # no std given for K
    json.dumps(m)
    text = metrics_markdown(m)
    assert "within ±1.96 sd" in text and "| D | all | 5 |" in text
    with pytest.raises(ValueError, match="std has shape"):
        metrics(est, truth, None, None, std={"D": np.ones(4)})
    # a calibrated Gaussian posterior covers 68.3 % and 95 %
    rng = np.random.default_rng(1)
    sd = rng.uniform(0.1, 2.0, 40_000)
    err = rng.normal(0.0, sd)
    g = metrics({"D": err}, {"D": np.zeros_like(err)}, None, None, std={"D": sd})["D"]["all"]
    assert g["coverage_68"] == pytest.approx(0.683, abs=0.01)
    assert g["coverage_95"] == pytest.approx(0.95, abs=0.005)
    assert g["sd_rms"] == pytest.approx(g["rmse"], rel=0.02)


def test_metrics_direction_is_sign_invariant():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((50, 3))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    signs = rng.choice([-1.0, 1.0], size=(50, 1))
    m = metrics({"n": signs * t}, {"n": t}, None, None)
    assert m["n"]["all"]["angle_mean_deg"] == pytest.approx(0.0, abs=1e-4)
    assert "rmse" not in m["n"]["all"]
    # 30° off, flipped: still 30°
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    ang = angular_error(np.array([[-c, -s, 0.0]]), np.array([[1.0, 0.0, 0.0]]))
    assert ang[0] == pytest.approx(30.0, abs=1e-9)


def test_metrics_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        metrics({"D": np.zeros(3)}, {"D": np.zeros(4)}, None, None)


# ------------------------------------------------------------------------------ Bayes
def _brute_force(sim, step):
    """Posterior means by direct float64 evaluation over every measurement (scipy densities)."""
    model = get_model("msdki")
    D = np.linspace(0, 4, round(4 / step) + 1)
    K = np.linspace(-0.5, 4, round(4.5 / step) + 1)
    DD, KK = (a.ravel() for a in np.meshgrid(D, K, indexing="ij"))
    prior = np.zeros(DD.size)
    for c, w in zip(sim.preset.clusters, sim.preset.weights, strict=True):
        (md, mk), (sd, sk) = (c.mean["D"], c.mean["K"]), (c.std["D"], c.std["K"])
        prior += (w * truncnorm.pdf(DD, -md / sd, (4 - md) / sd, md, sd)
                  * truncnorm.pdf(KK, (-0.5 - mk) / sk, (4 - mk) / sk, mk, sk))
    prior *= np.where((DD == 0) | (DD == 4), 0.5, 1) * np.where((KK == -0.5) | (KK == 4), 0.5, 1)
    with torch.no_grad():
        S = model.forward({"S0": torch.ones(DD.size, dtype=torch.float64),
                           "D": torch.as_tensor(DD), "K": torch.as_tensor(KK)},
                          sim.acquisition).numpy()
    out = []
    for y in sim.signals.astype(np.float64):
        if sim.noise == "gaussian":
            ll = -((y - S) ** 2).sum(1) / (2 * sim.sigma**2)
        else:
            ll = rice.logpdf(y, S.clip(0) / sim.sigma, scale=sim.sigma).sum(1)
        lp = ll + np.log(prior)
        p = np.exp(lp - lp.max())
        out.append([p @ DD / p.sum(), p @ KK / p.sum()])
    return np.array(out)


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_bayes_reference_matches_direct_integration(noise, monkeypatch):
    # Same quadrature on both sides: the global grid only (no local refinement), so this checks
    # the grouped likelihood, the Rician table, the truncated prior and the float32 log-sum-exp.
    monkeypatch.setattr(bayes_module, "REFINE_ITERATIONS", 0)
    sim = simulate("paper-msdki", "hcp", snr=10, noise=noise, n_voxels=8, seed=3)
    ref = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma, noise, grid=0.05)
    brute = _brute_force(sim, 0.05)
    np.testing.assert_allclose(ref["D"], brute[:, 0], atol=2e-4)
    np.testing.assert_allclose(ref["K"], brute[:, 1], atol=2e-4)


def test_bayes_reference_resolves_narrow_posteriors():
    # At SNR 50 some posteriors are far narrower than the 0.01 grid (signals far above S0 at
    # b = 3000): the local refinement must give what a 2× finer global grid gives.
    sim = simulate("paper-msdki", "hcp", snr=50, n_voxels=60, seed=5)
    a = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma, return_std=True)
    b = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma, grid=0.005)
    assert (a["D:std"] < 0.01).any()  # there are narrow ones to refine
    np.testing.assert_allclose(a["D"], b["D"], atol=1e-3)
    np.testing.assert_allclose(a["K"], b["K"], atol=1e-3)


def test_bayes_reference_beats_a_voxelwise_fit_and_hits_paper_number():
    sim = simulate("paper-msdki", "hcp", snr=20, n_voxels=2000, seed=1)
    ref = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma)
    # a voxelwise estimate from the same data: the log-linear fit of the shell means
    loglin = get_model("msdki").initial_estimates(torch.as_tensor(sim.signals), sim.acquisition)
    loglin = {k: v.numpy() for k, v in loglin.items()}
    names = [c.name for c in sim.preset.clusters]
    m_ref = metrics(ref, sim.truth, sim.labels, names)
    m_fit = metrics(loglin, sim.truth, sim.labels, names, ["D", "K"])
    # 10,000 voxels give 0.064 (D) and 0.053 (K)
    assert m_ref["D"]["all"]["rmse"] == pytest.approx(0.064, rel=0.2)
    assert m_ref["K"]["all"]["rmse"] == pytest.approx(0.053, rel=0.2)
    for p in ("D", "K"):
        # no estimator beats the posterior mean on average, nor in any cluster by much
        assert m_ref[p]["all"]["rmse"] < m_fit[p]["all"]["rmse"]
        for c in names:
            assert m_ref[p]["clusters"][c]["rmse"] <= 1.02 * m_fit[p]["clusters"][c]["rmse"]


def test_bayes_reference_refuses_presets_it_cannot_integrate():
    sim = simulate("ball-stick", "hcp", snr=20, n_voxels=10, seed=0)
    with pytest.raises(ValueError, match="direction"):
        bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma)


# ------------------------------------------------------------------------------ folders
@pytest.fixture(scope="module")
def small_sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_eval")
    sim = simulate("paper-msdki", "hcp", snr=20, n_voxels=300, seed=2)
    write_simulation(sim, out, force=True)
    return out, sim


def test_evaluate_dirs_scores_truth_maps_as_exact(small_sim_dir, tmp_path):
    sim_dir, sim = small_sim_dir
    fit_dir = tmp_path / "fit"
    fit_dir.mkdir()
    for name in ("S0", "D", "K"):
        shutil.copy(sim_dir / "truth" / f"param-{name}.nii.gz",
                    fit_dir / map_name("", "msdki", name))
    # a std map must not be mistaken for the estimate
    shutil.copy(sim_dir / "truth" / "param-D.nii.gz", fit_dir / map_name("", "msdki", "D", "std"))
    summary = {"Model": "msdki", "Method": "oracle"}
    (fit_dir / "model-msdki_fit.json").write_text(json.dumps(summary))
    report = evaluate_dirs(fit_dir, sim_dir)
    assert report["method"] == "oracle" and report["n_voxels"] == 300
    for p in ("D", "K"):
        assert report["metrics"][p]["all"]["rmse"] == 0.0
        assert report["metrics"][p]["all"]["bias"] == 0.0
        assert report["metrics"][p]["all"]["r"] == pytest.approx(1.0)
        for st in report["metrics"][p]["clusters"].values():
            assert st["rmse"] in (0.0, None)
        assert report["bayes_reference"][p]["all"]["rmse"] > 0.0
    # the reference read from the files equals the one from the arrays
    direct = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma)
    rmse = np.sqrt(np.mean((direct["D"] - sim.truth["D"]) ** 2))
    assert report["bayes_reference"]["D"]["all"]["rmse"] == pytest.approx(rmse, rel=1e-5)
    # the std map (here the truth's D, all positive) is scored as D's reported sd: the
    # estimate is exact, so every voxel is covered; K has none
    assert report["metrics"]["D"]["all"]["coverage_95"] == 1.0
    assert report["metrics"]["D"]["all"]["sd_rms"] == pytest.approx(
        np.sqrt(np.mean(sim.truth["D"].astype(np.float64) ** 2)), rel=1e-5)
    assert "sd_rms" not in report["metrics"]["K"]["all"]
    # the Bayes reference's posterior sd, scored alike, is calibrated
    assert 0.9 <= report["bayes_reference"]["D"]["all"]["coverage_95"] <= 1.0
    json.dumps(report)
    text = metrics_markdown(report)
    assert "Bayes RMSE" in text and "| D | WM |" in text and "oracle" in text
    assert "within ±1.96 sd" in text and "Bayes within ±1.96 sd" in text


def test_evaluate_dirs_without_maps_names_the_expected_files(small_sim_dir, tmp_path):
    sim_dir, _ = small_sim_dir
    with pytest.raises(FileNotFoundError, match="model-msdki_param"):
        evaluate_dirs(tmp_path, sim_dir)


# ------------------------------------------------------------------------------ plots
def test_plots_return_figures_with_the_right_axes():
    rng = np.random.default_rng(0)
    truth = {"D": rng.random(200), "K": rng.random(200), "S0": np.ones(200)}
    est = {m: {k: v + 0.1 * rng.standard_normal(200) for k, v in truth.items()}
           for m in ("lsq", "vae")}
    labels = rng.integers(0, 3, 200)
    fig = scatter_truth_vs_estimate(truth, est, labels, ["WM", "GM", "CSF"], ["D", "K"])
    assert len(fig.axes) == 4
    assert "RMSE" in fig.axes[0].get_title()

    vols = {m: {"D": rng.random((8, 9, 3)), "K": rng.random((8, 9, 3)),
                "n": rng.standard_normal((8, 9, 3, 3))} for m in ("lsq", "vae", "vae-gmm")}
    fig = map_panels(vols, 1, ["D", "K", "n"], vmin={"D": 0.0}, vmax={"D": 3.0})
    assert len(fig.axes) == 9 + 2  # 3 × 3 panels + a colour bar for each scalar row
    fig.canvas.draw()  # lays out and renders without a display

    history = [{"epoch": i, "loss": 1.0 / (i + 1), "recon": 0.5, "kl_z": 0.1, "kl_y": 0.01}
               for i in range(5)]
    assert len(loss_curves(history).axes) == 4
    assert len(latent_scatter(rng.standard_normal((100, 2)), labels[:100]).axes) == 1
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        latent_scatter(rng.standard_normal((10, 3)))
