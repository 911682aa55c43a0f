"""``mixmap demo``: the paper's MSDKI simulation, fitted and scored
(:func:`mixmap.paper.demo.run_demo`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mixmap.cli.common import handle_errors, setup_logging, split_list


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

    setup_logging(quiet)
    text = run_demo(out, snr=snr, methods=split_list(methods), n_voxels=n_voxels, epochs=epochs,
                    force=force, quiet=quiet)
    typer.echo(text)
    if results is not None:
        from mixmap.paper.report import update_section

        table = text.split("\n\nmaps, scatter.png")[0]
        update_section(results, "demo", "## Demo: the paper's MSDKI simulation\n\n"
                       f"Produced by `mixmap demo --results {results}` (`make demo` prints the "
                       "same table).\n\n" + table)
