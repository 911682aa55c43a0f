"""Training on 2 processes with PyTorch's distributed engine (torchrun, gloo backend on CPU)
gives the maps of one process; every process keeps the same weights and takes the same
decisions; a 2-process checkpoint resumes exactly.

pytest launches this same file under ``torch.distributed.run`` as the worker (see
:func:`worker`), once for the module, and compares with one-process fits made here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mixmap.fitting import get_fitter
from mixmap.fitting.learned import distributed
from mixmap.simulation import simulate
from mixmap.testing import interrupt_training

#: Not a multiple of the batch size nor of 2: the last, smaller batch is shared unevenly.
N_VOXELS = 1001
SSL = dict(epochs=4, min_epochs=4, batch_size=128, lr=3e-3)
# warmup_epochs=2: the closed-form EM updates of the prior run from epoch 4 on
GMM = dict(n_components=3, epochs=8, min_epochs=8, warmup_epochs=2, batch_size=128, hidden=32,
           n_samples=8, refine_steps=20)
INTERRUPT_AT = 5  # after two EM updates, before the last two


def _sim():
    return simulate("paper-msdki", "clinical", snr=20, n_voxels=N_VOXELS, seed=3)


def _digest(fitter) -> str:
    h = hashlib.sha256()
    for name, t in sorted(fitter.net.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _maps(result) -> dict[str, np.ndarray]:
    out = dict(result.params)
    out.update({f"{k}_std": v for k, v in result.std.items()})
    if result.cluster_probs is not None:
        out["cluster_probs"] = result.cluster_probs
    return out


def worker(out: Path) -> None:
    """One torchrun process: fit ssl and vae-gmm, then interrupt and resume a vae-gmm fit."""
    torch.set_num_threads(1)
    sim = _sim()
    report: dict = {}
    ssl = get_fitter("ssl", "msdki", seed=0, **SSL)
    r_ssl = ssl.fit(sim.signals, sim.acquisition)
    gmm = get_fitter("vae-gmm", "msdki", seed=0, **GMM)
    r_gmm = gmm.fit(sim.signals, sim.acquisition)
    me = distributed.rank()
    report.update(rank=me, world=distributed.world_size(),
                  ssl_digest=_digest(ssl), gmm_digest=_digest(gmm),
                  gmm_history=r_gmm.history, ssl_history=r_ssl.history,
                  gmm_settings=r_gmm.settings, gmm_maps_digest=hashlib.sha256(
                      r_gmm.params["D"].tobytes()).hexdigest())

    # A NaN loss in process 1 only (its 2nd mini-batch): both undo that step and halve lr.
    nan = get_fitter("ssl", "msdki", seed=0, **{**SSL, "epochs": 2, "min_epochs": 2})
    original_loss, calls = nan._loss, {"n": 0}

    def nan_in_one_process(batch, scheme, epoch):
        calls["n"] += 1
        loss, terms = original_loss(batch, scheme, epoch)
        return (loss * float("nan") if me == 1 and calls["n"] == 2 else loss), terms

    nan._loss = nan_in_one_process
    r_nan = nan.fit(sim.signals, sim.acquisition)
    report.update(nan_digest=_digest(nan), nan_lrs=[h["lr"] for h in r_nan.history])

    ckpt = out / "ckpt.pt"
    f = get_fitter("vae-gmm", "msdki", seed=0, **GMM)
    f.use_checkpoint(ckpt)
    interrupt_training(f, sim.signals, sim.acquisition, after_epoch=INTERRUPT_AT)
    if distributed.is_main():
        shutil.copy(ckpt, out / "ckpt-interrupted.pt")
    g = get_fitter("vae-gmm", "msdki", seed=0, **GMM)
    g.use_checkpoint(ckpt, resume=True)
    r_res = g.fit(sim.signals, sim.acquisition)
    report.update(resumed_digest=_digest(g), resumed_epochs=[h["epoch"] for h in r_res.history])
    if distributed.is_main():
        np.savez(out / "ssl.npz", **_maps(r_ssl))
        np.savez(out / "gmm.npz", **_maps(r_gmm))
        np.savez(out / "resumed.npz", **_maps(r_res))
    (out / f"rank{me}.json").write_text(json.dumps(report, default=str))
    distributed.barrier()  # leave together, with every file written
    distributed.teardown()


def _launch(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's Python stack
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", __file__, str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _killed_by_signal(proc: subprocess.CompletedProcess) -> bool:
    """The first worker to fail died by a signal (torchrun reports a negative exit code), not
    by an exception of ours (exit code 1): torch's gloo backend has aborted a worker this way
    once in CI ("terminate called without an active exception"), never reproduced locally in
    about 30 launches."""
    root = proc.stderr.rpartition("Root Cause")[2]
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    return proc.returncode != 0 and code is not None and int(code.group(1)) < 0


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Run the worker on 2 CPU processes; returns (folder, [report of rank 0, rank 1])."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _launch(out)
    if _killed_by_signal(proc):  # one more try; a second crash fails with both outputs
        first = proc.stderr[-4000:]
        warnings.warn(f"a torchrun worker was killed by a signal; launched again:\n{first}",
                      stacklevel=1)
        shutil.rmtree(out)
        out.mkdir()
        proc = _launch(out)
        proc.stderr = first + "\n--- second launch ---\n" + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def one():
    """The same fits in this one process (on one thread, like each worker)."""
    sim = _sim()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r_ssl = get_fitter("ssl", "msdki", seed=0, **SSL).fit(sim.signals, sim.acquisition)
        r_gmm = get_fitter("vae-gmm", "msdki", seed=0, **GMM).fit(sim.signals, sim.acquisition)
        r_gmm2 = get_fitter("vae-gmm", "msdki", seed=1, **GMM).fit(sim.signals, sim.acquisition)
    finally:
        torch.set_num_threads(threads)
    return sim, r_ssl, r_gmm, r_gmm2


def test_processes_keep_the_same_weights_and_take_the_same_decisions(two):
    _, (a, b) = two
    assert (a["rank"], b["rank"], a["world"], b["world"]) == (0, 1, 2, 2)
    for key in ("ssl_digest", "gmm_digest", "resumed_digest", "gmm_maps_digest", "nan_digest"):
        assert a[key] == b[key], key
    # the NaN of one process undid the step in both: the learning rate was halved in both
    assert a["nan_lrs"] == b["nan_lrs"] == [SSL["lr"] / 2] * 2
    assert a["gmm_history"] == b["gmm_history"] and a["ssl_history"] == b["ssl_history"]
    assert len(a["gmm_history"]) == GMM["epochs"]
    assert a["gmm_settings"]["world_size"] == 2


def test_ssl_on_two_processes_matches_one(two, one):
    """ssl's loss has no random draws: the same global batches, split over 2 processes with
    the gradients averaged, give the same training up to the order of floating-point sums."""
    out, (a, _) = two
    _, r_ssl, _, _ = one
    dist_maps = np.load(out / "ssl.npz")
    for name in ("S0", "D", "K"):
        ref = r_ssl.params[name]
        spread = np.percentile(ref, 95) - np.percentile(ref, 5)
        err = np.abs(dist_maps[name] - ref).max()
        assert err < 1e-4 * spread, (name, err, spread)
    losses_1 = [h["loss"] for h in r_ssl.history]
    losses_2 = [h["loss"] for h in a["ssl_history"]]
    np.testing.assert_allclose(losses_2, losses_1, rtol=1e-5)


def test_vae_gmm_on_two_processes_matches_one_within_seed_variation(two, one):
    """vae-gmm draws random samples in its loss, so the two runs differ like two seeds do:
    the 2-process maps must be as close to the 1-process maps as another seed's are, and
    as accurate."""
    out, _ = two
    sim, _, r_gmm, r_seed = one
    d2 = np.load(out / "gmm.npz")
    for name in ("D", "K"):
        ref, other = r_gmm.params[name], r_seed.params[name]
        seed_gap = np.median(np.abs(other - ref))
        dist_gap = np.median(np.abs(d2[name] - ref))
        spread = np.percentile(ref, 75) - np.percentile(ref, 25)
        assert dist_gap < max(2 * seed_gap, 0.02 * spread), (name, dist_gap, seed_gap)
        # as accurate: the typical error within 10 %; the RMSE of these 1,001 briefly trained
        # voxels rests on a handful of CSF-like voxels whose K the 32 measurements leave free
        # (errors of 1-1.7), so it moves with the random stream more and is held to 25 %
        truth = sim.truth[name]
        mae_1 = np.median(np.abs(ref - truth))
        mae_2 = np.median(np.abs(d2[name] - truth))
        assert abs(mae_2 - mae_1) < 0.1 * mae_1, (name, mae_1, mae_2)
        rmse_1 = np.sqrt(np.mean((ref - truth) ** 2))
        rmse_2 = np.sqrt(np.mean((d2[name] - truth) ** 2))
        assert abs(rmse_2 - rmse_1) < 0.25 * rmse_1, (name, rmse_1, rmse_2)
    # cluster labels: as alike as another seed's, up to the components' order (a seed may
    # order them otherwise); posterior cluster probabilities split the voxels of two
    # overlapping components by their data, so on this small, briefly trained fit the
    # agreement is well below 1 for two seeds too
    same = _label_agreement(d2["cluster_probs"], r_gmm.cluster_probs)
    assert same >= _label_agreement(r_seed.cluster_probs, r_gmm.cluster_probs), same
    assert same > 0.6


def _label_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of voxels with the same most likely component, under the best relabelling."""
    la, lb = a.argmax(1), b.argmax(1)
    return max(float((np.asarray(p)[la] == lb).mean())
               for p in itertools.permutations(range(a.shape[1])))


