"""Speed and scale benchmark: time and peak memory against the number of voxels, side by side
with dipy (MSDKI) and dmipy (ball-stick brute2fine), and a whole-brain vae-gmm fit end to end.

Every measurement runs in a fresh subprocess of this script (``--worker``), so that its peak
memory is its own: the worker makes its data (the paper-msdki mixture on the HCP scheme,
288 measurements, SNR 20; made in chunks), then resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), runs the one timed step, and reports the wall time and the peak
resident memory above what it held before the step (its data included in "before").

* ``lsq`` (MSDKI and ball-stick), ``dipy`` (MSDKI), ``vae-gmm`` (``fit``: training + posterior
  maps of every voxel) and ``apply`` (a model trained on 10,000 voxels maps n voxels) at 1,000 …
  1,000,000 voxels; the log-log slope of time against voxels (1 = linear cost).
* dmipy's ball-stick brute2fine (its own venv, ``benchmarks/setup_dmipy.sh``) on the same
  ball-stick voxels as our ball-stick lsq, at the sizes given by ``--dmipy-sizes``.
* ``--whole-brain``: ``mixmap simulate --layout brain`` (HCP grid 145×174×145, about 0.9 M
  masked voxels × 288 volumes, written once into ``--brain-dir``), then ``mixmap fit … --method
  vae-gmm`` and ``--method lsq`` end to end (load, train, posterior maps, write) as the command
  line runs them, with their peak memory.

Writes ``docs/speed.json``, ``docs/figures/speed_scaling.png`` and the ``speed`` section of
``docs/RESULTS.md``. Run from the repository root on an otherwise idle machine::

    python benchmarks/speed.py                          # scaling curve (about 30-40 min, 2 cores)
    python benchmarks/speed.py --whole-brain            # + the whole-brain fits
    python benchmarks/speed.py --sizes 1000 10000 --methods lsq dipy --no-write   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
COMMAND = "python benchmarks/speed.py"
METHODS = ("lsq", "dipy", "ball-stick-lsq", "dmipy", "vae-gmm", "apply")
SNR = 20.0
CHUNK = 100_000
#: Voxels the model used by ``apply`` is trained on.
APPLY_TRAIN_VOXELS = 10_000


# ============================================================================ memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> int:
    """Reset the peak-RSS counter (Linux: writing 5 to clear_refs); the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


# ============================================================================ worker
def make_data(preset: str, n: int, seed: int):
    """(signals (n, 288) float32, truth, acquisition), made in chunks of 100,000 voxels."""
    from mixmap.simulation import simulate

    parts, truth = [], {}
    acq = None
    for i, start in enumerate(range(0, n, CHUNK)):
        sim = simulate(preset, "hcp", snr=SNR, n_voxels=min(CHUNK, n - start), seed=seed + i)
        acq = sim.acquisition
        parts.append(sim.signals)
        for k, v in sim.truth.items():
            truth.setdefault(k, []).append(v)
    signals = np.concatenate(parts)
    del parts
    return signals, {k: np.concatenate(v) for k, v in truth.items()}, acq


