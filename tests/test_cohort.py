"""Cohorts: several scans (a list, or a BIDS folder) fitted with one shared model, maps written
per subject in BIDS-derivative layout, and `mixmap apply` on new subjects. Scans are tiny
(150-200 voxels on the 32-volume clinical scheme), written in the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mixmap.acquisition import Acquisition
from mixmap.cli import app
from mixmap.io.discovery import find_scans
from mixmap.simulation import simulate

runner = CliRunner()
GRID = (8, 8, 4)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, command="fit") -> str:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mixmap {command}: error:"), r.output
    assert "Traceback" not in r.output
    return lines[0]


def write_scan(dwi: Path, *, seed: int, n: int = 150, scale: float = 1.0, affine=None,
               mask: Path | None = None, signals: np.ndarray | None = None) -> dict:
    """Write ``dwi`` (+ sibling .bval/.bvec, and ``mask`` if given) from a paper-msdki
    simulation; voxels fill the grid in C order, zeros elsewhere. Returns the truth volumes."""
    sim = simulate("paper-msdki", "clinical", snr=40, n_voxels=n, seed=seed)
    sig = sim.signals if signals is None else signals
    n = sig.shape[0]
    affine = np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine
    inside = np.zeros(GRID, dtype=bool)
    inside.reshape(-1)[:n] = True
    vol = np.zeros((*GRID, sig.shape[1]), np.float32)
    vol[inside] = sig * scale
    dwi.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, affine), dwi)
    stem = dwi.name[: -len(".nii.gz")]
    sim.acquisition.save_fsl(dwi.with_name(stem + ".bval"), dwi.with_name(stem + ".bvec"))
    if mask is not None:
        mask.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(inside.astype(np.uint8), affine), mask)
    truth = {k: np.full(GRID, np.nan, np.float32) for k in ("D", "K", "S0")}
    for k in truth:
        truth[k][inside] = sim.truth[k]
    truth["tissue"] = np.zeros(GRID, bool)
    truth["tissue"][inside] = sim.labels < 2
    truth["inside"], truth["affine"], truth["signals"] = inside, affine, sim.signals
    return truth


def shifted(k: int) -> np.ndarray:
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    a[:3, 3] = [-10.0 * k, 5.0 * k, 1.5]
    return a


@pytest.fixture()
def bids(tmp_path):
    return write_bids_dataset(tmp_path / "bids")


def write_bids_dataset(root: Path) -> tuple[Path, dict]:
    """sub-01 (sibling mask), sub-02 (mask in derivatives/), sub-03/ses-1 (no mask, intensities
    ×50), each with its own affine; returns (root, truth per scan)."""
    truths = {
        "sub-01": write_scan(root / "sub-01/dwi/sub-01_dwi.nii.gz", seed=1, affine=shifted(1),
                             mask=root / "sub-01/dwi/sub-01_desc-brain_mask.nii.gz"),
        "sub-02": write_scan(root / "sub-02/dwi/sub-02_dwi.nii.gz", seed=2, n=200,
                             affine=shifted(2), mask=root / "derivatives/masks/sub-02/dwi/"
                             "sub-02_desc-brain_mask.nii.gz"),
        "sub-03_ses-1": write_scan(root / "sub-03/ses-1/dwi/sub-03_ses-1_dwi.nii.gz", seed=3,
                                   scale=50.0, affine=shifted(3)),
    }
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.8.0"}')
    return root, truths


def map_path(out: Path, entities: str, param: str, desc: str = "", model: str = "msdki"
             ) -> Path:
    sub, *rest = entities.split("_")
    folder = out / sub / (rest[0] if rest else "") / "dwi"
    return folder / (f"{entities}_model-{model}_param-{param}"
                     + (f"_desc-{desc}" if desc else "") + "_dwimap.nii.gz")


def test_find_scans_siblings_masks_and_mask_pattern(bids):
    root, _ = bids
    scans = find_scans([root])
    assert [s.entities for s in scans] == ["sub-01", "sub-02", "sub-03_ses-1"]
    assert [s.folder for s in scans] == ["sub-01/dwi", "sub-02/dwi", "sub-03/ses-1/dwi"]
    assert scans[0].bvals == root / "sub-01/dwi/sub-01_dwi.bval"
    assert scans[0].mask == root / "sub-01/dwi/sub-01_desc-brain_mask.nii.gz"
    assert scans[1].mask == root / "derivatives/masks/sub-02/dwi/sub-02_desc-brain_mask.nii.gz"
    assert scans[2].mask is None
    # a pattern replaces the search; a missing mask it names is an error, not "no mask"
    for sub in ("sub-01", "sub-03"):
        shutil.copy(scans[0].mask, root / f"m-{sub}.nii.gz")
    pattern = "{root}/m-{sub}.nii.gz"
    with pytest.raises(ValueError, match="m-sub-02.nii.gz: mask of .* not found"):
        find_scans([root], mask_pattern=pattern)
    shutil.copy(scans[0].mask, root / "m-sub-02.nii.gz")
    got = find_scans([root], mask_pattern=pattern)
    assert [s.mask for s in got] == [root / f"m-sub-0{i}.nii.gz" for i in (1, 2, 3)]
    # for a list of files, {root} is the scan's folder; a relative pattern starts there too
    got = find_scans([root / "sub-01/dwi/sub-01_dwi.nii.gz"], mask_pattern="../../m-{sub}.nii.gz")
    assert got[0].mask.resolve() == (root / "m-sub-01.nii.gz").resolve()


def test_bids_cohort_lsq_writes_each_subject_in_its_folder(bids, tmp_path):
    root, truths = bids
    out = tmp_path / "maps"
    r = run("fit", root, "--method", "lsq", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    acq = Acquisition.from_fsl(root / "sub-01/dwi/sub-01_dwi.bval",
                               root / "sub-01/dwi/sub-01_dwi.bvec")
    summary = json.loads((out / "cohort.json").read_text())
    assert [s["Entities"] for s in summary["Subjects"]] == list(truths)
    assert [s["NumberOfVoxels"] for s in summary["Subjects"]] == [150, 200, 150]
    assert summary["AcquisitionFingerprint"] == acq.fingerprint()
    assert summary["Method"] == "lsq" and summary["TrainedModel"] is None
    assert summary["Subjects"][2]["Mask"] is None
    assert summary["Subjects"][2]["SignalScale"] == pytest.approx(
        50 * summary["Subjects"][0]["SignalScale"], rel=0.2)
    assert not (out / "model-msdki_method-lsq").exists()
    for entities, truth in truths.items():
        img = nib.load(map_path(out, entities, "D"))
        np.testing.assert_array_equal(img.affine, truth["affine"])
        d = img.get_fdata()
        assert np.isnan(d[~truth["inside"]]).all() and np.isfinite(d[truth["inside"]]).all()
        t = truth["tissue"]
        assert np.sqrt(np.mean((d[t] - truth["D"][t]) ** 2)) < 0.12, entities
        s0 = nib.load(map_path(out, entities, "S0")).get_fdata()
        ratio = np.median(s0[t] / truth["S0"][t])
        assert ratio == pytest.approx(50.0 if entities.endswith("ses-1") else 1.0, rel=0.05)
        assert map_path(out, entities, "D", "std").exists()
        side = json.loads(map_path(out, entities, "D").with_suffix("").with_suffix(".json")
                          .read_text())
        assert side["Cohort"] == "cohort.json" and side["Units"] == "µm²/ms"
    # the pooled fit gives each scan the maps a fit of that scan alone gives (rows split back
    # in the right order, S0 in the scan's own units)
    alone = tmp_path / "alone"
    scan3 = root / "sub-03/ses-1/dwi/sub-03_ses-1_dwi"
    r = run("fit", f"{scan3}.nii.gz", "--bvals", f"{scan3}.bval", "--bvecs", f"{scan3}.bvec",
            "--out", alone, "--quiet")
    assert r.exit_code == 0, r.output
    inside = truths["sub-03_ses-1"]["inside"]
    tissue = truths["sub-03_ses-1"]["tissue"]
    for param in ("D", "K", "S0"):
        a = nib.load(alone / f"sub-03_ses-1_model-msdki_param-{param}_dwimap.nii.gz").get_fdata()
        b = nib.load(map_path(out, "sub-03_ses-1", param)).get_fdata()
        # Where the data determine the fit (tissue; S0 everywhere) the maps agree. CSF-like
        # voxels lie on a flat D-K ridge: the pool's signal scale (about 1, not exactly this
        # scan's) rounds differently and Levenberg-Marquardt may stop elsewhere on the ridge
        # (seen: 1 voxel of 150, K 0.021 alone vs 0.001 pooled, with lsq's K >= 0).
        sel = inside if param == "S0" else tissue
        np.testing.assert_allclose(b[sel], a[sel], rtol=2e-3, atol=2e-3)
        assert np.isclose(b[inside], a[inside], rtol=2e-3, atol=2e-3).mean() > 0.97


@pytest.mark.parametrize("method", ["lsq", "ssl"])
def test_shared_fit_normalises_each_scan_by_its_own_scale(tmp_path, method):
    """Two copies of one scan, the second ×3: the same D and K maps, S0 (and its std) ×3.

    lsq is voxelwise, so there this checks the row split and the S0 rescaling; ssl's network
    sees the same inputs for both copies only if each scan is divided by its own scale (pooled
    unnormalised, its K maps of the two copies differ by 4 % in the median)."""
    root = tmp_path / "bids"
    t = write_scan(root / "sub-01/dwi/sub-01_dwi.nii.gz", seed=4, n=200)
    write_scan(root / "sub-02/dwi/sub-02_dwi.nii.gz", seed=4, n=200, scale=3.0)
    out = tmp_path / "maps"
    extra = ("--epochs", "5", "--hidden", "16") if method != "lsq" else ()
    r = run("fit", root, "--method", method, "--out", out, "--quiet", *extra)
    assert r.exit_code == 0, r.output
    # tissue: CSF voxels lie on a flat ridge where the float32 rounding of the two copies'
    # inputs moves lsq's solution by ~1e-3
    tissue = t["tissue"]
    descs = ("", "std") if method == "lsq" else ("",)
    for param, factor in (("D", 1), ("K", 1), ("S0", 3)):
        for desc in descs:
            a = nib.load(map_path(out, "sub-01", param, desc)).get_fdata()[tissue]
            b = nib.load(map_path(out, "sub-02", param, desc)).get_fdata()[tissue]
            tol = 3e-3 if method == "lsq" else 1e-4
            np.testing.assert_allclose(b, factor * a, rtol=tol, atol=tol * np.abs(a).mean(),
                                       err_msg=f"{param} {desc}")
    sides = [json.loads(map_path(out, s, "D").parent.joinpath(f"{s}_model-msdki_fit.json")
                        .read_text()) for s in ("sub-01", "sub-02")]
    assert sides[1]["NoiseSigma"] == pytest.approx(3 * sides[0]["NoiseSigma"], rel=1e-4)


def test_learned_cohort_saves_one_model_and_apply_maps_new_subjects(bids, tmp_path):
    root, truths = bids
    out = tmp_path / "maps"
    r = run("fit", root, "--method", "vae-gmm", "--epochs", "4", "--hidden", "16", "--out", out,
            "--quiet")
    assert r.exit_code == 0, r.output
    model_dir = out / "model-msdki_method-vae-gmm"
    assert (model_dir / "weights.safetensors").exists()
    assert (out / "cohort_model-msdki_loss.csv").read_text().startswith("epoch")
    assert not list(out.glob(".mixmap-checkpoint-*")) and not list(out.glob(".mixmap-tmp*"))
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["TrainedModel"] == "model-msdki_method-vae-gmm"
    assert summary["NumberOfVoxels"] == 500
    for s in summary["Subjects"]:
        side = json.loads((out / s["Maps"] / f"{s['Entities']}_model-msdki_fit.json").read_text())
        assert side["NoiseSigma"] == pytest.approx(
            summary["NoiseSigmaNormalised"] * s["SignalScale"], rel=1e-4)
        # the subject's own load, then the phases of the shared fit that made its maps
        assert list(side["Seconds"]) == ["load", "prepare", "train", "empirical_bayes", "maps"]
    for entities, truth in truths.items():
        assert map_path(out, entities, "cluster").exists()
        img = nib.load(map_path(out, entities, "D"))
        np.testing.assert_array_equal(img.affine, truth["affine"])
        assert np.isfinite(img.get_fdata()[truth["inside"]]).all()

    new = tmp_path / "new"
    t4 = write_scan(new / "sub-04/dwi/sub-04_dwi.nii.gz", seed=5, affine=shifted(4),
                    mask=new / "sub-04/dwi/sub-04_mask.nii.gz")
    t5 = write_scan(new / "sub-05/ses-2/dwi/sub-05_ses-2_dwi.nii.gz", seed=6, scale=7.0)
    applied = tmp_path / "applied"
    r = run("apply", model_dir, new, "--out", applied, "--quiet")
    assert r.exit_code == 0, r.output
    for entities, t in (("sub-04", t4), ("sub-05_ses-2", t5)):
        img = nib.load(map_path(applied, entities, "D"))
        np.testing.assert_array_equal(img.affine, t["affine"])
        d = img.get_fdata()
        assert np.isnan(d[~t["inside"]]).all() and np.isfinite(d[t["inside"]]).all()
        s0 = nib.load(map_path(applied, entities, "S0")).get_fdata()[t["tissue"]]
        assert np.median(s0 / t["S0"][t["tissue"]]) == pytest.approx(
            7.0 if entities == "sub-05_ses-2" else 1.0, rel=0.1)
    side = json.loads((applied / "sub-04/dwi/sub-04_model-msdki_param-D_dwimap.json").read_text())
    assert side["TrainedModel"] == str(model_dir)
    fit_side = json.loads((applied / "sub-04/dwi/sub-04_model-msdki_fit.json").read_text())
    assert list(fit_side["Seconds"]) == ["load", "prepare", "maps"]
    r = run("apply", model_dir, new, "--out", applied)
    assert "already holds msdki maps" in one_line_error(r, "apply")
    assert run("apply", model_dir, new, "--out", applied, "--force", "--quiet").exit_code == 0


def test_list_of_scans_with_one_gradient_table_for_all(tmp_path):
    flat = tmp_path / "scans"
    t1 = write_scan(flat / "sub-01_dwi.nii.gz", seed=7, mask=flat / "sub-01_mask.nii.gz")
    t2 = write_scan(flat / "sub-02_run-2_dwi.nii.gz", seed=8, affine=shifted(5))
    shutil.copy(flat / "sub-01_dwi.bval", tmp_path / "all.bval")
    shutil.copy(flat / "sub-01_dwi.bvec", tmp_path / "all.bvec")
    for f in flat.glob("*.bv*"):
        f.unlink()  # only the shared gradient files are left
    out = tmp_path / "maps"
    r = run("fit", flat / "sub-01_dwi.nii.gz", flat / "sub-02_run-2_dwi.nii.gz", "--bvals",
            tmp_path / "all.bval", "--bvecs", tmp_path / "all.bvec", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    a = nib.load(out / "sub-01/dwi/sub-01_model-msdki_param-K_dwimap.nii.gz")
    b = nib.load(out / "sub-02/dwi/sub-02_run-2_model-msdki_param-K_dwimap.nii.gz")
    np.testing.assert_array_equal(b.affine, t2["affine"])
    assert np.isfinite(a.get_fdata()[t1["inside"]]).all()
    assert np.isnan(b.get_fdata()[~t2["inside"]]).all()
    # the same command again is refused before fitting, and --force overwrites
    r = run("fit", flat / "sub-01_dwi.nii.gz", flat / "sub-02_run-2_dwi.nii.gz", "--bvals",
            tmp_path / "all.bval", "--bvecs", tmp_path / "all.bvec", "--out", out)
    assert "already holds msdki maps" in one_line_error(r)


def test_different_acquisitions_are_refused_naming_the_file(bids, tmp_path):
    root, _ = bids
    bval = root / "sub-02/dwi/sub-02_dwi.bval"
    b = np.loadtxt(bval)
    b[b == b.max()] = 2500
    np.savetxt(bval, b[None], fmt="%g")
    out = tmp_path / "maps"
    line = one_line_error(run("fit", root, "--method", "vae", "--epochs", "2", "--out", out))
    assert f"{bval}: acquisition of sub-02_dwi.nii.gz" in line
    assert "differs from sub-01_dwi.bval" in line and "separate `mixmap fit`" in line
    assert not out.exists()


def test_bad_cohort_input_gives_one_line_and_writes_nothing(bids, tmp_path):
    root, _ = bids
    out = tmp_path / "maps"
    empty = tmp_path / "empty"
    (empty / "sub-01/anat").mkdir(parents=True)
    line = one_line_error(run("fit", empty, "--out", out))
    assert "no sub-*/[ses-*/]dwi/*_dwi.nii.gz found" in line
    s1 = root / "sub-01/dwi/sub-01_dwi.nii.gz"
    s2 = root / "sub-02/dwi/sub-02_dwi.nii.gz"
    line = one_line_error(run("fit", s1, s2, "--mask", root / "sub-01/dwi/"
                              "sub-01_desc-brain_mask.nii.gz", "--out", out))
    assert "one mask for several scans is ambiguous" in line
    assert "a folder among several inputs" in one_line_error(run("fit", root, s1, "--out", out))
    assert "same entities (sub-01)" in one_line_error(run("fit", s1, s1, "--out", out))
    plain = tmp_path / "dwi.nii.gz"
    shutil.copy(s1, plain)
    assert "not a BIDS name" in one_line_error(run("fit", plain, s1, "--out", out))
    assert "(or an MRtrix --grad table) for a single scan" in one_line_error(
        run("fit", s1, "--out", out))
    # a subject that fails late in the checks (its mask is on another grid): no subject's maps
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), np.eye(4)),
             root / "sub-03/ses-1/dwi/sub-03_ses-1_mask.nii.gz")
    line = one_line_error(run("fit", root, "--out", out))
    assert "sub-03_ses-1_mask.nii.gz: mask grid (3, 3, 3) does not match" in line
    assert not out.exists()
    (root / "sub-02/dwi/sub-02_dwi.bval").unlink()
    line = one_line_error(run("fit", root, "--out", out))
    assert "sub-02_dwi.bval: not found beside sub-02_dwi.nii.gz" in line
    assert not out.exists()


def test_large_cohort_is_streamed_one_scan_at_a_time(bids, tmp_path, monkeypatch):
    """Above --train-voxels the cohort is never loaded whole: the model trains on an equal
    share of each scan, then each scan is mapped in turn with the trained model, exactly as
    `mixmap apply` maps it; least squares fits each scan on its own, as in a pooled fit."""
    import mixmap.cohort as co

    root, truths = bids

    def refuse(*a, **k):
        raise AssertionError("a streamed cohort must not load all scans at once")

    monkeypatch.setattr(co, "load_cohort", refuse)
    out = tmp_path / "maps"
    r = run("fit", root, "--method", "vae-gmm", "--epochs", "4", "--hidden", "16",
            "--train-voxels", "120", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["Streamed"] is True and summary["TrainingVoxels"] == 120
    seconds = [json.loads((out / s["Maps"] / f"{s['Entities']}_model-msdki_fit.json")
                          .read_text())["Seconds"] for s in summary["Subjects"]]
    assert all(list(t) == ["load", "prepare", "maps"] for t in seconds)  # each scan's own
    assert [s["NumberOfVoxels"] for s in summary["Subjects"]] == [150, 200, 150]
    model_dir = out / "model-msdki_method-vae-gmm"
    again = tmp_path / "again"
    assert run("apply", model_dir, root, "--out", again, "--quiet").exit_code == 0
    for entities, truth in truths.items():
        a = nib.load(map_path(out, entities, "D")).get_fdata()
        b = nib.load(map_path(again, entities, "D")).get_fdata()
        assert np.isfinite(a[truth["inside"]]).all()
        np.testing.assert_allclose(a[truth["inside"]], b[truth["inside"]], rtol=1e-5)
    # least squares: streamed and pooled give the same maps
    streamed, pooled = tmp_path / "lsq-s", tmp_path / "lsq-p"
    assert run("fit", root, "--train-voxels", "100", "--out", streamed, "--quiet").exit_code == 0
    # each scan fitted on its own: no cohort-wide (normalised) noise level to report
    assert json.loads((streamed / "cohort.json").read_text())["NoiseSigmaNormalised"] is None
    side = json.loads((streamed / "sub-02/dwi/sub-02_model-msdki_fit.json").read_text())
    assert list(side["Seconds"]) == ["load", "fit"]
    monkeypatch.undo()
    assert run("fit", root, "--out", pooled, "--quiet").exit_code == 0
    for entities, truth in truths.items():
        for param in ("D", "S0"):
            a = nib.load(map_path(streamed, entities, param)).get_fdata()[truth["tissue"]]
            b = nib.load(map_path(pooled, entities, param)).get_fdata()[truth["tissue"]]
            np.testing.assert_allclose(a, b, rtol=3e-3)
    r = run("fit", root / "sub-01/dwi/sub-01_dwi.nii.gz", "--bvals",
            root / "sub-01/dwi/sub-01_dwi.bval", "--bvecs", root / "sub-01/dwi/sub-01_dwi.bvec",
            "--train-voxels", "10", "--out", tmp_path / "one")
    assert "--train-voxels is for several scans" in one_line_error(r)


def test_tensor_cohort_and_apply_write_the_derived_maps(bids, tmp_path):
    """A tensor in the latent space through a cohort and apply: FA, MD and V1 for every
    subject, the Cholesky factor nowhere."""
    root, truths = bids
    out = tmp_path / "maps"
    r = run("fit", root, "--model", "dti", "--method", "vae", "--epochs", "3", "--hidden", "16",
            "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    for entities, truth in truths.items():
        fa = nib.load(map_path(out, entities, "fa", model="dti")).get_fdata()[truth["inside"]]
        assert np.isfinite(fa).all() and (fa >= 0).all() and (fa <= 1).all()
        assert map_path(out, entities, "md", "std", model="dti").exists()
        assert nib.load(map_path(out, entities, "v1", model="dti")).shape[-1] == 3
    assert not list(out.rglob("*param-L*"))
    applied = tmp_path / "applied"
    r = run("apply", out / "model-dti_method-vae", root, "--out", applied, "--quiet")
    assert r.exit_code == 0, r.output
    for entities in truths:
        assert map_path(applied, entities, "fa", model="dti").exists()

