"""Writing results: maps with JSON sidecars (names from :mod:`mixmap.io.naming`), atomic
writes, no overwriting."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from mixmap._version import __version__
from mixmap.io.naming import (
    fit_json_name,
    loss_csv_name,
    map_name,
    model_prefix,
    sidecar_name,
)
from mixmap.io.nifti import bids_entities, vectors_to_volume


class OutputExistsError(FileExistsError):
    """An output file exists and ``--force`` was not given."""


class OutputError(OSError):
    """The output folder cannot be written (read-only, full, held by another run); the message
    names the folder and the fix."""


def _write_error(out_dir: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = ("free some space or choose another --out" if exc.errno == errno.ENOSPC
           else "choose a folder you may write to as --out")
    return OutputError(f"{out_dir}: cannot write the output ({reason}); {fix}; nothing was "
                       f"written")


#: The lock file a run holds in its output folder while it fits and writes.
LOCK_NAME = ".mixmap.lock"


class OutputLock:
    """Hold ``out_dir`` for one run: a second run on the same folder is refused at once instead
    of mixing its files with the first's. The lock is an advisory ``flock`` on
    ``out_dir/.mixmap.lock`` (released by the system if the process dies); taking it also
    shows early that the folder can be written. The folder, if this made it, and the lock file
    are removed again when nothing else was written. ``enabled=False`` does nothing (torchrun
    processes other than the main one)."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._fd: int | None = None
        self._made: list[Path] = []

    def __enter__(self) -> OutputLock:
        if not self.enabled:
            return self
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputExistsError(
                f"{self.out_dir}: exists and is not a folder; choose another --out")
        missing = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._made = missing  # deepest first
            self._fd = os.open(self.out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._cleanup()
            raise _write_error(self.out_dir, exc) from None
        if not _try_lock(self._fd):
            other = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise OutputError(
                f"{self.out_dir}: another mixmap run (process {other}) is writing here; wait "
                f"for it to finish or choose another --out")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._fd is not None:
            try:
                (self.out_dir / LOCK_NAME).unlink(missing_ok=True)
            finally:
                os.close(self._fd)  # closing releases the lock
                self._fd = None
        self._cleanup()

    def _cleanup(self) -> None:
        for folder in self._made:  # made by this run and still empty: removed
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock, as before
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class AtomicOutput:
    """Stage files in a hidden folder inside ``out_dir`` and move each into place only when the
    whole block succeeded; on any error nothing is left behind. Each final move is an atomic
    rename, so a reader (or a killed run) never sees a half-written file.

    >>> with AtomicOutput("out", force=False) as w:
    ...     w.nifti("a.nii.gz", array, affine)
    """

    def __init__(self, out_dir: str | Path, *, force: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.force = force
        self._staged: list[str] = []
        self._tmp: Path | None = None

    def __enter__(self) -> AtomicOutput:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputExistsError(
                f"{self.out_dir}: exists and is not a folder; choose another --out"
            )
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=".mixmap-tmp-", dir=self.out_dir))
        except OSError as exc:
            raise _write_error(self.out_dir, exc) from None
        return self

    def _target(self, rel: str) -> Path:
        target = self.out_dir / rel
        if target.exists() and not self.force:
            raise OutputExistsError(
                f"{target}: already exists; use --force to overwrite it or choose another --out"
            )
        self._staged.append(rel)
        staged = self._tmp / rel
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def nifti(self, rel: str, data: np.ndarray, affine: np.ndarray, header=None) -> None:
        hdr = header.copy() if header is not None else None
        img = nib.Nifti1Image(np.asarray(data), affine, hdr)
        img.set_data_dtype(np.asarray(data).dtype)
        if hdr is not None:
            img.header.set_xyzt_units(*header.get_xyzt_units())
        img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
        if np.asarray(data).dtype.kind == "f":
            finite = np.asarray(data)[np.isfinite(data)]
            img.header["cal_min"] = float(finite.min()) if finite.size else 0.0
            img.header["cal_max"] = float(finite.max()) if finite.size else 0.0
        nib.save(img, str(self._target(rel)))

    def nifti_volumes(self, rel: str, shape: tuple[int, int, int], n_vol: int,
                      affine: np.ndarray, blocks) -> None:
        """Write a 4-D float32 ``.nii``/``.nii.gz`` of ``n_vol`` volumes from ``blocks``, an
        iterable of (x, y, z, k) arrays in volume order, without holding the 4-D array: the
        volume axis is the slowest on disk, so each block is appended as it comes."""
        import gzip

        hdr = nib.Nifti1Header()
        hdr.set_data_shape((*shape, n_vol))
        hdr.set_data_dtype(np.float32)
        hdr.set_qform(affine, code=1)
        hdr.set_sform(affine, code=1)
        hdr.set_xyzt_units("mm", "sec")
        hdr["vox_offset"] = 352  # 348-byte header + the 4-byte "no extensions" flag
        hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
        target = self._target(rel)
        opener = gzip.open(target, "wb", compresslevel=1) if rel.endswith(".gz") else open(
            target, "wb")
        written = 0
        with opener as fh:
            fh.write(hdr.binaryblock + b"\0\0\0\0")
            for block in blocks:
                block = np.asarray(block, dtype=np.float32)
                if block.ndim == 3:
                    block = block[..., None]
                if block.shape[:3] != tuple(shape):
                    raise ValueError(f"{rel}: block of shape {block.shape} on grid {shape}")
                for k in range(block.shape[3]):
                    fh.write(block[..., k].tobytes(order="F"))
                written += block.shape[3]
        if written != n_vol:
            raise ValueError(f"{rel}: {written} volumes written, {n_vol} declared")

    def text(self, rel: str, content: str) -> None:
        self._target(rel).write_text(content, encoding="utf-8")

    def json(self, rel: str, data: dict) -> None:
        self.text(rel, json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable) + "\n")

    def bytes(self, rel: str, data: bytes) -> None:
        self._target(rel).write_bytes(data)

    def figure(self, rel: str, fig, **kwargs) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format=Path(rel).suffix.lstrip(".") or "png", **kwargs)
        self.bytes(rel, buf.getvalue())

    def path(self, rel: str) -> Path:
        """A staged path for writers that need a file name (moved into place on success)."""
        return self._target(rel)

    def __exit__(self, exc_type, exc, tb) -> None:
        moved: list[Path] = []
        try:
            if exc_type is None:
                for rel in self._staged:
                    dst = self.out_dir / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    if dst.is_dir():  # a folder (saved model) replaced with --force
                        old = self._tmp / (".old-" + Path(rel).name)
                        os.replace(dst, old)
                    os.replace(self._tmp / rel, dst)
                    moved.append(dst)
        except OSError as err:
            for dst in moved:  # a failed move takes back the ones before it
                shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(
                    missing_ok=True)
            raise _write_error(self.out_dir, err) from None
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        if exc_type is not None and issubclass(exc_type, OSError) and not issubclass(
                exc_type, (OutputError, FileExistsError, FileNotFoundError)):
            raise _write_error(self.out_dir, exc) from None