def rmse(est: dict, truth: dict, names) -> dict:
    return {k: float(np.sqrt(np.mean((np.asarray(est[k], np.float64) - truth[k]) ** 2)))
            for k in names if k in est}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec.get("threads", 2)))
    if spec["kind"] == "cli":
        return cli_worker(spec)
    kind, n, seed = spec["kind"], int(spec["n"]), int(spec.get("seed", 0))
    device = spec.get("device", "cpu")
    preset = "ball-stick" if kind in ("ball-stick-lsq", "dmipy") else "paper-msdki"
    signals, truth, acq = make_data(preset, n, seed)
    extra: dict = {}
    step = None
    if kind == "lsq" or kind == "ball-stick-lsq":
        from mixmap.fitting.lsq import LeastSquaresFitter

        fitter = LeastSquaresFitter("msdki" if kind == "lsq" else "ball-stick", device=device)

        def step():
            return fitter.fit(signals, acq).params
    elif kind == "dipy":
        from mixmap.paper.demo import dipy_msdki

        def step():
            return dipy_msdki(signals, acq)
    elif kind == "vae-gmm":
        from mixmap.fitting.learned.vae import MixtureVAEFitter

        fitter = MixtureVAEFitter("msdki", seed=seed, device=device)

        def step():
            res = fitter.fit(signals, acq)
            extra["epochs"] = len(res.history)
            return res.params
    elif kind == "apply":
        from mixmap.fitting.learned.vae import MixtureVAEFitter

        train, _, _ = make_data(preset, APPLY_TRAIN_VOXELS, seed + 1000)
        fitter = MixtureVAEFitter("msdki", seed=seed, device=device)
        fitter.fit(train, acq)
        del train

        def step():
            return fitter.apply(signals, acq).params
    elif kind == "dmipy":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from lsq import DEFAULT_DMIPY_PYTHON, run_dmipy

        def step():
            out = run_dmipy(Path(spec.get("dmipy_python") or DEFAULT_DMIPY_PYTHON), signals,
                            acq, int(spec.get("processors", 2)))
            extra["seconds_inside"] = float(out.pop("seconds"))
            return out
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    data_bytes = int(signals.nbytes)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = reset_peak()
    t0 = time.perf_counter()
    est = step()  # numpy maps: the device's work is done when it returns
    seconds = time.perf_counter() - t0
    peak = peak_rss()
    extra.update(device_peak(device))
    if kind == "dmipy":  # its own fit time, without its process start and numba compilation
        extra["wall_with_start"] = seconds
        seconds = extra["seconds_inside"]
    names = ["D", "K"] if preset == "paper-msdki" else ["f", "Dpar", "Diso"]
    return {"kind": kind, "n": n, "seconds": seconds, "data_bytes": data_bytes,
            "rss_before": before, "peak_rss": peak, "peak_extra": max(peak - before, 0),
            "rmse": rmse(est, truth, names), **extra}


def cli_worker(spec: dict) -> dict:
    """Run one ``mixmap`` command in this process; wall time and peak RSS of the whole run."""
    from mixmap.cli import app

    before = reset_peak()
    t0 = time.perf_counter()
    try:
        app(spec["args"], standalone_mode=False)
    except SystemExit as exc:  # pragma: no cover - reported
        if exc.code:
            raise
    seconds = time.perf_counter() - t0
    return {"kind": "cli", "args": spec["args"], "seconds": seconds, "rss_before": before,
            "peak_rss": peak_rss(), **device_peak(spec.get("device", "cpu"))}


def device_peak(device: str) -> dict:
    """Peak memory the step allocated on a CUDA device, and the device's name; {} on the CPU."""
    import torch

    if not (device.startswith("cuda") and torch.cuda.is_initialized()):
        return {}
    return {"device_peak": int(torch.cuda.max_memory_allocated()),
            "device_name": torch.cuda.get_device_name()}


