"""The fitter interface shared by least squares and the learned fitters, and its result."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.models import SignalModel, get_model


@dataclass
class FitResult:
    """Parameter estimates for every voxel (rows), in output units.

    Attributes
    ----------
    params
        name -> (n_voxels,) array, or (n_voxels, 3) for a direction. S0 is in the input's
        intensity units, diffusivities in µm²/ms.
    std
        name -> (n_voxels,) posterior (or asymptotic, for least squares) standard deviation.
    cluster_probs
        (n_voxels, K) mixture-component probabilities q(y|x), for mixture fitters.
    history
        One dict per epoch/iteration of named loss terms (empty for closed-form fitters).
    settings
        Everything needed to rerun: method, model, hyper-parameters, seed, device.
    timings
        Wall seconds of each phase of the fit that made these maps (least squares: ``fit``;
        learned fitters: ``prepare``, ``train``, ``empirical_bayes`` where vae-gmm refits
        its prior, ``maps``; the command line adds ``load``), measured with
        :class:`PhaseTimer`.
    device
        Where it ran, in words (:func:`device_description`).
    """

    model: str
    method: str
    params: dict[str, np.ndarray]
    std: dict[str, np.ndarray] = field(default_factory=dict)
    cluster_probs: np.ndarray | None = None
    history: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    noise_sigma: float | None = None  # estimated noise level, input intensity units
    timings: dict[str, float] = field(default_factory=dict)
    device: str | None = None

    @property
    def n_voxels(self) -> int:
        return int(next(iter(self.params.values())).shape[0])

    @property
    def clusters(self) -> np.ndarray | None:
        """Most likely mixture component per voxel, or None."""
        if self.cluster_probs is None:
            return None
        return self.cluster_probs.argmax(1)

    def maps(self) -> dict[str, np.ndarray]:
        """Everything to write as maps: name -> (n,) or (n, k) arrays (BIDS param names); the
        model's :attr:`~mixmap.models.base.SignalModel.hidden` parameters are left out."""
        from mixmap.models import MODELS

        cls = MODELS.get(self.model)
        hidden = cls.hidden if cls is not None else frozenset()
        out = {name: v for name, v in self.params.items() if name not in hidden}
        for name, v in self.std.items():
            if name not in hidden:
                out[f"{name}:std"] = v
        if self.cluster_probs is not None:
            out["cluster"] = self.clusters.astype(np.float32)
            out["clusterprob"] = self.cluster_probs
        return out


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is a clear error."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("--device mps: no Apple GPU is available; use --device cpu or auto")
    return torch.device(name)


def device_description(device: str | torch.device) -> str:
    """The device in words, for sidecars and benchmark tables: 'cuda:0 (NVIDIA H200)', 'cpu
    (2 torch threads)'."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if dev.type == "cpu":
        return f"cpu ({torch.get_num_threads()} torch threads)"
    return str(dev)


class PhaseTimer:
    """Wall seconds per named phase. On an accelerator a phase ends with a synchronisation,
    so the kernels it queued count in it and not in the next one."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elif self.device.type == "mps":
                torch.mps.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def reference_mask(acquisition: Acquisition, model: SignalModel | None = None) -> np.ndarray:
    """(n,) bool: ``model``'s reference volumes, or the b=0 volumes without a model."""
    if model is None:
        return acquisition.b0_mask
    return model.reference_volumes(acquisition)


def signal_scale(signals: np.ndarray, acquisition: Acquisition,
                 model: SignalModel | None = None) -> float:
    """Intensity scale that the scale parameter's bounds are relative to: the 95th percentile
    over voxels of the mean signal of the reference volumes (:func:`reference_mask`; of the
    largest signal where the acquisition has none)."""
    ref = reference_mask(acquisition, model)
    if ref.any():
        s0 = signals[:, ref].mean(1)
    else:
        s0 = signals.max(1)
    scale = float(np.percentile(s0, 95)) if s0.size else 1.0
    return scale if np.isfinite(scale) and scale > 0 else 1.0


def noise_sigma_from_repeats(signals: np.ndarray, acquisition: Acquisition,
                             model: SignalModel | None = None) -> float | None:
    """Noise standard deviation pooled over voxels from the repeated reference volumes
    (:func:`reference_mask`; None if fewer than 2, or if they are identical in most voxels:
    noise-free or copied volumes say nothing of the noise): the median over voxels of the
    unbiased per-voxel variance, corrected to a mean, so that a few voxels with artefacts do
    not inflate it."""
    ref = reference_mask(acquisition, model)
    if ref.sum() < 2 or signals.shape[0] == 0:
        return None
    var = signals[:, ref].astype(np.float64).var(1, ddof=1)
    # The median of a scaled chi-square with k dof is below its mean; correct for that.
    k = int(ref.sum()) - 1
    from scipy.stats import chi2

    sigma = float(np.sqrt(np.median(var) * k / chi2.ppf(0.5, k)))
    return sigma if sigma > 0 else None


