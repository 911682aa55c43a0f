"""Part 4a, repeatability without a truth: each method fitted on two disjoint halves of the
scan's gradient directions; RMS difference and ICC(3,1) between the two halves' maps."""

from __future__ import annotations

import numpy as np

from mixmap.acquisition import Acquisition
from mixmap.paper.ranking import rank_sentences
from mixmap.paper.report import markdown_table
from mixmap.paper.run import Run, fit
from mixmap.paper.scan import Scan, scalar_params


def icc31(a: np.ndarray, b: np.ndarray) -> float:
    """ICC(3,1) (two-way mixed, consistency, single measure) of two measurements per voxel;
    voxels with a non-finite value are left out, NaN below two voxels."""
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
    order), every b=0 volume in both; sorted volume indices."""
    b0 = np.flatnonzero(acq.b0_mask)
    h1, h2 = [b0], [b0]
    for sh in acq.dw_shells():
        idx = np.asarray(sh.indices)
        h1.append(idx[0::2])
        h2.append(idx[1::2])
    return np.sort(np.concatenate(h1)), np.sort(np.concatenate(h2))


def _compare(model: str, m: str, ra, rb, rows: list) -> dict:
    """Scores of one method between the halves' fits ``ra`` and ``rb``; appends table rows."""
    from mixmap.evaluation import angular_error

    entry = {}
    for p in scalar_params(model):
        a, b = ra.params[p].astype(np.float64), rb.params[p].astype(np.float64)
        ok = np.isfinite(a) & np.isfinite(b)
        entry[p] = {"rms_diff": float(np.sqrt(np.mean((a[ok] - b[ok]) ** 2))),
                    "icc31": icc31(a, b)}
        rows.append([model, m, p, entry[p]["rms_diff"], entry[p]["icc31"]])
    if "n" in ra.params:
        ang = angular_error(ra.params["n"], rb.params["n"])
        entry["n"] = {"median_angle_deg": float(np.median(ang))}
        rows.append([model, m, "n (median angle °)", float(np.median(ang)), None])
    return entry


def reproduce_repeatability(run: Run, scan: Scan) -> dict:
    """Write repro_repeatability.json, .csv and section repro-repeatability. Returns the
    JSON: ``halves`` (volumes per half) and per model and method, per parameter,
    ``rms_diff`` and ``icc31`` (``median_angle_deg`` for the stick direction)."""
    h1, h2 = split_halves(scan.acq)
    out: dict = {"halves": [len(h1), len(h2)], "models": {}}
    rows = []
    for model in ("ball-stick", "msdki"):
        out["models"][model] = {}
        for m in run.methods:
            run.log(f"repeatability: {m} {model}, two halves of {len(h1)} and {len(h2)} volumes")
            ep = run.s.real_epochs
            ra, _, _ = fit(run, m, model, scan.signals[:, h1], scan.acq.subset(h1), epochs=ep)
            rb, _, _ = fit(run, m, model, scan.signals[:, h2], scan.acq.subset(h2), epochs=ep)
            out["models"][model][m] = _compare(model, m, ra, rb, rows)
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
        rank_sentences(out["models"], "rms_diff", "RMS difference", lower=True, unfit=run.unfit),
    ]
    run.section("repro-repeatability", "\n".join(body))
    return out


__all__ = ["icc31", "reproduce_repeatability", "split_halves"]
