"""`mixmap reproduce`: regenerate every table and figure of docs/RESULTS.md.

Four parts, each writing PNG figures, JSON/CSV numbers and a ``repro-…`` section of
``<out>/RESULTS.md`` (through :func:`~.report.update_section`, so other sections are kept):

1. **Simulation** (paper Fig. 1 and 7): the paper's 3-cluster MSDKI preset on the HCP scheme at
   several SNRs; truth-vs-estimate scatter per cluster for D and K, one row per method (plus the
   Bayes-optimal posterior mean under the true prior); RMSE overall and per cluster.
2. **Hyper-parameter sensitivity** (paper Fig. 6): RMSE of D against latent size and KL weight of
   ``vae-gmm`` (``vae`` where the mixture fitter is not registered), optimum marked.
3. **Real data** (paper Fig. 2, 3, 5): ball-stick and MSDKI maps of the ``b1k_b2k`` in-vivo scan
   on one slice and colour scale, posterior std maps, the ``vae-gmm`` cluster map, and the latent
   space (Fig. 3): posterior samples of z (:meth:`~.VAEFitter.encode`) of the
   simulation and of the scan in 2-D, coloured by cluster, with the learned prior overlaid.
4. **Real data without truth**: (a) repeatability between two disjoint halves of the gradient
   directions (RMS difference, ICC(3,1)); (b) goodness of fit: residual RMS against the noise σ
   of the b=0 volumes; (c) a realistic phantom: smoothed least-squares maps of the scan as truth,
   the scan's acquisition and noise σ, RMSE per parameter overall and on edges.

Every file is written in ``quick`` mode too (smaller), so a test can check them. Methods that are
not registered in :data:`mixmap.fitting.FITTERS` are skipped with a note. Where the real scan
cannot be fetched (no PyPI), part 3-4 write placeholder figures and a note instead.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.fitting import FITTERS, get_fitter
from mixmap.fitting.base import FitResult, noise_sigma_from_repeats
from mixmap.models import get_model
from mixmap.paper.report import markdown_table, update_section

#: Methods in display order (the paper's columns).
ALL_METHODS = ("lsq", "ssl", "vae", "vae-gmm")
LEARNED = ("ssl", "vae", "vae-gmm")
#: Real-data parameters shown per model (directions are scored separately).
REAL_PARAMS = {"ball-stick": ("f", "Dpar", "Diso"), "msdki": ("D", "K")}
#: Fixed display range per parameter, so every method shares one colour scale.
DISPLAY_RANGE = {"f": (0.0, 0.8), "Dpar": (0.0, 3.0), "Diso": (0.0, 3.0), "D": (0.0, 3.0),
                 "K": (0.0, 2.0)}
CLUSTER_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


@dataclass
class Settings:
    """What a run does; ``QUICK`` and ``FULL`` below, or a modified copy (``overrides``)."""

    name: str = "full"
    seed: int = 0
    # 1. simulation
    n_sim: int = 10000
    snrs: tuple[float, ...] = (10.0, 20.0, 50.0)
    #: Epochs of the learned fitters (None: each fitter's own default and stopping rule).
    epochs: int | None = None
    #: Extra options for the learned fitters, used only where the fitter accepts them.
    learned_options: dict = field(default_factory=dict)
    #: Options of least squares (e.g. fewer iterations in quick mode).
    lsq_options: dict = field(default_factory=dict)
    # 2. sensitivity
    sens_n: int = 10000
    sens_snr: float = 20.0
    sens_epochs: int | None = None
    latent_dims: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    kl_weights: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    #: Configuration of the learned fitter for the sweeps ("paper": a decoder from a latent
    #: space of any size; the default configuration fixes latent_dim to the parameter count).
    sens_config: str | None = "paper"
    #: Extra options of the learned fitter in the sweeps (where it accepts them).
    sens_options: dict = field(default_factory=dict)
    #: Learned fitter of the sweeps: the first of these that runs.
    sens_methods: tuple[str, ...] = ("vae-gmm", "vae")
    # 3-4. real data
    dataset: str = "b1k_b2k"
    #: Fit at most this many voxels of the scan (a crop around the centre of the fullest
    #: slice); None: every voxel of the mask.
    real_crop: int | None = None
    #: Epochs of the learned fitters on real data and the phantom (None: as ``epochs``).
    real_epochs: int | None = None
    #: Gaussian smoothing of the phantom truth, standard deviation in voxels.
    phantom_smooth_vox: float = 1.0
    #: What was reduced relative to the brief's full configuration (shown in RESULTS.md).
    reductions: tuple[str, ...] = ()


FULL = Settings()
QUICK = Settings(
    name="quick", n_sim=1000, snrs=(20.0,), epochs=2,
    learned_options={"refine_steps": 0, "n_samples": 4, "min_epochs": 1,
                     "lsq_features": False},
    lsq_options={"max_iter": 10},
    sens_options={"n_samples": 4, "min_epochs": 1},
    sens_n=200, sens_epochs=1, latent_dims=(2, 8), kl_weights=(1e-2, 1.0), real_crop=150,
    reductions=("quick mode: 1,000 simulated voxels at SNR 20 only, 2 epochs, no per-voxel "
                "refinement, no least-squares encoder input, 4 posterior samples, 10 "
                "least-squares iterations, a 2-point sensitivity grid on 200 voxels, a crop of "
                "about 150 voxels of the real scan — for testing the pipeline, not for "
                "conclusions",),
)


# ============================================================================ helpers
class _Run:
    """Shared state of one run: output folder, progress, written files, timings."""

    def __init__(self, out: Path, settings: Settings, quiet: bool, methods: list[str]):
        self.out = Path(out)
        self.fig_dir = self.out / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "RESULTS.md"
        self.s = settings
        self.quiet = quiet
        self.methods = methods
        self.written: list[Path] = []
        self.times: dict[str, float] = {}
        self.t0 = time.perf_counter()
        #: (model, method) pairs whose residual is far above least squares' (see _unfit).
        self.unfit: set = set()
        #: (vae-gmm fitter, simulation, SNR) of the simulation nearest SNR 20, for repro-latent.
        self.latent_sim = None
        self.command = "mixmap reproduce" + (" --quick" if settings.name == "quick" else "")

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[reproduce {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def _atomic(self, path: Path, write) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if path not in self.written:
            self.written.append(path)
        return path

    def figure(self, name: str, fig) -> Path:
        import matplotlib.pyplot as plt

        path = self.fig_dir / name
        self._atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight",
                                                   format="png"))
        plt.close(fig)
        return path

    def json(self, name: str, data) -> Path:
        text = json.dumps(_jsonable(data), indent=2, ensure_ascii=False)
        return self._atomic(self.out / name, lambda tmp: Path(tmp).write_text(text, "utf-8"))

    def csv(self, name: str, header: list[str], rows: list[list]) -> Path:
        def write(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(header)
                for r in rows:
                    w.writerow(["" if x is None else (f"{x:.6g}" if isinstance(x, float) else x)
                                for x in r])

        return self._atomic(self.out / name, write)

    def section(self, name: str, body: str) -> None:
        update_section(self.results, name, body)
        if self.results not in self.written:
            self.written.append(self.results)

    def rel(self, path: Path) -> str:
        """Path of a figure as RESULTS.md links it."""
        return os.path.relpath(path, self.out)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _placeholder(run: _Run, name: str, text: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    return run.figure(name, fig)


def _fit(run: _Run, method: str, model: str, signals: np.ndarray, acq: Acquisition,
         epochs: int | None = None, extra: dict | None = None, **options):
    """Fit with ``method``; learned fitters get the run's epochs and, where they accept them,
    the run's extra options. Returns (FitResult, fitter, seconds)."""
    opts: dict = {"seed": run.s.seed, "quiet": run.quiet}
    if method != "lsq":
        ep = run.s.epochs if epochs is None else epochs
        if ep is not None:
            opts["epochs"] = int(ep)
        opts.update(options)
        try:
            more = run.s.learned_options if extra is None else extra
            fitter = get_fitter(method, model, **opts, **more)
        except TypeError:
            fitter = get_fitter(method, model, **opts)
    else:
        fitter = get_fitter(method, model, **opts, **run.s.lsq_options)
    t = time.perf_counter()
    res = fitter.fit(signals, acq)
    return res, fitter, time.perf_counter() - t


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


