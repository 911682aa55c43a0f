"""What every learned fitter shares (:class:`LearnedFitter`): data preparation in working
units, a mini-batch Adam loop with a NaN/explosion guard (:func:`epoch_exploded`) and an
ELBO-plateau stopping rule, training checkpoints, save / apply.

Working units: signals are divided by the scan's :func:`~mixmap.fitting.base.signal_scale`, so
S0 is about 1 and the bounds of scaled parameters apply; scaled parameters are multiplied back
on output, exactly as least squares does. For a direction-independent model with a Gaussian
likelihood the physics is evaluated on the shell means, with weights and the within-shell
scatter kept, which gives the same likelihood as all measurements at a fraction of the cost.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

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
from mixmap.fitting.learned import distributed
from mixmap.models import SignalModel
from mixmap.nn import rng

log = logging.getLogger(__name__)

#: Voxels in one training epoch. A larger scan trains on a fresh random subset of this size
#: each epoch: the plateau rule and the EM prior update then see the same amount of data per
#: epoch whatever the scan's size, and training time stops growing with the number of voxels
#: (the maps of every voxel still cost time linear in voxels).
EPOCH_VOXELS = 50_000

#: Bad steps (non-finite loss or gradient, or a diverged epoch) tolerated before giving up.
MAX_BAD_STEPS = 12

#: An epoch whose loss is this many scales above the best epoch's has exploded (see
#: :func:`epoch_exploded`).
EXPLOSION_FACTOR = 10.0

#: Epoch term the explosion guard watches when a fitter logs it: the loss under the weights
#: that training ends with (a VAE's KL weight after its warm-up). The loss itself may rise on
#: purpose while the KL weight is raised; this one stays comparable from epoch to epoch.
GUARD_TERM = "loss_final"


def epoch_exploded(loss: float, best: float, first: float) -> bool:
    """Whether an epoch's loss is a divergence rather than training noise.

    ``loss``, ``best`` and ``first`` are the epoch means of one fixed objective (see
    :data:`GUARD_TERM`) for this epoch, the best accepted epoch and the first accepted epoch.
    The loss has exploded when it lies more than :data:`EXPLOSION_FACTOR` scales above the
    best, the scale being the larger of ``1 + |best|`` and the training's own progress
    ``first − best``. A negative ELBO in nats per voxel has an arbitrary zero (it moves with
    the units of the signal through log σ), so ``|best|`` alone is no scale: it can be near
    zero while an epoch's loss legitimately moves by hundreds of nats.
    """
    if not math.isfinite(loss):
        return True
    if not math.isfinite(best):
        return False
    scale = max(1.0 + abs(best), first - best if math.isfinite(first) else 0.0)
    return loss > best + EXPLOSION_FACTOR * scale


class TrainingDiverged(FloatingPointError):
    """The loss kept becoming NaN/Inf although steps were undone and the learning rate lowered."""


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
    (:mod:`mixmap.fitting.learned.distributed`): ``batch_size`` stays the global mini-batch (each
    process takes ``batch_size / world`` voxels of it), the gradients are averaged, every
    process returns the same maps, and only the main process writes checkpoints.
    """

    #: Hyper-parameter names saved with the weights and passed back to ``__init__`` on load.
    hyper_names: tuple[str, ...] = ()
    #: Voxels per epoch (see :data:`EPOCH_VOXELS`).
    epoch_voxels: int = EPOCH_VOXELS

    def __init__(self, model, *, device: str = "cpu", seed: int = 0, quiet: bool = True) -> None:
        super().__init__(model, device=device, seed=seed, quiet=quiet)
        self.net: nn.Module | None = None
        self.trained: dict | None = None  # what the trained network depends on
        self.checkpoint_path: Path | None = None
        self.resume = False
        self._data_key = ""

    def use_checkpoint(self, path: str | Path, resume: bool = False) -> None:
        """Save the training state to ``path`` after every epoch (atomically; deleted when the
        fit completes). With ``resume``, a checkpoint left there by an interrupted run of the
        same data and settings is continued from its last epoch: the result is the same as an
        uninterrupted run."""
        self.checkpoint_path = Path(path)
        self.resume = bool(resume)

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

        # Hashed in place (the same digest as of the concatenated bytes): ``tobytes() + ...``
        # made two transient copies of the signals, 2.2 GB on a whole brain.
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
                history = self._train(data, scheme)
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
        if acquisition.fingerprint() != self.trained["fingerprint"]:
            if not allow_other_acquisition:
                trained_n = Acquisition.from_record(self.trained["acquisition"]).n
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

    # ---------------------------------------------------------------- training loop
    def _train(self, data: Data, scheme: Scheme) -> list[dict]:
        """Mini-batch Adam over all voxels until the loss plateaus; returns one row of named
        loss terms per accepted epoch.

        ``batch_size`` is the global mini-batch: on ``world`` processes every mini-batch of
        the epoch's permutation (the same on every process) is cut into ``world`` parts and
        each process takes its own, so the updates are those of one process with that batch
        (up to the random draws of the loss and the order of floating-point sums)."""
        net = self.net
        net.train()
        lr = float(self.lr)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(self.seed)
        n_all = data.n
        n = min(n_all, max(1, int(self.epoch_voxels)))  # voxels per epoch
        bs = max(1, min(int(self.batch_size), n))
        world = distributed.world_size() if distributed.active() else 1
        me = distributed.rank()
        history: list[dict] = []
        best, since_best, bad = math.inf, 0, 0
        snapshot = None
        first = 0
        state = self._resume_state()
        if state is not None:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            # (a clone: torch.set_rng_state crashes on a view with a storage offset)
            torch.set_rng_state(state["rng"] if world == 1 else state["rng_ranks"][me].clone())
            first = int(state["epoch"]) + 1
            best, since_best = float(state["best"]), int(state["since_best"])
            bad = int(state["bad"])
            history = [dict(zip(state["history_keys"], row, strict=True))
                       for row in state["history"].tolist()]
            for row in history:
                row["epoch"] = int(row["epoch"])
            lr = float(opt.param_groups[0]["lr"])
            log.info("%s: resumed from %s after epoch %d", self.name, self.checkpoint_path,
                     first - 1)
            if since_best >= self.patience and first >= self.min_epochs:
                first = int(self.epochs)  # it had already stopped
        # Batch boundaries; on several processes every batch must give each one a voxel.
        bounds = list(range(0, n, bs)) + [n]
        step = self._loss
        if world > 1:
            if len(bounds) > 2 and bounds[-1] - bounds[-2] < world:
                del bounds[-2]
            step = distributed.wrap(_LossStep(self))
        bar = tqdm(range(first, int(self.epochs)), desc=self.name,
                   disable=self.quiet or not distributed.is_main(), leave=False)
        for epoch in bar:
            snapshot = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()))
            perm = torch.randperm(n_all, generator=gen)
            epoch_data = data
            if n < n_all:  # a large scan: this epoch's random subset
                perm = perm[:n].sort().values
                epoch_data = data.rows(perm.to(data.y.device))
                perm = torch.randperm(n, generator=gen)
            perm = perm.to(data.y.device)
            sums: dict[str, float] = {}
            seen = 0
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
                idx = perm[start:stop]
                if world > 1:
                    idx = idx.tensor_split(world)[me]
                loss, terms = step(epoch_data.rows(idx), scheme, epoch)
                if world > 1:
                    # DDP averages the gradients over processes: weigh each by its voxels. A
                    # non-finite loss in any process must undo the step in all: its weight NaN
                    # makes its gradients NaN, and the average carries them to every process.
                    w = torch.tensor(idx.numel() * world / (stop - start), device=loss.device)
                    loss = loss * torch.where(torch.isfinite(loss), w, torch.nan)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # One wait for the device per step, not one per parameter and logged term
                # (each wait idles a GPU between mini-batches): the loss and every gradient
                # are checked together. (After DDP's all-reduce the gradients are the same in
                # every process, and a process's NaN weight above has made them all NaN.)
                ok = bool(torch.stack([torch.isfinite(loss)] + [
                    torch.isfinite(p.grad).all() for p in net.parameters()
                    if p.grad is not None]).all())
                if not ok:  # undo: no step is taken; lower the learning rate
                    bad += 1
                    lr = self._lower_lr(opt, bad, "a non-finite loss or gradient")
                    continue
                opt.step()
                k = int(idx.numel())
                seen += k
                for name, v in terms.items():  # on the device, in float64: read once an epoch
                    sums[name] = sums.get(name, 0.0) + torch.as_tensor(v).double() * k
            sums = {name: float(v) for name, v in sums.items()}
            if world > 1:  # the epoch's means over every voxel, the same in every process
                names = sorted(sums)
                tot = torch.tensor([seen] + [sums[k] for k in names], dtype=torch.float64)
                tot = distributed.all_reduce_sum(tot.to(data.y.device)).tolist()
                seen, sums = tot[0], dict(zip(names, tot[1:], strict=True))
            row = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()}}
            # The guard compares one fixed objective across epochs (GUARD_TERM when logged):
            # a loss that rises because the KL weight is being raised has not diverged.
            watched = [h.get(GUARD_TERM, h["loss"]) for h in history]
            diverged = (not all(torch.isfinite(p).all() for p in net.parameters())
                        or not math.isfinite(row.get("loss", math.nan))
                        or epoch_exploded(row.get(GUARD_TERM, row["loss"]),
                                          min(watched, default=math.inf),
                                          watched[0] if watched else math.inf))
            if diverged:
                net.load_state_dict(snapshot[0])
                opt.load_state_dict(snapshot[1])
                bad += 1
                lr = self._lower_lr(opt, bad, "an exploding epoch loss")
                continue
            row["lr"] = lr
            history.append(row)
            self._end_epoch(epoch_data, scheme, epoch)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            # The plateau rule, like the guard, follows the fixed objective: a best loss set
            # during a KL warm-up (small KL weight) could never be beaten after it.
            watched_now = row.get(GUARD_TERM, row["loss"])
            if watched_now < best - self.tol * (abs(best) if math.isfinite(best) else 1.0):
                best, since_best = watched_now, 0
            else:
                since_best += 1
            self._save_checkpoint(epoch, opt, gen, best, since_best, bad, history)
            if epoch + 1 >= self.min_epochs and since_best >= self.patience:
                break
        bar.close()
        del step  # a DDP wrapper lets go of the parameters' gradient hooks
        return history

    def _local(self, data: Data) -> Data:
        """This process's share of the voxels (all of them in a single process), for the work
        whose per-voxel results are then reduced or gathered (e.g. an EM update)."""
        return data.rows(distributed.shard(data.n)) if distributed.active() else data

    # ---------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, epoch, opt, gen, best, since_best, bad, history) -> None:
        if self.checkpoint_path is None:
            return
        rng = torch.get_rng_state()
        ranks = distributed.all_gather_object(rng) if distributed.active() else None
        if not distributed.is_main():
            return
        keys = sorted({k for row in history for k in row})
        table = torch.tensor([[float(row.get(k, math.nan)) for k in keys] for row in history],
                             dtype=torch.float64)
        state = {"format": "mixmap-training-checkpoint-1", "key": self._data_key,
                 "epoch": epoch, "best": best, "since_best": since_best, "bad": bad,
                 "net": self.net.state_dict(), "opt": opt.state_dict(),
                 "gen": gen.get_state(), "rng": rng,
                 "history": table, "history_keys": keys}
        if ranks is not None:  # every process's own random stream, to resume each exactly
            state["world_size"] = len(ranks)
            state["rng_ranks"] = torch.stack(ranks)
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _resume_state(self) -> dict | None:
        """The checkpoint to continue from, or None: read by the main process and sent to the
        others (which need not see its file system); a refusal is raised in every process."""
        if not distributed.active():
            return self._load_checkpoint()
        if self.checkpoint_path is None or not self.resume:
            return None
        state, refusal = None, None
        if distributed.is_main():
            try:
                state = self._load_checkpoint()
            except ValueError as exc:
                refusal = str(exc)
        state, refusal = distributed.broadcast_object((state, refusal))
        if refusal is not None:
            raise ValueError(refusal)
        return state

    def _load_checkpoint(self) -> dict | None:
        path = self.checkpoint_path
        if path is None or not self.resume or not path.exists():
            return None
        try:
            # weights_only: tensors and plain containers only, never code from the file.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"{path}: not a readable mixmap checkpoint ({type(exc).__name__}); delete it "
                f"and run without --resume"
            ) from None
        if not isinstance(state, dict) or state.get("format") != "mixmap-training-checkpoint-1":
            raise ValueError(f"{path}: not a mixmap training checkpoint; delete it or run "
                             f"without --resume")
        if state.get("key") != self._data_key:
            raise ValueError(
                f"{path}: this checkpoint was written for other data or settings; run without "
                f"--resume (or with the same inputs and options) to continue"
            )
        written_by = int(state.get("world_size", 1))
        world = distributed.world_size() if distributed.active() else 1
        if written_by != world:
            raise ValueError(
                f"{path}: this checkpoint was written by a training on {written_by} "
                f"process(es), this run has {world}; resume it with the same number of "
                f"processes (torchrun --nproc_per_node {written_by}), or run without --resume"
            )
        return state

    def finish_checkpoint(self) -> None:
        """Delete the checkpoint once the maps are safely written (by the main process)."""
        if not distributed.is_main():
            return
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()

    def _lower_lr(self, opt, bad: int, what: str) -> float:
        lr = opt.param_groups[0]["lr"] / 2
        if bad > MAX_BAD_STEPS:
            raise TrainingDiverged(
                f"{self.name}: training diverged ({what}, {bad} times) although each bad step "
                f"was undone and the learning rate lowered to {lr:.2g}; try a smaller --lr, a "
                f"smaller --batch-size, or check the input signals for outliers"
            )
        for g in opt.param_groups:
            g["lr"] = lr
        if distributed.is_main():
            log.warning("%s: %s; step undone, learning rate lowered to %.3g", self.name, what,
                        lr)
        return lr

    # ---------------------------------------------------------------- save
    def save(self, path: str | Path) -> Path:
        """Write the trained fitter to folder ``path``: ``weights.safetensors`` and
        ``config.json`` (no pickle). Load it with :func:`mixmap.io.model_store.load_fitter`."""
        from mixmap.io.model_store import save_fitter

        return save_fitter(self, path)


class _LossStep(nn.Module):
    """A fitter's mini-batch loss as a module's forward: DistributedDataParallel averages the
    gradients of what runs through its wrapped module's forward, and the fitters call their
    networks' parts directly."""

    def __init__(self, fitter: LearnedFitter) -> None:
        super().__init__()
        self.net = fitter.net
        self.fitter = fitter  # a plain attribute, not a registered module

    def forward(self, batch: Data, scheme: Scheme, epoch: int):
        return self.fitter._loss(batch, scheme, epoch)


#: Per-voxel loss (nats) above which training compresses it logarithmically (see robust_mean).
ROBUST_NATS = 1e4


def robust_mean(per_voxel: torch.Tensor, c: float = ROBUST_NATS) -> torch.Tensor:
    """Mean of c·asinh(loss/c): the loss itself wherever |loss| << c (every voxel that the
    model fits sanely: a few hundred nats), logarithmic beyond. Some simulated voxels have
    signals thousands of times S0 (MSDKI's exponent at high b), whose ELBO reaches -1e11 early in
    training and would otherwise steer the whole shared network; per-voxel refinement later
    optimises the exact ELBO of every voxel."""
    return (c * torch.asinh(per_voxel / c)).mean()
