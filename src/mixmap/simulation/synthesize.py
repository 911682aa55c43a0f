"""Simulated scans: a preset's mixture drawn voxel by voxel, signals through the model on any
acquisition, Gaussian or Rician noise. The truth is kept, so every fitter can be scored against
it (and, for the 2-parameter MSDKI presets, against :func:`mixmap.evaluation.bayes_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.models import get_model
from mixmap.simulation.presets import NOISE_TYPES, Preset, get_preset, get_scheme


@dataclass
class Simulation:
    """A simulated scan: (n, m) float32 signals, the truth and how it was made."""

    signals: np.ndarray
    truth: dict[str, np.ndarray]
    labels: np.ndarray
    acquisition: Acquisition
    #: The mixture drawn from; None for a phantom of a real scan (``info["model"]`` then).
    preset: Preset | None
    snr: float
    noise: str
    sigma: float
    seed: int
    info: dict = field(default_factory=dict)
    #: 3-D voxel layout (True = simulated voxel, rows in C order); None: a square slice.
    mask: np.ndarray | None = None
    #: The voxel-to-world affine to write (None: isotropic voxels, see ``write_simulation``).
    affine: np.ndarray | None = None
    #: Names of the label values (None: the preset's cluster names).
    cluster_names: tuple[str, ...] | None = None

    @property
    def model(self) -> str:
        """The signal model's name."""
        return self.preset.model if self.preset is not None else self.info["model"]

    @property
    def class_names(self) -> list[str]:
        """Names of the label values, in order."""
        if self.cluster_names is not None:
            return list(self.cluster_names)
        return [c.name for c in self.preset.clusters]


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
    acquisition: Acquisition | str | None = None,
    *,
    snr: float = 20.0,
    noise: str = "gaussian",
    n_voxels: int | None = None,
    seed: int = 0,
) -> Simulation:
    """Simulate a scan.

    ``acquisition``: an :class:`Acquisition`, a named scheme, or None for the preset's own
    (:attr:`Preset.scheme`). ``snr`` is relative to S0 = 1: the noise standard deviation is
    1/snr (for Rician noise, that of each of the real and imaginary channels).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if acquisition is None:
        acquisition = preset.scheme
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


__all__ = ["Simulation", "add_noise", "sample_parameters", "simulate"]