def existing_maps(out_dir: str | Path, entities: str, model: str) -> list[Path]:
    """Maps of this model already in ``out_dir`` (checked before a long fit starts)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    prefix = model_prefix(entities, model)
    return sorted(p for p in out.iterdir() if p.name.startswith(prefix))


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def save_maps(
    result,
    dwi,
    out_dir: str | Path,
    *,
    force: bool = False,
    extra: dict | None = None,
    extras=None,
) -> list[Path]:
    """Write every map of a :class:`~mixmap.fitting.FitResult` with the DWI's affine and
    header: float32, NaN outside the mask, one JSON sidecar per map (units, model, method,
    settings, version), plus ``fit.json`` (the whole run, with the device and the seconds of
    each phase) and, for learned fitters, the loss curve as ``loss.csv``. ``extras(w)``
    stages what goes beside the maps (a model, a report) in the same atomic step: a failure
    leaves neither. Returns the written map paths.
    """
    with AtomicOutput(out_dir, force=force) as w:
        names = stage_maps(w, result, dwi, extra=extra)
        if extras is not None:
            extras(w)
    return [Path(out_dir) / name for name in names]


def phase_seconds(result, dwi) -> dict[str, float]:
    """Seconds of each phase that made these maps: the scan's load (where it was loaded from
    a file), then the fit's phases (for the subjects of a pooled cohort fit, the shared fit's)."""
    load = {} if dwi.load_seconds is None else {"load": dwi.load_seconds}
    return {**load, **result.timings}


def stage_maps(
    w: AtomicOutput,
    result,
    dwi,
    folder: str = "",
    *,
    extra: dict | None = None,
) -> list[str]:
    """What :func:`save_maps` writes, staged in an open :class:`AtomicOutput` under its
    sub-folder ``folder`` (e.g. ``sub-01/dwi`` for a cohort, so that all subjects are written
    in one transaction). Returns the map paths relative to the output folder."""
    from mixmap.models import get_model

    model = get_model(result.model)
    entities = _entities_of(dwi)
    pre = folder.rstrip("/") + "/" if folder else ""
    header = dwi.header.copy()
    header.set_data_dtype(np.float32)
    common = {
        "Model": result.model,
        "Method": result.method,
        "Settings": result.settings,
        "MixmapVersion": __version__,
        "Sources": [str(dwi.path)],
        "CommandLine": command_line(),
        **(extra or {}),
    }
    written: list[str] = []
    for key, values in result.maps().items():
        param, _, desc = key.partition(":")
        if param in ("cluster", "clusterprob"):
            unit, text = "1", (
                "most likely mixture component" if param == "cluster"
                else "posterior probability of each mixture component P(y|x)"
            )
        else:
            p = model.parameter(param)
            unit, text = p.unit, p.description
            if desc == "std":
                text = f"standard deviation of {param}: " + (
                    "posterior" if result.method != "lsq" else "asymptotic (Cramér-Rao)"
                )
        name = map_name(entities, result.model, param, desc or None)
        vol = vectors_to_volume(np.asarray(values, dtype=np.float32), dwi.mask)
        w.nifti(pre + name, vol, dwi.affine, header)
        w.json(pre + sidecar_name(name),
               {"Parameter": param, "Units": unit, "Description": text, **common})
        written.append(pre + name)
    summary = {**common, "NoiseSigma": result.noise_sigma,
               "NumberOfVoxels": result.n_voxels, "Acquisition": dwi.acquisition.describe(),
               "Device": result.device,
               "Seconds": {k: round(v, 3) for k, v in phase_seconds(result, dwi).items()}}
    w.json(pre + fit_json_name(entities, result.model), summary)
    if result.history:
        w.text(pre + loss_csv_name(entities, result.model), loss_csv(result.history))
    return written


def loss_csv(history: list[dict]) -> str:
    """The loss curve (one row per epoch, one column per named term) as CSV text."""
    keys = list(history[0])
    rows = [",".join(keys)] + [
        ",".join(f"{h.get(k, float('nan')):.6g}" for k in keys) for h in history
    ]
    return "\n".join(rows) + "\n"


def _entities_of(dwi) -> str:
    return bids_entities(dwi.path)
