"""Scoring a fit folder against a simulation folder (``mixmap evaluate``): :func:`evaluate_dirs`
reads the maps inside the simulation's mask and scores them and the Bayes reference;
:func:`metrics_markdown` turns the result into tables."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from mixmap.evaluation.bayes import bayes_reference, check_preset
from mixmap.evaluation.scores import metrics
from mixmap.io.naming import label as _label
from mixmap.io.naming import map_name, parse_map_name
from mixmap.models import get_model
from mixmap.simulation import preset_from_info, read_simulation_info

log = logging.getLogger(__name__)


def _read_masked(path: Path, mask: np.ndarray) -> np.ndarray:
    """(n,) float32 values of the image at ``path`` inside ``mask`` (a 3-D bool array)."""
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.shape[:3] != mask.shape:
        raise ValueError(
            f"{path}: grid {data.shape[:3]} differs from the simulation's mask {mask.shape}; "
            f"fit the simulated dwi.nii.gz of --truth"
        )
    return data[mask]


def _read_maps(fit_dir: Path, model, mask: np.ndarray):
    """name -> (n,) maps and name -> (n,) ``_desc-std`` maps of ``model`` in ``fit_dir``."""
    declared = model.parameters + model.derived
    by_label = {(_label(p.name), model.output_suffix): p.name for p in declared
                if p.bids_suffix is None}
    by_label.update({(None, p.bids_suffix): p.name for p in declared if p.bids_suffix})
    estimate: dict[str, np.ndarray] = {}
    std: dict[str, np.ndarray] = {}
    for desc, found, what in ((None, estimate, "map"), ("std", std, "std map")):
        for path in sorted(fit_dir.iterdir()):
            parts = parse_map_name(path.name)
            if (parts is None or parts.model != _label(model.name) or parts.desc != desc
                    or (parts.param, parts.suffix) not in by_label):
                continue
            name = by_label[(parts.param, parts.suffix)]
            if name in found:
                raise ValueError(
                    f"{fit_dir}: more than one {what} of {name} for model {model.name}; keep "
                    f"one fit per folder"
                )
            found[name] = _read_masked(path, mask)
    if not estimate:
        raise FileNotFoundError(
            f"{fit_dir}: no {model.name} maps (named like "
            f"{map_name('', model.name, model.map_parameters[-1].name)}); "
            f"the simulation's model is {model.name}: fit it with `mixmap fit --model "
            f"{model.name}`"
        )
    return estimate, std


def _fit_method(fit_dir: Path, model) -> str | None:
    """The ``Method`` of the fit's ``*_fit.json``, or None without one; ValueError when it
    fitted another model."""
    fit_json = sorted(fit_dir.glob(f"*model-{_label(model.name)}_fit.json"))
    if not fit_json:
        return None
    summary = json.loads(fit_json[0].read_text())
    if summary.get("Model", model.name) != model.name:
        raise ValueError(
            f"{fit_json[0]}: fitted model {summary.get('Model')!r}, but the simulation's "
            f"model is {model.name!r}"
        )
    return summary.get("Method")


def _simulated_scan(sim_dir: Path, mask: np.ndarray):
    """The simulation's dwi.nii.gz and gradients as :class:`~mixmap.io.DWIData`, checked to
    hold the voxels of ``mask``."""
    from mixmap.io import load_dwi
    from mixmap.simulation.files import simulation_fields

    fields = simulation_fields(sim_dir)
    if fields is not None:
        data = load_dwi(sim_dir / "dwi.nii.gz", fields, None, sim_dir / "mask.nii.gz")
    else:
        data = load_dwi(sim_dir / "dwi.nii.gz", sim_dir / "dwi.bval", sim_dir / "dwi.bvec",
                        sim_dir / "mask.nii.gz")
    if data.signals.shape[0] != int(mask.sum()) or not np.array_equal(data.mask, mask):
        raise ValueError(f"{sim_dir}: dwi.nii.gz and the mask disagree on voxel count")
    return data


def _reference_metrics(compute, params, truth, labels, cluster_names
                       ) -> tuple[dict, float, dict]:
    """Metrics of a reference estimate ``compute()`` (name -> (n,), ``name:std``) of the
    scored ``params``, the seconds it took, and the estimate."""
    t = time.perf_counter()
    ref = compute()
    seconds = round(time.perf_counter() - t, 2)
    scored = [p for p in params if p in ref]
    ref_std = {p: ref[f"{p}:std"] for p in scored if f"{p}:std" in ref}
    return metrics(ref, truth, labels, cluster_names, scored, ref_std or None), seconds, ref


def evaluate_dirs(fit_dir: str | Path, sim_dir: str | Path, *, bayes: bool = True,
                  floor: bool = True, floor_atoms: int | None = None) -> dict:
    """Score the maps in ``fit_dir`` against the simulation in ``sim_dir``.

    ``sim_dir`` is a folder written by :func:`mixmap.simulation.write_simulation`; ``fit_dir``
    holds the maps of the simulation's model as ``mixmap fit`` names them
    (:func:`mixmap.io.naming.map_name`). Maps are read inside the simulation's mask; where
    the fit wrote ``_desc-std`` maps, the calibration of its standard deviations is scored too
    (``std`` of :func:`metrics`). For the MSDKI presets (``bayes`` true) the Bayes-optimal
    reference (posterior mean and standard deviation) is computed from the simulated scan and
    scored alike. With ``floor`` (and the whole truth on disk) the empirical floor is scored
    too: the posterior mean under the empirical distribution of the truth
    (:func:`~mixmap.evaluation.floor.empirical_floor`, ``floor_atoms`` atoms; the only
    reference for a phantom of a real scan, which has no preset).

    Returns a JSON-ready dict: ``model``, ``method``, ``preset``, ``snr``, ``noise``,
    ``n_voxels``, ``params`` (the scored ones), ``metrics`` (see :func:`metrics`),
    ``bayes_reference`` (metrics of the reference, or None) with ``bayes_seconds``, and
    ``empirical_floor`` (metrics, or None) with ``floor_seconds`` and ``floor_ess``.
    """
    fit_dir, sim_dir = Path(fit_dir), Path(sim_dir)
    if not fit_dir.is_dir():
        raise FileNotFoundError(f"{fit_dir}: not a folder; give the --out folder of `mixmap fit`")
    info = read_simulation_info(sim_dir)
    preset = preset_from_info(info)
    model = get_model(preset.model if preset is not None else info["model"])
    mask, truth, labels = _read_truth(sim_dir, model)
    cluster_names = info.get("cluster_names") or [c.name for c in preset.clusters]
    source = preset.name if preset is not None else f"phantom of {info.get('source') or '?'}"
    estimate, std = _read_maps(fit_dir, model, mask)
    method = _fit_method(fit_dir, model)
    params = [p for p in truth if p in estimate]
    report: dict = {
        "fit_dir": str(fit_dir), "truth_dir": str(sim_dir), "model": model.name,
        "method": method, "preset": source, "snr": info.get("snr"),
        "noise": info.get("noise"), "n_voxels": int(mask.sum()), "params": params,
        "metrics": metrics(estimate, truth, labels, cluster_names, params, std or None),
        "bayes_reference": None, "empirical_floor": None,
    }
    scan = None
    if floor and all(p.name in truth for p in model.parameters):
        from mixmap.evaluation.floor import empirical_floor

        scan = _simulated_scan(sim_dir, mask)
        report["empirical_floor"], report["floor_seconds"], ref = _reference_metrics(
            lambda: empirical_floor(scan.signals, scan.acquisition, model, truth,
                                    float(info["sigma"]), info.get("noise", "gaussian"),
                                    max_atoms=floor_atoms),
            params, truth, labels, cluster_names)
        report["floor_ess"] = float(np.median(ref["ess"]))
    if bayes and preset is not None and _bayes_reference_applies(preset, model):
        scan = scan or _simulated_scan(sim_dir, mask)
        report["bayes_reference"], report["bayes_seconds"], _ = _reference_metrics(
            lambda: bayes_reference(scan.signals, scan.acquisition, preset,
                                    float(info["sigma"]), info.get("noise", "gaussian"),
                                    return_std=True),
            params, truth, labels, cluster_names)
    return report


def _read_truth(sim_dir: Path, model) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The simulation's mask (3-D bool), its truth maps on disk (name -> (n,) inside the
    mask) and its (n,) int64 cluster labels."""
    from mixmap.io import load_image

    mask = np.asarray(load_image(sim_dir / "mask.nii.gz", "mask").dataobj) > 0
    truth = {p.name: _read_masked(sim_dir / "truth" / f"param-{p.name}.nii.gz", mask)
             for p in model.parameters if (sim_dir / "truth" / f"param-{p.name}.nii.gz").exists()}
    if all(p.name in truth for p in model.parameters):
        from mixmap.evaluation.floor import derived_values

        truth.update(derived_values(model, truth))
    labels = _read_masked(sim_dir / "truth" / "param-cluster.nii.gz", mask).astype(np.int64)
    return mask, truth, labels


