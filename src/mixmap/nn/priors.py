"""Priors over the latent space: N(0, I) (VAE-UniG) and a learned Gaussian mixture (VAE-GMM).

Both expose the same interface, a mixture with K components (K = 1 for N(0, I)): component
means and log standard deviations (diagonal covariance), log mixing weights, the marginal
log density, and the closed-form KL from a full-covariance Gaussian q to each component.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import mixmap.nn.rng as rng


class MixturePrior(nn.Module):
    """p(y) = Categorical(π), p(z|y) = N(μ_y, diag σ_y²), all learned.

    ``init_means`` (K, d) places the components; the default spreads them on a small random
    set so that the encoder can assign voxels to different ones from the first epoch.

    ``lower``/``upper`` (d,), when given, make the Gaussians live in *bounded* coordinates
    θ = lower + (upper − lower)·sigmoid(z) (NaN bounds: that coordinate stays unbounded), with
    the Jacobian of the map included, so that p(z) is still a density over z. A Gaussian in the
    unbounded coordinate with a large variance piles its mass on the bounds; one in bounded
    coordinates does not, which matters where the data leave a parameter weakly determined.
    The KL to such a component has no closed form (see :attr:`analytic`).
    """

    def __init__(self, latent_dim: int, n_components: int, *, learned: bool = True,
                 init_means: torch.Tensor | None = None, init_log_std: float = 0.0,
                 lower: torch.Tensor | None = None, upper: torch.Tensor | None = None) -> None:
        super().__init__()
        lo = torch.full((latent_dim,), float("nan")) if lower is None else torch.as_tensor(
            lower, dtype=torch.float32)
        hi = torch.full((latent_dim,), float("nan")) if upper is None else torch.as_tensor(
            upper, dtype=torch.float32)
        bounded = torch.isfinite(lo) & torch.isfinite(hi)
        self.register_buffer("bounded", bounded)
        self.register_buffer("lo", torch.where(bounded, lo, torch.zeros_like(lo)))
        self.register_buffer("span", torch.where(bounded, hi - lo, torch.ones_like(lo)))
        self.analytic = not bool(bounded.any())
        self.latent_dim = int(latent_dim)
        self.n_components = int(n_components)
        mu = (torch.zeros(n_components, latent_dim) if init_means is None
              else torch.as_tensor(init_means, dtype=torch.float32).clone())
        log_std = torch.full((n_components, latent_dim), float(init_log_std))
        logits = torch.zeros(n_components)
        self.learned = bool(learned)
        if learned:
            self.mu = nn.Parameter(mu)
            self.log_std = nn.Parameter(log_std)
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("mu", mu)
            self.register_buffer("log_std", log_std)
            self.register_buffer("logits", logits)

    def log_pi(self) -> torch.Tensor:
        """(K,) log mixing weights."""
        return torch.log_softmax(self.logits, 0)

    def to_prior_space(self, z: torch.Tensor) -> torch.Tensor:
        """The coordinates the Gaussians live in: bounded where bounds were given."""
        if self.analytic:
            return z
        return torch.where(self.bounded, self.lo + self.span * torch.sigmoid(z), z)

    def log_jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """log |dθ/dz| summed over coordinates, (...,)."""
        if self.analytic:
            return z.new_zeros(z.shape[:-1])
        lj = torch.log(self.span) + nn.functional.logsigmoid(z) + nn.functional.logsigmoid(-z)
        return torch.where(self.bounded, lj, torch.zeros_like(lj)).sum(-1)

    def log_mass(self) -> torch.Tensor:
        """(K,) log of each component's mass inside the bounds (0 where nothing is bounded):
        a Gaussian in bounded coordinates is truncated to them and renormalised, so that
        p(z|y) is a density and the prior can be sampled exactly (:meth:`sample`)."""
        if self.analytic:
            return self.mu.new_zeros(self.n_components)
        a, b = self._standard_bounds()
        mass = (torch.special.ndtr(b) - torch.special.ndtr(a)).clamp_min(1e-30)
        return torch.where(self.bounded, mass.log(), torch.zeros_like(mass)).sum(-1)

    def _standard_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds of each component in its standard units, (K, d) each (±inf where a
        coordinate is unbounded)."""
        sd = self.log_std.exp()
        inf = torch.full_like(self.mu, math.inf)
        a = torch.where(self.bounded, (self.lo - self.mu) / sd, -inf)
        b = torch.where(self.bounded, (self.lo + self.span - self.mu) / sd, inf)
        return a, b

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z | y=k) for every component: z (..., d) -> (..., K)."""
        x = self.to_prior_space(z)
        d = (x[..., None, :] - self.mu) / self.log_std.exp()
        lp = (-0.5 * d * d - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return lp - self.log_mass() + self.log_jacobian(z)[..., None]

    def matched_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z_k | y=k) for draws given per component: z (..., K, n, d) -> (..., K, n),
        component k evaluated at its own draws only (what the ELBO's KL terms need; the
        diagonal of :meth:`component_log_prob` without the K−1 other components' work)."""
        x = self.to_prior_space(z)
        log_std = self.log_std[:, None, :]
        d = (x - self.mu[:, None, :]) / log_std.exp()
        lp = (-0.5 * d * d - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return lp - self.log_mass()[:, None] + self.log_jacobian(z)

    @torch.no_grad()
    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Draws of z (*shape, d) from p(z): a component by π, then each coordinate from its
        Gaussian truncated to the bounds (inverse CDF) and mapped back to the latent
        coordinate. The draws are made on ``generator``'s device and moved to the prior's
        (:mod:`mixmap.nn.rng`)."""
        n = math.prod(shape)
        dev = self.mu.device
        k = rng.multinomial(self.log_pi().exp(), n, generator)
        a, b = (t[k] for t in self._standard_bounds())
        lo_p, hi_p = torch.special.ndtr(a), torch.special.ndtr(b)
        u = rng.rand((n, self.latent_dim), generator, dev)
        p = (lo_p + (hi_p - lo_p) * u).clamp(1e-7, 1 - 1e-7)
        x = self.mu[k] + self.log_std.exp()[k] * torch.special.ndtri(p)
        # back to the latent coordinate: the logit of the position within the bounds
        frac = ((x - self.lo) / self.span).clamp(1e-6, 1 - 1e-6)
        z = torch.where(self.bounded, torch.log(frac) - torch.log1p(-frac), x)
        return z.reshape(*shape, self.latent_dim)

    def packed(self) -> torch.Tensor:
        """log π, μ and log σ as one float64 vector (for extrapolating EM updates)."""
        return torch.cat([self.log_pi().detach().double(), self.mu.detach().double().ravel(),
                          self.log_std.detach().double().ravel()])

    @torch.no_grad()
    def unpack(self, v: torch.Tensor) -> None:
        """Set log π, μ, log σ from :meth:`packed`'s layout; σ floored as in
        :meth:`set_moments`."""
        K, d = self.mu.shape
        logits, mu, log_std = torch.split(v.to(self.mu), [K, K * d, K * d])
        self.logits.copy_(torch.log_softmax(logits, 0))
        self.mu.copy_(mu.reshape(K, d))
        floor = torch.log(1e-3 * self.span).expand(K, d)
        self.log_std.copy_(torch.maximum(log_std.reshape(K, d), floor))

    @torch.no_grad()
    def set_moments(self, nk: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, *,
                    min_share: float = 0.0) -> None:
        """The M-step: weights ∝ ``nk`` (K,), means and variances (K, d) in the prior's
        coordinates. Variances are floored at (10⁻³ · range)² so no component collapses onto
        a point; a component whose share is below ``min_share`` keeps its mean and spread
        (too few voxels to place it; it may take voxels again later)."""
        nk = nk.to(self.mu)
        share = nk / nk.sum().clamp_min(1e-30)
        floor = (1e-3 * self.span) ** 2
        keep = (share < min_share)[:, None]
        self.logits.copy_(torch.log(share.clamp_min(1e-12)))
        self.mu.copy_(torch.where(keep, self.mu, mean.to(self.mu)))
        log_std = 0.5 * torch.log(torch.maximum(var.to(self.mu), floor))
        self.log_std.copy_(torch.where(keep, self.log_std, log_std))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Marginal log p(z) = logsumexp_k [log π_k + log N(z; μ_k, σ_k²)], (...,)."""
        return torch.logsumexp(self.component_log_prob(z) + self.log_pi(), -1)

    def kl_from(self, mu_q: torch.Tensor, chol_q: torch.Tensor) -> torch.Tensor:
        """KL(N(μ_q, L Lᵀ) || N(μ_k, diag σ_k²)) for q given per component.

        ``mu_q`` (n, K, d), ``chol_q`` (n, K, d, d) lower-triangular with positive diagonal;
        returns (n, K). Only for priors in the latent coordinates (:attr:`analytic`).
        """
        if not self.analytic:
            raise ValueError("a bounded-coordinate prior has no closed-form KL; sample it")
        var_p = (2 * self.log_std).exp()  # (K, d)
        trace = (chol_q**2 / var_p[None, :, :, None]).sum((-1, -2))
        diff = self.mu - mu_q
        maha = (diff * diff / var_p).sum(-1)
        logdet_q = 2 * torch.log(torch.diagonal(chol_q, dim1=-2, dim2=-1)).sum(-1)
        logdet_p = 2 * self.log_std.sum(-1)
        return 0.5 * (trace + maha - self.latent_dim + logdet_p - logdet_q)


def standard_normal_prior(latent_dim: int) -> MixturePrior:
    """The fixed N(0, I) prior of VAE-UniG, as a one-component mixture."""
    return MixturePrior(latent_dim, 1, learned=False)
