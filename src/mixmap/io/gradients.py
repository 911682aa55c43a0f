"""Gradient files as scanners and tools write them: FSL ``.bval``/``.bvec`` (image axes) or an
MRtrix ``.b`` table (``-grad``: one row ``x y z b`` per volume, scanner coordinates), read into
the image's acquisition; trace volumes (b > 0 with no direction, written by Philips scanners)
are found here and left out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixmap.acquisition import B0_THRESHOLD, Acquisition, AcquisitionError
from mixmap.acquisition.base import MS_UM2_THRESHOLD
from mixmap.acquisition.tables import read_bvec_table, read_table
from mixmap.io.fields import FieldFiles

log = logging.getLogger(__name__)

#: A direction shorter than this at b > 0 is no direction: a scanner's trace (mean DWI) volume.
TRACE_NORM = 1e-6


@dataclass(frozen=True)
class Gradients:
    """The acquisition of the kept volumes, and which volumes of the file those are.

    Attributes
    ----------
    acquisition
        Of the kept volumes, in file order.
    kept
        (n_kept,) indices into the file's volumes.
    n_file
        Volumes the gradient file describes.
    dropped
        ``{volume index: reason}`` of the volumes left out.
    """

    acquisition: Acquisition
    kept: np.ndarray
    n_file: int
    dropped: dict[int, str]

    def at_most(self, max_b: float | None, source: str | Path) -> Gradients:
        """These gradients without the volumes above ``max_b`` (s/mm²; None keeps every one),
        each recorded in :attr:`dropped`. Refused (:class:`AcquisitionError` naming
        ``source``) when no diffusion-weighted volume is left."""
        if max_b is None:
            return self
        if not self.acquisition.is_diffusion:
            raise AcquisitionError(f"--max-b {max_b:g}: {source} is not a diffusion scheme; "
                                   f"--max-b selects diffusion volumes")
        if not max_b > 0:
            raise AcquisitionError(f"--max-b {max_b:g}: give a positive b-value in s/mm²")
        b = self.acquisition.bvals * 1000.0
        above = b > max_b + 1e-6
        if not above.any():
            return self
        dw = ~self.acquisition.b0_mask
        if not (~above & dw).any():
            lowest = f" (the lowest is {b[dw].min():.0f})" if dw.any() else ""
            raise AcquisitionError(f"{source}: no diffusion-weighted volume has b at most "
                                   f"--max-b {max_b:g} s/mm²{lowest}")
        reason = f"b above --max-b {max_b:g} s/mm²"
        dropped = {**self.dropped, **{int(self.kept[j]): reason for j in np.flatnonzero(above)}}
        log.info("%s: %d volumes with b > %g s/mm² left out (--max-b)", source,
                 int(above.sum()), max_b)
        acq = self.acquisition.subset(np.flatnonzero(~above))
        return Gradients(acq, self.kept[~above], self.n_file, dict(sorted(dropped.items())))


def is_mrtrix_table(table: np.ndarray) -> bool:
    """A table of four columns (x y z b) read from a b-value file: MRtrix's ``-grad`` format."""
    return table.ndim == 2 and table.shape[1] == 4 and table.shape[0] != 1


