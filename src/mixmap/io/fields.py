"""Relaxometry acquisitions as scanners and users write them: a text file of one value per
volume for each varied field (echo times, inversion times, flip angles) and one repetition
time, read into an :class:`~mixmap.acquisition.Acquisition` in mixmap's units (ms, degrees),
with the units detected and said as for b-values."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixmap.acquisition import Acquisition, AcquisitionError
from mixmap.acquisition.tables import read_table

log = logging.getLogger(__name__)

#: Per field: the command-line option, and the largest value below which the file is read as
#: seconds (TE, TI) or radians (flip angles) rather than ms or degrees: no echo train in ms
#: ends before 1 ms, no inversion-recovery scheme in ms before 10 ms, and no set of flip angles
#: in degrees stays under 1.6°, while those in seconds or radians stay under these.
FIELD_FILES = {
    "TE": ("--echo-times", 1.0, "seconds", 1000.0),
    "TI": ("--inversion-times", 10.0, "seconds", 1000.0),
    "flip_angle": ("--flip-angles", float(np.pi / 2) + 1e-6, "radians", float(180 / np.pi)),
}


@dataclass(frozen=True)
class FieldFiles:
    """Where a relaxometry scan's acquisition is written (each file one value per volume, one
    row or one column), and its repetition time (ms; below 1 it is read as seconds)."""

    echo_times: Path | None = None
    inversion_times: Path | None = None
    flip_angles: Path | None = None
    repetition_time: float | None = None

    @classmethod
    def of(cls, echo_times: Path | None = None, inversion_times: Path | None = None,
           flip_angles: Path | None = None, repetition_time: float | None = None
           ) -> FieldFiles | None:
        """The given files, or None when none is (a diffusion scan)."""
        if echo_times is inversion_times is flip_angles is None:
            if repetition_time is not None:
                raise ValueError("--repetition-time goes with --flip-angles (variable flip "
                                 "angle T1) or another relaxometry file; give that file too")
            return None
        return cls(*(None if p is None else Path(p)
                     for p in (echo_times, inversion_times, flip_angles)), repetition_time)

    def files(self) -> dict[str, Path]:
        """field name -> file, for the fields given."""
        pairs = (("TE", self.echo_times), ("TI", self.inversion_times),
                 ("flip_angle", self.flip_angles))
        return {name: path for name, path in pairs if path is not None}

    def __str__(self) -> str:  # what messages name: the first file
        return str(next(iter(self.files().values())))

    def read(self) -> Acquisition:
        """The acquisition (times in ms, flip angles in degrees; TR repeated per volume)."""
        fields: dict[str, np.ndarray] = {}
        notes: list[str] = []
        for name, path in self.files().items():
            option, below, other, factor = FIELD_FILES[name]
            values = read_table(path)
            if values.ndim != 1:
                raise AcquisitionError(f"{path}: a table of shape {values.shape}; give one "
                                       f"value per volume (one row or one column) for {option}")
            if np.all(np.isfinite(values)) and np.abs(values).max() < below:
                values = values * factor
                note = (f"{path.name}: largest value below {below:.3g}, read as {other} and "
                        f"converted to {'ms' if factor == 1000.0 else 'degrees'}")
                notes.append(note)
                log.info("%s", note)
            fields[name] = values
        if self.repetition_time is not None:
            tr = float(self.repetition_time)
            if not (np.isfinite(tr) and tr > 0):
                raise AcquisitionError(f"--repetition-time {tr:g}: give TR in ms (> 0)")
            if tr < 1.0:
                notes.append(f"--repetition-time {tr:g} below 1, read as seconds")
                tr *= 1000.0
            fields["TR"] = np.full(next(iter(fields.values())).shape[0], tr)
        acq = Acquisition.from_fields(fields, source=str(self))
        return Acquisition(acq.fields, source=acq.source, notes=tuple(notes) or (
            "times in ms, flip angles in degrees",))


__all__ = ["FIELD_FILES", "FieldFiles"]
