"""``mixmap check``: validate a dataset before fitting (:func:`mixmap.check.check_dataset`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mixmap.cli.common import handle_errors, setup_logging


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

    setup_logging(True)
    if model:
        get_model(model)
    report = check_dataset(dwi, bvals, bvecs, mask, model)
    typer.echo(report.text())
    if not report.ok:
        raise typer.Exit(1)
