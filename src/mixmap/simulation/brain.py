"""Brain-sized simulated scans with spatial structure, for scale and speed benchmarks."""

from __future__ import annotations

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.models import get_model
from mixmap.simulation.presets import Preset, get_preset, get_scheme
from mixmap.simulation.synthesize import Simulation, add_noise

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


__all__ = ["HCP_GRID", "brain_layout", "simulate_brain"]
