"""A BIDS App (``mixmap-bids BIDS_DIR OUTPUT_DIR participant|group``): maps for the DWI scans
of a BIDS dataset, written as a BIDS derivative dataset.

``participant``: every selected scan is fitted on its own, into
``OUTPUT_DIR/sub-<label>/[ses-<label>/]dwi/``, with its HTML report. ``group``: one model is
trained on all selected scans (a cohort, :mod:`mixmap.cohort`) and maps every one of them into
the same layout. ``OUTPUT_DIR/dataset_description.json`` says ``DatasetType: derivative`` and
``GeneratedBy`` mixmap. Gradients are each scan's sibling ``.bval``/``.bvec``; masks the
sibling ``*_desc-brain_mask.nii.gz`` where present (else voxels with positive b=0 signal).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mixmap._version import __version__
from mixmap.io import AtomicOutput, InputError
from mixmap.io.discovery import find_scans

log = logging.getLogger("mixmap")

#: The BIDS version the derivative's description declares.
BIDS_VERSION = "1.9.0"
LEVELS = ("participant", "group")


def validate_dataset(bids_dir: Path) -> None:
    """A light check of a BIDS dataset folder (the BIDS validator is not bundled): a
    ``dataset_description.json`` with ``Name`` and ``BIDSVersion``, and ``sub-*`` folders."""
    desc = bids_dir / "dataset_description.json"
    if not bids_dir.is_dir():
        raise InputError(f"{bids_dir}: not a folder; give the BIDS dataset's root folder")
    if not desc.exists():
        raise InputError(f"{desc}: not found; a BIDS dataset needs it (or pass "
                         f"--skip-bids-validation)")
    try:
        meta = json.loads(desc.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise InputError(f"{desc}: not readable JSON ({exc}); fix it or pass "
                         f"--skip-bids-validation") from None
    missing = [k for k in ("Name", "BIDSVersion") if k not in meta]
    if missing:
        raise InputError(f"{desc}: no {' or '.join(missing)}; BIDS requires both (or pass "
                         f"--skip-bids-validation)")
    if not any(bids_dir.glob("sub-*")):
        raise InputError(f"{bids_dir}: no sub-* folders; give the BIDS dataset's root folder")


def participant_labels(given: list[str] | None) -> list[str] | None:
    """Labels without ``sub-``, from values given with or without it, comma or space
    separated; None for every participant."""
    if not given:
        return None
    out = []
    for value in given:
        for part in value.replace(",", " ").split():
            out.append(part.removeprefix("sub-"))
    return out


def description(bids_dir: Path) -> dict:
    """The derivative dataset's ``dataset_description.json``."""
    return {
        "Name": "mixmap parameter maps",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "mixmap", "Version": __version__,
                         "Description": "quantitative MRI parameter maps with uncertainty"}],
        "SourceDatasets": [{"URL": bids_dir.resolve().as_uri()}],
    }


def run(fitter_factory, bids_dir: Path, output_dir: Path, level: str, *,
        labels: list[str] | None = None, skip_validation: bool = False,
        work_dir: Path | None = None, nprocs: int | None = None, seed: int = 0,
        force: bool = False, save_model: bool = True) -> list[str]:
    """Run the app; ``fitter_factory()`` makes a fresh fitter (one per scan at participant
    level, one for the group). Returns the written map paths (relative to ``output_dir``)."""
    from mixmap import pipeline

    if level not in LEVELS:
        raise ValueError(f"analysis level {level!r}: give participant or group")
    bids_dir, output_dir = Path(bids_dir), Path(output_dir)
    if output_dir.resolve() == bids_dir.resolve():
        raise ValueError(f"{output_dir}: the output folder is the input dataset; give another "
                         f"OUTPUT_DIR (e.g. {bids_dir}/derivatives/mixmap)")
    if not skip_validation:
        validate_dataset(bids_dir)
    if nprocs:
        torch.set_num_threads(int(nprocs))
    written: list[str] = []
    if level == "group":
        written, _ = pipeline.fit_cohort(fitter_factory(), [bids_dir], None, None, None,
                                         out=output_dir, seed=seed, force=force,
                                         save_model=save_model, resume=False, work=work_dir,
                                         participants=labels)
    else:
        scans = find_scans([bids_dir], participants=labels)
        for scan in scans:
            log.info("%s: fitting", scan.dwi)
            out = output_dir / scan.folder
            maps = pipeline.fit_scan(fitter_factory(), scan.dwi, scan.bvals, scan.bvecs,
                                     scan.mask, out=out, seed=seed, force=force,
                                     save_model=save_model, resume=False, work=work_dir)
            written += [str(Path(m).relative_to(output_dir)) for m in maps]
    with AtomicOutput(output_dir, force=True) as w:
        w.json("dataset_description.json", description(bids_dir))
    return written


__all__ = ["LEVELS", "description", "participant_labels", "run", "validate_dataset"]
