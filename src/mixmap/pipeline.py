"""Load -> fit -> write: a scan, a cohort of scans (pooled or streamed), and a trained model
applied to new scans. The CLI's ``fit`` and ``apply`` are calls to :func:`fit_inputs` and
:func:`apply_inputs`.

What is written (all in one atomic step per call, nothing over existing maps without
``force``): the maps and sidecars of :func:`mixmap.io.save_maps`; for a learned fitter the
trained model in ``OUT/model-<m>_method-<method>/`` (``save_model``); for a cohort each subject's
maps in ``OUT/sub-<label>/[ses-<label>/]dwi/`` and ``OUT/cohort.json`` (see :mod:`mixmap.cohort`).
Under torchrun every process trains (and maps), and only the main one writes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from mixmap import cohort as co
from mixmap.acquisition import Acquisition
from mixmap.api import Fit
from mixmap.fitting.base import FitResult
from mixmap.fitting.learned import LearnedFitter, distributed
from mixmap.io import (
    AtomicOutput,
    DWIData,
    OutputLock,
    existing_maps,
    load_dwi,
    save_maps,
    stage_maps,
)
from mixmap.io.discovery import Scan, find_scans
from mixmap.io.fields import FieldFiles
from mixmap.io.gradients import gradient_files
from mixmap.io.naming import COHORT_JSON, checkpoint_name, model_folder, report_name
from mixmap.io.nifti import bids_entities
from mixmap.io.output import command_line, phase_seconds
from mixmap.models import UnsupportedAcquisition, get_model
from mixmap.report import write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    """What a run wrote: the map paths, and the number of scans of a cohort (None: one scan)."""

    maps: list
    n_scans: int | None = None

    def summary(self, out: Path) -> str:
        """``wrote <n> maps [of <k> scans] to <out>/``."""
        of = "" if self.n_scans is None else f" of {self.n_scans} scans"
        return f"wrote {len(self.maps)} maps{of} to {out}/"


# ------------------------------------------------------------------------------- checks
def is_cohort(inputs: Sequence[Path]) -> bool:
    """Several scans or a folder: the cohort path. One file: the single-scan path."""
    return len(inputs) > 1 or Path(inputs[0]).is_dir()


def _single_scan_gradients(bvals: Path | None, bvecs: Path | None,
                           mask_pattern: str | None) -> None:
    if bvals is None or bvecs is None:
        raise ValueError("give --bvals and --bvecs (or an MRtrix --grad table) for a single "
                         "scan (several scans or a BIDS folder use each scan's sibling "
                         ".bval/.bvec)")
    if mask_pattern is not None:
        raise ValueError("--mask-pattern is for several scans or a BIDS folder; give --mask for "
                         "a single scan")


def _refuse_single_mask(mask: Path | None) -> None:
    if mask is not None:
        raise ValueError(
            f"--mask {mask}: one mask for several scans is ambiguous; put each scan's mask beside "
            f"it (<prefix>_desc-brain_mask.nii.gz or <prefix>_mask.nii.gz) or give --mask-pattern"
        )


def check_supported(model: str, acquisition: Acquisition, bvals: Path) -> None:
    """Raise :class:`UnsupportedAcquisition` naming ``bvals`` when ``model`` cannot be fitted
    to ``acquisition``."""
    try:
        get_model(model).check_fit(acquisition, str(bvals))
    except UnsupportedAcquisition as exc:
        raise UnsupportedAcquisition(
            f"{bvals}: {exc}; choose a model this scheme supports (see `mixmap check`)"
        ) from None


def input_checksums(**paths: Path | FieldFiles | None) -> dict[str, str]:
    """``{key: "<name> sha256:<hex>"}`` of each given file (a folder: all its files in sorted
    order; :class:`FieldFiles`: each of its files), recorded in the sidecar so a run can be
    traced and rerun; None entries are skipped."""
    out = {}
    for key, path in paths.items():
        if isinstance(path, FieldFiles):
            out.update(input_checksums(**{f"{key}_{name}": p
                                          for name, p in path.files().items()}))
            continue
        if path is None:
            continue
        h = hashlib.sha256()
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(
            path).is_dir() else [Path(path)]
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        out[key] = f"{Path(path).name} sha256:{h.hexdigest()}"
    return out


# ------------------------------------------------------------------------------- one scan
def save_timed(result: FitResult, data: DWIData, out: Path, *, force: bool,
               extra: dict, extras=None) -> list[Path]:
    """:func:`~mixmap.io.save_maps` (with ``extras(w)``, staged beside the maps in the same
    atomic step), then one log line with every phase's seconds, the load's first and the
    write's last (fit.json, written by it, cannot hold its own time)."""
    t0 = time.perf_counter()
    written = save_maps(result, data, out, force=force, extra=extra, extras=extras)
    phases = {**phase_seconds(result, data), "write": time.perf_counter() - t0}
    log.info("seconds: %s (%s)", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
             result.device)
    return written


