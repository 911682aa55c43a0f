"""``mixmap reproduce``: the paper's tables and figures
(:func:`mixmap.paper.reproduce.run_reproduce`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mixmap.cli.common import handle_errors, setup_logging, split_list


@handle_errors
def reproduce(
    out: Path = typer.Option(Path("docs"), help="Folder for RESULTS.md, figures/ and numbers."),
    quick: bool = typer.Option(False, help="Small smoke run (minutes on 2 CPU cores)."),
    methods: str | None = typer.Option(None, help="Comma-separated methods (default: all)."),
    parts: str | None = typer.Option(
        None, help="Comma-separated parts to rerun: simulation, sensitivity, real (default: "
        "all); only their figures and sections are rewritten."),
    quiet: bool = typer.Option(False, help="No progress output."),
) -> None:
    """Regenerate the paper's tables and figures (simulation, sensitivity, real brain data) and
    rewrite the matching sections of OUT/RESULTS.md.

    Example: mixmap reproduce --quick --out /tmp/repro
    """
    from mixmap.paper.reproduce import run_reproduce

    setup_logging(quiet)
    chosen = split_list(methods) if methods else None
    written = run_reproduce(out, quick=quick, quiet=quiet, methods=chosen,
                            parts=split_list(parts) if parts else None)
    if not quiet:
        typer.echo(f"wrote {len(written)} files under {out}/")
