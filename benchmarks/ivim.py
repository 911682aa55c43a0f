"""IVIM: every method against dipy's IVIM and the Bayes-optimal reference, per tissue class.

    python benchmarks/ivim.py                     # SNR 10, 20, 50; rewrites docs/ivim.json and
                                                  # the "ivim" section of RESULTS.md
    python benchmarks/ivim.py --snrs 20 --methods lsq vae-gmm   # a subset; merged
    python benchmarks/ivim.py --section-only

The preset ``ivim-body`` (liver-, kidney- and spleen-like clusters, :mod:`mixmap.simulation`) on
the clinical IVIM scheme (2 b=0 and 13 b-values 10-1000 s/mm² × 3 directions), Rician noise at
the b0 SNR shown. Methods: dipy's ``IvimModel`` (the two-stage trust-region fit, ``trr``),
mixmap's lsq, ssl (the paper-style voxelwise network: IVIM-NET's regime), vae and vae-gmm, and the
Bayes reference (:func:`mixmap.evaluation.bayes.bayes_reference`: the posterior mean under the
true prior, on a 3-D grid; no method beats it on average). Where D* is identifiable at all is
read from the reference's posterior: its sd over the cluster's prior sd (near 1: the data say
nothing about D* there, and every method's D* is its prior).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms import keep_entry  # noqa: E402  (results merged as the phantoms benchmark does)

from mixmap.evaluation.bayes import bayes_reference  # noqa: E402
from mixmap.fitting import get_fitter  # noqa: E402
from mixmap.paper.report import machine_description, markdown_table, update_section  # noqa: E402
from mixmap.simulation import get_preset, simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "ivim.json"
RESULTS = ROOT / "docs" / "RESULTS.md"
PRESET = "ivim-body"
SNRS = (10, 20, 50)
METHODS = ("dipy", "lsq", "ssl", "vae", "vae-gmm")
PARAMS = ("f", "D", "Dstar")
N_VOXELS = 2000


def dipy_ivim(signals: np.ndarray, acq) -> dict[str, np.ndarray]:
    """dipy's IVIM (``trr``) maps: f, D and D* in µm²/ms."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.ivim import IvimModel

    # mixmap keeps no direction for b ≤ 50 s/mm² (b=0 for the other diffusion models); the
    # IVIM signal does not depend on it, but dipy wants a unit vector for every b > 0
    bvecs = acq.bvecs.copy()
    bvecs[(acq.bvals > 0) & (np.linalg.norm(bvecs, axis=1) < 0.5)] = (1.0, 0.0, 0.0)
    gtab = gradient_table(acq.bvals * 1000.0, bvecs=bvecs, b0_threshold=0)
    # dipy's trust-region steps are scaled for S0 ~ 1000 (its x_scale): at S0 = 1 it returned
    # negative f and NaN; the maps do not depend on the scale otherwise
    fit = IvimModel(gtab, fit_method="trr").fit(1000.0 * signals.astype(np.float64))
    return {"f": np.asarray(fit.perfusion_fraction, np.float64),
            "D": np.asarray(fit.D, np.float64) * 1000.0,
            "Dstar": np.asarray(fit.D_star, np.float64) * 1000.0}


def score(est: dict, truth: dict, labels: np.ndarray, names: list[str]) -> dict:
    """Per parameter: RMSE, median absolute error, and RMSE per cluster."""
    out = {}
    for p in PARAMS:
        err = np.asarray(est[p], np.float64) - truth[p]
        ok = np.isfinite(err)
        out[p] = {"rmse": float(np.sqrt(np.mean(err[ok] ** 2))),
                  "median_abs": float(np.median(np.abs(err[ok]))), "n_nan": int((~ok).sum()),
                  "classes": {c: float(np.sqrt(np.mean(err[ok & (labels == k)] ** 2)))
                              for k, c in enumerate(names)}}
    return out


