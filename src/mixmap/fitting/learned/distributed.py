"""Training on several processes, GPUs or nodes with PyTorch's distributed engine (``torchrun``).

Launch the same command once per process with ``torchrun``; nothing else changes::

    torchrun --standalone --nproc_per_node 4 -m mixmap fit dwi.nii.gz ... --method vae-gmm \\
        --device cuda

torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address; the learned
fitters see them, join the process group (NCCL on CUDA, each process on GPU ``LOCAL_RANK``;
gloo on CPU) and split the work by voxel:

- every process holds all voxels (each loads the scan) and computes the data-dependent start
  identically, as one process would (signal scale, noise level, the least-squares estimate the
  encoder sees, feature standardisation, k-means start of the mixture prior: seconds, even for
  a whole brain); DistributedDataParallel then copies rank 0's start to all, to be sure;
- every epoch each process draws the same seeded permutation and takes its own part of every
  mini-batch (``batch_size`` is the *global* batch: each process gets ``batch_size / world``
  voxels, so the same options give the same optimisation on any number of processes); the
  network is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the
  gradients, so all processes keep identical weights;
- whatever decides what happens next is reduced over all processes first, so every process
  takes the same decision: a non-finite loss in one process makes the averaged gradients NaN
  in all (the step is undone everywhere), the epoch loss of the stopping rule and the explosion
  guard is summed over processes, and the closed-form EM update of the mixture prior adds each
  process's sums over its share of the voxels;
- after training (and in ``apply``) each process maps its share of the voxels and the maps are
  gathered: every process returns the same complete :class:`~mixmap.fitting.base.FitResult`,
  and only the main process (:func:`is_main`) should write files. The main process writes the
  training checkpoints, with every process's random state, so a run resumes exactly with the
  same number of processes.

In a single process every function here is a no-op (no process group, no copy, no
communication), so one-process results are unchanged.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

#: Offset between the random streams of the processes (see :func:`rank_seed`).
SEED_STRIDE = 1_000_003

_initialised_here = False


def launched() -> bool:
    """Whether this process is one of several (a torchrun launch with ``WORLD_SIZE`` > 1, or a
    process group someone else initialised)."""
    if not dist.is_available():
        return False
    return dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one process is up (collectives are needed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    """This process's number, 0 … world_size−1 (0 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's number on its node (its GPU index)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the process that writes outputs (rank 0; always true in a single process)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun (once; later calls only return the
    device) and return the device this process computes on: ``cuda:LOCAL_RANK`` for a CUDA
    device given without an index. A single process gets ``device`` back unchanged."""
    global _initialised_here
    if not launched():
        return device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"--device {device.type}: distributed training (torchrun) runs on CPU (gloo) or "
            f"CUDA (NCCL); use --device cpu or cuda"
        )
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank())
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"torchrun process {rank()} wants GPU {device.index} (LOCAL_RANK) but this node "
                f"has {torch.cuda.device_count()}; use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _initialised_here = True
        atexit.register(teardown)
    return device


def teardown() -> None:
    """Leave the process group if :func:`setup` joined it (also run at exit)."""
    global _initialised_here
    if _initialised_here and dist.is_initialized():
        dist.destroy_process_group()
    _initialised_here = False


def shard(n: int) -> slice:
    """This process's contiguous share of ``n`` rows (all of them in a single process); the
    shares of ranks 0, 1, … follow each other, so gathering in rank order restores the order."""
    w, r = world_size(), rank()
    if not active():
        return slice(0, n)
    return slice(n * r // w, n * (r + 1) // w)


def rank_seed(seed: int) -> int:
    """A seed of its own for each process (``seed`` itself on rank 0), for the random draws that
    must differ between processes (the noise of the ELBO's samples on different voxels)."""
    return int(seed) + SEED_STRIDE * rank()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place; returns ``t`` (untouched in a single process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of the elements of ``t`` over all processes (``t.mean()`` in a single process)."""
    if not active():
        return t.mean()
    acc = torch.stack([t.sum().double(), torch.tensor(t.numel(), dtype=torch.float64,
                                                      device=t.device)])
    dist.all_reduce(acc, op=dist.ReduceOp.SUM)
    return (acc[0] / acc[1]).to(t.dtype)


def all_gather_object(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` of process ``src`` in every process (picklable)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same(value: str, what: str) -> None:
    """Refuse to go on when the processes disagree on ``value`` (e.g. a hash of the data):
    they would train different things and deadlock or silently mix them."""
    if not active():
        return
    values = all_gather_object(value)
    if any(v != values[0] for v in values):
        bad = [i for i, v in enumerate(values) if v != values[0]]
        raise ValueError(
            f"the {len(values)} torchrun processes were given different {what} (processes "
            f"{', '.join(map(str, bad))} differ from process 0); every process must run the "
            f"same command on the same input"
        )


def barrier() -> None:
    """Wait for every process."""
    if active():
        dist.barrier()


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in DistributedDataParallel: its parameters and buffers are broadcast from
    rank 0 now, and the gradients of what goes through its forward are averaged over the
    processes during backward. Buffers are not re-broadcast at every forward: the fitters keep
    them identical (they are set from data every process holds, or from reduced statistics)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.13 renamed the option (and warns about the old name); both sync at init.
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    option = "forward_sync_buffers" if new_name else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=None, **{option: False})


__all__ = [
    "active", "all_gather_object", "all_reduce_sum", "barrier", "broadcast_object",
    "check_same", "global_mean", "is_main", "launched", "local_rank", "rank",
    "rank_seed", "setup", "shard", "teardown", "world_size", "wrap",
]
