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


def _txt(path: Path, arr, fmt: str = "%g") -> Path:
    np.savetxt(path, np.atleast_2d(arr), fmt=fmt)
    return path


def bad_input_cases(scan: Path, tmp: Path) -> list[BadCase]:
    """Damaged variants of a good scan folder (``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec``,
    ``mask.nii.gz``, e.g. written by ``mixmap simulate``), each with the error it must give.

    Files are made in ``tmp``; each case writes to its own ``tmp/out-<i>`` folder, which must
    stay empty or absent.
    """
    scan, tmp = Path(scan), Path(tmp)
    img = nib.load(str(scan / "dwi.nii.gz"))
    good = {"dwi": scan / "dwi.nii.gz", "bvals": scan / "dwi.bval", "bvecs": scan / "dwi.bvec",
            "mask": scan / "mask.nii.gz", "model": "msdki", "extra": ()}
    _write_damaged_files(scan / "dwi.nii.gz", tmp)
    specs = _damaged_input_specs(tmp, np.asarray(img.dataobj), img.affine,
                                 np.loadtxt(scan / "dwi.bval"), np.loadtxt(scan / "dwi.bvec"))
    specs += _bad_option_specs()
    return [_bad_case(i, name, {**good, **changes}, message, tmp)
            for i, (name, changes, message) in enumerate(specs)]


def _damaged_input_specs(tmp: Path, data: np.ndarray, aff: np.ndarray, b: np.ndarray,
                         v: np.ndarray) -> list[tuple[str, dict, str]]:
    """(name, files replacing the good ones, message) of each damaged image, gradient table
    or mask, made in ``tmp`` from the good scan's ``data``, affine ``aff``, bvals ``b`` and
    bvecs ``v`` (3, n); the files :func:`_write_damaged_files` wrote are only named here."""
    n = b.size
    neg_b = b.copy()
    neg_b[1] = -1000
    moved = aff.copy()
    moved[:3, 3] += 40
    one_shell = b.copy()
    one_shell[one_shell > 1500] = 1000
    return [
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
        ("truncated .nii.gz (download cut short)", {"dwi": tmp / "cut.nii.gz"},
         "cut.nii.gz: the image data cannot be read"),
        ("corrupt .nii.gz (bytes overwritten)", {"dwi": tmp / "corrupt.nii.gz"},
         "corrupt.nii.gz: the image data cannot be read"),
        ("empty bval file", {"bvals": tmp / "empty.bval"}, "empty.bval: file is empty"),
        ("unreadable bval (a folder)", {"bvals": tmp / "folder.bval"},
         "folder.bval: cannot be read"),
        ("every DW volume without a direction", {"bvecs": _txt(tmp / "zero.bvec", v * 0)},
         "zero.bvec: no volume at b > 0 has a gradient direction"),
        ("4-D mask of 3 volumes", {"mask": _nifti(tmp / "m3.nii.gz", np.ones(
            (*data.shape[:3], 3), np.uint8), aff)}, "m3.nii.gz: a 4-D mask of 3 volumes"),
        ("mask 40 mm away (another space)", {"mask": _nifti(tmp / "far.nii.gz", np.ones(
            data.shape[:3], np.uint8), moved)}, "far.nii.gz: its affine puts voxels up to"),
        ("MSDKI with one shell", {"bvals": _txt(tmp / "one.bval", one_shell)},
         "one.bval: MSDKI needs at least 2"),
    ]


def _bad_option_specs() -> list[tuple[str, dict, str]]:
    """(name, changed options, message) of each bad option given with the good scan."""
    return [
        ("unknown model", {"model": "dti9"}, "unknown model 'dti9'"),
        ("option of another method", {"extra": ("--epochs", "3")},
         "--epochs does not apply to --method lsq"),
        ("bounds not NAME=LOWER,UPPER", {"extra": ("--bounds", "K0,4")},
         "--bounds K0,4: write NAME=LOWER,UPPER"),
        ("bounds outside the declared range", {"extra": ("--bounds", "K=-1,4")},
         "bounds K=-1,4: give lower < upper inside K's declared range [-0.5, 4]"),
    ]


