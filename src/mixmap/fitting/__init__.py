"""Fitters: ``lsq`` (least squares) and the learned fitters, behind one interface."""

from __future__ import annotations

import inspect
from pathlib import Path

from mixmap.fitting.base import FitResult, Fitter, resolve_device
from mixmap.fitting.learned.base import LearnedFitter
from mixmap.fitting.learned.ssl import SelfSupervisedFitter
from mixmap.fitting.learned.vae import GaussianVAEFitter, MixtureVAEFitter
from mixmap.fitting.lsq import LeastSquaresFitter
from mixmap.io import model_store

FITTERS: dict[str, type[Fitter]] = {LeastSquaresFitter.name: LeastSquaresFitter}
FITTERS[SelfSupervisedFitter.name] = SelfSupervisedFitter
FITTERS[GaussianVAEFitter.name] = GaussianVAEFitter
FITTERS[MixtureVAEFitter.name] = MixtureVAEFitter


def get_fitter(method: str, model, **options) -> Fitter:
    """An instance of fitter ``method`` for ``model`` with the given hyper-parameters."""
    try:
        cls = FITTERS[method]
    except KeyError:
        choices = ", ".join(FITTERS)
        raise ValueError(f"unknown method {method!r}; choose one of: {choices}") from None
    return cls(model, **options)


def fitter_options(method: str) -> tuple[list[str], bool]:
    """(the keyword options fitter ``method`` takes, whether it also takes more that it checks
    itself); an unknown method is a ValueError listing the valid ones."""
    if method not in FITTERS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(FITTERS)}")
    params = inspect.signature(FITTERS[method].__init__).parameters
    named = [k for k, p in params.items() if k not in ("self", "model")
             and p.kind is not p.VAR_KEYWORD]
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())


def load_fitter(path: str | Path, *, device: str = "cpu") -> LearnedFitter:
    """A trained learned fitter from a folder written by ``fitter.save(path)`` (or the path of
    its ``config.json`` / ``weights.safetensors``), ready for ``apply``; a ValueError naming the
    file for anything else (:mod:`mixmap.io.model_store`)."""
    folder, config = model_store.read_config(path)
    cfg_path = folder / model_store.CONFIG
    method = config["method"]
    cls = FITTERS.get(method)
    if cls is None or not issubclass(cls, LearnedFitter):
        raise ValueError(f"{cfg_path}: unknown learned method {method!r}")
    try:
        fitter = cls.from_config(config, device=device)
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from None
    weights = model_store.read_weights(folder)
    try:
        fitter.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"{folder / model_store.WEIGHTS}: weights do not fit the configured "
                         f"network ({str(exc).splitlines()[0]})") from None
    return fitter


__all__ = ["FITTERS", "FitResult", "Fitter", "LeastSquaresFitter", "get_fitter", "load_fitter",
           "resolve_device"]
