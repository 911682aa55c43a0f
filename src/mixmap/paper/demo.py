"""``mixmap demo``: the paper's MSDKI simulation, fitted by each method, scored against the truth
and the Bayes-optimal reference (and dipy when it is installed), with maps and a scatter figure."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mixmap.api import Fit
from mixmap.fitting import FITTERS, get_fitter
from mixmap.fitting.learned import LearnedFitter
from mixmap.io import AtomicOutput, DWIData
from mixmap.paper.report import machine_description, markdown_table
from mixmap.simulation import grid_shape, simulate, write_simulation


def dipy_msdki(signals: np.ndarray, acquisition) -> dict[str, np.ndarray] | None:
    """dipy's MeanDiffusionKurtosisModel on the same data (D in µm²/ms), or None without dipy."""
    try:
        from dipy.core.gradients import gradient_table
        from dipy.reconst.msdki import MeanDiffusionKurtosisModel
    except ImportError:
        return None
    gtab = gradient_table(acquisition.bvals * 1000.0, bvecs=acquisition.bvecs)
    fit = MeanDiffusionKurtosisModel(gtab).fit(signals.astype(np.float64))
    # dipy reports diffusivity in mm²/s (b in s/mm²): ×1000 gives µm²/ms.
    return {"D": np.asarray(fit.msd) * 1000.0, "K": np.asarray(fit.msk)}


def _as_scan(sim, path: Path):
    """The simulation as a DWIData on a small grid (2 mm voxels), so its maps can be written."""
    import nibabel as nib

    mask = np.zeros(grid_shape(sim.signals.shape[0]), dtype=bool)
    mask.reshape(-1)[: sim.signals.shape[0]] = True
    return DWIData(sim.signals, mask, np.diag([2.0, 2.0, 2.0, 1.0]), nib.Nifti1Header(),
                   sim.acquisition, path)


def _references(sim, estimates: dict, timings: dict) -> None:
    """Add the Bayes-optimal posterior mean (and dipy's MSDKI when installed)."""
    from mixmap.evaluation import bayes_reference

    t = time.perf_counter()
    estimates["Bayes-optimal"] = bayes_reference(sim.signals, sim.acquisition, sim.preset,
                                                 sim.sigma, sim.noise)
    timings["Bayes-optimal"] = time.perf_counter() - t
    t = time.perf_counter()
    dipy_est = dipy_msdki(sim.signals, sim.acquisition)
    if dipy_est is not None:
        estimates["dipy"] = dipy_est
        timings["dipy"] = time.perf_counter() - t


def _table(report: dict, timings: dict, names: list[str], n_voxels: int, snr: float) -> str:
    """The accuracy table (Markdown) with its caption."""
    header = ["method", "time (s)"] + [
        f"RMSE {p} {c}" for p in ("D", "K") for c in ["all", *names]
    ]
    rows = []
    for m, rep in report.items():
        row: list = [m, f"{timings[m]:.1f}"]
        for p in ("D", "K"):
            row.append(rep[p]["all"]["rmse"])
            row += [rep[p]["clusters"][c]["rmse"] for c in names]
        rows.append(row)
    return (
        f"paper-msdki, HCP scheme, {n_voxels} voxels, Gaussian noise, SNR {snr:g} "
        f"(D in µm²/ms; Bayes-optimal = posterior mean under the true prior, the limit no "
        f"method beats on average; times on {machine_description()})\n\n"
        + markdown_table(header, rows)
    )


def run_demo(
    out: str | Path = "demo_output",
    *,
    snr: float = 20.0,
    methods: list[str] | None = None,
    n_voxels: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    force: bool = True,
    quiet: bool = False,
) -> str:
    """Run the demo and return the accuracy table (Markdown). Writes into ``out``: the
    simulated scan (``sim/``), maps per method (``maps-<method>/``), ``scatter.png``,
    ``accuracy.md`` and ``accuracy.json``."""
    from mixmap.evaluation import metrics
    from mixmap.plots import scatter_truth_vs_estimate

    out = Path(out)
    methods = methods or ["lsq"]
    unknown = [m for m in methods if m not in FITTERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from: {', '.join(FITTERS)}")
    sim = simulate("paper-msdki", "hcp", snr=snr, n_voxels=n_voxels, seed=seed)
    write_simulation(sim, out / "sim", force=force)
    names = [c.name for c in sim.preset.clusters]
    scan = _as_scan(sim, out / "sim" / "dwi.nii.gz")

    estimates: dict[str, dict[str, np.ndarray]] = {}
    timings: dict[str, float] = {}
    _references(sim, estimates, timings)
    for method in methods:
        options: dict = {"seed": seed, "quiet": quiet}
        if epochs is not None and issubclass(FITTERS[method], LearnedFitter):
            options["epochs"] = epochs
        fitter = get_fitter(method, "msdki", **options)
        t = time.perf_counter()
        result = fitter.fit(sim.signals, sim.acquisition)
        timings[method] = time.perf_counter() - t
        estimates[method] = result.params
        Fit(result, scan, fitter).save(out / f"maps-{method}", force=force, save_model=False,
                                       report=False)

    report = {m: metrics(est, sim.truth, sim.labels, names, params=["D", "K"])
              for m, est in estimates.items()}
    table = _table(report, timings, names, sim.signals.shape[0], snr)
    fig = scatter_truth_vs_estimate(
        sim.truth, {m: e for m, e in estimates.items()}, sim.labels, names, ["D", "K"]
    )
    with AtomicOutput(out, force=force) as w:
        w.figure("scatter.png", fig, dpi=110)
        w.text("accuracy.md", table + "\n")
        w.json("accuracy.json", {"snr": snr, "timings_s": timings, "metrics": report})
    return table + f"\n\nmaps, scatter.png and accuracy.md written to {out}/"


__all__ = ["dipy_msdki", "run_demo"]
