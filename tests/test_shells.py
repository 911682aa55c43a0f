"""Shells that tolerate jitter: b-values a few s/mm² apart within a shell (HCP writes 5, 990,
995, ... 3010) group as one shell wherever volumes are pooled, each volume keeps its own b in
the likelihood, and IVIM's low b-values stay apart."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from mixmap.acquisition import Acquisition, hcp_scheme
from mixmap.cli import app
from mixmap.evaluation.bayes import _measurement_groups
from mixmap.fitting import LeastSquaresFitter
from mixmap.fitting.base import Scheme
from mixmap.models import get_model
from mixmap.simulation import simulate

NOMINAL = (1000.0, 2000.0, 3000.0)


def jittered(acq: Acquisition, seed: int = 0, jitter: int = 6) -> Acquisition:
    """``acq`` with every diffusion-weighted b-value moved by up to ±``jitter`` s/mm²."""
    b = acq.bvals * 1000
    rng = np.random.default_rng(seed)
    jb = np.where(b > 50, b + rng.integers(-jitter, jitter + 1, b.size), b)
    return Acquisition.from_arrays(jb, acq.bvecs, units="s/mm2")


def hcp_style_bvals(seed: int = 0) -> np.ndarray:
    """HCP-like b-values (s/mm²): 18 b=0 written as 5 (and a few 0), 90 volumes in each of
    990..1010, 1985..2015, 2980..3010 in steps of 5 with ±6 jitter, interleaved."""
    rng = np.random.default_rng(seed)
    b0 = np.r_[np.full(15, 5.0), np.zeros(3)]
    shells = [np.clip(b + rng.choice(np.arange(-15, 16, 5), 90) + rng.integers(-6, 7, 90),
                      b - 20, b + 15) for b in NOMINAL]
    bvals = np.concatenate([b0, *shells])
    return bvals[rng.permutation(bvals.size)]


def write_fsl(tmp_path, bvals: np.ndarray, bvecs: np.ndarray):
    bval, bvec = tmp_path / "dwi.bval", tmp_path / "dwi.bvec"
    np.savetxt(bval, bvals[None], fmt="%g")
    np.savetxt(bvec, bvecs.T, fmt="%.6f")
    return bval, bvec


def test_hcp_style_jittered_file_groups_into_four_shells(tmp_path):
    bvals = hcp_style_bvals()
    dirs = np.random.default_rng(1).standard_normal((bvals.size, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    acq = Acquisition.from_fsl(*write_fsl(tmp_path, bvals, dirs))
    assert np.unique(acq.bvals).size > 20  # the file really is jittered
    shells = acq.shells()
    assert [s.n for s in shells] == [18, 90, 90, 90]
    np.testing.assert_allclose([s.bval * 1000 for s in shells], [0, *NOMINAL], atol=10)
    for s, nominal in zip(shells[1:], NOMINAL, strict=True):
        members = bvals[list(s.indices)]
        assert np.all(np.abs(members - nominal) <= 30)
    assert acq.n_b0 == 18 and sorted(shells[0].indices) == list(np.flatnonzero(bvals < 50))


def test_likelihood_keeps_each_volumes_b_and_starts_use_shells():
    """The exact reduction pools equal b-values only (its b are the file's own); the shell
    level (least-squares starts, empirical-Bayes grid) has one column per shell at its mean."""
    acq = jittered(hcp_scheme())
    model = get_model("msdki")
    scheme = Scheme.build(model, acq, reduce=True, device="cpu")
    np.testing.assert_allclose(np.sort(scheme.work.bvals), np.unique(acq.bvals), rtol=1e-12)
    shells = scheme.by_shell
    assert shells is not scheme and shells.work.n == 4
    assert shells.weights.tolist() == [18.0, 90.0, 90.0, 90.0]
    np.testing.assert_allclose(shells.work.bvals, [s.bval for s in acq.shells()])
    clean = Scheme.build(model, hcp_scheme(), reduce=True, device="cpu")
    assert clean.by_shell is clean and clean.work.n == 4


def _cluster_rmse(res, sim) -> list[float]:
    err = res.params["D"] - sim.truth["D"]
    return [float(np.sqrt(np.mean(err[sim.labels == c] ** 2)))
            for c in range(len(sim.preset.clusters))]


def test_lsq_msdki_as_good_on_jittered_shells():
    """Same truth and noise, signals simulated on the jittered b: the per-cluster D error
    stays within 10 % of the clean scheme's (CSF-like: 0.42 -> 1.05 µm²/ms before)."""
    clean = simulate("paper-msdki", "hcp", snr=20, n_voxels=2000, seed=1)
    jit = simulate("paper-msdki", jittered(clean.acquisition), snr=20, n_voxels=2000, seed=1)
    np.testing.assert_array_equal(jit.truth["D"], clean.truth["D"])
    assert not np.array_equal(jit.signals, clean.signals)
    r_clean = _cluster_rmse(LeastSquaresFitter("msdki").fit(clean.signals, clean.acquisition),
                            clean)
    r_jit = _cluster_rmse(LeastSquaresFitter("msdki").fit(jit.signals, jit.acquisition), jit)
    for c, (a, b) in enumerate(zip(r_clean, r_jit, strict=True)):
        assert abs(b - a) <= 0.1 * a, f"cluster {c}: D RMSE {b:.3f} jittered vs {a:.3f} clean"


def test_bayes_reference_groups_the_same_with_jitter():
    model = get_model("msdki")
    acq = hcp_scheme()
    clean = [g.indices for g in _measurement_groups(model, acq)]
    assert len(clean) == 4
    assert [g.indices for g in _measurement_groups(model, jittered(acq))] == clean


IVIM_B = [0, 0, 10, 20, 30, 50, 80, 100, 150, 200, 400, 600, 800, 1000]


def test_ivim_low_b_values_stay_apart():
    acq = Acquisition.from_arrays(np.array(IVIM_B, float), None, units="s/mm2")
    assert [round(s.bval * 1000) for s in acq.shells()] == sorted(set(IVIM_B))
    # a scheme of low b-values only has enough distinct ones for IVIM
    low = Acquisition.from_arrays(np.array([0, 0, 10, 20, 30, 80], float), None,
                                  units="s/mm2")
    get_model("ivim").check_acquisition(low)
    # b0 volumes written as b=5 still pool with b=0 and stay reference volumes
    b5 = Acquisition.from_arrays(np.array([0, 5, 5, 10, 20, 1000, 1003], float), None,
                                 units="s/mm2")
    assert [s.n for s in b5.shells()] == [3, 1, 1, 2]
    assert b5.n_b0 == 5


@pytest.fixture()
def jittered_scan(tiny_msdki_dir, tmp_path):
    """The tiny simulated scan with its b-values jittered by ±6 s/mm² (b=0 written as 5)."""
    b = np.loadtxt(tiny_msdki_dir / "dwi.bval")
    rng = np.random.default_rng(3)
    jb = np.where(b > 50, b + rng.integers(-6, 7, b.size), 5.0)
    bval = tmp_path / "jittered.bval"
    np.savetxt(bval, jb[None], fmt="%g")
    return tiny_msdki_dir, bval, jb


def test_check_names_the_grouping(jittered_scan):
    d, bval, jb = jittered_scan
    r = CliRunner().invoke(app, ["check", str(d / "dwi.nii.gz"), "--bvals", str(bval),
                                 "--bvecs", str(d / "dwi.bvec"), "--mask",
                                 str(d / "mask.nii.gz")])
    assert r.exit_code == 0, r.output
    assert "grouped into 4 shells" in r.output
    for nominal in NOMINAL:
        members = jb[np.abs(jb - nominal) < 50]
        line = (f"shell b≈{round(members.mean())} s/mm² ({members.min():g}–{members.max():g}, "
                f"{members.size} volumes)")
        assert line in r.output, r.output
    assert "shell b=5 s/mm² (18 volumes, b=0 reference)" in r.output
