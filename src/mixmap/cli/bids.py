"""``mixmap bids`` / ``mixmap-bids``: the BIDS App entry point (:func:`mixmap.bids_app.run`)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from mixmap.cli.common import Device, build_fitter, handle_errors, setup_logging
from mixmap.cli.fit import _with_learned_options


class Level(str, Enum):
    participant = "participant"
    group = "group"


@handle_errors
def bids(
    bids_dir: Path = typer.Argument(..., help="The root folder of a BIDS dataset."),
    output_dir: Path = typer.Argument(..., help="Where the derivative dataset is written."),
    analysis_level: Level = typer.Argument(
        ..., help="participant: each scan fitted on its own. group: one model trained on all "
        "selected scans, then every scan mapped with it."),
    participant_label: list[str] | None = typer.Option(
        None, "--participant-label", "--participant_label",
        help="Participants to map (with or without 'sub-'); repeat the flag or separate by "
        "commas (mixmap-bids also takes them space-separated). Default: all."),
    skip_bids_validation: bool = typer.Option(
        False, "--skip-bids-validation", help="Skip the check of dataset_description.json "
        "and the sub-* folders."),
    work_dir: Path | None = typer.Option(
        None, "-w", "--work-dir", help="Where training checkpoints go (default OUTPUT_DIR)."),
    nprocs: int | None = typer.Option(None, "--nprocs", "--n-cpus",
                                      help="CPU threads for torch (default: all)."),
    model: str = typer.Option("msdki", help="Signal model (see `mixmap models`)."),
    method: str = typer.Option("vae-gmm", help="lsq | ssl | vae | vae-gmm"),
    device: Device = typer.Option(Device.cpu, help="auto | cpu | cuda | mps"),
    seed: int = typer.Option(0, help="Random seed (same seed, same maps on CPU)."),
    force: bool = typer.Option(False, help="Overwrite existing maps."),
    quiet: bool = typer.Option(False, help="Only warnings."),
    bounds: list[str] | None = typer.Option(None, hidden=True),
    **learned,
) -> None:
    """Map the DWI scans of a BIDS dataset into a BIDS derivative dataset (a BIDS App).

    Example: mixmap-bids /data/ds /data/ds/derivatives/mixmap participant
    --participant-label 01 02 --method vae-gmm
    """
    from mixmap import bids_app
    from mixmap.cli.common import parse_bounds

    setup_logging(quiet)
    options = {**learned, "bounds": parse_bounds(bounds), "device": device.value,
               "seed": seed, "quiet": quiet}
    build_fitter(method, model, options)  # refuse options of another method before the run
    written = bids_app.run(lambda: build_fitter(method, model, options), bids_dir, output_dir,
                           analysis_level.value,
                           labels=bids_app.participant_labels(participant_label),
                           skip_validation=skip_bids_validation, work_dir=work_dir,
                           nprocs=nprocs, seed=seed, force=force)
    if not quiet:
        typer.echo(f"{len(written)} maps written to {output_dir}")


bids = _with_learned_options(bids)


LABEL_FLAGS = ("--participant-label", "--participant_label")


def spaced_labels(argv: list[str]) -> list[str]:
    """``--participant-label 01 02`` (the BIDS App convention, after the positional
    arguments) as one flag per label, which is what the option parser takes."""
    out: list[str] = []
    flag, fresh = None, False
    for arg in argv:
        if arg in LABEL_FLAGS:
            flag, fresh = arg, True
        elif flag is not None and not arg.startswith("-"):
            if not fresh:
                out.append(flag)
            fresh = False
        else:
            flag = None
        out.append(arg)
    return out


def main() -> None:
    """The ``mixmap-bids`` console script."""
    app = typer.Typer(add_completion=False)
    app.command()(bids)
    app(args=spaced_labels(sys.argv[1:]), prog_name="mixmap-bids")
