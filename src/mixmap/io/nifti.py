"""Loading DWI scans: 4-D NIfTI + FSL gradient files + optional mask -> rows of masked voxels."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from mixmap.acquisition import Acquisition
from mixmap.io.fields import FieldFiles
from mixmap.io.gradients import Gradients, read_gradients

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Input that cannot be used; the message names the file and the fix."""


@dataclass
class DWIData:
    """Masked voxels of a scan, ready to fit.

    Attributes
    ----------
    signals
        (n_voxels, n_meas) float32, rows in C order of the mask's True voxels.
    mask
        3-D bool array on the DWI grid: the voxels that were fitted.
    affine, header
        Of the input image; maps are written with both.
    acquisition
        The validated gradient table.
    path
        The DWI file.
    n_dropped
        Voxels inside the given mask removed because they hold NaN or Inf.
    load_seconds
        Wall seconds :func:`load_dwi` took (None for data made in memory); fit.json's
        ``Seconds`` starts with it.
    dropped_volumes
        ``{volume index in the file: reason}`` of the volumes left out of the fit.
    """

    signals: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    acquisition: Acquisition
    path: Path
    n_dropped: int = 0
    load_seconds: float | None = None
    dropped_volumes: dict[int, str] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]


def load_image(path: str | Path, what: str = "image", *, keep_open: bool = False):
    """Open a NIfTI with a clear error for a missing, unreadable, truncated or foreign file.
    ``keep_open`` keeps one file handle for all reads through the array proxy: reading a
    .nii.gz in blocks then continues the decompression instead of restarting it from the top
    for each block."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; check the {what} path")
    try:
        return nib.load(str(path), keep_file_open=bool(keep_open))
    except PermissionError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check the {what}'s "
                         f"permissions") from None
    except Exception as exc:  # nibabel raises several types for unreadable files
        broken = _broken_gzip(path) if path.name.endswith(".gz") else ""
        if broken:
            raise InputError(f"{path}: {broken}: the file is truncated or corrupt; "
                             f"download or copy the {what} again") from None
        raise InputError(
            f"{path}: not a readable NIfTI image ({type(exc).__name__}); give a .nii or .nii.gz "
            f"{what}"
        ) from None


def _broken_gzip(path: Path) -> str:
    """Why the gzip stream of ``path`` cannot be read to its end ('' if it can, or if the
    file is not gzip at all)."""
    import gzip
    import zlib

    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return ""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        return str(exc).splitlines()[0]
    return ""


@contextmanager
def _reading(path: Path, what: str):
    """Turn a failure while reading image data into an :class:`InputError` naming the file."""
    import zlib

    try:
        yield
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: the image data cannot be read ({cause}): the file is "
                         f"truncated or corrupt; download or copy the {what} again") from None


def _read_to_end(proxy) -> None:
    """Read what is left of a compressed image after its data (the gzip trailer), so that a
    stream damaged in the middle fails its CRC check here instead of giving wrong values."""
    get = getattr(proxy, "_get_fileobj", None)  # nibabel's opener (kept open by load_image)
    if get is None:
        return
    with get() as fh:
        if getattr(fh, "name", "").endswith(".gz") or str(getattr(proxy, "file_like", "")
                                                          ).endswith(".gz"):
            while fh.read(1 << 24):
                pass


#: Voxel centres of two affines further apart than this fraction of the smallest voxel size
#: (anywhere on the grid) are different spaces.
AFFINE_TOLERANCE = 0.1


def affine_displacement(a: np.ndarray, b: np.ndarray, grid: tuple[int, ...]) -> float:
    """The largest distance (mm) between where affines ``a`` and ``b`` put the grid's corner
    voxels."""
    corners = np.array([[i, j, k, 1.0] for i in (0, grid[0] - 1) for j in (0, grid[1] - 1)
                        for k in (0, grid[2] - 1)])
    return float(np.linalg.norm(corners @ (np.asarray(a) - np.asarray(b)).T, axis=1).max())


def affine_tolerance(affine: np.ndarray) -> float:
    """:data:`AFFINE_TOLERANCE` of the smallest voxel size of ``affine``, in mm."""
    return AFFINE_TOLERANCE * float(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).min())


def _header_of(img, dwi: Path, grid: tuple[int, ...]):
    """The image's affine (sform where set, as nibabel and FSL read it) and a copy of its
    header whose qform agrees with it, so maps open in the same place in every viewer."""
    header = img.header.copy()
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is not None and sform is not None:
        shift = affine_displacement(qform, sform, grid)
        if shift > affine_tolerance(sform):
            log.warning("%s: qform and sform differ by up to %.3g mm; using the sform, and the "
                        "maps are written with it in both", dwi, shift)
            header.set_qform(sform, code=int(scode))
    return img.affine, header


def load_dwi(
    dwi: str | Path,
    bvals: str | Path | FieldFiles,
    bvecs: str | Path | None = None,
    mask: str | Path | None = None,
    *,
    mask_threshold: float | None = None,
    ignore_mask_affine: bool = False,
    max_b: float | None = None,
) -> DWIData:
    """Load a 4-D DWI and its gradient files into rows of masked voxels.

    ``bvals``/``bvecs``: FSL files, or ``bvals`` an MRtrix ``.b`` table with ``bvecs`` None
    (:func:`mixmap.io.gradients.read_gradients`), or ``bvals`` the
    :class:`~mixmap.io.fields.FieldFiles` of a relaxometry scan. The image is read in blocks of
    whole volumes through nibabel's array proxy (one pass over the file, about 64 MB at a time):
    peak memory is the masked rows plus one block. Without a mask, every voxel whose mean b=0
    signal (mean signal if the scheme has no b=0) is positive is fitted. Left out, with a
    warning and recorded in :attr:`DWIData.dropped_volumes`: trace volumes (b > 0 without a
    direction), volumes above ``max_b`` (s/mm², the volume selection of ``--max-b``) and
    volumes that are NaN/Inf in most fitted voxels or zero in all of them. Masked voxels
    with NaN or Inf in a kept volume are dropped and counted. The mask: :func:`_load_mask`
    (``mask_threshold``, ``ignore_mask_affine``).
    """
    t_start = time.perf_counter()
    dwi = Path(dwi)
    img = load_image(dwi, "DWI", keep_open=True)
    if len(img.shape) != 4:
        raise InputError(
            f"{dwi}: {len(img.shape)}-D image of shape {tuple(img.shape)}; a DWI needs 4 axes "
            f"(x, y, z, volume), one volume per b-value"
        )
    grid = tuple(int(s) for s in img.shape[:3])
    affine, header = _header_of(img, dwi, grid)
    grads = read_gradients(bvals, bvecs, affine)
    n_vol = img.shape[3]
    if grads.n_file != n_vol:
        if isinstance(bvals, FieldFiles):
            raise InputError(f"{dwi}: {n_vol} volumes but {bvals} has {grads.n_file} values; "
                             f"give one value per volume")
        raise InputError(
            f"{dwi}: {n_vol} volumes but {bvals} has {grads.n_file} "
            f"{'b-values' if bvecs is not None else 'gradient rows'}; give one b-value and one "
            f"bvec per volume"
        )
    grads = grads.at_most(max_b, bvals)
    given_mask = None if mask is None else _load_mask(
        mask, img, dwi, grid, threshold=mask_threshold, ignore_affine=ignore_mask_affine)
    b0_vols = grads.kept[grads.acquisition.b0_mask]
    with _reading(dwi, "DWI"):
        sel_mask = (given_mask if given_mask is not None
                    else _positive_voxels(img.dataobj, b0_vols, grid))
        signals = _read_rows(img.dataobj, sel_mask, grid)
        _read_to_end(img.dataobj)
    data = _kept(signals, sel_mask, grads, dwi, affine, header, masked=given_mask is not None)
    data.load_seconds = time.perf_counter() - t_start
    return data


def _kept(signals: np.ndarray, sel_mask: np.ndarray, grads: Gradients, path: Path,
          affine: np.ndarray, header, *, masked: bool) -> DWIData:
    """The :class:`DWIData` of rows ``signals`` (every volume of the file) of the voxels
    ``sel_mask``: empty volumes left out (:func:`_drop_empty_volumes`), then voxels with NaN or
    Inf (counted and warned about when ``masked``: without a mask they are background), and a
    scan with nothing left to fit refused."""
    signals, acq, dropped = _drop_empty_volumes(signals, grads, path)
    finite_rows = np.isfinite(signals).all(1)
    final_mask = sel_mask.copy()
    n_bad = int((~finite_rows).sum())
    if n_bad:
        signals = signals[finite_rows]
        final_mask[sel_mask] = finite_rows
    n_dropped = n_bad if masked else 0
    if n_dropped:
        log.warning("%s: %d masked voxels hold NaN or Inf and were left out (NaN in the maps)",
                    path, n_dropped)
    _check_signals(signals, acq.b0_mask, path, masked)
    return DWIData(signals, final_mask, affine, header, acq, path, n_dropped, None, dropped)


def dwi_from_array(data: np.ndarray, acquisition: Acquisition, mask: np.ndarray | None = None,
                   *, affine: np.ndarray | None = None, header=None, source: str = "array"
                   ) -> DWIData:
    """A scan held in memory as :class:`DWIData`, by :func:`load_dwi`'s rules: ``data``
    (x, y, z, m) (or (n, m) rows of voxels); ``mask`` a 3-D array on its grid (voxels > 0,
    None for every voxel with a positive b=0 signal); empty volumes and NaN/Inf voxels left
    out. ``affine`` (identity by default) and ``header`` are what saved maps carry; ``source``
    names the data in messages and sidecars."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[:, None, None, :]
        mask = None if mask is None else np.asarray(mask).reshape(-1, 1, 1)
    if data.ndim != 4:
        raise InputError(f"{source}: an array of shape {data.shape}; give (x, y, z, volumes) or "
                         f"(voxels, volumes)")
    grid = tuple(int(s) for s in data.shape[:3])
    if data.shape[3] != acquisition.n:
        raise InputError(f"{source}: {data.shape[3]} volumes but the acquisition has "
                         f"{acquisition.n} measurements; give one per volume")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 4 and mask.shape[3] == 1:
            mask = mask[..., 0]
        if mask.shape != grid:
            raise InputError(f"{source}: mask of shape {mask.shape} on a DWI grid {grid}; give "
                             f"a mask on the DWI grid")
        mask = np.where(np.isfinite(mask), mask, 0) > 0
        if not mask.any():
            raise InputError(f"{source}: the mask selects no voxels; give a mask of the brain")
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    hdr = nib.Nifti1Header() if header is None else header.copy()
    grads = Gradients(acquisition, np.arange(acquisition.n), acquisition.n, {})
    sel = mask if mask is not None else _positive_voxels(
        data, np.flatnonzero(acquisition.b0_mask), grid)
    return _kept(_read_rows(data, sel, grid), sel, grads, Path(source), aff, hdr,
                 masked=mask is not None)


