"""Where vae-gmm loses to the Bayes-optimal estimate: in the prior it learns, or in its posterior?

    python benchmarks/prior_gap.py          # rewrites the "prior-gap" section of docs/RESULTS.md

paper-msdki, HCP scheme, Gaussian noise, 10,000 voxels, SNR 10/20/50 (seed 0). For each SNR
vae-gmm is trained (default configuration), then three estimates of the same voxels are
compared:

- vae-gmm's maps (its learned prior, its amortised and refined q, importance-sampled means);
- the exact posterior mean under vae-gmm's *learned* prior (the learned mixture handed to
  :func:`mixmap.evaluation.bayes_reference` as if it were the truth): what a perfect posterior
  would give with the prior vae-gmm learned;
- the exact posterior mean under the *true* prior (the Bayes-optimal reference).

The first gap is the inference's, the second the prior learning's. To tell whether the data
could have taught the true prior, the log evidence log p(x) = log ∫ p(x|D,K) p(D,K) of the
CSF-like cluster's voxels is integrated on a grid under both priors (S0 = 1 known, as in the
simulation): if the data prefer the true prior, a better prior-learning step can find it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.special import logsumexp

from mixmap.evaluation.bayes import _log_prior, bayes_reference
from mixmap.fitting import get_fitter
from mixmap.fitting.base import Scheme
from mixmap.models import get_model
from mixmap.paper.report import machine_description, markdown_table, update_section
from mixmap.simulation import Cluster, Preset, get_preset, simulate

ROOT = Path(__file__).resolve().parents[1]
PRESET = "paper-msdki"


def learned_preset(fitter) -> Preset:
    """vae-gmm's learned mixture prior as a preset (its Gaussians live in the bounded D and K,
    as the preset's do; S0 is left at 1)."""
    prior = fitter.net.prior
    if prior.analytic:
        raise ValueError("the prior must live in bounded coordinates (prior_space='bounded')")
    names = [p.name for p in fitter.model.parameters]
    pi = prior.log_pi().exp().detach().cpu().numpy()
    mu = prior.mu.detach().cpu().numpy()
    sd = prior.log_std.exp().detach().cpu().numpy()
    cols = {n: names.index(n) for n in ("D", "K")}
    return Preset("vae-gmm-learned", fitter.model.name, tuple(
        Cluster(f"component {k}", float(pi[k]), {n: float(mu[k, i]) for n, i in cols.items()},
                {n: float(sd[k, i]) for n, i in cols.items()}) for k in range(len(pi))))


def log_evidence(signals, acquisition, presets: list[Preset], sigma: float,
                 step: float) -> list[np.ndarray]:
    """log p(x) per voxel under each preset's prior, up to a constant shared by all priors
    (the likelihood on the grid is computed once for all of them): Gaussian noise on the
    direction-averaged shell means (the fitters' reduced scheme), S0 = 1, the preset's prior
    (the truncated mixture of :func:`mixmap.evaluation.bayes_reference`), integrated on a grid of
    the given step over the bounds of D and K (rectangle rule)."""
    model = get_model(presets[0].model)
    names = ["D", "K"]
    axes = [np.linspace(p.lower, p.upper, int(round((p.upper - p.lower) / step)) + 1)
            for p in map(model.parameter, names)]
    grid = [a.ravel() for a in np.meshgrid(*axes, indexing="ij")]
    log_priors = [_log_prior(p, names, grid, model) + 2 * np.log(step) for p in presets]
    scheme = Scheme.build(model, acquisition, True, "cpu")
    params = {n: torch.as_tensor(x) for n, x in zip(names, grid, strict=True)}
    params["S0"] = torch.ones_like(params["D"])
    model_signal = model.forward(params, scheme.work).numpy()  # (grid, shells)
    counts = scheme.weights.numpy()
    out: list[list[np.ndarray]] = [[] for _ in presets]
    for start in range(0, signals.shape[0], 500):
        means, _ = scheme.working_signals(torch.as_tensor(signals[start:start + 500],
                                                          dtype=torch.float64))
        ll = np.zeros((means.shape[0], model_signal.shape[0]))
        for g in range(model_signal.shape[1]):
            ll -= counts[g] * (means[:, g, None].numpy() - model_signal[:, g]) ** 2 / (
                2 * sigma**2)
        for parts, log_prior in zip(out, log_priors, strict=True):
            parts.append(logsumexp(ll + log_prior, 1))
    return [np.concatenate(parts) for parts in out]


