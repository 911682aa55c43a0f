"""The training loop of the learned fitters (:class:`Trainer`): mini-batch Adam over the voxels
with a NaN/explosion guard (:func:`epoch_exploded`) and a plateau stopping rule, and the
training checkpoint that lets an interrupted run resume exactly (:class:`TrainingCheckpoint`).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import mixmap.fitting.learned.distributed as distributed

log = logging.getLogger(__name__)

#: Voxels in one training epoch; a larger scan trains on a fresh random subset of this size
#: each epoch, so training time stops growing with the number of voxels.
EPOCH_VOXELS = 50_000

#: Bad steps (non-finite loss or gradient, or a diverged epoch) tolerated before giving up.
MAX_BAD_STEPS = 12

#: An epoch whose loss is this many scales above the best epoch's has exploded (see
#: :func:`epoch_exploded`).
EXPLOSION_FACTOR = 10.0

#: Epoch term the explosion guard and the plateau rule watch when a fitter logs it: the loss
#: under the weights that training ends with (a VAE's KL weight after its warm-up).
GUARD_TERM = "loss_final"

#: Format tag of a training checkpoint file.
CHECKPOINT_FORMAT = "mixmap-training-checkpoint-1"


def epoch_exploded(loss: float, best: float, first: float) -> bool:
    """Whether an epoch's loss is a divergence rather than training noise.

    ``loss``, ``best`` and ``first`` are the epoch means of one fixed objective (see
    :data:`GUARD_TERM`) for this epoch, the best accepted epoch and the first accepted epoch.
    The loss has exploded when it lies more than :data:`EXPLOSION_FACTOR` scales above the
    best, the scale being the larger of ``1 + |best|`` and the training's own progress
    ``first − best`` (a negative ELBO in nats has an arbitrary zero, so ``|best|`` alone is no
    scale).
    """
    if not math.isfinite(loss):
        return True
    if not math.isfinite(best):
        return False
    scale = max(1.0 + abs(best), first - best if math.isfinite(first) else 0.0)
    return loss > best + EXPLOSION_FACTOR * scale


class TrainingDiverged(FloatingPointError):
    """The loss kept becoming NaN/Inf although steps were undone and the learning rate lowered."""


class TrainingCheckpoint:
    """The training state after an accepted epoch, in one file at ``path`` (written
    atomically by the main process, with every process's random state).

    ``key`` identifies the data and settings; with ``resume``, :meth:`resume_state` returns a
    state left by an interrupted run of the same key and number of processes (a ValueError
    otherwise), None when there is no file or ``resume`` is off."""

    def __init__(self, path: str | Path, resume: bool, key: str) -> None:
        self.path = Path(path)
        self.resume = bool(resume)
        self.key = key

    def save(self, net: nn.Module, opt, gen: torch.Generator, epoch: int, best: float,
             since_best: int, bad: int, history: list[dict]) -> None:
        """Write the state after ``epoch`` (a collective: every process must call it)."""
        rng = torch.get_rng_state()
        ranks = distributed.all_gather_object(rng) if distributed.active() else None
        if not distributed.is_main():
            return
        keys = sorted({k for row in history for k in row})
        table = torch.tensor([[float(row.get(k, math.nan)) for k in keys] for row in history],
                             dtype=torch.float64)
        state = {"format": CHECKPOINT_FORMAT, "key": self.key,
                 "epoch": epoch, "best": best, "since_best": since_best, "bad": bad,
                 "net": net.state_dict(), "opt": opt.state_dict(),
                 "gen": gen.get_state(), "rng": rng,
                 "history": table, "history_keys": keys}
        if ranks is not None:  # every process's own random stream, to resume each exactly
            state["world_size"] = len(ranks)
            state["rng_ranks"] = torch.stack(ranks)
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def resume_state(self) -> dict | None:
        """The state to continue from, or None: read by the main process and sent to the
        others (which need not see its file system); a refusal is raised in every process."""
        if not distributed.active():
            return self.load()
        if not self.resume:
            return None
        state, refusal = None, None
        if distributed.is_main():
            try:
                state = self.load()
            except ValueError as exc:
                refusal = str(exc)
        state, refusal = distributed.broadcast_object((state, refusal))
        if refusal is not None:
            raise ValueError(refusal)
        return state

    def load(self) -> dict | None:
        """The checkpoint's state as written, checked against the key and the number of
        processes; None when ``resume`` is off or there is no file."""
        path = self.path
        if not self.resume or not path.exists():
            return None
        try:
            # weights_only: tensors and plain containers only, never code from the file.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"{path}: not a readable mixmap checkpoint ({type(exc).__name__}); delete it "
                f"and run without --resume"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a mixmap training checkpoint; delete it or run "
                             f"without --resume")
        if state.get("key") != self.key:
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


class LossStep(nn.Module):
    """A fitter's mini-batch loss as a module's forward: DistributedDataParallel averages the
    gradients of what runs through its wrapped module's forward, and the fitters call their
    networks' parts directly."""

    def __init__(self, fitter) -> None:
        super().__init__()
        self.net = fitter.net
        self.fitter = fitter  # a plain attribute, not a registered module

    def forward(self, batch, scheme, epoch: int):
        return self.fitter._loss(batch, scheme, epoch)


class Trainer:
    """Mini-batch Adam on ``fitter.net`` over the voxels of ``data`` until the loss plateaus.

    The fitter provides its settings (``lr``, ``batch_size``, ``epochs``, ``patience``,
    ``tol``, ``min_epochs``, ``epoch_voxels``, ``seed``, ``quiet``, ``name``), the mini-batch
    loss ``_loss(batch, scheme, epoch) -> (loss, terms)`` and ``_end_epoch(data, scheme,
    epoch)``; ``on_epoch`` callables get each accepted epoch's history row after
    ``_end_epoch`` (before its checkpoint is written).

    ``batch_size`` is the global mini-batch: on ``world`` processes every mini-batch of the
    epoch's permutation (the same on every process) is cut into ``world`` parts and each
    process takes its own."""

    def __init__(self, fitter, data, scheme, checkpoint: TrainingCheckpoint | None = None,
                 on_epoch: list[Callable[[dict], None]] | None = None) -> None:
        self.fitter, self.data, self.scheme = fitter, data, scheme
        self.checkpoint = checkpoint
        self.on_epoch = list(on_epoch or [])
        self.net = fitter.net
        self.lr = float(fitter.lr)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.gen = torch.Generator().manual_seed(fitter.seed)
        self.n = min(data.n, max(1, int(fitter.epoch_voxels)))  # voxels per epoch
        self.batch = max(1, min(int(fitter.batch_size), self.n))
        self.world = distributed.world_size() if distributed.active() else 1
        self.me = distributed.rank()
        self.history: list[dict] = []
        self.best, self.since_best, self.bad = math.inf, 0, 0
        self.first = 0

    def run(self) -> list[dict]:
        """Train; returns one row of named loss terms per accepted epoch (``epoch``, the
        fitter's terms, ``lr``)."""
        fitter = self.fitter
        self.net.train()
        self._resume()
        bounds, step = self._batches()
        bar = tqdm(range(self.first, int(fitter.epochs)), desc=fitter.name,
                   disable=fitter.quiet or not distributed.is_main(), leave=False)
        for epoch in bar:
            accepted = self._epoch(epoch, bounds, step)
            if accepted is None:
                continue
            row, epoch_data = accepted
            self.history.append(row)
            fitter._end_epoch(epoch_data, self.scheme, epoch)
            for callback in self.on_epoch:
                callback(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            # The plateau rule, like the guard, follows the fixed objective: a best loss set
            # during a KL warm-up (small KL weight) could never be beaten after it.
            watched_now = row.get(GUARD_TERM, row["loss"])
            best = self.best
            if watched_now < best - fitter.tol * (abs(best) if math.isfinite(best) else 1.0):
                self.best, self.since_best = watched_now, 0
            else:
                self.since_best += 1
            if self.checkpoint is not None:
                self.checkpoint.save(self.net, self.opt, self.gen, epoch, self.best,
                                     self.since_best, self.bad, self.history)
            if epoch + 1 >= fitter.min_epochs and self.since_best >= fitter.patience:
                break
        bar.close()
        del step  # a DDP wrapper lets go of the parameters' gradient hooks
        return self.history

    def _resume(self) -> None:
        """Continue from the checkpoint's state, when there is one to resume."""
        state = None if self.checkpoint is None else self.checkpoint.resume_state()
        if state is None:
            return
        fitter = self.fitter
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        # (a clone: torch.set_rng_state crashes on a view with a storage offset)
        torch.set_rng_state(state["rng"] if self.world == 1
                            else state["rng_ranks"][self.me].clone())
        self.first = int(state["epoch"]) + 1
        self.best, self.since_best = float(state["best"]), int(state["since_best"])
        self.bad = int(state["bad"])
        self.history = [dict(zip(state["history_keys"], row, strict=True))
                        for row in state["history"].tolist()]
        for row in self.history:
            row["epoch"] = int(row["epoch"])
        self.lr = float(self.opt.param_groups[0]["lr"])
        log.info("%s: resumed from %s after epoch %d", fitter.name, self.checkpoint.path,
                 self.first - 1)
        if self.since_best >= fitter.patience and self.first >= fitter.min_epochs:
            self.first = int(fitter.epochs)  # it had already stopped

    def _batches(self):
        """Batch boundaries of an epoch and the loss step (wrapped for DDP on several
        processes, where every batch must give each process a voxel)."""
        bounds = list(range(0, self.n, self.batch)) + [self.n]
        step = self.fitter._loss
        if self.world > 1:
            if len(bounds) > 2 and bounds[-1] - bounds[-2] < self.world:
                del bounds[-2]
            step = distributed.wrap(LossStep(self.fitter))
        return bounds, step

    def _epoch(self, epoch: int, bounds: list[int], step):
        """One pass over the epoch's voxels; returns (history row, the epoch's data), or None
        when the epoch diverged and was undone."""
        net, opt, data = self.net, self.opt, self.data
        snapshot = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()))
        perm = torch.randperm(data.n, generator=self.gen)
        epoch_data = data
        if self.n < data.n:  # a large scan: this epoch's random subset
            perm = perm[:self.n].sort().values
            epoch_data = data.rows(perm.to(data.y.device))
            perm = torch.randperm(self.n, generator=self.gen)
        perm = perm.to(data.y.device)
        sums, seen = self._steps(epoch_data, perm, bounds, step, epoch)
        row = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()}}
        if self._diverged(row):
            net.load_state_dict(snapshot[0])
            opt.load_state_dict(snapshot[1])
            self.bad += 1
            self._lower_lr("an exploding epoch loss")
            return None
        row["lr"] = self.lr
        return row, epoch_data

    def _steps(self, epoch_data, perm: torch.Tensor, bounds: list[int], step, epoch: int):
        """The epoch's optimiser steps; returns the loss terms summed over voxels (reduced over
        processes) and the number of voxels seen."""
        net, opt, world = self.net, self.opt, self.world
        sums: dict[str, float] = {}
        seen = 0
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            idx = perm[start:stop]
            if world > 1:
                idx = idx.tensor_split(world)[self.me]
            loss, terms = step(epoch_data.rows(idx), self.scheme, epoch)
            if world > 1:
                # DDP averages the gradients over processes: weigh each by its voxels. A
                # non-finite loss in any process must undo the step in all: its weight NaN
                # makes its gradients NaN, and the average carries them to every process.
                w = torch.tensor(idx.numel() * world / (stop - start), device=loss.device)
                loss = loss * torch.where(torch.isfinite(loss), w, torch.nan)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # One wait for the device per step: the loss and every gradient are checked
            # together (after DDP's all-reduce the gradients are the same in every process).
            ok = bool(torch.stack([torch.isfinite(loss)] + [
                torch.isfinite(p.grad).all() for p in net.parameters()
                if p.grad is not None]).all())
            if not ok:  # undo: no step is taken; lower the learning rate
                self.bad += 1
                self._lower_lr("a non-finite loss or gradient")
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
            tot = distributed.all_reduce_sum(tot.to(self.data.y.device)).tolist()
            seen, sums = tot[0], dict(zip(names, tot[1:], strict=True))
        return sums, seen

    def _diverged(self, row: dict) -> bool:
        """Non-finite weights or loss, or an exploded epoch (:func:`epoch_exploded`) of the
        fixed objective (:data:`GUARD_TERM` when logged)."""
        watched = [h.get(GUARD_TERM, h["loss"]) for h in self.history]
        return (not all(torch.isfinite(p).all() for p in self.net.parameters())
                or not math.isfinite(row.get("loss", math.nan))
                or epoch_exploded(row.get(GUARD_TERM, row["loss"]),
                                  min(watched, default=math.inf),
                                  watched[0] if watched else math.inf))

    def _lower_lr(self, what: str) -> None:
        """Halve the learning rate after a bad step; TrainingDiverged past MAX_BAD_STEPS."""
        lr = self.opt.param_groups[0]["lr"] / 2
        name = self.fitter.name
        if self.bad > MAX_BAD_STEPS:
            raise TrainingDiverged(
                f"{name}: training diverged ({what}, {self.bad} times) although each bad step "
                f"was undone and the learning rate lowered to {lr:.2g}; try a smaller --lr, a "
                f"smaller --batch-size, or check the input signals for outliers"
            )
        for g in self.opt.param_groups:
            g["lr"] = lr
        if distributed.is_main():
            log.warning("%s: %s; step undone, learning rate lowered to %.3g", name, what, lr)
        self.lr = lr