def _drop_empty_volumes(signals: np.ndarray, grads: Gradients, dwi: Path
                        ) -> tuple[np.ndarray, Acquisition, dict[int, str]]:
    """(signals of the kept volumes, their acquisition, ``{file volume: reason}`` of all the
    volumes left out): the gradient file's trace volumes, and volumes NaN/Inf in more than
    half of the rows or zero in every row."""
    cols = signals[:, grads.kept]
    if cols.shape[0] == 0:  # nothing to judge the volumes by (refused by _check_signals)
        return cols, grads.acquisition, dict(grads.dropped)
    nonfinite = ~np.isfinite(cols)
    bad_nan = nonfinite.mean(0) > 0.5
    bad_zero = ~bad_nan & np.all((cols == 0) | nonfinite, axis=0)
    empty = bad_nan | bad_zero
    dropped = dict(grads.dropped)
    if not empty.any():
        return cols, grads.acquisition, dropped
    if empty.all():
        raise InputError(f"{dwi}: every volume is NaN, Inf or zero in the fitted voxels; check "
                         f"the image")
    for j in np.flatnonzero(empty):
        dropped[int(grads.kept[j])] = "NaN or Inf" if bad_nan[j] else "all zero"
    idx = grads.kept[empty]
    log.warning("%s: volume%s %s %s in the fitted voxels and left out of the fit (%d volumes "
                "remain)", dwi, "s" if idx.size > 1 else "", ", ".join(map(str, idx)),
                "are empty (NaN, Inf or zero)" if idx.size > 1 else "is empty (NaN, Inf or "
                "zero)", int((~empty).sum()))
    acq = grads.acquisition.subset(np.flatnonzero(~empty))
    return cols[:, ~empty], acq, dict(sorted(dropped.items()))


