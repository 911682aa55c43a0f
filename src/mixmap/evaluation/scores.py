"""Scoring estimates against a simulation's truth: :func:`metrics` gives RMSE, bias and Pearson r
per parameter, overall and per cluster (angular error for directions), and the calibration of a
reported standard deviation."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

#: Half-widths, in standard deviations, of the intervals whose coverage :func:`metrics` reports
#: (the central 68.3 % and 95 % of a Gaussian), with their keys.
COVERAGE = (("coverage_68", 1.0), ("coverage_95", 1.96))


def _stats_scalar(est: np.ndarray, tru: np.ndarray, n_nan: int,
                  sd: np.ndarray | None = None) -> dict:
    n = int(est.size)
    out: dict = {"n": n, "n_nan": n_nan, "rmse": None, "bias": None, "r": None}
    if sd is not None:
        out.update({"sd_rms": None, **{key: None for key, _ in COVERAGE}})
    if n == 0:
        return out
    err = est.astype(np.float64) - tru.astype(np.float64)
    out["rmse"] = float(np.sqrt(np.mean(err**2)))
    out["bias"] = float(np.mean(err))
    if sd is not None and np.isfinite(sd).any():
        fin = np.isfinite(sd)
        sd, err = sd[fin].astype(np.float64), err[fin]
        out["sd_rms"] = float(np.sqrt(np.mean(sd**2)))
        for key, z in COVERAGE:
            out[key] = float(np.mean(np.abs(err) <= z * sd))
    if n > 1:
        se, st = est.astype(np.float64), tru.astype(np.float64)
        se, st = se - se.mean(), st - st.mean()
        den = np.sqrt((se**2).sum() * (st**2).sum())
        # r is undefined where either side is constant (e.g. S0 = 1 everywhere in a simulation).
        out["r"] = float((se * st).sum() / den) if den > 0 else None
    return out


def angular_error(est: np.ndarray, tru: np.ndarray) -> np.ndarray:
    """Angle in degrees between (n, 3) directions, sign-invariant (n and −n are one axis)."""
    e = est / np.linalg.norm(est, axis=1, keepdims=True)
    t = tru / np.linalg.norm(tru, axis=1, keepdims=True)
    cos = np.clip(np.abs((e * t).sum(1)), 0.0, 1.0)
    return np.degrees(np.arccos(cos))


def _stats_direction(est: np.ndarray, tru: np.ndarray, n_nan: int) -> dict:
    n = int(est.shape[0])
    out: dict = {"n": n, "n_nan": n_nan, "angle_mean_deg": None, "angle_median_deg": None}
    if n:
        ang = angular_error(est, tru)
        out["angle_mean_deg"] = float(ang.mean())
        out["angle_median_deg"] = float(np.median(ang))
    return out


def _checked_labels(labels, cluster_names) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels as (n,) int64 and a name for every label (``"0"``, ``"1"``, ... by default)."""
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).ravel()
        k = int(labels.max()) + 1 if labels.size else 0
        if cluster_names is None:
            cluster_names = [str(i) for i in range(k)]
        elif k > len(cluster_names):
            raise ValueError(f"labels go up to {k - 1} but only {len(cluster_names)} cluster names")
    return labels, cluster_names


