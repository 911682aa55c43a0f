"""The latent space of the VAE fitters: :func:`encode` (posterior samples of z and the cluster
probabilities, as :class:`LatentSamples`), the mixture densities of q
(:func:`mixture_log_prob`, :func:`mixture_log_probs`), the bounds of the latent coordinates
(:func:`latent_bounds`) and the data-driven start of the mixture prior (:func:`kmeans`,
:func:`cluster_moments` on :func:`bounded_matrix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.fitting.base import signal_scale
from mixmap.models import SignalModel
from mixmap.nn import rng


@dataclass
class LatentSamples:
    """What :meth:`VAEFitter.encode` returns for n voxels, S draws each, latent dimension d
    and K mixture components (K = 1 for ``vae``).

    Attributes
    ----------
    z
        (n, S, d) posterior samples of z in the latent coordinates (:attr:`space`).
    z_prior
        (n, S, d) the same samples in the coordinates the prior's Gaussians live in
        (:attr:`prior_space`): the bounded parameter values (θ = lower + (upper −
        lower)·sigmoid(z), directions' components unchanged) for the default ``vae-gmm``,
        z itself otherwise.
    cluster_probs
        (n, K) the cluster probabilities of the maps: P(y|x) under the learned prior from
        the importance-weighted draws (``posterior="is"``), else q(y|x) after refinement.
    axes
        Name of each of the d coordinates: the model's parameters (directions as
        ``n_x, n_y, n_z``) when z is the parameter space, else ``z1 … zd``.
    space, prior_space
        What the coordinates of ``z`` and ``z_prior`` are.
    prior_means, prior_stds
        (K, d) the learned prior's component means and standard deviations (diagonal), in
        ``prior_space`` coordinates.
    prior_weights
        (K,) the prior's mixing weights p(y).
    signal_scale
        The scan's signal scale: S0 in working units times it is S0 in the signal's units.
    """

    z: np.ndarray
    z_prior: np.ndarray
    cluster_probs: np.ndarray
    axes: list[str]
    space: str
    prior_space: str
    prior_means: np.ndarray
    prior_stds: np.ndarray
    prior_weights: np.ndarray
    signal_scale: float



def encode(fitter, signals: np.ndarray, acquisition: Acquisition, n_samples: int = 16, *,
           allow_other_acquisition: bool = False) -> LatentSamples:
    """Posterior samples of z for every voxel of a trained VAE ``fitter``, and the cluster
    probabilities: :meth:`VAEFitter.encode <mixmap.fitting.learned.vae.VAEFitter.encode>`."""
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    data, scheme, _ = fitter._apply_data(signals, acquisition, allow_other_acquisition)
    z, probs = _posterior_samples(fitter, data, scheme, int(n_samples))
    net, model = fitter.net, fitter.model
    prior = net.prior
    with torch.no_grad():
        z_prior = prior.to_prior_space(z)
    identity = net.decoder.kind == "identity"
    axes = [f"z{i + 1}" for i in range(z.shape[-1])]
    if identity:
        axes = []
        for p in model.parameters:
            axes += [f"{p.name}_{c}" for c in "xyz"] if p.is_direction else [p.name]
    space = ("unbounded parameters (working units)" if identity else "latent")
    prior_space = space if prior.analytic else "bounded parameters (working units)"
    return LatentSamples(
        z=z.cpu().numpy(), z_prior=z_prior.cpu().numpy(),
        cluster_probs=probs.cpu().numpy(),
        axes=axes, space=space, prior_space=prior_space,
        prior_means=prior.mu.detach().cpu().numpy().copy(),
        prior_stds=prior.log_std.detach().exp().cpu().numpy(),
        prior_weights=prior.log_pi().detach().exp().cpu().numpy(),
        signal_scale=float(signal_scale(signals, acquisition, model)),
    )


def _posterior_samples(fitter, data, scheme, n_samples: int):
    """(z (n, n_samples, d), cluster probabilities (n, K)): draws with replacement, by weight,
    from the weighted draws the maps average, with the maps' seeds and order of draws."""
    fitter.net.eval()
    seed = fitter.seed + 1  # the seeds of LearnedFitter._result
    gen = rng.draw_generator(seed, data.y.device)
    pick = rng.draw_generator(seed + 1, data.y.device)
    chunk, _ = fitter._maps_sizes(data.y.device)
    zs, probs = [], []
    with fitter._frozen():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for start in range(0, data.n, chunk):
                batch = data.rows(slice(start, start + chunk))
                log_qy, mu, L = fitter._q_chunk(batch, scheme)
                for _, z, w, p in fitter._weighted_draws(log_qy, mu, L, batch, scheme, gen):
                    idx = rng.multinomial(w.T, n_samples, pick)  # (n, S')
                    voxels = torch.arange(z.shape[1], device=z.device)[:, None]
                    zs.append(z[idx, voxels])  # (n, S', d)
                    probs.append(p)
    return torch.cat(zs), torch.cat(probs)


