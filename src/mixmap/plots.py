"""Figures: truth against estimate per cluster, map panels, loss curves, latent space.

Every function returns a matplotlib :class:`~matplotlib.figure.Figure` built on the Agg backend
(no display needed) and saves nothing: callers write it (e.g. ``AtomicOutput.figure``).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

#: Colours of clusters 0, 1, ... (matplotlib's tab10).
CLUSTER_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
]


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    # Figure() without pyplot: Agg canvas, nothing global, no display needed.
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def to_ras(vol: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``vol`` (x, y, z[, k]) with its first three axes reoriented to RAS by ``affine``, so
    that an axial slice shown with ``origin="lower"`` and the first axis across is in
    neurological orientation (the subject's right on the right, anterior up)."""
    import nibabel as nib

    return nib.orientations.apply_orientation(vol, nib.orientations.io_orientation(affine))


def _colour(i: int) -> str:
    return CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)]


def _is_direction(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] == 3


def scatter_truth_vs_estimate(
    truth: dict[str, np.ndarray],
    estimates: dict[str, dict[str, np.ndarray]],
    labels: np.ndarray | None,
    cluster_names: list[str] | None,
    params: list[str] | None = None,
    *,
    max_points: int = 20000,
    seed: int = 0,
) -> Figure:
    """The paper's Fig. 1: rows = methods, columns = parameters, estimate against truth.

    Points are coloured by cluster, the identity line is dashed, and each panel's title gives
    the method, the parameter and the RMSE over all finite estimates. ``params`` defaults to
    the scalar parameters in ``truth`` that every method estimates. Above ``max_points`` voxels
    a random subset is drawn (the RMSE uses all).
    """
    if params is None:
        params = [p for p in truth if not _is_direction(np.asarray(truth[p]))
                  and all(p in e for e in estimates.values())]
    for p in params:
        if p not in truth or _is_direction(np.asarray(truth[p])):
            raise ValueError(f"{p}: not a scalar parameter of the truth; scatter needs scalars")
    if not params or not estimates:
        raise ValueError("nothing to plot: give at least one method and one scalar parameter")
    n = np.asarray(truth[params[0]]).shape[0]
    labels = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels).astype(int)
    k = int(labels.max()) + 1 if labels.size else 1
    names = list(cluster_names) if cluster_names is not None else [str(i) for i in range(k)]
    show = np.arange(n)
    if n > max_points:
        show = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))

    fig, axes = _figure(len(estimates), len(params), (3.2 * len(params), 3.0 * len(estimates)))
    for r, (method, est) in enumerate(estimates.items()):
        for c, p in enumerate(params):
            ax = axes[r, c]
            t = np.asarray(truth[p], dtype=np.float64).ravel()
            e = np.asarray(est[p], dtype=np.float64).ravel()
            ok = np.isfinite(e) & np.isfinite(t)
            rmse = float(np.sqrt(np.mean((e[ok] - t[ok]) ** 2))) if ok.any() else float("nan")
            for ci in range(k):
                sel = show[(labels[show] == ci) & ok[show]]
                ax.scatter(t[sel], e[sel], s=2, alpha=0.4, color=_colour(ci), rasterized=True,
                           label=names[ci] if ci < len(names) else str(ci))
            lo = np.nanmin(t[ok]) if ok.any() else 0.0
            hi = np.nanmax(t[ok]) if ok.any() else 1.0
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_title(f"{method}: {p} (RMSE {rmse:.3f})", fontsize=9)
            ax.set_xlabel(f"true {p}")
            ax.set_ylabel(f"estimated {p}")
    handles, lbls = axes[0, 0].get_legend_handles_labels()
    if k > 1:
        leg = axes[0, -1].legend(handles, lbls, loc="best", fontsize=8, markerscale=4)
        for h in leg.legend_handles:
            h.set_alpha(1)
    return fig


