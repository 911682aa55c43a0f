"""What every learned fitter shares (:class:`LearnedFitter`): data preparation in working
units (:class:`Data`), fit / apply / maps, the training checkpoint switch and save; the training
loop itself is :mod:`mixmap.fitting.learned.training`.

Working units: signals are divided by the scan's :func:`~mixmap.fitting.base.signal_scale`, so
S0 is about 1 and the bounds of scaled parameters apply; scaled parameters are multiplied back
on output, exactly as least squares does. For a direction-independent model with a Gaussian
likelihood the physics is evaluated on the shell means (:class:`~mixmap.fitting.base.Scheme`),
which gives the same likelihood as all measurements.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mixmap.fitting.learned.distributed as distributed
from mixmap.acquisition import Acquisition
from mixmap.fitting.base import (
    FitResult,
    Fitter,
    PhaseTimer,
    Scheme,
    device_description,
    noise_sigma_from_repeats,
    resolve_device,
    signal_scale,
)
from mixmap.fitting.learned.training import (
    EPOCH_VOXELS,
    Trainer,
    TrainingCheckpoint,
)
from mixmap.io import model_store
from mixmap.models import SignalModel, get_model
from mixmap.nn import rng


@dataclass
class Data:
    """Every voxel of a fit in working units: signals, working signals, encoder features."""

    y: torch.Tensor  # (n, m)
    yw: torch.Tensor  # (n, m')
    extra_ss: torch.Tensor | None  # (n,)
    feats: torch.Tensor  # (n, f)
    anchor: torch.Tensor | None = None  # (n, P) least-squares estimate, unbounded coordinates

    def rows(self, idx) -> Data:
        return Data(self.y[idx], self.yw[idx],
                    None if self.extra_ss is None else self.extra_ss[idx], self.feats[idx],
                    None if self.anchor is None else self.anchor[idx])

    @property
    def n(self) -> int:
        return int(self.y.shape[0])


def lsq_features(model: SignalModel, y_scaled: np.ndarray, acq: Acquisition,
                 device: torch.device | str = "cpu") -> np.ndarray:
    """Least-squares estimate per voxel in unbounded coordinates, clipped to ±8 (an encoder
    input: the fit stays self-supervised, no truth is used). Fitted over the model's declared
    ranges, the ones the network's outputs span, not least squares' default narrower ones, on
    the fit's own device."""
    from mixmap.fitting.lsq import LeastSquaresFitter

    res = LeastSquaresFitter(model, max_iter=30, bounds=model.declared_bounds(),
                             device=str(device)).fit(y_scaled, acq)
    scale = res.settings["signal_scale"]
    params = {}
    for p in model.parameters:
        v = torch.as_tensor(res.params[p.name], dtype=torch.float32)
        params[p.name] = v / scale if p.scaled else v
    return model.join(params).clamp(-8, 8).numpy()