def mixture_log_prob(z: torch.Tensor, log_qy: torch.Tensor, mu: torch.Tensor,
                     L: torch.Tensor) -> torch.Tensor:
    """log Σ_j q(y=j|x) N(z; μ_j, L_j L_jᵀ) for z (..., n, d); q per voxel: log_qy (n, K),
    μ (n, K, d), L (n, K, d, d). Returns (...,  n)."""
    return mixture_log_probs(z, log_qy, mu, L, (1.0,))[0]


def mixture_log_probs(z: torch.Tensor, log_qy: torch.Tensor, mu: torch.Tensor,
                      L: torch.Tensor, scales: tuple[float, ...]) -> list[torch.Tensor]:
    """:func:`mixture_log_prob` of the same draws with every covariance scaled by s² for each
    s in ``scales``: the whitened distances are computed once for all of them."""
    d = mu.shape[-1]
    # The factor's inverse by a triangular solve, which divides by L's diagonal only (> 0 by
    # construction): a general inverse pivots and can report an ill-conditioned factor
    # singular.
    eye = torch.eye(d, dtype=L.dtype, device=L.device).expand_as(L)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)  # (n, K, d, d)
    diff = z[..., None, :] - mu  # (..., n, K, d)
    # One small matrix per (voxel, component) applied to all draws: einsum batches it as
    # (n K) products of d x d by d x S; broadcasting `@` made S n K products of d x d by d x 1.
    x = torch.einsum("...ij,...j->...i", Linv, diff)
    maha = (x * x).sum(-1)
    logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # (n, K)
    const = logdet + 0.5 * d * math.log(2 * math.pi) - log_qy
    return [torch.logsumexp(-0.5 * maha / (s * s) - const - d * math.log(s), -1)
            for s in scales]


def gaussian_entropy(L: torch.Tensor) -> torch.Tensor:
    """Entropy of N(·, L Lᵀ) for L (..., d, d) lower-triangular: (...,)."""
    d = L.shape[-1]
    logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return 0.5 * d * (1 + math.log(2 * math.pi)) + logdet


def latent_bounds(model: SignalModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) per unbounded coordinate of the model: the parameter's bounds for a
    scalar, NaN (unbounded) for the components of a direction."""
    lo, hi = [], []
    for p in model.parameters:
        if p.is_direction:
            lo += [float("nan")] * p.size
            hi += [float("nan")] * p.size
        else:
            lo.append(p.lower)
            hi.append(p.upper)
    return torch.tensor(lo), torch.tensor(hi)


def bounded_matrix(model: SignalModel, params: dict) -> torch.Tensor:
    """(n, n_scalars) bounded scalar parameters divided by their ranges (directions left out)."""
    cols = [(params[p.name] - p.lower) / (p.upper - p.lower) for p in model.parameters
            if not p.is_direction]
    return torch.stack(cols, 1)


@torch.no_grad()
def cluster_moments(z: torch.Tensor, labels: torch.Tensor, k: int):
    """Per-cluster median and robust spread (1.4826·MAD) of z (n, d); empty clusters get the
    overall values."""
    centres = z.median(0).values.repeat(k, 1)
    spread = torch.ones_like(centres)
    for j in range(k):
        sel = z[labels == j]
        if sel.shape[0] > 1:
            centres[j] = sel.median(0).values
            spread[j] = 1.4826 * (sel - centres[j]).abs().median(0).values
    return centres, spread


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 30):
    """k-means++ then Lloyd iterations; returns centres (k, d), per-cluster std (k, d) and
    labels (n,)."""
    gen = torch.Generator().manual_seed(seed)
    xc = x.cpu()
    n = xc.shape[0]
    centres = [xc[torch.randint(n, (1,), generator=gen)][0]]
    for _ in range(1, k):
        d2 = torch.cdist(xc, torch.stack(centres)).min(1).values ** 2
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        centres.append(xc[torch.multinomial(probs, 1, generator=gen)][0])
    c = torch.stack(centres)
    for _ in range(iters):
        lab = torch.cdist(xc, c).argmin(1)
        for j in range(k):
            sel = lab == j
            if bool(sel.any()):
                c[j] = xc[sel].mean(0)
    lab = torch.cdist(xc, c).argmin(1)
    spread = torch.ones_like(c)
    for j in range(k):
        sel = lab == j
        if int(sel.sum()) > 1:
            spread[j] = xc[sel].std(0)
    return c.to(x.device), spread.to(x.device), lab.to(x.device)