def _write_damaged_files(dwi: Path, tmp: Path) -> None:
    """Not an image, a gzip cut in half, a gzip with 64 bytes zeroed, an empty bval file and
    a folder named like one."""
    (tmp / "text.nii.gz").write_text("not an image")
    whole = dwi.read_bytes()
    (tmp / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    flipped = bytearray(whole)
    flipped[len(whole) // 2: len(whole) // 2 + 64] = bytes(64)
    (tmp / "corrupt.nii.gz").write_bytes(bytes(flipped))
    (tmp / "empty.bval").write_text("")
    (tmp / "folder.bval").mkdir(exist_ok=True)


def _bad_case(i: int, name: str, a: dict, message: str, tmp: Path) -> BadCase:
    out = tmp / f"out-{i}"
    args = [str(a["dwi"]), "--bvals", str(a["bvals"]), "--bvecs", str(a["bvecs"]),
            "--model", a["model"], "--out", str(out), "--quiet", *a["extra"]]
    if a["mask"] is not None:
        args += ["--mask", str(a["mask"])]
    return BadCase(name, tuple(args), message, out)


@dataclass(frozen=True)
class RealWorldCase:
    """An input as scanners and tools write it that must fit like the clean scan: ``args`` of
    `mixmap fit` (without "fit", ``--out`` and ``--model``), the largest relative difference
    allowed between its D and K maps and the clean input's (RMS over the mask, relative to the
    RMS of the clean map), and why that tolerance."""

    name: str
    args: tuple[str, ...]
    tolerance: float
    why: str


#: Maps of the same signals read the same way: only float rounding may differ.
SAME = 1e-4


def real_world_cases(scan: Path, tmp: Path) -> list[RealWorldCase]:
    """Variants of a clean scan folder (as for :func:`bad_input_cases`) that mixmap must fit
    to the same maps as the clean input, each within its stated tolerance. Files are made in
    ``tmp``."""
    scan, tmp = Path(scan), Path(tmp)
    img = nib.load(str(scan / "dwi.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    aff = img.affine
    b = np.loadtxt(scan / "dwi.bval")
    v = np.loadtxt(scan / "dwi.bvec")
    mask = np.asarray(nib.load(str(scan / "mask.nii.gz")).dataobj) > 0
    dwi, bval, bvec, msk = (scan / "dwi.nii.gz", scan / "dwi.bval", scan / "dwi.bvec",
                            scan / "mask.nii.gz")
    dw = b > 50
    cases: list[RealWorldCase] = []

    def case(name, tolerance, why, *, dwi_=dwi, bval_=bval, bvec_=bvec, mask_=msk, extra=()):
        grads = ("--grad", str(bval_)) if bvec_ is None else ("--bvals", str(bval_),
                                                              "--bvecs", str(bvec_))
        cases.append(RealWorldCase(name, (str(dwi_), *grads, "--mask", str(mask_), *extra),
                                   tolerance, why))

    _gradient_variants(case, tmp, data, aff, b, v, mask)
    _image_variants(case, tmp, data, aff)
    _mask_variants(case, tmp, aff, mask)
    _volume_variants(case, tmp, data, aff, dw)
    return cases


def _image_variants(case, tmp: Path, data: np.ndarray, aff: np.ndarray) -> None:
    """The NIfTI encodings of :func:`real_world_cases` (scaled int16, byte order, no gzip,
    qform/sform), added with ``case``."""
    scale = float(np.abs(data).max()) / 30000
    q = nib.Nifti1Image(np.round(data / scale).astype(np.int16), aff)
    q.header.set_slope_inter(scale, 0.0)
    nib.save(q, str(tmp / "int16.nii.gz"))
    case("int16 data with a scale factor", 0.01, "quantised to 1/30000 of the largest value",
         dwi_=tmp / "int16.nii.gz")
    big = nib.Nifti1Image(data.astype(">f4"), aff)
    nib.save(big, str(tmp / "bigendian.nii.gz"))
    case("big-endian NIfTI", SAME, "same values", dwi_=tmp / "bigendian.nii.gz")
    case("uncompressed .nii", SAME, "same values",
         dwi_=_nifti(tmp / "plain.nii", data, aff))
    odd = nib.Nifti1Image(data, aff)
    shifted = aff.copy()
    shifted[:3, 3] += 40
    odd.header.set_qform(shifted, code=1)
    odd.header.set_sform(aff, code=2)
    nib.save(odd, str(tmp / "qsform.nii.gz"))
    case("qform 40 mm from the sform", SAME, "the sform used, written to both",
         dwi_=tmp / "qsform.nii.gz")


def _mask_variants(case, tmp: Path, aff: np.ndarray, mask: np.ndarray) -> None:
    """The mask variants of :func:`real_world_cases`, added with ``case``."""
    case("probabilistic mask (0.9 in, 0.2 out)", SAME, "voxels ≥ 0.5",
         mask_=_nifti(tmp / "prob.nii.gz", np.where(mask, 0.9, 0.2).astype(np.float32), aff))
    case("4-D mask of one volume", SAME, "its one volume",
         mask_=_nifti(tmp / "mask4d.nii.gz", mask[..., None].astype(np.uint8), aff))
    case("probabilistic mask, --mask-threshold 0.8", SAME, "voxels ≥ 0.8",
         mask_=_nifti(tmp / "prob2.nii.gz", np.where(mask, 0.85, 0.6).astype(np.float32), aff),
         extra=("--mask-threshold", "0.8"))
    moved = aff.copy()
    moved[:3, 3] += 40
    case("mask 40 mm away, --ignore-mask-affine", SAME, "used voxel by voxel as asked",
         mask_=_nifti(tmp / "moved.nii.gz", mask.astype(np.uint8), moved),
         extra=("--ignore-mask-affine",))


def _volume_variants(case, tmp: Path, data: np.ndarray, aff: np.ndarray,
                     dw: np.ndarray) -> None:
    """The damaged volumes of :func:`real_world_cases` (a NaN and an all-zero diffusion-
    weighted volume), added with ``case``."""
    nan_vol = data.copy()
    nan_vol[..., int(np.flatnonzero(dw)[3])] = np.nan
    case("a NaN volume", 0.02, "dropped with a message (one DW volume fewer)",
         dwi_=_nifti(tmp / "nanvol.nii.gz", nan_vol, aff))
    zero_vol = data.copy()
    zero_vol[..., int(np.flatnonzero(dw)[5])] = 0
    case("an all-zero volume", 0.02, "dropped with a message (one DW volume fewer)",
         dwi_=_nifti(tmp / "zerovol.nii.gz", zero_vol, aff))


def _gradient_variants(case, tmp: Path, data: np.ndarray, aff: np.ndarray, b: np.ndarray,
                       v: np.ndarray, mask: np.ndarray) -> None:
    """The bval/bvec variants of :func:`real_world_cases`, added with ``case``."""
    rng = np.random.default_rng(0)
    dw = b > 50
    jitter = np.where(dw, b + rng.integers(-6, 7, b.size), b)
    case("jittered shells (b ± 6 s/mm²)", 0.02, "each volume's own b is in the physics",
         bval_=_txt(tmp / "jitter.bval", jitter))
    for low, tol in ((5, 0.02), (10, 0.04)):
        case(f"b0 volumes written as b={low}", tol,
             f"b={low} is in the physics (S0·e^(-{low / 1000:g}·D))",
             bval_=_txt(tmp / f"b{low}.bval", np.where(dw, b, float(low))))
    case("bvals as one column", SAME, "same values", bval_=_col(tmp / "col.bval", b))
    case("bvecs as 3 columns", SAME, "same values", bvec_=_col(tmp / "col.bvec", v.T))
    case("bvecs scaled by the b-value", SAME, "normalised",
         bvec_=_txt(tmp / "bscaled.bvec", v * np.where(dw, b, 0)))
    bmax = b.max()
    case("b-value scaling (one b, norms ≤ 1)", SAME, "b·|g|² = the clean b",
         bval_=_txt(tmp / "bmax.bval", np.where(dw, bmax, b)),
         bvec_=_txt(tmp / "normscaled.bvec", v / np.where(dw, np.linalg.norm(v, axis=0), 1)
                    * np.sqrt(np.where(dw, b, bmax) / bmax), "%.9f"))
    trace = np.exp(np.log(np.clip(data[..., b == b.max()], 1e-6, None)).mean(-1))
    case("a trace volume (b>0, zero bvec) appended", SAME, "dropped with a message",
         dwi_=_nifti(tmp / "trace.nii.gz", np.concatenate([data, trace[..., None]], -1), aff),
         bval_=_txt(tmp / "trace.bval", np.append(b, bmax)),
         bvec_=_txt(tmp / "trace.bvec", np.concatenate([v, np.zeros((3, 1))], 1)))
    oblique = _rotation(aff, 25.0)
    case("MRtrix .b table (--grad), oblique image", SAME, "scanner directions to image axes",
         dwi_=_nifti(tmp / "oblique.nii.gz", data, oblique),
         bval_=_mrtrix(tmp / "dwi.b", b, v, oblique), bvec_=None,
         mask_=_nifti(tmp / "oblique_mask.nii.gz", mask.astype(np.uint8), oblique))


def map_difference(maps: Path, clean: Path, params=("D", "K")) -> float:
    """The largest over ``params`` of RMS(map − clean map) / RMS(clean map) over the voxels
    both fitted; inf where a map is missing or the masks differ."""
    from mixmap.io.naming import parse_map_name

    worst = 0.0
    for p in params:
        a = [f for f in Path(maps).glob("*_dwimap.nii*") if _is_param(f, p, parse_map_name)]
        c = [f for f in Path(clean).glob("*_dwimap.nii*") if _is_param(f, p, parse_map_name)]
        if len(a) != 1 or len(c) != 1:
            return float("inf")
        x = np.asarray(nib.load(str(a[0])).dataobj, np.float64)
        y = np.asarray(nib.load(str(c[0])).dataobj, np.float64)
        if x.shape != y.shape or not np.array_equal(np.isfinite(x), np.isfinite(y)):
            return float("inf")
        ok = np.isfinite(y)
        rel = np.sqrt(np.mean((x[ok] - y[ok]) ** 2)) / max(np.sqrt(np.mean(y[ok] ** 2)), 1e-12)
        worst = max(worst, float(rel))
    return worst


def _is_param(path: Path, param: str, parse) -> bool:
    name = parse(path.name)
    return name is not None and name.param == param and not name.desc


def _col(path: Path, arr) -> Path:
    """One value (or one row of a table) per line."""
    np.savetxt(path, np.asarray(arr).reshape(len(arr), -1), fmt="%.8g")
    return path


def _rotation(affine: np.ndarray, degrees: float) -> np.ndarray:
    """``affine`` turned by ``degrees`` about the scanner's z and x axes (an oblique scan)."""
    t = np.deg2rad(degrees)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = rx @ rz @ out[:3, :3]
    return out


def _mrtrix(path: Path, b: np.ndarray, bvecs: np.ndarray, affine: np.ndarray) -> Path:
    """An MRtrix ``.b`` table of the FSL gradients (3 × n bvecs) of an image of ``affine``."""
    from mixmap.io.gradients import fsl_to_mrtrix

    g = fsl_to_mrtrix(np.asarray(bvecs).T, affine)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# command_history: written by mixmap.testing\n")
        np.savetxt(fh, np.column_stack([g, b]), fmt="%.8g")
    return path


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