def rmse(est, truth, sel) -> float:
    return float(np.sqrt(np.mean((est[sel] - truth[sel]) ** 2)))


def run_snr(snr: float, n_voxels: int, seed: int) -> dict:
    sim = simulate(PRESET, "hcp", snr=snr, n_voxels=n_voxels, seed=seed)
    truth_preset = get_preset(PRESET)
    fitter = get_fitter("vae-gmm", "msdki", seed=seed)
    t = time.perf_counter()
    res = fitter.fit(sim.signals, sim.acquisition)
    fit_s = time.perf_counter() - t
    learned = learned_preset(fitter)
    sigma = 1.0 / snr
    estimates = {
        "vae-gmm": res.params,
        "posterior mean, learned prior": bayes_reference(sim.signals, sim.acquisition,
                                                         learned, sigma),
        "posterior mean, true prior (Bayes)": bayes_reference(sim.signals, sim.acquisition,
                                                              truth_preset, sigma),
    }
    names = [c.name for c in truth_preset.clusters]
    groups = {"all": np.ones(sim.labels.shape, bool)}
    groups.update({n: sim.labels == i for i, n in enumerate(names)})
    table = {row: {f"{p} {g}": rmse(est[p], sim.truth[p], sel) for p in ("D", "K")
                   for g, sel in groups.items()} for row, est in estimates.items()}
    csf = groups[names[-1]]
    evidence = {}
    for step in (0.02, 0.01):
        ev_true, ev_learned = log_evidence(sim.signals[csf], sim.acquisition,
                                           [truth_preset, learned], sigma, step)
        evidence[str(step)] = float(np.mean(ev_true - ev_learned))
    prior = [{"weight": c.weight, "mean": c.mean, "std": c.std} for c in learned.clusters]
    return {"snr": snr, "rmse": table, "evidence_gain_per_voxel": evidence,
            "n_csf": int(csf.sum()), "learned_prior": prior, "fit_s": fit_s,
            "epochs": len(res.history)}


def _describe(preset: Preset) -> str:
    return "; ".join(
        f"{c.name} π {w:.2f}, D {c.mean['D']:.2f} ± {c.std['D']:.2f}, K {c.mean['K']:.2f} ± "
        f"{c.std['K']:.2f}" for c, w in zip(preset.clusters, preset.weights, strict=True))


