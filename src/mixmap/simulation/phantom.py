"""Realistic phantoms: the truth is a fit of a real scan (smoothed inside its mask), the
acquisition, mask and affine are the scan's, the noise Gaussian or Rician at a chosen b0 SNR or
at the scan's own noise level times a factor (``mixmap simulate --like``). Each voxel gets a
tissue class (white-matter-like, grey-matter-like, CSF-like) from a tensor fit of the real scan,
so results can be reported per class."""

from __future__ import annotations

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.models import get_model
from mixmap.simulation.synthesize import Simulation, add_noise

#: Tissue classes of a phantom's voxels, in label order.
CLASS_NAMES = ("white-matter-like", "grey-matter-like", "csf-like")
#: Mean diffusivity (µm²/ms) at and above which a voxel is CSF-like.
CSF_MD = 1.5
#: Fractional anisotropy at and above which a voxel that is not CSF-like is white-matter-like.
WM_FA = 0.3
#: Largest b (ms/µm²) of the volumes the tensor of :func:`tissue_classes` is fitted to.
TENSOR_MAX_B = 1.6


def tissue_classes(signals: np.ndarray, acq: Acquisition) -> tuple[np.ndarray, dict]:
    """(n,) int64 labels into :data:`CLASS_NAMES` from a log-linear tensor fit of ``signals``
    (n, m) on the b=0 volumes and those with b ≤ :data:`TENSOR_MAX_B`: CSF-like where MD ≥
    :data:`CSF_MD` µm²/ms, white-matter-like where FA ≥ :data:`WM_FA`, grey-matter-like
    otherwise. Also returns the rule and the class counts."""
    b, g = acq.bvals, acq.bvecs
    use = b <= TENSOR_MAX_B
    if (use & ~acq.b0_mask).sum() < 6 or not acq.b0_mask.any():
        raise ValueError("tissue classes need b=0 volumes and at least 6 diffusion-weighted "
                         f"volumes with b <= {TENSOR_MAX_B * 1000:g} s/mm²")
    design = np.column_stack([np.ones(use.sum()), *(-b[use] * g[use, i] * g[use, j]
                              * (1 if i == j else 2) for i, j in
                              ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)))])
    logs = np.log(np.maximum(signals[:, use].astype(np.float64), 1e-6))
    coef, *_ = np.linalg.lstsq(design, logs.T, rcond=None)
    dxx, dyy, dzz, dxy, dxz, dyz = coef[1:]
    tensor = np.stack([np.stack([dxx, dxy, dxz], -1), np.stack([dxy, dyy, dyz], -1),
                       np.stack([dxz, dyz, dzz], -1)], -2)
    ev = np.linalg.eigvalsh(tensor)
    md = ev.mean(1)
    fa = np.sqrt(1.5 * ((ev - md[:, None]) ** 2).sum(1) / np.maximum((ev**2).sum(1), 1e-12))
    labels = np.where(md >= CSF_MD, 2, np.where(fa >= WM_FA, 0, 1)).astype(np.int64)
    rule = (f"tensor fit on b <= {TENSOR_MAX_B * 1000:g} s/mm²: csf-like MD >= {CSF_MD} "
            f"µm²/ms; white-matter-like FA >= {WM_FA}; grey-matter-like otherwise")
    counts = {name: int((labels == k).sum()) for k, name in enumerate(CLASS_NAMES)}
    return labels, {"rule": rule, "counts": counts}


def smooth_in_mask(values: np.ndarray, mask: np.ndarray, sd: float) -> np.ndarray:
    """Gaussian smoothing (standard deviation ``sd`` voxels) inside ``mask`` by normalised
    convolution; axes along which the mask spans fewer than 4 slices are not smoothed.
    ``values`` (n,) in C order of the mask's voxels -> (n,) float64."""
    from scipy.ndimage import gaussian_filter

    if sd <= 0:
        return values.astype(np.float64)
    extent = [int(np.ptp(ix)) + 1 for ix in np.nonzero(mask)]
    sig = tuple(sd if e >= 4 else 0.0 for e in extent)
    vol = np.zeros(mask.shape)
    vol[mask] = values
    m = mask.astype(np.float64)
    num = gaussian_filter(vol * m, sig)
    den = gaussian_filter(m, sig)
    return (num / np.maximum(den, 1e-12))[mask]


