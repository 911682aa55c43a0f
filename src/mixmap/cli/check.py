"""``mixmap check``: validate a dataset before fitting (:func:`mixmap.check.check_dataset`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mixmap.cli.common import (
    GRAD_HELP,
    IGNORE_MASK_AFFINE_HELP,
    MASK_THRESHOLD_HELP,
    MAX_B_HELP,
    field_options,
    handle_errors,
    setup_logging,
)


@handle_errors
@field_options
def check(
    dwi: Path = typer.Argument(..., help="4-D DWI NIfTI."),
    bvals: Path | None = typer.Option(None, help="FSL bval file."),
    bvecs: Path | None = typer.Option(None, help="FSL bvec file."),
    grad: Path | None = typer.Option(None, help=GRAD_HELP),
    fields=None,
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid."),
    mask_threshold: float | None = typer.Option(None, help=MASK_THRESHOLD_HELP),
    ignore_mask_affine: bool = typer.Option(False, help=IGNORE_MASK_AFFINE_HELP),
    max_b: float | None = typer.Option(None, help=MAX_B_HELP),
    model: str | None = typer.Option(None, help="Check this model only."),
) -> None:
    """Validate a dataset before fitting: shape, voxel size, b=0 count, shells (or echo times,
    inversion times, flip angles), units, bvec orientation, SNR estimate, mask coverage,
    fittable models. Exit 0 when fittable.

    Examples: mixmap check dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --mask mask.nii.gz

      mixmap check mese.nii.gz --echo-times te.txt
    """
    from mixmap.check import check_dataset
    from mixmap.io.gradients import gradient_files
    from mixmap.models import get_model

    setup_logging(True)
    if model:
        get_model(model)
    table, vecs = gradient_files(bvals, bvecs, grad, fields)
    if fields is None and grad is None and (bvals is None or bvecs is None):
        raise ValueError("give --bvals and --bvecs, or an MRtrix --grad table (or, for "
                         "relaxometry, --echo-times, --inversion-times or --flip-angles)")
    report = check_dataset(dwi, table, vecs, mask, model, mask_threshold=mask_threshold,
                           ignore_mask_affine=ignore_mask_affine, max_b=max_b)
    typer.echo(report.text())
    if not report.ok:
        raise typer.Exit(1)