# ============================================================================ 1. simulation
def _simulation(run: _Run) -> dict:
    from mixmap.evaluation import bayes_reference, metrics
    from mixmap.simulation import get_preset, simulate

    s = run.s
    preset = get_preset("paper-msdki")
    names = [c.name for c in preset.clusters]
    rows_out: dict = {"settings": {"preset": preset.name, "scheme": "hcp", "noise": "gaussian",
                                   "n_voxels": s.n_sim, "snrs": list(s.snrs)},
                      "snr": {}}
    est: dict = {}  # snr -> method -> {D, K}
    sims = {}
    for snr in s.snrs:
        sim = simulate(preset, "hcp", snr=snr, n_voxels=s.n_sim, seed=s.seed)
        sims[snr] = sim
        per: dict = {}
        est[snr] = {}
        for m in run.methods:
            run.log(f"simulation SNR {snr:g}: fitting {m} on {s.n_sim} voxels")
            res, fitter, sec = _fit(run, m, "msdki", sim.signals, sim.acquisition)
            if m == "vae-gmm" and snr == min(s.snrs, key=lambda v: abs(v - 20)):
                run.latent_sim = (fitter, sim, snr)  # the latent figure's simulation panels
            est[snr][m] = {k: res.params[k] for k in ("D", "K")}
            per[m] = {"metrics": metrics(est[snr][m], sim.truth, sim.labels, names, ["D", "K"]),
                      "seconds": sec, "epochs": len(res.history) or None}
        run.log(f"simulation SNR {snr:g}: Bayes-optimal reference")
        t = time.perf_counter()
        ref = bayes_reference(sim.signals, sim.acquisition, preset, sim.sigma, "gaussian")
        est[snr]["bayes"] = ref
        per["bayes"] = {"metrics": metrics(ref, sim.truth, sim.labels, names, ["D", "K"]),
                        "seconds": time.perf_counter() - t, "epochs": None}
        rows_out["snr"][str(int(snr) if float(snr).is_integer() else snr)] = per

    # figures: one for D (Fig. 1), one for K (Fig. 7); rows methods (+ Bayes), columns SNR
    plt = _plt()
    rows = [*run.methods, "bayes"]
    lims = {"D": (0, 3.6), "K": (-0.5, 2.8)}
    rng = np.random.default_rng(0)
    for param in ("D", "K"):
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
                ax.plot(lims[param], lims[param], "k--", lw=0.8)
                ax.set_xlim(lims[param])
                ax.set_ylim(lims[param])
                rmse = rows_out["snr"][_snr_key(snr)][m]["metrics"][param]["all"]["rmse"]
                label = "Bayes-optimal" if m == "bayes" else m
                ax.set_title(f"{label}, SNR {snr:g}: RMSE {_fmt(rmse)}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"estimated {param}")
                if i == len(rows) - 1:
                    ax.set_xlabel(f"true {param}")
        axes[0, 0].legend(markerscale=4, fontsize=7, loc="upper left")
        fig.suptitle(f"paper-msdki simulation: {param}, truth vs estimate per cluster "
                     f"({s.n_sim} voxels, HCP scheme, Gaussian noise)", fontsize=10)
        fig.tight_layout()
        run.figure(f"repro_sim_scatter_{param}.png", fig)

    # tables
    header = ["SNR", "method", "param", "cluster", "n", "rmse", "bias", "r", "seconds"]
    csv_rows = []
    for snr_key, per in rows_out["snr"].items():
        for m, entry in per.items():
            for param, pm in entry["metrics"].items():
                for cname, st in [("all", pm["all"]), *pm["clusters"].items()]:
                    csv_rows.append([snr_key, m, param, cname, st["n"], st["rmse"], st["bias"],
                                     st["r"], entry["seconds"]])
    run.csv("repro_sim_rmse.csv", header, csv_rows)
    run.json("repro_sim.json", rows_out)

    th = ["SNR", "method"] + [f"{p} {c}" for p in ("D", "K") for c in ["all", *names]] + ["s"]
    trows = []
    for snr_key, per in rows_out["snr"].items():
        for m, entry in per.items():
            row = [snr_key, "Bayes-optimal" if m == "bayes" else m]
            for p in ("D", "K"):
                pm = entry["metrics"][p]
                row += [pm["all"]["rmse"]] + [pm["clusters"][c]["rmse"] for c in names]
            row.append(f"{entry['seconds']:.0f}")
            trows.append(row)
    text = [
        f"Regenerate: `{run.command}`. Preset paper-msdki ({s.n_sim} voxels, clusters "
        f"{', '.join(names)}), HCP scheme, Gaussian noise σ = 1/SNR; RMSE of the posterior "
        f"mean (learned fitters) or the estimate (lsq); the Bayes-optimal row is the posterior "
        f"mean under the true mixture prior and noise (no method can beat it on average).",
        "",
        markdown_table(th, trows, floatfmt=".3f"),
        "",
        f"![D]({run.rel(run.fig_dir / 'repro_sim_scatter_D.png')}) "
        f"![K]({run.rel(run.fig_dir / 'repro_sim_scatter_K.png')})",
        "",
        _sim_verdict(rows_out, run.methods),
    ]
    run.section("repro-simulation", "\n".join(text))
    return rows_out


def _snr_key(snr: float) -> str:
    return str(int(snr) if float(snr).is_integer() else snr)


def _sim_verdict(rows_out: dict, methods: list[str]) -> str:
    """Plain sentences: who wins per SNR and parameter, and how far from Bayes."""
    lines = ["**Reading.**"]
    for snr_key, per in rows_out["snr"].items():
        for p in ("D", "K"):
            r = {m: per[m]["metrics"][p]["all"]["rmse"] for m in methods}
            if not r:
                continue
            best = min(r, key=lambda m: r[m])
            bayes = per["bayes"]["metrics"][p]["all"]["rmse"]
            parts = ", ".join(f"{m} {r[m]:.3f}" for m in methods)
            line = (f"- SNR {snr_key}, {p}: {parts} (Bayes-optimal {bayes:.3f}); best method: "
                    f"{best}.")
            if "vae-gmm" in r and best != "vae-gmm":
                line += " " + _not_best("vae-gmm", r["vae-gmm"], best, r[best])
            lines.append(line)
    return "\n".join(lines)


# ============================================================================ 2. sensitivity
def _sensitivity(run: _Run) -> dict:
    from mixmap.simulation import simulate

    s = run.s
    method = next((m for m in s.sens_methods if m in run.methods), None)
    out: dict = {"method": method, "snr": s.sens_snr, "n_voxels": s.sens_n, "latent_dim": [],
                 "kl_weight": [], "notes": []}
    if method is None:
        note = ("skipped: neither vae-gmm nor vae is registered in mixmap.fitting.FITTERS (or "
                "selected) in this run")
        out["notes"].append(note)
        _placeholder(run, "repro_sensitivity.png", f"Hyper-parameter sensitivity {note}")
        run.json("repro_sensitivity.json", out)
        run.csv("repro_sensitivity.csv", ["sweep", "value", "rmse_D", "rmse_K", "seconds",
                                          "config"], [])
        run.section("repro-sensitivity", f"Regenerate: `{run.command}`. {note}.")
        return out
    from mixmap.evaluation.scores import metrics

    sim = simulate("paper-msdki", "hcp", snr=s.sens_snr, n_voxels=s.sens_n, seed=s.seed + 1)
    lsq, _, _ = _fit(run, "lsq", "msdki", sim.signals, sim.acquisition)
    lsq_rmse = metrics(lsq.params, sim.truth, None, None, ["D"])["D"]["all"]["rmse"]
    out["lsq_rmse_D"] = lsq_rmse
    csv_rows = []
    for sweep, values in (("latent_dim", s.latent_dims), ("kl_weight", s.kl_weights)):
        for v in values:
            run.log(f"sensitivity: {method} {sweep}={v:g} on {s.sens_n} voxels")
            opts = {sweep: v}
            config = None
            res = None
            if s.sens_config:
                try:
                    res, _, sec = _fit(run, method, "msdki", sim.signals, sim.acquisition,
                                       epochs=s.sens_epochs, extra=s.sens_options,
                                       config=s.sens_config, **opts)
                    config = s.sens_config
                except TypeError:
                    res = None
            if res is None:
                try:
                    res, _, sec = _fit(run, method, "msdki", sim.signals, sim.acquisition,
                                       epochs=s.sens_epochs, extra=s.sens_options, **opts)
                    config = "default"
                except (TypeError, ValueError) as exc:
                    out["notes"].append(f"{sweep}={v:g}: {exc}")
                    continue
            m = metrics(res.params, sim.truth, None, None, ["D", "K"])
            entry = {"value": v, "rmse_D": m["D"]["all"]["rmse"], "rmse_K": m["K"]["all"]["rmse"],
                     "seconds": sec, "config": config, "epochs": len(res.history) or None}
            out[sweep].append(entry)
            csv_rows.append([sweep, v, entry["rmse_D"], entry["rmse_K"], sec, config])
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, sweep, label in ((axes[0], "latent_dim", "latent dimension"),
                             (axes[1], "kl_weight", "KL weight")):
        pts = out[sweep]
        if pts:
            x = [p["value"] for p in pts]
            y = [p["rmse_D"] for p in pts]
            ax.plot(x, y, "o-", label=method)
            k = int(np.argmin(y))
            ax.plot([x[k]], [y[k]], "r*", ms=14, label=f"optimum {x[k]:g}")
            out[f"best_{sweep}"] = x[k]
        ax.axhline(lsq_rmse, color="grey", ls="--", label=f"lsq {lsq_rmse:.3f}")
        ax.set_xscale("log", base=2 if sweep == "latent_dim" else 10)
        ax.set_xlabel(label)
        ax.set_ylabel("RMSE of D (µm²/ms)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{method} sensitivity, paper-msdki SNR {s.sens_snr:g}, {s.sens_n} voxels",
                 fontsize=10)
    fig.tight_layout()
    run.figure("repro_sensitivity.png", fig)
    run.json("repro_sensitivity.json", out)
    run.csv("repro_sensitivity.csv", ["sweep", "value", "rmse_D", "rmse_K", "seconds", "config"],
            csv_rows)
    trows = [[sw, p["value"], p["rmse_D"], p["rmse_K"], p["config"], p["epochs"]]
             for sw in ("latent_dim", "kl_weight") for p in out[sw]]
    cfg = {p["config"] for sw in ("latent_dim", "kl_weight") for p in out[sw]}
    body = [
        f"Regenerate: `{run.command}`. {method} on paper-msdki (SNR {s.sens_snr:g}, "
        f"{s.sens_n} voxels), one option varied at a time, configuration "
        f"{', '.join(sorted(c for c in cfg if c))} (the default configuration ties the latent "
        f"size to the parameter count, so the sweep uses the paper's decoder). lsq RMSE of D: "
        f"{lsq_rmse:.3f}.",
        "",
        markdown_table(["sweep", "value", "RMSE D", "RMSE K", "config", "epochs run"], trows,
                       floatfmt=".4g"),
        "",
        f"![sensitivity]({run.rel(run.fig_dir / 'repro_sensitivity.png')})",
    ]
    for sw in ("latent_dim", "kl_weight"):
        pts = out[sw]
        if pts:
            y = [p["rmse_D"] for p in pts]
            spread = max(y) - min(y)
            body.append(f"- {sw}: optimum {out[f'best_{sw}']:g} (RMSE D {min(y):.3f}); "
                        f"range over the grid {spread:.3f}"
                        + (f"; every value beats lsq ({lsq_rmse:.3f})" if max(y) < lsq_rmse
                           else f"; not every value beats lsq ({lsq_rmse:.3f})"))
    body += [f"- note: {n}" for n in out["notes"]]
    run.section("repro-sensitivity", "\n".join(body))
    return out


# ============================================================================ 3-4. real data
@dataclass
class _Scan:
    signals: np.ndarray
    acq: Acquisition
    mask: np.ndarray  # 3-D, the fitted voxels
    coords: np.ndarray  # (n, 3) voxel index of each row
    slice_z: int
    sigma: float
    note: str


def _row_coords(data, dwi_path: Path) -> np.ndarray:
    """Voxel index of each row of ``load_dwi``'s signals, checked against the image itself
    (the row order of load_dwi is not necessarily the C order of the mask)."""
    import nibabel as nib

    mask = data.mask
    c_order = np.argwhere(mask)
    z_major = np.concatenate([
        np.column_stack([np.argwhere(mask[:, :, z]), np.full(int(mask[:, :, z].sum()), z)])
        for z in range(mask.shape[2])
    ])
    vol0 = np.asarray(nib.load(str(dwi_path)).dataobj[..., 0], dtype=np.float32)
    for cand in (c_order, z_major):
        if np.allclose(vol0[tuple(cand.T)], data.signals[:, 0]):
            return cand
    raise RuntimeError(f"{dwi_path}: cannot match the rows of load_dwi to voxels")


def _load_scan(run: _Run) -> _Scan:
    from mixmap import datasets
    from mixmap.io import load_dwi

    paths = datasets.fetch(run.s.dataset)
    data = load_dwi(paths["dwi"], paths["bvals"], paths["bvecs"], paths["mask"])
    coords = _row_coords(data, paths["dwi"])
    counts = data.mask.sum((0, 1))
    z = int(np.argmax(counts))
    keep = np.ones(len(coords), dtype=bool)
    note = f"all {len(coords)} masked voxels of both slices fitted; slice z={z} shown"
    if run.s.real_crop and run.s.real_crop < len(coords):
        in_z = coords[:, 2] == z
        centre = coords[in_z, :2].mean(0)
        dist = np.abs(coords[:, :2] - centre).max(1)
        order = np.sort(dist[in_z])
        half = order[min(run.s.real_crop, order.size) - 1]
        keep = in_z & (dist <= half)
        note = (f"crop of {int(keep.sum())} voxels (a square around the centre of slice z={z}) "
                f"of {len(coords)}")
    mask = np.zeros(data.mask.shape, dtype=bool)
    mask[tuple(coords[keep].T)] = True
    signals = data.signals[keep]
    sigma = noise_sigma_from_repeats(signals, data.acquisition)
    return _Scan(signals, data.acquisition, mask, coords[keep], z, float(sigma), note)


def _slice_image(scan: _Scan, values: np.ndarray) -> np.ndarray:
    """(n,) -> 2-D slice (NaN outside), cropped to the fitted voxels' bounding box."""
    vol = np.full(scan.mask.shape, np.nan, dtype=np.float32)
    vol[tuple(scan.coords.T)] = values
    img = vol[:, :, scan.slice_z]
    m = scan.mask[:, :, scan.slice_z]
    xs, ys = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return img[xs[0]: xs[-1] + 1, ys[0]: ys[-1] + 1].T  # rows = y, for imshow


def _map_grid(run: _Run, scan: _Scan, rows: list[str], cols: list[str], get, ranges, title,
              name, cmap="gray"):
    plt = _plt()
    fig, axes = plt.subplots(len(rows), len(cols), squeeze=False,
                             figsize=(2.4 * len(cols) + 0.6, 2.4 * len(rows)))
    for j, c in enumerate(cols):
        vmin, vmax = ranges[c]
        for i, r in enumerate(rows):
            ax = axes[i, j]
            v = get(r, c)
            ax.set_xticks([])
            ax.set_yticks([])
            if v is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
                continue
            im = ax.imshow(_slice_image(scan, v), origin="lower", cmap=cmap, vmin=vmin,
                           vmax=vmax, interpolation="nearest")
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(r, fontsize=9)
        fig.colorbar(im, ax=axes[:, j].tolist(), shrink=0.6, location="bottom", pad=0.02)
    fig.suptitle(title, fontsize=10)
    return run.figure(name, fig)


def _predicted(model_name: str, res: FitResult, acq: Acquisition) -> np.ndarray:
    model = get_model(model_name)
    params = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64)
              for k, v in res.params.items()}
    with torch.no_grad():
        return model.forward(params, acq).numpy()


