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
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
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
                                      "parameters": [p.describe() for p in cls.parameters]}
                               for name, cls in MODELS.items()}, indent=2, ensure_ascii=False))
        return
    for name, cls in MODELS.items():
        typer.echo(f"{name}: {cls.description}")
        for p in cls.parameters:
            bounds = "unit vector" if p.is_direction else f"[{p.lower:g}, {p.upper:g}]"
            if p.scaled:
                bounds += " × signal scale"
            typer.echo(f"  {p.name:<6} {p.unit:<8} {bounds:<24} {p.description}")


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
    from mixmap.simulate import get_scheme, simulate_brain, write_simulation
    from mixmap.simulate import simulate as run_simulation

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
LEARNED_OPTIONS = ("config", "latent_dim", "n_components", "hidden", "epochs", "batch_size",
                   "lr", "kl_weight", "likelihood", "n_samples")


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


@app.command()
@handle_errors
def fit(
    dwi: Path = typer.Argument(..., help="4-D DWI NIfTI (.nii or .nii.gz)."),
    bvals: Path = typer.Option(..., help="FSL bval file (s/mm²; ms/µm² is detected)."),
    bvecs: Path = typer.Option(..., help="FSL bvec file (3 rows, or 3 columns)."),
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid."),
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
    save_model: bool = typer.Option(True, help="Learned: save the trained model in --out."),
    resume: bool = typer.Option(
        False, help="Learned: continue an interrupted training from its checkpoint in --out."),
) -> None:
    """Fit a model to a DWI scan and write parameter maps (+ std maps, sidecars).

    Examples:

      mixmap fit dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --mask mask.nii.gz
      --model msdki --method lsq --out maps/

      mixmap fit dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --model ball-stick
      --method vae-gmm --out maps/ --device cuda
    """
    from mixmap.io import existing_maps, load_dwi, save_maps
    from mixmap.io.nifti import bids_entities
    from mixmap.models import get_model

    _setup_logging(quiet)
    get_model(model)
    options = dict(config=config, latent_dim=latent_dim, n_components=n_components,
                   hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                   kl_weight=kl_weight, likelihood=likelihood, n_samples=n_samples,
                   device=device.value, seed=seed, quiet=quiet)
    fitter = build_fitter(method, model, options)
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
    if hasattr(fitter, "use_checkpoint"):
        ckpt = out / f".mixmap-checkpoint-{bids_entities(dwi) or 'scan'}-{model}-{method}.pt"
        fitter.use_checkpoint(ckpt, resume=resume)
        if ckpt.exists() and not resume:
            log.info("%s: an earlier run's checkpoint; it is replaced (use --resume to "
                     "continue it)", ckpt)
    elif resume:
        raise ValueError(f"--resume applies to learned methods, not --method {method}")
    result = fitter.fit(data.signals, data.acquisition)
    extra = {"DroppedVoxels": data.n_dropped, "Seed": seed,
             "InputChecksums": input_checksums(dwi=dwi, bvals=bvals, bvecs=bvecs, mask=mask)}
    written = save_maps(result, data, out, force=force, extra=extra)
    if save_model and hasattr(fitter, "save"):
        from mixmap.io import AtomicOutput

        with AtomicOutput(out, force=force) as w:
            fitter.save(w.path(f"model-{model}_method-{method}"))
    if hasattr(fitter, "finish_checkpoint"):
        fitter.finish_checkpoint()
    if not quiet:
        typer.echo(f"wrote {len(written)} maps to {out}/")


@app.command()
@handle_errors
def apply(
    model_file: Path = typer.Argument(..., help="Trained model written by `mixmap fit`."),
    dwi: Path = typer.Argument(..., help="4-D DWI NIfTI."),
    bvals: Path = typer.Option(..., help="FSL bval file."),
    bvecs: Path = typer.Option(..., help="FSL bvec file."),
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid."),
    out: Path = typer.Option(..., help="Output folder for the maps."),
    device: Device = typer.Option(Device.cpu, help="auto | cpu | cuda | mps"),
    force: bool = typer.Option(False, help="Overwrite existing maps."),
    allow_other_acquisition: bool = typer.Option(
        False, help="Apply even if the scan's acquisition differs from the training one."),
    quiet: bool = typer.Option(False, help="No progress bar or messages."),
) -> None:
    """Map a new scan with a trained model, without training (seconds).

    Example: mixmap apply maps/model-msdki_method-vae-gmm dwi2.nii.gz --bvals b --bvecs v
    --out maps2/
    """
    from mixmap.io import load_dwi, save_maps
    from mixmap.io.checkpoint import load_fitter

    _setup_logging(quiet)
    fitter = load_fitter(model_file, device=device.value)
    data = load_dwi(dwi, bvals, bvecs, mask)
    _check_supported(fitter.model.name, data.acquisition, bvals)
    result = fitter.apply(data.signals, data.acquisition,
                          allow_other_acquisition=allow_other_acquisition)
    extra = {"TrainedModel": str(model_file),
             "InputChecksums": input_checksums(model=model_file, dwi=dwi, bvals=bvals,
                                               bvecs=bvecs, mask=mask)}
    written = save_maps(result, data, out, force=force, extra=extra)
    if not quiet:
        typer.echo(f"wrote {len(written)} maps to {out}/")


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
    from mixmap.evaluate import evaluate_dirs, metrics_markdown
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
    from mixmap.reproduce import run_reproduce

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
    from mixmap.demo import run_demo

    _setup_logging(quiet)
    text = run_demo(out, snr=snr, methods=[m.strip() for m in methods.split(",") if m.strip()],
                    n_voxels=n_voxels, epochs=epochs, force=force, quiet=quiet)
    typer.echo(text)
    if results is not None:
        from mixmap.report import update_section

        table = text.split("\n\nmaps, scatter.png")[0]
        update_section(results, "demo", "## Demo: the paper's MSDKI simulation\n\n"
                       f"Produced by `mixmap demo --results {results}` (`make demo` prints the "
                       "same table).\n\n" + table)


if __name__ == "__main__":  # pragma: no cover
    app()
