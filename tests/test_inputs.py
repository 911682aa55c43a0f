"""Inputs as scanners and tools write them (issue: real-world inputs): each variant of a clean
scan fits to the clean scan's maps within a stated tolerance, and the output folder is safe from
read-only and full disks and from a second run on the same folder."""

from __future__ import annotations

import errno
import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mixmap.cli import app
from mixmap.io import OutputLock
from mixmap.io.gradients import fsl_to_mrtrix, mrtrix_to_fsl, read_gradients
from mixmap.simulation import simulate, write_simulation
from mixmap.testing import left_behind, map_difference, real_world_cases

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def clean_args(d):
    return (d / "dwi.nii.gz", "--bvals", d / "dwi.bval", "--bvecs", d / "dwi.bvec", "--mask",
            d / "mask.nii.gz")


def fit(args, out, model="msdki", *extra):
    return run("fit", *args, "--model", model, "--out", out, "--quiet", *extra)


def test_real_world_inputs_fit_like_the_clean_scan(scan, tmp_path):
    clean = tmp_path / "clean"
    assert fit(clean_args(scan), clean).exit_code == 0
    cases = real_world_cases(scan, tmp_path)
    assert len(cases) == 19
    for i, case in enumerate(cases):
        out = tmp_path / f"out-{i}"
        r = fit(case.args, out)
        assert r.exit_code == 0, (case.name, r.output)
        assert "Traceback" not in r.output
        diff = map_difference(out, clean)
        assert diff <= case.tolerance, (case.name, diff, case.tolerance)


def test_a_changed_input_is_seen_by_the_comparison(scan, tmp_path):
    """The matrix's comparison can fail: other signals give other maps."""
    clean, other = tmp_path / "clean", tmp_path / "other"
    assert fit(clean_args(scan), clean).exit_code == 0
    img = nib.load(scan / "dwi.nii.gz")
    data = np.asarray(img.dataobj) * np.exp(-0.1 * np.loadtxt(scan / "dwi.bval") / 1000)
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), tmp_path / "d.nii.gz")
    args = (tmp_path / "d.nii.gz", *clean_args(scan)[1:])
    assert fit(args, other).exit_code == 0
    assert map_difference(other, clean) > 0.05


def test_qform_sform_disagreement_writes_the_sform_in_both(scan, tmp_path):
    case = next(c for c in real_world_cases(scan, tmp_path) if c.name.startswith("qform"))
    out = tmp_path / "maps"
    r = fit(case.args, out)
    assert r.exit_code == 0 and "qform and sform differ" in r.output
    src = nib.load(case.args[0])
    for m in out.glob("*_dwimap.nii.gz"):
        hdr = nib.load(m).header
        np.testing.assert_allclose(hdr.get_qform(), src.header.get_sform(), atol=1e-4)
        np.testing.assert_allclose(hdr.get_sform(), src.header.get_sform(), atol=1e-4)


