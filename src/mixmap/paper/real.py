"""Part 3-4, real data (paper Fig. 2, 3, 5): ball-stick and MSDKI maps of the in-vivo scan on
one slice and colour scale, posterior std maps, then the clusters and latent space and the
checks without a truth (goodness of fit, repeatability, phantom)."""

from __future__ import annotations

import numpy as np

from mixmap.paper.goodness import reproduce_goodness, unfit
from mixmap.paper.latent import reproduce_clusters_and_latent
from mixmap.paper.phantom import reproduce_phantom
from mixmap.paper.repeatability import reproduce_repeatability
from mixmap.paper.report import markdown_table
from mixmap.paper.run import Run, fit, placeholder
from mixmap.paper.scan import Scan, load_scan, map_grid, param_unit
from mixmap.paper.settings import DISPLAY_RANGE, REAL_PARAMS

MODELS = ("ball-stick", "msdki")
FIGURES = ("repro_real_ballstick.png", "repro_real_msdki.png", "repro_real_std.png",
           "repro_real_clusters.png", "repro_latent.png", "repro_phantom.png")
SECTIONS = ("repro-real-maps", "repro-latent", "repro-repeatability", "repro-goodness-of-fit",
            "repro-phantom")


def _skip(run: Run, out: dict, exc: Exception) -> dict:
    """Placeholders for every file and section of part 3-4, saying why."""
    note = f"real-data part skipped: {exc}"
    run.log(note)
    for f in FIGURES:
        placeholder(run, f, note)
    out["skipped"] = note
    for name in ("repro_real.json", "repro_repeatability.json", "repro_goodness.json",
                 "repro_phantom.json"):
        run.json(name, out)
    for name in ("repro_repeatability.csv", "repro_goodness.csv", "repro_phantom.csv"):
        run.csv(name, ["note"], [[note]])
    for sec in SECTIONS:
        run.section(sec, f"Regenerate: `{run.command}`. {note}")
    return out


def _fit_all(run: Run, scan: Scan) -> tuple[dict, dict, dict]:
    """Every method on the scan per model: (FitResults, fitters, seconds), each model ->
    method -> value."""
    fits: dict = {}
    fitters: dict = {}
    seconds: dict = {}
    for model in MODELS:
        fits[model], fitters[model], seconds[model] = {}, {}, {}
        for m in run.methods:
            run.log(f"real data: {m} {model} on {scan.signals.shape[0]} voxels")
            res, fitter, sec = fit(run, m, model, scan.signals, scan.acq,
                                   epochs=run.s.real_epochs)
            fits[model][m], fitters[model][m], seconds[model][m] = res, fitter, sec
    return fits, fitters, seconds


def _map_figures(run: Run, scan: Scan, fits: dict) -> dict:
    """repro_real_ballstick.png, repro_real_msdki.png and repro_real_std.png. Returns the
    std figure's columns ("<model> <param>") -> (0, 99th percentile over methods)."""
    for model, name in (("ball-stick", "repro_real_ballstick.png"),
                        ("msdki", "repro_real_msdki.png")):
        cols = list(REAL_PARAMS[model])
        map_grid(run, scan, run.methods, cols,
                 lambda r, c, model=model: fits[model][r].params[c],
                 DISPLAY_RANGE, f"{model} on {run.s.dataset} (slice z={scan.slice_z}), "
                 f"posterior mean / estimate", name,
                 {c: param_unit(model, c) for c in cols})
    std_ranges = {}
    for model in MODELS:
        for p in REAL_PARAMS[model]:
            vals = np.concatenate([fits[model][m].std[p] for m in run.methods
                                   if p in fits[model][m].std] or [np.zeros(1)])
            vals = vals[np.isfinite(vals)]
            std_ranges[f"{model} {p}"] = (0.0, float(np.percentile(vals, 99))
                                          if vals.size else 1.0)

    def get_std(r, c):
        model, p = c.split(" ")
        v = fits[model][r].std.get(p)
        return None if v is None else np.where(np.isfinite(v), v, np.nan)

    map_grid(run, scan, run.methods, list(std_ranges), get_std, std_ranges,
             "posterior std (learned) / asymptotic std (lsq)", "repro_real_std.png",
             {c: param_unit(*c.split(" ")) for c in std_ranges}, cmap="magma")
    return std_ranges


