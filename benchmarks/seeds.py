"""Variability of vae-gmm across training seeds, and the time of training and of `apply`.

    python benchmarks/seeds.py                                   # the "seeds" section
    python benchmarks/seeds.py --preset msdki-4 --without-split-merge   # "seeds-msdki4"

One simulated data set (HCP scheme, Gaussian noise, SNR ``--snr`` (20), 10,000 voxels,
simulation seed 0) of ``--preset`` (``paper-msdki`` or the 4-cluster ``msdki-4``); vae-gmm
trained with seeds 0 to ``--seeds`` − 1. Reports RMSE of D and K per seed, as a ratio to the
Bayes-optimal reference (the posterior mean under the true prior,
:func:`mixmap.evaluation.bayes_reference`), their mean, standard deviation and relative spread,
the split-and-merge moves of the empirical-Bayes refit, and the time to train and to apply the
trained model to the same voxels. With ``--without-split-merge`` every seed is also trained
with ``eb_split_merge=False`` (the control for what the moves change).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mixmap.evaluation import bayes_reference
from mixmap.fitting import get_fitter
from mixmap.paper.report import machine_description, markdown_table, update_section
from mixmap.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"paper-msdki": ("seeds", "seeds.json"),
            "msdki-4": ("seeds-msdki4", "seeds_msdki4.json")}


def rmse(est: dict, truth: dict) -> dict:
    return {k: float(np.sqrt(np.mean((np.asarray(est[k]) - truth[k]) ** 2))) for k in "DK"}


def run_seed(sim, seed: int, bayes: dict, **kw) -> dict:
    f = get_fitter("vae-gmm", "msdki", seed=seed, **kw)
    t = time.perf_counter()
    res = f.fit(sim.signals, sim.acquisition)
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    f.apply(sim.signals, sim.acquisition)
    t_apply = time.perf_counter() - t
    err = rmse(res.params, sim.truth)
    rounds = res.settings.get("empirical_bayes", {}).get("rounds", [])
    moves = sum(1 for r in rounds if r.get("split_merge"))
    return {"seed": seed, **err, **{f"{k}_bayes_ratio": err[k] / bayes[k] for k in "DK"},
            "fit_s": t_fit, "apply_s": t_apply, "epochs": len(res.history), "moves": moves,
            "split_merge": bool(kw.get("eb_split_merge", True))}


def summary(label: str, numbers: list[dict]) -> tuple[list, str]:
    d = np.array([n["D"] for n in numbers])
    k = np.array([n["K"] for n in numbers])
    rd = np.array([n["D_bayes_ratio"] for n in numbers])
    rk = np.array([n["K_bayes_ratio"] for n in numbers])
    row = [f"{label}: mean ± sd", f"{d.mean():.3f} ± {d.std(ddof=1):.3f}",
           f"{k.mean():.3f} ± {k.std(ddof=1):.3f}", f"{rd.min():.2f}–{rd.max():.2f}×",
           f"{rk.min():.2f}–{rk.max():.2f}×", "", "", "", ""]
    above = int(((rd > 1.25) | (rk > 1.25)).sum())
    verdict = "met for every seed" if above == 0 else f"not met for {above} of {len(rd)} seeds"
    line = (f"- {label}: relative spread (sd / mean) across seeds D "
            f"{100 * d.std(ddof=1) / d.mean():.1f} %, K {100 * k.std(ddof=1) / k.mean():.1f} % "
            f"(goal: under 5 %); RMSE / Bayes D {rd.min():.2f}–{rd.max():.2f}×, K "
            f"{rk.min():.2f}–{rk.max():.2f}× (goal ≤ 1.25×: {verdict}).")
    return row, line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper-msdki", choices=sorted(SECTIONS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--snr", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--without-split-merge", action="store_true",
                    help="also train every seed without the split-and-merge moves (control)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    section, json_name = SECTIONS[args.preset]
    if args.snr != 20:
        section += f"-snr{args.snr:g}"
        json_name = json_name.replace(".json", f"_snr{args.snr:g}.json")
    sim = simulate(args.preset, "hcp", snr=args.snr, seed=0)
    bayes = rmse(bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma,
                                 sim.noise), sim.truth)
    variants = [("default", {})]
    if args.without_split_merge:
        variants.append(("without split-merge", {"eb_split_merge": False}))
    rows, numbers, lines = [], [], []
    for label, kw in variants:
        part = []
        for seed in range(args.seeds):
            n = run_seed(sim, seed, bayes, **kw)
            part.append(n)
            rows.append([f"{seed}" + ("" if label == "default" else f" ({label})"),
                         f"{n['D']:.3f}", f"{n['K']:.3f}", f"{n['D_bayes_ratio']:.2f}×",
                         f"{n['K_bayes_ratio']:.2f}×", n["moves"] if n["split_merge"] else "–",
                         f"{n['fit_s']:.1f}", f"{n['apply_s']:.1f}", n["epochs"]])
            print(rows[-1], flush=True)
        row, line = summary(label, part)
        rows.append(row)
        lines.append(line)
        numbers += part
    table = markdown_table(["seed", "RMSE D", "RMSE K", "D / Bayes", "K / Bayes",
                            "split-merge moves", "train (s)", "apply (s)", "epochs"], rows)
    command = "python benchmarks/seeds.py" + (
        f" --preset {args.preset}" if args.preset != "paper-msdki" else "") + (
        f" --snr {args.snr:g}" if args.snr != 20 else "") + (
        " --without-split-merge" if args.without_split_merge else "") + (
        f" --threads {args.threads}" if args.threads != 2 else "")
    text = (
        f"### vae-gmm across training seeds: {args.preset}, SNR {args.snr:g}\n\nProduced by "
        f"`{command}`: {args.preset}, HCP scheme, SNR {args.snr:g}, 10,000 voxels (one data "
        f"set), default vae-gmm with seeds 0-{args.seeds - 1}, on {machine_description()}. "
        f"Bayes-optimal RMSE (true prior): D {bayes['D']:.3f}, K {bayes['K']:.3f}.\n\n"
        + table + "\n\n"
        + "\n".join(lines) + "\n\n`apply` maps the 10,000 voxels with the trained model, "
        "without training (it still runs the per-voxel refinement of q and the "
        "importance-sampled posterior mean). Split-merge moves: how many the empirical-Bayes "
        "refit kept (`Settings.empirical_bayes` of the fit).\n"
    )
    update_section(ROOT / "docs" / "RESULTS.md", section, text)
    (ROOT / "docs" / json_name).write_text(json.dumps(
        {"preset": args.preset, "snr": args.snr, "bayes": bayes, "runs": numbers}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