def map_panels(
    volumes: dict[str, dict[str, np.ndarray]],
    slice_index: int,
    params: list[str],
    vmin: dict[str, float] | None = None,
    vmax: dict[str, float] | None = None,
    *,
    cmap: str = "viridis",
) -> Figure:
    """Maps side by side: rows = parameters, columns = methods, axial slice ``slice_index``.

    ``volumes[method][param]`` is a 3-D map (NaN outside the mask), or a 4-D (x, y, z, 3)
    direction map shown as |x|, |y|, |z| in red, green, blue. Each row has one colour scale
    (``vmin`` / ``vmax`` per parameter, default the 1st and 99th percentiles of the row) and
    one colour bar.
    """
    methods = list(volumes)
    if not methods or not params:
        raise ValueError("nothing to plot: give at least one method and one parameter")
    vmin, vmax = dict(vmin or {}), dict(vmax or {})
    fig, axes = _figure(len(params), len(methods), (2.6 * len(methods) + 0.8, 2.6 * len(params)))
    for r, p in enumerate(params):
        slices = {}
        for m in methods:
            if p not in volumes[m]:
                raise ValueError(f"method {m} has no map of {p}")
            vol = np.asarray(volumes[m][p], dtype=np.float32)
            if not 0 <= slice_index < vol.shape[2]:
                raise ValueError(f"slice {slice_index} outside 0..{vol.shape[2] - 1} of {m} {p}")
            slices[m] = vol[:, :, slice_index]
        scalar = all(s.ndim == 2 for s in slices.values())
        if scalar:
            finite = np.concatenate([s[np.isfinite(s)] for s in slices.values()])
            lo = vmin.get(p, float(np.percentile(finite, 1)) if finite.size else 0.0)
            hi = vmax.get(p, float(np.percentile(finite, 99)) if finite.size else 1.0)
        image = None
        for c, m in enumerate(methods):
            ax = axes[r, c]
            s = slices[m]
            if scalar:
                image = ax.imshow(s.T, origin="lower", cmap=cmap, vmin=lo, vmax=hi,
                                  interpolation="nearest")
            else:  # direction: colour-coded |components|, black outside the mask
                rgb = np.nan_to_num(np.abs(s)).clip(0, 1).transpose(1, 0, 2)
                ax.imshow(rgb, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(m, fontsize=10)
            if c == 0:
                ax.set_ylabel(p)
        if image is not None:
            fig.colorbar(image, ax=list(axes[r]), shrink=0.9)
    return fig


def loss_curves(history: list[dict]) -> Figure:
    """One panel per loss term (e.g. loss, recon, kl_z, kl_y) against epoch.

    ``history`` is :attr:`FitResult.history`: one dict of named numbers per epoch; an
    ``epoch`` key, if present, gives the x axis.
    """
    if not history:
        raise ValueError("empty history: the fitter logged no loss (least squares has none)")
    terms = [k for k in history[0] if k != "epoch"]
    x = np.array([h.get("epoch", i) for i, h in enumerate(history)], dtype=np.float64)
    ncols = min(3, len(terms))
    nrows = int(np.ceil(len(terms) / ncols))
    fig, axes = _figure(nrows, ncols, (3.4 * ncols, 2.6 * nrows))
    flat = axes.ravel()
    for ax, term in zip(flat, terms, strict=False):
        y = np.array([float(h.get(term, np.nan)) for h in history])
        ax.plot(x, y, lw=1.2)
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("epoch")
    for ax in flat[len(terms):]:
        fig.delaxes(ax)
    return fig


def latent_scatter(
    z2d: np.ndarray,
    labels: np.ndarray | None = None,
    cluster_names: list[str] | None = None,
    *,
    title: str = "latent space",
) -> Figure:
    """Scatter of a 2-D latent embedding (n, 2), coloured by cluster label when given."""
    z2d = np.asarray(z2d)
    if z2d.ndim != 2 or z2d.shape[1] != 2:
        raise ValueError(f"z2d must be (n, 2), got {z2d.shape}; project the latent space first")
    fig, axes = _figure(1, 1, (4.5, 4.0))
    ax = axes[0, 0]
    if labels is None:
        ax.scatter(z2d[:, 0], z2d[:, 1], s=2, alpha=0.5, color=_colour(0), rasterized=True)
    else:
        labels = np.asarray(labels).astype(int)
        for ci in np.unique(labels):
            sel = labels == ci
            name = cluster_names[ci] if cluster_names and ci < len(cluster_names) else str(ci)
            ax.scatter(z2d[sel, 0], z2d[sel, 1], s=2, alpha=0.5, color=_colour(ci),
                       label=name, rasterized=True)
        ax.legend(fontsize=8, markerscale=4)
    ax.set_xlabel("z₁")
    ax.set_ylabel("z₂")
    ax.set_title(title, fontsize=10)
    return fig


def latent_projection(lat, axes: tuple[str, str] | None = None,
                      labels: tuple[str, str] | None = None) -> dict:
    """2-D view of :meth:`~mixmap.fitting.learned.vae.VAEFitter.encode`'s samples and of the learned
    prior, in the prior's coordinates (``lat.z_prior``, where its components are Gaussian, so
    that their projections are exact ellipses).

    ``axes`` names two coordinates (e.g. ``("D", "K")`` for MSDKI) to show as they are;
    without it, the first two principal components of the scalar coordinates, each first
    divided by its spread over the samples (directions are left out: n and −n are one
    direction). Returns ``points`` (n, S, 2), ``means`` (K, 2), ``covs`` (K, 2, 2), ``weights``
    (K,) and axis labels ``xlabel``, ``ylabel`` (``labels`` when given).
    """
    x = np.asarray(lat.z_prior, dtype=np.float64)
    d = x.shape[-1]
    var = np.asarray(lat.prior_stds, dtype=np.float64) ** 2
    if axes is not None:
        missing = [a for a in axes if a not in lat.axes]
        if missing:
            raise ValueError(f"no latent coordinate {missing}; coordinates: {lat.axes}")
        A = np.zeros((d, 2))
        for j, a in enumerate(axes):
            A[lat.axes.index(a), j] = 1.0
        centre = np.zeros(d)
        auto = [f"{a} ({lat.prior_space})" for a in axes]
    else:
        keep = np.array([not a.endswith(("_x", "_y", "_z")) for a in lat.axes])
        flat = x.reshape(-1, d)[:, keep]
        centre = np.zeros(d)
        centre[keep] = flat.mean(0)
        spread = flat.std(0)
        spread[spread == 0] = 1.0
        _, _, vt = np.linalg.svd((flat - centre[keep]) / spread, full_matrices=False)
        A = np.zeros((d, 2))
        k = min(2, vt.shape[0])
        A[keep, :k] = (vt[:k] / spread).T
        names = [a for a, kp in zip(lat.axes, keep, strict=True) if kp]
        auto = []
        for j in range(2):
            top = np.argsort(-np.abs(vt[j]))[:2] if j < vt.shape[0] else []
            auto.append(f"PC {j + 1} (" + ", ".join(f"{vt[j, i]:+.2f} {names[i]}"
                                                      for i in top) + ", standardised)")
    points = (x - centre) @ A
    means = (np.asarray(lat.prior_means, dtype=np.float64) - centre) @ A
    covs = np.einsum("di,kd,dj->kij", A, var, A)
    names = labels if labels is not None else auto
    return {"points": points, "means": means, "covs": covs,
            "weights": np.asarray(lat.prior_weights), "xlabel": names[0], "ylabel": names[1]}


def latent_panel(ax, view: dict, labels: np.ndarray, names: list[str] | None = None, *,
                 title: str = "", max_points: int = 6000, seed: int = 0) -> None:
    """Draw one :func:`latent_projection` on ``ax``: the samples coloured by their voxel's
    label, each prior component's mean (black cross, labelled with its index y and weight
    p(y)) and its 1σ (dashed) and 2σ (dotted) ellipses."""
    from matplotlib.patches import Ellipse

    pts = np.asarray(view["points"])
    n, S = pts.shape[:2]
    lab = np.repeat(np.asarray(labels).astype(int), S)
    flat = pts.reshape(-1, 2)
    show = np.random.default_rng(seed).permutation(flat.shape[0])[:max_points]
    for ci in np.unique(lab):
        sel = show[lab[show] == ci]
        name = names[ci] if names and ci < len(names) else str(ci)
        ax.scatter(flat[sel, 0], flat[sel, 1], s=2, alpha=0.35, color=_colour(ci),
                   rasterized=True, label=name)
    for k, (m, c) in enumerate(zip(view["means"], view["covs"], strict=True)):
        vals, vecs = np.linalg.eigh(c)
        angle = float(np.degrees(np.arctan2(vecs[1, -1], vecs[0, -1])))
        for r, ls in ((1, "--"), (2, ":")):
            w, h = 2 * r * np.sqrt(np.maximum(vals[::-1], 0))
            ax.add_patch(Ellipse(m, w, h, angle=angle, fill=False, lw=1.0, ls=ls,
                                 color="k", zorder=3))
        ax.plot(*m, "kx", ms=7, mew=2, zorder=4)
        ax.annotate(f"y={k}, p={view['weights'][k]:.2f}", m, xytext=(4, 4),
                    textcoords="offset points", fontsize=7, zorder=5)
    lo, hi = np.nanpercentile(flat, [0.5, 99.5], axis=0)
    pad = 0.08 * (hi - lo + 1e-9)
    ax.set_xlim(min(lo[0], view["means"][:, 0].min()) - pad[0],
                max(hi[0], view["means"][:, 0].max()) + pad[0])
    ax.set_ylim(min(lo[1], view["means"][:, 1].min()) - pad[1],
                max(hi[1], view["means"][:, 1].max()) + pad[1])
    ax.set_xlabel(view["xlabel"], fontsize=8)
    ax.set_ylabel(view["ylabel"], fontsize=8)
    ax.set_title(title, fontsize=9)
    leg = ax.legend(fontsize=7, markerscale=4, loc="best")
    for h in leg.legend_handles:
        h.set_alpha(1)


__all__ = ["latent_panel", "latent_projection", "latent_scatter", "loss_curves", "map_panels",
           "scatter_truth_vs_estimate"]
