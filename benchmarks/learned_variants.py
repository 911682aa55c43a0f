"""The learned-fitter comparison of ``benchmarks/learned.py`` beyond the paper's setting (issue #4).

Each variant simulates one preset / scheme / noise, fits it with least squares, dipy's MSDKI
(where the model is MSDKI and dipy is importable), the learned fitters (default configurations,
seed 0) and, where it can be integrated, scores the Bayes-optimal reference
(:func:`mixmap.evaluation.bayes_reference`); it writes ``docs/learned_<variant>.json`` after every
fit and its own section ``learned-<variant>`` of docs/RESULTS.md.

- ``msdki4``: the ``msdki-4`` preset (4 clusters, other means, spreads and weights), HCP
  scheme, Gaussian noise; vae-gmm with its default 3 components and with 4.
- ``clinical``: ``paper-msdki`` on the ``clinical`` scheme (2 b0 + 3 shells x 10 directions).
- ``rician``: ``paper-msdki``, HCP, Rician noise; vae and vae-gmm with their Gaussian default
  and with ``likelihood="rician"``.
- ``ballstick``: the ``ball-stick`` preset, HCP, Gaussian noise: lsq, vae, vae-gmm; RMSE of f,
  Dpar, Diso and the sign-invariant angular error of the stick direction n.

    python benchmarks/learned_variants.py msdki4 [--snr 20] [--voxels 10000] [--threads 1]
    python benchmarks/learned_variants.py clinical --snr 20 10
    python benchmarks/learned_variants.py rician
    python benchmarks/learned_variants.py ballstick
    python benchmarks/learned_variants.py rician --render   # rewrite the section from the JSON

Hand-written notes on a run (what the numbers say) live in the JSON's ``notes`` list and are
printed under the tables; ``--render`` rewrites the section from the JSON without fitting.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learned import DOCS, bayes_entry, fit_entry, table, verdicts  # noqa: E402

from mixmap.paper.report import cpu_description, update_section  # noqa: E402
from mixmap.simulation import simulate  # noqa: E402

MSDKI = ("D", "K")
BALL_STICK = ("f", "Dpar", "Diso")

MSDKI_RUNS = [("lsq", "lsq", {}), ("dipy", "dipy", {}), ("ssl", "ssl", {}), ("vae", "vae", {}),
              ("vae-gmm", "vae-gmm", {})]

VARIANTS: dict[str, dict] = {
    "msdki4": dict(
        preset="msdki-4", scheme="hcp", noise="gaussian", names=MSDKI, direction=None,
        runs=MSDKI_RUNS + [("vae-gmm (K=4)", "vae-gmm", {"n_components": 4})],
        title="A mixture that is not the paper's: msdki-4 (4 clusters, HCP scheme)",
        what="`msdki-4` preset (clusters A–D: (D, K) = (0.8, 1.8), (1.2, 1.2), (2.0, 0.6), "
             "(2.9, 0.1), weights 0.3 : 0.3 : 0.15 : 0.25), HCP scheme, Gaussian noise. vae-gmm "
             "runs with its default 3 mixture components (fewer than the 4 clusters) and with "
             "`n_components=4`."),
    "clinical": dict(
        preset="paper-msdki", scheme="clinical", noise="gaussian", names=MSDKI, direction=None,
        runs=MSDKI_RUNS,
        title="A short clinical-style scheme: paper-msdki on 2 b0 + 3 shells × 10 directions",
        what="`paper-msdki` preset on the `clinical` scheme (2 b=0 volumes, b = 1000, 2000, "
             "3000 s/mm² × 10 directions: 32 measurements instead of HCP's 288), Gaussian "
             "noise."),
    "rician": dict(
        preset="paper-msdki", scheme="hcp", noise="rician", names=MSDKI, direction=None,
        runs=MSDKI_RUNS[:4] + [("vae (rician)", "vae", {"likelihood": "rician"}),
                               ("vae-gmm", "vae-gmm", {}),
                               ("vae-gmm (rician)", "vae-gmm", {"likelihood": "rician"})],
        title="Rician noise: paper-msdki, HCP scheme",
        what="`paper-msdki` preset, HCP scheme, Rician noise (magnitude of complex Gaussian "
             "noise, σ = 1/SNR per channel). lsq, dipy and ssl have no Rician option (they fit "
             "the magnitude as if the noise were Gaussian); vae and vae-gmm run with their "
             "Gaussian default and with `likelihood=\"rician\"`. The Bayes reference uses the "
             "exact Rician likelihood."),
    "ballstick": dict(
        preset="ball-stick", scheme="hcp", noise="gaussian", names=BALL_STICK, direction="n",
        floatfmt=".4f",
        runs=[("lsq", "lsq", {}), ("vae", "vae", {}), ("vae-gmm", "vae-gmm", {})],
        title="Ball-stick: the ball-stick preset, HCP scheme",
        what="`ball-stick` preset (WM-, GM-, CSF-like clusters in f, Dpar, Diso; uniformly "
             "random stick directions), HCP scheme, Gaussian noise. RMSE of f, Dpar and Diso "
             "(µm²/ms); n: mean sign-invariant angular error of the stick direction in degrees "
             "(medians in the JSON)."),
}


@contextmanager
def _locked(path: Path):
    """Serialise read-modify-write of RESULTS.md between runs of this script."""
    lock = Path(tempfile.gettempdir()) / f"mixmap-{path.name}.lock"  # not in the repository
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def replace_entries(path: Path, entries: list[dict], key) -> list[dict]:
    """Replace the entries of the JSON list at ``path`` whose ``key(entry)`` matches one of
    ``entries``'s, and write it back, serialised between concurrent runs; returns the list."""
    with _locked(path):
        old = json.loads(path.read_text()) if path.exists() else []
        new = {key(e) for e in entries}
        results = [r for r in old if key(r) not in new] + entries
        path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def parse_run_args(ap: argparse.ArgumentParser, out: Path):
    """Add ``--threads`` (torch threads, default 1) and ``--render`` (only rewrite the section)
    to a benchmark's parser, parse, set the threads; returns (args, the JSON list at ``out``)."""
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render", action="store_true", help="only rewrite the section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args, json.loads(out.read_text()) if out.exists() else []