def use_checkpoint(fitter, ckpt: Path, resume: bool) -> None:
    """A learned fitter keeps its training checkpoint at ``ckpt`` (continued when ``resume``);
    other fitters have none."""
    if isinstance(fitter, LearnedFitter):
        fitter.use_checkpoint(ckpt, resume=resume)
        if ckpt.exists() and not resume:
            log.info("%s: an earlier run's checkpoint; it is replaced (use --resume to "
                     "continue it)", ckpt)


def fit_scan(fitter, dwi: Path, bvals: Path, bvecs: Path | None, mask: Path | None, *,
             out: Path, seed: int, force: bool, save_model: bool, resume: bool,
             mask_threshold: float | None = None, ignore_mask_affine: bool = False,
             max_b: float | None = None, report: bool = True, work: Path | None = None
             ) -> list[Path]:
    """Load one scan (:func:`~mixmap.io.load_dwi`: ``bvecs`` None for an MRtrix table in
    ``bvals``; the mask options; ``max_b`` the volume selection), fit it, write its maps (a
    learned fitter's model, and the HTML report when ``report``) to ``out``; a learned
    fitter's training checkpoint goes to ``work`` (default ``out``).

    OUT is checked for this model's maps before the fit, not after it, and held
    (:class:`~mixmap.io.OutputLock`) until the maps are written. Returns the written map
    paths ([] on a torchrun process other than the main one).
    """
    model, method = fitter.model.name, fitter.name
    clash = existing_maps(out, bids_entities(dwi), model)
    if clash and not force:
        raise FileExistsError(
            f"{out}: already holds {model} maps ({clash[0].name} ...); use --force to overwrite "
            f"them or choose another --out"
        )
    data = load_dwi(dwi, bvals, bvecs, mask, mask_threshold=mask_threshold,
                    ignore_mask_affine=ignore_mask_affine, max_b=max_b)
    check_supported(model, data.acquisition, bvals)
    log.info("%s: %d voxels × %d measurements", dwi, *data.signals.shape)
    scope = bids_entities(dwi) or "scan"
    with OutputLock(out, enabled=distributed.is_main()):
        use_checkpoint(fitter, Path(work or out) / checkpoint_name(scope, model, method),
                       resume)
        result = fitter.fit(data.signals, data.acquisition)
        if not distributed.is_main():
            return []
        extra = {**dropped_record(data), "Seed": seed,
                 "InputChecksums": input_checksums(dwi=dwi, bvals=bvals, bvecs=bvecs,
                                                   mask=mask)}
        fitted = Fit(result, data, fitter)
        written = save_timed(result, data, out, force=force, extra=extra,
                             extras=lambda w: fitted.stage_extras(w, save_model=save_model,
                                                                  report=report,
                                                                  command=command_line()))
        if isinstance(fitter, LearnedFitter):
            fitter.finish_checkpoint()
    return written


def dropped_record(data: DWIData) -> dict:
    """What fit.json records of the input left out: ``DroppedVoxels`` (a count) and, where any,
    ``DroppedVolumes`` (``{volume index in the file: reason}``)."""
    out: dict = {"DroppedVoxels": data.n_dropped}
    if data.dropped_volumes:
        out["DroppedVolumes"] = {str(k): v for k, v in data.dropped_volumes.items()}
    return out


def apply_scan(model_file: Path, dwi: Path, bvals: Path, bvecs: Path | None,
               mask: Path | None, *, out: Path, device: str, force: bool,
               allow_other_acquisition: bool, mask_threshold: float | None = None,
               ignore_mask_affine: bool = False, max_b: float | None = None) -> list[Path]:
    """Map one scan with the trained model saved at ``model_file`` (no training) and write the
    maps to ``out``. Returns the written map paths ([] on a non-main torchrun process)."""
    from mixmap.fitting import load_fitter

    fitter = load_fitter(model_file, device=device)
    data = load_dwi(dwi, bvals, bvecs, mask, mask_threshold=mask_threshold,
                    ignore_mask_affine=ignore_mask_affine, max_b=max_b)
    check_supported(fitter.model.name, data.acquisition, bvals)
    with OutputLock(out, enabled=distributed.is_main()):
        result = fitter.apply(data.signals, data.acquisition,
                              allow_other_acquisition=allow_other_acquisition)
        if not distributed.is_main():
            return []
        extra = {"TrainedModel": str(model_file), **dropped_record(data),
                 "InputChecksums": input_checksums(model=model_file, dwi=dwi, bvals=bvals,
                                                   bvecs=bvecs, mask=mask)}
        return save_timed(result, data, out, force=force, extra=extra)