def icc31(a: np.ndarray, b: np.ndarray) -> float:
    """ICC(3,1) (two-way mixed, consistency, single measure) of two measurements per voxel."""
    x = np.stack([a, b], 1).astype(np.float64)
    x = x[np.isfinite(x).all(1)]
    n, k = x.shape
    if n < 2:
        return float("nan")
    grand = x.mean()
    rows = x.mean(1)
    cols = x.mean(0)
    ms_r = k * ((rows - grand) ** 2).sum() / (n - 1)
    resid = x - rows[:, None] - cols[None, :] + grand
    ms_e = (resid**2).sum() / ((n - 1) * (k - 1))
    den = ms_r + (k - 1) * ms_e
    return float((ms_r - ms_e) / den) if den > 0 else float("nan")


def split_halves(acq: Acquisition) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of each shell's directions (alternate members in acquisition
    order), every b=0 volume in both."""
    b0 = np.flatnonzero(acq.b0_mask)
    h1, h2 = [b0], [b0]
    for sh in acq.dw_shells():
        idx = np.asarray(sh.indices)
        h1.append(idx[0::2])
        h2.append(idx[1::2])
    return np.sort(np.concatenate(h1)), np.sort(np.concatenate(h2))


def _smooth_in_mask(scan: _Scan, values: np.ndarray, sd: float) -> np.ndarray:
    """Gaussian smoothing inside the mask (normalised convolution, in-plane per slice)."""
    from scipy.ndimage import gaussian_filter

    vol = np.zeros(scan.mask.shape)
    vol[tuple(scan.coords.T)] = values
    m = scan.mask.astype(np.float64)
    sig = (sd, sd, 0)
    num = gaussian_filter(vol * m, sig)
    den = gaussian_filter(m, sig)
    return (num / np.maximum(den, 1e-12))[tuple(scan.coords.T)]


def _smooth_directions(scan: _Scan, n: np.ndarray, sd: float) -> np.ndarray:
    """Smooth the dyadic tensor n nᵀ inside the mask and take its principal eigenvector."""
    T = np.einsum("ni,nj->nij", n, n).reshape(-1, 9)
    Ts = np.stack([_smooth_in_mask(scan, T[:, i], sd) for i in range(9)], 1).reshape(-1, 3, 3)
    _, vec = np.linalg.eigh(Ts)
    return vec[:, :, -1]


def _edges(scan: _Scan, values: np.ndarray, frac: float = 0.2) -> np.ndarray:
    """Voxels in the top ``frac`` of the in-plane gradient magnitude of ``values``."""
    vol = np.zeros(scan.mask.shape)
    vol[tuple(scan.coords.T)] = values
    gx, gy = np.gradient(vol, axis=(0, 1))
    g = np.hypot(gx, gy)[tuple(scan.coords.T)]
    # neighbours outside the mask make every boundary voxel an "edge"; keep interior ones
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(scan.mask, structure=np.ones((3, 3, 1)))[tuple(scan.coords.T)]
    thr = np.quantile(g[inner], 1 - frac) if inner.any() else np.inf
    return inner & (g >= thr)


def _real(run: _Run) -> dict:
    s = run.s
    out: dict = {"dataset": s.dataset, "methods": run.methods}
    figs = ["repro_real_ballstick.png", "repro_real_msdki.png", "repro_real_std.png",
            "repro_real_clusters.png", "repro_latent.png", "repro_phantom.png"]
    try:
        scan = _load_scan(run)
    except RuntimeError as exc:  # e.g. PyPI unreachable for datasets.fetch
        note = f"real-data part skipped: {exc}"
        run.log(note)
        for f in figs:
            _placeholder(run, f, note)
        out["skipped"] = note
        for name in ("repro_real.json", "repro_repeatability.json", "repro_goodness.json",
                     "repro_phantom.json"):
            run.json(name, out)
        for name in ("repro_repeatability.csv", "repro_goodness.csv", "repro_phantom.csv"):
            run.csv(name, ["note"], [[note]])
        for sec in ("repro-real-maps", "repro-latent", "repro-repeatability",
                    "repro-goodness-of-fit", "repro-phantom"):
            run.section(sec, f"Regenerate: `{run.command}`. {note}")
        return out
    out.update(voxels=int(scan.signals.shape[0]), note=scan.note, sigma_b0=scan.sigma,
               acquisition=scan.acq.describe())
    run.log(f"real data {s.dataset}: {scan.note}; σ(b0) = {scan.sigma:.2f}")

    fits: dict = {}  # model -> method -> FitResult
    fitters: dict = {}
    seconds: dict = {}
    for model in ("ball-stick", "msdki"):
        fits[model], fitters[model], seconds[model] = {}, {}, {}
        for m in run.methods:
            run.log(f"real data: {m} {model} on {scan.signals.shape[0]} voxels")
            res, fitter, sec = _fit(run, m, model, scan.signals, scan.acq,
                                    epochs=run.s.real_epochs)
            fits[model][m], fitters[model][m], seconds[model][m] = res, fitter, sec
    out["seconds"] = seconds

    # ---- maps (Fig. 2 and 5)
    for model, name in (("ball-stick", "repro_real_ballstick.png"),
                        ("msdki", "repro_real_msdki.png")):
        cols = list(REAL_PARAMS[model])
        _map_grid(run, scan, run.methods, cols,
                  lambda r, c, model=model: fits[model][r].params[c],
                  DISPLAY_RANGE, f"{model} on {s.dataset} (slice z={scan.slice_z}), posterior "
                  f"mean / estimate, one colour scale per column", name)
    std_cols = [(model, p) for model in ("ball-stick", "msdki") for p in REAL_PARAMS[model]]
    std_ranges = {}
    for model, p in std_cols:
        vals = np.concatenate([fits[model][m].std[p] for m in run.methods
                               if p in fits[model][m].std] or [np.zeros(1)])
        vals = vals[np.isfinite(vals)]
        std_ranges[f"{model} {p}"] = (0.0, float(np.percentile(vals, 99)) if vals.size else 1.0)

    def get_std(r, c):
        model, p = c.split(" ")
        v = fits[model][r].std.get(p)
        return None if v is None else np.where(np.isfinite(v), v, np.nan)

    _map_grid(run, scan, run.methods, list(std_ranges), get_std, std_ranges,
              "posterior std (learned) / asymptotic std (lsq), one colour scale per column",
              "repro_real_std.png", cmap="magma")

    # ---- clusters and latent space (Fig. 3)
    latent_note = _clusters_and_latent(run, scan, fits, fitters)
    out["latent"] = latent_note

    # ---- 4b goodness of fit (first: a fit that does not explain the data is left out of
    # the "best" sentences of the other checks, where a collapsed map looks very repeatable)
    out["goodness"] = _goodness(run, scan, fits)
    run.unfit = _unfit(out["goodness"])
    # ---- 4a repeatability
    out["repeatability"] = _repeatability(run, scan)
    # ---- 4c phantom
    out["phantom"] = _phantom(run, scan, fits)

    real_json = {k: v for k, v in out.items()
                 if k not in ("repeatability", "goodness", "phantom")}
    real_json["median_std"] = {
        model: {m: {p: float(np.nanmedian(fits[model][m].std[p]))
                    for p in REAL_PARAMS[model] if p in fits[model][m].std}
                for m in run.methods} for model in fits}
    run.json("repro_real.json", real_json)
    body = [
        f"Regenerate: `{run.command}`. Scan `{s.dataset}` "
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
                       [[m] + [real_json["median_std"][c.split(' ')[0]][m].get(c.split(' ')[1])
                               for c in std_ranges] for m in run.methods], floatfmt=".4f"),
        "",
        "The maps alone do not say which method is right (no truth); see repro-repeatability, "
        "repro-goodness-of-fit and repro-phantom for numbers.",
    ]
    run.section("repro-real-maps", "\n".join(body))
    run.section("repro-latent", f"Regenerate: `{run.command}`. {latent_note}\n\n"
                f"![latent]({run.rel(run.fig_dir / 'repro_latent.png')})")
    return out


def _clusters_and_latent(run: _Run, scan: _Scan, fits, fitters) -> str:
    plt = _plt()
    gmm = "vae-gmm" if "vae-gmm" in run.methods else None
    if gmm is None:
        note = "vae-gmm not run: no cluster map and no latent space"
        _placeholder(run, "repro_real_clusters.png", note)
        _placeholder(run, "repro_latent.png", note)
        return note
    # cluster maps
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
    for ax, model in zip(axes, ("ball-stick", "msdki"), strict=True):
        probs = fits[model][gmm].cluster_probs
        ax.set_xticks([])
        ax.set_yticks([])
        if probs is None:
            ax.set_title(f"{model}: no cluster probabilities")
            continue
        k = probs.shape[1]
        ax.imshow(_slice_image(scan, probs.argmax(1).astype(np.float32)), origin="lower",
                  cmap="tab10", vmin=-0.5, vmax=9.5, interpolation="nearest")
        used = np.unique(probs.argmax(1)).size
        ax.set_title(f"{model}: vae-gmm argmax q(y|x)\n{used} of {k} components used",
                     fontsize=9)
    fig.tight_layout()
    run.figure("repro_real_clusters.png", fig)
    return _latent(run, scan, fits, fitters)


#: Display coordinates of the latent figure per model (None: principal components) and
#: their axis labels (None: the projection's own).
LATENT_AXES = {"msdki": ("D", "K"), "ball-stick": None}
LATENT_LABELS = {"msdki": ("D (µm²/ms)", "K"), "ball-stick": None}
#: Posterior draws per voxel shown in the latent figure.
LATENT_DRAWS = 4


def _latent(run: _Run, scan: _Scan, fits, fitters) -> str:
    """The paper's Fig. 3: posterior samples of z (vae-gmm's ``encode``) in 2-D, coloured by
    cluster, the learned prior's components overlaid; the simulation (true and vae-gmm
    clusters) and the real scan (vae-gmm clusters)."""
    from mixmap.plots import latent_panel, latent_projection

    plt = _plt()
    panels = []  # (title, view, labels, names)
    notes = []
    if run.latent_sim is not None:
        fitter, sim, snr = run.latent_sim
        lat = fitter.encode(sim.signals, sim.acquisition, n_samples=LATENT_DRAWS)
        view = latent_projection(lat, LATENT_AXES["msdki"], LATENT_LABELS["msdki"])
        names = [c.name for c in sim.preset.clusters]
        panels.append((f"simulation (msdki, SNR {snr:g}): true cluster", view, sim.labels,
                       names))
        panels.append((f"simulation (msdki, SNR {snr:g}): vae-gmm cluster", view,
                       lat.cluster_probs.argmax(1), None))
        notes.append(_latent_note(f"simulation SNR {snr:g}", lat, sim.labels))
    else:
        notes.append("simulation panels left out (vae-gmm was not run on the simulation)")
    for model in ("msdki", "ball-stick"):
        lat = fitters[model]["vae-gmm"].encode(scan.signals, scan.acq,
                                                n_samples=LATENT_DRAWS)
        view = latent_projection(lat, LATENT_AXES[model], LATENT_LABELS[model])
        panels.append((f"{run.s.dataset} ({model}): vae-gmm cluster", view,
                       lat.cluster_probs.argmax(1), None))
        notes.append(_latent_note(f"{run.s.dataset} {model}", lat, None))
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(4.2 * len(panels), 4.0))
    for ax, (title, view, labels, names) in zip(axes[0], panels, strict=True):
        latent_panel(ax, view, labels, names, title=title)
    fig.suptitle(f"vae-gmm latent space: {LATENT_DRAWS} posterior samples of z per voxel "
                 f"(refined q, importance-weighted), in the prior's coordinates; crosses and "
                 f"black ellipses (1σ dashed, 2σ dotted): the learned prior's components y",
                 fontsize=9)
    fig.tight_layout()
    run.figure("repro_latent.png", fig)
    lead = (f"Latent space of vae-gmm (paper Fig. 3), from `VAEFitter.encode`: "
            f"{LATENT_DRAWS} posterior samples of z per voxel, drawn from the same "
            f"importance-weighted posterior (after the per-voxel refinement of q) whose mean "
            f"the maps show. In the default configuration z is the model's unbounded parameter "
            f"vector and the learned mixture prior is Gaussian in the bounded parameters, so "
            f"the samples are drawn in those coordinates, where the prior's components are "
            f"exact ellipses: MSDKI on its D (µm²/ms) and K axes (S0 not shown; the ellipses "
            f"are the components' marginals), ball-stick on the first two principal "
            f"components of its standardised scalar coordinates (S0 in working units, f, "
            f"Dpar, Diso; the stick direction left out). Panels: the simulation coloured by "
            f"the true cluster and by vae-gmm's most likely component, then the real scan "
            f"coloured by vae-gmm's component.")
    return lead + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _latent_note(what: str, lat, truth: np.ndarray | None) -> str:
    """One line per panel group: how many components are used, their weights and means."""
    k = lat.cluster_probs.argmax(1)
    used = np.bincount(k, minlength=lat.prior_means.shape[0])
    comps = []
    for j in np.argsort(-lat.prior_weights):
        mean = ", ".join(f"{a} {m:.2f}" for a, m in zip(lat.axes, lat.prior_means[j],
                                                         strict=True)
                         if not a.endswith(("_x", "_y", "_z")) and a != "S0")
        comps.append(f"component {j}: p(y) {lat.prior_weights[j]:.2f}, {used[j]} voxels, "
                     f"mean {mean}")
    line = f"{what}: " + "; ".join(comps)
    if truth is not None:
        line += f"; adjusted Rand index with the true clusters {adjusted_rand(truth, k):.2f}"
    return line + "."


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1: the same partition, about 0: chance)."""
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1)

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(
        np.array([float(len(ia))]))
    expected = rows * cols / total if total else 0.0
    top = 0.5 * (rows + cols) - expected
    return float((both - expected) / top) if top else 1.0


