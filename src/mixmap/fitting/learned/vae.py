"""Variational autoencoders with a physics decoder: VAE-UniG (``vae``, prior N(0, I)) and the
Gaussian-mixture VAE (``vae-gmm``: categorical y, q(y|x), q(z|x,y), learned p(z|y) and p(y)).

Contract: :class:`VAEFitter` is a :class:`~mixmap.fitting.learned.base.LearnedFitter` whose
network is a :class:`MixtureVAE`; its loss is the negative ELBO
E_q[log p(x|z)] − KL(q(z|x,y) || p(z|y)) − KL(q(y|x) || p(y)) (``kl_weight=1``: a true ELBO
under a real likelihood), its prior is updated in closed form after each epoch
(``prior_update="em"``) and, for ``vae-gmm``, refitted by empirical Bayes after training
(:mod:`mixmap.fitting.empirical_bayes.refit`); the maps are posterior moments
(:mod:`~mixmap.fitting.learned.posterior`) and :meth:`VAEFitter.encode` returns the latent
samples (:mod:`~mixmap.fitting.learned.latent`). Hyper-parameters and presets:
:mod:`~mixmap.fitting.learned.configs`. The method and its default and ``paper``
configurations are described in docs/design/learned-fitters.md.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import mixmap.fitting.learned.configs as configs
import mixmap.fitting.learned.posterior as posterior
from mixmap.acquisition import Acquisition
from mixmap.fitting.empirical_bayes import npmle, refit
from mixmap.fitting.learned.base import Data, LearnedFitter, Scheme, robust_mean
from mixmap.fitting.learned.distributed import all_reduce_sum
from mixmap.fitting.learned.latent import (
    LatentSamples,
    bounded_matrix,
    cluster_moments,
    encode,
    gaussian_entropy,
    kmeans,
    latent_bounds,
)
from mixmap.fitting.learned.posterior import PosteriorMixin
from mixmap.models import SignalModel
from mixmap.nn.encoders import Decoder, FeatureMap, MixtureEncoder
from mixmap.nn.likelihoods import LIKELIHOODS, NoiseModel
from mixmap.nn.priors import MixturePrior, standard_normal_prior

#: Gumbel-softmax temperature (straight-through, so the forward pass uses one component).
GUMBEL_TAU = 1.0
#: The encoder network's arithmetic (``precision``): float32, or mixed precision by
#: ``torch.autocast`` with a 16-bit type (the physics, the likelihood, the prior and every
#: posterior sum stay float32 or float64).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16,
                                             "float16": torch.float16}

class MixtureVAE(nn.Module):
    """Feature map, encoder q(y, z | x), prior p(y, z), decoder z -> unbounded parameters, and
    the noise model; the physics is the signal model, outside the module."""

    def __init__(self, features: FeatureMap, encoder: MixtureEncoder, prior: MixturePrior,
                 decoder: Decoder, noise: NoiseModel) -> None:
        super().__init__()
        self.features = features
        self.encoder = encoder
        self.prior = prior
        self.decoder = decoder
        self.noise = noise


class VAEFitter(PosteriorMixin, LearnedFitter):
    """VAE fitter with a Gaussian (``prior="gaussian"``) or learned mixture (``"gmm"``) prior.

    Settings: the preset ``config`` (``default`` or ``paper``) with keyword overrides, every
    name a field of :class:`~mixmap.fitting.learned.configs.VAEConfig` (where each is
    explained); None keeps the preset's value, an unknown name is a ValueError. The resolved
    values are attributes of the fitter; ``latent_dim`` None becomes ``model.n_unbounded``,
    ``decoder`` None the identity (``gmm``) or an affine map (``gaussian``).
    """

    name = "vae-any"
    hyper_names = ("config", "prior", *configs.field_names(configs.VAEConfig))

    def __init__(self, model: SignalModel | str, *, prior: str = "gmm",
                 config: str = "default", device: str = "cpu", seed: int = 0,
                 quiet: bool = True, **options) -> None:
        super().__init__(model, device=device, seed=seed, quiet=quiet)
        values = configs.resolve(configs.VAE_PRESETS, config, options)
        if prior not in ("gaussian", "gmm"):
            raise ValueError(f"unknown prior {prior!r}; choose 'gaussian' or 'gmm'")
        self.config = config or "default"
        self.prior = prior
        for k, v in values.items():
            setattr(self, k, v)
        P = self.model.n_unbounded
        if self.decoder is None:
            # The mixture prior lives on the parameters; a single N(0, I) needs a learned
            # affine map to become a learned Gaussian prior over them.
            self.decoder = "identity" if prior == "gmm" else "affine"
        if self.latent_dim is None:
            self.latent_dim = P
        if prior == "gaussian":
            self.n_components = 1
        #: The non-parametric prior on the grid the maps use (see ``grid_posterior``).
        self.grid_prior: npmle.GridPrior | None = None
        self._loaded_grid: dict | None = None
        self._validate()


    def _validate(self) -> None:
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {self.likelihood!r}; choose one of: "
                             f"{', '.join(LIKELIHOODS)}")
        if self.y_inference not in ("exact", "gumbel"):
            raise ValueError(f"unknown y_inference {self.y_inference!r}; use 'exact' or 'gumbel'")
        if self.prior_space not in ("bounded", "latent"):
            raise ValueError(f"unknown prior_space {self.prior_space!r}; use bounded or latent")
        if self.prior_update not in ("em", "grad"):
            raise ValueError(f"unknown prior_update {self.prior_update!r}; use 'em' or 'grad'")
        if isinstance(self.grid_posterior, bool):  # a saved config or a caller's True/False
            self.grid_posterior = "on" if self.grid_posterior else "off"
        if self.grid_posterior not in ("auto", "on", "off"):
            raise ValueError(f"unknown grid_posterior {self.grid_posterior!r}; use auto, on or "
                             f"off")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of: "
                             f"{', '.join(PRECISIONS)}")
        if self.posterior not in ("is", "q"):
            raise ValueError(f"unknown posterior {self.posterior!r}; use 'is' or 'q'")
        if self.decoder == "identity" and self.latent_dim != self.model.n_unbounded:
            raise ValueError(
                f"latent_dim={self.latent_dim}: with the identity decoder the latent space is "
                f"the {self.model.name} parameter space, of dimension {self.model.n_unbounded}; "
                f"use decoder='linear' (or config='paper') for another latent dimension"
            )
        for k in ("latent_dim", "n_components", "hidden", "epochs", "batch_size", "n_samples",
                  "eb_steps", "eb_voxels", "eb_samples"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if int(self.eb_rounds) < 0:
            raise ValueError(f"eb_rounds must be >= 0, got {self.eb_rounds}")
        if not self.lr > 0 or not self.kl_weight >= 0:
            raise ValueError("lr must be > 0 and kl_weight >= 0")

    # ---------------------------------------------------------------- building
    def _uses_lsq_features(self) -> bool:
        return bool(self.lsq_features)

    def _reduce(self) -> bool:
        return self.likelihood == "gaussian"

    def _build(self, acq: Acquisition, sigma: float | None) -> nn.Module:
        P = self.model.n_unbounded
        extra = P if self.lsq_features else 0
        features = FeatureMap(self.model, acq, extra=extra, reduce=bool(self.shell_features))
        encoder = MixtureEncoder(features.n_features, self.latent_dim, self.n_components,
                                 self.hidden, self.n_layers, full_cov=bool(self.full_cov))
        encoder.autocast = PRECISIONS[self.precision]
        if self.prior == "gaussian":
            prior = standard_normal_prior(self.latent_dim)
        else:
            init = torch.randn(self.n_components, self.latent_dim)
            lower = upper = None
            if self.prior_space == "bounded" and self.decoder == "identity":
                lower, upper = latent_bounds(self.model)
            prior = MixturePrior(self.latent_dim, self.n_components, init_means=init,
                                 lower=lower, upper=upper)
            if self.prior_update == "em":  # set in closed form after each epoch, not by Adam
                for p in prior.parameters():
                    p.requires_grad_(False)
        decoder = Decoder(self.latent_dim, P, self.decoder)
        noise = NoiseModel(self.likelihood, sigma)
        return MixtureVAE(features, encoder, prior, decoder, noise)

    def _prepare(self, ys, acq, scheme, device, calibrate):
        data = super()._prepare(ys, acq, scheme, device, calibrate)
        if calibrate:
            self._init_from(data, acq)
        return data

    @torch.no_grad()
    def _init_from(self, data: Data, acq: Acquisition) -> None:
        """Data-driven start (no truth used): decoder, prior components and encoder means
        placed on per-voxel estimates (least squares when it is an encoder input, else the
        model's quick initial estimates), so that no voxel starts where the physics
        saturates."""
        net = self.net
        if data.anchor is not None:
            u = data.anchor
        else:
            u = self.model.join(self.model.initial_estimates(data.y, acq)).clamp(-8, 8)
        net.decoder.init_from(u)
        base = None
        if data.anchor is None:
            base = net.decoder.inverse(u.median(0).values) if net.decoder.invertible else None
        net.encoder.init_mean(base)
        if self.prior == "gmm":
            if net.decoder.invertible:
                # Cluster the estimates as bounded values scaled by their ranges (unbounded
                # coordinates have long tails where least squares hits a bound), then put each
                # component on its cluster in latent coordinates.
                x = bounded_matrix(self.model, self.model.split(u))
                _, _, labels = kmeans(x, self.n_components, seed=self.seed)
                z = net.prior.to_prior_space(net.decoder.inverse(u))
                centres, spread = cluster_moments(z, labels, self.n_components)
                # Start narrow: the spread of least-squares estimates is mostly noise where the
                # data say little, and EM only slowly narrows a component along directions the
                # data do not determine, while it quickly widens one along directions they do.
                spread = 0.02 * torch.where(net.prior.bounded, net.prior.span, 1.0).expand_as(
                    spread)
            else:
                z = torch.randn(u.shape[0], self.latent_dim, device=u.device)
                centres, spread, _ = kmeans(z, self.n_components, seed=self.seed)
            net.prior.mu.copy_(centres)
            net.prior.log_std.copy_(spread.clamp(1e-3, 1.0).log())

    # ---------------------------------------------------------------- loss
    def _base(self, batch: Data) -> torch.Tensor | None:
        dec = self.net.decoder
        if batch.anchor is None or not dec.invertible:
            return None
        return dec.inverse(batch.anchor)

    def _encode(self, batch: Data):
        enc = self.net.encoder
        logits, mu, raw = enc(batch.feats, self._base(batch))
        return logits, mu, enc.cholesky(raw)

    def _loglik(self, u: torch.Tensor, batch: Data, scheme: Scheme) -> torch.Tensor:
        """u (..., n, P) unbounded parameters -> log p(x|u) (..., n)."""
        s = self.model.forward(self.model.split(u), scheme.work)
        return self.net.noise(batch.yw, s, weights=scheme.weights, extra_ss=batch.extra_ss,
                              n_meas=scheme.n_meas)

    def _elbo_terms(self, logits, mu, L, batch: Data, scheme: Scheme, n_draws: int = 1,
                    gumbel: bool = False):
        """Per-voxel (recon, kl_z, kl_y), each (n,)."""
        net = self.net
        log_qy = torch.log_softmax(logits, -1)  # (n, K)
        qy = log_qy.exp()
        kl_comp = net.prior.kl_from(mu, L) if net.prior.analytic else None  # (n, K)
        kl_y = (qy * (log_qy - net.prior.log_pi())).sum(-1)
        n, K, d = mu.shape
        if gumbel and K > 1:
            c = nn.functional.gumbel_softmax(logits, tau=GUMBEL_TAU, hard=True)  # (n, K)
            eps = torch.randn(n_draws, n, d, device=mu.device)
            m_sel = (c[..., None] * mu).sum(1)
            L_sel = (c[..., None, None] * L).sum(1)
            z = m_sel + torch.einsum("...ij,...j->...i", L_sel, eps)  # (S, n, d)
            recon = self._loglik(net.decoder(z), batch, scheme).mean(0)
            if kl_comp is None:  # -H(q_k) - E log p(z|k), the expectation by the same draws
                lp = net.prior.component_log_prob(z).mean(0)  # (n, K)
                kl_comp = -gaussian_entropy(L) - lp
            return recon, (c * kl_comp).sum(-1), kl_y
        eps = torch.randn(n_draws, K, n, d, device=mu.device)
        muk, Lk = mu.transpose(0, 1), L.transpose(0, 1)  # (K, n, d), (K, n, d, d)
        z = muk + torch.einsum("...ij,...j->...i", Lk, eps)  # (S, K, n, d)
        ll = self._loglik(net.decoder(z), batch, scheme).mean(0)  # (K, n)
        recon = (qy * ll.T).sum(-1)
        if kl_comp is None:  # -H(q_k) - E log p(z|y=k), the expectation by the same draws
            own = net.prior.matched_log_prob(z).mean(0).T  # (n, K)
            kl_comp = -gaussian_entropy(L) - own
        return recon, (qy * kl_comp).sum(-1), kl_y

    def _loss(self, batch: Data, scheme: Scheme, epoch: int):
        logits, mu, L = self._encode(batch)
        recon, kl_z, kl_y = self._elbo_terms(logits, mu, L, batch, scheme,
                                             gumbel=self.y_inference == "gumbel")
        warm = min(1.0, (epoch + 1) / self.warmup_epochs) if self.warmup_epochs else 1.0
        beta = self.kl_weight * warm
        loss = robust_mean(-(recon - beta * (kl_z + kl_y)))
        elbo = (recon - kl_z - kl_y).mean()
        with torch.no_grad():
            # The same loss at the KL weight after warm-up: while beta rises the loss above
            # rises with it by design (KL is hundreds of nats at first), this one does not, and
            # the training loop's explosion guard watches it (training.GUARD_TERM).
            final = robust_mean(-(recon - self.kl_weight * (kl_z + kl_y)))
        return loss, {"loss": loss.detach(), "loss_final": final, "recon": recon.mean().detach(),
                      "kl_z": kl_z.mean().detach(), "kl_y": kl_y.mean().detach(),
                      "elbo": elbo.detach(), "beta": torch.tensor(beta)}

    def _end_epoch(self, data: Data, scheme: Scheme, epoch: int) -> None:
        """``prior_update="em"``: the M-step. For the current q of every voxel, the mixture
        weights, means and variances that maximise the ELBO are weighted moments of q.

        On several processes each one takes the moments of its share of the voxels and the
        sums are added over processes (two passes: the means first, then the scatter about
        them, as in one process), so every process sets the same prior."""
        if self.prior != "gmm" or self.prior_update != "em":
            return
        if epoch + 1 < max(self.warmup_epochs, 5):
            # q(y|x) starts near uniform: an M-step now would pull every component onto the
            # overall mean (a symmetric fixed point). Keep the k-means start until the encoder
            # has learned to assign voxels to it.
            return
        data = self._local(data)
        with torch.no_grad():
            stats = []
            chunk = posterior.PREDICT_CHUNK
            for start in range(0, data.n, chunk):
                logits, mu, L = self._encode(data.rows(slice(start, start + chunk)))
                r = torch.softmax(logits, -1)  # (n, K)
                prior = self.net.prior
                if prior.analytic:
                    var_q = (L * L).sum(-1)  # (n, K, d) diagonal of L Lᵀ
                else:  # moments of q in the prior's coordinates, by sampling
                    eps = torch.randn(16, *mu.shape, device=mu.device)
                    x = prior.to_prior_space(mu + torch.einsum("...ij,...j->...i", L, eps))
                    mu, var_q = x.mean(0), x.var(0)
                stats.append((r, mu, var_q))
            r = torch.cat([s[0] for s in stats])
            mu = torch.cat([s[1] for s in stats])
            var_q = torch.cat([s[2] for s in stats])
            nk = all_reduce_sum(r.sum(0)).clamp_min(1e-6)  # (K,)
            m = all_reduce_sum((r[..., None] * mu).sum(0)) / nk[:, None]
            v = all_reduce_sum((r[..., None] * (var_q + (mu - m) ** 2)).sum(0)) / nk[:, None]
            self.net.prior.set_moments(nk, m, v)

    # ---------------------------------------------------------------- empirical Bayes
    def _after_training(self, data: Data, scheme: Scheme) -> dict | None:
        out = {}
        if self.prior == "gmm" and self.posterior == "is" and int(self.eb_rounds) != 0:
            out["empirical_bayes"] = refit.empirical_bayes(self, data, scheme)
        local = self._local(data) if npmle.gridded(self.model) is not None else None
        if local is not None and self._grid_posterior_applies(local.y):
            gen = torch.Generator().manual_seed(self.seed + 11)
            self.grid_prior = npmle.fit_grid_prior(self.model, scheme, local.y,
                                                   self._sigma_working(), gen=gen,
                                                   reduce=all_reduce_sum)
            out["grid_prior"] = self.grid_prior.describe()
        return out or None

    def _grid_posterior_applies(self, y: torch.Tensor) -> bool:
        """``grid_posterior`` on, or auto and the data magnitudes; a model a grid covers."""
        if self.prior != "gmm" or self.grid_posterior == "off" or npmle.gridded(
                self.model) is None:
            return False
        return self.grid_posterior == "on" or npmle.is_magnitude(y, all_reduce_sum)

    def _predict(self, data: Data, scheme: Scheme, gen: torch.Generator):
        """The posterior maps (:class:`PosteriorMixin`); with a grid prior, those of its
        parameters and of the scale from the posterior under it."""
        params, std, probs = super()._predict(data, scheme, gen)
        if self.grid_prior is not None:
            mean, sd = npmle.grid_posterior(self.grid_prior, self.model, scheme, data.y,
                                            self._sigma_working())
            for k in mean:
                params[k] = mean[k].astype(np.float32)
                std[k] = sd[k].astype(np.float32)
        return params, std, probs

    def to_config(self) -> dict:
        config = super().to_config()
        if self.grid_prior is not None:
            config["grid_prior"] = self.grid_prior.describe()
        return config

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.grid_prior is not None:
            state.update(self.grid_prior.state())
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        weights = state.pop(npmle.STATE_KEY, None)
        super().load_state_dict(state)
        if weights is not None and self._loaded_grid is not None:
            self.grid_prior = npmle.GridPrior.from_state(self.model, self._loaded_grid, weights)

    @classmethod
    def from_config(cls, config: dict, *, device: str = "cpu"):
        fitter = super().from_config(config, device=device)
        fitter._loaded_grid = config.get("grid_prior")
        return fitter

    # ---------------------------------------------------------------- latent space
    def encode(self, signals: np.ndarray, acquisition: Acquisition, n_samples: int = 16, *,
               allow_other_acquisition: bool = False) -> LatentSamples:
        """Posterior samples of z for every voxel, and the cluster probabilities: the paper's
        latent space.

        The samples are drawn from the posterior the maps use: q after its per-voxel refinement
        and, with ``posterior="is"``, reweighted by importance sampling. They are
        ``n_samples`` draws (with replacement, by weight) from the same weighted draws, with
        the same random stream, that :meth:`fit` / :meth:`apply` average into the maps; so on
        the scan it was trained on (one process), the mean of the decoded samples is the
        map up to the Monte-Carlo error of ``n_samples`` draws.

        Coordinates (see :class:`LatentSamples`): with the identity decoder (the default
        configuration) z *is* the model's unbounded parameter vector in working units (S0 of
        the signal divided by the scan's signal scale), coordinates named after the
        parameters; otherwise (``paper``, ``vae``'s affine decoder) an abstract latent
        z1 … zd. The learned prior's Gaussians live in :attr:`LatentSamples.prior_space`
        coordinates, which are returned too (``z_prior``), with the prior's parameters.

        Parameters
        ----------
        signals, acquisition
            As for :meth:`apply` (a trained fitter; a different acquisition is refused
            unless ``allow_other_acquisition``).
        n_samples
            Posterior draws per voxel.
        """
        return encode(self, signals, acquisition, n_samples,
                      allow_other_acquisition=allow_other_acquisition)


class GaussianVAEFitter(VAEFitter):
    """VAE-UniG: prior N(0, I) on the latent space (``vae``). Keywords: those of
    :func:`~mixmap.fitting.learned.configs.init_signature` for ``vae``."""

    name = "vae"

    def __init__(self, model: SignalModel | str, *, config: str = "default", **options) -> None:
        super().__init__(model, prior="gaussian", config=config, **options)


class MixtureVAEFitter(VAEFitter):
    """VAE-GMM: categorical y and learned p(z|y) = N(μ_y, diag σ_y²), learned p(y)
    (``vae-gmm``). Keywords: those of :func:`~mixmap.fitting.learned.configs.init_signature`
    for ``vae-gmm``."""

    name = "vae-gmm"

    def __init__(self, model: SignalModel | str, *, config: str = "default", **options) -> None:
        super().__init__(model, prior="gmm", config=config, **options)


# The signatures show the user-facing options, derived from the config's fields (the command
# line checks a method's options against them).
GaussianVAEFitter.__init__.__signature__ = configs.init_signature("vae")
MixtureVAEFitter.__init__.__signature__ = configs.init_signature("vae-gmm")


__all__ = ["GaussianVAEFitter", "LatentSamples", "MixtureVAEFitter", "VAEFitter"]