def _bayes_reference_applies(preset, model) -> bool:
    """Whether the Bayes reference applies to ``preset`` and ``model`` (:func:`check_preset`);
    why not is logged."""
    try:
        check_preset(preset, model)
    except ValueError as exc:
        log.info("%s", exc)
        return False
    return True


def _ref_cells(ref: dict, name: str, cname: str, with_sd: bool) -> list:
    """The reference's RMSE (and coverage, ``with_sd``) for one row of the table."""
    r_entry = ref.get(name)
    r_st = None
    if r_entry is not None:
        r_st = r_entry["all"] if cname == "all" else r_entry["clusters"].get(cname)
    cells = [r_st["rmse"] if r_st else None]
    if with_sd:
        cells.append(r_st.get("coverage_95") if r_st else None)
    return cells


def _table_rows(m: dict, refs: list[tuple[str, dict, bool]], any_nan: bool, has_sd: bool):
    """Rows of the scalar table and of the direction table of :func:`metrics_markdown`;
    ``refs``: (label, metrics, with coverage) of each reference shown beside the fit."""
    scalar_rows, dir_rows = [], []
    for name, entry in m.items():
        parts = [("all", entry["all"])] + list(entry["clusters"].items())
        for cname, st in parts:
            nan = [st["n_nan"]] if any_nan else []
            if "rmse" not in st:
                dir_rows.append([name, cname, st["n"], *nan, st["angle_mean_deg"],
                                 st["angle_median_deg"]])
                continue
            row = [name, cname, st["n"], *nan, st["rmse"], st["bias"], st["r"]]
            if has_sd:
                row += [st.get("sd_rms"), st.get("coverage_68"), st.get("coverage_95")]
            for _, ref, with_sd in refs:
                row += _ref_cells(ref, name, cname, with_sd)
            scalar_rows.append(row)
    return scalar_rows, dir_rows