# ------------------------------------------------------------------------------- a cohort
@dataclass
class _CohortRun:
    """What every written piece of one cohort fit shares."""

    fitter: object
    scans: list[Scan]
    acquisition: Acquisition
    seed: int
    model_dir: str | None
    report: bool = True

    def stage(self, w: AtomicOutput, scan: Scan, data: DWIData, result: FitResult,
              scale: float) -> list[str]:
        """Stage one subject's maps (and its report) in its folder."""
        extra = {**dropped_record(data), "Seed": self.seed, "CohortSignalScale": scale,
                 "Cohort": COHORT_JSON, "TrainedModel": self.model_dir,
                 "InputChecksums": input_checksums(dwi=scan.dwi, bvals=scan.bvals,
                                                   bvecs=scan.bvecs, mask=scan.mask)}
        written = stage_maps(w, result, data, scan.folder, extra=extra)
        if self.report:
            name = f"{scan.folder}/{report_name(scan.entities, result.model)}"
            write_report(Fit(result, data, self.fitter), w.path(name), command=command_line())
        return written

    def finish(self, w: AtomicOutput, infos: Sequence[co.ScanInfo], pooled: FitResult, *,
               trained_on: int | None, streamed: bool) -> None:
        summary = co.cohort_summary(self.scans, infos, self.acquisition, pooled,
                                    model_dir=self.model_dir, seed=self.seed,
                                    trained_on=trained_on)
        summary["Streamed"] = streamed
        co.write_cohort_extras(w, summary, pooled)
        if self.model_dir is not None:
            self.fitter.save(w.path(self.model_dir))


def _fit_pooled(run: _CohortRun, out: Path, force: bool) -> list[str] | None:
    """All scans in memory, one fit on the pooled voxels; None on a non-main process."""
    cohort = co.load_cohort(run.scans)
    log.info("cohort: %d scans, %d voxels × %d measurements", len(run.scans),
             sum(cohort.sizes), run.acquisition.n)
    pooled, results = co.fit_pooled(run.fitter, cohort)
    if not distributed.is_main():
        return None
    written: list[str] = []
    with AtomicOutput(out, force=force) as w:
        for scan, d, res, scale in zip(run.scans, cohort.data, results, cohort.scales,
                                       strict=True):
            written += run.stage(w, scan, d, res, scale)
        run.finish(w, cohort.infos, pooled, trained_on=None, streamed=False)
    return written


def _fit_streamed(run: _CohortRun, out: Path, force: bool, budget: int) -> list[str] | None:
    """One scan in memory at a time: a learned fitter trains on a sample of ``budget`` voxels
    and then maps each scan; least squares fits each scan on its own. None on a non-main
    process."""
    fitter, scans = run.fitter, run.scans
    learned = isinstance(fitter, LearnedFitter)
    pooled, infos, trained_on = None, [], None
    if learned:
        sample, infos = co.sample_cohort(scans, budget, run.seed)
        trained_on = sample.shape[0]
        log.info("cohort: %d scans, %d voxels; the model trains on a sample of %d "
                 "(--train-voxels), then maps each scan in turn", len(scans),
                 sum(i.n_voxels for i in infos), trained_on)
        pooled = fitter.fit(sample, run.acquisition)
        del sample
    if not distributed.is_main():
        if learned:  # mapping a scan is shared by all processes too
            for _ in co.map_scans(fitter, scans, trained=True):
                pass
        return None
    written: list[str] = []
    with AtomicOutput(out, force=force) as w:
        infos_seen = []
        for scan, d, res in co.map_scans(fitter, scans, trained=learned):
            scale = res.settings.get("signal_scale", 1.0)
            written += run.stage(w, scan, d, res, scale)
            if not learned:
                infos_seen.append(co.ScanInfo.of(d, scale))
                # each scan fitted on its own: no noise level pooled over the cohort
                pooled = pooled or replace(res, noise_sigma=None)
        if not learned:
            infos, trained_on = infos_seen, None
        run.finish(w, infos, pooled, trained_on=trained_on, streamed=True)
    return written


