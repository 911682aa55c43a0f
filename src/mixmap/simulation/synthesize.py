"""Simulated scans: tissue-like mixtures of parameter values, any acquisition, Gaussian or Rician
noise. The truth is kept, so every fitter can be scored against it (and, for the 2-parameter MSDKI
presets, against the Bayes-optimal estimate in :mod:`mixmap.evaluation.scores`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mixmap.acquisition import SCHEMES, Acquisition
from mixmap.models import get_model

NOISE_TYPES = ("gaussian", "rician")


@dataclass(frozen=True)
class Cluster:
    """One tissue class: mixture weight and per-parameter Gaussian mean and standard deviation.

    Parameters not listed take S0 = 1 (no spread) or, for directions, a uniform random
    direction. Draws outside a parameter's bounds are redrawn (a truncated Gaussian).
    """

    name: str
    weight: float
    mean: dict[str, float]
    std: dict[str, float]


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    clusters: tuple[Cluster, ...]
    n_voxels: int = 10000
    description: str = ""

    @property
    def weights(self) -> np.ndarray:
        w = np.array([c.weight for c in self.clusters], dtype=np.float64)
        return w / w.sum()

    def varying(self) -> list[str]:
        """Scalar parameters that the clusters set (S0 excluded)."""
        names: list[str] = []
        for c in self.clusters:
            for k in c.mean:
                if k not in names and k != "S0":
                    names.append(k)
        return names


_SD = float(np.sqrt(0.1))  # the paper's variance 0.1 for white- and grey-matter-like clusters

PRESETS: dict[str, Preset] = {
    "paper-msdki": Preset(
        "paper-msdki",
        "msdki",
        (
            Cluster("WM", 0.5, {"D": 1.0, "K": 1.5}, {"D": _SD, "K": _SD}),
            Cluster("GM", 0.4, {"D": 1.5, "K": 1.0}, {"D": _SD, "K": _SD}),
            Cluster("CSF", 1.0, {"D": 3.0, "K": 0.0}, {"D": 0.1, "K": 0.1}),
        ),
        description="The paper's 3-cluster MSDKI simulation: (D, K) = (1, 1.5), (1.5, 1), (3, 0), "
        "weights 0.5:0.4:1, variance 0.1, 0.1, 0.01; S0 = 1",
    ),
    "msdki-4": Preset(
        "msdki-4",
        "msdki",
        (
            Cluster("A", 0.3, {"D": 0.8, "K": 1.8}, {"D": 0.15, "K": 0.25}),
            Cluster("B", 0.3, {"D": 1.2, "K": 1.2}, {"D": 0.2, "K": 0.2}),
            Cluster("C", 0.15, {"D": 2.0, "K": 0.6}, {"D": 0.25, "K": 0.2}),
            Cluster("D", 0.25, {"D": 2.9, "K": 0.1}, {"D": 0.1, "K": 0.1}),
        ),
        description="A 4-cluster MSDKI mixture unlike the paper's (other means, spreads and "
        "weights), to check that nothing is tuned to the paper's preset",
    ),
    "ball-stick": Preset(
        "ball-stick",
        "ball-stick",
        (
            Cluster("WM", 0.45, {"f": 0.6, "Dpar": 1.7, "Diso": 0.9},
                    {"f": 0.08, "Dpar": 0.2, "Diso": 0.15}),
            Cluster("GM", 0.35, {"f": 0.25, "Dpar": 1.5, "Diso": 1.0},
                    {"f": 0.08, "Dpar": 0.2, "Diso": 0.15}),
            Cluster("CSF", 0.2, {"f": 0.03, "Dpar": 2.0, "Diso": 3.0},
                    {"f": 0.02, "Dpar": 0.3, "Diso": 0.1}),
        ),
        description="Ball-stick with white-matter, grey-matter and CSF-like clusters, uniformly "
        "random stick directions; S0 = 1",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def get_scheme(name_or_files: str | tuple[str, str]) -> Acquisition:
    """A named scheme (``hcp``, ``clinical``) or an FSL (bval, bvec) pair of files."""
    if isinstance(name_or_files, tuple):
        return Acquisition.from_fsl(*name_or_files)
    try:
        return SCHEMES[name_or_files]()
    except KeyError:
        raise ValueError(
            f"unknown scheme {name_or_files!r}; choose one of: {', '.join(SCHEMES)} "
            f"or give --bvals and --bvecs files"
        ) from None


@dataclass
class Simulation:
    """A simulated scan: (n, m) float32 signals, the truth and how it was made."""

    signals: np.ndarray
    truth: dict[str, np.ndarray]
    labels: np.ndarray
    acquisition: Acquisition
    preset: Preset
    snr: float
    noise: str
    sigma: float
    seed: int
    info: dict = field(default_factory=dict)
    #: 3-D voxel layout (True = simulated voxel, rows in C order); None: a square slice.
    mask: np.ndarray | None = None


def sample_parameters(
    preset: Preset, n: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Draw ``n`` voxels' parameters and cluster labels from a preset's mixture."""
    model = get_model(preset.model)
    labels = rng.choice(len(preset.clusters), size=n, p=preset.weights)
    truth: dict[str, np.ndarray] = {}
    for p in model.parameters:
        if p.is_direction:
            v = rng.standard_normal((n, 3))
            truth[p.name] = v / np.linalg.norm(v, axis=1, keepdims=True)
            continue
        vals = np.ones(n)
        for ci, c in enumerate(preset.clusters):
            sel = np.flatnonzero(labels == ci)
            mu, sd = c.mean.get(p.name, 1.0), c.std.get(p.name, 0.0)
            x = mu + sd * rng.standard_normal(sel.size)
            bad = (x < p.lower) | (x > p.upper)
            for _ in range(1000):  # redraw out-of-bounds values: a truncated Gaussian
                if not bad.any():
                    break
                x[bad] = mu + sd * rng.standard_normal(int(bad.sum()))
                bad = (x < p.lower) | (x > p.upper)
            vals[sel] = np.clip(x, p.lower, p.upper)
        truth[p.name] = vals
    return truth, labels


