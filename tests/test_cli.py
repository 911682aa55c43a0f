"""End-to-end CLI tests on tiny NIfTI files, and the bad-input matrix: each bad input gives exit
status 2, one line on stderr naming the file and the fix, no traceback, and no partial output."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mixmap.cli import app
from mixmap.testing import bad_input_cases, interrupt_training, left_behind

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def fit_args(d, out, *extra, model="msdki", method="lsq"):
    return ("fit", d / "dwi.nii.gz", "--bvals", d / "dwi.bval", "--bvecs", d / "dwi.bvec",
            "--mask", d / "mask.nii.gz", "--model", model, "--method", method, "--out", out,
            "--quiet", *extra)


def test_models_lists_parameters():
    r = run("models")
    assert r.exit_code == 0
    assert "msdki" in r.output and "ball-stick" in r.output and "ivim" in r.output
    assert "µm²/ms" in r.output
    data = json.loads(run("models", "--json").output)
    assert data["msdki"]["parameters"][1]["name"] == "D"
    assert data["msdki"]["lsq_bounds"] == {"K": [0.0, 4.0]}
    assert "lsq fits K in [0, 4] by default" in r.output


def test_help_has_examples():
    for cmd in ("fit", "simulate", "evaluate", "check", "apply", "demo"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.output, cmd


def test_simulate_fit_writes_bids_maps_with_affine_and_nan(scan, tmp_path):
    out = tmp_path / "maps"
    r = run(*fit_args(scan, out))
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert "model-msdki_param-D_dwimap.nii.gz" in names
    assert "model-msdki_param-D_desc-std_dwimap.nii.gz" in names
    assert "model-msdki_param-D_dwimap.json" in names
    assert not [n for n in names if n.startswith(".mixmap-tmp")]
    src = nib.load(scan / "dwi.nii.gz")
    img = nib.load(out / "model-msdki_param-D_dwimap.nii.gz")
    np.testing.assert_array_equal(img.affine, src.affine)
    assert img.get_data_dtype() == np.float32
    mask = np.asarray(nib.load(scan / "mask.nii.gz").dataobj) > 0
    vol = img.get_fdata()
    assert np.isnan(vol[~mask]).all() and np.isfinite(vol[mask]).all()
    truth = nib.load(scan / "truth" / "param-D.nii.gz").get_fdata()
    tissue = (nib.load(scan / "truth" / "param-cluster.nii.gz").get_fdata() < 2) & mask
    assert np.sqrt(np.mean((vol[tissue] - truth[tissue]) ** 2)) < 0.05
    side = json.loads((out / "model-msdki_param-D_dwimap.json").read_text())
    assert side["Units"] == "µm²/ms" and side["Method"] == "lsq" and side["MixmapVersion"]


def test_bids_entities_in_output_names(scan, tmp_path):
    bids = tmp_path / "sub-01_ses-2_dwi.nii.gz"
    shutil.copy(scan / "dwi.nii.gz", bids)
    out = tmp_path / "maps"
    r = run("fit", bids, "--bvals", scan / "dwi.bval", "--bvecs", scan / "dwi.bvec",
            "--mask", scan / "mask.nii.gz", "--model", "msdki", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "sub-01_ses-2_model-msdki_param-K_dwimap.nii.gz").exists()


def test_existing_output_refused_without_force(scan, tmp_path):
    out = tmp_path / "maps"
    assert run(*fit_args(scan, out)).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = run(*fit_args(scan, out))
    assert r.exit_code == 2
    assert "already holds msdki maps" in r.output and "use --force" in r.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert run(*fit_args(scan, out, "--force")).exit_code == 0


def test_evaluate_against_truth(scan, tmp_path):
    out = tmp_path / "maps"
    assert run(*fit_args(scan, out)).exit_code == 0
    r = run("evaluate", out, "--truth", scan, "--out", tmp_path / "report.json")
    assert r.exit_code == 0, r.output
    assert "RMSE" in r.output
    # lsq writes its asymptotic sd maps; evaluate scores their coverage
    assert "within ±1.96 sd" in r.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0.0 <= report["metrics"]["D"]["all"]["coverage_95"] <= 1.0


def test_check_reports_dataset(scan):
    r = run("check", scan / "dwi.nii.gz", "--bvals", scan / "dwi.bval", "--bvecs",
            scan / "dwi.bvec", "--mask", scan / "mask.nii.gz")
    assert r.exit_code == 0, r.output
    assert "b=0 volumes: 18" in r.output and "shell b=1000 s/mm² (90 volumes)" in r.output
    assert "SNR at b=0" in r.output and "OK" in r.output


def test_check_fails_for_unsupported_model(scan, tmp_path):
    bval = tmp_path / "one.bval"
    b = np.loadtxt(scan / "dwi.bval")
    bval.write_text(" ".join(str(int(x)) if x < 1500 else "1000" for x in b))
    r = run("check", scan / "dwi.nii.gz", "--bvals", bval, "--bvecs", scan / "dwi.bvec",
            "--model", "msdki")
    assert r.exit_code == 1 and "MSDKI needs at least 2" in r.output


# ------------------------------------------------------------------------- bad-input matrix
def _write_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def test_bad_input_matrix(scan, tmp_path):
    cases = bad_input_cases(scan, tmp_path)
    assert len(cases) == 24
    for case in cases:
        r = run("fit", *case.args)
        assert r.exit_code == 2, (case.name, r.output)
        assert case.message in r.output, (case.name, r.output)
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("mixmap fit: error:"), r.output
        assert "Traceback" not in r.output
        assert left_behind(case.out) == [], case.name


def test_nan_voxels_are_masked_out_and_counted(scan, tmp_path, caplog):
    img = nib.load(scan / "dwi.nii.gz")
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0, 5] = np.nan
    data[1, 0, 0, :] = np.inf
    _write_nifti(tmp_path / "nan.nii.gz", data, img.affine)
    out = tmp_path / "maps"
    r = run("fit", tmp_path / "nan.nii.gz", "--bvals", scan / "dwi.bval", "--bvecs",
            scan / "dwi.bvec", "--mask", scan / "mask.nii.gz", "--out", out)
    assert r.exit_code == 0, r.output
    vol = nib.load(out / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    assert np.isnan(vol[0, 0, 0]) and np.isnan(vol[1, 0, 0]) and np.isfinite(vol[2, 0, 0])
    side = json.loads((out / "model-msdki_fit.json").read_text())
    assert side["DroppedVoxels"] == 2


def test_bvals_in_ms_um2_are_converted(scan, tmp_path):
    b = np.loadtxt(scan / "dwi.bval") / 1000
    np.savetxt(tmp_path / "ms.bval", b[None], fmt="%g")
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert run(*fit_args(scan, out_a)).exit_code == 0
    r = run("fit", scan / "dwi.nii.gz", "--bvals", tmp_path / "ms.bval", "--bvecs",
            scan / "dwi.bvec", "--mask", scan / "mask.nii.gz", "--out", out_b, "--quiet")
    assert r.exit_code == 0, r.output
    a = nib.load(out_a / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    bb = nib.load(out_b / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    np.testing.assert_allclose(a, bb, rtol=1e-5)


def test_simulate_cli_and_refuses_overwrite(tmp_path):
    out = tmp_path / "sim"
    r = run("simulate", out, "--preset", "ball-stick", "--n-voxels", "50", "--snr", "30",
            "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "truth" / "param-n.nii.gz").exists()
    assert nib.load(out / "truth" / "param-n.nii.gz").shape[-1] == 3
    r = run("simulate", out, "--n-voxels", "50")
    assert r.exit_code == 2 and "already exists; use --force" in r.output
    r = run("simulate", tmp_path / "x", "--preset", "nope")
    assert r.exit_code == 2 and "unknown preset" in r.output


def test_ball_stick_fit_cli_writes_direction_map(tmp_path):
    sim = tmp_path / "sim"
    assert run("simulate", sim, "--preset", "ball-stick", "--n-voxels", "100",
               "--quiet").exit_code == 0
    out = tmp_path / "maps"
    r = run(*fit_args(sim, out, model="ball-stick"))
    assert r.exit_code == 0, r.output
    n = nib.load(out / "model-ballstick_param-n_dwimap.nii.gz")
    assert n.shape[-1] == 3


def test_same_seed_gives_bit_identical_maps_and_checksums_recorded(scan, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(*fit_args(scan, a)).exit_code == 0
    assert run(*fit_args(scan, b)).exit_code == 0
    for name in ("model-msdki_param-D_dwimap.nii.gz",
                 "model-msdki_param-K_desc-std_dwimap.nii.gz"):
        va = np.asarray(nib.load(a / name).dataobj)
        vb = np.asarray(nib.load(b / name).dataobj)
        assert va.tobytes() == vb.tobytes()
    side = json.loads((a / "model-msdki_fit.json").read_text())
    assert side["InputChecksums"]["dwi"].startswith("dwi.nii.gz sha256:")
    assert side["Settings"]["seed"] == 0 and side["Settings"]["method"] == "lsq"
    # where and how long it ran: device in words, seconds of loading and fitting
    assert side["Device"].startswith("cpu (")
    assert list(side["Seconds"]) == ["load", "fit"] and all(
        v >= 0 for v in side["Seconds"].values())


@pytest.mark.parametrize("method", ["ssl", "vae", "vae-gmm"])
def test_learned_methods_fit_save_and_apply_through_the_cli(scan, tmp_path, method):
    out, again = tmp_path / "maps", tmp_path / "applied"
    fast = ("--epochs", "6", "--hidden", "16")
    r = run(*fit_args(scan, out, *fast, method=method))
    assert r.exit_code == 0, r.output
    model_dir = out / f"model-msdki_method-{method}"
    assert (model_dir / "weights.safetensors").exists()
    assert not list(out.glob(".mixmap-checkpoint-*")), "checkpoint removed after success"
    if method != "ssl":
        assert (out / "model-msdki_param-D_desc-std_dwimap.nii.gz").exists()
        assert (out / "model-msdki_loss.csv").read_text().startswith("epoch")
    if method == "vae-gmm":
        assert (out / "model-msdki_param-cluster_dwimap.nii.gz").exists()
    seconds = json.loads((out / "model-msdki_fit.json").read_text())["Seconds"]
    refit = ["empirical_bayes"] if method == "vae-gmm" else []
    assert list(seconds) == ["load", "prepare", "train", *refit, "maps"]
    # --force replaces maps and the saved model folder
    assert run(*fit_args(scan, out, *fast, "--force", method=method)).exit_code == 0
    r = run("apply", model_dir, scan / "dwi.nii.gz", "--bvals", scan / "dwi.bval", "--bvecs",
            scan / "dwi.bvec", "--mask", scan / "mask.nii.gz", "--out", again, "--quiet")
    assert r.exit_code == 0, r.output
    a = nib.load(out / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    b = nib.load(again / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    np.testing.assert_array_equal(a, b)
    seconds = json.loads((again / "model-msdki_fit.json").read_text())["Seconds"]
    assert list(seconds) == ["load", "prepare", "maps"]


def test_apply_refuses_another_acquisition(scan, tmp_path):
    out = tmp_path / "maps"
    assert run(*fit_args(scan, out, "--epochs", "3", method="vae")).exit_code == 0
    b = np.loadtxt(scan / "dwi.bval")
    b[b == 3000] = 2500
    np.savetxt(tmp_path / "other.bval", b[None], fmt="%g")
    r = run("apply", out / "model-msdki_method-vae", scan / "dwi.nii.gz", "--bvals",
            tmp_path / "other.bval", "--bvecs", scan / "dwi.bvec", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "differs from the one this model was trained on" in r.output
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_resume_is_for_learned_methods_only(scan, tmp_path):
    r = run(*fit_args(scan, tmp_path / "m", "--resume"))
    assert r.exit_code == 2 and "--resume applies to learned methods" in r.output


def test_scan_without_b0_fits_S0_freely_and_says_so(scan, tmp_path):
    img = nib.load(scan / "dwi.nii.gz")
    b = np.loadtxt(scan / "dwi.bval")
    v = np.loadtxt(scan / "dwi.bvec")
    keep = b > 0
    _write_nifti(tmp_path / "nob0.nii.gz", np.asarray(img.dataobj)[..., keep], img.affine)
    np.savetxt(tmp_path / "nob0.bval", b[keep][None], fmt="%g")
    np.savetxt(tmp_path / "nob0.bvec", v[:, keep], fmt="%g")
    args = (tmp_path / "nob0.nii.gz", "--bvals", tmp_path / "nob0.bval", "--bvecs",
            tmp_path / "nob0.bvec", "--mask", scan / "mask.nii.gz")
    r = run("check", *args)
    assert r.exit_code == 0 and "no b=0 volume: S0 is fitted freely" in r.output
    out = tmp_path / "maps"
    r = run("fit", *args, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    s0 = nib.load(out / "model-msdki_param-S0_dwimap.nii.gz").get_fdata()
    truth = nib.load(scan / "truth" / "param-S0.nii.gz").get_fdata()
    tissue = nib.load(scan / "truth" / "param-cluster.nii.gz").get_fdata() < 2
    # extrapolated to b=0 from the shells: less precise than with b=0 volumes, still unbiased
    assert np.sqrt(np.nanmean((s0[tissue] - truth[tissue]) ** 2)) < 0.1
    assert abs(np.nanmean(s0[tissue] - truth[tissue])) < 0.02


def test_cli_resume_continues_an_interrupted_training(scan, tmp_path, monkeypatch):
    from mixmap.fitting import get_fitter
    from mixmap.fitting.learned.training import TrainingCheckpoint
    from mixmap.io import load_dwi

    out, full = tmp_path / "resumed", tmp_path / "full"
    opts = ("--epochs", "8", "--hidden", "16")
    assert run(*fit_args(scan, full, *opts, method="vae-gmm")).exit_code == 0
    # The same training, interrupted after epoch 3 (what Ctrl-C leaves behind).
    data = load_dwi(scan / "dwi.nii.gz", scan / "dwi.bval", scan / "dwi.bvec",
                    scan / "mask.nii.gz")
    f = get_fitter("vae-gmm", "msdki", epochs=8, hidden=16, device="cpu", seed=0, quiet=True)
    ckpt = out / ".mixmap-checkpoint-scan-msdki-vae-gmm.pt"
    f.use_checkpoint(ckpt)
    interrupt_training(f, data.signals, data.acquisition, after_epoch=3)
    assert ckpt.exists()
    loaded = []
    load = TrainingCheckpoint.load

    def spy(self):
        state = load(self)
        loaded.append(None if state is None else int(state["epoch"]))
        return state

    monkeypatch.setattr(TrainingCheckpoint, "load", spy)
    r = run(*fit_args(scan, out, *opts, "--resume", method="vae-gmm"))
    assert r.exit_code == 0, r.output
    # interrupted in epoch 3, after the checkpoint of epoch 2 was written
    assert loaded == [2]
    assert not ckpt.exists()
    a = nib.load(out / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    b = nib.load(full / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    np.testing.assert_array_equal(a, b)


def test_refinement_and_empirical_bayes_options(scan, tmp_path):
    """--refine-steps, --eb-rounds and --no-eb-grid reach the fitter (and its sidecar); an
    option the method does not take is refused by name."""
    out = tmp_path / "maps"
    r = run(*fit_args(scan, out, "--epochs", "4", "--hidden", "16", "--refine-steps", "0",
                      "--eb-rounds", "1", "--no-eb-grid", "--precision", "bfloat16",
                      method="vae-gmm"))
    assert r.exit_code == 0, r.output
    side = json.loads((out / "model-msdki_fit.json").read_text())
    assert side["Settings"]["refine_steps"] == 0 and side["Settings"]["eb_rounds"] == 1
    assert side["Settings"]["precision"] == "bfloat16"
    assert len(side["Settings"]["empirical_bayes"]["rounds"]) == 1
    assert side["Settings"]["eb_grid"] is False
    assert "grid" not in side["Settings"]["empirical_bayes"]
    r = run(*fit_args(scan, tmp_path / "x", "--eb-rounds", "2", method="vae"))
    assert r.exit_code == 2 and "--eb-rounds does not apply to --method vae" in r.output
    assert not (tmp_path / "x").exists()
    r = run(*fit_args(scan, tmp_path / "x", "--precision", "int8", method="vae"))
    assert r.exit_code == 2 and "unknown precision 'int8'" in r.output
    assert not (tmp_path / "x").exists()


def test_lsq_bounds_option_reaches_fit_and_sidecar(scan, tmp_path):
    """MSDKI least squares keeps K >= 0 unless --bounds widens it; the sidecar records the
    ranges fitted; a learned method refuses --bounds by name."""
    default, wide = tmp_path / "default", tmp_path / "wide"
    assert run(*fit_args(scan, default)).exit_code == 0
    r = run(*fit_args(scan, wide, "--bounds", "K=-0.5,4", "--bounds", "D=0,3.5"))
    assert r.exit_code == 0, r.output
    side = json.loads((default / "model-msdki_fit.json").read_text())
    assert side["Settings"]["bounds"] == {"D": [0.0, 4.0], "K": [0.0, 4.0]}
    side = json.loads((wide / "model-msdki_fit.json").read_text())
    assert side["Settings"]["bounds"] == {"D": [0.0, 3.5], "K": [-0.5, 4.0]}
    k = nib.load(default / "model-msdki_param-K_dwimap.nii.gz").get_fdata()
    d = nib.load(wide / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    assert np.nanmin(k) >= 0 and np.nanmax(d) <= 3.5
    r = run(*fit_args(scan, tmp_path / "x", "--bounds", "K=0,4", method="vae"))
    assert r.exit_code == 2 and "--bounds does not apply to --method vae" in r.output


def test_constant_option_reaches_fit_and_sidecar(scan, tmp_path):
    """NODDI's intrinsic diffusivity set with --constant is used and recorded; an unknown
    constant or a model without constants is refused by name, and nothing is written."""
    out = tmp_path / "exvivo"
    r = run(*fit_args(scan, out, "--constant", "dpar=0.6", model="noddi"))
    assert r.exit_code == 0, r.output
    side = json.loads((out / "model-noddi_fit.json").read_text())
    assert side["Settings"]["constants"] == {"dpar": 0.6, "diso": 3.0}
    assert (out / "model-noddi_param-od_dwimap.nii.gz").exists()
    r = run(*fit_args(scan, tmp_path / "x", "--constant", "dperp=1", model="noddi"))
    assert r.exit_code == 2 and "no constant 'dperp'; its constants: dpar, diso" in r.output
    r = run(*fit_args(scan, tmp_path / "y", "--constant", "dpar=1"))
    assert r.exit_code == 2 and "model msdki has no constant 'dpar'" in r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    models = run("models")
    assert "constant dpar = 1.7 µm²/ms" in models.output


def test_map_names_are_built_and_parsed_in_one_place():
    from mixmap.io.naming import fit_json_name, map_name, parse_map_name

    name = map_name("sub-01_ses-2", "ball-stick", "D", "std")
    assert name == "sub-01_ses-2_model-ballstick_param-D_desc-std_dwimap.nii.gz"
    parts = parse_map_name(name)
    assert (parts.entities, parts.model, parts.param, parts.desc, parts.suffix) == (
        "sub-01_ses-2", "ballstick", "D", "std", "dwimap")
    assert parse_map_name(map_name("", "msdki", "K")).entities == ""
    assert map_name("sub-01", "t2", "T2") == "sub-01_model-t2_T2map.nii.gz"
    assert parse_map_name(fit_json_name("sub-01", "msdki")) is None
