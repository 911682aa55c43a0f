"""``mixmap fit``: a scan, or a cohort of scans, -> parameter maps
(:func:`mixmap.pipeline.fit_inputs`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

from mixmap.cli.common import (
    COHORT_HELP,
    GRAD_HELP,
    IGNORE_MASK_AFFINE_HELP,
    MASK_PATTERN_HELP,
    MASK_THRESHOLD_HELP,
    MAX_B_HELP,
    Device,
    build_fitter,
    field_options,
    handle_errors,
    parse_bounds,
    parse_constants,
    setup_logging,
)


def learned_options() -> list[inspect.Parameter]:
    """The learned fitters' options of ``fit``, generated from their hyper-parameter dataclasses
    (:func:`mixmap.fitting.learned.configs.user_options`); a flag pair for a boolean."""
    from mixmap.fitting.learned.configs import CONFIG_CLASSES, user_options

    seen: dict = {}
    for method in reversed(tuple(CONFIG_CLASSES)):  # vae-gmm's wording and order first
        for o in user_options(method):
            seen.setdefault(o.name, o)
    out = []
    for o in seen.values():
        flag = o.name.replace("_", "-")
        decls = (f"--{flag}/--no-{flag}",) if o.type is bool else ()
        out.append(inspect.Parameter(o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     default=typer.Option(None, *decls, help=o.help),
                                     annotation=o.type | None))
    return out


@handle_errors
@field_options
def fit(
    dwi: list[Path] = typer.Argument(..., help=COHORT_HELP),
    bvals: Path | None = typer.Option(
        None, help="FSL bval file (s/mm²; ms/µm² is detected). Cohort: optional, the same for "
        "all scans (default: each scan's sibling x_dwi.bval)."),
    bvecs: Path | None = typer.Option(
        None, help="FSL bvec file (3 rows, or 3 columns). Cohort: like --bvals."),
    grad: Path | None = typer.Option(None, help=GRAD_HELP),
    fields=None,
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid (one scan)."),
    mask_pattern: str | None = typer.Option(None, help=MASK_PATTERN_HELP),
    mask_threshold: float | None = typer.Option(None, help=MASK_THRESHOLD_HELP),
    ignore_mask_affine: bool = typer.Option(False, help=IGNORE_MASK_AFFINE_HELP),
    max_b: float | None = typer.Option(None, help=MAX_B_HELP),
    model: str = typer.Option("msdki", help="Signal model (see `mixmap models`)."),
    method: str = typer.Option("lsq", help="lsq | ssl | vae | vae-gmm"),
    out: Path = typer.Option(..., help="Output folder for the maps."),
    device: Device = typer.Option(Device.cpu, help="auto | cpu | cuda | mps"),
    seed: int = typer.Option(0, help="Random seed (same seed, same maps on CPU)."),
    force: bool = typer.Option(False, help="Overwrite existing maps."),
    quiet: bool = typer.Option(False, help="No progress bar or messages."),
    save_model: bool = typer.Option(True, help="Learned: save the trained model in --out."),
    report: bool = typer.Option(
        True, help="Write an HTML report per scan (<entities>_model-<m>_report.html: maps, "
        "sds, residuals, what each voxel borrowed from the others)."),
    train_voxels: int | None = typer.Option(
        None, help="Cohort: the most voxels held in memory to train the shared model "
        "(default 2,000,000); a larger cohort trains on an equal random share of each scan "
        "and then maps the scans one at a time."),
    resume: bool = typer.Option(
        False, help="Learned: continue an interrupted training from its checkpoint in --out."),
    # ---- least squares ---------------------------------------------------------------------
    bounds: list[str] | None = typer.Option(
        None, help="lsq: NAME=LOWER,UPPER fits NAME within that range (repeatable; inside the "
        "declared range, see `mixmap models`). MSDKI's default is K=0,4 (non-negative "
        "kurtosis); --bounds K=-0.5,4 fits the declared range."),
    constant: list[str] | None = typer.Option(
        None, help="NAME=VALUE sets one of the model's fixed constants (repeatable; see "
        "`mixmap models`), e.g. NODDI's --constant dpar=0.6 ex vivo. Saved with the model."),
    **learned,
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

      mixmap fit dwi.nii.gz --grad dwi.b --mask brain_prob.nii.gz --mask-threshold 0.9
      --out maps/

      mixmap fit mese.nii.gz --echo-times te.txt --model t2 --method vae-gmm --out maps/

      mixmap fit vfa.nii.gz --flip-angles fa.txt --repetition-time 15 --model t1-vfa --out maps/
    """
    from mixmap import pipeline
    from mixmap.models import get_model

    setup_logging(quiet)
    signal_model = get_model(model).with_constants(parse_constants(constant))
    options = dict(learned)
    options.update(bounds=parse_bounds(bounds), device=device.value, seed=seed, quiet=quiet)
    fitter = build_fitter(method, signal_model, options)
    written = pipeline.fit_inputs(fitter, dwi, bvals=bvals, bvecs=bvecs, mask=mask,
                                  mask_pattern=mask_pattern, out=out, seed=seed, force=force,
                                  save_model=save_model, resume=resume,
                                  train_voxels=train_voxels, grad=grad,
                                  mask_threshold=mask_threshold,
                                  ignore_mask_affine=ignore_mask_affine, max_b=max_b,
                                  report=report, fields=fields)
    if not quiet and written.maps:
        typer.echo(written.summary(out))


def _with_learned_options(command):
    """``command``'s signature with :func:`learned_options` in place of ``**learned``, before
    the least-squares options, so the CLI declares them from the dataclasses."""
    sig = inspect.signature(command, eval_str=True)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    at = [p.name for p in params].index("bounds")
    command.__signature__ = sig.replace(parameters=params[:at] + learned_options() + params[at:])
    return command


fit = _with_learned_options(fit)
