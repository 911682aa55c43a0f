"""``mixmap evaluate``: score maps against a simulation's truth
(:func:`mixmap.evaluation.evaluate_dirs`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mixmap.cli.common import handle_errors


@handle_errors
def evaluate(
    fit_dir: Path = typer.Argument(..., help="Folder of maps written by `mixmap fit`."),
    truth: Path = typer.Option(..., help="Folder written by `mixmap simulate`."),
    out: Path | None = typer.Option(None, help="Write the report as JSON here."),
    floor: bool = typer.Option(True, help="Also score the empirical floor (the posterior mean "
                               "under the empirical distribution of the truth)."),
    floor_atoms: int | None = typer.Option(
        None, help="Truth values the floor weighs (default: every voxel's; fewer is faster)."),
    force: bool = typer.Option(False, help="Overwrite --out."),
) -> None:
    """Score maps against a simulation's truth: RMSE, bias, r per parameter and cluster (tissue
    class for a phantom), with the empirical floor, and the Bayes-optimal reference for the
    MSDKI presets.

    Example: mixmap evaluate maps/ --truth sim/
    """
    from mixmap.evaluation import evaluate_dirs, metrics_markdown
    from mixmap.io import AtomicOutput

    report = evaluate_dirs(fit_dir, truth, floor=floor, floor_atoms=floor_atoms)
    typer.echo(metrics_markdown(report))
    if out is not None:
        with AtomicOutput(out.parent if str(out.parent) else Path("."), force=force) as w:
            w.json(out.name, report)
