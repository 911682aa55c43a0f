"""Cohorts: several scans, one shared model.

A cohort is a list of DWI files, or a BIDS dataset folder (``sub-*/[ses-*/]dwi/*_dwi.nii.gz``),
whose scans, gradient files and masks :mod:`mixmap.io.discovery` finds. Its scans must share
one acquisition (:meth:`Acquisition.same_scheme`): one model is trained on the voxels of all of
them, and each subject's maps are written in BIDS-derivative layout,
``OUT/sub-<label>/[ses-<label>/]dwi/<entities>_model-<m>_param-<p>_dwimap.nii.gz``, with the
shared model once at ``OUT/model-<m>_method-<method>/`` and a summary in ``OUT/cohort.json``.

Intensities: subjects differ in scanner gain, so each scan is divided by its own
:func:`~mixmap.fitting.base.signal_scale` before the voxels are pooled, and scaled parameters
(S0) and their standard deviations are multiplied back by that scan's scale. The pooled data
then has a signal scale of about 1 (each scan's 95th percentile of b=0 is 1, so is the pool's).

Size: a cohort of up to :data:`TRAIN_VOXELS` voxels (``--train-voxels``) is held in memory and
the model is trained on all of its voxels. A larger one (hundreds of subjects) is streamed: each
scan is loaded in turn, checked, and an equal random share of the budget is kept from it
(normalised by its own scale); the model is trained on that sample, then every scan is loaded
again and mapped with the trained model (as ``mixmap apply`` maps a new scan: its own scale and
noise level), one scan in memory at a time. Least squares is voxelwise: it fits each scan on its
own in that case. Epochs of the learned fitters are capped at 50,000 voxels anyway, so a sample
of millions of voxels loses nothing that training could use.

Noise: a learned fitter estimates one noise level from the repeated b=0 volumes of all pooled
voxels (median of per-voxel variances), in normalised units, i.e. relative to each scan's
signal scale. That is the right likelihood when the scans have a similar SNR at their own
scale, which a harmonised cohort has; each scan's own estimate is written to ``cohort.json``
and a spread of more than :data:`SNR_SPREAD_WARNING` between scans is logged. Each subject's
``NoiseSigma`` is the pooled level times its scale (its input units). ``mixmap apply`` on a new
scan uses that scan's own scale and b=0 noise estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mixmap._version import __version__
from mixmap.acquisition import Acquisition
from mixmap.fitting.base import FitResult, noise_sigma_from_repeats, signal_scale
from mixmap.io import AtomicOutput, DWIData, InputError, existing_maps
from mixmap.io.discovery import Scan
from mixmap.io.naming import COHORT_JSON, cohort_loss_csv_name, model_folder
from mixmap.io.output import command_line, loss_csv

log = logging.getLogger(__name__)

#: Ratio of the largest to the smallest per-scan noise level (normalised units) above which
#: the pooled noise estimate is called out in the log.
SNR_SPREAD_WARNING = 1.5

#: Voxels of a cohort above which it is streamed (the model trained on a sample of this size).
TRAIN_VOXELS = 2_000_000


@dataclass(frozen=True)
class ScanInfo:
    """What the cohort summary keeps of a scan once its voxels are let go."""

    n_voxels: int
    n_dropped: int
    scale: float
    noise: float | None  # b=0 noise level relative to the scan's scale

    @classmethod
    def of(cls, data: DWIData, scale: float) -> ScanInfo:
        sigma = noise_sigma_from_repeats(data.signals, data.acquisition)
        return cls(int(data.signals.shape[0]), int(data.n_dropped), float(scale),
                   None if sigma is None else sigma / scale)


@dataclass
class Cohort:
    """Scans that were loaded and checked to share one acquisition, with what the summary
    keeps of each (its scale and noise level, computed once)."""

    scans: list[Scan]
    data: list[DWIData]
    infos: list[ScanInfo]

    @property
    def acquisition(self) -> Acquisition:
        return self.data[0].acquisition

    @property
    def sizes(self) -> list[int]:
        return [i.n_voxels for i in self.infos]

    @property
    def scales(self) -> list[float]:
        return [i.scale for i in self.infos]


def check_acquisitions(scans: Sequence[Scan]) -> Acquisition:
    """Read every scan's gradient files and refuse a cohort whose acquisitions differ (one
    shared model needs one scheme). Returns the common acquisition."""
    first = scans[0].acquisition()
    for scan in scans[1:]:
        acq = scan.acquisition()
        if not acq.same_scheme(first):
            raise InputError(
                f"{scan.bvals}: acquisition of {scan.dwi.name} ({_scheme_text(acq)}) differs "
                f"from {scans[0].bvals.name} ({_scheme_text(first)}); one shared model needs one "
                f"acquisition: fit each acquisition's scans with a separate `mixmap fit`"
            )
    return first


def _scheme_text(acq: Acquisition) -> str:
    shells = " + ".join(f"b={round(s.bval * 1000)}×{s.n}" for s in acq.shells())
    return f"{acq.n} volumes: {shells}, fingerprint {acq.fingerprint()}"


def load_cohort(scans: Sequence[Scan]) -> Cohort:
    """Load every scan (all inputs are read and checked before anything is fitted), after
    refusing scans whose acquisitions differ."""
    check_acquisitions(scans)
    data = [scan.load() for scan in scans]
    for scan, d in zip(scans, data, strict=True):  # after all loaded: an error stays one line
        log.info("%s: %d voxels × %d measurements%s", scan.dwi, *d.signals.shape,
                 "" if scan.mask else " (no mask: voxels with positive b=0 signal)")
    return Cohort(list(scans), data,
                  [ScanInfo.of(d, signal_scale(d.signals, d.acquisition)) for d in data])


# ------------------------------------------------------------------------------- fitting
def pooled_signals(cohort: Cohort) -> np.ndarray:
    """All voxels of the cohort, each scan divided by its own signal scale: (Σ n_i, n_meas)."""
    return np.concatenate([d.signals / np.float32(s) for d, s in zip(cohort.data, cohort.scales,
                                                                       strict=True)], 0)


def split_result(result: FitResult, sizes: Sequence[int], scales: Sequence[float],
                 model) -> list[FitResult]:
    """One FitResult of pooled, normalised voxels -> one per scan, in that scan's units: rows
    split by ``sizes``, scaled parameters (S0) and their std multiplied by the scan's scale.
    The loss curve stays with the cohort (it is written once, beside ``cohort.json``)."""
    scaled = {p.name for p in model.parameters if p.scaled}
    bounds = np.cumsum([0, *sizes])
    if bounds[-1] != result.n_voxels:
        raise RuntimeError(f"{result.n_voxels} fitted voxels but the scans have {bounds[-1]}")
    base = result.settings.get("signal_scale", 1.0)
    out = []
    for i, scale in enumerate(scales):
        rows = slice(int(bounds[i]), int(bounds[i + 1]))
        params = {k: v[rows] * np.float32(scale) if k in scaled else v[rows]
                  for k, v in result.params.items()}
        std = {k: v[rows] * np.float32(scale) if k in scaled else v[rows]
               for k, v in result.std.items()}
        probs = None if result.cluster_probs is None else result.cluster_probs[rows]
        sigma = None if result.noise_sigma is None else result.noise_sigma * scale
        out.append(replace(result, params=params, std=std, cluster_probs=probs, history=[],
                           noise_sigma=sigma,
                           settings={**result.settings, "signal_scale": base * scale}))
    return out


def _warn_noise_spread(infos: Sequence[ScanInfo]) -> None:
    known = [i.noise for i in infos if i.noise is not None]
    if len(known) > 1 and max(known) > SNR_SPREAD_WARNING * min(known):
        log.warning("cohort: noise levels relative to each scan's signal scale range from %.3g "
                    "to %.3g; the learned fitters use one pooled level for all scans",
                    min(known), max(known))


def fit_pooled(fitter, cohort: Cohort) -> tuple[FitResult, list[FitResult]]:
    """Fit one model on the pooled, per-scan normalised voxels. Returns the pooled result
    (normalised units, with the loss curve) and one result per scan (its own units)."""
    _warn_noise_spread(cohort.infos)
    pooled = fitter.fit(pooled_signals(cohort), cohort.acquisition)
    return pooled, split_result(pooled, cohort.sizes, cohort.scales, fitter.model)


def estimated_voxels(scans: Sequence[Scan]) -> int:
    """Voxels the cohort will have, from the masks (the whole grid for a scan without one),
    read without loading any DWI: decides whether the cohort is streamed."""
    import nibabel as nib

    total = 0
    for scan in scans:
        if scan.mask is not None:
            total += int((np.asarray(nib.load(str(scan.mask)).dataobj) > 0).sum())
        else:
            total += int(np.prod(nib.load(str(scan.dwi)).shape[:3]))
    return total


def load_scan(scan: Scan) -> DWIData:
    data = scan.load()
    log.info("%s: %d voxels × %d measurements%s", scan.dwi, *data.signals.shape,
             "" if scan.mask else " (no mask: voxels with positive b=0 signal)")
    return data


def sample_cohort(scans: Sequence[Scan], train_voxels: int, seed: int = 0
                  ) -> tuple[np.ndarray, list[ScanInfo]]:
    """Load and check every scan in turn, keeping an equal random share of ``train_voxels``
    from each (normalised by its own scale): (sample (n, m) float32, each scan's info). Only
    one scan and the sample are in memory at a time."""
    check_acquisitions(scans)
    share = max(1, -(-int(train_voxels) // len(scans)))
    rng = np.random.default_rng(seed)
    parts, infos = [], []
    for scan in scans:
        data = load_scan(scan)
        scale = signal_scale(data.signals, data.acquisition)
        infos.append(ScanInfo.of(data, scale))
        n = data.signals.shape[0]
        rows = np.sort(rng.choice(n, size=min(n, share), replace=False))
        parts.append(data.signals[rows] / np.float32(scale))
        del data
    _warn_noise_spread(infos)
    return np.concatenate(parts, 0), infos


def map_scans(fitter, scans: Sequence[Scan], *, trained: bool,
              allow_other_acquisition: bool = False):
    """Yield (scan, data, result) one scan at a time: ``trained`` fitters map each scan as a
    new scan (:meth:`apply`); others (least squares) fit each scan, normalised by its own
    scale, on its own."""
    for scan in scans:
        data = load_scan(scan)
        if trained:
            res = fitter.apply(data.signals, data.acquisition,
                               allow_other_acquisition=allow_other_acquisition)
        else:
            scale = signal_scale(data.signals, data.acquisition)
            res = split_result(fitter.fit(data.signals / np.float32(scale), data.acquisition),
                               [data.signals.shape[0]], [scale], fitter.model)[0]
        yield scan, data, res


# ------------------------------------------------------------------------------- output
def check_outputs(out: Path, scans: Sequence[Scan], model: str, *, force: bool,
                  also: Sequence[str] = ()) -> None:
    """Refuse, before any fitting, an OUT that holds maps of these scans (or ``also`` entries
    such as cohort.json and the model folder) unless ``force``."""
    if force:
        return
    for scan in scans:
        clash = existing_maps(out / scan.folder, scan.entities, model)
        if clash:
            raise FileExistsError(
                f"{out / scan.folder}: already holds {model} maps ({clash[0].name} ...); use "
                f"--force to overwrite them or choose another --out"
            )
    for rel in also:
        if (out / rel).exists():
            raise FileExistsError(f"{out / rel}: already exists; use --force to overwrite it or "
                                  f"choose another --out")


def cohort_summary(scans: Sequence[Scan], infos: Sequence[ScanInfo], acquisition: Acquisition,
                   pooled: FitResult, *, model_dir: str | None, seed: int,
                   trained_on: int | None = None) -> dict:
    """What ``OUT/cohort.json`` holds: subjects, voxels, acquisition, method and settings."""
    subjects = []
    for scan, info in zip(scans, infos, strict=True):
        subjects.append({
            "Subject": scan.subject, "Session": scan.session, "Entities": scan.entities,
            "Maps": scan.folder, "DWI": str(scan.dwi), "Bvals": str(scan.bvals),
            "Bvecs": str(scan.bvecs), "Mask": None if scan.mask is None else str(scan.mask),
            "NumberOfVoxels": info.n_voxels, "DroppedVoxels": info.n_dropped,
            "SignalScale": info.scale,
            "NoiseSigmaB0Normalised": info.noise,
        })
    return {
        "Model": pooled.model,
        "Method": pooled.method,
        "Settings": pooled.settings,
        "Seed": seed,
        "MixmapVersion": __version__,
        "CommandLine": command_line(),
        "Acquisition": acquisition.describe(),
        "AcquisitionFingerprint": acquisition.fingerprint(),
        "NumberOfVoxels": int(sum(i.n_voxels for i in infos)),
        "TrainingVoxels": int(trained_on if trained_on is not None
                              else sum(i.n_voxels for i in infos)),
        "NoiseSigmaNormalised": pooled.noise_sigma,
        "NoiseSigmaNote": "pooled over all scans, relative to each scan's SignalScale; each "
                          "subject's NoiseSigma (its fit.json) is this times its SignalScale",
        "TrainedModel": model_dir,
        "Subjects": subjects,
    }


def write_cohort_extras(w: AtomicOutput, summary: dict, pooled: FitResult) -> None:
    """Stage ``cohort.json`` and the shared loss curve (learned fitters)."""
    w.json(COHORT_JSON, summary)
    if pooled.history:
        w.text(cohort_loss_csv_name(pooled.model), loss_csv(pooled.history))


__all__ = [
    "Cohort",
    "ScanInfo",
    "check_acquisitions",
    "check_outputs",
    "fit_pooled",
    "load_cohort",
    "map_scans",
    "model_folder",
    "sample_cohort",
    "split_result",
    "write_cohort_extras",
]
