"""Do the uncertainty maps mean what they say? Coverage of the reported standard deviations.

    python benchmarks/calibration.py                 # HCP SNR 10 20 50, clinical SNR 20
    python benchmarks/calibration.py --cases hcp:20  # one case
    python benchmarks/calibration.py --render        # rewrite the section from the JSON

Every fitter writes a ``_desc-std`` map next to each parameter map: lsq its asymptotic
(Cramér-Rao) standard deviation at the estimate, vae and vae-gmm the posterior standard
deviation. On simulated ``paper-msdki`` scans (10,000 voxels, Gaussian noise, seed 0) this
scores them against the truth with :func:`mixmap.evaluation.scores.metrics` (``std``): the RMS
of the reported sd next to the RMSE (equal where the sd is right on average), and the share of
voxels whose true value lies within ±1 sd and ±1.96 sd of the estimate (68.3 % and 95 % for a
calibrated Gaussian posterior). The Bayes-optimal reference's posterior sd (the true prior,
:func:`mixmap.evaluation.bayes_reference`) is scored alike: its coverage is the mark where
posteriors are not Gaussian (bounds, the CSF-like voxels' D–K ridge). Default configurations,
seed 0; results go to ``docs/calibration.json`` (entries replaced per case) and the
``calibration`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learned_variants import parse_run_args, replace_entries  # noqa: E402

from mixmap.evaluation import bayes_reference, metrics  # noqa: E402
from mixmap.fitting import get_fitter  # noqa: E402
from mixmap.paper.report import machine_description, markdown_table, update_section  # noqa: E402
from mixmap.simulation import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "calibration.json"
PRESET, VOXELS, SEED = "paper-msdki", 10_000, 0
METHODS = ("lsq", "vae", "vae-gmm")
CASES = ("hcp:10", "hcp:20", "hcp:50", "clinical:20")
PARAMS = ("D", "K")


def run(case: str) -> dict:
    scheme, snr = case.split(":")
    sim = simulate(PRESET, scheme, snr=float(snr), n_voxels=VOXELS, seed=SEED)
    names = [c.name for c in sim.preset.clusters]
    out = {"case": case, "scheme": scheme, "snr": float(snr), "preset": PRESET,
           "n_voxels": VOXELS, "seed": SEED, "clusters": names, "methods": {}}
    for method in METHODS:
        t = time.perf_counter()
        r = get_fitter(method, "msdki", seed=SEED, quiet=True).fit(sim.signals, sim.acquisition)
        out["methods"][method] = {
            "metrics": metrics(r.params, sim.truth, sim.labels, names, list(PARAMS), r.std),
            "seconds": time.perf_counter() - t}
    t = time.perf_counter()
    b = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma, return_std=True)
    out["methods"]["bayes"] = {
        "metrics": metrics(b, sim.truth, sim.labels, names, list(PARAMS),
                           {p: b[f"{p}:std"] for p in PARAMS}),
        "seconds": time.perf_counter() - t}
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def section(results: list[dict], command: str) -> str:
    parts = [
        "## Uncertainty maps: do the reported standard deviations cover the truth?\n",
        f"Produced by `{command}` on {machine_description()}. `{PRESET}`, {VOXELS:,} voxels, "
        "Gaussian noise, seed 0, default configurations. Each fitter's `_desc-std` map (lsq: "
        "asymptotic Cramér-Rao sd at the estimate; vae, vae-gmm: posterior sd) is scored against "
        "the truth by `mixmap.evaluation.scores.metrics` (the same numbers `mixmap evaluate` "
        "prints for a fit folder): 'sd (RMS)' next to the RMSE (equal where the sd is right on "
        "average) and "
        "the share of voxels whose true value lies within ±1 sd and ±1.96 sd of the estimate "
        "(68.3 % and 95 % for a calibrated Gaussian posterior). `bayes` is the exact posterior "
        "under the true prior: its coverage is the mark where posteriors are not Gaussian "
        "(bounds, the CSF-like voxels' D–K ridge). lsq's asymptotic sd grows without bound "
        "where the data leave a direction free (its Fisher information is singular along the "
        "CSF-like ridge), so a few voxels set its RMS: read its coverage. Raw numbers: "
        "`docs/calibration.json`.\n",
    ]
    order = {c: i for i, c in enumerate(CASES)}
    for r in sorted(results, key=lambda r: order.get(r["case"], 99)):
        parts.append(f"**{r['scheme']} scheme, SNR {r['snr']:g}**\n")
        rows = []
        for method in (*METHODS, "bayes"):
            if method not in r["methods"]:
                continue
            for p in PARAMS:
                m = r["methods"][method]["metrics"][p]
                a = m["all"]
                rows.append([method, p, f"{a['rmse']:.4f}", f"{a['sd_rms']:.4f}",
                             _pct(a["coverage_68"]), _pct(a["coverage_95"])]
                            + [_pct(m["clusters"][c]["coverage_95"]) for c in r["clusters"]])
        parts.append(markdown_table(
            ["method", "param", "RMSE", "sd (RMS)", "within ±1 sd", "within ±1.96 sd"]
            + [f"±1.96 sd, {c}" for c in r["clusters"]], rows))
        parts.append("")
    parts.append(_summary(results))
    return "\n".join(parts) + "\n"


def _summary(results: list[dict]) -> str:
    """One line per method: the range of its 95 % coverage over cases, parameters and
    clusters, and of its sd (RMS) / RMSE overall."""
    lines = []
    for method in (*METHODS, "bayes"):
        cov, ratio = [], []
        for r in results:
            if method not in r["methods"]:
                continue
            for p in PARAMS:
                m = r["methods"][method]["metrics"][p]
                cov += [m["all"]["coverage_95"]] + [m["clusters"][c]["coverage_95"]
                                                     for c in r["clusters"]]
                ratio.append(m["all"]["sd_rms"] / m["all"]["rmse"])
        cov = [c for c in cov if c is not None]
        if cov:
            lines.append(f"- {method}: ±1.96 sd covers {100 * min(cov):.1f}–{100 * max(cov):.1f} % "
                         f"of the true values (over cases, D and K, all voxels and each cluster); "
                         f"sd (RMS) / RMSE {min(ratio):.2f}–{max(ratio):.2f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES),
                    help="scheme:SNR, scheme hcp or clinical")
    args, results = parse_run_args(ap, OUT)
    if not args.render:
        for case in args.cases:
            r = run(case)
            print(case, {m: v["metrics"]["D"]["all"]["coverage_95"]
                         for m, v in r["methods"].items()}, flush=True)
            results = replace_entries(OUT, [r], lambda e: e["case"])
    order = {c: i for i, c in enumerate(CASES)}
    cases = " ".join(sorted((r["case"] for r in results), key=lambda c: order.get(c, 99)))
    update_section(ROOT / "docs" / "RESULTS.md", "calibration",
                   section(results, f"python benchmarks/calibration.py --cases {cases}"))


if __name__ == "__main__":
    main()