def add_noise(
    signal: np.ndarray, sigma: float, noise: str, rng: np.random.Generator
) -> np.ndarray:
    """Gaussian: s + σε. Rician: |s + σε₁ + iσε₂| (magnitude of complex Gaussian noise)."""
    if noise == "gaussian":
        return signal + sigma * rng.standard_normal(signal.shape)
    if noise == "rician":
        return np.hypot(signal + sigma * rng.standard_normal(signal.shape),
                        sigma * rng.standard_normal(signal.shape))
    raise ValueError(f"unknown noise {noise!r}; choose one of: {', '.join(NOISE_TYPES)}")


def simulate(
    preset: str | Preset = "paper-msdki",
    acquisition: Acquisition | str = "hcp",
    *,
    snr: float = 20.0,
    noise: str = "gaussian",
    n_voxels: int | None = None,
    seed: int = 0,
) -> Simulation:
    """Simulate a scan.

    ``snr`` is relative to S0 = 1: the noise standard deviation is 1/snr (for Rician noise,
    that of each of the real and imaginary channels).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    acq = get_scheme(acquisition) if isinstance(acquisition, str) else acquisition
    if snr <= 0:
        raise ValueError(f"SNR must be positive, got {snr}")
    if noise not in NOISE_TYPES:
        raise ValueError(f"unknown noise {noise!r}; choose one of: {', '.join(NOISE_TYPES)}")
    model = get_model(preset.model)
    model.check_acquisition(acq)
    n = int(n_voxels or preset.n_voxels)
    rng = np.random.default_rng(seed)
    truth, labels = sample_parameters(preset, n, rng)
    with torch.no_grad():
        clean = model.forward(
            {k: torch.as_tensor(v, dtype=torch.float64) for k, v in truth.items()}, acq
        ).numpy()
    sigma = 1.0 / snr
    signals = add_noise(clean, sigma, noise, rng).astype(np.float32)
    return Simulation(
        signals=signals,
        truth={k: v.astype(np.float32) for k, v in truth.items()},
        labels=labels.astype(np.int64),
        acquisition=acq,
        preset=preset,
        snr=float(snr),
        noise=noise,
        sigma=sigma,
        seed=int(seed),
    )


#: Grid of the HCP minimally preprocessed diffusion data (1.25 mm isotropic).
HCP_GRID = (145, 174, 145)


def brain_layout(
    shape: tuple[int, int, int] = HCP_GRID, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Tissue labels on a brain-like grid: -1 outside, 0 WM, 1 GM, 2 CSF.

    An ellipsoidal brain filling about a quarter of the box (≈ 0.9 M voxels on the HCP grid):
    an outer CSF rim, a folded cortical grey-matter ribbon (about 3 voxels thick on the HCP
    grid, folds from a sum of random spherical waves), white matter inside, two ventricles (CSF)
    and two deep grey-matter nuclei. Made for scale and speed benchmarks that need realistic
    spatial structure and a realistic number of voxels, not for anatomy.
    """
    rng = rng or np.random.default_rng(0)
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((x / 0.78) ** 2 + (y / 0.82) ** 2 + (z / 0.74) ** 2)
    fold = np.zeros_like(r)
    for _ in range(6):
        k = rng.normal(size=3).astype(np.float32)
        k = 9 * k / np.linalg.norm(k)
        fold += np.sin(k[0] * x + k[1] * y + k[2] * z + rng.uniform(0, 2 * np.pi))
    rf = r + 0.02 * fold / np.sqrt(6)
    labels = np.full(shape, -1, dtype=np.int8)
    inside = r < 1.0
    labels[inside] = 2  # CSF rim by default
    labels[inside & (rf < 0.96)] = 1  # cortex
    labels[inside & (rf < 0.90)] = 0  # white matter
    for sx in (-1, 1):
        vent = ((x - 0.12 * sx) / 0.08) ** 2 + (y / 0.25) ** 2 + ((z - 0.1) / 0.12) ** 2 < 1
        labels[vent] = 2
        nucleus = ((x - 0.28 * sx) / 0.1) ** 2 + ((y + 0.05) / 0.12) ** 2 + (z / 0.1) ** 2 < 1
        labels[nucleus] = 1
    return labels