def section(variant: str, results: list[dict]) -> str:
    v = VARIANTS[variant]
    nice = os.nice(0)  # the priority this run had (the command line says so)
    prefix = f"nice -n {nice} " if nice else ""
    where = f" at low priority (nice {nice})" if nice else ""
    parts = [f"### {v['title']}\n",
             f"{v['what']}\n",
             f"Written by `{prefix}.venv/bin/python benchmarks/learned_variants.py "
             f"{variant} --snr {' '.join(format(r['snr'], 'g') for r in results)}"
             + (f" --voxels {results[0]['n_voxels']}" if results
                and results[0]["n_voxels"] != 10000 else "")
             + f"` (default configurations, seed 0; data and raw numbers: "
             f"`docs/learned_{variant}.json`). "
             + ("`bayes` is the posterior mean under the true prior and noise model, the floor "
                "no method beats on average. " if variant != "ballstick" else "")
             + f"Times were measured{where} on {cpu_description()} with "
             f"{results[0].get('threads', '?') if results else '?'} torch thread(s): they are "
             "indicative, not speed results (`benchmarks/speed.py` is).\n"]
    for res in results:
        parts.append(f"**{res['preset']}, {res['scheme']} scheme, {res['noise']} noise, "
                     f"SNR {res['snr']:g}, {res['n_voxels']} voxels**"
                     + (" — RMSE (D in µm²/ms)" if v["direction"] is None else "") + "\n")
        if res.get("bayes_error"):
            parts.append(f"No Bayes reference: {res['bayes_error']}\n")
        parts.append(table(res, v["names"], v["direction"], v.get("floatfmt", ".3f")) + "\n")
        failed = {k: e for k, e in res["methods"].items() if "rmse" not in e}
        for label, e in failed.items():
            tb = e.get("traceback", "").strip().splitlines()
            parts.append(f"`{label}` failed: `{e.get('error')}`"
                         + (" — traceback (last lines):\n\n```\n" + "\n".join(tb[-8:])
                            + "\n```\n" if tb else "\n"))
        lines = verdicts(res, v["names"], v["direction"])
        if lines:
            parts.append("Measured:\n\n" + "\n".join(f"- {x}" for x in lines) + "\n")
        for note in res.get("notes", []):
            parts.append(note + "\n")
    return "\n".join(parts)


RESULTS = DOCS / "RESULTS.md"


def write(variant: str, results: list[dict], out: Path, results_md: Path) -> None:
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    with _locked(results_md):
        update_section(results_md, f"learned-{variant}", section(variant, results))


def run_variant(variant: str, snr: float, n_voxels: int, results: list[dict], out: Path,
                md: Path, only: list[str] | None) -> None:
    """Fit one SNR of a variant into ``results`` (written after each fit). With ``only``, the
    listed rows are (re)fitted into an existing entry of the same SNR and voxel count."""
    v = VARIANTS[variant]
    sim = simulate(v["preset"], v["scheme"], snr=snr, noise=v["noise"], n_voxels=n_voxels,
                   seed=0)
    old = [r for r in results if r["snr"] == snr and r["n_voxels"] == n_voxels]
    if only and old:
        res = old[0]
    else:
        results[:] = [r for r in results if r not in old]
        res = {"snr": snr, "preset": v["preset"], "scheme": v["scheme"], "noise": v["noise"],
               "n_voxels": n_voxels, "clusters": [c.name for c in sim.preset.clusters],
               "threads": torch.get_num_threads(), "methods": {}}
        results.append(res)
    if not only or "bayes" in only:
        ref = bayes_entry(sim, v["names"])
        if "error" in ref:
            res["bayes_error"] = ref["error"]
        else:
            res["methods"]["bayes"] = ref
        write(variant, results, out, md)
    for label, method, kw in v["runs"]:
        if only and label not in only:
            continue
        res["methods"][label] = e = fit_entry(sim, method, kw, v["names"], v["direction"])
        print(f"{variant} SNR {snr:g} {label}: {e.get('rmse', e.get('error'))} "
              f"({e.get('seconds', 0):.0f} s)", flush=True)
        write(variant, results, out, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", choices=list(VARIANTS))
    ap.add_argument("--snr", type=float, nargs="+", default=[20])
    ap.add_argument("--voxels", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None,
                    help="comma-separated row labels to fit (default: all of the variant)")
    ap.add_argument("--render", action="store_true",
                    help="rewrite the RESULTS.md section from the JSON, fit nothing")
    ap.add_argument("--out", default=None, help="default docs/learned_<variant>.json")
    ap.add_argument("--results", default=str(RESULTS), help="the Markdown file to update")
    args = ap.parse_args()
    md = Path(args.results)
    out = Path(args.out or DOCS / f"learned_{args.variant}.json")
    if args.render:
        write(args.variant, json.loads(out.read_text()), out, md)
        return
    torch.set_num_threads(args.threads)
    np.seterr(all="ignore")
    only = args.only.split(",") if args.only else None
    # --only adds rows to the runs already in the JSON; a full run starts afresh
    results: list[dict] = json.loads(out.read_text()) if only and out.exists() else []
    for snr in args.snr:
        run_variant(args.variant, snr, args.voxels, results, out, md, only)
    print(section(args.variant, results))


if __name__ == "__main__":
    main()