def test_two_process_training_resumes_to_the_same_maps(two):
    out, (a, _) = two
    assert a["resumed_digest"] == a["gmm_digest"]
    assert a["resumed_epochs"] == list(range(GMM["epochs"]))
    full, resumed = np.load(out / "gmm.npz"), np.load(out / "resumed.npz")
    for name in full.files:
        np.testing.assert_array_equal(resumed[name], full[name])


def test_two_process_checkpoint_is_refused_by_one_process(two):
    out, _ = two
    sim = _sim()
    f = get_fitter("vae-gmm", "msdki", seed=0, **GMM)
    f.use_checkpoint(out / "ckpt-interrupted.pt", resume=True)
    with pytest.raises(ValueError, match="written by a training on 2 process"):
        f.fit(sim.signals, sim.acquisition)


def test_one_process_helpers_do_nothing():
    assert not distributed.active() and distributed.world_size() == 1
    assert distributed.rank() == 0 and distributed.is_main()
    t = torch.arange(4.0)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert distributed.shard(10) == slice(0, 10)
    assert distributed.rank_seed(7) == 7
    assert distributed.all_gather_object("x") == ["x"]
    assert float(distributed.global_mean(torch.tensor([1.0, 2.0]))) == 1.5
    distributed.barrier()
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert not distributed.active()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
