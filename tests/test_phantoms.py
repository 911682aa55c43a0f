"""Realistic phantoms (``mixmap simulate --like``) and the empirical floor: the generator's
round trip, tissue classes, the floor against the grid Bayes reference, and the commands on
tiny files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mixmap.acquisition import Acquisition
from mixmap.cli import app
from mixmap.evaluation import bayes_reference
from mixmap.evaluation.floor import empirical_floor
from mixmap.fitting import get_fitter
from mixmap.models import get_model
from mixmap.simulation import simulate, simulate_brain, write_simulation
from mixmap.simulation.phantom import (
    CLASS_NAMES,
    make_phantom,
    phantom_sigma,
    tissue_classes,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def brain():
    """A small brain-shaped MSDKI scan (clinical scheme, 2 b0 + 3 shells × 10 directions)."""
    return simulate_brain("paper-msdki", "clinical", shape=(20, 24, 6), snr=30, seed=3)


def _rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def test_noise_free_phantom_fitted_by_lsq_returns_its_truth(brain):
    ph = make_phantom(brain.signals, brain.acquisition, brain.mask, np.eye(4), "msdki",
                      snr=1e7, noise="gaussian", smooth=1.0)
    assert ph.signals.shape == brain.signals.shape and ph.preset is None
    res = get_fitter("lsq", get_model("msdki")).fit(ph.signals, ph.acquisition)
    for p, tol in (("S0", 1e-3), ("D", 1e-3), ("K", 1e-2)):
        err = np.abs(res.params[p] - ph.truth[p])
        assert np.quantile(err, 0.99) < tol * max(1.0, float(np.median(ph.truth[p]))), p
    # the truth is the scan's fit, smoothed: less spread than the noisy fit itself
    raw = get_fitter("lsq", get_model("msdki")).fit(brain.signals, brain.acquisition)
    assert np.std(ph.truth["K"]) < np.std(raw.params["K"])


def test_phantom_noise_level_follows_snr_or_the_scans_own_sigma(brain):
    ph = make_phantom(brain.signals, brain.acquisition, brain.mask, np.eye(4), "msdki",
                      snr=10, noise="rician", smooth=0.0)
    assert ph.sigma == pytest.approx(np.median(ph.truth["S0"]) / 10)
    ph2 = make_phantom(brain.signals, brain.acquisition, brain.mask, np.eye(4), "msdki",
                       snr=None, noise_factor=2.0, smooth=0.0)
    assert ph2.sigma == pytest.approx(2 * ph2.info["scan_sigma"])
    # the clinical scheme's σ estimate from its 2 b=0 volumes is near the simulated 1/30
    assert ph2.info["scan_sigma"] == pytest.approx(1 / 30, rel=0.15)
    with pytest.raises(ValueError, match="either an SNR or a noise factor"):
        phantom_sigma(ph.truth, "msdki", snr=10, noise_factor=2.0)
    with pytest.raises(ValueError, match="noise level is unknown"):
        phantom_sigma(ph.truth, "msdki", snr=None, scan_sigma=None, noise_factor=2.0)


def test_tissue_classes_from_a_tensor_fit():
    acq = Acquisition.from_arrays(np.r_[0.0, 0.0, np.full(12, 1.0)],
                                  np.r_[[[0, 0, 0]] * 2, _directions(12)])
    g, b = acq.bvecs, acq.bvals
    tensors = {0: np.diag([1.7, 0.2, 0.2]), 1: np.eye(3) * 0.8, 2: np.eye(3) * 3.0}
    rows, want = [], []
    for label, D in tensors.items():
        rows.append(np.exp(-b * np.einsum("mi,ij,mj->m", g, D, g)))
        want.append(label)
    labels, info = tissue_classes(np.array(rows), acq)
    assert labels.tolist() == want
    assert set(info["counts"]) == set(CLASS_NAMES)


def _directions(n):
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_empirical_floor_matches_the_grid_bayes_reference():
    """The floor's atoms are the truth of the other voxels; on a preset (whose prior the grid
    reference integrates exactly) the two agree within the atoms' Monte-Carlo error."""
    sim = simulate("paper-msdki", "clinical", snr=20, n_voxels=3000, seed=1)
    floor = empirical_floor(sim.signals, sim.acquisition, "msdki", sim.truth, sim.sigma)
    ref = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma)
    lsq = get_fitter("lsq", get_model("msdki")).fit(sim.signals, sim.acquisition)
    for p in ("D", "K"):
        f, b = _rmse(floor[p], sim.truth[p]), _rmse(ref[p], sim.truth[p])
        assert 0.97 * b <= f <= 1.12 * b, (p, f, b)
        assert f < 0.5 * _rmse(lsq.params[p], sim.truth[p])
    assert floor["D:std"].shape == (3000,) and np.all(floor["ess"] >= 1)


def test_empirical_floor_leaves_each_voxels_own_truth_out():
    """Noise-free signals: with its own truth among the atoms each voxel would be recovered
    exactly; left out (and no kernel copies), the estimate rests on other voxels' truth."""
    sim = simulate("paper-msdki", "clinical", snr=1e6, n_voxels=200, seed=2)
    with torch.no_grad():
        clean = get_model("msdki").forward(
            {k: torch.as_tensor(v, dtype=torch.float64) for k, v in sim.truth.items()},
            sim.acquisition).numpy()
    floor = empirical_floor(clean, sim.acquisition, "msdki", sim.truth, 1e-3, copies=1)
    assert np.all(np.abs(floor["D"] - sim.truth["D"]) > 1e-6)
    assert np.median(floor["ess"]) < 1.5  # the one nearest other atom, mostly