def json_dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class LearnedFitter(Fitter):
    """Base of the trained fitters. Subclasses build the network (:meth:`_build`), give the
    loss of a mini-batch (:meth:`_loss`) and the maps (:meth:`_predict`).

    Launched by ``torchrun`` on several processes, :meth:`fit` trains on all of them
    (:mod:`mixmap.fitting.learned.distributed`): ``batch_size`` stays the global mini-batch,
    the gradients are averaged, every process returns the same maps, and only the main
    process writes checkpoints.

    ``on_epoch``, when set, is called as ``on_epoch(row)`` after each accepted epoch (``row``:
    that epoch's ``epoch`` and named loss terms, as in the result's ``history``), before the
    epoch's checkpoint is written; an exception it raises stops the fit.
    """

    #: Hyper-parameter names saved with the weights and passed back to ``__init__`` on load.
    hyper_names: tuple[str, ...] = ()
    #: Voxels per epoch (see :data:`~mixmap.fitting.learned.training.EPOCH_VOXELS`).
    epoch_voxels: int = EPOCH_VOXELS

    def __init__(self, model, *, device: str = "cpu", seed: int = 0, quiet: bool = True) -> None:
        super().__init__(model, device=device, seed=seed, quiet=quiet)
        self.net: nn.Module | None = None
        self.trained: dict | None = None  # what the trained network depends on
        self.checkpoint_path: Path | None = None
        self.resume = False
        self.on_epoch: Callable[[dict], None] | None = None
        self._data_key = ""

    def use_checkpoint(self, path: str | Path, resume: bool = False) -> None:
        """Save the training state to ``path`` after every epoch (atomically; deleted by
        :meth:`finish_checkpoint`). With ``resume``, a checkpoint left there by an interrupted
        run of the same data and settings is continued from its last epoch: the result is the
        same as an uninterrupted run."""
        self.checkpoint_path = Path(path)
        self.resume = bool(resume)

    def finish_checkpoint(self) -> None:
        """Delete the checkpoint once the maps are safely written (by the main process)."""
        if not distributed.is_main():
            return
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()

    # ---------------------------------------------------------------- hooks
    def _build(self, acq: Acquisition, sigma: float | None) -> nn.Module:
        raise NotImplementedError

    def _uses_lsq_features(self) -> bool:
        return False

    def _reduce(self) -> bool:
        """Whether the physics may run on shell means (Gaussian likelihood only)."""
        return True

    def _loss(self, batch: Data, scheme: Scheme, epoch: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def _end_epoch(self, data: Data, scheme: Scheme, epoch: int) -> None:
        """Called after each accepted epoch (e.g. a closed-form prior update)."""

    def _after_training(self, data: Data, scheme: Scheme) -> dict | None:
        """Called once after training, before the maps (e.g. an empirical-Bayes refit of a
        learned prior); what it returns is added to the result's settings."""
        return None

    def _predict(self, data: Data, scheme: Scheme, gen: torch.Generator):
        """-> (params (bounded, working units), std, cluster_probs or None) as numpy."""
        raise NotImplementedError

    def hyper(self) -> dict:
        return {k: getattr(self, k) for k in self.hyper_names}

    def settings(self) -> dict:
        return {**super().settings(), **self.hyper(), "epoch_voxels": int(self.epoch_voxels)}

    # ---------------------------------------------------------------- fit / apply
    def fit(self, signals: np.ndarray, acquisition: Acquisition) -> FitResult:
        signals = self._check_inputs(signals, acquisition)
        device = distributed.setup(resolve_device(self.device))
        if distributed.active() and signals.shape[0] < distributed.world_size():
            raise ValueError(f"{signals.shape[0]} voxels cannot be shared by "
                             f"{distributed.world_size()} processes; use fewer processes")
        scale = signal_scale(signals, acquisition, self.model)
        sigma_in = noise_sigma_from_repeats(signals, acquisition, self.model)
        sigma_w = None if sigma_in is None else sigma_in / scale
        import hashlib

        # Hashed in place (the same digest as of the concatenated bytes): no copy of the scan.
        key = hashlib.sha256(memoryview(np.ascontiguousarray(signals)).cast("B"))
        key.update(json_dumps(self.settings()).encode())
        self._data_key = key.hexdigest()
        distributed.check_same(self._data_key, "data or settings")
        timer = PhaseTimer(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            with timer("prepare"):
                net = self._build(acquisition, sigma_w).to(device)
                self.net = net
                scheme = Scheme.build(self.model, acquisition, self._reduce(), device)
                data = self._prepare(signals / scale, acquisition, scheme, device,
                                     calibrate=True)
            if distributed.active():  # each process its own draws for its own voxels
                torch.manual_seed(distributed.rank_seed(self.seed))
            with timer("train"):
                history = self._trainer(data, scheme).run()
            with timer("empirical_bayes"):
                extra = self._after_training(data, scheme)
        with timer("maps"):
            result = self._result(data, scheme, scale)
        result.timings = dict(timer.seconds)
        if extra:
            result.settings.update(extra)
        else:  # nothing ran after training (only vae-gmm refits its prior)
            result.timings.pop("empirical_bayes")
        self.trained = {
            "fingerprint": acquisition.fingerprint(),
            "acquisition": acquisition.to_record(),
            "signal_scale": scale,
            "noise_sigma": result.noise_sigma,
            "noise_sigma_source": "b0" if sigma_in is not None else "learned",
            "noise_sigma_factor": self._sigma_factor(sigma_w),
        }
        result.history = history
        return result

    def apply(self, signals: np.ndarray, acquisition: Acquisition, *,
              allow_other_acquisition: bool = False) -> FitResult:
        """Map new voxels with the trained network (no training).

        The scan's own signal scale (and noise level, when it has >= 2 b=0 volumes) is used,
        so a scan with another intensity scaling maps the same. A different acquisition is
        refused unless ``allow_other_acquisition``.
        """
        timer = PhaseTimer(resolve_device(self.device))
        with timer("prepare"):
            data, scheme, scale = self._apply_data(signals, acquisition,
                                                   allow_other_acquisition)
        with timer("maps"):
            result = self._result(data, scheme, scale)
        result.timings = dict(timer.seconds)
        result.settings["applied"] = True
        return result

    def _apply_data(self, signals: np.ndarray, acquisition: Acquisition,
                    allow_other_acquisition: bool) -> tuple[Data, Scheme, float]:
        """A new scan's voxels in working units for the trained network (see :meth:`apply`);
        returns (data, scheme, signal scale)."""
        if self.net is None or self.trained is None:
            raise RuntimeError(f"{self.name}: fit() or load_fitter() first; nothing is trained")
        signals = self._check_inputs(signals, acquisition)
        trained_acq = Acquisition.from_record(self.trained["acquisition"])
        if not acquisition.same_scheme(trained_acq):
            if not allow_other_acquisition:
                trained_n = trained_acq.n
                raise ValueError(
                    f"the acquisition (fingerprint {acquisition.fingerprint()}, "
                    f"{acquisition.n} measurements) differs from the one this model was trained "
                    f"on (fingerprint {self.trained['fingerprint']}, "
                    f"{trained_n} measurements); retrain on this scan, or pass "
                    f"allow_other_acquisition=True (--allow-other-acquisition) to apply it anyway"
                )
            self._adapt_features(acquisition)
        device = distributed.setup(resolve_device(self.device))
        self.net.to(device)
        scale = signal_scale(signals, acquisition, self.model)
        sigma_in = noise_sigma_from_repeats(signals, acquisition, self.model)
        if sigma_in is not None and self.trained["noise_sigma_source"] == "b0":
            self._set_sigma_working(sigma_in / scale
                                    * float(self.trained.get("noise_sigma_factor", 1.0)))
        scheme = Scheme.build(self.model, acquisition, self._reduce(), device)
        data = self._prepare(signals / scale, acquisition, scheme, device, calibrate=False)
        return data, scheme, scale

    def _result(self, data: Data, scheme: Scheme, scale: float) -> FitResult:
        """Maps of every voxel; on several processes each maps its share, and all get all."""
        seed = self.seed + 1
        world = distributed.world_size() if distributed.active() else 1
        if world > 1:
            data, seed = data.rows(distributed.shard(data.n)), distributed.rank_seed(seed)
        gen = rng.draw_generator(seed, data.y.device)
        self.net.eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            params, std, probs = self._predict(data, scheme, gen)
        if world > 1:
            parts = distributed.all_gather_object((params, std, probs))
            params = {k: np.concatenate([p[0][k] for p in parts]) for k in params}
            std = {k: np.concatenate([p[1][k] for p in parts]) for k in std}
            probs = None if probs is None else np.concatenate([p[2] for p in parts])
        settings = {**self.settings(), "signal_scale": scale}
        if world > 1:
            settings["world_size"] = world
        for p in self.model.parameters:
            if p.scaled:
                params[p.name] = params[p.name] * scale
                if p.name in std:
                    std[p.name] = std[p.name] * scale
        return FitResult(
            model=self.model.name,
            method=self.name,
            params={k: np.asarray(v, dtype=np.float32) for k, v in params.items()},
            std={k: np.asarray(v, dtype=np.float32) for k, v in std.items()},
            cluster_probs=None if probs is None else np.asarray(probs, dtype=np.float32),
            settings=settings,
            noise_sigma=_finite_or_none(self._sigma_working() * scale),
            device=device_description(next(self.net.parameters()).device),
        )

    def _sigma_working(self) -> float:
        noise = getattr(self.net, "noise", None)
        return float(noise.sigma.detach()) if noise is not None else float("nan")

    def _sigma_factor(self, sigma_b0: float | None) -> float:
        """The trained noise level over the b=0 estimate it started from (1 where there was
        none or σ was not refined: vae-gmm's empirical Bayes refines it under the Rician
        likelihood). :meth:`apply` scales a new scan's b=0 estimate by it, so that the same
        scan maps the same."""
        noise = getattr(self.net, "noise", None)
        if sigma_b0 is None or noise is None or noise.learned:
            return 1.0
        return float(noise.sigma.detach()) / float(sigma_b0)

    def _set_sigma_working(self, sigma: float) -> None:
        noise = getattr(self.net, "noise", None)
        if noise is not None and not noise.learned:
            noise.log_sigma.fill_(math.log(sigma))

    def _adapt_features(self, acquisition: Acquisition) -> None:
        """Rebuild the feature map for another acquisition, keeping the trained standardisation."""
        from mixmap.nn.encoders import FeatureMap

        old = self.net.features
        new = FeatureMap(self.model, acquisition, extra=old.n_features - old.raw_size)
        if new.n_features != old.n_features:
            raise ValueError(
                f"the trained encoder takes {old.n_features} inputs but this acquisition gives "
                f"{new.n_features}; it cannot be applied to this scheme, retrain instead"
            )
        new.shift.copy_(old.shift)
        new.spread.copy_(old.spread)
        new.calibrated.fill_(True)
        self.net.features = new.to(old.shift.device)

    def _prepare(self, ys: np.ndarray, acq: Acquisition, scheme: Scheme, device,
                 calibrate: bool) -> Data:
        y = torch.as_tensor(ys, dtype=torch.float32, device=device)
        extra = None
        if self._uses_lsq_features():
            # Fitted to all voxels in every process: seconds for a whole brain, and sharding
            # it would change the start (least squares scales by its input's 95th percentile).
            extra = torch.as_tensor(lsq_features(self.model, ys, acq, device), device=device)
        with torch.no_grad():
            if calibrate:
                self.net.features.calibrate(y, extra)
            feats = self.net.features(y, extra)
            yw, extra_ss = scheme.working_signals(y)
        return Data(y, yw, extra_ss, feats, extra)

    def _trainer(self, data: Data, scheme: Scheme) -> Trainer:
        """The training of this fit: its checkpoint (when :meth:`use_checkpoint` was called)
        keyed by the data and settings, and ``on_epoch``."""
        checkpoint = (None if self.checkpoint_path is None else
                      TrainingCheckpoint(self.checkpoint_path, self.resume, self._data_key))
        callbacks = [] if self.on_epoch is None else [self.on_epoch]
        return Trainer(self, data, scheme, checkpoint, on_epoch=callbacks)

    def _local(self, data: Data) -> Data:
        """This process's share of the voxels (all of them in a single process), for the work
        whose per-voxel results are then reduced or gathered (e.g. an EM update)."""
        return data.rows(distributed.shard(data.n)) if distributed.active() else data


    # ---------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> Path:
        """Write the trained fitter to folder ``path``: ``weights.safetensors`` and
        ``config.json`` (no pickle). Load it with :func:`mixmap.fitting.load_fitter`."""
        return model_store.write_model(path, self.to_config(), self.state_dict())

    def _check_trained(self) -> None:
        if self.net is None or self.trained is None:
            raise RuntimeError(f"{self.name}: nothing to save; fit() first")

    def to_config(self) -> dict:
        """What a trained fitter's config.json holds (JSON-ready): method, model,
        hyper-parameters, seed, declared parameters and what the network was trained on."""
        self._check_trained()
        trained = self.trained
        return {
            "method": self.name,
            "model": self.model.name,
            "hyper": self.hyper(),
            "seed": self.seed,
            "parameters": [p.describe() for p in self.model.parameters],
            **({"constants": self.model.constant_values()} if self.model.constants else {}),
            "acquisition": trained["acquisition"],
            "signal_scale": trained["signal_scale"],
            "noise_sigma": trained["noise_sigma"],
            "noise_sigma_source": trained["noise_sigma_source"],
            "noise_sigma_factor": trained.get("noise_sigma_factor", 1.0),
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained network's tensors, as contiguous CPU copies."""
        self._check_trained()
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`state_dict`'s tensors into the network built by :meth:`from_config`
        (strict: a RuntimeError when they do not fit it)."""
        if self.net is None:
            raise RuntimeError(f"{self.name}: no network; build it with from_config() first")
        self.net.load_state_dict(state, strict=True)

    @classmethod
    def from_config(cls, config: dict, *, device: str = "cpu") -> LearnedFitter:
        """A fitter of this class with the network of :meth:`to_config`'s ``config`` (weights
        still to load with :meth:`load_state_dict`); a ValueError when the configuration is
        inconsistent, its acquisition does not match its fingerprint, or its parameters are
        not this version's."""
        hyper = dict(config["hyper"])
        hyper.pop("prior", None)  # fixed by the class
        try:
            model = get_model(config["model"]).with_constants(config.get("constants", {}))
            fitter = cls(model, device=device, seed=int(config.get("seed", 0)), quiet=True,
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
            raise ValueError(f"inconsistent model configuration ({exc})") from None
        if acq.fingerprint() != acq_cfg.get("fingerprint"):
            raise ValueError("the stored acquisition does not match its fingerprint; the model "
                             "file is damaged")
        if config.get("parameters") != [p.describe() for p in fitter.model.parameters]:
            raise ValueError(
                f"trained with other parameters or bounds than this version's "
                f"{config['model']} model declares; retrain with this version"
            )
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


#: Per-voxel loss (nats) above which training compresses it logarithmically (see robust_mean).
ROBUST_NATS = 1e4


def robust_mean(per_voxel: torch.Tensor, c: float = ROBUST_NATS) -> torch.Tensor:
    """Mean of c·asinh(loss/c): the loss itself wherever |loss| << c (every voxel that the
    model fits sanely: a few hundred nats), logarithmic beyond, so that a few voxels whose
    signal the model cannot reach do not steer the shared network (see
    docs/design/learned-fitters.md)."""
    return (c * torch.asinh(per_voxel / c)).mean()