def _load_mask(mask: str | Path, img, dwi: Path, grid: tuple[int, ...], *,
               threshold: float | None = None, ignore_affine: bool = False) -> np.ndarray:
    """The mask file as a bool array on the DWI's ``grid``: values ≥ ``threshold``; without
    one, > 0 for a binary or label mask and ≥ 0.5 for a probabilistic one (fractions in
    [0, 1]). Refused if off-grid, 4-D with several volumes, empty, or in another space (its
    affine moves a voxel by more than :data:`AFFINE_TOLERANCE` voxel) unless
    ``ignore_affine``."""
    mimg = load_image(mask, "mask")
    mshape = tuple(int(s) for s in mimg.shape)
    if len(mshape) == 4 and mshape[3] == 1:
        mshape = mshape[:3]
    if len(mshape) == 4:
        raise InputError(f"{mask}: a 4-D mask of {mshape[3]} volumes; give one 3-D mask (e.g. "
                         f"its first volume: fslroi MASK mask3d 0 1)")
    if mshape != grid:
        raise InputError(
            f"{mask}: mask grid {mshape} does not match the DWI grid {grid} of {dwi}; "
            f"resample the mask onto the DWI"
        )
    shift = affine_displacement(mimg.affine, img.affine, grid)
    if shift > affine_tolerance(img.affine):
        if not ignore_affine:
            raise InputError(
                f"{mask}: its affine puts voxels up to {shift:.3g} mm from the DWI's ({dwi}): "
                f"another space; resample the mask onto the DWI, or pass --ignore-mask-affine "
                f"to use it voxel by voxel"
            )
        log.warning("%s: affine %.3g mm from the DWI's; used voxel by voxel "
                    "(--ignore-mask-affine)", mask, shift)
    with _reading(Path(mask), "mask"):
        values = np.asarray(mimg.dataobj, dtype=np.float64).reshape(grid)
    values = np.where(np.isfinite(values), values, 0.0)
    if threshold is None:
        fractional = np.any((values > 0) & (values < 1) & (values != np.round(values)))
        if fractional and values.max() <= 1:
            log.info("%s: a probabilistic mask (values between 0 and 1): voxels >= 0.5 fitted "
                     "(set --mask-threshold)", mask)
            threshold = 0.5
    given_mask = values >= threshold if threshold is not None else values > 0
    if not given_mask.any():
        raise InputError(f"{mask}: the mask selects no voxels"
                         f"{f' at threshold {threshold:g}' if threshold is not None else ''}; "
                         f"give a mask of the brain")
    return given_mask


