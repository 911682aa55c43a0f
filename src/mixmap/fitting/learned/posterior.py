"""The posterior of a trained VAE fitter for the maps (:class:`PosteriorMixin`): q per voxel
(refined by a few Adam steps on its own ELBO), importance-sampled draws from a defensive
proposal, and their weighted moments. :func:`maps_sizes` fixes how voxels and draws are sliced.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from mixmap.fitting.base import Scheme
from mixmap.fitting.learned.base import Data
from mixmap.fitting.learned.latent import mixture_log_prob, mixture_log_probs
from mixmap.fitting.lsq import normal_equations
from mixmap.nn import rng

#: Voxels per chunk at prediction time.
PREDICT_CHUNK = 2048
#: Draws of z per mixture component in each per-voxel refinement step of q (its ELBO gradient;
#: see docs/design/learned-fitters.md for the measurement behind one).
REFINE_DRAWS = 1
#: Posterior draws (voxels × draws per voxel) evaluated at once for the maps.
DRAWS_PER_SLICE = 2048 * 96
#: On a CUDA device the maps' chunks are sized to the device instead (:func:`maps_sizes`):
#: this many voxels per chunk, and draws per slice to fill this share of the device's memory at
#: about ``DRAW_BYTES`` bytes each (the measured peak, with the caching allocator's slack).
ACCEL_CHUNK = 262_144
ACCEL_MEMORY_SHARE = 0.25
DRAW_BYTES = 512
#: Standard-deviation factor of the widened part of the importance-sampling proposal.
WIDEN = 2.0
#: Largest precision (1 / variance, unbounded coordinates) of the Laplace proposal part.
MAX_PRECISION = 1e8


def maps_sizes(device: torch.device | str) -> tuple[int, int]:
    """(voxels per chunk, draws per slice) of the posterior maps on ``device``.

    CPU (and MPS): :data:`PREDICT_CHUNK` and :data:`DRAWS_PER_SLICE`, fixed (a CPU fit's maps
    depend on them through the order of the random draws). CUDA: :data:`ACCEL_CHUNK` voxels and
    a share of the device's total memory (not what is free at the moment, so the same device
    always slices the same way and a seed gives the same maps) for the draws; small chunks
    would leave a GPU waiting on kernel launches."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return PREDICT_CHUNK, DRAWS_PER_SLICE
    total = torch.cuda.get_device_properties(dev).total_memory
    return ACCEL_CHUNK, max(DRAWS_PER_SLICE, int(total * ACCEL_MEMORY_SHARE) // DRAW_BYTES)


class PosteriorMixin:
    """The maps of a VAE fitter from its posterior. Expects of the class it is mixed into:
    ``net`` (a :class:`~mixmap.fitting.learned.vae.MixtureVAE`), ``model``, ``n_samples``,
    ``posterior``, ``prior``, ``refine_steps``, ``refine_lr`` and the methods ``_base``,
    ``_loglik`` and ``_elbo_terms``."""

    def _maps_sizes(self, device) -> tuple[int, int]:
        """:func:`maps_sizes` (looked up when called)."""
        return maps_sizes(device)

    @contextlib.contextmanager
    def _frozen(self):
        """The network's parameters without gradients for the duration (per-voxel refinement
        of q differentiates through the net, but must not train it)."""
        params = list(self.net.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)

    def _predict(self, data: Data, scheme: Scheme, gen: torch.Generator):
        outs = []
        chunk, _ = self._maps_sizes(data.y.device)
        with self._frozen():
            for start in range(0, data.n, chunk):
                batch = data.rows(slice(start, start + chunk))
                outs.append(self._predict_chunk(batch, scheme, gen))
        params = {k: np.concatenate([o[0][k] for o in outs]) for k in outs[0][0]}
        std = {k: np.concatenate([o[1][k] for o in outs]) for k in outs[0][1]}
        probs = np.concatenate([o[2] for o in outs]) if self.prior == "gmm" else None
        return params, std, probs

    def _predict_chunk(self, batch: Data, scheme: Scheme, gen: torch.Generator):
        log_qy, mu, L = self._q_chunk(batch, scheme)
        parts, probs = [], []
        for _, z, w, p in self._weighted_draws(log_qy, mu, L, batch, scheme, gen):
            parts.append(self._moments(z, w))
            probs.append(p)
        params = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
        std = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
        return params, std, torch.cat(probs).cpu().numpy()

    @torch.no_grad()
    def _weighted_draws(self, log_qy, mu, L, batch: Data, scheme: Scheme, gen):
        """:meth:`_posterior_draws` over a chunk's voxels in slices of at most
        :func:`maps_sizes`'s draws in all, yielding (rows, z, w, cluster probabilities): the
        densities of the proposal's parts hold a few (draws × voxels × K × d) temporaries. The
        maps and :meth:`encode` both go through here, so they see the same draws."""
        step = max(1, self._maps_sizes(mu.device)[1] // int(self.n_samples))
        for start in range(0, batch.n, step):
            rows = slice(start, start + step)
            yield rows, *self._posterior_draws(log_qy[rows], mu[rows], L[rows],
                                               batch.rows(rows), scheme, gen)

    def _q_chunk(self, batch: Data, scheme: Scheme):
        """q of each voxel as the maps use it: the encoder's output, refined per voxel when
        ``refine_steps`` > 0. Returns log q(y|x) (n, K), μ (n, K, d), L (n, K, d, d)."""
        enc = self.net.encoder
        with torch.no_grad():
            logits, mu, raw = enc(batch.feats, self._base(batch))
        if self.refine_steps > 0:
            logits, mu, raw = self._refine(logits, mu, raw, batch, scheme)
        with torch.no_grad():
            return torch.log_softmax(logits, -1), mu, enc.cholesky(raw)

    def _refine(self, logits, mu, raw, batch: Data, scheme: Scheme):
        """A few Adam steps on each voxel's own q (the network's output as the start).

        A voxel whose gradient turns non-finite stays where it was before that step, and the
        others go on: each voxel's q has its own parameters and its own terms of the loss,
        so one voxel's NaN reaches no other. (Stopping the whole chunk there would leave a
        chunk's worth of voxels unrefined for one bad voxel, and how many depended on the
        device's chunk size.)"""
        params = [t.detach().clone().requires_grad_(True) for t in (logits, mu, raw)]
        logits, mu, raw = params
        opt = torch.optim.Adam(params, lr=self.refine_lr)
        enc = self.net.encoder
        stuck = None  # voxels kept where they were, once any gradient has turned non-finite
        for _ in range(int(self.refine_steps)):
            recon, kl_z, kl_y = self._elbo_terms(logits, mu, enc.cholesky(raw), batch, scheme,
                                                 n_draws=REFINE_DRAWS)
            loss = -(recon - kl_z - kl_y).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            bad = ~torch.stack([torch.isfinite(t.grad).flatten(1).all(1) for t in params]
                               ).all(0)  # (n,)
            if stuck is None and not bool(bad.any()):  # one wait for the device a step
                opt.step()
                continue
            stuck = bad if stuck is None else stuck | bad
            if bool(stuck.all()):
                break
            with torch.no_grad():
                before = [t.clone() for t in params]
                for t in params:
                    t.grad.masked_fill_(stuck.view(-1, *[1] * (t.dim() - 1)), 0.0)
                opt.step()
                for t, b in zip(params, before, strict=True):
                    t.copy_(torch.where(stuck.view(-1, *[1] * (t.dim() - 1)), b, t))
        return logits.detach(), mu.detach(), raw.detach()

    def _posterior_draws(self, log_qy, mu, L, batch: Data, scheme: Scheme, gen,
                         n_draws: int | None = None):
        """Draws of z, their normalised weights and the cluster probabilities: z (S, n, d),
        w (S, n), P(y|x) (n, K).

        ``posterior="is"``: importance sampling with the defensive proposal of
        :meth:`_propose`, every draw weighted by p(x|z) p(z) / r(z); the cluster probabilities
        are the posterior's, Σ_s w_s p(y | z_s) under the prior (they follow the prior wherever
        empirical Bayes moved its components, and assume no trained pairing of q's components
        with the prior's). ``"q"``: ⌈S / K⌉ draws per component of q, each stratum weighted
        by q(y=k|x), and q(y|x) as the cluster probabilities.
        """
        S = int(self.n_samples if n_draws is None else n_draws)
        if self.posterior == "is":
            z, log_r = self._propose(log_qy, mu, L, S, gen,
                                     self._extra_parts(batch, scheme, log_qy, L))
            prior = self.net.prior
            lpk = prior.component_log_prob(z) + prior.log_pi()  # (S, n, K)
            log_prior = torch.logsumexp(lpk, -1)
            w = torch.softmax(self._loglik(self.net.decoder(z), batch, scheme) + log_prior
                              - log_r, 0)
            probs = (w[..., None] * torch.exp(lpk - log_prior[..., None])).sum(0)
            return z, w, probs
        n, K, d = mu.shape
        S = -(-S // K)
        eps = rng.randn((S, K, n, d), gen, mu.device)
        z = mu.transpose(0, 1) + torch.einsum("...ij,...j->...i", L.transpose(0, 1),
                                              eps)  # (S, K, n, d)
        logw = log_qy.T.expand(S, K, n)
        return z.reshape(S * K, n, d), torch.softmax(logw.reshape(S * K, n), 0), log_qy.exp()

    def _propose(self, log_qy, mu, L, S: int, gen, extra=()):
        """S draws per voxel from the defensive mixture r of q, q₂, the ``extra`` parts and p,
        each part with an equal share of the draws: q the mixture q(y|x) q(z|x,y) (components
        drawn by q(y|x)), q₂ the same with every covariance widened ×4 (std ×2), p the prior;
        returns z (S, n, d) and log r(z) (S, n) (the balance heuristic: each draw's density
        under the whole mixture). q alone can be narrower than the posterior or miss part of
        it (an amortised Gaussian on a curved ridge); then a few draws carry all the weight.
        The wide part and the prior bound every weight.

        ``extra`` are more parts, each a Gaussian per voxel given as (μ (n, d), L (n, d, d)):
        around the least-squares estimate (:meth:`_extra_parts`) and, in empirical Bayes,
        around the last round's posterior
        (:func:`~mixmap.fitting.empirical_bayes.refit.em_rounds`)."""
        n, K, d = mu.shape
        one = mu.new_zeros(n, 1)  # log q(y|x) of a one-component part
        parts = [(log_qy, mu, L, 1.0), (log_qy, mu, L, WIDEN)] + [
            (one, m[:, None], c[:, None], 1.0) for m, c in extra]
        share = S // (len(parts) + 1)
        counts = [S - len(parts) * share] + [share] * len(parts)  # the prior's is counts[-1]
        zs = []
        rows = torch.arange(n, device=mu.device)[None, :]
        for c, (lq, m, chol, scale) in zip(counts, parts, strict=False):
            if c == 0:
                continue
            k = rng.multinomial(lq.exp(), c, gen).T  # (c, n)
            eps = rng.randn((c, n, d), gen, mu.device)
            zs.append(m[rows, k] + scale * torch.einsum("...ij,...j->...i", chol[rows, k], eps))
        if counts[-1]:
            zs.append(self.net.prior.sample((counts[-1], n), gen))
        z = torch.cat(zs)
        log_parts = mixture_log_probs(z, log_qy, mu, L, (1.0, WIDEN)) + [
            mixture_log_prob(z, lq, m, chol) for lq, m, chol, _ in parts[2:]]
        log_r = [math.log(c / S) + lp for c, lp in zip(counts, log_parts, strict=False) if c]
        if counts[-1]:
            log_r.append(math.log(counts[-1] / S) + self.net.prior.log_prob(z))
        return z, torch.logsumexp(torch.stack(log_r), 0)

    @torch.no_grad()
    def _extra_parts(self, batch: Data, scheme: Scheme, log_qy: torch.Tensor,
                     L: torch.Tensor) -> list:
        """Proposal parts besides q and the prior for the maps: where the encoder sees the
        least-squares estimate, the Laplace approximation of the likelihood there, a Gaussian
        with precision JᵀWJ/σ² + I in the unbounded coordinates (the identity adds a unit of
        spread along directions the data leave free; with another decoder than the identity,
        the shape of the voxel's most probable q component instead). Where the likelihood is
        much sharper than q is wide (voxels whose signal the model reaches only at one point:
        MSDKI's growing signal where D·K is large), q's and the prior's draws can all miss it
        and the maps would rest on one bad draw; least squares has found that point."""
        base = self._base(batch)
        if base is None:
            return []
        if self.net.decoder.kind != "identity":
            top = log_qy.argmax(-1)
            return [(base, L[torch.arange(L.shape[0], device=L.device), top])]
        sw = None if scheme.weights is None else scheme.weights.sqrt()
        _, jtj, _ = normal_equations(self.model, base, batch.yw, scheme.work, sw)
        sigma2 = float(self.net.noise.sigma) ** 2
        precision = torch.nan_to_num(jtj / sigma2, nan=0.0, posinf=MAX_PRECISION,
                                     neginf=0.0)
        lam, vec = torch.linalg.eigh(0.5 * (precision + precision.transpose(-1, -2)))
        # + 1 (the unit spread along free directions); capped, so the float32 Gaussian stays
        # proper where the likelihood is sharper than the working precision can hold
        lam = (lam.clamp_min(0) + 1.0).clamp_max(MAX_PRECISION)
        cov = (vec / lam[..., None, :]) @ vec.transpose(-1, -2)
        return [(base, torch.linalg.cholesky(cov).to(base.dtype))]


    def _moments(self, z: torch.Tensor, w: torch.Tensor):
        """Posterior mean and std of each bounded parameter and each derived map (FA, ...: the
        mean of the derived value over the draws, not the value at the mean) from weighted
        draws of z (S, n, d) with weights (S, n) summing to 1 per voxel (directions: a mean
        axis, no std)."""
        theta = self.model.split(self.net.decoder(z))
        values = {**theta, **self.model.derive(theta)}
        params, std = {}, {}
        for p in self.model.parameters + self.model.derived:
            v = values[p.name]
            if p.is_direction:
                params[p.name] = mean_axis(v, w).cpu().numpy()
                continue
            mean = (w * v).sum(0)
            var = (w * (v - mean) ** 2).sum(0)
            params[p.name] = mean.cpu().numpy()
            std[p.name] = var.clamp_min(0).sqrt().cpu().numpy()
        return params, std


def mean_axis(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted mean (n, 3) of unit axes v (S, n, 3) with weights w (S, n): each draw's sign
    turned towards the heaviest draw's, then averaged and normalised."""
    n = v.shape[1]
    ref = v.gather(0, w.argmax(0)[None, :, None].expand(1, n, 3))[0]
    dot = (v * ref).sum(-1, keepdim=True)
    sign = torch.sign(dot) + dot.eq(0)
    m = (w[..., None] * v * sign).sum(0)
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
