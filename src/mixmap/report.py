"""The HTML report of one fit: a single self-contained file (figures embedded as PNG) that
opens offline, in the spirit of the nipreps reports.

It shows every map with its colour bar and units and its standard deviation; the residual
over σ (goodness of fit: about 1 where the model explains the signal); for a learned method,
how far each voxel moved from its own least-squares fit in units of that fit's sd (how much it
borrowed from the other voxels); the voxels at a bound; the cluster map and the learned
mixture (vae-gmm); the training curves; the acquisition, the command, the versions and the
timings. Slices are axial, shown in neurological orientation (the subject's right on the
right, anterior up) after reorienting the image axes to RAS with its affine.
"""

from __future__ import annotations

import base64
import html
import io
import platform
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mixmap._version import __version__
from mixmap.plots import CLUSTER_COLOURS, loss_curves, to_ras

#: Axial slices per montage, evenly spaced over the fitted voxels' extent.
N_SLICES = 6
#: A value within this share of its parameter's range from a bound counts as at the bound.
AT_BOUND = 1e-4


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _slices(mask: np.ndarray) -> list[int]:
    zs = np.flatnonzero(mask.any((0, 1)))
    if zs.size == 0:
        return []
    picks = np.linspace(zs[0], zs[-1], min(N_SLICES, zs.size) + 2)[1:-1]
    return sorted({int(round(z)) for z in picks}) or [int(zs[0])]


