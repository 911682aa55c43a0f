"""Part 1, simulation (paper Fig. 1 and 7): the paper's 3-cluster MSDKI preset on the HCP
scheme at each SNR of the run, fitted by every method and by the Bayes-optimal posterior mean
under the true prior; truth-vs-estimate scatter per cluster, RMSE overall and per cluster."""

from __future__ import annotations

import time

import numpy as np

from mixmap.paper.ranking import not_best
from mixmap.paper.report import markdown_table
from mixmap.paper.run import Run, fit, fmt, pyplot
from mixmap.plots import CLUSTER_COLOURS

PARAMS = ("D", "K")
#: Axis range of the scatter per parameter (µm²/ms for D).
SCATTER_LIMITS = {"D": (0, 3.6), "K": (-0.5, 2.8)}


def snr_key(snr: float) -> str:
    """The SNR as the JSON keys spell it ("20", not "20.0")."""
    return str(int(snr) if float(snr).is_integer() else snr)


def _fit_snr(run: Run, preset, names: list[str], snr: float):
    """Every method and the Bayes reference on one simulation at ``snr``.
    Returns (simulation, method -> {D, K} estimates, method -> {metrics, seconds, epochs})."""
    from mixmap.evaluation import bayes_reference, metrics
    from mixmap.simulation import simulate

    s = run.s
    sim = simulate(preset, "hcp", snr=snr, n_voxels=s.n_sim, seed=s.seed)
    per: dict = {}
    est: dict = {}
    for m in run.methods:
        run.log(f"simulation SNR {snr:g}: fitting {m} on {s.n_sim} voxels")
        res, fitter, sec = fit(run, m, "msdki", sim.signals, sim.acquisition)
        if m == "vae-gmm" and snr == min(s.snrs, key=lambda v: abs(v - 20)):
            run.latent_sim = (fitter, sim, snr)  # the latent figure's simulation panels
        est[m] = {k: res.params[k] for k in PARAMS}
        per[m] = {"metrics": metrics(est[m], sim.truth, sim.labels, names, list(PARAMS)),
                  "seconds": sec, "epochs": len(res.history) or None}
    run.log(f"simulation SNR {snr:g}: Bayes-optimal reference")
    t = time.perf_counter()
    ref = bayes_reference(sim.signals, sim.acquisition, preset, sim.sigma, "gaussian")
    est["bayes"] = ref
    per["bayes"] = {"metrics": metrics(ref, sim.truth, sim.labels, names, list(PARAMS)),
                    "seconds": time.perf_counter() - t, "epochs": None}
    return sim, est, per


