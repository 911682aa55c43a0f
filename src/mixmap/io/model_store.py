"""Trained learned fitters on disk: a folder with ``weights.safetensors`` (tensors only) and
``config.json`` (method, model, hyper-parameters, parameter bounds, the training acquisition and
its fingerprint, signal scale, noise level, mixmap version). Nothing is unpickled, so loading a
file cannot run code; anything that is not exactly such a folder is refused with a ValueError
that names the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mixmap import __version__

FORMAT = "mixmap-learned-fitter"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


def save_fitter(fitter, path: str | Path) -> Path:
    """Write a trained learned fitter to folder ``path`` (created; written atomically)."""
    from safetensors.torch import save_file

    if fitter.net is None or fitter.trained is None:
        raise RuntimeError(f"{fitter.name}: nothing to save; fit() first")
    path = Path(path)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mixmap_version": __version__,
        "method": fitter.name,
        "model": fitter.model.name,
        "hyper": fitter.hyper(),
        "seed": fitter.seed,
        "parameters": [p.describe() for p in fitter.model.parameters],
        "acquisition": fitter.trained["acquisition"],
        "signal_scale": fitter.trained["signal_scale"],
        "noise_sigma": fitter.trained["noise_sigma"],
        "noise_sigma_source": fitter.trained["noise_sigma_source"],
        "noise_sigma_factor": fitter.trained.get("noise_sigma_factor", 1.0),
    }
    tensors = {k: v.detach().cpu().clone().contiguous()
               for k, v in fitter.net.state_dict().items()}
    if path.exists() and any(path.iterdir()) if path.is_dir() else path.exists():
        raise FileExistsError(f"{path}: already exists; choose another path or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                  encoding="utf-8")
        if path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_config(folder: Path) -> dict:
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path}: not found; give a model folder written by `mixmap fit`")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc}); the model file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: not a mixmap model file (format is not {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: model format version {config.get('format_version')!r} is "
                         f"not supported by this mixmap ({FORMAT_VERSION})")
    missing = [k for k in ("method", "model", "hyper", "acquisition", "signal_scale")
               if k not in config]
    if missing:
        raise ValueError(f"{cfg_path}: missing entries {missing}; the model file is damaged")
    return config


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path}: not found; give a model folder written by `mixmap fit`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: not a valid safetensors weights file ({exc}); mixmap never loads pickled "
            f"weights"
        ) from None


def load_fitter(path: str | Path, *, device: str = "cpu"):
    """A trained learned fitter from a folder written by ``fitter.save(path)`` (or the path of
    its ``config.json`` / ``weights.safetensors``), ready for ``apply``."""
    from mixmap.acquisition import Acquisition
    from mixmap.fitting import FITTERS

    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise ValueError(f"{path}: not a model folder written by `mixmap fit`")
    config = _read_config(folder)
    method = config["method"]
    cls = FITTERS.get(method)
    if cls is None or not hasattr(cls, "save"):
        raise ValueError(f"{folder / CONFIG}: unknown learned method {method!r}")
    hyper = dict(config["hyper"])
    hyper.pop("prior", None)  # fixed by the class
    try:
        fitter = cls(config["model"], device=device, seed=int(config.get("seed", 0)), quiet=True,
                     **hyper)
        acq_cfg = config["acquisition"]
        acq = Acquisition.from_record(acq_cfg)
        sigma_in = config.get("noise_sigma")
        scale = float(config["signal_scale"])
        sigma_w = (None if config.get("noise_sigma_source") == "learned" or sigma_in is None
                   else float(sigma_in) / scale)
        with torch.random.fork_rng(devices=[]):
            net = fitter._build(acq, sigma_w)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{folder / CONFIG}: inconsistent model configuration ({exc})") from None
    if acq.fingerprint() != acq_cfg.get("fingerprint"):
        raise ValueError(f"{folder / CONFIG}: the stored acquisition does not match its "
                         f"fingerprint; the model file is damaged")
    declared = [p.describe() for p in fitter.model.parameters]
    if config.get("parameters") != declared:
        raise ValueError(
            f"{folder / CONFIG}: trained with other parameters or bounds than this version's "
            f"{config['model']} model declares; retrain with this version"
        )
    weights = _read_weights(folder / WEIGHTS)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{folder / WEIGHTS}: weights do not fit the configured network "
                         f"({str(exc).splitlines()[0]})") from None
    fitter.net = net.to(device)
    fitter.trained = {
        "fingerprint": acq_cfg["fingerprint"],
        "acquisition": acq_cfg,
        "signal_scale": scale,
        "noise_sigma": sigma_in,
        "noise_sigma_source": config.get("noise_sigma_source", "b0"),
        "noise_sigma_factor": float(config.get("noise_sigma_factor", 1.0)),
    }
    return fitter
