"""The ``mixmap`` command line (Typer).

Every command turns the errors a user can fix (a missing file, a bval/bvec mismatch, an output
that exists ...) into one line on stderr that names the file and the fix, and exit status 2.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import time
from enum import Enum
from pathlib import Path

import typer

from mixmap import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Quantitative MRI parameter maps from a latent space shared by all voxels.",
)
log = logging.getLogger("mixmap")

#: Exit status for input the user must fix (usage errors from Typer itself also use 2).
EXIT_BAD_INPUT = 2


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Noise(str, Enum):
    gaussian = "gaussian"
    rician = "rician"


def _user_errors():
    from mixmap.acquisition import AcquisitionError
    from mixmap.io import InputError, OutputExistsError
    from mixmap.models import UnsupportedAcquisition

    return (AcquisitionError, InputError, OutputExistsError, UnsupportedAcquisition,
            FileNotFoundError, FileExistsError, ValueError)


def handle_errors(fn):
    """Turn user-fixable errors into a one-line message and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            typer.echo(f"mixmap {fn.__name__.rstrip('_')}: error: {exc}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            typer.echo("mixmap: interrupted; no partial map was written (a learned fit keeps its "
                       "training checkpoint in --out: rerun with --resume to continue)", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _setup_logging(quiet: bool) -> None:
    from mixmap.fitting.learned import distributed

    logging.basicConfig(  # under torchrun, only the main process reports progress
        level=logging.WARNING if quiet or not distributed.is_main() else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mixmap {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """mixmap: fit dMRI/qMRI models with a shared latent space (VAE / Gaussian-mixture VAE) or
    least squares, and write BIDS-derivative maps with uncertainty."""


# ---------------------------------------------------------------------------------- models
@app.command()
def models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the signal models, their parameters, units and bounds."""
    from mixmap.models import MODELS

    if as_json:
        typer.echo(json.dumps({name: {"description": cls.description,
                                      "parameters": [p.describe() for p in cls.parameters],
                                      "lsq_bounds": dict(cls.lsq_bounds)}
                               for name, cls in MODELS.items()}, indent=2, ensure_ascii=False))
        return
    for name, cls in MODELS.items():
        typer.echo(f"{name}: {cls.description}")
        for p in cls.parameters:
            bounds = "unit vector" if p.is_direction else f"[{p.lower:g}, {p.upper:g}]"
            if p.scaled:
                bounds += " × signal scale"
            typer.echo(f"  {p.name:<6} {p.unit:<8} {bounds:<24} {p.description}")
        for pname, (lo, hi) in cls.lsq_bounds.items():
            typer.echo(f"  lsq fits {pname} in [{lo:g}, {hi:g}] by default (--bounds to change)")


# ---------------------------------------------------------------------------------- simulate
@app.command()
@handle_errors
def simulate(
    out: Path = typer.Argument(..., help="Folder to write dwi.nii.gz, bval/bvec, mask, truth/."),
    preset: str = typer.Option("paper-msdki", help="paper-msdki | msdki-4 | ball-stick"),
    scheme: str = typer.Option("hcp", help="hcp (18 b0 + 3×90) | clinical (2 b0 + 3×10)"),
    bvals: Path | None = typer.Option(None, help="Use this FSL bval file as the scheme."),
    bvecs: Path | None = typer.Option(None, help="FSL bvec file (with --bvals)."),
    snr: float = typer.Option(20.0, help="Signal-to-noise ratio relative to S0."),
    noise: Noise = typer.Option(Noise.gaussian, help="Noise model."),
    n_voxels: int | None = typer.Option(None, help="Voxels (default: the preset's, 10,000)."),
    layout: str = typer.Option(
        "mixture", help="mixture: voxels drawn independently, one slice; brain: a brain-shaped "
        "grid with spatially smooth tissue classes (for scale benchmarks)."),
    grid: str = typer.Option("145,174,145", help="--layout brain: grid size X,Y,Z (HCP's)."),
    seed: int = typer.Option(0, help="Random seed."),
    force: bool = typer.Option(False, help="Overwrite existing files."),
    quiet: bool = typer.Option(False, help="Print nothing but errors."),
) -> None:
    """Simulate a scan with known truth.

    Examples: mixmap simulate sim/ --preset paper-msdki --snr 20

      mixmap simulate brain/ --preset ball-stick --layout brain --grid 72,87,72
    """
    from mixmap.simulation import get_scheme, simulate_brain, write_simulation
    from mixmap.simulation import simulate as run_simulation

    _setup_logging(quiet)
    if (bvals is None) != (bvecs is None):
        raise ValueError("give both --bvals and --bvecs, or neither (then --scheme is used)")
    acq = get_scheme((str(bvals), str(bvecs)) if bvals else scheme)
    if layout == "brain":
        try:
            shape = tuple(int(s) for s in grid.split(","))
            assert len(shape) == 3 and min(shape) >= 8
        except (ValueError, AssertionError):
            raise ValueError(f"--grid {grid!r}: give three sizes >= 8 like 145,174,145") from None
        sim = simulate_brain(preset, acq, shape=shape, snr=snr, noise=noise.value, seed=seed)
    elif layout == "mixture":
        sim = run_simulation(preset, acq, snr=snr, noise=noise.value, n_voxels=n_voxels,
                             seed=seed)
    else:
        raise ValueError(f"--layout {layout!r}: choose mixture or brain")
    write_simulation(sim, out, force=force)
    if not quiet:
        typer.echo(f"wrote {sim.signals.shape[0]} voxels × {acq.n} measurements to {out}/")


# ---------------------------------------------------------------------------------- fit
def build_fitter(method: str, model: str, options: dict):
    """A fitter with only the options the user set; an option the method does not take is an
    error rather than silently ignored."""
    from mixmap.fitting import FITTERS, get_fitter

    if method not in FITTERS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(FITTERS)}")
    accepted = inspect.signature(FITTERS[method].__init__).parameters
    given = {k: v for k, v in options.items() if v is not None}
    wrong = [k for k in given if k not in accepted]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ValueError(f"{flags} does not apply to --method {method}; remove it")
    return get_fitter(method, model, **given)


def parse_bounds(items: list[str] | None) -> dict[str, tuple[float, float]] | None:
    """``["K=0,4", ...]`` -> ``{"K": (0.0, 4.0)}``; None when none were given."""
    if not items:
        return None
    out = {}
    for item in items:
        name, _, rest = item.partition("=")
        hint = f"--bounds {item}: write NAME=LOWER,UPPER, e.g. --bounds K=0,4"
        try:
            lo, hi = (float(x) for x in rest.split(","))
        except ValueError:
            raise ValueError(hint) from None
        out[name.strip()] = (lo, hi)
    return out


def _check_supported(model: str, acquisition, bvals: Path) -> None:
    from mixmap.models import UnsupportedAcquisition, get_model

    try:
        get_model(model).check_acquisition(acquisition)
    except UnsupportedAcquisition as exc:
        raise UnsupportedAcquisition(
            f"{bvals}: {exc}; choose a model this scheme supports (see `mixmap check`)"
        ) from None


def input_checksums(**paths: Path | None) -> dict[str, str]:
    """sha256 of each input file, recorded in the sidecar so a run can be traced and rerun."""
    import hashlib

    out = {}
    for key, path in paths.items():
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


COHORT_HELP = ("One 4-D DWI NIfTI (.nii or .nii.gz); or several (a cohort, one shared model); "
               "or a BIDS dataset folder (sub-*/dwi/*_dwi.nii.gz, sub-*/ses-*/dwi/*_dwi.nii.gz).")
MASK_PATTERN_HELP = (
    "Cohort: where each scan's mask is, e.g. '{root}/derivatives/masks/{sub}/{ses}/dwi/"
    "{base}desc-brain_mask.nii.gz' (fields {dir} {base} {entities} {sub} {ses} {root}). "
    "Default: <prefix>_desc-brain_mask.nii.gz or <prefix>_mask.nii.gz beside the scan, or the "
    "same in ROOT/derivatives/*/; none: voxels with positive b=0 signal.")


def _is_cohort(dwi: list[Path]) -> bool:
    """Several scans or a folder: the cohort path. One file: the single-scan path."""
    return len(dwi) > 1 or Path(dwi[0]).is_dir()


def _single_scan_gradients(bvals: Path | None, bvecs: Path | None,
                           mask_pattern: str | None) -> None:
    if bvals is None or bvecs is None:
        raise ValueError("give --bvals and --bvecs for a single scan (several scans or a BIDS "
                         "folder use each scan's sibling .bval/.bvec)")
    if mask_pattern is not None:
        raise ValueError("--mask-pattern is for several scans or a BIDS folder; give --mask for "
                         "a single scan")


def _refuse_single_mask(mask: Path | None) -> None:
    if mask is not None:
        raise ValueError(
            f"--mask {mask}: one mask for several scans is ambiguous; put each scan's mask beside "
            f"it (<prefix>_desc-brain_mask.nii.gz or <prefix>_mask.nii.gz) or give --mask-pattern"
        )


@app.command()
@handle_errors
def fit(
    dwi: list[Path] = typer.Argument(..., help=COHORT_HELP),
    bvals: Path | None = typer.Option(
        None, help="FSL bval file (s/mm²; ms/µm² is detected). Cohort: optional, the same for "
        "all scans (default: each scan's sibling x_dwi.bval)."),
    bvecs: Path | None = typer.Option(
        None, help="FSL bvec file (3 rows, or 3 columns). Cohort: like --bvals."),
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid (one scan)."),
    mask_pattern: str | None = typer.Option(None, help=MASK_PATTERN_HELP),
    model: str = typer.Option("msdki", help="Signal model (see `mixmap models`)."),
    method: str = typer.Option("lsq", help="lsq | ssl | vae | vae-gmm"),
    out: Path = typer.Option(..., help="Output folder for the maps."),
    device: Device = typer.Option(Device.cpu, help="auto | cpu | cuda | mps"),
    seed: int = typer.Option(0, help="Random seed (same seed, same maps on CPU)."),
    force: bool = typer.Option(False, help="Overwrite existing maps."),
    quiet: bool = typer.Option(False, help="No progress bar or messages."),
    config: str | None = typer.Option(None, help="Learned: 'default' or 'paper'."),
    latent_dim: int | None = typer.Option(None, help="Learned: latent dimension."),
    n_components: int | None = typer.Option(None, help="vae-gmm: mixture components."),
    hidden: int | None = typer.Option(None, help="Learned: hidden width."),
    epochs: int | None = typer.Option(None, help="Learned: maximum epochs."),
    batch_size: int | None = typer.Option(None, help="Learned: mini-batch size."),
    lr: float | None = typer.Option(None, help="Learned: Adam learning rate."),
    kl_weight: float | None = typer.Option(None, help="Learned: KL weight (1 = true ELBO)."),
    likelihood: str | None = typer.Option(None, help="Learned: gaussian | rician."),
    n_samples: int | None = typer.Option(None, help="Learned: posterior samples per voxel."),
    refine_steps: int | None = typer.Option(
        None, help="vae, vae-gmm: per-voxel refinement steps of q before the maps (default "
        "100; fewer is faster, 0 = the encoder's q alone)."),
    eb_rounds: int | None = typer.Option(
        None, help="vae-gmm: empirical-Bayes rounds that refit the mixture prior to the scan "
        "after training (default 6; 0 = the prior the ELBO learned)."),
    eb_grid: bool | None = typer.Option(
        None, "--eb-grid/--no-eb-grid", help="vae-gmm: end the empirical-Bayes refit on a grid "
        "(marginal likelihood by quadrature; MSDKI and other models with at most two "
        "parameters besides S0, Gaussian or Rician likelihood; default on)."),
    precision: str | None = typer.Option(
        None, help="vae, vae-gmm: the encoder network's arithmetic, float32 (default) or "
        "bfloat16 / float16 mixed precision (physics and posterior stay float32)."),
    save_model: bool = typer.Option(True, help="Learned: save the trained model in --out."),
    train_voxels: int | None = typer.Option(
        None, help="Cohort: the most voxels held in memory to train the shared model "
        "(default 2,000,000); a larger cohort trains on an equal random share of each scan "
        "and then maps the scans one at a time."),
    resume: bool = typer.Option(
        False, help="Learned: continue an interrupted training from its checkpoint in --out."),
    bounds: list[str] | None = typer.Option(
        None, help="lsq: NAME=LOWER,UPPER fits NAME within that range (repeatable; inside the "
        "declared range, see `mixmap models`). MSDKI's default is K=0,4 (non-negative "
        "kurtosis); --bounds K=-0.5,4 fits the declared range."),
) -> None:
    """Fit a model to a DWI scan, or one shared model to a cohort of scans, and write parameter
    maps (+ std maps, sidecars).

    A cohort (several scans, or a BIDS folder) must share one acquisition; each scan is
    normalised by its own signal scale, one model is fitted on all voxels, and each subject's
    maps go to OUT/sub-<label>/dwi/ (OUT/sub-<label>/ses-<label>/dwi/ with a session), the
    model to OUT/model-<m>_method-<method>/, a summary to OUT/cohort.json.

    Examples:

      mixmap fit dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --mask mask.nii.gz
      --model msdki --method lsq --out maps/

      mixmap fit dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --model ball-stick
      --method vae-gmm --out maps/ --device cuda

      mixmap fit bids/ --model msdki --method vae-gmm --out bids/derivatives/mixmap/

      mixmap fit sub-01_dwi.nii.gz sub-02_dwi.nii.gz --method vae --out maps/
    """
    from mixmap.models import get_model

    _setup_logging(quiet)
    get_model(model)
    options = dict(config=config, latent_dim=latent_dim, n_components=n_components,
                   hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                   kl_weight=kl_weight, likelihood=likelihood, n_samples=n_samples,
                   refine_steps=refine_steps, eb_rounds=eb_rounds, eb_grid=eb_grid,
                   precision=precision, bounds=parse_bounds(bounds), device=device.value,
                   seed=seed, quiet=quiet)
    fitter = build_fitter(method, model, options)
    if resume and not hasattr(fitter, "use_checkpoint"):
        raise ValueError(f"--resume applies to learned methods, not --method {method}")
    if _is_cohort(dwi):
        _refuse_single_mask(mask)
        written, n_scans = _fit_cohort(fitter, dwi, bvals, bvecs, mask_pattern, out=out,
                                       seed=seed, force=force, save_model=save_model,
                                       resume=resume, train_voxels=train_voxels)
        if not quiet and written:
            typer.echo(f"wrote {len(written)} maps of {n_scans} scans to {out}/")
        return
    _single_scan_gradients(bvals, bvecs, mask_pattern)
    if train_voxels is not None:
        raise ValueError("--train-voxels is for several scans or a BIDS folder; a single scan "
                         "always trains on all its voxels")
    written = _fit_scan(fitter, dwi[0], bvals, bvecs, mask, out=out, seed=seed, force=force,
                        save_model=save_model, resume=resume)
    if not quiet and written:
        typer.echo(f"wrote {len(written)} maps to {out}/")


def _save_timed(result, data, out: Path, *, force: bool, extra: dict) -> list:
    """save_maps, then one log line with every phase, the load's first, and the write
    (fit.json, written by it, cannot hold its own time)."""
    from mixmap.io import save_maps
    from mixmap.io.output import phase_seconds

    t0 = time.perf_counter()
    written = save_maps(result, data, out, force=force, extra=extra)
    phases = {**phase_seconds(result, data), "write": time.perf_counter() - t0}
    log.info("seconds: %s (%s)", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
             result.device)
    return written


def _use_checkpoint(fitter, ckpt: Path, resume: bool) -> None:
    if hasattr(fitter, "use_checkpoint"):
        fitter.use_checkpoint(ckpt, resume=resume)
        if ckpt.exists() and not resume:
            log.info("%s: an earlier run's checkpoint; it is replaced (use --resume to "
                     "continue it)", ckpt)


def _fit_scan(fitter, dwi: Path, bvals: Path, bvecs: Path, mask: Path | None, *, out: Path,
              seed: int, force: bool, save_model: bool, resume: bool) -> list[Path]:
    from mixmap.fitting.learned import distributed
    from mixmap.io import existing_maps, load_dwi
    from mixmap.io.nifti import bids_entities

    model, method = fitter.model.name, fitter.name
    # Refuse before a long fit, not after it.
    clash = existing_maps(out, bids_entities(dwi), model)
    if clash and not force:
        raise FileExistsError(
            f"{out}: already holds {model} maps ({clash[0].name} ...); use --force to overwrite "
            f"them or choose another --out"
        )
    data = load_dwi(dwi, bvals, bvecs, mask)
    _check_supported(model, data.acquisition, bvals)
    log.info("%s: %d voxels × %d measurements", dwi, *data.signals.shape)
    _use_checkpoint(fitter, out / f".mixmap-checkpoint-{bids_entities(dwi) or 'scan'}-{model}-"
                    f"{method}.pt", resume)
    result = fitter.fit(data.signals, data.acquisition)
    if not distributed.is_main():  # torchrun: every process trained, the main one writes
        return []
    extra = {"DroppedVoxels": data.n_dropped, "Seed": seed,
             "InputChecksums": input_checksums(dwi=dwi, bvals=bvals, bvecs=bvecs, mask=mask)}
    written = _save_timed(result, data, out, force=force, extra=extra)
    if save_model and hasattr(fitter, "save"):
        from mixmap.io import AtomicOutput

        with AtomicOutput(out, force=force) as w:
            fitter.save(w.path(f"model-{model}_method-{method}"))
    if hasattr(fitter, "finish_checkpoint"):
        fitter.finish_checkpoint()
    return written


def _fit_cohort(fitter, inputs: list[Path], bvals: Path | None, bvecs: Path | None,
                mask_pattern: str | None, *, out: Path, seed: int, force: bool,
                save_model: bool, resume: bool, train_voxels: int | None = None
                ) -> tuple[list[str], int]:
    """Every input is found and checked, and OUT checked, before the (long) fit; all
    subjects' maps, the model and cohort.json are then written in one atomic step. A cohort
    larger than ``train_voxels`` is streamed (see :mod:`mixmap.cohort`)."""
    from dataclasses import replace

    from mixmap import cohort as co
    from mixmap.fitting.learned import distributed
    from mixmap.io import AtomicOutput
    from mixmap.io.output import stage_maps

    model, method = fitter.model.name, fitter.name
    scans = co.find_scans(inputs, bvals=bvals, bvecs=bvecs, mask_pattern=mask_pattern)
    acq = co.check_acquisitions(scans)
    _check_supported(model, acq, scans[0].bvals)
    learned = hasattr(fitter, "save")
    model_dir = co.model_folder(model, method) if save_model and learned else None
    co.check_outputs(out, scans, model, force=force,
                     also=[co.COHORT_JSON, *([model_dir] if model_dir else [])])
    budget = co.TRAIN_VOXELS if train_voxels is None else int(train_voxels)
    if budget < 1:
        raise ValueError(f"--train-voxels {train_voxels}: give a positive number of voxels")
    streamed = co.estimated_voxels(scans) > budget
    _use_checkpoint(fitter, out / f".mixmap-checkpoint-cohort-{model}-{method}.pt", resume)

    def extra(scan, data, scale):
        return {"DroppedVoxels": data.n_dropped, "Seed": seed, "CohortSignalScale": scale,
                "Cohort": co.COHORT_JSON, "TrainedModel": model_dir,
                "InputChecksums": input_checksums(dwi=scan.dwi, bvals=scan.bvals,
                                                  bvecs=scan.bvecs, mask=scan.mask)}

    if not streamed:
        cohort = co.load_cohort(scans)
        log.info("cohort: %d scans, %d voxels × %d measurements", len(scans),
                 sum(cohort.sizes), acq.n)
        pooled, results = co.fit_cohort(fitter, cohort)
        infos, trained_on = cohort.infos, None
    else:
        pooled = None
        if learned:
            sample, infos = co.sample_cohort(scans, budget, seed)
            trained_on = sample.shape[0]
            log.info("cohort: %d scans, %d voxels; the model trains on a sample of %d "
                     "(--train-voxels), then maps each scan in turn", len(scans),
                     sum(i.n_voxels for i in infos), trained_on)
            pooled = fitter.fit(sample, acq)
            del sample
    if not distributed.is_main():  # torchrun: every process trained, the main one writes
        if streamed and learned:  # mapping a scan is shared by all processes too
            for _ in co.map_scans(fitter, scans, trained=True):
                pass
        return [], len(scans)
    written: list[str] = []
    with AtomicOutput(out, force=force) as w:
        if not streamed:
            for scan, d, res, scale in zip(scans, cohort.data, results, cohort.scales,
                                           strict=True):
                written += stage_maps(w, res, d, scan.folder, extra=extra(scan, d, scale))
        else:
            infos_seen = []
            for scan, d, res in co.map_scans(fitter, scans, trained=learned):
                scale = res.settings.get("signal_scale", 1.0)
                written += stage_maps(w, res, d, scan.folder, extra=extra(scan, d, scale))
                if not learned:
                    infos_seen.append(co.ScanInfo.of(d, scale))
                    # each scan fitted on its own: no noise level pooled over the cohort
                    pooled = pooled or replace(res, noise_sigma=None)
            if not learned:
                infos, trained_on = infos_seen, None
        summary = co.cohort_summary(scans, infos, acq, pooled, model_dir=model_dir, seed=seed,
                                    trained_on=trained_on)
        summary["Streamed"] = streamed
        co.write_cohort_extras(w, summary, pooled)
        if model_dir is not None:
            fitter.save(w.path(model_dir))
    if hasattr(fitter, "finish_checkpoint"):
        fitter.finish_checkpoint()
    return written, len(scans)


@app.command()
@handle_errors
def apply(
    model_file: Path = typer.Argument(..., help="Trained model written by `mixmap fit`."),
    dwi: list[Path] = typer.Argument(..., help=COHORT_HELP),
    bvals: Path | None = typer.Option(
        None, help="FSL bval file. Several scans: optional (default: sibling x_dwi.bval)."),
    bvecs: Path | None = typer.Option(None, help="FSL bvec file. Several scans: like --bvals."),
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid (one scan)."),
    mask_pattern: str | None = typer.Option(None, help=MASK_PATTERN_HELP),
    out: Path = typer.Option(..., help="Output folder for the maps."),
    device: Device = typer.Option(Device.cpu, help="auto | cpu | cuda | mps"),
    force: bool = typer.Option(False, help="Overwrite existing maps."),
    allow_other_acquisition: bool = typer.Option(
        False, help="Apply even if the scan's acquisition differs from the training one."),
    quiet: bool = typer.Option(False, help="No progress bar or messages."),
) -> None:
    """Map new scans with a trained model, without training (seconds). Several scans or a BIDS
    folder: each subject's maps go to OUT/sub-<label>/dwi/ (or .../ses-<label>/dwi/).

    Examples: mixmap apply maps/model-msdki_method-vae-gmm dwi2.nii.gz --bvals b --bvecs v
    --out maps2/

      mixmap apply maps/model-msdki_method-vae-gmm new_bids/ --out maps2/
    """
    from mixmap.fitting import load_fitter
    from mixmap.fitting.learned import distributed
    from mixmap.io import load_dwi

    _setup_logging(quiet)
    if _is_cohort(dwi):
        _refuse_single_mask(mask)
        written, n_scans = _apply_cohort(model_file, dwi, bvals, bvecs, mask_pattern, out=out,
                                         device=device.value, force=force,
                                         allow_other_acquisition=allow_other_acquisition)
        if not quiet and written:
            typer.echo(f"wrote {len(written)} maps of {n_scans} scans to {out}/")
        return
    _single_scan_gradients(bvals, bvecs, mask_pattern)
    dwi_file = dwi[0]
    fitter = load_fitter(model_file, device=device.value)
    data = load_dwi(dwi_file, bvals, bvecs, mask)
    _check_supported(fitter.model.name, data.acquisition, bvals)
    result = fitter.apply(data.signals, data.acquisition,
                          allow_other_acquisition=allow_other_acquisition)
    if not distributed.is_main():  # torchrun: each process mapped its share, one writes
        return
    extra = {"TrainedModel": str(model_file),
             "InputChecksums": input_checksums(model=model_file, dwi=dwi_file, bvals=bvals,
                                               bvecs=bvecs, mask=mask)}
    written = _save_timed(result, data, out, force=force, extra=extra)
    if not quiet:
        typer.echo(f"wrote {len(written)} maps to {out}/")


def _apply_cohort(model_file: Path, inputs: list[Path], bvals: Path | None,
                  bvecs: Path | None, mask_pattern: str | None, *, out: Path, device: str,
                  force: bool, allow_other_acquisition: bool) -> tuple[list[str], int]:
    from mixmap import cohort as co
    from mixmap.acquisition import Acquisition
    from mixmap.fitting import load_fitter
    from mixmap.fitting.learned import distributed
    from mixmap.io import AtomicOutput
    from mixmap.io.output import stage_maps

    fitter = load_fitter(model_file, device=device)
    scans = co.find_scans(inputs, bvals=bvals, bvecs=bvecs, mask_pattern=mask_pattern)
    for scan in scans:  # every scan is checked before any is mapped
        acq = Acquisition.from_fsl(scan.bvals, scan.bvecs)
        _check_supported(fitter.model.name, acq, scan.bvals)
        if acq.fingerprint() != fitter.trained["fingerprint"] and not allow_other_acquisition:
            raise ValueError(
                f"{scan.bvals}: the acquisition of {scan.dwi.name} differs from the one this "
                f"model was trained on ({model_file}); retrain on these scans, or pass "
                f"--allow-other-acquisition to apply it anyway"
            )
    co.check_outputs(out, scans, fitter.model.name, force=force)
    # One scan in memory at a time; a scan that fails to load leaves nothing written.
    written: list[str] = []
    with AtomicOutput(out, force=force) as w:
        for scan, d, res in co.map_scans(fitter, scans, trained=True,
                                         allow_other_acquisition=allow_other_acquisition):
            if distributed.is_main():  # torchrun: each process mapped its share, one writes
                written += stage_maps(w, res, d, scan.folder, extra={
                    "TrainedModel": str(model_file),
                    "InputChecksums": input_checksums(model=model_file, dwi=scan.dwi,
                                                      bvals=scan.bvals, bvecs=scan.bvecs,
                                                      mask=scan.mask)})
    return written, len(scans)


# ---------------------------------------------------------------------------------- check
@app.command()
@handle_errors
def check(
    dwi: Path = typer.Argument(..., help="4-D DWI NIfTI."),
    bvals: Path = typer.Option(..., help="FSL bval file."),
    bvecs: Path = typer.Option(..., help="FSL bvec file."),
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid."),
    model: str | None = typer.Option(None, help="Check this model only."),
) -> None:
    """Validate a dataset before fitting: shape, voxel size, b=0 count, shells, units, bvec
    orientation, SNR estimate, mask coverage, fittable models. Exit 0 when fittable.

    Example: mixmap check dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --mask mask.nii.gz
    """
    from mixmap.check import check_dataset
    from mixmap.models import get_model

    _setup_logging(True)
    if model:
        get_model(model)
    report = check_dataset(dwi, bvals, bvecs, mask, model)
    typer.echo(report.text())
    if not report.ok:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------- evaluate
@app.command()
@handle_errors
def evaluate(
    fit_dir: Path = typer.Argument(..., help="Folder of maps written by `mixmap fit`."),
    truth: Path = typer.Option(..., help="Folder written by `mixmap simulate`."),
    out: Path | None = typer.Option(None, help="Write the report as JSON here."),
    force: bool = typer.Option(False, help="Overwrite --out."),
) -> None:
    """Score maps against a simulation's truth: RMSE, bias, r per parameter and cluster, with
    the Bayes-optimal reference for the MSDKI presets.

    Example: mixmap evaluate maps/ --truth sim/
    """
    from mixmap.evaluation import evaluate_dirs, metrics_markdown
    from mixmap.io import AtomicOutput

    report = evaluate_dirs(fit_dir, truth)
    typer.echo(metrics_markdown(report))
    if out is not None:
        with AtomicOutput(out.parent if str(out.parent) else Path("."), force=force) as w:
            w.json(out.name, report)


# ---------------------------------------------------------------------------------- datasets
datasets_app = typer.Typer(help="Real example scans (fetched once into ~/.cache/mixmap).",
                           no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("list")
def datasets_list() -> None:
    """List the example datasets and whether they are cached.

    Example: mixmap datasets list
    """
    from mixmap.datasets import DATASETS, cache_dir, is_cached

    for name, ds in DATASETS.items():
        state = "cached" if is_cached(name) else "not fetched"
        typer.echo(f"{name:<20} {state:<12} {ds.description}")
    typer.echo(f"cache: {cache_dir()}")


@datasets_app.command("fetch")
@handle_errors
def datasets_fetch(name: str = typer.Argument(..., help="Dataset name (see `list`).")) -> None:
    """Fetch an example dataset (from the PyPI wheel mdt==1.2.7) and print its file paths.

    Example: mixmap datasets fetch b1k_b2k
    """
    from mixmap.datasets import fetch as fetch_dataset

    try:
        paths = fetch_dataset(name)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None
    for k, p in paths.items():
        typer.echo(f"{k}: {p}")


# ---------------------------------------------------------------------------------- reproduce
@app.command()
@handle_errors
def reproduce(
    out: Path = typer.Option(Path("docs"), help="Folder for RESULTS.md, figures/ and numbers."),
    quick: bool = typer.Option(False, help="Small smoke run (minutes on 2 CPU cores)."),
    methods: str | None = typer.Option(None, help="Comma-separated methods (default: all)."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Regenerate the paper's tables and figures (simulation, sensitivity, real brain data) and
    rewrite the matching sections of OUT/RESULTS.md.

    Example: mixmap reproduce --quick --out /tmp/repro
    """
    from mixmap.paper.reproduce import run_reproduce

    _setup_logging(quiet)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    written = run_reproduce(out, quick=quick, quiet=quiet, methods=chosen)
    if not quiet:
        typer.echo(f"wrote {len(written)} files under {out}/")


# ---------------------------------------------------------------------------------- demo
@app.command()
@handle_errors
def demo(
    out: Path = typer.Option(Path("demo_output"), help="Folder for maps, figure and table."),
    snr: float = typer.Option(20.0, help="SNR of the simulated scan."),
    methods: str = typer.Option("lsq,vae-gmm", help="Comma-separated methods to run."),
    n_voxels: int | None = typer.Option(None, help="Voxels (default 10,000, the paper's)."),
    epochs: int | None = typer.Option(None, help="Learned methods: maximum epochs."),
    force: bool = typer.Option(True, help="Overwrite an earlier demo's output."),
    results: Path | None = typer.Option(
        None, help="Also write the table into the 'demo' section of this RESULTS.md."),
    quiet: bool = typer.Option(False, help="Less output."),
) -> None:
    """Simulate the paper's MSDKI data, fit it, print the accuracy table, write maps + figure.

    Example: mixmap demo --out demo_output/
    """
    from mixmap.paper.demo import run_demo

    _setup_logging(quiet)
    text = run_demo(out, snr=snr, methods=[m.strip() for m in methods.split(",") if m.strip()],
                    n_voxels=n_voxels, epochs=epochs, force=force, quiet=quiet)
    typer.echo(text)
    if results is not None:
        from mixmap.paper.report import update_section

        table = text.split("\n\nmaps, scatter.png")[0]
        update_section(results, "demo", "## Demo: the paper's MSDKI simulation\n\n"
                       f"Produced by `mixmap demo --results {results}` (`make demo` prints the "
                       "same table).\n\n" + table)


if __name__ == "__main__":  # pragma: no cover
    app()