def smooth_directions(n: np.ndarray, mask: np.ndarray, sd: float) -> np.ndarray:
    """Smooth the dyadic tensor n nᵀ inside ``mask`` and take its principal eigenvector;
    (n, 3) unit vectors in C order of the mask's voxels -> (n, 3)."""
    dyad = np.einsum("ni,nj->nij", n, n).reshape(-1, 9)
    sm = np.stack([smooth_in_mask(dyad[:, i], mask, sd) for i in range(9)], 1)
    _, vec = np.linalg.eigh(sm.reshape(-1, 3, 3))
    return vec[:, :, -1]


def phantom_truth(params: dict[str, np.ndarray], model: str, mask: np.ndarray,
                  sd: float) -> dict[str, np.ndarray]:
    """The truth of a phantom from a fit's maps ``params`` (name -> (n,) or (n, 3) rows in C
    order of ``mask``): smoothed with :func:`smooth_in_mask` (directions through
    :func:`smooth_directions`), scalars clipped to the model's bounds (the scale parameter
    only from below). name -> float64 array."""
    truth = {}
    for p in get_model(model).parameters:
        v = np.asarray(params[p.name], dtype=np.float64)
        if p.is_direction:
            truth[p.name] = smooth_directions(v, mask, sd)
        else:
            hi = np.inf if p.scaled else p.upper
            truth[p.name] = np.clip(smooth_in_mask(v, mask, sd), p.lower, hi)
    return truth


def keep_physical(model, truth: dict[str, np.ndarray], fitted: dict[str, np.ndarray],
                  acq: Acquisition) -> tuple[dict[str, np.ndarray], int]:
    """The smoothed ``truth`` with the fit's own (unsmoothed) parameters in the voxels where
    smoothing made the noise-free signal rise above S0 more than the fit's did: smoothing a
    kurtosis tensor and a diffusion tensor of different neighbours apart can make exp(−bD +
    b²D²K/6) grow without bound, a signal no tissue gives. Returns it and how many voxels."""
    def rise(params):
        with torch.no_grad():
            sig = model.forward({k: torch.as_tensor(np.asarray(params[k], np.float64))
                                 for k in truth}, acq).numpy()
        s0 = np.maximum(np.asarray(params[model.scale_parameter], np.float64), 1e-12)
        return sig[:, ~acq.b0_mask].max(1) / s0 if (~acq.b0_mask).any() else np.zeros(len(s0))

    if model.scale_parameter is None:
        return truth, 0
    bad = rise(truth) > np.maximum(rise(fitted), 1.0) + 1e-6
    if not bad.any():
        return truth, 0
    out = {k: v.copy() for k, v in truth.items()}
    for k in out:
        out[k][bad] = np.asarray(fitted[k], np.float64)[bad]
    return out, int(bad.sum())


def phantom_sigma(truth: dict[str, np.ndarray], model: str, *, snr: float | None = None,
                  scan_sigma: float | None = None, noise_factor: float | None = None
                  ) -> tuple[float, float]:
    """(σ, b0 SNR) of a phantom: σ = median S0 of the truth / ``snr``, or ``scan_sigma`` ×
    ``noise_factor`` (the scan's own noise level, scaled); exactly one of the two ways."""
    s0 = float(np.median(truth[get_model(model).scale_parameter]))
    if (snr is None) == (noise_factor is None):
        raise ValueError("give either an SNR or a noise factor (times the scan's own noise)")
    if snr is not None:
        if not snr > 0:
            raise ValueError(f"SNR must be positive, got {snr}")
        return s0 / snr, float(snr)
    if scan_sigma is None or not scan_sigma > 0:
        raise ValueError("the scan's own noise level is unknown (it needs at least 2 b=0 "
                         "volumes); give an SNR instead")
    if not noise_factor > 0:
        raise ValueError(f"noise factor must be positive, got {noise_factor}")
    sigma = scan_sigma * noise_factor
    return sigma, s0 / sigma