@pytest.mark.parametrize("preset,param", [("paper-msdki", "D"), ("ball-stick", "f")])
def test_rician_floor_agrees_with_the_direct_bessel_sum(preset, param):
    """MSDKI's shells are tabulated per voxel, ball-stick's Bessel term goes through a
    separable approximation: both give the estimate of the element-wise sum."""
    sim = simulate(preset, "clinical", snr=15, noise="rician", n_voxels=400, seed=4)
    from mixmap.evaluation import floor as floor_mod

    model = sim.preset.model
    fast = empirical_floor(sim.signals, sim.acquisition, model, sim.truth, sim.sigma,
                           "rician", copies=1)
    term = floor_mod._RicianTerm
    try:  # every column summed directly
        floor_mod._RicianTerm = _direct_term
        slow = empirical_floor(sim.signals, sim.acquisition, model, sim.truth, sim.sigma,
                               "rician", copies=1)
    finally:
        floor_mod._RicianTerm = term
    assert np.max(np.abs(fast[param] - slow[param])) < 0.02
    assert _rmse(fast[param], sim.truth[param]) == pytest.approx(
        _rmse(slow[param], sim.truth[param]), rel=0.02)


def _direct_term(S, sigma):
    def term(x):
        z = (x.float()[:, None, :] * S.float()[None]) / sigma**2
        return torch.log(torch.special.i0e(z)).sum(-1, dtype=torch.float64)

    return term


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def scan_dir(brain, tmp_path_factory):
    d = tmp_path_factory.mktemp("scan")
    write_simulation(brain, d)
    return d


def test_simulate_like_fit_and_evaluate_with_the_floor(scan_dir, tmp_path):
    ph = tmp_path / "ph"
    r = _run("simulate", ph, "--like", scan_dir / "dwi.nii.gz", "--bvals",
             scan_dir / "dwi.bval", "--bvecs", scan_dir / "dwi.bvec", "--mask",
             scan_dir / "mask.nii.gz", "--model", "msdki", "--snr", "15", "--noise", "rician")
    assert r.exit_code == 0, r.output
    assert "white-matter-like" in r.output and "b0 SNR 15.0" in r.output
    info = json.loads((ph / "simulation.json").read_text())
    assert info["preset"] is None and info["model"] == "msdki" and info["kind"] == "phantom"
    assert info["cluster_names"] == list(CLASS_NAMES)
    import nibabel as nib

    assert np.allclose(nib.load(ph / "dwi.nii.gz").affine, nib.load(scan_dir / "dwi.nii.gz")
                       .affine)
    out = tmp_path / "fit"
    r = _run("fit", ph / "dwi.nii.gz", "--bvals", ph / "dwi.bval", "--bvecs", ph / "dwi.bvec",
             "--mask", ph / "mask.nii.gz", "--model", "msdki", "--method", "lsq", "--out",
             out, "--quiet")
    assert r.exit_code == 0, r.output
    r = _run("evaluate", out, "--truth", ph, "--out", tmp_path / "report.json")
    assert r.exit_code == 0, r.output
    assert "floor RMSE" in r.output and "csf-like" in r.output
    report = json.loads((tmp_path / "report.json").read_text())
    floor, fit = report["empirical_floor"], report["metrics"]
    assert report["bayes_reference"] is None
    for p in ("D", "K"):
        assert floor[p]["all"]["rmse"] < fit[p]["all"]["rmse"]


def test_simulate_like_refuses_missing_files_with_one_line(scan_dir, tmp_path):
    r = _run("simulate", tmp_path / "ph", "--like", scan_dir / "dwi.nii.gz", "--bvals",
             scan_dir / "dwi.bval", "--bvecs", scan_dir / "dwi.bvec")
    assert r.exit_code == 2
    assert "--mask" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "ph").exists()
    r = _run("simulate", tmp_path / "ph", "--like", scan_dir / "dwi.nii.gz", "--bvals",
             scan_dir / "dwi.bval", "--bvecs", scan_dir / "dwi.bvec", "--mask",
             scan_dir / "mask.nii.gz", "--max-b", "10")
    assert r.exit_code == 2 and "--max-b" in r.output
    assert not (tmp_path / "ph").exists()


def test_smoothing_never_invents_a_rising_signal():
    """A smoothed truth whose signal rises above S0 where the fit's did not (a kurtosis of one
    neighbour with the diffusivity of another) falls back to the fit in that voxel only."""
    from mixmap.models import get_model
    from mixmap.simulation.phantom import keep_physical

    m = get_model("msdki")
    acq = m.example_acquisition()
    fitted = {"S0": np.array([1.0, 1.0]), "D": np.array([1.0, 0.8]), "K": np.array([0.5, 1.0])}
    smoothed = {"S0": np.array([1.0, 1.0]), "D": np.array([1.0, 0.8]),
                "K": np.array([3.0, 1.1])}
    kept, n = keep_physical(m, smoothed, fitted, acq)
    assert n == 1
    assert kept["K"].tolist() == [0.5, 1.1] and kept["D"].tolist() == [1.0, 0.8]
