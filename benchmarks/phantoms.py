"""Realistic phantoms from the two example brain scans: every method against the empirical floor,
per tissue class.

    python benchmarks/phantoms.py                 # every phantom; rewrites docs/phantoms.json
                                                  # and the "phantoms" section of RESULTS.md
    python benchmarks/phantoms.py --scans b1k_b2k --models msdki --snrs 20   # a subset; merged
    python benchmarks/phantoms.py --section-only  # the section from docs/phantoms.json

Each phantom (:func:`mixmap.simulation.phantom.phantom_like`): the truth is mixmap's lsq fit
of the scan smoothed by 1 voxel, on the scan's own acquisition (``multishell_b6k_max`` cut to
b ≤ 3000 s/mm² for MSDKI), mask and affine, Rician noise at a b0 SNR of 10, 20 or 40 (relative
to the truth's median S0); voxels labelled white-matter-like, grey-matter-like or CSF-like by
a tensor fit of the real scan. Every method is fitted with its default settings; dipy's MSDKI
where the model is MSDKI. Scored: RMSE overall and per class, bias, the coverage of ±1.96 sd
(where the method reports an sd), sharpness (mean in-plane gradient magnitude of the map over
that of the truth, interior voxels), seconds. The floor is the empirical floor
(:func:`mixmap.evaluation.floor.empirical_floor`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mixmap import datasets
from mixmap.evaluation.floor import SEPARABLE_ATOMS, empirical_floor
from mixmap.fitting import get_fitter
from mixmap.models import get_model
from mixmap.paper.report import machine_description, markdown_table, update_section
from mixmap.simulation.phantom import CLASS_NAMES, phantom_like

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "phantoms.json"
RESULTS = ROOT / "docs" / "RESULTS.md"
SCANS = ("b1k_b2k", "multishell_b6k_max")
MODELS = ("msdki", "ball-stick")
SNRS = (10, 20, 40)
METHODS = ("dipy", "lsq", "ssl", "vae", "vae-gmm-mixture", "vae-gmm")
#: Benchmark names that are a method with other settings: vae-gmm's maps from its Gaussian
#: mixture prior alone (without the non-parametric grid prior it ends with by default).
VARIANTS = {"vae-gmm-mixture": ("vae-gmm", {"grid_posterior": "off"})}
#: The parameters scored per model (S0 is a nuisance; directions get their own table).
SCORED = {"msdki": ("D", "K"), "ball-stick": ("f", "Dpar", "Diso")}
#: MSDKI on the multi-shell scan keeps b ≤ 3000 s/mm² (the model's validity range).
MAX_B = {("multishell_b6k_max", "msdki"): 3000.0}


def sharpness(values: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean in-plane gradient magnitude of ``values`` over that of ``truth`` (rows in C order
    of ``mask``), over voxels whose four in-plane neighbours are in the mask."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(mask, structure=np.array([[[0], [1], [0]], [[1], [1], [1]],
                                                     [[0], [1], [0]]], dtype=bool))

    def grad(v):
        vol = np.zeros(mask.shape)
        vol[mask] = v
        gx, gy = np.gradient(vol, axis=(0, 1))
        return np.hypot(gx, gy)[inner].mean()

    ok = np.isfinite(values)
    v = np.where(ok, values, truth)
    return float(grad(v) / max(grad(truth), 1e-12))


def score(est: dict, std: dict | None, truth: dict, labels: np.ndarray, mask: np.ndarray,
          params) -> dict:
    """Per parameter: rmse, bias, cov95, sharpness overall, and rmse, cov95 per class."""
    out = {}
    for p in params:
        e = np.asarray(est[p], np.float64)
        t = np.asarray(truth[p], np.float64)
        err = e - t
        ok = np.isfinite(err)
        entry = {"rmse": float(np.sqrt(np.mean(err[ok] ** 2))), "bias": float(err[ok].mean()),
                 "n_nan": int((~ok).sum()), "sharpness": sharpness(e, t, mask), "classes": {}}
        sd = None if std is None or p not in std else np.asarray(std[p], np.float64)
        if sd is not None:
            entry["cov95"] = float(np.mean(np.abs(err[ok]) <= 1.96 * sd[ok]))
        for k, name in enumerate(CLASS_NAMES):
            sel = ok & (labels == k)
            c = {"n": int(sel.sum()), "rmse": float(np.sqrt(np.mean(err[sel] ** 2)))
                 if sel.any() else None}
            if sd is not None and sel.any():
                c["cov95"] = float(np.mean(np.abs(err[sel]) <= 1.96 * sd[sel]))
            entry["classes"][name] = c
        out[p] = entry
    return out


def run_phantom(scan: str, model: str, snr: float, methods, seed: int = 0) -> dict:
    """Make one phantom, fit every method, score it and the floor."""
    from mixmap.paper.demo import dipy_msdki

    paths = datasets.fetch(scan)
    t = time.perf_counter()
    sim = phantom_like(paths["dwi"], paths["bvals"], paths["bvecs"], paths["mask"], model,
                       snr=snr, noise="rician", seed=seed, max_b=MAX_B.get((scan, model)))
    made = time.perf_counter() - t
    params = SCORED[model]
    entry = {"scan": scan, "model": model, "snr": snr, "noise": "rician",
             "sigma": sim.sigma, "n_voxels": int(sim.signals.shape[0]),
             "n_measurements": int(sim.acquisition.n), "max_b": MAX_B.get((scan, model)),
             "classes": sim.info["tissue_classes"]["counts"], "seconds_phantom": made,
             "methods": {}}
    t = time.perf_counter()
    floor = empirical_floor(sim.signals, sim.acquisition, model, sim.truth, sim.sigma,
                            "rician", seed=seed)
    entry["methods"]["floor"] = {
        "seconds": time.perf_counter() - t, "ess_median": float(np.median(floor["ess"])),
        "params": score(floor, {p: floor[f"{p}:std"] for p in params}, sim.truth, sim.labels,
                        sim.mask, params)}
    for m in methods:
        if m == "dipy" and model != "msdki":
            continue
        print(f"  {scan} {model} SNR {snr:g}: {m}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        if m == "dipy":
            est, std = dipy_msdki(sim.signals, sim.acquisition), None
            if est is None:
                continue
        else:
            method, opts = VARIANTS.get(m, (m, {}))
            opts = {} if m == "lsq" else {**opts, "seed": seed}
            if "grid_posterior" in opts and model != "msdki":
                continue  # the same as vae-gmm where no grid applies
            res = get_fitter(method, get_model(model), **opts).fit(sim.signals,
                                                                   sim.acquisition)
            est, std = res.params, (res.std or None)
        entry["methods"][m] = {"seconds": time.perf_counter() - t,
                               "params": score(est, std, sim.truth, sim.labels, sim.mask,
                                               params)}
    return entry


def key(e: dict) -> str:
    return f"{e['scan']}|{e['model']}|{e['snr']:g}"


def _rows(e: dict) -> list:
    rows = []
    for m, r in e["methods"].items():
        for p, s in r["params"].items():
            cl = s["classes"]
            cov = [c.get("cov95") for c in cl.values() if c.get("cov95") is not None]
            rows.append([m, p, s["rmse"], *(cl[c]["rmse"] for c in CLASS_NAMES), s["bias"],
                         s.get("cov95"), min(cov) if cov else None, s["sharpness"],
                         r["seconds"]])
    return rows


#: A floor whose voxels rest on fewer effective atoms than this (median) is not resolved: its
#: posterior means are a few atoms' values, not a bound (ball-stick: the atoms' directions and
#: S0 rarely match a voxel's, so 2,000 × 16 atoms leave about 1.5).
RESOLVED_ESS = 10


def floor_resolved(e: dict) -> bool:
    return e["methods"]["floor"]["ess_median"] >= RESOLVED_ESS


def goal_lines(e: dict) -> list[str]:
    """The issue's goal lines for vae-gmm on this phantom, measured."""
    ms = e["methods"]
    if "vae-gmm" not in ms or "lsq" not in ms:
        return []
    g, lsq, fl = ms["vae-gmm"]["params"], ms["lsq"]["params"], ms["floor"]["params"]
    ratio = {p: g[p]["rmse"] / fl[p]["rmse"] for p in g}
    worse = [f"{p} {c} ({g[p]['classes'][c]['rmse']:.3f} vs {lsq[p]['classes'][c]['rmse']:.3f})"
             for p in g for c in CLASS_NAMES
             if g[p]["classes"][c]["rmse"] is not None
             and g[p]["classes"][c]["rmse"] > lsq[p]["classes"][c]["rmse"]]
    cover = [f"{p} {c} {g[p]['classes'][c]['cov95']:.0%}" for p in g for c in CLASS_NAMES
             if g[p]["classes"][c].get("cov95") is not None
             and not 0.90 <= g[p]["classes"][c]["cov95"] <= 0.97]
    sharp = [f"{p} {g[p]['sharpness']:.2f}" for p in g if not 0.9 <= g[p]["sharpness"] <= 1.1]
    floor = ("vae-gmm / floor RMSE: " + ", ".join(f"{p} {r:.2f}" for p, r in ratio.items())
             + (" (goal ≤ 1.1: met)" if max(ratio.values()) <= 1.1
                else " (goal ≤ 1.1: **not met**)")) if floor_resolved(e) else (
        f"floor **not resolved** (median {ms['floor']['ess_median']:.1f} effective atoms): "
        "its numbers are not a bound here, and the 1.1× goal cannot be judged")
    return [
        floor,
        "vae-gmm worse than lsq in: " + (", ".join(worse) if worse else "none"),
        "vae-gmm ±1.96 sd coverage outside 90–97 %: " + (", ".join(cover) if cover else "none"),
        "vae-gmm sharpness outside 0.9–1.1: " + (", ".join(sharp) if sharp else "none"),
    ]


