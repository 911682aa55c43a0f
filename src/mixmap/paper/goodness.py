"""Part 4b, goodness of fit without a truth: residual RMS between the scan's signals and the
model's prediction from each method's maps, against the noise σ of the b=0 volumes."""

from __future__ import annotations

import numpy as np

from mixmap.paper.report import markdown_table
from mixmap.paper.run import Run
from mixmap.paper.scan import Scan, predicted


def unfit(goodness: dict, factor: float = 1.5) -> set:
    """(model, method) whose median residual exceeds ``factor`` × that of least squares."""
    bad = set()
    for model, per in goodness["models"].items():
        ref = per.get("lsq", {}).get("median_rms")
        for m, e in per.items():
            if ref and e["median_rms"] > factor * ref:
                bad.add((model, m))
    return bad


def _residuals(model: str, res, scan: Scan) -> dict:
    pred = predicted(model, res, scan.acq)
    resid = scan.signals.astype(np.float64) - pred
    rms = np.sqrt(np.mean(resid**2, 1))
    dw = ~scan.acq.b0_mask
    rms_dw = np.sqrt(np.mean(resid[:, dw] ** 2, 1))
    return {"median_rms": float(np.median(rms)), "mean_rms": float(np.mean(rms)),
            "median_rms_dw": float(np.median(rms_dw)),
            "ratio_to_sigma": float(np.median(rms) / scan.sigma)}


def reproduce_goodness(run: Run, scan: Scan, fits: dict) -> dict:
    """Write repro_goodness.json, .csv and section repro-goodness-of-fit for ``fits`` (model
    -> method -> FitResult on ``scan``). Returns the JSON: ``sigma_b0`` and per model and
    method ``median_rms``, ``mean_rms``, ``median_rms_dw`` (b>0 only), ``ratio_to_sigma``."""
    out: dict = {"sigma_b0": scan.sigma, "models": {}}
    rows = []
    for model in fits:
        out["models"][model] = {}
        for m, res in fits[model].items():
            entry = _residuals(model, res, scan)
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


__all__ = ["reproduce_goodness", "unfit"]