def simulate_brain(
    preset: str | Preset = "paper-msdki",
    acquisition: Acquisition | str = "hcp",
    *,
    shape: tuple[int, int, int] = HCP_GRID,
    snr: float = 20.0,
    noise: str = "gaussian",
    seed: int = 0,
    chunk: int = 100_000,
) -> Simulation:
    """A brain-sized scan with spatial structure: :func:`brain_layout` tissue classes, each with
    its preset cluster's parameter distribution (matched by name: WM, GM, CSF), varying smoothly
    in space (a Gaussian-filtered random field, 2 voxels wide) plus voxel-to-voxel scatter;
    directions of a ball-stick preset form smooth bundles. Signals are made in chunks, so peak
    memory is the float32 signal array plus one chunk.
    """
    from scipy.ndimage import gaussian_filter

    preset = get_preset(preset) if isinstance(preset, str) else preset
    acq = get_scheme(acquisition) if isinstance(acquisition, str) else acquisition
    model = get_model(preset.model)
    model.check_acquisition(acq)
    rng = np.random.default_rng(seed)
    tissue = brain_layout(shape, rng)
    mask = tissue >= 0
    labels = tissue[mask].astype(np.int64)
    by_name = {c.name: c for c in preset.clusters}
    clusters = [by_name.get(name, preset.clusters[min(i, len(preset.clusters) - 1)])
                for i, name in enumerate(("WM", "GM", "CSF"))]

    def smooth_field() -> np.ndarray:
        f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)[mask]
        return f / max(float(f.std()), 1e-6)

    truth: dict[str, np.ndarray] = {}
    for p in model.parameters:
        if p.is_direction:
            v = np.stack([smooth_field() for _ in range(3)], 1)
            truth[p.name] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
            continue
        field_ = smooth_field()
        vals = np.ones(labels.size, dtype=np.float32)
        for ci, c in enumerate(clusters):
            sel = labels == ci
            mu, sd = c.mean.get(p.name, 1.0), c.std.get(p.name, 0.0)
            vals[sel] = mu + sd * (0.8 * field_[sel] + 0.6 * rng.standard_normal(int(sel.sum())))
        truth[p.name] = np.clip(vals, p.lower, p.upper)
    sigma = 1.0 / snr
    signals = np.empty((labels.size, acq.n), dtype=np.float32)
    for start in range(0, labels.size, chunk):
        part = {k: torch.as_tensor(v[start : start + chunk]) for k, v in truth.items()}
        with torch.no_grad():
            clean = model.forward(part, acq).numpy()
        signals[start : start + chunk] = add_noise(clean, sigma, noise, rng)
    brain = Preset(f"brain-{preset.name}", preset.model, tuple(clusters), labels.size,
                   f"brain-shaped layout {shape} with the clusters of {preset.name}")
    return Simulation(signals, truth, labels, acq, brain, float(snr), noise, sigma, int(seed),
                      info={"layout": "brain", "shape": list(shape)}, mask=mask)


