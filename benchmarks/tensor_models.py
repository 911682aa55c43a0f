"""DTI and DKI against dipy, on the two example brain scans and on realistic phantoms of them.

    python benchmarks/tensor_models.py                 # everything; rewrites
                                                       # docs/tensor_models.json and the
                                                       # "tensor-models" section of RESULTS.md
    python benchmarks/tensor_models.py --models dti --parts real   # a subset; merged
    python benchmarks/tensor_models.py --section-only  # the section from the JSON

Real scans: every voxel of the mask fitted by mixmap (lsq, vae-gmm) and by dipy
(``TensorModel`` / ``DiffusionKurtosisModel``, WLS and NLLS); the median absolute difference of
FA, MD (and MK) between each mixmap map and dipy's NLLS (the same estimator as mixmap's lsq), and
each method's time, side by side in one process. DTI uses the volumes with b ≤ 1500 s/mm² (the
tensor's range; the multi-shell scan then has 9 directions), DKI those with b ≤ 3000 s/mm².

Phantoms (:func:`mixmap.simulation.phantom.phantom_like`): the truth is mixmap's lsq fit of the
scan smoothed by 1 voxel, on the scan's acquisition, Rician noise at b0 SNR 20; RMSE of each
derived map per tissue class (and the median angle of v1), for every method and the empirical
floor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms import (  # noqa: E402  (the phantoms benchmark's)
    RESOLVED_ESS,
    angle_deg,
    class_table_rows,
    keep_entry,
    score,
)

from mixmap import datasets  # noqa: E402
from mixmap.evaluation.floor import empirical_floor  # noqa: E402
from mixmap.fitting import get_fitter  # noqa: E402
from mixmap.io import load_dwi  # noqa: E402
from mixmap.paper.report import machine_description, markdown_table, update_section  # noqa: E402
from mixmap.simulation.phantom import CLASS_NAMES, phantom_like  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "tensor_models.json"
RESULTS = ROOT / "docs" / "RESULTS.md"
SCANS = ("b1k_b2k", "multishell_b6k_max")
MODELS = ("dti", "dki")
MAX_B = {"dti": 1500.0, "dki": 3000.0}
METHODS = ("dipy-WLS", "dipy-NLLS", "lsq", "vae-gmm")
#: The maps compared and scored per model.
MAPS = {"dti": ("fa", "md", "ad", "rd"), "dki": ("fa", "md", "mk", "ak", "rk")}
#: The maps the real-scan table compares with dipy.
COMPARED = {"dti": ("fa", "md"), "dki": ("fa", "md", "mk")}
PHANTOM_SNR = 20.0


def dipy_fit(model: str, method: str, signals: np.ndarray, acq) -> dict[str, np.ndarray]:
    """dipy's maps of ``signals`` (n, m): fa, md, ad, rd (µm²/ms), v1 and for DKI mk, ak, rk
    (directional kurtosis in [−3/7, 10], as mixmap keeps it)."""
    from dipy.core.gradients import gradient_table

    gtab = gradient_table(acq.bvals * 1000.0, bvecs=acq.bvecs, b0_threshold=1.0)
    data = signals.astype(np.float64)
    if model == "dti":
        from dipy.reconst.dti import TensorModel

        fit = TensorModel(gtab, fit_method=method).fit(data)
    else:
        from dipy.reconst.dki import DiffusionKurtosisModel

        fit = DiffusionKurtosisModel(gtab, fit_method=method).fit(data)
    out = {"fa": fit.fa, "md": fit.md * 1000.0, "ad": fit.ad * 1000.0,
           "rd": fit.rd * 1000.0, "v1": fit.evecs[..., :, 0]}
    if model == "dki":
        lim = {"min_kurtosis": -3.0 / 7.0, "max_kurtosis": 10.0}
        out.update(mk=fit.mk(**lim), ak=fit.ak(**lim), rk=fit.rk(**lim))
    return {k: np.nan_to_num(np.asarray(v, np.float64)) for k, v in out.items()}


def fit_all(model: str, signals: np.ndarray, acq, methods, seed: int = 0) -> dict:
    """name -> {"maps", "std", "seconds"} for every method, run one after another."""
    out = {}
    for m in methods:
        print(f"    {model}: {m} on {signals.shape[0]} voxels", file=sys.stderr, flush=True)
        t = time.perf_counter()
        if m.startswith("dipy-"):
            maps, std = dipy_fit(model, m[5:], signals, acq), None
        else:
            opts = {} if m == "lsq" else {"seed": seed}
            res = get_fitter(m, model, **opts).fit(signals, acq)
            maps, std = res.params, res.std
        out[m] = {"maps": maps, "std": std, "seconds": time.perf_counter() - t}
    return out


def run_real(scan: str, model: str, methods) -> dict:
    paths = datasets.fetch(scan)
    dwi = load_dwi(paths["dwi"], paths["bvals"], paths["bvecs"], paths["mask"],
                   max_b=MAX_B[model])
    y, acq = dwi.signals, dwi.acquisition
    fits = fit_all(model, y, acq, methods)
    ref = fits.get("dipy-NLLS")
    entry = {"scan": scan, "model": model, "n_voxels": int(y.shape[0]),
             "n_measurements": int(acq.n), "max_b": MAX_B[model], "methods": {}}
    for m, f in fits.items():
        row = {"seconds": f["seconds"]}
        if ref is not None and m != "dipy-NLLS":
            row["median_abs_diff"] = {p: float(np.median(np.abs(f["maps"][p] - ref["maps"][p])))
                                      for p in COMPARED[model]}
            row["v1_angle_deg"] = angle_deg(f["maps"]["v1"], ref["maps"]["v1"])
        row["median"] = {p: float(np.median(f["maps"][p])) for p in COMPARED[model]}
        entry["methods"][m] = row
    return entry


def run_phantom(scan: str, model: str, methods, snr: float = PHANTOM_SNR, seed: int = 0
                ) -> dict:
    paths = datasets.fetch(scan)
    sim = phantom_like(paths["dwi"], paths["bvals"], paths["bvecs"], paths["mask"], model,
                       snr=snr, noise="rician", seed=seed, max_b=MAX_B[model])
    from mixmap.evaluation.floor import derived_values
    from mixmap.models import get_model

    truth = {**sim.truth, **derived_values(get_model(model), sim.truth)}
    params = MAPS[model]
    entry = {"scan": scan, "model": model, "snr": snr, "n_voxels": int(sim.signals.shape[0]),
             "n_measurements": int(sim.acquisition.n), "max_b": MAX_B[model],
             "classes": sim.info["tissue_classes"]["counts"], "methods": {}}
    t = time.perf_counter()
    floor = empirical_floor(sim.signals, sim.acquisition, model, sim.truth, sim.sigma,
                            "rician", seed=seed)
    entry["methods"]["floor"] = {
        "seconds": time.perf_counter() - t, "ess_median": float(np.median(floor["ess"])),
        "params": score(floor, {p: floor[f"{p}:std"] for p in params}, truth, sim.labels,
                        sim.mask, params),
        "v1_angle_deg": angle_deg(floor["v1"], truth["v1"])}
    for m, f in fit_all(model, sim.signals, sim.acquisition, methods, seed).items():
        std = {p: f["std"][p] for p in params if p in f["std"]} if f["std"] else None
        entry["methods"][m] = {
            "seconds": f["seconds"],
            "params": score(f["maps"], std, truth, sim.labels, sim.mask, params),
            "v1_angle_deg": angle_deg(f["maps"]["v1"], truth["v1"])}
    return entry


def _real_table(entries: list[dict]) -> list[str]:
    head = ["scan", "model", "method", "seconds", "dipy-NLLS s / method s",
            "median abs. difference from dipy-NLLS", "v1 angle (°)"]
    rows = []
    for e in entries:
        ref = e["methods"].get("dipy-NLLS", {}).get("seconds")
        for m, r in e["methods"].items():
            diff = ", ".join(f"{p} {v:.4f}" for p, v in r.get("median_abs_diff", {}).items())
            rows.append([e["scan"], e["model"], m, f"{r['seconds']:.1f}",
                         f"{ref / r['seconds']:.2f}" if ref else "", diff or "(reference)",
                         f"{r['v1_angle_deg']:.2f}" if "v1_angle_deg" in r else ""])
    return [markdown_table(head, rows)]


def _phantom_table(e: dict) -> list[str]:
    head, rows = class_table_rows(e, "v1_angle_deg", "v1")
    cls = ", ".join(f"{c} {n}" for c, n in e["classes"].items())
    lines = [f"#### Phantom of {e['scan']}, {e['model']}, b0 SNR {e['snr']:g} (Rician)", "",
             f"{e['n_voxels']} voxels ({cls}), {e['n_measurements']} measurements (b ≤ "
             f"{e['max_b']:g} s/mm²); floor: median effective atoms "
             f"{e['methods']['floor']['ess_median']:.1f}"
             + ("." if e["methods"]["floor"]["ess_median"] >= RESOLVED_ESS
                else " (not resolved: its numbers are not a bound)."), "",
             markdown_table(head, rows, floatfmt=".4f")]
    ms = e["methods"]
    if "vae-gmm" in ms and "lsq" in ms:
        g, lsq = ms["vae-gmm"]["params"], ms["lsq"]["params"]
        worse = [f"{p} {c}" for p in g for c in CLASS_NAMES
                 if g[p]["classes"][c]["rmse"] is not None
                 and g[p]["classes"][c]["rmse"] > lsq[p]["classes"][c]["rmse"]]
        lines += ["", "- vae-gmm worse than lsq in: " + (", ".join(worse) or "none")]
    return lines


def section(results: dict) -> str:
    real = [results[k] for k in sorted(results) if k.startswith("real|")]
    phantoms = [results[k] for k in sorted(results) if k.startswith("phantom|")]
    body = [
        "## DTI and DKI: mixmap against dipy", "",
        "Regenerate: `python benchmarks/tensor_models.py` (docs/tensor_models.json). mixmap's "
        "DTI and DKI (lsq; vae-gmm) against dipy's `TensorModel` and `DiffusionKurtosisModel` "
        "(WLS, NLLS), all in one process, one after another. DTI on the volumes with "
        "b ≤ 1500 s/mm², DKI on those with b ≤ 3000 s/mm². Directional kurtosis kept in "
        "[−3/7, 10] for MK, AK, RK in both (dipy's defaults; mixmap averages MK over 100 "
        "directions, dipy in closed form). MD, AD, RD in µm²/ms. "
        f"Times on {machine_description()}, one run each: a ratio above 1 means faster "
        "than dipy's NLLS.",
        "", "### Real scans: agreement with dipy and time", "",
        *(_real_table(real) if real else ["Not run yet."]),
        "", "### Realistic phantoms: accuracy per tissue class", "",
    ]
    for e in phantoms:
        body += _phantom_table(e) + [""]
    missing = [m for m in MODELS if not any(e["model"] == m for e in phantoms)]
    if missing:
        body.append("Phantoms not in this run: " + ", ".join(missing) + ".")
    return "\n".join(body).rstrip() + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", nargs="+", default=list(SCANS), choices=SCANS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--parts", nargs="+", default=["real", "phantom"],
                    choices=["real", "phantom"])
    ap.add_argument("--phantom-scans", nargs="+", default=["b1k_b2k"], choices=SCANS)
    ap.add_argument("--section-only", action="store_true")
    args = ap.parse_args(argv)
    results = json.loads(JSON.read_text()) if JSON.exists() else {}

    if not args.section_only:
        for model in args.models:
            if "real" in args.parts:
                for scan in args.scans:
                    print(f"real {scan} {model}", file=sys.stderr, flush=True)
                    keep_entry(results, f"real|{scan}|{model}", run_real(scan, model, args.methods),
                               JSON)
            if "phantom" in args.parts:
                for scan in args.phantom_scans:
                    print(f"phantom {scan} {model}", file=sys.stderr, flush=True)
                    keep_entry(results, f"phantom|{scan}|{model}",
                               run_phantom(scan, model, args.methods), JSON)
    update_section(RESULTS, "tensor-models", section(results))


if __name__ == "__main__":
    main()