def identifiability(ref: dict, labels: np.ndarray, names: list[str]) -> dict:
    """Per cluster and parameter: the median of the reference's posterior sd over the
    cluster's prior sd."""
    preset = get_preset(PRESET)
    return {c.name: {p: float(np.median(ref[f"{p}:std"][labels == k]) / c.std[p])
                     for p in PARAMS} for k, c in enumerate(preset.clusters)}


def run(snr: float, methods, seed: int = 0) -> dict:
    sim = simulate(PRESET, snr=snr, noise="rician", n_voxels=N_VOXELS, seed=seed)
    names = sim.class_names
    entry = {"snr": snr, "n_voxels": int(sim.signals.shape[0]),
             "n_measurements": int(sim.acquisition.n), "methods": {}}
    t = time.perf_counter()
    ref = bayes_reference(sim.signals, sim.acquisition, PRESET, sim.sigma, "rician",
                          return_std=True)
    entry["methods"]["bayes"] = {"seconds": time.perf_counter() - t,
                                 "params": score(ref, sim.truth, sim.labels, names)}
    entry["identifiability"] = identifiability(ref, sim.labels, names)
    for m in methods:
        print(f"  SNR {snr:g}: {m}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        if m == "dipy":
            est = dipy_ivim(sim.signals, sim.acquisition)
        else:
            opts = {} if m == "lsq" else {"seed": seed}
            est = get_fitter(m, "ivim", **opts).fit(sim.signals, sim.acquisition).params
        entry["methods"][m] = {"seconds": time.perf_counter() - t,
                               "params": score(est, sim.truth, sim.labels, names)}
    return entry


def section(results: dict) -> str:
    names = [c.name for c in get_preset(PRESET).clusters]
    body = ["## IVIM: mixmap against dipy and the Bayes reference", "",
            "Regenerate: `python benchmarks/ivim.py` (docs/ivim.json). Preset `ivim-body` ("
            + get_preset(PRESET).description + f"), {N_VOXELS} voxels, clinical IVIM scheme, "
            "Rician noise at the b0 SNR shown. RMSE of f (1), D and D* (µm²/ms = 10⁻³ mm²/s); "
            "`bayes` is the posterior mean under the true prior and noise (a floor, not a "
            "method). dipy: `IvimModel(fit_method='trr')`. Every mixmap method at its defaults. "
            f"Times on {machine_description()}, one run each, in one process.", ""]
    for key in sorted(results, key=float):
        e = results[key]
        head = ["method", "seconds", *(f"{p} {c}" for p in PARAMS for c in ["all", *names])]
        rows = []
        for m, r in e["methods"].items():
            cells = []
            for p in PARAMS:
                s = r["params"][p]
                cells += [s["rmse"], *(s["classes"][c] for c in names)]
            rows.append([m, f"{r['seconds']:.1f}", *cells])
        body += [f"### b0 SNR {e['snr']:g}", "", markdown_table(head, rows, floatfmt=".4f"), ""]
        ident = e["identifiability"]
        body.append("Posterior sd / prior sd of the Bayes reference (near 1: the data do not "
                    "determine it): " + "; ".join(
                        f"{c}: " + ", ".join(f"{p} {v:.2f}" for p, v in ident[c].items())
                        for c in names) + ".")
        ms = e["methods"]
        if "vae-gmm" in ms and "lsq" in ms:
            worse = [f"{p} {c}" for p in PARAMS for c in names
                     if ms["vae-gmm"]["params"][p]["classes"][c]
                     > ms["lsq"]["params"][p]["classes"][c]]
            body.append("vae-gmm worse than lsq in: " + (", ".join(worse) or "none") + ".")
        body.append("")
    return "\n".join(body).rstrip() + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snrs", nargs="+", type=float, default=list(SNRS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--section-only", action="store_true")
    args = ap.parse_args(argv)
    results = json.loads(JSON.read_text()) if JSON.exists() else {}
    if not args.section_only:
        for snr in args.snrs:
            e = run(snr, args.methods)
            keep_entry(results, f"{snr:g}", e, JSON)
    update_section(RESULTS, "ivim", section(results))


if __name__ == "__main__":
    main()