def _positive_voxels(proxy, b0_vols: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """Voxels whose mean b=0 signal over volumes ``b0_vols`` (mean signal over every volume
    without them) is positive, NaN/Inf ignored: bool ``grid``."""
    n_vol = proxy.shape[3]
    ref_vols = b0_vols if len(b0_vols) else np.arange(n_vol)
    ref = np.zeros(grid, dtype=np.float64)
    for t0, t1 in _runs(ref_vols, volumes_per_block(grid)):
        block = np.asarray(proxy[..., t0:t1], dtype=np.float32)
        ref += np.where(np.isfinite(block), block, 0).sum(-1)
    return ref > 0


def _read_rows(proxy, sel_mask: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """Signals (n_sel, n_vol) float32 in C order of ``sel_mask``, every volume.

    Blocks of whole volumes are read: the volume axis is the slowest on disk, so each block is
    one contiguous run of the file and a .nii.gz is decompressed once, front to back.
    """
    n_vol = proxy.shape[3]
    n_sel = int(sel_mask.sum())
    signals = np.empty((n_sel, n_vol), dtype=np.float32)
    # Each selected voxel's place in a block flattened in the file's (Fortran) order: the
    # same rows in the same order as a boolean mask on the 4-D block, and much faster.
    flat_index = np.ravel_multi_index(np.nonzero(sel_mask), grid, order="F")
    for t0, t1 in _runs(np.arange(n_vol), volumes_per_block(grid)):
        block = np.asarray(proxy[..., t0:t1], dtype=np.float32)
        rows = block.reshape(-1, t1 - t0, order="F")[flat_index]
        signals[:, t0:t1] = rows
    return signals


def _check_signals(signals: np.ndarray, b0: np.ndarray, dwi: Path, masked: bool) -> None:
    """Refuse a scan with no voxel left to fit, or no positive signal in any of them."""
    if signals.shape[0] == 0:
        raise InputError(
            f"{dwi}: no voxel to fit (no finite voxel with positive signal"
            f"{' inside the mask' if masked else ''}); check the image and mask"
        )
    ref = signals[:, b0].mean(1) if b0.any() else signals.mean(1)
    if np.all(ref <= 0):
        raise InputError(
            f"{dwi}: the signal is zero or negative in every fitted voxel; give magnitude "
            f"DWI data"
        )


#: Bytes of float32 volumes read (by :func:`load_dwi`) or written at once.
READ_BLOCK_BYTES = 64 << 20


def volumes_per_block(grid: tuple[int, ...]) -> int:
    """Whole float32 volumes of ``grid`` that fit in :data:`READ_BLOCK_BYTES` (at least 1)."""
    return max(1, READ_BLOCK_BYTES // (4 * int(np.prod(grid))))


def _runs(indices: np.ndarray, max_len: int):
    """Consecutive runs (start, stop) of sorted volume indices, each at most ``max_len`` long."""
    start = prev = None
    for t in (int(i) for i in indices):
        if start is not None and t == prev + 1 and t - start < max_len:
            prev = t
            continue
        if start is not None:
            yield start, prev + 1
        start = prev = t
    if start is not None:
        yield start, prev + 1


def vectors_to_volume(
    values: np.ndarray, mask: np.ndarray, fill: float = np.nan
) -> np.ndarray:
    """Scatter rows (n,) or (n, k) back into a (x, y, z) or (x, y, z, k) float32 volume."""
    values = np.asarray(values)
    shape = mask.shape + values.shape[1:]
    vol = np.full(shape, fill, dtype=np.float32)
    vol[mask] = values
    return vol


def bids_entities(path: str | Path) -> str:
    """The BIDS entities of a file name (``sub-01_ses-2_dwi.nii.gz`` -> ``sub-01_ses-2``), or ''
    for a name that is not BIDS-like."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    parts = name.split("_")
    if parts and "-" not in parts[-1]:
        parts = parts[:-1]  # the suffix (dwi)
    if not parts or not all("-" in p for p in parts) or not parts[0].startswith("sub-"):
        return ""
    return "_".join(parts)
