"""Accuracy of the learned fitters against least squares and the Bayes-optimal reference.

On ``simulate("paper-msdki", "hcp", snr=S)`` (10,000 voxels) fit lsq, ssl, vae and vae-gmm
(default configurations) and report the RMSE of D and K overall and per cluster, the Bayes
reference (posterior mean under the true prior, :func:`mixmap.evaluate.bayes_reference`) and the
training time; write the table to the ``learned`` section of docs/RESULTS.md and everything to
docs/learned.json.

    python benchmarks/learned.py --snr 10 20 50 [--methods lsq,ssl,vae,vae-gmm] [--threads 2]
    python benchmarks/learned.py --snr 20 --extra-snr 20  # + vae-gmm: Gumbel y, Rician
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mixmap.fitting import get_fitter
from mixmap.report import machine_description, markdown_table, update_section
from mixmap.simulate import simulate

DOCS = Path(__file__).resolve().parents[1] / "docs"
NAMES = ("D", "K")


def rmse_table(est: dict, sim) -> dict:
    out = {}
    names = [c.name for c in sim.preset.clusters]
    for p in NAMES:
        e = np.asarray(est[p], dtype=np.float64) - sim.truth[p]
        row = {"all": float(np.sqrt(np.mean(e**2)))}
        for i, c in enumerate(names):
            row[c] = float(np.sqrt(np.mean(e[sim.labels == i] ** 2)))
        out[p] = row
    return out


def run(snr: float, methods: list[str], extra: bool, preset: str, scheme: str,
        noise: str) -> dict:
    sim = simulate(preset, scheme, snr=snr, noise=noise, seed=0)
    res: dict = {"snr": snr, "preset": preset, "scheme": scheme, "noise": noise, "methods": {}}
    try:
        from mixmap.evaluate import bayes_reference

        t = time.perf_counter()
        ref = bayes_reference(sim.signals, sim.acquisition, sim.preset, sim.sigma, sim.noise)
        res["methods"]["bayes"] = {"rmse": rmse_table(ref, sim),
                                   "seconds": time.perf_counter() - t}
    except Exception as exc:  # the reference covers the MSDKI presets only
        res["bayes_error"] = str(exc)
    runs = [(m, m, {}) for m in methods]
    if extra:
        runs.append(("vae-gmm (gumbel)", "vae-gmm", {"y_inference": "gumbel"}))
        runs.append(("vae-gmm (rician)", "vae-gmm", {"likelihood": "rician"}))
    for label, method, kw in runs:
        f = get_fitter(method, sim.preset.model, seed=0, quiet=True, **kw)
        t = time.perf_counter()
        r = f.fit(sim.signals, sim.acquisition)
        secs = time.perf_counter() - t
        res["methods"][label] = {"rmse": rmse_table(r.params, sim), "seconds": secs,
                                 "epochs": len(r.history), "settings": r.settings}
        print(f"SNR {snr:g} {label}: {res['methods'][label]['rmse']} ({secs:.0f} s)",
              flush=True)
    return res


def markdown(results: list[dict]) -> str:
    parts = []
    for res in results:
        clusters = [k for k in next(iter(res["methods"].values()))["rmse"]["D"] if k != "all"]
        header = ["method"] + [f"{p} {c}" for p in NAMES for c in ["all", *clusters]] + [
            "time (s)", "epochs"]
        rows = []
        for label, m in res["methods"].items():
            rows.append([label] + [m["rmse"][p][c] for p in NAMES for c in ["all", *clusters]]
                        + [round(m["seconds"]), m.get("epochs")])
        parts.append(f"**{res['preset']}, {res['scheme']} scheme, {res['noise']} noise, "
                     f"SNR {res['snr']:g}** — RMSE (D in µm²/ms)\n\n"
                     + markdown_table(header, rows))
    return ("### Learned fitters vs least squares and the Bayes-optimal reference\n\n"
            "Written by `python benchmarks/learned.py --snr 10 20 50 --extra-snr 20` (default "
            f"configurations, seed 0; times on {machine_description()}, a machine shared with "
            "other work while it ran, so times are indicative). "
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for snr in args.snr:  # written after each SNR, so a long run leaves what it finished
        results.append(run(snr, args.methods.split(","), snr == args.extra_snr, args.preset,
                           args.scheme, args.noise))
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        update_section(DOCS / "RESULTS.md", "learned", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
