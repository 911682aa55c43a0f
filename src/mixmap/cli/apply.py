"""``mixmap apply``: map new scans with a trained model (:func:`mixmap.pipeline.apply_inputs`)."""

from __future__ import annotations

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
    field_options,
    handle_errors,
    setup_logging,
)


@handle_errors
@field_options
def apply(
    model_file: Path = typer.Argument(..., help="Trained model written by `mixmap fit`."),
    dwi: list[Path] = typer.Argument(..., help=COHORT_HELP),
    bvals: Path | None = typer.Option(
        None, help="FSL bval file. Several scans: optional (default: sibling x_dwi.bval)."),
    bvecs: Path | None = typer.Option(None, help="FSL bvec file. Several scans: like --bvals."),
    grad: Path | None = typer.Option(None, help=GRAD_HELP),
    fields=None,
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid (one scan)."),
    mask_pattern: str | None = typer.Option(None, help=MASK_PATTERN_HELP),
    mask_threshold: float | None = typer.Option(None, help=MASK_THRESHOLD_HELP),
    ignore_mask_affine: bool = typer.Option(False, help=IGNORE_MASK_AFFINE_HELP),
    max_b: float | None = typer.Option(None, help=MAX_B_HELP),
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
    from mixmap import pipeline

    setup_logging(quiet)
    written = pipeline.apply_inputs(model_file, dwi, bvals=bvals, bvecs=bvecs, mask=mask,
                                    mask_pattern=mask_pattern, out=out, device=device.value,
                                    force=force, allow_other_acquisition=allow_other_acquisition,
                                    grad=grad, mask_threshold=mask_threshold,
                                    ignore_mask_affine=ignore_mask_affine, max_b=max_b,
                                    fields=fields)
    if not quiet and written.maps:
        typer.echo(written.summary(out))
