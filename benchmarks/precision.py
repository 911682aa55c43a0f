"""Mixed precision: does a 16-bit encoder network make vae-gmm faster, and at what cost?

    python benchmarks/precision.py                          # CPU: float32 vs bfloat16
    python benchmarks/precision.py --device cuda --precisions float32 bfloat16 float16

vae-gmm (default configuration, seed 0) on one simulated ``paper-msdki`` scan (HCP scheme,
Gaussian noise, SNR 20, 10,000 voxels), once per ``precision`` (the encoder network under
``torch.autocast``; the physics, likelihood, prior and posterior sums stay float32/float64),
in alternating order over ``--repeats`` rounds after an untimed warm-up fit of each (a
process's first fit pays one-off set-up costs), all in one run: the wall time of training
(timed around the fitter's training loop) and of the whole fit, the epochs trained, and the RMSE
of D and K overall and per cluster next to the Bayes-optimal reference. Times are medians
over the rounds and are quoted with the machine. Results go to ``docs/precision.json``
(entries replaced per device) and the ``precision`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learned_variants import parse_run_args, replace_entries  # noqa: E402

from mixmap.evaluation import bayes_reference, metrics  # noqa: E402
from mixmap.fitting import get_fitter  # noqa: E402
from mixmap.paper.report import machine_description, markdown_table, update_section  # noqa: E402
from mixmap.simulation import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "precision.json"
PRESET, SCHEME, SNR, VOXELS, SEED = "paper-msdki", "hcp", 20.0, 10_000, 0


def _fit(sim, precision: str, device: str) -> dict:
    f = get_fitter("vae-gmm", "msdki", precision=precision, device=device, seed=SEED,
                   quiet=True)
    t = time.perf_counter()
    r = f.fit(sim.signals, sim.acquisition)
    names = [c.name for c in sim.preset.clusters]
    # the training loop alone: the fit's own "train" phase (ends with a device synchronisation)
    return {"fit_s": time.perf_counter() - t, "train_s": r.timings["train"],
            "epochs": len(r.history or []),
            "metrics": metrics(r.params, sim.truth, sim.labels, names, ["D", "K"])}


def run(device: str, precisions: list[str], repeats: int) -> dict:
    sim = simulate(PRESET, SCHEME, snr=SNR, n_voxels=VOXELS, seed=SEED)
    names = [c.name for c in sim.preset.clusters]
    bayes = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma)
    runs: dict[str, list[dict]] = {p: [] for p in precisions}
    warm = simulate(PRESET, SCHEME, snr=SNR, n_voxels=500, seed=SEED + 1)
    for p in precisions:  # untimed: the first fit in a process pays one-off set-up costs
        _fit(warm, p, device)
    for i in range(repeats):
        order = precisions if i % 2 == 0 else precisions[::-1]
        for p in order:
            runs[p].append(_fit(sim, p, device))
            print(device, p, {k: round(v, 1) for k, v in runs[p][-1].items()
                              if isinstance(v, float)}, flush=True)
    return {"device": device, "machine": machine_description(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "repeats": repeats, "bayes": metrics(bayes, sim.truth, sim.labels, names,
                                                 ["D", "K"]),
            "runs": runs}


def section(results: list[dict], command: str) -> str:
    parts = [
        "## Mixed precision: a 16-bit encoder network\n",
        f"Produced by `{command}`. vae-gmm (default configuration, seed 0) on `{PRESET}` "
        f"({SCHEME} scheme, Gaussian noise, SNR {SNR:g}, {VOXELS:,} voxels), once per "
        "precision of the encoder network (`--precision`: `torch.autocast`; the physics, "
        "likelihood, prior and posterior sums stay float32/float64), alternating. Times: "
        "median over the rounds; 'train' is the training loop, 'fit' the whole fit (training, "
        "empirical Bayes, refinement, posterior maps). RMSE next to the Bayes-optimal "
        "reference. Raw numbers: `docs/precision.json`.\n",
    ]
    for r in results:
        where = r["gpu"] or r["machine"]
        parts.append(f"**device {r['device']}** ({where}; {r['repeats']} round(s))\n")
        base = None
        rows = []
        for p, runs in r["runs"].items():
            train = statistics.median(x["train_s"] for x in runs)
            fit = statistics.median(x["fit_s"] for x in runs)
            base = base or (train, fit)
            m = runs[0]["metrics"]
            rows.append([p, f"{train:.1f}", f"{train / base[0]:.2f}×", f"{fit:.1f}",
                         f"{fit / base[1]:.2f}×", str(runs[0]["epochs"])]
                        + [f"{m[k]['all']['rmse']:.4f}" for k in ("D", "K")]
                        + [f"{m[k]['clusters'][c]['rmse']:.4f}" for k in ("D", "K")
                           for c in m[k]["clusters"]])
        b = r["bayes"]
        rows.append(["Bayes-optimal", "", "", "", "", ""]
                    + [f"{b[k]['all']['rmse']:.4f}" for k in ("D", "K")]
                    + [f"{b[k]['clusters'][c]['rmse']:.4f}" for k in ("D", "K")
                       for c in b[k]["clusters"]])
        clusters = list(r["bayes"]["D"]["clusters"])
        parts.append(markdown_table(
            ["precision", "train (s)", "vs float32", "fit (s)", "vs float32", "epochs",
             "D all", "K all"] + [f"{k} {c}" for k in ("D", "K") for c in clusters], rows))
        parts.append("")
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=1)
    args, results = parse_run_args(ap, OUT)
    if not args.render:
        entry = run(args.device, args.precisions, args.repeats)
        results = replace_entries(OUT, [entry], lambda e: e["device"])
    command = "; ".join(
        f"python benchmarks/precision.py --device {r['device']} --precisions "
        f"{' '.join(r['runs'])} --repeats {r['repeats']}" for r in results)
    update_section(ROOT / "docs" / "RESULTS.md", "precision", section(results, command))


if __name__ == "__main__":
    main()