def _scatter(run: Run, param: str, sims: dict, est: dict, rows_out: dict, names, rng) -> None:
    """Figure repro_sim_scatter_<param>.png: rows methods (+ Bayes), columns SNR; 3,000
    voxels drawn with ``rng`` per SNR."""
    plt = pyplot()
    s = run.s
    rows = [*run.methods, "bayes"]
    lims = SCATTER_LIMITS[param]
    fig, axes = plt.subplots(len(rows), len(s.snrs), squeeze=False,
                             figsize=(3.0 * len(s.snrs), 2.8 * len(rows)))
    for j, snr in enumerate(s.snrs):
        sim = sims[snr]
        pick = rng.permutation(sim.labels.size)[:3000]
        for i, m in enumerate(rows):
            ax = axes[i, j]
            e = est[snr][m][param]
            for c, cname in enumerate(names):
                sel = pick[sim.labels[pick] == c]
                ax.scatter(sim.truth[param][sel], e[sel], s=2, alpha=0.4,
                           color=CLUSTER_COLOURS[c], label=cname, rasterized=True)
            ax.plot(lims, lims, "k--", lw=0.8)
            ax.set_xlim(lims)
            ax.set_ylim(lims)
            rmse = rows_out["snr"][snr_key(snr)][m]["metrics"][param]["all"]["rmse"]
            label = "Bayes-optimal" if m == "bayes" else m
            ax.set_title(f"{label}, SNR {snr:g}: RMSE {fmt(rmse)}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"estimated {param}")
            if i == len(rows) - 1:
                ax.set_xlabel(f"true {param}")
    axes[0, 0].legend(markerscale=4, fontsize=7, loc="upper left")
    fig.suptitle(f"paper-msdki simulation: {param}, truth vs estimate per cluster "
                 f"({s.n_sim} voxels, HCP scheme, Gaussian noise)", fontsize=10)
    fig.tight_layout()
    run.figure(f"repro_sim_scatter_{param}.png", fig)


def _write_csv(run: Run, rows_out: dict) -> None:
    header = ["SNR", "method", "param", "cluster", "n", "rmse", "bias", "r", "seconds"]
    csv_rows = []
    for key, per in rows_out["snr"].items():
        for m, entry in per.items():
            for param, pm in entry["metrics"].items():
                for cname, st in [("all", pm["all"]), *pm["clusters"].items()]:
                    csv_rows.append([key, m, param, cname, st["n"], st["rmse"], st["bias"],
                                     st["r"], entry["seconds"]])
    run.csv("repro_sim_rmse.csv", header, csv_rows)


def _section(run: Run, rows_out: dict, names: list[str]) -> None:
    th = ["SNR", "method"] + [f"{p} {c}" for p in PARAMS for c in ["all", *names]] + ["s"]
    trows = []
    for key, per in rows_out["snr"].items():
        for m, entry in per.items():
            row = [key, "Bayes-optimal" if m == "bayes" else m]
            for p in PARAMS:
                pm = entry["metrics"][p]
                row += [pm["all"]["rmse"]] + [pm["clusters"][c]["rmse"] for c in names]
            row.append(f"{entry['seconds']:.0f}")
            trows.append(row)
    text = [
        f"Regenerate: `{run.command}`. Preset paper-msdki ({run.s.n_sim} voxels, clusters "
        f"{', '.join(names)}), HCP scheme, Gaussian noise σ = 1/SNR; RMSE of the posterior "
        f"mean (learned fitters) or the estimate (lsq); the Bayes-optimal row is the posterior "
        f"mean under the true mixture prior and noise (no method can beat it on average).",
        "",
        markdown_table(th, trows, floatfmt=".3f"),
        "",
        f"![D]({run.rel(run.fig_dir / 'repro_sim_scatter_D.png')}) "
        f"![K]({run.rel(run.fig_dir / 'repro_sim_scatter_K.png')})",
        "",
        sim_verdict(rows_out, run.methods),
    ]
    run.section("repro-simulation", "\n".join(text))


def sim_verdict(rows_out: dict, methods: list[str]) -> str:
    """Plain sentences: who wins per SNR and parameter, and how far from Bayes."""
    lines = ["**Reading.**"]
    for key, per in rows_out["snr"].items():
        for p in PARAMS:
            r = {m: per[m]["metrics"][p]["all"]["rmse"] for m in methods}
            if not r:
                continue
            best = min(r, key=lambda m: r[m])
            bayes = per["bayes"]["metrics"][p]["all"]["rmse"]
            parts = ", ".join(f"{m} {r[m]:.3f}" for m in methods)
            line = (f"- SNR {key}, {p}: {parts} (Bayes-optimal {bayes:.3f}); best method: "
                    f"{best}.")
            if "vae-gmm" in r and best != "vae-gmm":
                line += " " + not_best("vae-gmm", r["vae-gmm"], best, r[best])
            lines.append(line)
    return "\n".join(lines)


def reproduce_simulation(run: Run) -> dict:
    """Write figures repro_sim_scatter_{D,K}.png, repro_sim.json, repro_sim_rmse.csv and
    section repro-simulation. Returns what repro_sim.json holds: ``settings`` and, per SNR
    key and method (plus ``bayes``), ``metrics`` (D, K; overall and per cluster),
    ``seconds`` and ``epochs``."""
    from mixmap.simulation import get_preset

    s = run.s
    preset = get_preset("paper-msdki")
    names = [c.name for c in preset.clusters]
    rows_out: dict = {"settings": {"preset": preset.name, "scheme": "hcp", "noise": "gaussian",
                                   "n_voxels": s.n_sim, "snrs": list(s.snrs)},
                      "snr": {}}
    est: dict = {}  # snr -> method -> {D, K}
    sims = {}
    for snr in s.snrs:
        sims[snr], est[snr], per = _fit_snr(run, preset, names, snr)
        rows_out["snr"][snr_key(snr)] = per
    rng = np.random.default_rng(0)  # one stream for both figures: D first, then K
    for param in PARAMS:
        _scatter(run, param, sims, est, rows_out, names, rng)
    _write_csv(run, rows_out)
    run.json("repro_sim.json", rows_out)
    _section(run, rows_out, names)
    return rows_out


__all__ = ["reproduce_simulation", "sim_verdict", "snr_key"]