def section(results: list[dict], n_voxels: int,
            command: str = "python benchmarks/prior_gap.py") -> str:
    cols = ["D all", "D WM", "D GM", "D CSF", "K all", "K WM", "K GM", "K CSF"]
    parts = [
        "## Where vae-gmm loses to Bayes: the learned prior or the posterior\n",
        f"Produced by `{command}` on {machine_description()}: "
        f"{PRESET}, HCP scheme, Gaussian noise, {n_voxels:,} voxels, default vae-gmm (seed 0). "
        "RMSE of three estimates of the same voxels: vae-gmm's maps (after its empirical-Bayes "
        "refit of the prior); the exact posterior mean "
        "(grid integration, `mixmap.evaluation.bayes_reference`) under the prior vae-gmm "
        "*learned*; the exact posterior mean under the *true* prior (Bayes-optimal). The "
        "first gap is the inference's (amortised, refined Gaussian q and importance "
        "sampling), the second the prior learning's.\n",
    ]
    for r in results:
        rows = [[name] + [f"{vals[c]:.3f}" for c in cols] for name, vals in r["rmse"].items()]
        ev = r["evidence_gain_per_voxel"]
        lp = "; ".join(
            f"π {c['weight']:.2f}, D {c['mean']['D']:.2f} ± {c['std']['D']:.2f}, "
            f"K {c['mean']['K']:.2f} ± {c['std']['K']:.2f}"
            for c in sorted(r["learned_prior"], key=lambda c: c["mean"]["D"]))
        parts += [
            f"**SNR {r['snr']:g}** (vae-gmm: {r['epochs']} epochs, {r['fit_s']:.0f} s)\n",
            markdown_table(["estimate"] + cols, rows), "",
            f"Learned prior: {lp}. True prior: {_describe(get_preset(PRESET))}.\n",
            f"Log evidence of the {r['n_csf']:,} CSF-like voxels, true prior minus learned "
            f"prior: {ev['0.02']:+.3f} nats per voxel on a 0.02 grid, {ev['0.01']:+.3f} on a "
            "0.01 grid (positive: the data prefer the true prior).\n",
        ]
    parts.append("**Reading** (computed from the tables above):\n")
    for r in results:
        t = r["rmse"]
        ours, learned, bayes = (t[k] for k in t)
        for p in ("D", "K"):
            a, b, c = ours[f"{p} all"], learned[f"{p} all"], bayes[f"{p} all"]
            parts.append(
                f"- SNR {r['snr']:g}, {p}: vae-gmm {a:.3f} is {a / c:.2f}× Bayes ({c:.3f}). "
                f"The exact posterior mean under vae-gmm's own learned prior reaches {b:.3f}, "
                f"so the posterior estimate costs {a / b:.2f}× and the learned prior "
                f"{b / c:.2f}×.")
    truth = {c.name: c for c in get_preset(PRESET).clusters}
    tissue, widths = [], []
    for r in results:
        ours, bayes = r["rmse"]["vae-gmm"], r["rmse"]["posterior mean, true prior (Bayes)"]
        tissue += [ours[k] / bayes[k] for k in ("D WM", "D GM", "K GM")]
        csf = max(r["learned_prior"], key=lambda c: c["mean"]["D"])
        widths.append({p: csf["std"][p] / truth["CSF"].std[p] for p in ("D", "K")})
    gains = [r["evidence_gain_per_voxel"]["0.02"] for r in results]
    k_wm = [r["rmse"]["vae-gmm"]["K WM"] / r["rmse"]["posterior mean, true prior (Bayes)"][
        "K WM"] for r in results]
    parts.append(
        "\nBoth grid estimates know S0 = 1 (the simulation's), while vae-gmm infers it: a small "
        "advantage for them. The data prefer the true prior to the learned one by "
        f"{min(gains):+.3f} to {max(gains):+.3f} nats per CSF-like voxel (0.02 grid). In the "
        "tissue clusters "
        f"vae-gmm is within {max(tissue):.2f}× of the floor for D and for K in grey matter "
        f"(K in white matter: {min(k_wm):.1f}–{max(k_wm):.1f}×); the rest of the gap is the "
        "CSF-like cluster, where the likelihood is a long D–K ridge. There the learned "
        f"component's spread is {min(w['D'] for w in widths):.1f}–"
        f"{max(w['D'] for w in widths):.1f}× the truth's in D and "
        f"{min(w['K'] for w in widths):.1f}–{max(w['K'] for w in widths):.1f}× in K.\n")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snr", type=float, nargs="+", default=[10.0, 20.0, 50.0])
    ap.add_argument("--voxels", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true",
                    help="rewrite the section from docs/prior_gap.json without fitting")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.reuse:
        results = json.loads((ROOT / "docs" / "prior_gap.json").read_text())
        update_section(ROOT / "docs" / "RESULTS.md", "prior-gap",
                       section(results, args.voxels))
        return
    results = []
    for snr in args.snr:
        results.append(run_snr(snr, args.voxels, seed=0))
        print(json.dumps(results[-1]["rmse"], indent=1), results[-1]["evidence_gain_per_voxel"],
              flush=True)
    (ROOT / "docs" / "prior_gap.json").write_text(json.dumps(results, indent=1))
    command = " ".join(["python benchmarks/prior_gap.py", *sys.argv[1:]])
    update_section(ROOT / "docs" / "RESULTS.md", "prior-gap",
                   section(results, args.voxels, command))


if __name__ == "__main__":
    main()
