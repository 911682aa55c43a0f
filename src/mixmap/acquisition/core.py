"""Acquisition scheme: b-values and gradient directions, validated once.

Units inside mixmap: b in ms/µm² (1 ms/µm² = 1000 s/mm²). Files on disk follow FSL: one row of
b-values in s/mm² and a 3×N (or N×3) table of gradient directions. A b-value file whose largest
value is below :data:`MS_UM2_THRESHOLD` is taken to be in ms/µm² already, and that is logged.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

#: A bval file whose largest value is below this is read as ms/µm² rather than s/mm².
MS_UM2_THRESHOLD = 50.0
#: b-values at or below this (ms/µm², i.e. 50 s/mm²) count as b=0 volumes.
B0_THRESHOLD = 0.05
#: Default tolerance for grouping b-values into shells (ms/µm², i.e. ±100 s/mm²).
SHELL_TOLERANCE = 0.1
#: Gradient vectors whose norm differs from 1 by more than this are refused as not directions.
BVEC_NORM_TOLERANCE = 0.1


class AcquisitionError(ValueError):
    """A gradient table that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Shell:
    """A group of measurements with (nearly) the same b-value."""

    bval: float  # ms/µm², mean of the members
    indices: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.indices)


@dataclass(frozen=True, eq=False)
class Acquisition:
    """b-values (ms/µm²) and unit gradient directions, one row per measurement.

    Build it with :meth:`from_fsl`, :meth:`from_arrays` or :meth:`from_gradient_table`; the
    constructor expects already-validated internal arrays.
    """

    bvals: np.ndarray  # (n_meas,) float64, ms/µm²
    bvecs: np.ndarray  # (n_meas, 3) float64, unit norm, zero at b=0
    source: str = "arrays"
    #: What was detected and changed while reading (units, orientation, normalisation).
    notes: tuple[str, ...] = ()
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_arrays(
        cls,
        bvals: np.ndarray,
        bvecs: np.ndarray | None = None,
        *,
        units: str = "auto",
        source: str = "arrays",
        bvec_source: str | None = None,
    ) -> Acquisition:
        """From b-values and directions.

        Parameters
        ----------
        bvals
            (n,) b-values in s/mm² (``units="s/mm2"``), ms/µm² (``units="ms/um2"``) or
            detected (``"auto"``: largest value below 50 means ms/µm²).
        bvecs
            (n, 3) or (3, n) gradient directions; normalised here and set to zero at b=0.
            ``None`` for schemes without directions (isotropic models only).
        """
        bvals = np.asarray(bvals, dtype=np.float64).ravel()
        where = f"{source}: " if source != "arrays" else ""
        if bvals.size == 0:
            raise AcquisitionError(f"{where}no b-values found; give one b-value per volume")
        if not np.all(np.isfinite(bvals)):
            raise AcquisitionError(f"{where}b-values contain NaN or Inf; fix the bval file")
        if np.any(bvals < -1e-6):
            raise AcquisitionError(
                f"{where}negative b-value {bvals.min():g}; b-values must be >= 0 s/mm²"
            )
        bvals = np.clip(bvals, 0, None)
        notes: list[str] = []
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

        n = bvals.size
        vwhere = f"{bvec_source}: " if bvec_source else where
        if bvecs is None:
            vecs = np.zeros((n, 3))
        else:
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
            bad = dw & (np.abs(norms - 1) > BVEC_NORM_TOLERANCE)
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                raise AcquisitionError(
                    f"{vwhere}gradient direction {i} has norm {norms[i]:.3g}, not 1; "
                    f"give unit vectors (or b-value-scaled bvecs normalised to 1)"
                )
            if np.any(dw):
                dev = float(np.abs(norms[dw] - 1).max())
                notes.append(f"bvec norms within {dev:.2g} of 1, normalised")
            vecs[dw] /= norms[dw, None]
            vecs[~dw] = 0.0
        return cls(bvals=bvals, bvecs=vecs, source=source, notes=tuple(notes))

    @classmethod
    def from_fsl(cls, bval_file: str | Path, bvec_file: str | Path | None = None) -> Acquisition:
        """Read FSL-style ``.bval`` / ``.bvec`` text files."""
        bval_file = Path(bval_file)
        bvals = _read_table(bval_file).ravel()
        bvecs = None
        if bvec_file is not None:
            bvec_file = Path(bvec_file)
            bvecs = _read_table(bvec_file)
            if bvecs.ndim == 1:
                raise AcquisitionError(
                    f"{bvec_file}: one row of {bvecs.size} numbers; a bvec file needs 3 rows "
                    f"(x, y, z) with one column per volume"
                )
        return cls.from_arrays(bvals, bvecs, source=str(bval_file),
                               bvec_source=str(bvec_file) if bvec_file is not None else None)

    @classmethod
    def from_gradient_table(cls, gtab) -> Acquisition:
        """From a dipy ``GradientTable`` (b-values in s/mm²)."""
        return cls.from_arrays(np.asarray(gtab.bvals), np.asarray(gtab.bvecs), units="s/mm2")

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return int(self.bvals.size)

    @property
    def b0_mask(self) -> np.ndarray:
        return self.bvals <= B0_THRESHOLD

    @property
    def n_b0(self) -> int:
        return int(self.b0_mask.sum())

    def shells(self, tolerance: float = SHELL_TOLERANCE) -> list[Shell]:
        """Group b-values into shells, b=0 first; a shell starts wherever the sorted b-values
        jump by more than ``tolerance`` (ms/µm²)."""
        order = np.argsort(self.bvals, kind="stable")
        groups: list[list[int]] = []
        last = None
        for i in order:
            b = self.bvals[i]
            if last is None or b - last > tolerance or (b > B0_THRESHOLD >= last):
                groups.append([])
            groups[-1].append(int(i))
            last = b
        return [
            Shell(bval=float(self.bvals[g].mean()), indices=tuple(sorted(g))) for g in groups
        ]

    def dw_shells(self) -> list[Shell]:
        """Shells with b > 0."""
        return [s for s in self.shells() if s.bval > B0_THRESHOLD]

    def fingerprint(self) -> str:
        """Hash of the scheme (b rounded to 1 s/mm², directions to 1e-3) for model files."""
        data = np.concatenate([np.round(self.bvals * 1000), np.round(self.bvecs.ravel() * 1000)])
        return hashlib.sha256(data.astype(np.int64).tobytes()).hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "n_measurements": self.n,
            "n_b0": self.n_b0,
            "shells_s_per_mm2": [
                {"b": round(s.bval * 1000), "n": s.n} for s in self.shells()
            ],
            "fingerprint": self.fingerprint(),
        }

    def torch(self, device: torch.device | str = "cpu", dtype=torch.float32):
        """(bvals, bvecs) as tensors on ``device``, cached per device and dtype."""
        key = (str(device), dtype)
        if key not in self._cache:
            np_dtype = {torch.float64: np.float64, torch.float16: np.float16}.get(dtype, np.float32)
            # Converted in numpy first: torch.as_tensor(ndarray, dtype=...) inside a torch.func
            # transform keeps the array's float64.
            self._cache[key] = tuple(
                torch.from_numpy(np.ascontiguousarray(a, dtype=np_dtype)).to(device)
                for a in (self.bvals, self.bvecs)
            )
        return self._cache[key]

    def subset(self, indices: np.ndarray) -> Acquisition:
        """The acquisition restricted to some measurements (e.g. half of the directions)."""
        idx = np.asarray(indices)
        return Acquisition(self.bvals[idx], self.bvecs[idx], source=self.source,
                           notes=self.notes)

    def save_fsl(self, bval_file: str | Path, bvec_file: str | Path) -> None:
        """Write FSL files (b in s/mm², 3 rows of directions)."""
        np.savetxt(bval_file, (self.bvals * 1000)[None], fmt="%g")
        np.savetxt(bvec_file, self.bvecs.T, fmt="%.6f")


def _read_table(path: Path) -> np.ndarray:
    if not path.exists():
        raise AcquisitionError(f"{path}: file not found; check the path")
    try:
        arr = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as exc:
        raise AcquisitionError(
            f"{path}: not a table of numbers ({exc}); give an FSL-style text file"
        ) from None
    if arr.size == 0:
        raise AcquisitionError(f"{path}: file is empty; give one value per volume")
    return arr


# ---------------------------------------------------------------------- standard schemes