def test_dropped_volumes_are_said_and_recorded(scan, tmp_path):
    img = nib.load(scan / "dwi.nii.gz")
    data = np.asarray(img.dataobj).copy()
    b = np.loadtxt(scan / "dwi.bval")
    v = np.loadtxt(scan / "dwi.bvec")
    data[..., 30] = np.nan
    data = np.concatenate([data, data[..., -1:]], -1)  # then a trace volume
    nib.save(nib.Nifti1Image(data, img.affine), tmp_path / "d.nii.gz")
    np.savetxt(tmp_path / "d.bval", np.append(b, 3000)[None], fmt="%g")
    np.savetxt(tmp_path / "d.bvec", np.concatenate([v, np.zeros((3, 1))], 1), fmt="%.6f")
    out = tmp_path / "maps"
    r = run("fit", tmp_path / "d.nii.gz", "--bvals", tmp_path / "d.bval", "--bvecs",
            tmp_path / "d.bvec", "--mask", scan / "mask.nii.gz", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert "volume 30 is empty" in r.output and "volume 288 at b > 0 without a gradient" in (
        r.output)
    rec = json.loads((out / "model-msdki_fit.json").read_text())
    assert rec["DroppedVolumes"] == {"30": "NaN or Inf",
                                     "288": "b > 0 without a direction (trace volume)"}
    assert rec["Acquisition"]["n_measurements"] == b.size - 1  # of the 289 in the file
    checked = run("check", tmp_path / "d.nii.gz", "--bvals", tmp_path / "d.bval", "--bvecs",
                  tmp_path / "d.bvec")
    assert "volume 30 left out: NaN or Inf" in checked.output


# ------------------------------------------------------------------------------ MRtrix tables
def test_mrtrix_directions_known_answers():
    g = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    # LAS storage (det < 0, FSL's own): voxel x runs to scanner -x, so FSL x = -scanner x
    np.testing.assert_allclose(mrtrix_to_fsl(g, np.diag([-2.0, 2, 2, 1])),
                               np.diag([-1.0, 1, 1]), atol=1e-12)
    # RAS storage (det > 0): FSL flips x, so again FSL x = -scanner x
    np.testing.assert_allclose(mrtrix_to_fsl(g, np.diag([2.0, 2, 2, 1])),
                               np.diag([-1.0, 1, 1]), atol=1e-12)
    # voxel axes turned 90° about z: voxel x runs along scanner y (det > 0, then x flipped)
    turned = np.array([[0, -2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    fsl = mrtrix_to_fsl(np.array([[0, 1.0, 0]]), turned)
    np.testing.assert_allclose(fsl, [[-1.0, 0, 0]], atol=1e-12)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(20, 3))
    aff = np.eye(4)
    aff[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] * [1.5, 2.0, 2.5]
    np.testing.assert_allclose(mrtrix_to_fsl(fsl_to_mrtrix(vecs, aff), aff), vecs, atol=1e-12)


def test_grad_table_gives_the_same_directions_as_fsl_files(tmp_path):
    """Ball-stick's fibre direction from an MRtrix table of an oblique scan equals the one from
    the FSL files (up to sign)."""
    sim = simulate("ball-stick", "hcp", snr=40, n_voxels=200, seed=0)
    d = tmp_path / "bs"
    write_simulation(sim, d)
    img = nib.load(d / "dwi.nii.gz")
    aff = img.affine.copy()
    t = np.deg2rad(30)
    aff[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0],
                            [0, 0, 1]]) @ aff[:3, :3]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), tmp_path / "o.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(nib.load(d / "mask.nii.gz").dataobj), aff),
             tmp_path / "m.nii.gz")
    b, v = np.loadtxt(d / "dwi.bval"), np.loadtxt(d / "dwi.bvec")
    np.savetxt(tmp_path / "o.b", np.column_stack([fsl_to_mrtrix(v.T, aff), b]), fmt="%.8f")
    grads = read_gradients(tmp_path / "o.b", None, aff)
    assert grads.acquisition.notes[0].startswith("MRtrix gradient table")
    fsl, mrt = tmp_path / "fsl", tmp_path / "mrt"
    base = (tmp_path / "o.nii.gz", "--mask", tmp_path / "m.nii.gz", "--model", "ball-stick",
            "--quiet")
    assert run("fit", *base, "--bvals", d / "dwi.bval", "--bvecs", d / "dwi.bvec", "--out",
               fsl).exit_code == 0
    r = run("fit", *base, "--grad", tmp_path / "o.b", "--out", mrt)
    assert r.exit_code == 0, r.output
    a = nib.load(next(fsl.glob("*param-n_dwimap.nii.gz"))).get_fdata()
    c = nib.load(next(mrt.glob("*param-n_dwimap.nii.gz"))).get_fdata()
    ok = np.isfinite(a).all(-1)
    assert np.abs(np.abs((a[ok] * c[ok]).sum(-1)) - 1).max() < 1e-4


def test_grad_with_bvals_is_refused(scan, tmp_path):
    r = run("fit", scan / "dwi.nii.gz", "--grad", scan / "dwi.bval", "--bvals",
            scan / "dwi.bval", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "give --grad (an MRtrix table) or --bvals" in r.output


# ------------------------------------------------------------------------------ output folder
@pytest.mark.parametrize("err, says", [(errno.ENOSPC, "(No space left on device); free some "
                                        "space"), (errno.EACCES, "(Permission denied); choose")])
def test_full_or_read_only_output_writes_nothing(scan, tmp_path, monkeypatch, err, says):
    """A disk that fills (or a folder that refuses writes) part-way through the maps: one line,
    exit 2, and not one map left (a real read-only folder cannot be made when tests run as
    root, so the write itself is made to fail)."""
    import os

    real_save, calls = nib.save, []

    def failing_save(img, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(err, os.strerror(err), str(path))
        return real_save(img, path)

    monkeypatch.setattr(nib, "save", failing_save)
    out = tmp_path / "maps"
    r = fit(clean_args(scan), out)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and str(out) in lines[0], r.output
    assert left_behind(out) == []


def test_full_disk_while_the_report_is_written_leaves_no_map(scan, tmp_path, monkeypatch):
    """The maps, the model and the report are one atomic step: a disk that fills at the
    report (written after the maps) takes the maps back too."""
    import os

    import mixmap.report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "report.html")

    monkeypatch.setattr(mixmap.report, "write_report", full)
    out = tmp_path / "maps"
    r = fit(clean_args(scan), out)
    assert r.exit_code == 2 and "No space left on device" in r.output, r.output
    assert left_behind(out) == []


def test_unwritable_output_folder_is_refused_before_the_fit(scan, tmp_path, monkeypatch):
    import os

    real_open = os.open

    def no_lock(path, *a, **k):
        if str(path).endswith(".mixmap.lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", no_lock)
    out = tmp_path / "made" / "maps"
    r = fit(clean_args(scan), out)
    assert r.exit_code == 2 and "cannot write the output (Permission denied)" in r.output
    assert not (tmp_path / "made").exists()  # the folders it made are taken back


def test_second_run_on_the_same_output_is_refused(scan, tmp_path):
    out = tmp_path / "maps"
    with OutputLock(out):  # another run holds the folder
        r = fit(clean_args(scan), out)
        assert r.exit_code == 2, r.output
        assert "another mixmap run (process" in r.output and "is writing here" in r.output
        assert left_behind(out) == [".mixmap.lock"]
    assert left_behind(out) == []
    assert fit(clean_args(scan), out).exit_code == 0
    assert ".mixmap.lock" not in left_behind(out)
