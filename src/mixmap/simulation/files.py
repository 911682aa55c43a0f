"""Simulation folders: a simulated scan written as a scan plus its truth (``mixmap simulate``),
and read back (``mixmap evaluate``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mixmap.simulation.presets import Cluster, Preset
from mixmap.simulation.synthesize import Simulation


def grid_shape(n: int) -> tuple[int, int, int]:
    """A near-square single-slice grid holding ``n`` voxels."""
    nx = int(np.ceil(np.sqrt(n)))
    ny = int(np.ceil(n / nx))
    return nx, ny, 1


#: The text file each relaxometry field of a simulated scan is written to (one value per
#: volume; TR too, though ``mixmap fit`` takes it as one number, ``--repetition-time``).
FIELD_TEXT = {"TE": "echo_times.txt", "TI": "inversion_times.txt",
              "flip_angle": "flip_angles.txt", "TR": "repetition_time.txt"}


def simulation_fields(sim_dir: Path):
    """The :class:`~mixmap.io.fields.FieldFiles` of a relaxometry simulation folder, or None
    for a diffusion one (``dwi.bval``)."""
    from mixmap.io.fields import FieldFiles

    files = {name: sim_dir / text for name, text in FIELD_TEXT.items()
             if (sim_dir / text).exists()}
    if not files:
        return None
    tr = float(np.loadtxt(files["TR"], ndmin=1)[0]) if "TR" in files else None
    return FieldFiles.of(files.get("TE"), files.get("TI"), files.get("flip_angle"), tr)


def write_simulation(sim: Simulation, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write a simulation as a scan (``dwi.nii.gz`` with ``dwi.bval`` and ``dwi.bvec``, or a
    relaxometry scan's :data:`FIELD_TEXT` files; ``mask.nii.gz``), the truth
    (``truth/param-<name>.nii.gz``, ``truth/param-cluster``) and ``simulation.json``, so that
    ``mixmap fit`` and ``mixmap evaluate`` run on it like on a scan. Voxels fill the grid in C
    order; the mask marks the first n.
    """
    from mixmap.io import AtomicOutput, vectors_to_volume

    out = Path(out_dir)
    if sim.mask is not None:
        mask = sim.mask
        affine = sim.affine if sim.affine is not None else np.diag([1.25, 1.25, 1.25, 1.0])
    else:
        mask = np.zeros(grid_shape(sim.signals.shape[0]), dtype=bool)
        mask.reshape(-1)[: sim.signals.shape[0]] = True
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
    with AtomicOutput(out, force=force) as w:
        w.nifti_volumes("dwi.nii.gz", mask.shape, sim.acquisition.n, affine,
                        _volume_blocks(sim.signals, mask))
        w.nifti("mask.nii.gz", mask.astype(np.uint8), affine)
        if sim.acquisition.is_diffusion:
            w.text("dwi.bval", _fsl_text((sim.acquisition.bvals * 1000)[None], "%g"))
            w.text("dwi.bvec", _fsl_text(sim.acquisition.bvecs.T, "%.6f"))
        for name, values in sim.acquisition.fields.items():
            if name in FIELD_TEXT:
                w.text(FIELD_TEXT[name], _fsl_text(values[None], "%.6g"))
        for k, v in sim.truth.items():
            w.nifti(f"truth/param-{k}.nii.gz", vectors_to_volume(v, mask), affine)
        w.nifti("truth/param-cluster.nii.gz",
                vectors_to_volume(sim.labels.astype(np.float32), mask), affine)
        info = {
            "preset": asdict(sim.preset) if sim.preset is not None else None,
            "model": sim.model,
            "snr": sim.snr,
            "noise": sim.noise,
            "sigma": sim.sigma,
            "seed": sim.seed,
            "n_voxels": int(sim.signals.shape[0]),
            "acquisition": sim.acquisition.describe(),
            "cluster_names": sim.class_names,
            **sim.info,
        }
        w.text("simulation.json", json.dumps(info, indent=2, ensure_ascii=False))
    return out


def _volume_blocks(signals: np.ndarray, mask: np.ndarray):
    """The (x, y, z, k) float32 volumes of ``signals`` (rows = mask voxels), a block at a time
    (a whole-brain 4-D volume is never held: 4 GB on the HCP grid)."""
    from mixmap.io.nifti import volumes_per_block

    k = volumes_per_block(mask.shape)
    for t0 in range(0, signals.shape[1], k):
        block = np.zeros(mask.shape + (min(k, signals.shape[1] - t0),), dtype=np.float32)
        block[mask] = signals[:, t0 : t0 + k]
        yield block


def read_simulation_info(sim_dir: str | Path) -> dict:
    """The ``simulation.json`` of a folder written by :func:`write_simulation`."""
    path = Path(sim_dir) / "simulation.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; --truth must be a folder written by `mixmap simulate`"
        )
    return json.loads(path.read_text())


def preset_from_info(info: dict) -> Preset | None:
    """The :class:`Preset` recorded in a ``simulation.json`` (:func:`read_simulation_info`);
    None for a phantom of a real scan."""
    p = info["preset"]
    if p is None:
        return None
    clusters = tuple(Cluster(**c) for c in p["clusters"])
    return Preset(p["name"], p["model"], clusters, p["n_voxels"], p.get("description", ""))


def _fsl_text(arr: np.ndarray, fmt: str) -> str:
    return "\n".join(" ".join(fmt % x for x in row) for row in np.atleast_2d(arr)) + "\n"


__all__ = ["FIELD_TEXT", "grid_shape", "preset_from_info", "read_simulation_info",
           "simulation_fields", "write_simulation"]
