"""What the commands share: option types and help texts, logging, building a fitter from
options, and turning user-fixable errors into one line on stderr with exit status 2."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from enum import Enum
from pathlib import Path

import typer

#: Exit status for input the user must fix (usage errors from Typer itself also use 2).
EXIT_BAD_INPUT = 2


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Noise(str, Enum):
    gaussian = "gaussian"
    rician = "rician"


COHORT_HELP = ("One 4-D DWI NIfTI (.nii or .nii.gz); or several (a cohort, one shared model); "
               "or a BIDS dataset folder (sub-*/dwi/*_dwi.nii.gz, sub-*/ses-*/dwi/*_dwi.nii.gz).")
MASK_PATTERN_HELP = (
    "Cohort: where each scan's mask is, e.g. '{root}/derivatives/masks/{sub}/{ses}/dwi/"
    "{base}desc-brain_mask.nii.gz' (fields {dir} {base} {entities} {sub} {ses} {root}). "
    "Default: <prefix>_desc-brain_mask.nii.gz or <prefix>_mask.nii.gz beside the scan, or the "
    "same in ROOT/derivatives/*/; none: voxels with positive b=0 signal.")


GRAD_HELP = ("MRtrix gradient table (-grad: one row 'x y z b' per volume, scanner coordinates, "
             "b in s/mm²) instead of --bvals/--bvecs.")
#: The relaxometry acquisition options of ``fit``, ``apply`` and ``check`` (:func:`field_options`).
FIELD_OPTIONS = (
    ("echo_times", Path, "Relaxometry: text file of echo times, one per volume (ms; seconds are "
     "detected), for --model t2, t2star or mwf."),
    ("inversion_times", Path, "Relaxometry: text file of inversion times, one per volume (ms; "
     "seconds are detected), for --model t1-ir."),
    ("flip_angles", Path, "Relaxometry: text file of flip angles, one per volume (degrees; "
     "radians are detected), for --model t1-vfa (with --repetition-time)."),
    ("repetition_time", float, "Relaxometry: the repetition time TR in ms (below 1: seconds)."),
)


def field_options(command):
    """``command`` with the :data:`FIELD_OPTIONS` in place of its ``fields`` parameter: it
    receives them as one :class:`~mixmap.io.fields.FieldFiles` (None without any). Put it
    under :func:`handle_errors`, which then turns a bad combination into one line."""
    sig = inspect.signature(command, eval_str=True)
    params = list(sig.parameters.values())
    at = [p.name for p in params].index("fields")
    extra = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               default=typer.Option(None, help=text), annotation=kind | None)
             for name, kind, text in FIELD_OPTIONS]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from mixmap.io.fields import FieldFiles

        given = [kwargs.pop(name, None) for name, _, _ in FIELD_OPTIONS]
        return command(*args, fields=FieldFiles.of(*given), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params[:at] + extra + params[at + 1:])
    return wrapper
MASK_THRESHOLD_HELP = ("Mask voxels with a value >= this are fitted (default: > 0, or >= 0.5 for "
                       "a probabilistic mask with values between 0 and 1).")
MAX_B_HELP = ("Leave out the volumes with b above this (s/mm²), e.g. 3000 for MSDKI on a "
              "scheme that goes beyond where the kurtosis expansion holds.")
IGNORE_MASK_AFFINE_HELP = ("Use a mask whose affine differs from the DWI's (another space) voxel "
                           "by voxel anyway; without it such a mask is refused.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from mixmap.acquisition import AcquisitionError
    from mixmap.io import InputError, OutputError, OutputExistsError
    from mixmap.models import UnsupportedAcquisition

    return (AcquisitionError, InputError, OutputError, OutputExistsError, UnsupportedAcquisition,
            FileNotFoundError, FileExistsError, ValueError)


def handle_errors(fn):
    """Turn user-fixable errors into a one-line message and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as exc:
            typer.echo(f"mixmap {fn.__name__.rstrip('_')}: error: {exc}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            typer.echo("mixmap: interrupted; no partial map was written (a learned fit keeps its "
                       "training checkpoint in --out: rerun with --resume to continue)", err=True)
            raise typer.Exit(130) from None

    return wrapper


def setup_logging(quiet: bool) -> None:
    """Messages (no level or time) on stderr; only warnings when ``quiet``, and under torchrun
    only the main process reports progress."""
    from mixmap.fitting.learned import distributed

    logging.basicConfig(
        level=logging.WARNING if quiet or not distributed.is_main() else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
        force=True,
    )


def split_list(text: str) -> list[str]:
    """``"lsq, vae-gmm"`` -> ``["lsq", "vae-gmm"]`` (empty items dropped)."""
    return [m.strip() for m in text.split(",") if m.strip()]


def build_fitter(method: str, model, options: dict):
    """A fitter with only the options the user set; an option the method does not take is an
    error rather than silently ignored."""
    from mixmap.fitting import fitter_options, get_fitter

    accepted, _ = fitter_options(method)
    given = {k: v for k, v in options.items() if v is not None}
    wrong = [k for k in given if k not in accepted]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ValueError(f"{flags} does not apply to --method {method}; remove it")
    return get_fitter(method, model, **given)


def parse_constants(items: list[str] | None) -> dict[str, float]:
    """``["dpar=0.6", ...]`` -> ``{"dpar": 0.6}`` (a model's constants; empty when none)."""
    out = {}
    for item in items or []:
        name, _, rest = item.partition("=")
        try:
            out[name.strip()] = float(rest)
        except ValueError:
            raise ValueError(f"--constant {item}: write NAME=VALUE, e.g. --constant "
                             f"dpar=0.6") from None
    return out


def parse_bounds(items: list[str] | None) -> dict[str, tuple[float, float]] | None:
    """``["K=0,4", ...]`` -> ``{"K": (0.0, 4.0)}``; None when none were given."""
    if not items:
        return None
    out = {}
    for item in items:
        name, _, rest = item.partition("=")
        hint = f"--bounds {item}: write NAME=LOWER,UPPER, e.g. --bounds K=0,4"
        try:
            lo, hi = (float(x) for x in rest.split(","))
        except ValueError:
            raise ValueError(hint) from None
        out[name.strip()] = (lo, hi)
    return out