def _scalar_params(model_name: str) -> list[str]:
    return [p.name for p in get_model(model_name).parameters if not p.is_direction]


def _repeatability(run: _Run, scan: _Scan) -> dict:
    from mixmap.evaluation.scores import angular_error

    h1, h2 = split_halves(scan.acq)
    out: dict = {"halves": [len(h1), len(h2)], "models": {}}
    rows = []
    for model in ("ball-stick", "msdki"):
        out["models"][model] = {}
        for m in run.methods:
            run.log(f"repeatability: {m} {model}, two halves of {len(h1)} and {len(h2)} volumes")
            ep = run.s.real_epochs
            ra, _, _ = _fit(run, m, model, scan.signals[:, h1], scan.acq.subset(h1), epochs=ep)
            rb, _, _ = _fit(run, m, model, scan.signals[:, h2], scan.acq.subset(h2), epochs=ep)
            entry = {}
            for p in _scalar_params(model):
                a, b = ra.params[p].astype(np.float64), rb.params[p].astype(np.float64)
                ok = np.isfinite(a) & np.isfinite(b)
                entry[p] = {"rms_diff": float(np.sqrt(np.mean((a[ok] - b[ok]) ** 2))),
                            "icc31": icc31(a, b)}
                rows.append([model, m, p, entry[p]["rms_diff"], entry[p]["icc31"]])
            if "n" in ra.params:
                ang = angular_error(ra.params["n"], rb.params["n"])
                entry["n"] = {"median_angle_deg": float(np.median(ang))}
                rows.append([model, m, "n (median angle °)", float(np.median(ang)), None])
            out["models"][model][m] = entry
    run.json("repro_repeatability.json", out)
    run.csv("repro_repeatability.csv", ["model", "method", "param", "rms_diff", "icc31"], rows)
    body = [
        f"Regenerate: `{run.command}`. Each shell's directions split into two disjoint halves "
        f"(alternate volumes; all b=0 in both: {len(h1)} and {len(h2)} volumes), each half "
        f"fitted alone with every method. RMS difference between the two halves' maps "
        f"(lower is better) and ICC(3,1) (higher is better). A strong prior lowers the "
        f"difference by itself (it pulls both halves to the same place), so read it with "
        f"repro-phantom, which has a truth.",
        "",
        markdown_table(["model", "method", "param", "RMS diff", "ICC(3,1)"], rows,
                       floatfmt=".3f"),
        "",
        _rank_sentences(out["models"], "rms_diff", "RMS difference", lower=True, unfit=run.unfit),
    ]
    run.section("repro-repeatability", "\n".join(body))
    return out


