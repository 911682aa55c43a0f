"""The GPU check: everything issue 6 asks of a lent GPU, in one prepared, time-boxed run.

On the GPU machine (the ``device`` tool; its python has torch, numpy, scipy, typer, pytest,
pytest-xdist but not nibabel, which travels as a wheel in ``.whl/``, see benchmarks/README.md)::

    python benchmarks/gpu_check.py --out $OUT --budget 420

and back here, to put the measurements into docs/ (``docs/gpu.json`` and the ``gpu`` section of
RESULTS.md)::

    python benchmarks/gpu_check.py --render /work/.device/.../gpu_check.json

Steps, in order of importance, each in its own process with its own time limit and skipped
when the budget left cannot hold it; ``gpu_check.json`` is rewritten after every step, so a run
stopped at its limit still returns what it measured:

1. the machine: torch, CUDA, the GPU's name and memory;
2. ``tests/test_device.py`` on the device (every fitter against the same fit on the CPU, the
   command line with ``--device cuda``, mixed precision);
3. the whole brain (``mixmap simulate --layout brain``: about 0.9 M voxels × 288 volumes), then
   ``mixmap fit --method vae-gmm --device cuda`` end to end (load, train, posterior maps,
   write; the goal is 60 s) and ``--method lsq``, with the seconds of each phase, host and
   device peak memory and RMSE;
4. mixed precision (``benchmarks/precision.py``'s fits: float32, bfloat16, float16);
5. the scaling curve on the device: lsq, vae-gmm fit and apply at 10,000 … 1,000,000 voxels.

``--device cpu --quick`` runs the same steps small on the CPU: a rehearsal that costs no GPU
time (use it before every GPU run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
COMMAND = "python benchmarks/gpu_check.py"
STEPS = ("tests", "brain", "precision", "scaling")


class Budget:
    """Seconds left of the run; a step gets at most its cap and never more than is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allow(self, cap: float, least: float) -> float | None:
        """The step's time limit, or None where fewer than ``least`` seconds are left."""
        left = self.left()
        return None if left < least else min(cap, left)


