"""Accuracy of the learned fitters against least squares and the Bayes-optimal reference.

On ``simulate("paper-msdki", "hcp", snr=S)`` (10,000 voxels) fit lsq, ssl, vae and vae-gmm
(default configurations) and report the RMSE of D and K overall and per cluster, the Bayes
reference (posterior mean under the true prior, :func:`mixmap.evaluation.bayes_reference`) and the
training time; write the table to the ``learned`` section of docs/RESULTS.md and everything to
docs/learned.json.

    python benchmarks/learned.py --snr 10 20 50 [--methods lsq,ssl,vae,vae-gmm] [--threads 2]
    python benchmarks/learned.py --snr 20 --extra-snr 20  # + vae-gmm: Gumbel y, Rician

Other presets, schemes and noise (issue #4): ``benchmarks/learned_variants.py``, which imports
the scoring and fitting helpers below.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from mixmap.evaluation import angular_error, bayes_reference
from mixmap.fitting import get_fitter
from mixmap.paper.demo import dipy_msdki
from mixmap.paper.report import machine_description, markdown_table, update_section
from mixmap.simulation import simulate

DOCS = Path(__file__).resolve().parents[1] / "docs"
NAMES = ("D", "K")


def rmse_table(est: dict, sim, names: tuple[str, ...] = NAMES) -> dict:
    """RMSE of each scalar parameter in ``names``, overall and per cluster of ``sim``."""
    out = {}
    clusters = [c.name for c in sim.preset.clusters]
    for p in names:
        e = np.asarray(est[p], dtype=np.float64) - sim.truth[p]
        row = {"all": float(np.sqrt(np.mean(e**2)))}
        for i, c in enumerate(clusters):
            row[c] = float(np.sqrt(np.mean(e[sim.labels == i] ** 2)))
        out[p] = row
    return out


def angle_table(est: dict, sim, name: str = "n") -> dict:
    """Sign-invariant angular error (degrees) of direction ``name``: mean and median, overall and
    per cluster of ``sim``."""
    ang = angular_error(np.asarray(est[name], dtype=np.float64),
                        np.asarray(sim.truth[name], dtype=np.float64))
    out = {"mean": {"all": float(ang.mean())}, "median": {"all": float(np.median(ang))}}
    for i, c in enumerate(c.name for c in sim.preset.clusters):
        sel = ang[sim.labels == i]
        out["mean"][c], out["median"][c] = float(sel.mean()), float(np.median(sel))
    return out


def bayes_entry(sim, names: tuple[str, ...] = NAMES) -> dict:
    """The Bayes reference's RMSE table and time, or ``{"error": why}`` where
    :func:`mixmap.evaluation.bayes_reference` cannot integrate the preset."""
    try:
        t = time.perf_counter()
        ref = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma, sim.noise)
    except Exception as exc:  # the reference covers the MSDKI presets only
        return {"error": str(exc)}
    return {"rmse": rmse_table(ref, sim, names), "seconds": time.perf_counter() - t}


def fit_entry(sim, method: str, kw: dict, names: tuple[str, ...] = NAMES,
              direction: str | None = None) -> dict:
    """Fit ``sim`` with ``method`` (a mixmap fitter, or ``dipy`` for dipy's MSDKI) and score it:
    RMSE table, angular errors of ``direction`` if given, time, epochs and settings. A fit that
    raises is recorded with its traceback (``error``, ``traceback``) instead of stopping the run."""
    t = time.perf_counter()
    try:
        if method == "dipy":
            params = dipy_msdki(sim.signals, sim.acquisition)
            if params is None:
                return {"error": "dipy is not importable"}
            history, settings = [], {"method": "dipy MeanDiffusionKurtosisModel"}
        else:
            f = get_fitter(method, sim.preset.model, seed=0, quiet=True, **kw)
            r = f.fit(sim.signals, sim.acquisition)
            params, history, settings = r.params, r.history, r.settings
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "seconds": time.perf_counter() - t}
    secs = time.perf_counter() - t
    entry = {"rmse": rmse_table(params, sim, names), "seconds": secs,
             "epochs": len(history), "settings": settings}
    bad = {p: int((~np.isfinite(np.asarray(params[p]))).sum()) for p in names}
    if any(bad.values()):
        entry["non_finite"] = bad
    if direction is not None:
        entry["angle"] = angle_table(params, sim, direction)
    return entry


def run(snr: float, methods: list[str], extra: bool, preset: str, scheme: str,
        noise: str) -> dict:
    sim = simulate(preset, scheme, snr=snr, noise=noise, seed=0)
    res: dict = {"snr": snr, "preset": preset, "scheme": scheme, "noise": noise, "methods": {}}
    ref = bayes_entry(sim)
    if "error" in ref:
        res["bayes_error"] = ref["error"]
    else:
        res["methods"]["bayes"] = ref
    runs = [(m, m, {}) for m in methods]
    if extra:
        runs.append(("vae-gmm (gumbel)", "vae-gmm", {"y_inference": "gumbel"}))
        runs.append(("vae-gmm (rician)", "vae-gmm", {"likelihood": "rician"}))
    for label, method, kw in runs:
        res["methods"][label] = entry = fit_entry(sim, method, kw)
        print(f"SNR {snr:g} {label}: {entry.get('rmse', entry.get('error'))} "
              f"({entry.get('seconds', 0):.0f} s)", flush=True)
    return res


def table(res: dict, names: tuple[str, ...] = NAMES, direction: str | None = None,
          floatfmt: str = ".3f") -> str:
    """Markdown table of one run: a row per method, RMSE of ``names`` overall and per cluster,
    the mean angular error of ``direction`` (if given), time and epochs; a failed fit is a row
    that says so."""
    clusters = res["clusters"] if "clusters" in res else [
        k for k in next(m for m in res["methods"].values() if "rmse" in m)["rmse"][names[0]]
        if k != "all"]
    cols = [(p, c) for p in names for c in ["all", *clusters]]
    header = ["method"] + [f"{p} {c}" for p, c in cols]
    if direction:
        header += [f"{direction} {c} mean°" for c in ["all", *clusters]] + [
            f"{direction} all median°"]
    header += ["time (s)", "epochs"]
    rows = []
    for label, m in res["methods"].items():
        if "rmse" not in m:
            rows.append([label, f"failed: {m.get('error', '?')}"] + [""] * (len(header) - 2))
            continue
        row = [label] + [m["rmse"][p][c] for p, c in cols]
        if direction:
            ang = m.get("angle", {}).get("mean", {})
            row += [ang.get(c) for c in ["all", *clusters]] + [
                m.get("angle", {}).get("median", {}).get("all")]
        rows.append(row + [round(m["seconds"]), m.get("epochs")])
    return markdown_table(header, rows, floatfmt)


def _f(x: float) -> str:
    """A number for the measured lines: 3 decimals, 3 significant digits below 0.1."""
    return f"{x:#.3g}" if abs(x) < 0.1 else f"{x:.3f}"


def verdicts(res: dict, names: tuple[str, ...], direction: str | None) -> list[str]:
    """Measured comparisons the issue asks for, computed from the table (no judgement)."""
    m = {k: v for k, v in res["methods"].items() if "rmse" in v}
    out = []

    def overall(label: str) -> dict | None:
        return {p: m[label]["rmse"][p]["all"] for p in names} if label in m else None

    bayes, lsq, ssl = overall("bayes"), overall("lsq"), overall("ssl")
    for label in [k for k in m if k.startswith("vae-gmm")]:
        g = overall(label)
        if bayes:
            r = [g[p] / bayes[p] for p in names]
            met = "met" if max(r) <= 1.25 else "not met"
            per = [f"{p} {c} {m[label]['rmse'][p][c] / m['bayes']['rmse'][p][c]:.2f}×"
                   for p in names for c in m["bayes"]["rmse"][p] if c != "all"]
            out.append(f"{label} / Bayes RMSE: " + ", ".join(
                f"{p} {x:.2f}×" for p, x in zip(names, r, strict=True))
                + f" (goal ≤ 1.25×: {met}); per cluster: {', '.join(per)}.")
    vae = overall("vae")
    for label in [k for k in m if k.startswith("vae-gmm")]:
        g = overall(label)
        if vae:
            out.append(f"{label} vs vae, overall: " + ", ".join(
                f"{p} {_f(g[p])} vs {_f(vae[p])}" for p in names) + ".")
    for label in [k for k in m if k.endswith(" (rician)") and k[:-9] in m]:
        r, g = overall(label), overall(label[:-9])
        out.append(f"{label} vs {label[:-9]} (Gaussian likelihood), overall: " + ", ".join(
            f"{p} {_f(r[p])} vs {_f(g[p])}" for p in names) + ".")
    for label in [k for k in m if k.startswith("vae")]:
        v = overall(label)
        if lsq:
            better = [p for p in names if v[p] < lsq[p]]
            out.append(f"{label} vs lsq, overall: " + ", ".join(
                f"{p} {_f(v[p])} vs {_f(lsq[p])}" for p in names)
                + (" — beats lsq in all." if len(better) == len(names) else
                   f" — beats lsq in {', '.join(better) or 'none'}."))
        if ssl:
            better = [p for p in names if v[p] < ssl[p]]
            which = ("all of " + ", ".join(names) if len(better) == len(names)
                     else "only " + ", ".join(better) if better else "none of " + ", ".join(names))
            out.append(f"{label} vs ssl, overall: beats ssl in {which}.")
        if direction and lsq and "angle" in m[label] and "angle" in m["lsq"]:
            a, b = m[label]["angle"]["mean"]["all"], m["lsq"]["angle"]["mean"]["all"]
            out.append(f"{label} vs lsq, mean angular error of {direction}: {a:.2f}° vs "
                       f"{b:.2f}°.")
        if lsq:
            worse = [f"{p} {c} ({_f(m[label]['rmse'][p][c])} vs {_f(m['lsq']['rmse'][p][c])})"
                     for p in names for c in m["lsq"]["rmse"][p] if c != "all"
                     and m[label]["rmse"][p][c] > 1.02 * m["lsq"]["rmse"][p][c]]
            if worse:
                out.append(f"{label} worse than lsq (by > 2 %) in: {', '.join(worse)}.")
    return out


def markdown(results: list[dict], command: str = "python benchmarks/learned.py") -> str:
    """The section; ``command`` is the command line that produced ``results``."""
    parts = []
    for res in results:
        parts.append(f"**{res['preset']}, {res['scheme']} scheme, {res['noise']} noise, "
                     f"SNR {res['snr']:g}** — RMSE (D in µm²/ms)\n\n" + table(res) + "\n\n"
                     + "\n".join(f"- {line}" for line in verdicts(res, NAMES, None)))
    return ("### Learned fitters vs least squares and the Bayes-optimal reference\n\n"
            f"Written by `{command}` (default configurations, seed 0; times on "
            f"{machine_description()}, one run each, so indicative). "
            "`bayes` is the posterior mean under the true prior (not attainable by any method "
            "that has to learn the prior).\n\n" + "\n\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--snr", type=float, nargs="+", default=[10, 20, 50])
    ap.add_argument("--methods", default="lsq,ssl,vae,vae-gmm")
    ap.add_argument("--preset", default="paper-msdki")
    ap.add_argument("--scheme", default="hcp")
    ap.add_argument("--noise", default="gaussian")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-snr", type=float, default=None,
                    help="at this SNR also vae-gmm with Gumbel-softmax y and with Rician noise")
    ap.add_argument("--out", default=str(DOCS / "learned.json"))
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the section from --out's JSON (fit nothing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.render:
        results = json.loads(Path(args.out).read_text())
        update_section(DOCS / "RESULTS.md", "learned", markdown(results))
        return
    command = " ".join(["python benchmarks/learned.py", *sys.argv[1:]])
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for snr in args.snr:  # written after each SNR, so a long run leaves what it finished
        results.append(run(snr, args.methods.split(","), snr == args.extra_snr, args.preset,
                           args.scheme, args.noise))
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        update_section(DOCS / "RESULTS.md", "learned", markdown(results, command))
    print(markdown(results, command))


if __name__ == "__main__":
    main()