class Fitter:
    """Base class: hyper-parameters in ``__init__``, ``fit(signals, acquisition)``.

    ``signals`` is a (n_voxels, n_meas) array of masked voxels in the input's units.
    """

    name: str = ""

    def __init__(
        self,
        model: SignalModel | str,
        *,
        device: str = "cpu",
        seed: int = 0,
        quiet: bool = True,
    ) -> None:
        self.model = get_model(model) if isinstance(model, str) else model
        self.device = str(device)
        self.seed = int(seed)
        self.quiet = bool(quiet)

    def settings(self) -> dict:
        """Hyper-parameters as JSON-ready data (sidecars, model files)."""
        out = {"method": self.name, "model": self.model.name, "seed": self.seed,
               "device": self.device}
        if self.model.constants:
            out["constants"] = self.model.constant_values()
        return out

    def fit(self, signals: np.ndarray, acquisition: Acquisition) -> FitResult:
        raise NotImplementedError

    # shared input checks ------------------------------------------------------------
    def _check_inputs(self, signals: np.ndarray, acquisition: Acquisition) -> np.ndarray:
        signals = np.asarray(signals, dtype=np.float32)
        if signals.ndim != 2:
            raise ValueError(f"signals must be (n_voxels, n_meas), got shape {signals.shape}")
        if signals.shape[1] != acquisition.n:
            raise ValueError(
                f"signals have {signals.shape[1]} measurements but the acquisition has "
                f"{acquisition.n}"
            )
        if signals.shape[0] == 0:
            raise ValueError("no voxels to fit (empty mask?)")
        if not np.all(np.isfinite(signals)):
            raise ValueError("signals contain NaN or Inf; mask those voxels out first")
        self.model.check_acquisition(acquisition)
        return signals


#: Elements (voxels × measurements) per block when signals are reduced to shell means.
WORKING_BLOCK_ELEMENTS = 4_000_000


@dataclass
class Scheme:
    """The acquisition as the physics sees it: all measurements, or (for a direction-independent
    model) one mean per b-value with its count as weight. Σ_j (y_j − s_b)² = n_b (ȳ_b − s_b)² +
    Σ_j (y_j − ȳ_b)²: the minimiser and the likelihood are unchanged, and the last term (the
    within-shell scatter returned by :meth:`working_signals`) keeps residual-based σ̂ exact.
    Shared by least squares and the learned fitters.

    The reduction is over equal values only (``volume_groups(exact=True)``), so each volume
    keeps its own b in the likelihood even where a scanner jitters b within a shell. What
    needs one column per shell instead (least-squares starts, the empirical-Bayes grid) uses
    :attr:`by_shell`: the same reduction over the shells within the model's tolerance, at
    each shell's mean b; it is this scheme itself where the two groupings agree (exact
    b-values), so clean schemes fit exactly as before."""

    full: Acquisition
    work: Acquisition
    weights: torch.Tensor | None  # (m',) measurements per column, None for all measurements
    groups: list[torch.Tensor] | None
    shells: Scheme | None = None  # the reduction over shells within tolerance, where it differs

    @property
    def n_meas(self) -> int:
        return self.full.n

    @property
    def by_shell(self) -> Scheme:
        """One column per shell (within the model's tolerance) at the shell's mean b."""
        return self if self.shells is None else self.shells

    @classmethod
    def build(cls, model: SignalModel, acq: Acquisition, reduce: bool, device) -> Scheme:
        if not (reduce and model.direction_independent):
            return cls(acq, acq, None, None)
        equal = model.volume_groups(acq, exact=True)  # equal values only: exact reduction
        scheme = cls._over(model, acq, equal, device)
        shells = model.volume_groups(acq)
        if [s.indices for s in shells] != [s.indices for s in equal]:
            scheme.shells = cls._over(model, acq, shells, device)
        return scheme

    @classmethod
    def _over(cls, model: SignalModel, acq: Acquisition, shells, device) -> Scheme:
        """The scheme of the means over ``shells`` (volume groups of ``acq``)."""
        work = acq.reduced(shells, by=model.group_field)
        weights = torch.tensor([float(s.n) for s in shells], device=device)
        groups = [torch.as_tensor(s.indices, device=device) for s in shells]
        return cls(acq, work, weights, groups)

    def working_signals(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, m) -> working signals (n, m') and within-shell scatter (n,) (None if unreduced)."""
        if self.groups is None:
            return y, None
        # In blocks of rows: each shell's columns are gathered (a copy) and squared, so on
        # a whole scan at once the temporaries alone came to most of the scan's size again.
        n = y.shape[0]
        means = y.new_empty(n, len(self.groups))
        within = y.new_empty(n)
        rows = max(1, WORKING_BLOCK_ELEMENTS // max(1, y.shape[1]))
        for start in range(0, n, rows):
            blk = y[start:start + rows]
            m = torch.stack([blk[:, g].mean(1) for g in self.groups], 1)
            means[start:start + rows] = m
            within[start:start + rows] = sum(((blk[:, g] - m[:, i:i + 1]) ** 2).sum(1)
                                             for i, g in enumerate(self.groups))
        return means, within