def mrtrix_to_fsl(grad: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(n, 3) FSL bvecs (image axes, x flipped when the affine's determinant is positive) from
    (n, 3) MRtrix directions in scanner coordinates, for an image of ``affine`` (4×4)."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    u, _, vt = np.linalg.svd(linear / np.linalg.norm(linear, axis=0))
    rotation = u @ vt  # the orthonormal part: voxel axes -> scanner axes
    vecs = np.asarray(grad, dtype=np.float64) @ rotation  # rotation.T applied to each row
    if np.linalg.det(linear) > 0:
        vecs[:, 0] = -vecs[:, 0]
    return vecs


def fsl_to_mrtrix(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`mrtrix_to_fsl`: (n, 3) scanner-coordinate directions."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    u, _, vt = np.linalg.svd(linear / np.linalg.norm(linear, axis=0))
    vecs = np.array(bvecs, dtype=np.float64)
    if np.linalg.det(linear) > 0:
        vecs[:, 0] = -vecs[:, 0]
    return vecs @ (u @ vt).T


def gradient_files(bvals: Path | None, bvecs: Path | None, grad: Path | None,
                   fields: FieldFiles | None = None
                   ) -> tuple[Path | FieldFiles | None, Path | None]:
    """(bvals, bvecs) as :func:`read_gradients` takes them: an MRtrix ``grad`` table in place
    of bvals (bvecs None), a relaxometry scan's ``fields`` in place of bvals (bvecs None), or
    the FSL files; two kinds at once are refused."""
    if fields is not None:
        if bvals is not None or bvecs is not None or grad is not None:
            raise ValueError(f"{fields}: give diffusion files (--bvals/--bvecs or --grad) or "
                             f"relaxometry ones (--echo-times, --inversion-times, "
                             f"--flip-angles), not both")
        return fields, None
    if grad is not None and (bvals is not None or bvecs is not None):
        raise ValueError("give --grad (an MRtrix table) or --bvals and --bvecs, not both")
    return (grad, None) if grad is not None else (bvals, bvecs)


def read_gradients(bvals: str | Path | FieldFiles, bvecs: str | Path | None,
                   affine: np.ndarray | None = None) -> Gradients:
    """Read a scan's gradient files (or, ``bvals`` a :class:`~mixmap.io.fields.FieldFiles`, a
    relaxometry scan's acquisition files: every volume kept).

    ``bvals`` and ``bvecs``: FSL files (b-values in s/mm², ms/µm² detected; bvecs as 3 rows or
    3 columns). ``bvecs`` None: ``bvals`` is an MRtrix gradient table (``x y z b`` rows,
    scanner coordinates, converted with the image ``affine``), or b-values alone for a model
    without directions. Volumes at b > 0 without a direction are dropped with a warning.
    """
    if isinstance(bvals, FieldFiles):
        acq = bvals.read()
        return Gradients(acq, np.arange(acq.n), acq.n, {})
    bvals = Path(bvals)
    table = read_table(bvals)
    source, vec_source = str(bvals), None
    if bvecs is None and is_mrtrix_table(table):
        if affine is None:
            raise AcquisitionError(f"{bvals}: an MRtrix gradient table needs the image's "
                                   f"affine to turn scanner directions into image axes")
        b, vecs = table[:, 3], mrtrix_to_fsl(table[:, :3], affine)
        notes = ["MRtrix gradient table (scanner coordinates)"]
    elif table.ndim == 2 and min(table.shape) != 1:
        raise AcquisitionError(
            f"{bvals}: a table of shape {table.shape}; give one b-value per volume (one row or "
            f"one column), or an MRtrix table of 4 columns (x y z b) with --grad"
        )
    else:
        b, vecs, notes = table.ravel(), None, []
        if bvecs is not None:
            bvecs = Path(bvecs)
            vec_source = str(bvecs)
            vecs = read_bvec_table(bvecs, b.size)
            if vecs.ndim == 2 and vecs.shape[0] == 3:  # FSL: 3 rows (a 3x3 table too)
                vecs = vecs.T
                notes.append("bvecs as 3 rows (FSL)")
            elif vecs.ndim == 2 and vecs.shape[1] == 3:
                notes.append("bvecs as 3 columns")
    keep = np.ones(b.size, dtype=bool)
    dropped: dict[int, str] = {}
    if vecs is not None and vecs.ndim == 2 and vecs.shape == (b.size, 3):
        # the b=0 threshold in the file's unit (ms/µm² detected as Acquisition does)
        scale = 1.0 if b.max(initial=0) < MS_UM2_THRESHOLD else 1000.0
        trace = (b > B0_THRESHOLD * scale) & (np.linalg.norm(vecs, axis=1) < TRACE_NORM)
        if trace.any() and trace.sum() == (b > B0_THRESHOLD * scale).sum():
            raise AcquisitionError(f"{vec_source or source}: no volume at b > 0 has a gradient "
                                   f"direction; give the bvec file the scanner wrote")
        if trace.any():
            idx = np.flatnonzero(trace)
            log.warning("%s: volume%s %s at b > 0 without a gradient direction (a scanner's "
                        "trace image) left out of the fit", vec_source or source,
                        "s" if idx.size > 1 else "", ", ".join(map(str, idx)))
            dropped = {int(i): "b > 0 without a direction (trace volume)" for i in idx}
            keep = ~trace
            notes.append(f"{idx.size} trace volume(s) left out")
        vecs = vecs[keep]
    # (3, n) is always read as rows, so the orientation found above is kept for any n
    if vecs is not None and vecs.ndim == 2 and vecs.shape[1] == 3:
        vecs = vecs.T
    acq = Acquisition.from_arrays(b[keep], vecs, source=source, bvec_source=vec_source)
    acq = Acquisition(acq.fields, source=acq.source, notes=tuple(notes) + tuple(
        n for n in acq.notes if not n.startswith("bvecs as 3")))
    return Gradients(acq, np.flatnonzero(keep), int(b.size), dropped)