def montage(vol: np.ndarray, mask: np.ndarray, title: str, unit: str, *,
            cmap: str = "viridis", limits: tuple[float, float] | None = None,
            labels: int | None = None, brightness: tuple[str, np.ndarray] | None = None
            ) -> Figure:
    """One row of axial slices of ``vol`` (RAS, (x, y, z) or (x, y, z, 3) for a direction,
    NaN outside the mask) with one colour bar in ``unit``; ``labels``: the number of discrete
    classes (a cluster map), coloured as the mixture plots are; ``brightness``: (name, (x, y,
    z) volume in [0, 1]) that scales a direction's colours (colour FA)."""
    zs = _slices(mask)
    fig = Figure(figsize=(1.9 * max(len(zs), 1) + 1.2, 2.3), layout="constrained")
    axes = fig.subplots(1, max(len(zs), 1), squeeze=False)[0]
    direction = vol.ndim == 4
    image = None
    if labels is not None:
        from matplotlib.colors import BoundaryNorm, ListedColormap

        colours = ListedColormap([CLUSTER_COLOURS[i % 10] for i in range(labels)])
        norm, kw = BoundaryNorm(np.arange(labels + 1) - 0.5, labels), {}
    else:
        finite = vol[np.isfinite(vol)] if not direction else np.array([])
        lo, hi = limits or ((float(np.percentile(finite, 1)), float(np.percentile(finite, 99)))
                            if finite.size else (0.0, 1.0))
        colours, norm, kw = cmap, None, {"vmin": lo, "vmax": hi if hi > lo else lo + 1}
    for ax, z in zip(axes, zs, strict=False):
        s = vol[:, :, z]
        if direction:
            rgb = np.nan_to_num(np.abs(s)).clip(0, 1)
            if brightness is not None:
                rgb = rgb * np.nan_to_num(brightness[1][:, :, z]).clip(0, 1)[..., None]
            ax.imshow(rgb.transpose(1, 0, 2), origin="lower", interpolation="nearest")
        else:
            image = ax.imshow(s.T, origin="lower", cmap=colours, norm=norm,
                              interpolation="nearest", **kw)
        ax.set_title(f"z = {z}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel(title, fontsize=9)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.85)
        bar.set_label(unit, fontsize=8)
        if labels is not None:
            bar.set_ticks(range(labels))
    elif direction:
        bright = f", brightness {brightness[0]}" if brightness is not None else ""
        fig.suptitle(f"{title}: |x| red, |y| green, |z| blue{bright}", fontsize=8)
    return fig


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(title: str, fig: Figure, note: str = "") -> str:
    text = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    return (f"<figure><img alt='{html.escape(title)}' src='{_png(fig)}'>"
            f"<figcaption>{html.escape(title)}</figcaption>{text}</figure>")


def residual_ratio(fit) -> np.ndarray:
    """(n,) per-voxel RMS over measurements of (signal − model signal at the maps) / σ."""
    pred = fit.predicted_signals()
    sigma = fit.noise_sigma or float(np.std(fit.data.signals - pred))
    return np.sqrt(np.mean((fit.data.signals - pred) ** 2, axis=1)) / sigma


def _scalar_params(fit, derived: bool = True) -> list[str]:
    """The scalar maps (with the derived ones unless not ``derived``; never hidden ones)."""
    model = fit.model
    every = model.map_parameters if derived else [
        p for p in model.parameters if p.name not in model.hidden]
    return [p.name for p in every if p.size == 1]


def _maps_section(fit, ras, mask) -> str:
    parts = []
    weights = fit.model.direction_brightness
    for p in fit.model.map_parameters:
        vol = ras(fit.volume(fit.result.params[p.name]))
        by = weights.get(p.name)
        bright = (by, ras(fit.volume(fit.result.params[by]))) if by in fit.result.params else None
        row = [_figure(f"{p.name} ({p.unit}): {p.description}",
                       montage(vol, mask, p.name, p.unit, brightness=bright))]
        if p.name in fit.result.std:
            row.append(_figure(f"sd of {p.name} ({p.unit})", montage(
                ras(fit.volume(fit.result.std[p.name])), mask, f"sd {p.name}", p.unit,
                cmap="magma")))
        parts.append("<div class='row'>" + "".join(row) + "</div>")
    return "<h2>Maps</h2>" + "".join(parts)


def _borrowed_section(fit, lsq, ras, mask) -> str:
    """How far each voxel's estimate is from its least-squares fit, in that fit's sd."""
    if lsq is None:
        return ""
    parts, rows = [], []
    for name in _scalar_params(fit):
        if name not in lsq.std or name == fit.model.scale_parameter:
            continue
        sd = np.where(lsq.std[name] > 0, lsq.std[name], np.nan)
        z = np.abs(fit.result.params[name] - lsq.params[name]) / sd
        rows.append([name, f"{np.nanmedian(z):.2f}", f"{np.nanmean(z > 2):.1%}"])
        parts.append(_figure(f"|{name} − least squares| / least-squares sd", montage(
            ras(fit.volume(z)), mask, f"moved {name}", "lsq sd", cmap="cividis",
            limits=(0.0, 3.0))))
    return ("<h2>What each voxel borrowed from the others</h2><p>The distance of each voxel's "
            "estimate from its own least-squares fit, in units of that fit's asymptotic sd: "
            "near 0 where the voxel's data decide, large where the shared prior does.</p>"
            + _table(["parameter", "median", "share > 2 sd"], rows) + "".join(parts))


def _bounds_rows(fit) -> list[list]:
    """Per scalar parameter: its bounds as the maps hold it (the scale parameter's, declared
    relative to the scan's signal scale, times that scale) and the shares of voxels at each."""
    rows = []
    for name in _scalar_params(fit, derived=False):
        p = fit.model.parameter(name)
        scale = (float(fit.result.settings.get("signal_scale", 1.0))
                 if name == fit.model.scale_parameter else 1.0)
        lower, upper = p.lower * scale, p.upper * scale
        v = fit.result.params[name]
        tol = AT_BOUND * float(upper - lower)
        lo, hi = np.mean(v <= lower + tol), np.mean(v >= upper - tol)
        rows.append([name, f"[{lower:.4g}, {upper:.4g}] {p.unit}", f"{lo:.2%}", f"{hi:.2%}"])
    return rows


def _mixture_section(fit, ras, mask) -> str:
    probs = fit.result.cluster_probs
    if probs is None:
        return ""
    k = probs.shape[1]
    labels = probs.argmax(1)
    rows = []
    for j in range(k):
        sel = labels == j
        med = [f"{np.median(fit.result.params[n][sel]):.3g}" if sel.any() else "–"
               for n in _scalar_params(fit)]
        rows.append([j, f"{probs[:, j].mean():.1%}", int(sel.sum()), *med])
    fig = montage(ras(fit.volume(labels.astype(np.float32))), mask, "cluster", "component",
                  labels=k)
    return ("<h2>Learned mixture</h2>" + _figure("most likely mixture component", fig)
            + _table(["component", "weight", "voxels", *[f"median {n}" for n in
                                                         _scalar_params(fit)]], rows))


def _run_section(fit, settings: dict) -> str:
    acq = fit.data.acquisition.describe()
    shells = acq.get("shells_s_per_mm2", [])
    rows = [["model", fit.result.model], ["method", fit.result.method],
            ["voxels fitted", fit.result.n_voxels],
            ["measurements", fit.data.acquisition.n],
            ["noise σ (input units)", f"{fit.noise_sigma:.4g}" if fit.noise_sigma else "–"],
            ["device", fit.result.device or "–"],
            ["mixmap", __version__], ["python", platform.python_version()]]
    for key, value in settings.items():
        rows.append([key, value])
    if fit.data.dropped_volumes:
        rows.append(["volumes left out", ", ".join(f"{i} ({r})" for i, r in
                                                   fit.data.dropped_volumes.items())])
    timing = _table(["phase", "seconds"], [[k, f"{v:.2f}"] for k, v in
                                            fit.result.timings.items()])
    return ("<h2>Run</h2>" + _table(["", ""], rows) + "<h3>Acquisition</h3>"
            + _table(["b (s/mm²)", "volumes"], [[s["b"], s["n"]] for s in shells])
            + "<h3>Seconds</h3>" + timing)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.2em .6em;
text-align:left;font-size:.9em}figure{margin:.8em 0}img{max-width:100%}
figcaption,.note{font-size:.85em;color:#555}code{background:#f4f4f4;padding:0 .2em}
.row{display:flex;flex-wrap:wrap;gap:1em}
"""


def report_html(fit, *, lsq=None, command: str = "", settings: dict | None = None) -> str:
    """The report of ``fit`` (:class:`mixmap.api.Fit`) as one HTML page; ``lsq``: the
    least-squares :class:`~mixmap.fitting.FitResult` of the same voxels, for the section on
    what a learned fit borrowed (None leaves it out)."""
    affine = fit.data.affine
    ras = lambda v: to_ras(v, affine)  # noqa: E731
    mask = ras(fit.data.mask.astype(np.uint8)) > 0
    ratio = residual_ratio(fit)
    resid = _figure("RMS residual / σ per voxel (1: the model explains the signal to the "
                    "noise)", montage(ras(fit.volume(ratio)), mask, "residual/σ", "1",
                                      cmap="inferno", limits=(0.0, 3.0)),
                    f"median {np.median(ratio):.2f}; above 2 in {np.mean(ratio > 2):.1%} of "
                    f"voxels")
    curves = ("<h2>Training</h2>" + _figure("loss per epoch", loss_curves(fit.result.history))
              if fit.result.history else "")
    title = f"mixmap: {fit.result.model} by {fit.result.method} — {fit.data.path.name}"
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>"
        f"{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Source: <code>{html.escape(str(fit.data.path))}"
        f"</code></p><p>Command: <code>{html.escape(command or '(Python API)')}</code></p>"
        f"<p class='note'>Axial slices in neurological orientation (subject's right on the "
        f"right, anterior up; image axes reoriented to RAS with the affine). Colour scales: "
        f"1st–99th percentile of the map unless stated.</p>"
        + _maps_section(fit, ras, mask)
        + "<h2>Goodness of fit</h2>" + resid
        + _borrowed_section(fit, lsq, ras, mask)
        + "<h2>Voxels at a bound</h2>"
        + _table(["parameter", "bounds", "at lower", "at upper"], _bounds_rows(fit))
        + _mixture_section(fit, ras, mask) + curves
        + _run_section(fit, settings or {})
        + "</body></html>"
    )


def least_squares_of(fit):
    """The least-squares fit of the same voxels (for :func:`report_html`), or None for a
    least-squares fit itself."""
    if fit.result.method == "lsq":
        return None
    from mixmap.fitting import get_fitter

    return get_fitter("lsq", fit.fitter.model).fit(fit.data.signals, fit.data.acquisition)


def write_report(fit, path: str | Path, *, command: str = "") -> Path:
    """Write :func:`report_html` of ``fit`` (with its least-squares comparison) to ``path``."""
    path = Path(path)
    text = report_html(fit, lsq=least_squares_of(fit), command=command)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["least_squares_of", "montage", "report_html", "residual_ratio", "write_report"]
