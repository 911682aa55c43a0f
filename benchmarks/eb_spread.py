"""How well can one scan fix the prior? The maximum-evidence mixture prior on a grid, scan by scan.

    python benchmarks/eb_spread.py --noise gaussian rician --seeds 0 1 2 3 4
    python benchmarks/eb_spread.py --render      # rewrite the section from the JSON

vae-gmm learns its prior from the scan alone (empirical Bayes); the Bayes-optimal reference it
is measured against knows the true prior. This benchmark separates the two without any network:
for simulated ``paper-msdki`` scans (HCP scheme, SNR 20, 10,000 voxels; one per seed), it
maximises the scan's exact log evidence over 3-component mixture priors on the grid of
:mod:`mixmap.fitting.empirical_bayes.grid` (every voxel's likelihood on a 96 × 96 (D, K) grid,
S0 integrated out; Rician noise through the per-shell Rician term), by EM, L-BFGS
(:func:`mixmap.fitting.empirical_bayes.grid.polish`) and relocation, on all the scan's voxels,
from two starts: the true prior, and the true prior with its CSF-like component moved along the
D–K ridge to where vae-gmm's seed-0 Rician fit put it (D 2.91, K −0.07). Both should end at one
place; the one with the higher evidence gives the maximum-evidence prior: the best that
empirical Bayes can learn from that scan. Its CSF-like component is reported, with the log
evidence between the two optima, and the RMSE of the exact posterior mean under it
(:func:`mixmap.evaluation.bayes_reference`, S0 = 1 known) as a ratio to the true prior's: what
an ideal vae-gmm would reach. Results go to ``docs/eb_spread.json`` and the ``eb-spread``
section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learned_variants import parse_run_args, replace_entries  # noqa: E402
from prior_gap import learned_preset  # noqa: E402

from mixmap.evaluation import bayes_reference  # noqa: E402
from mixmap.fitting.base import Scheme  # noqa: E402
from mixmap.fitting.empirical_bayes import grid as eb_grid  # noqa: E402
from mixmap.fitting.learned.latent import latent_bounds  # noqa: E402
from mixmap.models import get_model  # noqa: E402
from mixmap.nn.priors import MixturePrior  # noqa: E402
from mixmap.paper.report import machine_description, markdown_table, update_section  # noqa: E402
from mixmap.simulation import get_preset, simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "eb_spread.json"
PRESET, SNR, VOXELS = "paper-msdki", 20.0, 10_000
#: The CSF-like component where vae-gmm's Rician fit (seed 0) put it: the second start.
SHIFTED_CSF = (2.91, -0.07)


class _Holder:
    """What :func:`prior_gap.learned_preset` reads from a fitter: the model and the prior."""

    def __init__(self, model, prior):
        self.model = model
        self.net = type("Net", (), {"prior": prior})()


def _prior(model, preset, csf=None) -> MixturePrior:
    """The preset's mixture as a prior over (S0, D, K) in bounded coordinates (S0's column is
    unused by the grid); ``csf`` moves the last (CSF-like) component's mean."""
    lo, hi = latent_bounds(model)
    p = MixturePrior(len(preset.clusters), 3, lower=lo, upper=hi)
    with torch.no_grad():
        for k, c in enumerate(preset.clusters):
            mean = (c.mean["D"], c.mean["K"])
            if csf is not None and k == len(preset.clusters) - 1:
                mean = csf
            p.mu[k] = torch.tensor([1.0, *mean])
            p.log_std[k] = torch.tensor([0.01, c.std["D"], c.std["K"]]).log()
        p.logits.copy_(torch.as_tensor(preset.weights, dtype=torch.float32).log())
    for t in p.parameters():
        t.requires_grad_(False)
    return p


def run(noise: str, seed: int) -> dict:
    model = get_model("msdki")
    truth = get_preset(PRESET)
    sim = simulate(PRESET, "hcp", snr=SNR, noise=noise, n_voxels=VOXELS, seed=seed)
    scheme = Scheme.build(model, sim.acquisition, True, "cpu")
    y = torch.as_tensor(sim.signals, dtype=torch.float32)
    yw, _ = scheme.working_signals(y)
    extra = {"rician": (y, scheme.groups)} if noise == "rician" else {}
    t = time.perf_counter()
    grid = eb_grid.grid_likelihood(model, _prior(model, truth), [1, 2], yw, scheme.work,
                                   scheme.weights, sim.sigma, **extra)
    table_s = time.perf_counter() - t
    n = float(yw.shape[0])
    optima = {}
    for start, csf in (("true prior", None), ("CSF moved to (2.91, -0.07)", SHIFTED_CSF)):
        p = _prior(model, truth, csf)
        eb_grid.grid_em(p, grid, lambda v: v, n)
        eb_grid.polish(p, grid, lambda v: v, n)
        moves = eb_grid.relocate(p, grid, lambda v: v, n)
        if moves:
            eb_grid.polish(p, grid, lambda v: v, n)
        ev, _ = eb_grid.grid_em_step(p, grid, lambda v: v, update=False)
        optima[start] = (ev, p, moves)
    best = max(optima, key=lambda k: optima[k][0])
    ev_best, prior, _ = optima[best]
    learned = learned_preset(_Holder(model, prior))
    est = {"maximum-evidence prior": bayes_reference(sim.signals, sim.acquisition, learned,
                                                     sim.sigma, noise),
           "true prior": bayes_reference(sim.signals, sim.acquisition, truth, sim.sigma, noise)}
    names = [c.name for c in truth.clusters]
    rmse = {}
    for label, e in est.items():
        rmse[label] = {}
        for p in ("D", "K"):
            for g, sel in [("all", np.ones(VOXELS, bool))] + [
                    (nm, sim.labels == i) for i, nm in enumerate(names)]:
                rmse[label][f"{p} {g}"] = float(np.sqrt(np.mean((e[p][sel] - sim.truth[p][sel])
                                                                ** 2)))
    csf = max(learned.clusters, key=lambda c: c.mean["D"])
    return {"noise": noise, "seed": seed, "snr": SNR, "n_voxels": VOXELS,
            "table_s": table_s, "best_start": best,
            "evidence_gap_total": {k: ev_best - v[0] for k, v in optima.items()},
            "csf_by_start": {k: {"D": float(v[1].mu[_csf_index(v[1]), 1]),
                                 "K": float(v[1].mu[_csf_index(v[1]), 2])}
                             for k, v in optima.items()},
            "csf": {"weight": csf.weight, "mean": csf.mean, "std": csf.std},
            "rmse": rmse}