def _unfit(goodness: dict, factor: float = 1.5) -> set:
    """(model, method) whose median residual exceeds ``factor`` × that of least squares."""
    bad = set()
    for model, per in goodness["models"].items():
        ref = per.get("lsq", {}).get("median_rms")
        for m, e in per.items():
            if ref and e["median_rms"] > factor * ref:
                bad.add((model, m))
    return bad


def _not_best(m: str, v: float, best: str, vb: float) -> str:
    """How far ``m`` is from the best method (a tie within 2% is called a tie)."""
    if abs(v - vb) <= 0.02 * abs(vb):
        return f"{m} ties with it ({v:.3f} vs {vb:.3f}, within 2%)."
    return f"{m} does **not** win: {v:.3f} vs {best} {vb:.3f} ({100 * (v / vb - 1):+.0f}%)."


def _rank_sentences(models: dict, key: str, label: str, lower: bool,
                    unfit: set | None = None) -> str:
    lines = []
    unfit = unfit or set()
    for model, per in models.items():
        dropped = [m for m in per if (model, m) in unfit]
        if dropped:
            lines.append(f"- {model}: {', '.join(dropped)} left out of the ranking: its residual "
                         f"is over 1.5× that of lsq (repro-goodness-of-fit), so its maps do not "
                         f"explain the data and their {label} means nothing.")
        methods = [m for m in per if (model, m) not in unfit]
        params = [p for p in per[methods[0]] if key in per[methods[0]][p]] if methods else []
        for p in params:
            vals = {m: per[m][p][key] for m in methods
                    if per[m].get(p, {}).get(key) is not None
                    and math.isfinite(per[m][p][key])}
            if not vals:
                continue
            best = (min if lower else max)(vals, key=lambda m: vals[m])
            line = f"- {model} {p}: best {label} {best} ({vals[best]:.3f})"
            if "vae-gmm" in vals and best != "vae-gmm":
                line += "; " + _not_best("vae-gmm", vals["vae-gmm"], best, vals[best])
            lines.append(line.rstrip(".") + ".")
    return "\n".join(lines)