def machine(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "device": device,
            "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, multiprocessors=p.multi_processor_count)
    if device == "cpu" or torch.cuda.is_available():
        from mixmap.fitting.learned.posterior import maps_sizes

        # voxels per chunk and draws per slice of vae-gmm's maps on this device
        info["maps_sizes"] = list(maps_sizes(device))
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def device_tests(device: str, limit: float, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if device == "cpu":  # the rehearsal: the accelerator tests' logic on the CPU
        env["MIXMAP_TEST_DEVICES"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_device.py")]
    if workers > 1:
        cmd += ["-n", str(workers)]
    t0 = time.perf_counter()
    # its own process group, so that a stop at the limit also ends pytest-xdist's workers
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return {"error": f"stopped after {limit:.0f} s", "tail": (out or "")[-3000:]}
    lines = out.strip().splitlines()
    return {"exit": proc.returncode, "seconds": time.perf_counter() - t0,
            "summary": lines[-1] if lines else "", "tail": out[-4000:]}


def precision_runs(device: str, precisions: list[str], limit: float) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import precision; "
            f"print(json.dumps(precision.run({device!r}, {precisions!r}, 1)))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {limit:.0f} s"}
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(args) -> dict:
    import speed

    budget = Budget(args.budget)
    out_json = args.out / "gpu_check.json"
    res: dict = {"command": " ".join([COMMAND, *sys.argv[1:]]), "machine": machine(args.device),
                 "steps": []}

    def save(step: str, t0: float) -> None:
        res["steps"].append({"step": step, "seconds": round(time.perf_counter() - t0, 1)})
        out_json.write_text(json.dumps(res, indent=1) + "\n")
        print(f"[{budget.left():.0f} s left] {step} done", flush=True)

    save("machine", time.perf_counter())
    print(json.dumps(res["machine"]), flush=True)

    t0 = time.perf_counter()
    limit = budget.allow(args.test_cap, 30)
    if "tests" in args.steps:
        res["tests"] = device_tests(args.device, limit, args.workers) if limit else {
            "error": "skipped: no time left"}
        print(res["tests"].get("summary") or res["tests"].get("error"), flush=True)
        save("tests", t0)

    quick = args.quick
    with tempfile.TemporaryDirectory(prefix="mixmap-gpu-") as tmp:
        t0 = time.perf_counter()
        brain_dir = Path(tmp) / "brain"
        grid = "36,44,36" if quick else "145,174,145"
        limit = budget.allow(args.simulate_cap, 30)
        if limit and "brain" in args.steps:
            sim = speed.run_worker({"kind": "cli", "threads": args.threads, "args": [
                "simulate", str(brain_dir), "--preset", "paper-msdki", "--layout", "brain",
                "--grid", grid, "--snr", str(speed.SNR), "--force", "--quiet"]},
                timeout=limit)
            res["brain_simulation"] = {**sim, "grid": grid}
            save("brain simulation", t0)
            for method, cap in (("vae-gmm", args.brain_cap), ("lsq", args.lsq_cap)):
                t0 = time.perf_counter()
                limit = budget.allow(cap, 20)
                if "error" in sim or not limit:
                    break
                res.setdefault("whole_brain", []).extend(speed.whole_brain(
                    brain_dir, Path(tmp) / "fits", args.threads, args.device, (method,),
                    timeout=limit))
                save(f"whole brain {method}", t0)

    t0 = time.perf_counter()
    limit = budget.allow(args.precision_cap, 60)
    if limit and "precision" in args.steps:
        res["precision"] = precision_runs(args.device, args.precisions, limit)
        save("precision", t0)

    sizes = [1000, 10_000] if quick else [10_000, 100_000, 1_000_000]
    for kind in ("lsq", "vae-gmm", "apply") if "scaling" in args.steps else ():
        for n in sizes:
            t0 = time.perf_counter()
            limit = budget.allow(args.scaling_cap, 20)
            if not limit:
                break
            row = speed.run_worker({"kind": kind, "n": n, "threads": args.threads,
                                    "device": args.device}, timeout=limit)
            res.setdefault("scaling", {}).setdefault(kind, []).append(row)
            save(f"scaling {kind} {n:,}", t0)
            if "error" in row:
                break
    res["budget_left"] = round(budget.left(), 1)
    out_json.write_text(json.dumps(res, indent=1) + "\n")
    return res


# ============================================================================ report
def section(res: dict) -> str:
    from mixmap.paper.report import markdown_table

    m = res["machine"]
    where = m.get("gpu") or "the CPU (rehearsal)"
    lines = ["## GPU", "",
             f"Produced by `{res['command']}` on {where}"
             + (f" ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']})" if m.get("gpu") else "")
             + f", {m['cpu_count']} CPU cores, torch {m['torch']}; rendered into this file by "
             f"`{COMMAND} --render <its gpu_check.json>`. One run, so indicative."
             + (" vae-gmm's maps ran in chunks of {:,} voxels and slices of {:,} draws "
                "(`mixmap.fitting.learned.posterior.maps_sizes`).".format(*m["maps_sizes"])
                if m.get("maps_sizes") else ""), ""]
    t = res.get("tests")
    if t:
        lines += [f"**Device tests** (`tests/test_device.py`): "
                  f"{t.get('summary') or t.get('error')}", ""]
    brain = res.get("whole_brain", [])
    if brain:
        sim = res.get("brain_simulation", {})
        lines += [f"**Whole brain** (grid {sim.get('grid', '?')}, end to end as `mixmap fit` "
                  "runs it):", ""]
        rows = []
        for r in brain:
            if "error" in r:
                what = r["error"] if r["error"].startswith("stopped") else f"failed: {r['error']}"
                rows.append([r["method"], f"{r['n']:,} × {r['n_volumes']}", what,
                             "", "", "", "", ""])
                continue
            ph = r.get("phases", {})
            rows.append([r["method"], f"{r['n']:,} × {r['n_volumes']}", f"{r['seconds']:.1f}",
                         ", ".join(f"{k} {v:.1f}" for k, v in ph.items()),
                         f"{r['peak_rss'] / 2**30:.2f}",
                         f"{r.get('device_peak', 0) / 2**30:.2f}",
                         f"{r['rmse'].get('D', float('nan')):.3f}",
                         f"{r['rmse'].get('K', float('nan')):.3f}"])
        lines += [markdown_table(["method", "voxels × volumes", "seconds", "phases (s)",
                                  "host peak (GiB)", "GPU peak (GiB)", "RMSE D", "RMSE K"],
                                 rows), ""]
    sc = res.get("scaling", {})
    if sc:
        sizes = sorted({r["n"] for rows in sc.values() for r in rows})
        rows = []
        for kind, items in sc.items():
            by_n = {r["n"]: r for r in items}
            rows.append([kind] + [_cell(by_n.get(n), n) for n in sizes])
        lines += ["**Scaling on the device** (seconds, voxels per second; paper-msdki, HCP "
                  "scheme, SNR 20):", "",
                  markdown_table(["step"] + [f"{n:,}" for n in sizes], rows), ""]
    p = res.get("precision")
    if p and "error" not in p:
        import precision

        lines += [precision.section([p], res["command"]).replace("## ", "### ", 1)]
    elif p:
        lines += [f"**Mixed precision**: {p['error']}", ""]
    return "\n".join(lines) + "\n"


def merge(runs: list[dict]) -> dict:
    """Runs of other ``--steps`` (on the same machine) as one: each step's results from the
    last run that has them; the commands joined."""
    out = dict(runs[0])
    for r in runs[1:]:
        if r["machine"].get("gpu") != out["machine"].get("gpu"):
            raise SystemExit("--render: these runs were on different machines; render each alone")
        out.update({k: v for k, v in r.items() if k not in ("command", "machine", "steps")})
        out["command"] = f"{out['command']}; {r['command']}"
    return out


def _cell(row: dict | None, n: int) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "stopped at its limit" if row["error"].startswith("stopped") else "failed"
    return f"{row['seconds']:.3g} ({n / row['seconds']:,.0f}/s)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "mixmap-gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds for the whole run (steps that no longer fit are skipped)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a rehearsal")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                    help="the steps to run, always in this order (a second call can run the "
                    "ones the first had no time for)")
    ap.add_argument("--threads", type=int, default=8, help="torch CPU threads per process")
    ap.add_argument("--workers", type=int, default=4, help="pytest-xdist workers (1: none)")
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--test-cap", type=float, default=150.0)
    ap.add_argument("--simulate-cap", type=float, default=150.0)
    ap.add_argument("--brain-cap", type=float, default=240.0)
    ap.add_argument("--lsq-cap", type=float, default=90.0)
    ap.add_argument("--precision-cap", type=float, default=120.0)
    ap.add_argument("--scaling-cap", type=float, default=60.0)
    ap.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                    help="write docs/gpu.json and the gpu section of RESULTS.md from a run's "
                    "gpu_check.json (several: runs of other --steps on the same machine, merged)")
    ap.add_argument("--no-write", action="store_true", help="--render: print, write nothing")
    args = ap.parse_args(argv)
    if args.render:
        res = merge([json.loads(path.read_text()) for path in args.render])
        text = section(res)
        print(text)
        if not args.no_write:
            from mixmap.paper.report import update_section

            (ROOT / "docs" / "gpu.json").write_text(json.dumps(res, indent=1) + "\n")
            update_section(ROOT / "docs" / "RESULTS.md", "gpu", text)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    check(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