#: The phantom the README's headline quotes.
HEADLINE = "b1k_b2k|msdki|20"


def headline(results: dict) -> list[str]:
    """A compact table of the headline phantom: RMSE of D and K overall and per class."""
    e = results.get(HEADLINE)
    if e is None:
        return []
    head = ["method", "time (s)", *(f"D {c}" for c in ("all", "WM", "GM", "CSF")),
            *(f"K {c}" for c in ("all", "WM", "GM", "CSF"))]
    rows = []
    for m in ("floor", "dipy", "lsq", "vae-gmm-mixture", "vae-gmm"):
        if m not in e["methods"]:
            continue
        r = e["methods"][m]
        cells = []
        for p in ("D", "K"):
            s = r["params"][p]
            cells += [s["rmse"], *(s["classes"][c]["rmse"] for c in CLASS_NAMES)]
        rows.append([m, f"{r['seconds']:.0f}", *cells])
    return [f"Headline (README): {e['scan']}, MSDKI, b0 SNR {e['snr']:g}, Rician; RMSE, D in "
            "µm²/ms.", "", markdown_table(head, rows, floatfmt=".4f"), ""]


def section(results: dict) -> str:
    head = ["method", "param", "RMSE", *(f"RMSE {c}" for c in CLASS_NAMES), "bias",
            "±1.96 sd cov.", "min cov. (class)", "sharpness", "seconds"]
    body = [
        "Regenerate: `python benchmarks/phantoms.py` (docs/phantoms.json). Phantoms of the two "
        "example brain scans (`mixmap simulate --like`): truth = mixmap's lsq fit of the scan "
        "smoothed by 1 voxel, the scan's acquisition (multishell_b6k_max cut to b ≤ 3000 s/mm² "
        "for MSDKI), mask and affine; Rician noise at the b0 SNR shown (median S0 of the truth "
        "/ σ). Classes from a tensor fit of the real scan (CSF-like MD ≥ 1.5 µm²/ms, "
        "white-matter-like FA ≥ 0.3, grey-matter-like otherwise). Every method at its default "
        "settings. `floor`: the empirical floor, the posterior mean under the empirical "
        "distribution of the truth (leave-one-out, kernel-smoothed atoms; "
        f"every voxel's truth × 16 kernel copies for MSDKI; {SEPARABLE_ATOMS} voxels' × 16 for "
        "ball-stick, whose Rician term cannot be tabulated: so few of those atoms match a "
        "voxel's direction and S0 that its floor is not resolved, and is marked so); on the "
        "paper preset it lies 3–8 % above the exact grid reference, so it is a slightly loose "
        "floor "
        "(tests/test_phantoms.py). Sharpness: mean in-plane gradient magnitude of the map "
        "over the truth's (1 = as sharp as the truth). "
        f"Times on {machine_description()}, one run each, with other jobs on the machine at "
        "times: indicative only.",
        "",
        *headline(results),
    ]
    for k in sorted(results):
        e = results[k]
        cls = ", ".join(f"{c} {n}" for c, n in e["classes"].items())
        body += ["", f"### {e['scan']}, {e['model']}, b0 SNR {e['snr']:g} (Rician)", "",
                 f"{e['n_voxels']} voxels ({cls}), {e['n_measurements']} measurements"
                 + (f" (b ≤ {e['max_b']:g} s/mm²)" if e.get("max_b") else "")
                 + f"; floor: median effective atoms {e['methods']['floor']['ess_median']:.1f}"
                 + ("." if floor_resolved(e) else " (not resolved: not a bound)."),
                 "", markdown_table(head, _rows(e), floatfmt=".3f")]
        lines = goal_lines(e)
        if lines:
            body += [""] + [f"- {s}" for s in lines]
    missing = [f"{s} {m} SNR {n}" for s in SCANS for m in MODELS for n in SNRS
               if f"{s}|{m}|{n:g}" not in results]
    if missing:
        body += ["", "Not run yet: " + ", ".join(missing) + "."]
    return "\n".join(body)


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Median angle (degrees) between the axes a and b (n, 3); a zero vector counts as 90°."""
    cos = np.abs((a * b).sum(1)) / np.maximum(np.linalg.norm(a, axis=1)
                                             * np.linalg.norm(b, axis=1), 1e-12)
    return float(np.degrees(np.median(np.arccos(np.clip(cos, 0, 1)))))


def class_table_rows(e: dict, angle_key: str, angle_label: str) -> tuple[list[str], list]:
    """(head, rows) of a phantom entry's per-method, per-map table: RMSE overall and per
    tissue class, bias, coverage, sharpness, the median angle of its direction map
    (``angle_key`` of each method's record) and seconds."""
    head = ["method", "map", "RMSE", *(f"RMSE {c}" for c in CLASS_NAMES), "bias",
            "±1.96 sd cov.", "sharpness", f"{angle_label} angle (°)", "seconds"]
    rows = []
    for m, r in e["methods"].items():
        for p, s in r["params"].items():
            cl = s["classes"]
            rows.append([m, p, s["rmse"], *(cl[c]["rmse"] for c in CLASS_NAMES), s["bias"],
                         s.get("cov95"), s["sharpness"], r[angle_key], r["seconds"]])
    return head, rows


def keep_entry(results: dict, name: str, entry: dict, path: Path) -> None:
    """Store ``entry`` as ``results[name]``, its methods merged over those of an earlier run
    (a run of some methods keeps the others'), and rewrite the JSON file ``path``."""
    old = results.get(name, {}).get("methods", {})
    entry["methods"] = {**old, **entry["methods"]}
    results[name] = entry
    path.write_text(json.dumps(results, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", nargs="+", default=list(SCANS), choices=SCANS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--snrs", nargs="+", type=float, default=list(SNRS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--section-only", action="store_true")
    args = ap.parse_args(argv)
    results = json.loads(JSON.read_text()) if JSON.exists() else {}
    if not args.section_only:
        for scan in args.scans:
            for model in args.models:
                for snr in args.snrs:
                    e = run_phantom(scan, model, snr, args.methods)
                    keep_entry(results, key(e), e, JSON)
    update_section(RESULTS, "phantoms", section(results))


if __name__ == "__main__":
    main()