def _goodness(run: _Run, scan: _Scan, fits) -> dict:
    out: dict = {"sigma_b0": scan.sigma, "models": {}}
    rows = []
    for model in fits:
        out["models"][model] = {}
        for m, res in fits[model].items():
            pred = _predicted(model, res, scan.acq)
            resid = scan.signals.astype(np.float64) - pred
            rms = np.sqrt(np.mean(resid**2, 1))
            dw = ~scan.acq.b0_mask
            rms_dw = np.sqrt(np.mean(resid[:, dw] ** 2, 1))
            entry = {"median_rms": float(np.median(rms)), "mean_rms": float(np.mean(rms)),
                     "median_rms_dw": float(np.median(rms_dw)),
                     "ratio_to_sigma": float(np.median(rms) / scan.sigma)}
            out["models"][model][m] = entry
            rows.append([model, m, entry["median_rms"], entry["median_rms_dw"],
                         entry["ratio_to_sigma"]])
    run.json("repro_goodness.json", out)
    run.csv("repro_goodness.csv", ["model", "method", "median_rms", "median_rms_dw",
                                   "ratio_to_sigma"], rows)
    body = [
        f"Regenerate: `{run.command}`. Residual RMS per voxel between the measured signals and "
        f"the model's prediction from each method's maps (median over voxels), against the noise "
        f"σ = {scan.sigma:.2f} from the b=0 volumes. A ratio near 1 means the fit explains the "
        f"data down to the noise; least squares minimises this residual by construction, so a "
        f"prior-regularised fit is expected to sit slightly above it — a ratio well above 1 means "
        f"the prior overrides the data. MSDKI models the direction-averaged signal only, so in "
        f"anisotropic tissue its residual also holds the signal's direction dependence: a "
        f"ratio above 1 for every method there is the model's, not the fitter's.",
        "",
        markdown_table(["model", "method", "median RMS", "median RMS (b>0)", "RMS / σ"], rows,
                       floatfmt=".3f"),
    ]
    run.section("repro-goodness-of-fit", "\n".join(body))
    return out


