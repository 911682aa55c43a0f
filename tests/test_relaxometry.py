"""A relaxometry model through the fitters: mono-exponential T2 over echo times, simulated with
three tissue-like T2 classes, recovered by least squares and by vae-gmm."""

from __future__ import annotations

import numpy as np
import pytest

from mixmap.acquisition import multi_echo_scheme
from mixmap.fitting import get_fitter

#: T2 (ms) mean and spread of white-matter-, grey-matter- and CSF-like voxels.
CLASSES = ((70.0, 5.0), (95.0, 8.0), (400.0, 30.0))


@pytest.fixture(scope="module")
def t2_scan():
    acq = multi_echo_scheme()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1500)
    t2 = np.array([rng.normal(*CLASSES[k]) for k in labels]).clip(20, 490)
    s0 = 800.0
    clean = s0 * np.exp(-acq.field("TE")[None] / t2[:, None])
    y = (clean + rng.normal(0, s0 / 50, clean.shape)).astype(np.float32)
    return y, acq, t2, labels, s0


@pytest.mark.parametrize("method, options, bounds", [
    ("lsq", {}, (3.0, 4.0, 40.0)),
    ("vae-gmm", {"epochs": 15}, (3.0, 4.0, 45.0)),
])
def test_t2_recovered_per_class(t2_scan, method, options, bounds):
    y, acq, t2, labels, s0 = t2_scan
    res = get_fitter(method, "t2", **options).fit(y, acq)
    err = res.params["T2"] - t2
    for k, bound in enumerate(bounds):
        rmse = float(np.sqrt(np.mean(err[labels == k] ** 2)))
        assert rmse < bound, (method, k, rmse)
    assert abs(float(np.median(res.params["S0"])) / s0 - 1) < 0.02


# ---------------------------------------------------------------------- every relaxometry model
RELAXOMETRY_PRESETS = {"t2": "t2-brain", "t2star": "t2star-brain", "mwf": "mwf-brain",
                       "t1-ir": "t1-ir-brain", "t1-vfa": "t1-vfa-brain"}


@pytest.mark.parametrize("model", sorted(RELAXOMETRY_PRESETS))
def test_noise_free_recovered_by_lsq(model):
    """Noise-free brain-like voxels on the preset's protocol: lsq recovers every parameter to
    1e-3 relative (MWF: where the myelin pool is there to be seen, MWF ≥ 0.05; below, its T2 is
    all but undetermined)."""
    from mixmap.simulation import simulate

    sim = simulate(RELAXOMETRY_PRESETS[model], snr=1e9, n_voxels=600, seed=2)
    res = get_fitter("lsq", model).fit(sim.signals.astype(np.float64), sim.acquisition)
    keep = sim.truth["MWF"] >= 0.05 if model == "mwf" else np.ones(600, bool)
    assert keep.sum() > 100
    for name, truth in sim.truth.items():
        rel = np.abs(res.params[name][keep] - truth[keep]) / np.abs(truth[keep])
        assert rel.max() < 1e-3, (model, name, float(rel.max()))


@pytest.mark.parametrize("model, scheme, n", [("t2", "mese-16", 2), ("mwf", "mese-16", 8),
                                              ("t1-ir", "ir-4", 3), ("t1-vfa", "vfa-2", 2)])
def test_too_few_distinct_values_refused(model, scheme, n):
    from mixmap.acquisition import SCHEMES
    from mixmap.models import UnsupportedAcquisition, get_model

    acq = SCHEMES[scheme]()
    field = get_model(model).group_field
    short = acq.subset(np.flatnonzero(acq.field(field) == acq.field(field)[0]))
    with pytest.raises(UnsupportedAcquisition, match=f"needs at least {n} distinct"):
        get_model(model).check_acquisition(short)


