"""Loading DWI scans: 4-D NIfTI + FSL gradient files + optional mask -> rows of masked voxels."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mixmap.acquisition import Acquisition

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
    """

    signals: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    acquisition: Acquisition
    path: Path
    n_dropped: int = 0
    load_seconds: float | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]


def load_image(path: str | Path, what: str = "image", *, keep_open: bool = False):
    """Open a NIfTI with a clear error for a missing file or another format. ``keep_open``
    keeps one file handle for all reads through the array proxy: reading a .nii.gz in blocks
    then continues the decompression instead of restarting it from the top for each block."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; check the {what} path")
    try:
        return nib.load(str(path), keep_file_open=bool(keep_open))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise InputError(
            f"{path}: not a readable NIfTI image ({type(exc).__name__}); give a .nii or .nii.gz "
            f"{what}"
        ) from None


def load_dwi(
    dwi: str | Path,
    bvals: str | Path,
    bvecs: str | Path | None,
    mask: str | Path | None = None,
) -> DWIData:
    """Load a 4-D DWI and its gradient files into rows of masked voxels.

    The image is read in blocks of whole volumes through nibabel's array proxy (one pass over
    the file, about 64 MB at a time), so the whole 4-D array is never held, in float64 or
    float32: peak memory is the masked rows plus one block. Without a mask, every voxel whose
    mean b=0 signal (mean signal if the scheme has no b=0) is positive is fitted. Masked voxels
    with NaN or Inf are dropped and counted.
    """
    t_start = time.perf_counter()
    dwi = Path(dwi)
    img = load_image(dwi, "DWI", keep_open=True)
    if len(img.shape) != 4:
        raise InputError(
            f"{dwi}: {len(img.shape)}-D image of shape {tuple(img.shape)}; a DWI needs 4 axes "
            f"(x, y, z, volume), one volume per b-value"
        )
    acq = Acquisition.from_fsl(bvals, bvecs)
    n_vol = img.shape[3]
    if acq.n != n_vol:
        raise InputError(
            f"{dwi}: {n_vol} volumes but {bvals} has {acq.n} b-values; give one b-value and one "
            f"bvec per volume"
        )
    grid = tuple(int(s) for s in img.shape[:3])
    given_mask = None if mask is None else _load_mask(mask, img, dwi, grid)
    b0 = acq.b0_mask
    sel_mask = given_mask if given_mask is not None else _positive_voxels(img.dataobj, b0, grid)
    signals, finite_rows = _read_rows(img.dataobj, sel_mask, grid)
    final_mask = sel_mask.copy()
    n_bad = int((~finite_rows).sum())
    if n_bad:
        signals = signals[finite_rows]
        final_mask[sel_mask] = finite_rows
    # Without a mask, voxels with NaN/Inf are background: left out without a warning.
    n_dropped = n_bad if given_mask is not None else 0
    if n_dropped:
        log.warning("%s: %d masked voxels hold NaN or Inf and were left out (NaN in the maps)",
                    dwi, n_dropped)
    _check_signals(signals, b0, dwi, mask)
    return DWIData(signals, final_mask, img.affine, img.header, acq, dwi, n_dropped,
                   time.perf_counter() - t_start)


def _load_mask(mask: str | Path, img, dwi: Path, grid: tuple[int, ...]) -> np.ndarray:
    """The mask file as a bool array on the DWI's ``grid``, refused if off-grid or empty."""
    mimg = load_image(mask, "mask")
    mshape = tuple(int(s) for s in mimg.shape)
    if len(mshape) == 4 and mshape[3] == 1:
        mshape = mshape[:3]
    if mshape != grid:
        raise InputError(
            f"{mask}: mask grid {mshape} does not match the DWI grid {grid} of {dwi}; "
            f"resample the mask onto the DWI"
        )
    if not np.allclose(mimg.affine, img.affine, atol=1e-3):
        log.warning("%s: mask affine differs from the DWI's; using it voxel by voxel", mask)
    given_mask = np.asarray(mimg.dataobj).reshape(grid) > 0
    if not given_mask.any():
        raise InputError(f"{mask}: the mask selects no voxels; give a mask of the brain")
    return given_mask


def _positive_voxels(proxy, b0: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """Voxels whose mean b=0 signal (mean signal without b=0) is positive: bool ``grid``."""
    n_vol = proxy.shape[3]
    ref_vols = np.flatnonzero(b0) if b0.any() else np.arange(n_vol)
    ref = np.zeros(grid, dtype=np.float64)
    for t0, t1 in _runs(ref_vols, volumes_per_block(grid)):
        ref += np.asarray(proxy[..., t0:t1], dtype=np.float32).sum(-1)
    with np.errstate(invalid="ignore"):
        return ref > 0


def _read_rows(proxy, sel_mask: np.ndarray, grid: tuple[int, ...]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(signals (n_sel, n_vol) float32 in C order of ``sel_mask``, which rows are finite).

    Blocks of whole volumes are read: the volume axis is the slowest on disk, so each block is
    one contiguous run of the file and a .nii.gz is decompressed once, front to back.
    """
    n_vol = proxy.shape[3]
    n_sel = int(sel_mask.sum())
    signals = np.empty((n_sel, n_vol), dtype=np.float32)
    finite_rows = np.ones(n_sel, dtype=bool)
    # Each selected voxel's place in a block flattened in the file's (Fortran) order: the
    # same rows in the same order as a boolean mask on the 4-D block, and much faster.
    flat_index = np.ravel_multi_index(np.nonzero(sel_mask), grid, order="F")
    for t0, t1 in _runs(np.arange(n_vol), volumes_per_block(grid)):
        block = np.asarray(proxy[..., t0:t1], dtype=np.float32)
        rows = block.reshape(-1, t1 - t0, order="F")[flat_index]
        signals[:, t0:t1] = rows
        finite_rows &= np.isfinite(rows).all(1)
    return signals, finite_rows


def _check_signals(signals: np.ndarray, b0: np.ndarray, dwi: Path,
                   mask: str | Path | None) -> None:
    """Refuse a scan with no voxel left to fit, or no positive signal in any of them."""
    if signals.shape[0] == 0:
        raise InputError(
            f"{dwi}: no voxel to fit (no finite voxel with positive signal"
            f"{' inside the mask' if mask is not None else ''}); check the image and mask"
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