def _phantom(run: _Run, scan: _Scan, fits) -> dict:
    from mixmap.evaluation.scores import angular_error

    s = run.s
    sd = s.phantom_smooth_vox
    rng = np.random.default_rng(s.seed + 7)
    out: dict = {"smooth_sd_vox": sd, "sigma": scan.sigma, "noise": "gaussian", "models": {}}
    rows = []
    truths, ests = {}, {}
    for model in ("ball-stick", "msdki"):
        mdl = get_model(model)
        base = fits[model]["lsq"] if "lsq" in fits[model] else next(iter(fits[model].values()))
        truth = {}
        for p in mdl.parameters:
            v = base.params[p.name]
            if p.is_direction:
                truth[p.name] = _smooth_directions(scan, v.astype(np.float64), sd)
            else:
                lo, hi = p.lower, p.upper
                if p.scaled:
                    hi = np.inf
                truth[p.name] = np.clip(_smooth_in_mask(scan, v.astype(np.float64), sd),
                                        lo, hi)
        with torch.no_grad():
            clean = mdl.forward({k: torch.as_tensor(v) for k, v in truth.items()},
                                scan.acq).numpy()
        noisy = (clean + scan.sigma * rng.standard_normal(clean.shape)).astype(np.float32)
        truths[model] = truth
        ests[model] = {}
        out["models"][model] = {}
        scalars = [p for p in REAL_PARAMS[model]]
        edge = {p: _edges(scan, truth[p]) for p in scalars}
        for m in run.methods:
            run.log(f"phantom: {m} {model}")
            res, _, _ = _fit(run, m, model, noisy, scan.acq, epochs=run.s.real_epochs)
            ests[model][m] = res
            entry = {}
            for p in scalars:
                err = res.params[p].astype(np.float64) - truth[p]
                ok = np.isfinite(err)
                e_ok = ok & edge[p]
                entry[p] = {"rmse": float(np.sqrt(np.mean(err[ok] ** 2))),
                            "rmse_edges": float(np.sqrt(np.mean(err[e_ok] ** 2)))
                            if e_ok.any() else None,
                            "bias": float(np.mean(err[ok]))}
                rows.append([model, m, p, entry[p]["rmse"], entry[p]["rmse_edges"],
                             entry[p]["bias"]])
            if "n" in truth:
                ang = angular_error(res.params["n"], truth["n"])
                fw = truth["f"] > 0.3
                entry["n"] = {"median_angle_deg": float(np.median(ang[fw])) if fw.any() else None}
                rows.append([model, m, "n (median °, f>0.3)", entry["n"]["median_angle_deg"],
                             None, None])
            out["models"][model][m] = entry
    run.json("repro_phantom.json", out)
    run.csv("repro_phantom.csv", ["model", "method", "param", "rmse", "rmse_edges", "bias"],
            rows)
    # figure: truth and each method's error for ball-stick f and MSDKI K
    cols = [("ball-stick", "f"), ("msdki", "K")]
    rows_fig = ["truth", *run.methods]
    ranges = {f"{m} {p}": DISPLAY_RANGE[p] for m, p in cols}

    def get(r, c):
        model, p = c.split(" ")
        return truths[model][p] if r == "truth" else ests[model][r].params[p]

    _map_grid(run, scan, rows_fig, list(ranges), get, ranges,
              f"phantom: smoothed lsq maps (Gaussian sd {sd:g} voxel) as truth, scan's σ",
              "repro_phantom.png")
    body = [
        f"Regenerate: `{run.command}`. Truth: the scan's least-squares maps smoothed inside the "
        f"mask (Gaussian, sd {sd:g} voxel; stick directions through the smoothed dyadic tensor); "
        f"signals simulated on the scan's own acquisition with Gaussian noise σ = "
        f"{scan.sigma:.2f} (from its b=0 volumes), then fitted with every method. RMSE over all "
        f"voxels and over the 20% interior voxels with the steepest truth gradient (\"edges\": "
        f"where a prior that blurs small anatomy pays). The truth is smoother than real tissue, "
        f"which favours methods that smooth.",
        "",
        markdown_table(["model", "method", "param", "RMSE", "RMSE edges", "bias"], rows,
                       floatfmt=".4f"),
        "",
        f"![phantom]({run.rel(run.fig_dir / 'repro_phantom.png')})",
        "",
        _rank_sentences(out["models"], "rmse", "RMSE", lower=True),
        _rank_sentences(out["models"], "rmse_edges", "edge RMSE", lower=True),
    ]
    run.section("repro-phantom", "\n".join(body))
    return out