def _csf_index(prior: MixturePrior) -> int:
    return int(torch.argmax(prior.mu[:, 1]))


def section(results: list[dict], command: str) -> str:
    cols = ["D all", "D CSF", "K all", "K CSF"]
    parts = [
        "## How well one scan fixes the prior: the maximum-evidence prior, scan by scan\n",
        f"Produced by `{command}` on {machine_description()}. {PRESET}, HCP scheme, SNR "
        f"{SNR:g}, {VOXELS:,} voxels per scan, one simulated scan per seed. No network: the "
        "scan's exact log evidence (grid of `mixmap.fitting.empirical_bayes.grid`, S0 integrated "
        "out) is maximised over 3-component mixture priors by EM, L-BFGS (`eb_grid.polish`, not "
        "part of vae-gmm's refit) and relocation, on all voxels, from the true prior and "
        "from the true prior with its CSF-like component moved to (D 2.91, K −0.07), where "
        "vae-gmm's seed-0 Rician fit put it; the higher optimum is the maximum-evidence prior, "
        "the best empirical Bayes can learn from the scan. 'ratio' is the RMSE of the exact "
        "posterior mean under it over that under the true prior (both with S0 = 1 known): "
        "what an ideal vae-gmm would reach against the Bayes floor.\n",
    ]
    rows = []
    for r in sorted(results, key=lambda r: (r["noise"], r["seed"])):
        ours, ref = r["rmse"]["maximum-evidence prior"], r["rmse"]["true prior"]
        gap = max(abs(v) for v in r["evidence_gap_total"].values())
        starts = " / ".join(f"{v['D']:.2f}, {v['K']:.2f}" for v in r["csf_by_start"].values())
        rows.append([r["noise"], str(r["seed"]),
                     f"{r['csf']['mean']['D']:.2f} ± {r['csf']['std']['D']:.2f}",
                     f"{r['csf']['mean']['K']:.2f} ± {r['csf']['std']['K']:.2f}",
                     starts, f"{gap:.2f}"]
                    + [f"{ours[c]:.3f} ({ours[c] / ref[c]:.2f}×)" for c in cols])
    parts.append(markdown_table(
        ["noise", "seed", "CSF D (max. evidence)", "CSF K", "CSF optima from the two starts (D, K)",
         "their log-evidence gap (nats, whole scan)"]
        + [f"{c} (ratio)" for c in cols], rows))
    parts.append("\nTrue CSF-like cluster: D 3.00 ± 0.10, K 0.00 ± 0.10.\n")
    for noise in sorted({r["noise"] for r in results}):
        rs = [r for r in results if r["noise"] == noise]
        d = [r["csf"]["mean"]["D"] for r in rs]
        ratio = [r["rmse"]["maximum-evidence prior"]["D all"] / r["rmse"]["true prior"]["D all"]
                 for r in rs]
        kr = [r["rmse"]["maximum-evidence prior"]["K all"] / r["rmse"]["true prior"]["K all"]
              for r in rs]
        parts.append(
            f"- {noise}: over {len(rs)} scans the maximum-evidence CSF-like D ranges "
            f"{min(d):.2f}–{max(d):.2f} (truth 3.00); the ideal empirical-Bayes RMSE is "
            f"{min(ratio):.2f}–{max(ratio):.2f}× the Bayes floor for D and "
            f"{min(kr):.2f}–{max(kr):.2f}× for K.")
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", nargs="+", default=["gaussian", "rician"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args, results = parse_run_args(ap, OUT)
    if not args.render:
        for noise in args.noise:
            for seed in args.seeds:
                r = run(noise, seed)
                print(noise, seed, r["csf"], {k: v["D all"] for k, v in r["rmse"].items()},
                      flush=True)
                results = replace_entries(OUT, [r], lambda e: (e["noise"], e["seed"]))
    command = "; ".join(
        f"python benchmarks/eb_spread.py --noise {noise} --seeds "
        + " ".join(str(r["seed"]) for r in sorted(results, key=lambda r: r["seed"])
                   if r["noise"] == noise)
        for noise in sorted({r["noise"] for r in results}))
    update_section(ROOT / "docs" / "RESULTS.md", "eb-spread", section(results, command))


if __name__ == "__main__":
    main()