def _score_parameter(name: str, est, tru, sd, labels, cluster_names) -> dict:
    """``{"all": stats, "clusters": {name: stats}}`` of one parameter (see :func:`metrics`)."""
    est, tru = np.asarray(est), np.asarray(tru)
    if est.shape != tru.shape:
        raise ValueError(f"{name}: estimate has shape {est.shape}, truth {tru.shape}")
    direction = est.ndim == 2 and est.shape[1] == 3
    if direction:
        sd = None
        bad_est = ~np.isfinite(est).all(1) | (np.linalg.norm(np.nan_to_num(est), axis=1) == 0)
        ok = ~bad_est & np.isfinite(tru).all(1)
    else:
        est, tru = est.ravel(), tru.ravel()
        bad_est = ~np.isfinite(est)
        ok = ~bad_est & np.isfinite(tru)
        if sd is not None:
            sd = np.asarray(sd).ravel()
            if sd.shape != est.shape:
                raise ValueError(f"{name}: std has shape {sd.shape}, the estimate {est.shape}")

    def score(sel: np.ndarray, n_nan: int) -> dict:
        if direction:
            return _stats_direction(est[sel], tru[sel], n_nan)
        return _stats_scalar(est[sel], tru[sel], n_nan, None if sd is None else sd[sel])

    entry = {"all": score(ok, int(bad_est.sum())), "clusters": {}}
    if labels is not None:
        if labels.size != est.shape[0]:
            raise ValueError(f"{labels.size} labels for {est.shape[0]} voxels of {name}")
        for ci, cname in enumerate(cluster_names):
            sel = labels == ci
            entry["clusters"][cname] = score(sel & ok, int((bad_est & sel).sum()))
    return entry


def metrics(
    estimate: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    labels: np.ndarray | None,
    cluster_names: list[str] | None,
    params: list[str] | None = None,
    std: dict[str, np.ndarray] | None = None,
) -> dict:
    """Accuracy of ``estimate`` against ``truth``, per parameter, overall and per cluster.

    Parameters
    ----------
    estimate, truth
        name -> (n,) arrays, or (n, 3) for a direction (e.g. ball-stick ``n``), same voxel order.
    labels
        (n,) cluster index per voxel (0 .. K−1), or None for overall numbers only.
    cluster_names
        Names of the clusters in index order; None names them ``"0"``, ``"1"``, ...
    params
        Parameters to score; default: those in both ``truth`` and ``estimate``, in truth's order.
    std
        name -> (n,) the standard deviation reported with each scalar estimate (``_desc-std``
        maps): then is it calibrated? ``sd_rms`` (the RMS of the reported sd; about the RMSE
        where it is), ``coverage_68`` and ``coverage_95``: the share of voxels whose truth lies
        within 1 and 1.96 sd of the estimate (0.683 and 0.95 for a calibrated Gaussian
        posterior; the Bayes reference's own coverage is the mark where posteriors are not
        Gaussian: at bounds, along ridges). Voxels whose sd is NaN or Inf are left out of
        these three (not of the RMSE).

    Returns
    -------
    ``{param: {"all": stats, "clusters": {name: stats}}}``. For a scalar, stats holds ``rmse``,
    ``bias`` (mean of estimate − truth), Pearson ``r``, ``n`` (voxels scored) and ``n_nan``
    (voxels left out because the estimate is NaN or Inf), and with ``std`` also ``sd_rms``,
    ``coverage_68`` and ``coverage_95``; for a direction, ``angle_mean_deg`` and
    ``angle_median_deg`` (sign-invariant angular error) instead of rmse, bias and r. A
    value that is undefined (no voxel, or r of a constant) is None, so the dict is JSON-ready.
    """
    if params is None:
        params = [k for k in truth if k in estimate]
    missing = [p for p in params if p not in estimate or p not in truth]
    if missing:
        raise ValueError(
            f"parameter(s) {missing} missing from the estimate or the truth; the estimate has "
            f"{sorted(estimate)}, the truth {sorted(truth)}"
        )
    labels, cluster_names = _checked_labels(labels, cluster_names)
    report: dict = {}
    for name in params:
        sd = std.get(name) if std is not None else None
        report[name] = _score_parameter(name, estimate[name], truth[name], sd, labels,
                                        cluster_names)
    n_nan = sum(v["all"]["n_nan"] for v in report.values())
    if n_nan:
        log.warning("%d NaN/Inf estimates left out of the metrics", n_nan)
    return report


__all__ = ["COVERAGE", "angular_error", "metrics"]