# ============================================================================ entry point
def run_reproduce(out: Path = Path("docs"), quick: bool = False, quiet: bool = False,
                  methods: list[str] | None = None, overrides: dict | None = None) -> list[Path]:
    """Regenerate the figures (``<out>/figures/repro_*.png``), numbers
    (``<out>/repro_*.json|csv``) and ``repro-…`` sections of ``<out>/RESULTS.md``.

    Parameters
    ----------
    out
        Output folder (``docs``).
    quick
        Small configuration (:data:`QUICK`): a few minutes on 2 CPU cores, every file written.
    quiet
        No progress output (fitters are quiet too).
    methods
        Subset of ``lsq``, ``ssl``, ``vae``, ``vae-gmm`` (default: all); methods not registered
        in :data:`mixmap.fitting.FITTERS` are skipped with a note.
    overrides
        Fields of :class:`Settings` to change (a reduced run); list what was reduced in
        ``reductions`` so RESULTS.md says so.

    Returns
    -------
    The paths written (figures, JSON, CSV and RESULTS.md).
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = QUICK if quick else FULL
    if overrides:
        settings = replace(settings, **overrides)
    wanted = list(methods) if methods else list(ALL_METHODS)
    unknown = [m for m in wanted if m not in ALL_METHODS and m not in FITTERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    use = [m for m in wanted if m in FITTERS]
    skipped = [m for m in wanted if m not in FITTERS]
    if "lsq" not in use:
        use.insert(0, "lsq")  # the baseline and the phantom's truth
    run = _Run(Path(out), settings, quiet, use)
    if skipped:
        run.log(f"not registered in FITTERS, skipped: {', '.join(skipped)}")
    run.log(f"settings {settings.name}: methods {', '.join(use)}")
    run.section("repro-overview", f"Regenerate: `{run.command}` (running or interrupted; "
                f"configuration {settings.name}).")

    for part, fn in (("simulation", _simulation), ("sensitivity", _sensitivity),
                     ("real", _real)):
        t = time.perf_counter()
        fn(run)
        run.times[part] = time.perf_counter() - t
        run.log(f"{part} done in {run.times[part]:.0f} s")

    total = time.perf_counter() - run.t0
    meta = {"settings": asdict(settings), "methods": use, "skipped": skipped,
            "seconds": run.times, "total_seconds": total, "torch_threads": torch.get_num_threads()}
    run.json("repro_run.json", meta)
    body = [
        f"Regenerate: `{run.command}` (configuration **{settings.name}**; "
        f"{torch.get_num_threads()} CPU threads; {total / 60:.1f} min: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in run.times.items()) + ").",
        f"- methods: {', '.join(use)}",
    ]
    if skipped:
        body.append(f"- **skipped** (not registered in `mixmap.fitting.FITTERS` when this ran): "
                    f"{', '.join(skipped)}")
    if settings.reductions:
        body += [f"- **reduced**: {r}" for r in settings.reductions]
    body.append(f"- learned fitters: epochs {settings.epochs or 'fitter default'} (simulation), "
                f"{settings.real_epochs or settings.epochs or 'fitter default'} (real data), "
                f"{settings.sens_epochs or settings.epochs or 'fitter default'} (sensitivity)"
                + (f"; options {settings.learned_options}" if settings.learned_options else "")
                + (f"; lsq options {settings.lsq_options}" if settings.lsq_options else ""))
    run.section("repro-overview", "\n".join(body))
    run.log(f"done in {total:.0f} s; {len(run.written)} files")
    return list(run.written)


__all__ = ["FULL", "QUICK", "Settings", "icc31", "run_reproduce", "split_halves"]