def make_phantom(signals: np.ndarray, acq: Acquisition, mask: np.ndarray, affine: np.ndarray,
                 model: str, *, smooth: float = 1.0, snr: float | None = 20.0,
                 noise_factor: float | None = None, noise: str = "rician", seed: int = 0,
                 truth_method: str = "lsq", source: str = "") -> Simulation:
    """A realistic phantom of a real scan: ``signals`` (n, m) its masked voxels in C order of
    ``mask``, ``acq`` its acquisition. The truth is ``truth_method``'s fit of ``model`` to the
    scan (:func:`phantom_truth`, smoothing ``smooth`` voxels), the noise ``noise`` at a b0
    ``snr`` or at the scan's σ times ``noise_factor`` (:func:`phantom_sigma`); labels are
    :func:`tissue_classes` of the real scan. The returned :class:`Simulation` has no preset;
    its ``info`` records how it was made."""
    from mixmap.fitting import get_fitter
    from mixmap.fitting.base import noise_sigma_from_repeats

    if signals.shape != (int(mask.sum()), acq.n):
        raise ValueError(f"signals {signals.shape} do not match the mask's {int(mask.sum())} "
                         f"voxels × {acq.n} volumes")
    m = get_model(model)
    m.check_acquisition(acq)
    labels, classes = tissue_classes(signals, acq)
    fit = get_fitter(truth_method, m).fit(signals, acq)
    truth = phantom_truth(fit.params, model, mask, smooth)
    truth, kept = keep_physical(m, truth, fit.params, acq)
    scan_sigma = noise_sigma_from_repeats(signals, acq, m)
    sigma, b0_snr = phantom_sigma(truth, model, snr=snr, scan_sigma=scan_sigma,
                                  noise_factor=noise_factor)
    with torch.no_grad():
        clean = m.forward({k: torch.as_tensor(v) for k, v in truth.items()}, acq).numpy()
    rng = np.random.default_rng(seed)
    noisy = add_noise(clean, sigma, noise, rng).astype(np.float32)
    info = {"kind": "phantom", "model": model, "source": source, "truth_method": truth_method,
            "smooth_sd_vox": float(smooth), "scan_sigma": scan_sigma,
            "noise_factor": noise_factor, "unsmoothed_voxels": kept,
            "s0_median": float(np.median(
                truth[m.scale_parameter])), "tissue_classes": classes}
    return Simulation(signals=noisy, truth={k: v.astype(np.float32) for k, v in truth.items()},
                      labels=labels, acquisition=acq, preset=None, snr=float(b0_snr),
                      noise=noise, sigma=float(sigma), seed=int(seed), info=info, mask=mask,
                      affine=np.asarray(affine, dtype=np.float64), cluster_names=CLASS_NAMES)


def phantom_like(dwi, bvals, bvecs, mask, model: str, *, max_b: float | None = None,
                 **options) -> Simulation:
    """:func:`make_phantom` of the scan in files (``dwi`` 4-D NIfTI, FSL ``bvals``/``bvecs``,
    ``mask``); ``max_b`` (s/mm²) keeps only the volumes with b at most that (e.g. 3000 for
    MSDKI on a scan with higher shells)."""
    from mixmap.io import load_dwi

    data = load_dwi(dwi, bvals, bvecs, mask)
    signals, acq = data.signals, data.acquisition
    if max_b is not None:
        keep = np.flatnonzero(acq.bvals <= max_b / 1000.0 + 1e-6)
        if keep.size == 0:
            raise ValueError(f"--max-b {max_b:g}: no volume of {bvals} has b at most that")
        signals, acq = signals[:, keep], acq.subset(keep)
        try:
            get_model(model).check_acquisition(acq)
        except ValueError as exc:
            raise ValueError(f"--max-b {max_b:g}: {exc}") from None
    return make_phantom(signals, acq, data.mask, data.affine, model, source=str(dwi),
                        **options)


__all__ = ["CLASS_NAMES", "keep_physical", "make_phantom", "phantom_like", "phantom_sigma",
           "phantom_truth", "smooth_directions", "smooth_in_mask", "tissue_classes"]
