"""Acquisition: what was measured in each volume, as named per-volume fields, validated once.

Fields (:data:`FIELDS`): ``b`` (ms/µm², 1 ms/µm² = 1000 s/mm²) and ``direction`` (unit vectors,
zero where b = 0) for diffusion; ``TE``, ``TI``, ``TR`` (ms) and ``flip_angle`` (degrees) for
relaxometry. A model declares the fields it needs (:attr:`SignalModel.required_fields`). Files
on disk follow FSL for diffusion: one row of b-values in s/mm² and a 3×N (or N×3) table of
gradient directions; a b-value file whose largest value is below
:data:`~mixmap.acquisition.base.MS_UM2_THRESHOLD` is taken to be in ms/µm² already, and that is
logged (:mod:`mixmap.acquisition.tables` reads the files).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mixmap.acquisition.base import (
    B0_THRESHOLD,
    SHELL_RELATIVE_TOLERANCE,
    SHELL_TOLERANCE,
    AcquisitionError,
)
from mixmap.acquisition.tables import _read_bvals, _read_bvecs, read_bvec_table, read_table


@dataclass(frozen=True)
class Field:
    """A per-volume acquisition quantity: its name, unit and width (3 for a direction)."""

    name: str
    unit: str
    description: str
    width: int = 1


#: The acquisition fields mixmap knows, by name.
FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("b", "ms/µm²", "diffusion weighting"),
    Field("direction", "", "unit gradient direction, zero where b = 0", width=3),
    Field("TE", "ms", "echo time"),
    Field("TI", "ms", "inversion time"),
    Field("TR", "ms", "repetition time"),
    Field("flip_angle", "deg", "flip angle"),
)}


@dataclass(frozen=True)
class VolumeGroup:
    """Volumes with (nearly) the same value of one field: a diffusion shell, an echo time."""

    value: float  # mean of the members, in the field's unit
    indices: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.indices)

    @property
    def bval(self) -> float:
        """The value of a diffusion shell (ms/µm²)."""
        return self.value


#: A group of diffusion volumes with (nearly) the same b-value.
Shell = VolumeGroup


def group_values(values: np.ndarray, tolerance: float = 0.0, relative: float = 0.0,
                 split_at: float | None = None) -> list[VolumeGroup]:
    """Volumes grouped by (n,) ``values``, ascending: the one grouping rule of mixmap (shells,
    echo times, the reductions of the fitters and of the Bayes reference).

    A group holds the sorted values within ``max(tolerance, relative · value)`` of its lowest
    one. Measured from the lowest rather than the previous value, so that a dense ramp of
    values (b every 20 s/mm²) is not chained into one group; relative, so that a scanner's
    jitter (a few s/mm² at b = 1000 and more at 3000) stays inside a shell while low b-values
    a few s/mm² apart stay apart. No group straddles ``split_at`` (the b=0 threshold): the
    volumes at or below it stay reference volumes of their own. Each group's value is the
    mean of its members.
    """
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    groups: list[list[int]] = []
    first = 0.0
    for i in order:
        v = float(values[i])
        if (not groups or v - first > max(tolerance, relative * v)
                or (split_at is not None and v > split_at >= first)):
            groups.append([])
            first = v
        groups[-1].append(int(i))
    return [VolumeGroup(float(values[g].mean()), tuple(sorted(g))) for g in groups]


@dataclass(frozen=True, eq=False)
class Acquisition:
    """Named per-volume fields (:data:`FIELDS`), one row per measurement.

    Build it with :meth:`from_fsl`, :meth:`from_arrays` or :meth:`from_gradient_table`
    (diffusion) or :meth:`from_fields` (any fields); the constructor expects already-validated
    internal arrays: ``fields`` maps a name to (n,) float64, or (n, 3) for ``direction``.
    """

    fields: Mapping[str, np.ndarray]
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
        where = f"{source}: " if source != "arrays" else ""
        notes: list[str] = []
        raw = np.asarray(bvals, dtype=np.float64).ravel()
        bvals = _read_bvals(raw, units, where, notes)
        vecs, bvals = _read_bvecs(bvecs, bvals, raw,
                                  f"{bvec_source}: " if bvec_source else where, notes)
        return cls({"b": bvals, "direction": vecs}, source=source, notes=tuple(notes))

    @classmethod
    def from_fsl(cls, bval_file: str | Path, bvec_file: str | Path | None = None) -> Acquisition:
        """Read FSL-style ``.bval`` / ``.bvec`` text files."""
        bval_file = Path(bval_file)
        bvals = read_table(bval_file).ravel()
        bvecs = None
        if bvec_file is not None:
            bvec_file = Path(bvec_file)
            bvecs = read_bvec_table(bvec_file, bvals.size)
        return cls.from_arrays(bvals, bvecs, source=str(bval_file),
                               bvec_source=str(bvec_file) if bvec_file is not None else None)

    @classmethod
    def from_gradient_table(cls, gtab) -> Acquisition:
        """From a dipy ``GradientTable`` (b-values in s/mm²)."""
        return cls.from_arrays(np.asarray(gtab.bvals), np.asarray(gtab.bvecs), units="s/mm2")

    @classmethod
    def from_fields(cls, fields: Mapping[str, np.ndarray], *, source: str = "arrays"
                    ) -> Acquisition:
        """From named per-volume arrays in the units of :data:`FIELDS` (times in ms, flip
        angles in degrees); diffusion fields go through :meth:`from_arrays` (b in s/mm² or
        ms/µm², detected)."""
        where = f"{source}: " if source != "arrays" else ""
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise AcquisitionError(f"{where}unknown acquisition field(s) {unknown}; "
                                   f"known: {', '.join(FIELDS)}")
        out: dict[str, np.ndarray] = {}
        notes: tuple[str, ...] = ()
        if "b" in fields:
            dwi = cls.from_arrays(fields["b"], fields.get("direction"), source=source)
            out, notes = dict(dwi.fields), dwi.notes
        elif "direction" in fields:
            raise AcquisitionError(f"{where}gradient directions without b-values; give both")
        for name, values in fields.items():
            if name not in out:
                out[name] = _check_field(name, values, where)
        sizes = {k: v.shape[0] for k, v in out.items()}
        if len(set(sizes.values())) > 1:
            raise AcquisitionError(f"{where}fields have different lengths {sizes}; give one "
                                   f"value per volume for every field")
        if not out:
            raise AcquisitionError(f"{where}no acquisition fields given")
        return cls(out, source=source, notes=notes)

    def to_record(self) -> dict:
        """The fields as JSON-ready lists (diffusion: ``bvals_ms_per_um2`` and ``bvecs``), with
        the :meth:`fingerprint`; :meth:`from_record` reads it back."""
        rec: dict = {"fingerprint": self.fingerprint()}
        if self.is_diffusion:
            rec["bvals_ms_per_um2"] = self.bvals.tolist()
            rec["bvecs"] = self.bvecs.tolist()
        others = {k: v.tolist() for k, v in self.fields.items() if k not in ("b", "direction")}
        if others:
            rec["fields"] = others
        return rec

    @classmethod
    def from_record(cls, rec: Mapping, *, source: str = "arrays") -> Acquisition:
        """The acquisition written by :meth:`to_record` (its fingerprint is not checked)."""
        fields = {k: np.asarray(v) for k, v in rec.get("fields", {}).items()}
        if "bvals_ms_per_um2" in rec:
            # bvecs are stored (n, 3); passed as (3, n) so that a 3x3 table is not transposed
            dwi = cls.from_arrays(np.asarray(rec["bvals_ms_per_um2"]),
                                  np.asarray(rec["bvecs"], dtype=np.float64).reshape(-1, 3).T,
                                  units="ms/um2", source=source)
            if not fields:
                return dwi
            fields = {**dwi.fields, **fields}
            return cls({k: np.asarray(v, dtype=np.float64) for k, v in fields.items()},
                       source=source, notes=dwi.notes)
        return cls.from_fields(fields, source=source)

    # ------------------------------------------------------------------ fields
    def has(self, name: str) -> bool:
        return name in self.fields

    def field(self, name: str) -> np.ndarray:
        """The (n,) values of field ``name`` ((n, 3) for ``direction``)."""
        try:
            return self.fields[name]
        except KeyError:
            what = FIELDS[name].description if name in FIELDS else name
            raise AcquisitionError(
                f"{self.source}: the acquisition has no {what} ({name}); it has "
                f"{', '.join(self.fields)}") from None

    def tensor(self, name: str, device: torch.device | str = "cpu", dtype=torch.float32):
        """Field ``name`` as a tensor on ``device``, cached per device and dtype."""
        key = (name, str(device), dtype)
        if key not in self._cache:
            self._cache[key] = _to_tensor(self.field(name), device, dtype)
        return self._cache[key]

    def groups(self, name: str, tolerance: float = 0.0, relative: float = 0.0
               ) -> list[VolumeGroup]:
        """Volumes grouped by the value of field ``name``, ascending (:func:`group_values`):
        each group holds the values within ``max(tolerance, relative · value)`` (in the
        field's unit) of its lowest; b-values never group across :data:`B0_THRESHOLD`."""
        return group_values(self.field(name), tolerance, relative,
                            split_at=B0_THRESHOLD if name == "b" else None)

    def reduced(self, groups: list[VolumeGroup], by: str) -> Acquisition:
        """One volume per group of field ``by``: that field is the group's value, every other
        scalar field is averaged over the group's members and directions are zero; the
        scheme a direction-independent model sees on group means."""
        fields = {}
        for name, values in self.fields.items():
            if name == "direction":
                fields[name] = np.zeros((len(groups), 3))
            elif name == by:
                fields[name] = np.array([g.value for g in groups])
            else:
                fields[name] = np.array([values[list(g.indices)].mean() for g in groups])
        return Acquisition(fields, source=self.source)

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return int(next(iter(self.fields.values())).shape[0])

    @property
    def bvals(self) -> np.ndarray:
        """(n,) b-values, ms/µm²."""
        return self.field("b")

    @property
    def bvecs(self) -> np.ndarray:
        """(n, 3) unit gradient directions, zero at b = 0."""
        return self.field("direction")

    @property
    def is_diffusion(self) -> bool:
        return "b" in self.fields

    @property
    def b0_mask(self) -> np.ndarray:
        """(n,) True for the b=0 volumes (all False without b-values)."""
        if not self.is_diffusion:
            return np.zeros(self.n, dtype=bool)
        return self.bvals <= B0_THRESHOLD

    @property
    def n_b0(self) -> int:
        return int(self.b0_mask.sum())

    def shells(self, tolerance: float = SHELL_TOLERANCE,
               relative: float = SHELL_RELATIVE_TOLERANCE) -> list[Shell]:
        """b-values grouped into shells, b=0 first: each shell holds the b-values within
        ``max(tolerance, relative · b)`` (ms/µm²) of its lowest (:data:`SHELL_TOLERANCE`:
        jittered shells stay one, IVIM's low b-values stay apart); the b=0 volumes
        (:data:`B0_THRESHOLD`) never share a shell with diffusion-weighted ones."""
        return self.groups("b", tolerance, relative)

    def dw_shells(self) -> list[Shell]:
        """Shells with b > 0."""
        return [s for s in self.shells() if s.bval > B0_THRESHOLD]

    def fingerprint(self) -> str:
        """Hash of the scheme for model files: b rounded to 1 s/mm², directions to 1e-3, other
        fields to 1e-3 of their unit."""
        if set(self.fields) <= {"b", "direction"}:
            data = np.concatenate([np.round(self.bvals * 1000),
                                   np.round(self.bvecs.ravel() * 1000)])
            return hashlib.sha256(data.astype(np.int64).tobytes()).hexdigest()[:16]
        h = hashlib.sha256()
        for name in sorted(self.fields):
            h.update(name.encode())
            h.update(np.round(self.fields[name].ravel() * 1000).astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def same_scheme(self, other: Acquisition) -> bool:
        """Whether ``other`` measures the same volumes in the same order: the same fields, b
        within 1 s/mm², directions within 1e-3 per component (either sign), other fields
        within 1e-3 of their unit. A tolerance, not :meth:`fingerprint`'s rounding, so a
        scheme read back from files written with fewer digits still matches."""
        if set(self.fields) != set(other.fields) or self.n != other.n:
            return False
        for name, a in self.fields.items():
            b = other.fields[name]
            if name == "direction":
                gap = np.minimum(np.abs(a - b).max(axis=1), np.abs(a + b).max(axis=1))
                if (gap > 1e-3).any():
                    return False
            elif not np.allclose(a, b, rtol=0, atol=1e-3):
                return False
        return True

    def describe(self) -> dict:
        out: dict = {"n_measurements": self.n}
        if self.is_diffusion:
            out["n_b0"] = self.n_b0
            out["shells_s_per_mm2"] = [{"b": round(s.bval * 1000), "n": s.n}
                                       for s in self.shells()]
        for name in self.fields:
            if name not in ("b", "direction"):
                out[f"{name}_{FIELDS[name].unit}"] = [
                    {"value": round(g.value, 3), "n": g.n} for g in self.groups(name)]
        out["fingerprint"] = self.fingerprint()
        return out

    def torch(self, device: torch.device | str = "cpu", dtype=torch.float32):
        """(bvals, bvecs) as tensors on ``device``, cached per device and dtype."""
        return self.tensor("b", device, dtype), self.tensor("direction", device, dtype)

    def subset(self, indices: np.ndarray) -> Acquisition:
        """The acquisition restricted to some measurements (e.g. half of the directions)."""
        idx = np.asarray(indices)
        return Acquisition({k: v[idx] for k, v in self.fields.items()}, source=self.source,
                           notes=self.notes)

    def save_fsl(self, bval_file: str | Path, bvec_file: str | Path) -> None:
        """Write FSL files (b in s/mm², 3 rows of directions)."""
        np.savetxt(bval_file, (self.bvals * 1000)[None], fmt="%.10g")
        np.savetxt(bvec_file, self.bvecs.T, fmt="%.10f")


def _to_tensor(a: np.ndarray, device, dtype) -> torch.Tensor:
    np_dtype = {torch.float64: np.float64, torch.float16: np.float16}.get(dtype, np.float32)
    # Converted in numpy first: torch.as_tensor(ndarray, dtype=...) inside a torch.func
    # transform keeps the array's float64.
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np_dtype)).to(device)


def _check_field(name: str, values, where: str) -> np.ndarray:
    """(n,) float64 values of a scalar relaxometry field, validated (finite, in range)."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise AcquisitionError(f"{where}{name} has shape {a.shape}; give one value per volume")
    if not np.all(np.isfinite(a)):
        raise AcquisitionError(f"{where}{name} contains NaN or Inf; fix the values")
    low = 0.0 if name != "flip_angle" else -180.0
    if np.any(a < low) or (name == "flip_angle" and np.any(np.abs(a) > 180)):
        raise AcquisitionError(f"{where}{name} value {a.min():g} out of range; {name} is in "
                               f"{FIELDS[name].unit} and must be >= {low:g}")
    return a
