"""Trained learned fitters on disk: a folder with ``weights.safetensors`` (tensors only) and
``config.json`` (method, model, hyper-parameters, parameter bounds, the training acquisition and
its fingerprint, signal scale, noise level, mixmap version). Nothing is unpickled, so loading a
file cannot run code; anything that is not exactly such a folder is refused with a ValueError
that names the file.

This module only reads and writes the two files; what goes into them and how a fitter is
rebuilt from them is the fitters' (``to_config`` / ``from_config`` / ``state_dict`` /
``load_state_dict``; :func:`mixmap.fitting.load_fitter`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mixmap._version import __version__

FORMAT = "mixmap-learned-fitter"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
#: Entries every config.json must have.
REQUIRED = ("method", "model", "hyper", "acquisition", "signal_scale")


def write_model(path: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write folder ``path`` (created; atomically; refused if it exists and is not empty):
    ``config.json`` with the format, its version and mixmap's version before ``config``'s own
    entries, and ``weights.safetensors`` holding ``tensors`` (contiguous CPU tensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "mixmap_version": __version__,
              **config}
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


def read_config(path: str | Path) -> tuple[Path, dict]:
    """(model folder, its config.json as a dict) for a folder written by :func:`write_model`
    or the path of a file in it; a ValueError naming the file when it is not such a folder,
    not JSON, of another format or version, or lacks a :data:`REQUIRED` entry."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise ValueError(f"{path}: not a model folder written by `mixmap fit`")
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
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{cfg_path}: missing entries {missing}; the model file is damaged")
    return folder, config


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``folder``'s weights.safetensors (CPU); a ValueError naming the file when
    it is missing or not a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ValueError(f"{path}: not found; give a model folder written by `mixmap fit`")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: not a valid safetensors weights file ({exc}); mixmap never loads pickled "
            f"weights"
        ) from None