def grid_shape(n: int) -> tuple[int, int, int]:
    """A near-square single-slice grid holding ``n`` voxels."""
    nx = int(np.ceil(np.sqrt(n)))
    ny = int(np.ceil(n / nx))
    return nx, ny, 1


def write_simulation(sim: Simulation, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write a simulation as a scan (``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec``,
    ``mask.nii.gz``), the truth (``truth/param-<name>.nii.gz``, ``truth/param-cluster``) and
    ``simulation.json``, so that ``mixmap fit`` and ``mixmap evaluate`` run on it like on a scan.
    Voxels fill the grid in C order; the mask marks the first n.
    """
    from mixmap.io import AtomicOutput, vectors_to_volume

    out = Path(out_dir)
    if sim.mask is not None:
        mask = sim.mask
        affine = np.diag([1.25, 1.25, 1.25, 1.0])
    else:
        mask = np.zeros(grid_shape(sim.signals.shape[0]), dtype=bool)
        mask.reshape(-1)[: sim.signals.shape[0]] = True
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
    with AtomicOutput(out, force=force) as w:
        w.nifti_volumes("dwi.nii.gz", mask.shape, sim.acquisition.n, affine,
                        _volume_blocks(sim.signals, mask))
        w.nifti("mask.nii.gz", mask.astype(np.uint8), affine)
        w.text("dwi.bval", _fsl_text((sim.acquisition.bvals * 1000)[None], "%g"))
        w.text("dwi.bvec", _fsl_text(sim.acquisition.bvecs.T, "%.6f"))
        for k, v in sim.truth.items():
            w.nifti(f"truth/param-{k}.nii.gz", vectors_to_volume(v, mask), affine)
        w.nifti("truth/param-cluster.nii.gz",
                vectors_to_volume(sim.labels.astype(np.float32), mask), affine)
        info = {
            "preset": asdict(sim.preset),
            "snr": sim.snr,
            "noise": sim.noise,
            "sigma": sim.sigma,
            "seed": sim.seed,
            "n_voxels": int(sim.signals.shape[0]),
            "acquisition": sim.acquisition.describe(),
            "cluster_names": [c.name for c in sim.preset.clusters],
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
    path = Path(sim_dir) / "simulation.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; --truth must be a folder written by `mixmap simulate`"
        )
    return json.loads(path.read_text())


def preset_from_info(info: dict) -> Preset:
    p = info["preset"]
    clusters = tuple(Cluster(**c) for c in p["clusters"])
    return Preset(p["name"], p["model"], clusters, p["n_voxels"], p.get("description", ""))


def _fsl_text(arr: np.ndarray, fmt: str) -> str:
    return "\n".join(" ".join(fmt % x for x in row) for row in np.atleast_2d(arr)) + "\n"
