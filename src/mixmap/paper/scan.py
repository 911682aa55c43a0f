"""The real scan of the reproduction: loading it (optionally a crop), its voxels' positions,
slice images, map grids, and smoothing inside the mask (the phantom's truth)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.fitting.base import FitResult, noise_sigma_from_repeats
from mixmap.models import get_model
from mixmap.paper.run import Run, pyplot
from mixmap.plots import to_ras


@dataclass
class Scan:
    """The fitted voxels of the scan: ``signals`` (n, n_meas) in rows of ``coords``."""

    signals: np.ndarray
    acq: Acquisition
    mask: np.ndarray  # 3-D, the fitted voxels
    coords: np.ndarray  # (n, 3) voxel index of each row
    slice_z: int
    sigma: float
    note: str
    affine: np.ndarray  # (4, 4) voxel -> scanner mm


def row_coords(data, dwi_path: Path) -> np.ndarray:
    """Voxel index (n, 3) of each row of ``load_dwi``'s signals, checked against the image
    itself (the row order of load_dwi is not necessarily the C order of the mask)."""
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


def load_scan(run: Run) -> Scan:
    """The run's dataset (``datasets.fetch``), cropped to about ``real_crop`` voxels of its
    fullest slice when set; σ from its b=0 volumes. Raises RuntimeError when it cannot be
    fetched."""
    from mixmap import datasets
    from mixmap.io import load_dwi

    paths = datasets.fetch(run.s.dataset)
    data = load_dwi(paths["dwi"], paths["bvals"], paths["bvecs"], paths["mask"])
    coords = row_coords(data, paths["dwi"])
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
    return Scan(signals, data.acquisition, mask, coords[keep], z, float(sigma), note,
                np.asarray(data.affine, dtype=np.float64))


#: How the map figures are shown, said in their titles.
ORIENTATION = "axial, neurological: subject's right on the right, anterior up"


def slice_image(scan: Scan, values: np.ndarray) -> np.ndarray:
    """(n,) -> the axial slice ``scan.slice_z`` (NaN outside the mask) in RAS, cropped to the
    fitted voxels' bounding box, rows = anterior-posterior for ``imshow(origin="lower")``."""
    import nibabel as nib

    vol = np.full(scan.mask.shape, np.nan, dtype=np.float32)
    vol[tuple(scan.coords.T)] = values
    ornt = nib.orientations.io_orientation(scan.affine)
    z = scan.slice_z
    out_axis, flip = int(ornt[2, 0]), ornt[2, 1]
    vol, mask = to_ras(vol, scan.affine), to_ras(scan.mask, scan.affine)
    if out_axis == 2:  # the slice axis stays the axial axis: the same slice, maybe flipped
        z = z if flip > 0 else vol.shape[2] - 1 - z
    else:  # an acquisition in another plane: the fullest axial slice
        z = int(np.argmax(mask.sum((0, 1))))
    img, m = vol[:, :, z], mask[:, :, z]
    xs, ys = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return img[xs[0]: xs[-1] + 1, ys[0]: ys[-1] + 1].T


def param_unit(model: str, name: str) -> str:
    """The declared unit of ``model``'s parameter ``name`` for a colour bar ("1" reads as
    "unitless")."""
    unit = next(p.unit for p in get_model(model).parameters if p.name == name)
    return "unitless" if unit == "1" else unit


def map_grid(run: Run, scan: Scan, rows: list[str], cols: list[str], get, ranges, title,
             name, units: dict[str, str], cmap="gray") -> Path:
    """Figure ``name``: the shown slice of ``get(row, col)`` ((n,) values, or None for "n/a")
    per row and column, one colour scale ``ranges[col]`` = (vmin, vmax) per column with its
    colour bar labelled ``units[col]``; panels sized to the slice, no empty margins."""
    plt = pyplot()
    first = slice_image(scan, np.zeros(len(scan.coords), dtype=np.float32))
    panel = 1.6  # inches across one map
    height = panel * first.shape[0] / first.shape[1]
    fig, axes = plt.subplots(len(rows), len(cols), squeeze=False, layout="constrained",
                             figsize=(panel * len(cols) + 0.5, height * len(rows) + 0.9))
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.01, hspace=0.01)
    for j, c in enumerate(cols):
        vmin, vmax = ranges[c]
        im = None
        for i, r in enumerate(rows):
            ax = axes[i, j]
            v = get(r, c)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(r, fontsize=9)
            if v is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
                continue
            im = ax.imshow(slice_image(scan, v), origin="lower", cmap=cmap, vmin=vmin,
                           vmax=vmax, interpolation="nearest")
        if im is not None:
            bar = fig.colorbar(im, ax=axes[:, j].tolist(), location="bottom", shrink=0.9,
                               aspect=12)
            bar.set_label(units[c], fontsize=8)
            bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"{title}\n({ORIENTATION})", fontsize=9)
    return run.figure(name, fig)


def predicted(model_name: str, res: FitResult, acq: Acquisition) -> np.ndarray:
    """The model's signals (n, n_meas), float64, from the maps of ``res``."""
    model = get_model(model_name)
    params = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64)
              for k, v in res.params.items()}
    with torch.no_grad():
        return model.forward(params, acq).numpy()


def scalar_params(model_name: str) -> list[str]:
    """The model's parameter names that are not directions."""
    return [p.name for p in get_model(model_name).parameters if not p.is_direction]


def smooth_in_mask(scan: Scan, values: np.ndarray, sd: float) -> np.ndarray:
    """Gaussian smoothing (sd in voxels) inside the mask (normalised convolution, in-plane
    per slice); (n,) -> (n,)."""
    from scipy.ndimage import gaussian_filter

    vol = np.zeros(scan.mask.shape)
    vol[tuple(scan.coords.T)] = values
    m = scan.mask.astype(np.float64)
    sig = (sd, sd, 0)
    num = gaussian_filter(vol * m, sig)
    den = gaussian_filter(m, sig)
    return (num / np.maximum(den, 1e-12))[tuple(scan.coords.T)]


def smooth_directions(scan: Scan, n: np.ndarray, sd: float) -> np.ndarray:
    """Smooth the dyadic tensor n nᵀ inside the mask and take its principal eigenvector;
    (n, 3) unit vectors -> (n, 3)."""
    T = np.einsum("ni,nj->nij", n, n).reshape(-1, 9)
    Ts = np.stack([smooth_in_mask(scan, T[:, i], sd) for i in range(9)], 1).reshape(-1, 3, 3)
    _, vec = np.linalg.eigh(Ts)
    return vec[:, :, -1]


def edges(scan: Scan, values: np.ndarray, frac: float = 0.2) -> np.ndarray:
    """(n,) bool: interior voxels in the top ``frac`` of the in-plane gradient magnitude of
    ``values``."""
    vol = np.zeros(scan.mask.shape)
    vol[tuple(scan.coords.T)] = values
    gx, gy = np.gradient(vol, axis=(0, 1))
    g = np.hypot(gx, gy)[tuple(scan.coords.T)]
    # neighbours outside the mask make every boundary voxel an "edge"; keep interior ones
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(scan.mask, structure=np.ones((3, 3, 1)))[tuple(scan.coords.T)]
    thr = np.quantile(g[inner], 1 - frac) if inner.any() else np.inf
    return inner & (g >= thr)


__all__ = ["ORIENTATION", "Scan", "edges", "load_scan", "map_grid", "param_unit", "predicted",
           "row_coords",
           "scalar_params", "slice_image", "smooth_directions", "smooth_in_mask"]