def test_vae_gmm_lowers_the_t2star_error_in_every_class():
    """T2* over six gradient echoes at SNR 20 (Rician): the learned prior lowers the error of
    least squares in every tissue class (the benchmark: near the Bayes floor)."""
    from mixmap.simulation import simulate

    sim = simulate("t2star-brain", "mgre-6", snr=20, noise="rician", n_voxels=2000, seed=0)
    errs = {}
    for method, opts in (("lsq", {}), ("vae-gmm", {"epochs": 30})):
        res = get_fitter(method, "t2star", **opts).fit(sim.signals, sim.acquisition)
        err = res.params["T2star"] - sim.truth["T2star"]
        errs[method] = [float(np.sqrt(np.mean(err[sim.labels == k] ** 2))) for k in range(3)]
    assert all(v < 0.8 * lsq for v, lsq in zip(errs["vae-gmm"], errs["lsq"], strict=True)), errs


# ---------------------------------------------------------------------- acquisition files
def test_field_files_detect_seconds_and_radians(tmp_path):
    from mixmap.io.fields import FieldFiles

    te = tmp_path / "te.txt"
    te.write_text("0.01 0.02 0.03\n")
    acq = FieldFiles.of(echo_times=te).read()
    np.testing.assert_allclose(acq.field("TE"), [10, 20, 30])
    assert "read as seconds" in acq.notes[0]
    ti = tmp_path / "ti.txt"
    ti.write_text("50\n400\n1100\n2500\n")  # one column, ms: kept
    np.testing.assert_allclose(FieldFiles.of(inversion_times=ti).read().field("TI"),
                               [50, 400, 1100, 2500])
    fa = tmp_path / "fa.txt"
    fa.write_text(f"{np.deg2rad(4)} {np.deg2rad(18)}")
    acq = FieldFiles.of(flip_angles=fa, repetition_time=0.015).read()
    np.testing.assert_allclose(acq.field("flip_angle"), [4, 18])
    np.testing.assert_allclose(acq.field("TR"), [15, 15])
    assert any("radians" in n for n in acq.notes) and any("seconds" in n for n in acq.notes)


def test_repetition_time_alone_is_refused():
    from mixmap.io.fields import FieldFiles

    with pytest.raises(ValueError, match="--repetition-time goes with --flip-angles"):
        FieldFiles.of(repetition_time=15.0)


# ---------------------------------------------------------------------- the command line
def _run(*args):
    from typer.testing import CliRunner

    from mixmap.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def vfa_scan(tmp_path_factory):
    d = tmp_path_factory.mktemp("vfa")
    r = _run("simulate", d / "sim", "--preset", "t1-vfa-brain", "--n-voxels", 400, "--snr",
             100, "--quiet")
    assert r.exit_code == 0, r.output
    return d / "sim"


def test_cli_fits_t1_vfa_and_writes_qmri_bids_maps(vfa_scan, tmp_path):
    import json

    import nibabel as nib

    s, out = vfa_scan, tmp_path / "maps"
    r = _run("fit", s / "dwi.nii.gz", "--flip-angles", s / "flip_angles.txt",
             "--repetition-time", 15, "--mask", s / "mask.nii.gz", "--model", "t1-vfa",
             "--out", out, "--quiet", "--no-report")
    assert r.exit_code == 0, r.output
    names = {p.name for p in out.iterdir()}
    assert {"model-t1vfa_T1map.nii.gz", "model-t1vfa_desc-std_T1map.nii.gz",
            "model-t1vfa_M0map.nii.gz"} <= names
    side = json.loads((out / "model-t1vfa_T1map.json").read_text())
    assert side["Units"] == "ms"
    fit = json.loads((out / "model-t1vfa_fit.json").read_text())
    assert set(fit["InputChecksums"]) == {"dwi", "bvals_flip_angle", "mask"}
    mask = np.asarray(nib.load(s / "mask.nii.gz").dataobj) > 0
    t1 = np.asarray(nib.load(out / "model-t1vfa_T1map.nii.gz").dataobj)[mask]
    truth = np.asarray(nib.load(s / "truth" / "param-T1.nii.gz").dataobj)[mask]
    assert np.median(np.abs(t1 - truth) / truth) < 0.05
    r = _run("evaluate", out, "--truth", s)
    assert r.exit_code == 0, r.output
    assert "| T1 | WM |" in r.output