def fit_cohort(fitter, inputs: Sequence[Path], bvals: Path | None, bvecs: Path | None,
               mask_pattern: str | None, *, out: Path, seed: int, force: bool,
               save_model: bool, resume: bool, train_voxels: int | None = None,
               work: Path | None = None, report: bool = True, **scan_options
               ) -> tuple[list[str], int]:
    """Fit one shared model to a cohort (see :mod:`mixmap.cohort`) and write every subject's
    maps, the model and ``cohort.json`` in one atomic step.

    Every input is found and checked, and OUT checked, before the (long) fit. A cohort of more
    than ``train_voxels`` voxels (default :data:`mixmap.cohort.TRAIN_VOXELS`) is streamed.
    ``scan_options``: ``grad``, ``mask_threshold``, ``ignore_mask_affine``, ``max_b`` of
    :func:`mixmap.io.discovery.find_scans`; ``work``: where the training checkpoint goes (default
    ``out``). Returns (map paths relative to ``out``, number of scans); no maps on a non-main
    process.
    """
    model, method = fitter.model.name, fitter.name
    scans = find_scans(inputs, bvals=bvals, bvecs=bvecs, mask_pattern=mask_pattern,
                       **scan_options)
    acq = co.check_acquisitions(scans)
    check_supported(model, acq, scans[0].bvals)
    learned = isinstance(fitter, LearnedFitter)
    model_dir = model_folder(model, method) if save_model and learned else None
    co.check_outputs(out, scans, model, force=force,
                     also=[COHORT_JSON, *([model_dir] if model_dir else [])])
    budget = co.TRAIN_VOXELS if train_voxels is None else int(train_voxels)
    if budget < 1:
        raise ValueError(f"--train-voxels {train_voxels}: give a positive number of voxels")
    streamed = co.estimated_voxels(scans) > budget
    with OutputLock(out, enabled=distributed.is_main()):
        use_checkpoint(fitter, Path(work or out) / checkpoint_name("cohort", model, method),
                       resume)
        run = _CohortRun(fitter, scans, acq, seed, model_dir, report)
        written = (_fit_streamed(run, out, force, budget) if streamed
                   else _fit_pooled(run, out, force))
        if written is None:
            return [], len(scans)
        if learned:
            fitter.finish_checkpoint()
    return written, len(scans)


def apply_cohort(model_file: Path, inputs: Sequence[Path], bvals: Path | None,
                 bvecs: Path | None, mask_pattern: str | None, *, out: Path, device: str,
                 force: bool, allow_other_acquisition: bool, **scan_options
                 ) -> tuple[list[str], int]:
    """Map every scan of a cohort with the trained model at ``model_file``, one scan in memory
    at a time, into ``OUT/sub-<label>/[ses-<label>/]dwi/``. Every scan's acquisition is checked
    against the training one before any is mapped. Returns (map paths relative to ``out``,
    number of scans)."""
    from mixmap.fitting import load_fitter

    fitter = load_fitter(model_file, device=device)
    scans = find_scans(inputs, bvals=bvals, bvecs=bvecs, mask_pattern=mask_pattern,
                       **scan_options)
    for scan in scans:
        acq = scan.acquisition()
        check_supported(fitter.model.name, acq, scan.bvals)
        if (not acq.same_scheme(Acquisition.from_record(fitter.trained["acquisition"]))
                and not allow_other_acquisition):
            raise ValueError(
                f"{scan.bvals}: the acquisition of {scan.dwi.name} differs from the one this "
                f"model was trained on ({model_file}); retrain on these scans, or pass "
                f"--allow-other-acquisition to apply it anyway"
            )
    co.check_outputs(out, scans, fitter.model.name, force=force)
    written: list[str] = []  # a scan that fails to load leaves nothing written
    with OutputLock(out, enabled=distributed.is_main()), AtomicOutput(out, force=force) as w:
        for scan, d, res in co.map_scans(fitter, scans, trained=True,
                                         allow_other_acquisition=allow_other_acquisition):
            if distributed.is_main():
                written += stage_maps(w, res, d, scan.folder, extra={
                    "TrainedModel": str(model_file), **dropped_record(d),
                    "InputChecksums": input_checksums(model=model_file, dwi=scan.dwi,
                                                      bvals=scan.bvals, bvecs=scan.bvecs,
                                                      mask=scan.mask)})
    return written, len(scans)