def _sections(run: Run, scan: Scan, real_json: dict, seconds: dict, std_ranges: dict,
              latent_note: str) -> None:
    """Sections repro-real-maps and repro-latent."""
    median_std = real_json["median_std"]
    body = [
        f"Regenerate: `{run.command}`. Scan `{run.s.dataset}` "
        f"({scan.acq.describe()['shells_s_per_mm2']}), {scan.note}; noise σ from the b=0 "
        f"volumes {scan.sigma:.2f}. Fit time (s): "
        + "; ".join(f"{model}: " + ", ".join(f"{m} {seconds[model][m]:.0f}" for m in run.methods)
                    for model in seconds) + ".",
        "",
        f"![ball-stick]({run.rel(run.fig_dir / 'repro_real_ballstick.png')})",
        f"![msdki]({run.rel(run.fig_dir / 'repro_real_msdki.png')})",
        f"![std]({run.rel(run.fig_dir / 'repro_real_std.png')})",
        f"![clusters]({run.rel(run.fig_dir / 'repro_real_clusters.png')})",
        "",
        "Median std per parameter (same order as the std figure):",
        "",
        markdown_table(["method"] + list(std_ranges),
                       [[m] + [median_std[c.split(' ')[0]][m].get(c.split(' ')[1])
                               for c in std_ranges] for m in run.methods], floatfmt=".4f"),
        "",
        "The maps alone do not say which method is right (no truth); see repro-repeatability, "
        "repro-goodness-of-fit and repro-phantom for numbers.",
    ]
    run.section("repro-real-maps", "\n".join(body))
    run.section("repro-latent", f"Regenerate: `{run.command}`. {latent_note}\n\n"
                f"![latent]({run.rel(run.fig_dir / 'repro_latent.png')})")


def reproduce_real(run: Run) -> dict:
    """Write every file and section of part 3-4 (placeholders with a note where the scan
    cannot be fetched). Returns the scan's description, ``seconds`` per model and method,
    ``latent`` (its note) and the ``goodness``, ``repeatability`` and ``phantom`` results;
    repro_real.json holds all but the last three, plus ``median_std``."""
    s = run.s
    out: dict = {"dataset": s.dataset, "methods": run.methods}
    try:
        scan = load_scan(run)
    except RuntimeError as exc:  # e.g. PyPI unreachable for datasets.fetch
        return _skip(run, out, exc)
    out.update(voxels=int(scan.signals.shape[0]), note=scan.note, sigma_b0=scan.sigma,
               acquisition=scan.acq.describe())
    run.log(f"real data {s.dataset}: {scan.note}; σ(b0) = {scan.sigma:.2f}")
    fits, fitters, seconds = _fit_all(run, scan)
    out["seconds"] = seconds
    std_ranges = _map_figures(run, scan, fits)
    latent_note = reproduce_clusters_and_latent(run, scan, fits, fitters)
    out["latent"] = latent_note
    # goodness of fit first: a fit that does not explain the data is left out of the "best"
    # sentences of the other checks, where a collapsed map looks very repeatable
    out["goodness"] = reproduce_goodness(run, scan, fits)
    run.unfit = unfit(out["goodness"])
    out["repeatability"] = reproduce_repeatability(run, scan)
    out["phantom"] = reproduce_phantom(run, scan, fits)

    real_json = {k: v for k, v in out.items()
                 if k not in ("repeatability", "goodness", "phantom")}
    real_json["median_std"] = {
        model: {m: {p: float(np.nanmedian(fits[model][m].std[p]))
                    for p in REAL_PARAMS[model] if p in fits[model][m].std}
                for m in run.methods} for model in fits}
    run.json("repro_real.json", real_json)
    _sections(run, scan, real_json, seconds, std_ranges, latent_note)
    return out


__all__ = ["reproduce_real"]