def test_cli_check_lists_flip_angles(vfa_scan):
    s = vfa_scan
    r = _run("check", s / "dwi.nii.gz", "--flip-angles", s / "flip_angles.txt",
             "--repetition-time", 15)
    assert r.exit_code == 0, r.output
    assert "flip angles (flip_angle, deg): 6 distinct of 6 volumes" in r.output
    assert "fittable models: t1-vfa" in r.output


@pytest.mark.parametrize("extra, message", [
    (("--model", "t1-vfa"), r"t1-vfa needs repetition time \(TR\)"),
    (("--model", "t2", "--repetition-time", 15),
     r"needs echo time \(TE\) in the acquisition"),
    (("--bvals", "x.bval", "--bvecs", "x.bvec"), "not both"),
    (("--model", "t1-vfa", "--max-b", 1000), "not a diffusion scheme"),
])
def test_cli_bad_relaxometry_input_is_one_line(vfa_scan, tmp_path, extra, message):
    s, out = vfa_scan, tmp_path / "maps"
    r = _run("fit", s / "dwi.nii.gz", "--flip-angles", s / "flip_angles.txt", "--mask",
             s / "mask.nii.gz", "--out", out, "--quiet", *extra)
    assert r.exit_code == 2, r.output
    import re

    assert re.search(message, r.output), r.output
    assert "Traceback" not in r.output and not out.exists()


def test_cli_count_mismatch_names_the_file(vfa_scan, tmp_path):
    s = vfa_scan
    fa = tmp_path / "fa.txt"
    fa.write_text("4 18\n")
    r = _run("fit", s / "dwi.nii.gz", "--flip-angles", fa, "--repetition-time", 15,
             "--model", "t1-vfa", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 2
    assert f"6 volumes but {fa} has 2 values; give one value per volume" in r.output


def test_python_api_fits_a_relaxometry_array_and_saves_qmri_names(tmp_path):
    import mixmap
    from mixmap.acquisition import Acquisition

    te = np.arange(1, 17) * 10.0
    t2 = np.linspace(50, 120, 24).reshape(2, 3, 4)
    data = 1000.0 * np.exp(-te / t2[..., None])
    fit = mixmap.fit(data, Acquisition.from_fields({"TE": te}), model="t2", method="lsq")
    np.testing.assert_allclose(fit.maps["T2"], t2, rtol=1e-3)
    fit.save(tmp_path / "maps")
    assert (tmp_path / "maps" / "model-t2_T2map.nii.gz").exists()


def test_cli_apply_maps_a_relaxometry_scan_with_a_trained_model(tmp_path):
    sim, out, again = tmp_path / "sim", tmp_path / "maps", tmp_path / "again"
    assert _run("simulate", sim, "--preset", "t2-brain", "--scheme", "mese-16", "--n-voxels",
                300, "--quiet").exit_code == 0
    common = ("--echo-times", sim / "echo_times.txt", "--mask", sim / "mask.nii.gz")
    r = _run("fit", sim / "dwi.nii.gz", *common, "--model", "t2", "--method", "vae",
             "--epochs", 3, "--out", out, "--quiet", "--no-report")
    assert r.exit_code == 0, r.output
    r = _run("apply", out / "model-t2_method-vae", sim / "dwi.nii.gz", *common, "--out", again,
             "--quiet")
    assert r.exit_code == 0, r.output
    import nibabel as nib

    a, b = (np.asarray(nib.load(d / "model-t2_T2map.nii.gz").dataobj) for d in (out, again))
    np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=1e-5)
