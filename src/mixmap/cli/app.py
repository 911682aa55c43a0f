"""The ``mixmap`` command line (Typer): the commands, one module each, assembled.

Every command turns the errors a user can fix (a missing file, a bval/bvec mismatch, an output
that exists ...) into one line on stderr that names the file and the fix, and exit status 2.
"""

from __future__ import annotations

import typer

from mixmap._version import __version__
from mixmap.cli.apply import apply
from mixmap.cli.bids import bids
from mixmap.cli.check import check
from mixmap.cli.datasets import datasets_app
from mixmap.cli.demo import demo
from mixmap.cli.evaluate import evaluate
from mixmap.cli.fit import fit
from mixmap.cli.models import models
from mixmap.cli.reproduce import reproduce
from mixmap.cli.simulate import simulate

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Quantitative MRI parameter maps from a latent space shared by all voxels.",
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


for _command in (models, simulate, fit, apply, check, evaluate, reproduce, demo, bids):
    app.command()(_command)
app.add_typer(datasets_app, name="datasets")

if __name__ == "__main__":  # pragma: no cover
    app()
