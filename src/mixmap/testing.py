"""Test helpers shipped with the package: the bad-input matrix that the test suite and the
reliability report (``benchmarks/reliability.py``) both run through ``mixmap fit``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass(frozen=True)
class BadCase:
    name: str
    args: tuple[str, ...]  # arguments of `mixmap fit` (without "fit")
    message: str  # what the one-line error must contain
    out: Path  # the output folder the command names


def _nifti(path: Path, data, affine) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _txt(path: Path, arr) -> Path:
    np.savetxt(path, np.atleast_2d(arr), fmt="%g")
    return path


def bad_input_cases(scan: Path, tmp: Path) -> list[BadCase]:
    """Damaged variants of a good scan folder (``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec``,
    ``mask.nii.gz``, e.g. written by ``mixmap simulate``), each with the error it must give.

    Files are made in ``tmp``; each case writes to its own ``tmp/out-<i>`` folder, which must
    stay empty or absent.
    """
    scan, tmp = Path(scan), Path(tmp)
    img = nib.load(str(scan / "dwi.nii.gz"))
    data = np.asarray(img.dataobj)
    aff = img.affine
    b = np.loadtxt(scan / "dwi.bval")
    v = np.loadtxt(scan / "dwi.bvec")
    n = b.size
    good = {"dwi": scan / "dwi.nii.gz", "bvals": scan / "dwi.bval", "bvecs": scan / "dwi.bvec",
            "mask": scan / "mask.nii.gz", "model": "msdki", "extra": ()}
    (tmp / "text.nii.gz").write_text("not an image")
    neg_b = b.copy()
    neg_b[1] = -1000
    one_shell = b.copy()
    one_shell[one_shell > 1500] = 1000
    specs = [
        ("missing file", {"dwi": tmp / "nope.nii.gz"}, "nope.nii.gz: file not found"),
        ("not a NIfTI", {"dwi": tmp / "text.nii.gz"}, "not a readable NIfTI"),
        ("3-D instead of 4-D", {"dwi": _nifti(tmp / "3d.nii.gz", data[..., 0], aff)},
         "needs 4 axes"),
        ("bval count ≠ volumes", {"bvals": _txt(tmp / "short.bval", b[:-1]),
                                  "bvecs": _txt(tmp / "short.bvec", v[:, :-1])},
         f"{n} volumes but"),
        ("bvec count ≠ bval count", {"bvecs": _txt(tmp / "short2.bvec", v[:, :-1])},
         f"short2.bvec: {n - 1} gradient directions but {n}"),
        ("bvec not 3 rows/columns", {"bvecs": _txt(tmp / "two.bvec", v[:2])},
         "two.bvec: gradient directions have shape"),
        ("bvec norms far from 1", {"bvecs": _txt(tmp / "scaled.bvec", v * 3)},
         "scaled.bvec: gradient direction 18 has norm 3, not 1"),
        ("negative b", {"bvals": _txt(tmp / "neg.bval", neg_b)}, "negative b-value"),
        ("mask on another grid", {"mask": _nifti(tmp / "m.nii.gz", np.ones((3, 3, 3), np.uint8),
                                                 aff)}, "does not match the DWI grid"),
        ("empty mask", {"mask": _nifti(tmp / "e.nii.gz", np.zeros(data.shape[:3], np.uint8),
                                       aff)}, "selects no voxels"),
        ("all-zero signal", {"dwi": _nifti(tmp / "zero.nii.gz", np.zeros_like(data), aff),
                             "mask": None}, "no voxel to fit"),
        ("negative signal", {"dwi": _nifti(tmp / "negsig.nii.gz", -np.abs(data) - 1, aff)},
         "zero or negative in every fitted voxel"),
        ("MSDKI with one shell", {"bvals": _txt(tmp / "one.bval", one_shell)},
         "one.bval: MSDKI needs at least 2"),
        ("unknown model", {"model": "dti9"}, "unknown model 'dti9'"),
        ("option of another method", {"extra": ("--epochs", "3")},
         "--epochs does not apply to --method lsq"),
        ("bounds not NAME=LOWER,UPPER", {"extra": ("--bounds", "K0,4")},
         "--bounds K0,4: write NAME=LOWER,UPPER"),
        ("bounds outside the declared range", {"extra": ("--bounds", "K=-1,4")},
         "bounds K=-1,4: give lower < upper inside K's declared range [-0.5, 4]"),
    ]
    cases = []
    for i, (name, changes, message) in enumerate(specs):
        a = {**good, **changes}
        out = tmp / f"out-{i}"
        args = [str(a["dwi"]), "--bvals", str(a["bvals"]), "--bvecs", str(a["bvecs"]),
                "--model", a["model"], "--out", str(out), "--quiet", *a["extra"]]
        if a["mask"] is not None:
            args += ["--mask", str(a["mask"])]
        cases.append(BadCase(name, tuple(args), message, out))
    return cases


def left_behind(out: Path) -> list[str]:
    """Files in an output folder (hidden staging folders included)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


def interrupt_training(fitter, signals: np.ndarray, acquisition, after_epoch: int) -> None:
    """Run ``fitter.fit`` and stop it with KeyboardInterrupt (what Ctrl-C raises) right after
    epoch ``after_epoch`` has ended, leaving what an interrupted run leaves (its checkpoint).
    Fails if training finished before that epoch."""
    before = fitter.on_epoch

    def stop(row):
        if before is not None:
            before(row)
        if row["epoch"] == after_epoch:
            raise KeyboardInterrupt

    fitter.on_epoch = stop
    try:
        fitter.fit(signals, acquisition)
    except KeyboardInterrupt:
        return
    finally:
        fitter.on_epoch = before
    raise AssertionError(f"training finished before epoch {after_epoch} ended")
