"""Gradient tables from text: FSL ``.bval`` / ``.bvec`` files and the MRtrix ``.b`` table read
into numbers, then b-values converted to ms/µm² and directions to unit vectors, with what was
detected (units, orientation, normalisation, b-value scaling) said in the notes."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from mixmap.acquisition.base import (
    B0_THRESHOLD,
    BVEC_NORM_TOLERANCE,
    MS_UM2_THRESHOLD,
    AcquisitionError,
)

log = logging.getLogger(__name__)


def read_bvec_table(path: Path, n: int) -> np.ndarray:
    """A bvec file as a 2-D table: (3, n) FSL rows or (n, 3) columns as written; a single
    volume's direction (3 numbers on one line or three) is (3, 1)."""
    vecs = read_table(path)
    if vecs.ndim == 1 and vecs.size == 3 and n == 1:
        return vecs.reshape(3, 1)
    if vecs.ndim == 1:
        raise AcquisitionError(
            f"{path}: one row of {vecs.size} numbers; a bvec file needs 3 rows (x, y, z) with "
            f"one column per volume"
        )
    return vecs


def read_table(path: Path) -> np.ndarray:
    """A text table of numbers (FSL bval/bvec, MRtrix .b): 1-D for one row or column."""
    if not path.exists():
        raise AcquisitionError(f"{path}: file not found; check the path")
    try:
        with warnings.catch_warnings():  # an empty file: said below, in one line
            warnings.simplefilter("ignore", UserWarning)
            arr = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except OSError as exc:
        raise AcquisitionError(
            f"{path}: cannot be read ({exc.strerror or exc}); check that it is a file you may "
            f"read"
        ) from None
    except ValueError as exc:
        raise AcquisitionError(
            f"{path}: not a table of numbers ({exc}); give an FSL-style text file"
        ) from None
    if arr.size == 0:
        raise AcquisitionError(f"{path}: file is empty; give one value per volume")
    return arr


def _read_bvals(bvals, units: str, where: str, notes: list[str]) -> np.ndarray:
    """(n,) b-values in ms/µm², validated, from s/mm², ms/µm² or detected ``units``; what
    was detected is appended to ``notes``."""
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    if bvals.size == 0:
        raise AcquisitionError(f"{where}no b-values found; give one b-value per volume")
    if not np.all(np.isfinite(bvals)):
        raise AcquisitionError(f"{where}b-values contain NaN or Inf; fix the bval file")
    if np.any(bvals < -1e-6):
        raise AcquisitionError(
            f"{where}negative b-value {bvals.min():g}; b-values must be >= 0 s/mm²"
        )
    bvals = np.clip(bvals, 0, None)
    if units == "auto":
        if bvals.max() < MS_UM2_THRESHOLD:
            log.info(
                "%slargest b-value %.3g < %g: reading b-values as ms/µm² (not s/mm²)",
                where,
                bvals.max(),
                MS_UM2_THRESHOLD,
            )
            units = "ms/um2"
            notes.append(f"b-values read as ms/µm² (largest {bvals.max():g} < "
                         f"{MS_UM2_THRESHOLD:g})")
        else:
            units = "s/mm2"
            notes.append("b-values in s/mm²")
    if units == "s/mm2":
        bvals = bvals / 1000.0
    elif units != "ms/um2":
        raise AcquisitionError(f"unknown b-value units {units!r}; use 's/mm2' or 'ms/um2'")

    return bvals


def _read_bvecs(bvecs, bvals: np.ndarray, raw_bvals: np.ndarray, vwhere: str,
                notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """((n, 3) unit directions (zero at b=0), (n,) b-values) from a (3, n) or (n, 3) table,
    or zeros. Two conventions for non-unit vectors are recognised and said in ``notes``:
    vectors scaled by their b-value (norm = the file's b, normalised), and norms at most 1
    that scale the b-value (b·|g|², MRtrix's b-value scaling of multi-shell and DSI schemes)."""
    n = bvals.size
    if bvecs is None:
        return np.zeros((n, 3)), bvals
    vecs = np.asarray(bvecs, dtype=np.float64)
    if vecs.ndim != 2 or 3 not in vecs.shape:
        raise AcquisitionError(
            f"{vwhere}gradient directions have shape {vecs.shape}; expected 3 rows "
            f"(FSL bvec) or 3 columns, one direction per volume"
        )
    if vecs.shape[0] == 3:
        # FSL writes 3 rows (x, y, z); a 3x3 table is read that way too.
        vecs = vecs.T
        notes.append("bvecs as 3 rows (FSL)")
    else:
        notes.append("bvecs as 3 columns")
    if vecs.shape[0] != n:
        raise AcquisitionError(
            f"{vwhere}{vecs.shape[0]} gradient directions but {n} b-values; "
            f"give one bvec column per b-value"
        )
    if not np.all(np.isfinite(vecs)):
        raise AcquisitionError(f"{vwhere}bvecs contain NaN or Inf; fix the bvec file")
    vecs = vecs.copy()
    dw = bvals > B0_THRESHOLD
    norms = np.linalg.norm(vecs, axis=1)
    off = dw & (np.abs(norms - 1) > BVEC_NORM_TOLERANCE)
    if np.any(off):
        bvals = _scaled_vectors(norms, bvals, raw_bvals, dw, off, vwhere, notes)
    elif np.any(dw):
        dev = float(np.abs(norms[dw] - 1).max())
        notes.append(f"bvec norms within {dev:.2g} of 1, normalised")
    vecs[dw] /= norms[dw, None]
    vecs[~dw] = 0.0
    return vecs, bvals


def _scaled_vectors(norms: np.ndarray, bvals: np.ndarray, raw_bvals: np.ndarray,
                    dw: np.ndarray, off: np.ndarray, vwhere: str, notes: list[str]
                    ) -> np.ndarray:
    """The b-values for a table whose diffusion directions are not unit vectors: unchanged
    when every norm equals its b-value as written (vectors scaled by b); times |g|² when no
    norm exceeds 1 (b-value scaling); otherwise refused, naming the first bad direction."""
    by_b = np.abs(norms[dw] - raw_bvals[dw]) <= 0.01 * raw_bvals[dw]
    if np.all(by_b):
        notes.append("bvecs scaled by their b-value, normalised")
        return bvals
    if np.all(norms[dw] <= 1 + BVEC_NORM_TOLERANCE) and np.all(norms[dw] > 1e-6):
        scaled = bvals.copy()
        scaled[dw] = bvals[dw] * np.minimum(norms[dw], 1.0) ** 2
        notes.append(f"bvec norms below 1 ({norms[dw].min():.3g}-{norms[dw].max():.3g}) scale "
                     f"the b-values: b·|g|² (MRtrix's b-value scaling)")
        log.warning("%sgradient norms from %.3g to %.3g: b-values scaled by |g|² (the "
                    "multi-shell/DSI convention); give unit vectors if that is not meant",
                    vwhere, norms[dw].min(), norms[dw].max())
        return scaled
    i = int(np.flatnonzero(off)[0])
    raise AcquisitionError(
        f"{vwhere}gradient direction {i} has norm {norms[i]:.3g}, not 1; give unit vectors, "
        f"vectors scaled by their b-value, or norms at most 1 that scale the b-value"
    )