def run_worker(spec: dict, timeout: float | None = None) -> dict:
    """Run one measurement in a fresh process: its result, or ``spec`` with an ``error`` (a
    failure, or "stopped after N s" where it ran past ``timeout`` and was killed)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 2))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"stopped after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "error": f"exit {proc.returncode}: {tail}",
                "wall": time.perf_counter() - t0}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============================================================================ whole brain
def whole_brain(brain_dir: Path, out_root: Path, threads: int, device: str = "cpu",
                methods=("lsq", "vae-gmm"), timeout: float | None = None) -> list[dict]:
    """Simulate the brain once (cached in ``brain_dir``), then time ``mixmap fit`` on it (each
    method at most ``timeout`` seconds): wall time and peak memory of the whole command, and
    the seconds of each phase as its fit.json records them."""
    dwi = brain_dir / "dwi.nii.gz"
    if not dwi.exists():
        print(f"simulating the whole brain into {brain_dir} (once) ...", flush=True)
        t0 = time.perf_counter()
        res = run_worker({"kind": "cli", "args": [
            "simulate", str(brain_dir), "--preset", "paper-msdki", "--layout", "brain",
            "--snr", str(SNR), "--force", "--quiet"]})
        if "error" in res:
            raise SystemExit(f"brain simulation failed: {res['error']}")
        print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    import nibabel as nib

    n_vox = int((np.asarray(nib.load(str(brain_dir / "mask.nii.gz")).dataobj) > 0).sum())
    n_vol = int(nib.load(str(dwi)).shape[3])
    rows = []
    for method in methods:
        out = out_root / f"brain-{method}"
        args = ["fit", str(dwi), "--bvals", str(brain_dir / "dwi.bval"), "--bvecs",
                str(brain_dir / "dwi.bvec"), "--mask", str(brain_dir / "mask.nii.gz"),
                "--model", "msdki", "--method", method, "--device", device, "--out", str(out),
                "--force", "--quiet"]
        res = run_worker({"kind": "cli", "args": args, "threads": threads, "device": device},
                         timeout=timeout)
        res.update(method=method, n=n_vox, n_volumes=n_vol, device=device, threads=threads,
                   data_bytes=n_vox * n_vol * 4)
        if "error" not in res:
            from mixmap.evaluation import evaluate_dirs

            # RMSE only: neither the Bayes reference nor the empirical floor (both slow)
            rep = evaluate_dirs(out, brain_dir, bayes=False, floor=False)
            res["rmse"] = {p: rep["metrics"][p]["all"]["rmse"] for p in ("D", "K")
                           if p in rep["metrics"]}
            summary = json.loads((out / "model-msdki_fit.json").read_text())
            res["phases"] = summary.get("Seconds", {})
            res["device_description"] = summary.get("Device")
        print(f"whole brain {method} ({device}): {res.get('seconds', float('nan')):.0f} s, "
              f"peak {res.get('peak_rss', 0) / 2**30:.2f} GiB {res.get('phases', '')} "
              f"{res.get('error', '')}", flush=True)
        rows.append(res)
    return rows


# ============================================================================ report
def slope(rows: list[dict]) -> float | None:
    """Log-log slope of seconds against voxels over the sizes >= 10,000 (1 = linear)."""
    pts = [(r["n"], r["seconds"]) for r in rows if "seconds" in r and r["n"] >= 10_000]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (kind, rows) in enumerate(results.items()):
        rows = [r for r in rows if "seconds" in r]
        if not rows:
            continue
        n = [r["n"] for r in rows]
        style = dict(color=f"C{i}", label=LABELS.get(kind, kind))
        axes[0].loglog(n, [r["seconds"] for r in rows], "o-", **style)
        if kind == "dmipy":
            continue
        # (floored at 1 MiB: apply reuses memory the training left, so it may add nothing)
        axes[1].loglog(n, [max(r["peak_extra"] / 2**20, 1.0) for r in rows], "o-", **style)
    all_n = sorted({r["n"] for rows in results.values() for r in rows})
    if all_n:
        data_mb = [n * 288 * 4 / 2**20 for n in all_n]
        axes[1].loglog(all_n, data_mb, "k--", label="the data (float32)")
    axes[0].set(xlabel="voxels", ylabel="seconds", title="time")
    axes[1].set(xlabel="voxels", ylabel="MiB (at least 1)", title="peak memory of the step")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


LABELS = {"lsq": "mixmap lsq (MSDKI)", "dipy": "dipy MSDKI", "ball-stick-lsq":
          "mixmap lsq (ball-stick)", "dmipy": "dmipy ball-stick brute2fine",
          "vae-gmm": "mixmap vae-gmm fit (train + maps)", "apply": "mixmap vae-gmm apply"}


def markdown(results: dict, brain: list[dict], info: dict) -> str:
    sizes = sorted({r["n"] for rows in results.values() for r in rows})
    lines = [
        "## Speed and scale",
        "",
        f"Produced by `{info['command']}` on {info['machine']}, torch {info['torch']}, "
        f"{info['threads']} threads; every cell is a fresh process (time of the one step, peak "
        f"resident memory above what the process held before it, the data included in "
        f"before). Data: the paper-msdki mixture (ball-stick preset for the ball-stick rows) "
        f"on the HCP scheme, 288 measurements, SNR {SNR:g}.",
        "",
        "Seconds (voxels per second):",
        "",
        "| method | " + " | ".join(f"{n:,}" for n in sizes) + " | log-log slope |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for kind, rows in results.items():
        by_n = {r["n"]: r for r in rows}
        cells = []
        for n in sizes:
            r = by_n.get(n)
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("failed")
            else:
                cells.append(f"{r['seconds']:.3g} ({n / r['seconds']:,.0f}/s)")
        s = slope(rows)
        lines.append(f"| {LABELS.get(kind, kind)} | " + " | ".join(cells)
                     + f" | {'' if s is None else f'{s:.2f}'} |")
    lines += ["", "Peak memory of the step above the process's memory before it, as a multiple "
              "of the data (n × 288 float32):", "",
              "| method | " + " | ".join(f"{n:,}" for n in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for kind, rows in results.items():
        if kind == "dmipy":  # it runs in its own process (its venv); not measured
            continue
        by_n = {r["n"]: r for r in rows}
        cells = [f"{by_n[n]['peak_extra'] / by_n[n]['data_bytes']:.2f}×"
                 if n in by_n and "peak_extra" in by_n[n] else "" for n in sizes]
        lines.append(f"| {LABELS.get(kind, kind)} | " + " | ".join(cells) + " |")
    ratios = []
    for ours, peer in (("lsq", "dipy"), ("ball-stick-lsq", "dmipy")):
        a = {r["n"]: r for r in results.get(ours, []) if "seconds" in r}
        b = {r["n"]: r for r in results.get(peer, []) if "seconds" in r}
        for n in sorted(set(a) & set(b)):
            acc = ""
            if a[n].get("rmse") and b[n].get("rmse"):
                acc = (" (RMSE ours " + ", ".join(f"{k} {v:.3f}" for k, v in a[n]["rmse"].items())
                       + "; theirs "
                       + ", ".join(f"{k} {v:.3f}" for k, v in b[n]["rmse"].items()) + ")")
            ratios.append(f"{n:,} voxels: {LABELS[peer]} takes "
                          f"{b[n]['seconds'] / a[n]['seconds']:.2f}× the time of "
                          f"{LABELS[ours]}{acc}")
    if ratios:
        lines += ["", "Side by side on the same voxels:", ""] + [f"- {r}" for r in ratios]
    if brain:
        lines += ["", "Whole brain (`mixmap simulate --layout brain`, HCP grid, end to end as "
                  "`mixmap fit` runs it: load, fit, maps, write):", "",
                  "| method | threads | voxels × volumes | seconds | phases (s, from fit.json; "
                  "the rest is start-up and writing) | peak memory (whole process) | RMSE D | "
                  "RMSE K |", "|---|---|---|---|---|---|---|---|"]
        for r in brain:
            head = (f"| {r['method']} | {r.get('threads', info['threads'])} | {r['n']:,} × "
                    f"{r['n_volumes']} |")
            if "error" in r:
                lines.append(f"{head} failed: {r['error']} | | | | |")
                continue
            rm = r.get("rmse", {})
            phases = ", ".join(f"{k} {v:.0f}" for k, v in r.get("phases", {}).items())
            lines.append(f"{head} {r['seconds']:.0f} | {phases or 'not recorded'} | "
                         f"{r['peak_rss'] / 2**30:.2f} GiB | {rm.get('D', float('nan')):.3f} | "
                         f"{rm.get('K', float('nan')):.3f} |")
    lines += ["", "![scaling](figures/speed_scaling.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+",
                    default=[1000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--dipy-max", type=int, default=1_000_000,
                    help="largest size for dipy (its fit is slower)")
    ap.add_argument("--dmipy-sizes", type=int, nargs="*", default=[1000, 10_000])
    ap.add_argument("--whole-brain", action="store_true")
    ap.add_argument("--brain-threads", type=int,
                    help="torch threads of the whole-brain fits (default: --threads)")
    ap.add_argument("--brain-dir", type=Path, default=Path.home() / ".cache" / "mixmap" /
                    "speed-brain")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads of our fits (and dmipy's processes); OMP_NUM_THREADS")
    ap.add_argument("--reuse", type=Path, metavar="JSON",
                    help="keep the cells of an interrupted run (its partial JSON, written to "
                    "the temp folder after every cell) and measure only the missing ones")
    ap.add_argument("--figure-only", action="store_true",
                    help="redraw docs/figures/speed_scaling.png from docs/speed.json")
    ap.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.figure_only:
        figure(json.loads((DOCS / "speed.json").read_text())["results"],
               DOCS / "figures" / "speed_scaling.png")
        return 0
    import torch

    from mixmap.paper.report import cpu_description, update_section

    results: dict[str, list] = {}
    brain = []
    brain_threads = args.brain_threads or args.threads
    if args.reuse:  # cells measured by an earlier (interrupted) run of the same command
        old = json.loads(args.reuse.read_text())
        results = {k: [r for r in v if "error" not in r] for k, v in old["results"].items()}
        # whole-brain rows at other thread counts than this run's are kept beside its own
        threads_before = old.get("info", {}).get("threads", args.threads)
        brain = [r for r in old.get("whole_brain", []) if "error" not in r and not (
            args.whole_brain and r.get("threads", threads_before) == brain_threads)]
        for r in brain:
            r.setdefault("threads", threads_before)
    partial = Path(tempfile.gettempdir()) / "mixmap-speed-partial.json"
    if args.whole_brain:  # first: the longest single measurement, and the one a goal names
        with tempfile.TemporaryDirectory(prefix="mixmap-speed-") as tmp:
            brain += whole_brain(args.brain_dir, Path(tmp), brain_threads)
        partial.write_text(json.dumps({"results": results, "whole_brain": brain}, indent=1))
    for kind in args.methods:
        sizes = args.dmipy_sizes if kind == "dmipy" else [
            n for n in args.sizes if kind != "dipy" or n <= args.dipy_max]
        for n in sizes:
            if any(r["n"] == n for r in results.get(kind, [])):
                continue
            res = run_worker({"kind": kind, "n": n, "threads": args.threads,
                              "processors": args.threads})
            results.setdefault(kind, []).append(res)
            msg = res.get("error") or (f"{res['seconds']:.2f} s, +{res['peak_extra'] / 2**20:.0f}"
                                       f" MiB (data {res['data_bytes'] / 2**20:.0f} MiB)")
            print(f"{kind:>15} {n:>9,}: {msg}", flush=True)
            partial.write_text(json.dumps({"results": results, "whole_brain": brain},
                                          indent=1))
    info = {"command": " ".join([COMMAND, *(["--whole-brain"] if args.whole_brain else []),
                                 *([f"--brain-threads {args.brain_threads}"]
                                   if args.brain_threads else []),
                                 *([f"--threads {args.threads}"] if args.threads != 2 else [])]),
            "machine": cpu_description(), "torch": torch.__version__, "threads": args.threads}
    text = markdown(results, brain, info)
    print(text)
    if not args.no_write:
        (DOCS / "speed.json").write_text(json.dumps(
            {"info": info, "results": results, "whole_brain": brain}, indent=1) + "\n")
        figure(results, DOCS / "figures" / "speed_scaling.png")
        update_section(DOCS / "RESULTS.md", "speed", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