# ------------------------------------------------------------------------------- dispatch
def _gradient_files(inputs: Sequence[Path], bvals: Path | None, bvecs: Path | None,
                    grad: Path | None, mask_pattern: str | None,
                    fields: FieldFiles | None = None
                    ) -> tuple[Path | FieldFiles | None, Path | None]:
    """(bvals, bvecs) for one scan (an MRtrix ``grad`` table as bvals, bvecs None; a
    relaxometry scan's ``fields`` as bvals), checked; a cohort's gradient files are found per
    scan (:func:`mixmap.io.discovery.find_scans`)."""
    if fields is not None:
        gradient_files(bvals, bvecs, grad, fields)
        if is_cohort(inputs):
            raise ValueError(f"{fields}: relaxometry files are for one scan; fit each "
                             f"relaxometry scan on its own (cohorts are diffusion only)")
        if mask_pattern is not None:
            raise ValueError("--mask-pattern is for several scans; give --mask for one scan")
        return fields, None
    table, vecs = gradient_files(bvals, bvecs, grad)
    if is_cohort(inputs):
        return bvals, bvecs
    # an MRtrix table needs no bvecs: only the --mask-pattern check then
    _single_scan_gradients(table, vecs if grad is None else table, mask_pattern)
    return table, vecs


def fit_inputs(fitter, inputs: Sequence[Path], *, bvals: Path | None, bvecs: Path | None,
               mask: Path | None, mask_pattern: str | None, out: Path, seed: int, force: bool,
               save_model: bool, resume: bool, train_voxels: int | None,
               grad: Path | None = None, mask_threshold: float | None = None,
               ignore_mask_affine: bool = False, max_b: float | None = None,
               report: bool = True, fields: FieldFiles | None = None) -> Written:
    """``mixmap fit``: one DWI file -> :func:`fit_scan`; several, or a BIDS folder ->
    :func:`fit_cohort`. Options that do not apply to the chosen path are refused. ``grad``:
    an MRtrix gradient table instead of ``bvals``/``bvecs``; ``max_b`` (s/mm²): volumes above
    it are left out of every scan; ``fields``: a relaxometry scan's files instead of
    gradients."""
    if resume and not isinstance(fitter, LearnedFitter):
        raise ValueError(f"--resume applies to learned methods, not --method {fitter.name}")
    bvals, bvecs = _gradient_files(inputs, bvals, bvecs, grad, mask_pattern, fields)
    masks = {"mask_threshold": mask_threshold, "ignore_mask_affine": ignore_mask_affine,
             "max_b": max_b}
    if is_cohort(inputs):
        _refuse_single_mask(mask)
        maps, n_scans = fit_cohort(fitter, inputs, bvals, bvecs, mask_pattern, out=out,
                                   seed=seed, force=force, save_model=save_model,
                                   resume=resume, train_voxels=train_voxels, grad=grad,
                                   report=report, **masks)
        return Written(maps, n_scans)
    if train_voxels is not None:
        raise ValueError("--train-voxels is for several scans or a BIDS folder; a single scan "
                         "always trains on all its voxels")
    return Written(fit_scan(fitter, inputs[0], bvals, bvecs, mask, out=out, seed=seed,
                            force=force, save_model=save_model, resume=resume, report=report,
                            **masks))


def apply_inputs(model_file: Path, inputs: Sequence[Path], *, bvals: Path | None,
                 bvecs: Path | None, mask: Path | None, mask_pattern: str | None, out: Path,
                 device: str, force: bool, allow_other_acquisition: bool,
                 grad: Path | None = None, mask_threshold: float | None = None,
                 ignore_mask_affine: bool = False, max_b: float | None = None,
                 fields: FieldFiles | None = None) -> Written:
    """``mixmap apply``: one DWI file -> :func:`apply_scan`; several, or a BIDS folder ->
    :func:`apply_cohort`; ``fields``: a relaxometry scan's files instead of gradients."""
    bvals, bvecs = _gradient_files(inputs, bvals, bvecs, grad, mask_pattern, fields)
    masks = {"mask_threshold": mask_threshold, "ignore_mask_affine": ignore_mask_affine,
             "max_b": max_b}
    if is_cohort(inputs):
        _refuse_single_mask(mask)
        maps, n_scans = apply_cohort(model_file, inputs, bvals, bvecs, mask_pattern, out=out,
                                     device=device, force=force,
                                     allow_other_acquisition=allow_other_acquisition,
                                     grad=grad, **masks)
        return Written(maps, n_scans)
    return Written(apply_scan(model_file, inputs[0], bvals, bvecs, mask, out=out, device=device,
                              force=force, allow_other_acquisition=allow_other_acquisition,
                              **masks))


__all__ = [
    "Written",
    "apply_cohort",
    "apply_inputs",
    "apply_scan",
    "check_supported",
    "fit_cohort",
    "fit_inputs",
    "fit_scan",
    "input_checksums",
    "is_cohort",
    "save_timed",
    "use_checkpoint",
]