def metrics_markdown(report: dict) -> str:
    """Markdown tables of a report from :func:`evaluate_dirs` (or a bare :func:`metrics`
    dict): one row per parameter × (all, each cluster) with n, RMSE, bias, r and, where
    present, the reported sd's RMS and coverage, the Bayes reference's RMSE and coverage,
    and the empirical floor's RMSE; directions get their own table of angular errors."""
    from mixmap.paper.report import markdown_table

    m = report["metrics"] if "metrics" in report else report
    refs = []
    for label, key, sd in (("Bayes", "bayes_reference", True), ("floor", "empirical_floor",
                                                                 False)):
        ref = report.get(key) or {}
        if ref:
            refs.append((label, ref, sd and any("sd_rms" in e["all"] for e in ref.values())))
    any_nan = any(e["all"]["n_nan"] for e in m.values())
    has_sd = any("sd_rms" in e["all"] for e in m.values())
    scalar_rows, dir_rows = _table_rows(m, refs, any_nan, has_sd)
    nan_col = ["NaN"] if any_nan else []
    blocks = []
    if "model" in report:
        head = f"{report.get('method') or 'fit'} ({report['model']})"
        if report.get("preset"):
            head += f" on {report['preset']}, {report.get('noise')} noise, SNR {report.get('snr')}"
        blocks.append(head)
    if scalar_rows:
        header = ["param", "cluster", "n", *nan_col, "RMSE", "bias", "r"]
        if has_sd:
            header += ["sd (RMS)", "within ±1 sd", "within ±1.96 sd"]
        for label, _, with_sd in refs:
            header.append(f"{label} RMSE")
            if with_sd:
                header.append(f"{label} within ±1.96 sd")
        blocks.append(markdown_table(header, scalar_rows, floatfmt=".4f"))
    if dir_rows:
        header = ["param", "cluster", "n", *nan_col, "mean angle (°)", "median angle (°)"]
        blocks.append(markdown_table(header, dir_rows, floatfmt=".2f"))
    return "\n\n".join(blocks)


__all__ = ["evaluate_dirs", "metrics_markdown"]
