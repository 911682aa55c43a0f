"""``mixmap datasets list|fetch``: the real example scans (:mod:`mixmap.datasets`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mixmap.cli.common import handle_errors

datasets_app = typer.Typer(help="Real example scans (fetched once into ~/.cache/mixmap).",
                           no_args_is_help=True)


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
def datasets_fetch(
    name: str = typer.Argument(..., help="Dataset name (see `list`)."),
    to: Path | None = typer.Option(None, "--to", help="Also copy the files into this folder "
                                   "as dwi.nii.gz, dwi.bval, dwi.bvec and mask.nii.gz."),
) -> None:
    """Fetch an example dataset (from the PyPI wheel mdt==1.2.7) and print its file paths.

    Example: mixmap datasets fetch b1k_b2k --to example/
    """
    from mixmap.datasets import copy_to
    from mixmap.datasets import fetch as fetch_dataset

    try:
        paths = fetch_dataset(name) if to is None else copy_to(name, to)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None
    for k, p in paths.items():
        typer.echo(f"{k}: {p}")
