"""Variational autoencoders with a physics decoder: VAE-UniG (``vae``, prior N(0, I)) and the
Gaussian-mixture VAE (``vae-gmm``: categorical y, q(y|x), q(z|x,y), learned p(z|y) and p(y)).

ELBO = E_q[log p(x|z)] − KL(q(z|x,y) || p(z|y)) − KL(q(y|x) || p(y)), the expectation over y
taken exactly (a sum over the K components, weighted by q(y|x)) or, optionally, with one
straight-through Gumbel-softmax draw as in the paper. p(x|z) is a real likelihood (Gaussian with
σ from the repeated b=0 volumes, or learned; or Rician), so with ``kl_weight=1`` the loss is a
true negative ELBO and the posterior maps mean what they say.

Default configuration ("default", chosen by ``benchmarks/learned.py``): the latent space *is*
the model's unbounded parameter space (identity decoder, latent_dim = model.n_unbounded), so the
learned mixture prior is a prior over the parameters and the fit is empirical Bayes. q(z|x,y) is a
full-covariance Gaussian per component from an encoder that also sees the least-squares estimate
(computed inside the fitter, no truth involved). After training, the mixture prior is refitted
to the scan by maximum marginal likelihood (Monte-Carlo EM with importance-sampled E-steps,
accelerated by SQUAREM, with split-and-merge moves between rounds: empirical Bayes,
``eb_rounds``, :mod:`~.monte_carlo`), since the ELBO fits the prior to the amortised q and
inherits its errors where the data leave a direction free; for models with at most two
parameters besides S0 (MSDKI) the refit ends on a grid, where the marginal likelihood is a
quadrature and each component can be moved to its best place (``eb_grid``,
:mod:`~.empirical_bayes.grid`). Under the Rician likelihood the noise level is re-estimated
with the prior before the grid refit (:meth:`VAEFitter._sigma_em`), and the grid's EM is
finished by L-BFGS. Then q is refined per voxel (closing
the amortisation gap) and the posterior mean and standard deviation are computed by
self-normalised importance sampling, ``n_samples`` draws per voxel from a defensive mixture of
q, q widened, the Laplace approximation at the least-squares estimate and the prior; the
cluster probabilities are the posterior's under the learned prior, from the same draws.

"paper" configuration: the architecture of Xu et al. (3 linear layers encoder, one linear layer
decoder from a latent space of ``latent_dim``, Gumbel-softmax for y, diagonal q, posterior mean
of q samples).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mixmap.acquisition import Acquisition
from mixmap.fitting.base import signal_scale
from mixmap.fitting.empirical_bayes import grid as eb_grid
from mixmap.fitting.empirical_bayes import monte_carlo as eb
from mixmap.fitting.learned import distributed
from mixmap.fitting.learned.base import Data, LearnedFitter, Scheme, robust_mean
from mixmap.fitting.learned.distributed import all_reduce_sum
from mixmap.fitting.lsq import normal_equations
from mixmap.models import SignalModel
from mixmap.nn import rng
from mixmap.nn.encoders import Decoder, FeatureMap, MixtureEncoder
from mixmap.nn.likelihoods import LIKELIHOODS, NoiseModel, rician_sigma
from mixmap.nn.priors import MixturePrior, standard_normal_prior

CONFIGS: dict[str, dict] = {
    "default": dict(latent_dim=None, n_components=3, hidden=128, n_layers=3, epochs=300,
                    batch_size=512, lr=2e-3, kl_weight=1.0, warmup_epochs=10,
                    likelihood="gaussian", n_samples=384, full_cov=True, lsq_features=True,
                    shell_features=True, decoder=None, y_inference="exact", refine_steps=100,
                    refine_lr=0.04, posterior="is", patience=30, tol=1e-4, min_epochs=100,
                    prior_update="em", prior_space="bounded", eb_rounds=6, eb_steps=10,
                    eb_voxels=20_000, eb_samples=192, eb_split_merge=True, eb_grid=True,
                    precision="float32"),
    "paper": dict(latent_dim=4, n_components=4, hidden=256, n_layers=2, epochs=300,
                  batch_size=256, lr=1e-3, kl_weight=1.0, warmup_epochs=0,
                  likelihood="gaussian", n_samples=128, full_cov=False, lsq_features=False,
                  shell_features=False, decoder="linear", y_inference="gumbel", refine_steps=0,
                  refine_lr=0.02, posterior="q", patience=20, tol=1e-4, min_epochs=40,
                  prior_update="grad", prior_space="latent", eb_rounds=0, eb_steps=10,
                  eb_voxels=20_000, eb_samples=192, eb_split_merge=False, eb_grid=False,
                  precision="float32"),
}

#: Gumbel-softmax temperature (straight-through, so the forward pass uses one component).
GUMBEL_TAU = 1.0
#: The encoder network's arithmetic (``precision``): float32, or mixed precision by
#: ``torch.autocast`` with a 16-bit type (the physics, the likelihood, the prior and every
#: posterior sum stay float32 or float64). Measured by ``benchmarks/precision.py``: on a CPU
#: with bfloat16 matrix units (Intel AMX) the same maps, no faster (the network is small; the
#: fit's time is in the physics and the posterior). Not the default anywhere.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16,
                                             "float16": torch.float16}
#: Voxels per chunk at prediction time.
PREDICT_CHUNK = 2048
#: Draws of z per mixture component in each per-voxel refinement step of q (its ELBO gradient).
#: One draw and 100 steps at twice the learning rate gave vae-gmm the maps of two draws and 200
#: steps to the third digit (paper-msdki, HCP and clinical schemes, SNR 10 and 20; ball-stick's
#: Dpar 2 % worse) in 0.39x the time.
REFINE_DRAWS = 1
#: Posterior draws (voxels × draws per voxel) evaluated at once for the maps.
DRAWS_PER_SLICE = 2048 * 96
#: On a CUDA device the maps' chunks are sized to the device instead (:func:`maps_sizes`):
#: this many voxels per chunk, and draws per slice to fill this share of the device's memory at
#: about ``DRAW_BYTES`` each (measured on the CPU: a peak of 160-170 bytes a draw, 2.06 GB for
#: 32,768 voxels × 384 draws; three times that for the caching allocator's slack).
ACCEL_CHUNK = 262_144
ACCEL_MEMORY_SHARE = 0.25
DRAW_BYTES = 512
#: Posterior draws per voxel (picked by importance weight) in the Rician σ update
#: (:meth:`VAEFitter._sigma_em`), and the distance from the median voxel, in standard errors,
#: beyond which a voxel's own update is left out of it.
SIGMA_DRAWS = 4
SIGMA_OUTLIER = 5.0
#: Standard-deviation factor of the widened part of the importance-sampling proposal.
WIDEN = 2.0
#: Largest precision (1 / variance, unbounded coordinates) of the Laplace proposal part.
MAX_PRECISION = 1e8


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


class VAEFitter(LearnedFitter):
    """VAE fitter with a Gaussian (``prior="gaussian"``) or learned mixture (``"gmm"``) prior.

    Parameters (None means "the configuration's value")
    ----------
    config
        ``default`` (best in our benchmark) or ``paper`` (the paper's architecture).
    latent_dim
        Latent dimension; with the identity decoder it must equal ``model.n_unbounded``.
    n_components
        Mixture components K (``gmm`` only; may exceed the number of tissue classes).
    hidden, n_layers
        Encoder width and number of hidden layers.
    epochs, batch_size, lr
        At most ``epochs`` passes of Adam over all voxels in mini-batches; training stops
        earlier when the loss has not improved by ``tol`` (relative) for ``patience`` epochs.
    kl_weight, warmup_epochs
        Weight of both KL terms (1 = the true ELBO), reached linearly over ``warmup_epochs``.
    likelihood
        ``gaussian`` or ``rician``; σ from repeated b=0 volumes, learned when there are < 2.
    n_samples
        Posterior draws of z per voxel for the maps. With ``posterior="is"`` they come in
        equal parts from q, from q widened ×2, from the Laplace approximation at the
        least-squares estimate and from the prior (a defensive mixture proposal: no voxel's
        weights rest on one draw when q is too narrow or misplaced);
        with ``"q"``, ⌈n_samples / K⌉ per mixture component.
    refine_steps, refine_lr
        Per-voxel Adam steps on q after training (0 = purely amortised), each on a one-draw
        estimate of the voxel's ELBO (:data:`REFINE_DRAWS`).
    posterior
        ``is``: importance-weighted posterior moments (proposal: q, q widened and the prior,
        see :meth:`_propose`); ``q``: moments of q.
    y_inference
        ``exact`` (sum over components) or ``gumbel`` (straight-through Gumbel-softmax).
    eb_rounds, eb_steps, eb_voxels, eb_samples
        Empirical Bayes after training (``vae-gmm`` with ``posterior="is"``): the mixture
        prior is refitted to maximise the marginal likelihood of the scan, by Monte-Carlo EM
        on up to ``eb_voxels`` voxels: ``eb_rounds`` rounds of ``eb_samples`` importance
        draws per voxel, each followed by ``eb_steps`` EM updates that reweight the same
        draws. 0 rounds = the prior as the ELBO left it.
    eb_split_merge
        Between empirical-Bayes rounds, try one split-and-merge move of the mixture (merge two
        components, split a third) and keep it when the marginal likelihood rises: the
        components go to the clusters that the data support, whichever way training left
        them (three or more components).
    eb_grid
        After the importance-sampled rounds, refit the prior on a grid
        (:mod:`mixmap.fitting.empirical_bayes.grid`): the marginal likelihood by quadrature, EM to
        convergence and each component moved to its best place on a coarse lattice when that
        pays. Applies where the model has at most two parameters besides S0 and no
        direction (MSDKI), with the Gaussian or the Rician likelihood; elsewhere it is
        skipped.
    precision
        The encoder network's arithmetic: ``float32`` (default), or ``bfloat16`` /
        ``float16`` mixed precision (:data:`PRECISIONS`).
    """

    name = "vae-any"
    hyper_names = ("config", "prior", "latent_dim", "n_components", "hidden", "n_layers",
                   "epochs", "batch_size", "lr", "kl_weight", "warmup_epochs", "likelihood",
                   "n_samples", "full_cov", "lsq_features", "shell_features", "decoder",
                   "y_inference", "refine_steps", "refine_lr", "posterior", "patience", "tol",
                   "min_epochs", "prior_update", "prior_space", "eb_rounds", "eb_steps",
                   "eb_voxels", "eb_samples", "eb_split_merge", "eb_grid", "precision")

    def __init__(
        self,
        model: SignalModel | str,
        *,
        prior: str = "gmm",
        config: str = "default",
        latent_dim: int | None = None,
        n_components: int | None = None,
        hidden: int | None = None,
        n_layers: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        kl_weight: float | None = None,
        warmup_epochs: int | None = None,
        likelihood: str | None = None,
        n_samples: int | None = None,
        full_cov: bool | None = None,
        lsq_features: bool | None = None,
        shell_features: bool | None = None,
        decoder: str | None = None,
        y_inference: str | None = None,
        refine_steps: int | None = None,
        refine_lr: float | None = None,
        posterior: str | None = None,
        patience: int | None = None,
        tol: float | None = None,
        min_epochs: int | None = None,
        prior_update: str | None = None,
        prior_space: str | None = None,
        eb_rounds: int | None = None,
        eb_steps: int | None = None,
        eb_voxels: int | None = None,
        eb_samples: int | None = None,
        eb_split_merge: bool | None = None,
        eb_grid: bool | None = None,
        precision: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        quiet: bool = True,
    ) -> None:
        super().__init__(model, device=device, seed=seed, quiet=quiet)
        config = config or "default"
        if config not in CONFIGS:
            raise ValueError(f"unknown config {config!r}; choose one of: {', '.join(CONFIGS)}")
        if prior not in ("gaussian", "gmm"):
            raise ValueError(f"unknown prior {prior!r}; choose 'gaussian' or 'gmm'")
        given = dict(latent_dim=latent_dim, n_components=n_components, hidden=hidden,
                     n_layers=n_layers, epochs=epochs, batch_size=batch_size, lr=lr,
                     kl_weight=kl_weight, warmup_epochs=warmup_epochs, likelihood=likelihood,
                     n_samples=n_samples, full_cov=full_cov, lsq_features=lsq_features,
                     shell_features=shell_features, decoder=decoder, y_inference=y_inference,
                     refine_steps=refine_steps, refine_lr=refine_lr, posterior=posterior,
                     patience=patience, tol=tol, min_epochs=min_epochs,
                     prior_update=prior_update, prior_space=prior_space, eb_rounds=eb_rounds,
                     eb_steps=eb_steps, eb_voxels=eb_voxels, eb_samples=eb_samples,
                     eb_split_merge=eb_split_merge, eb_grid=eb_grid, precision=precision)
        self.config = config
        self.prior = prior
        for k, v in given.items():
            setattr(self, k, CONFIGS[config][k] if v is None else v)
        P = self.model.n_unbounded
        if self.decoder is None:
            # The mixture prior lives on the parameters; a single N(0, I) needs a learned
            # affine map to become a learned Gaussian prior over them.
            self.decoder = "identity" if prior == "gmm" else "affine"
        if self.latent_dim is None:
            self.latent_dim = P
        if prior == "gaussian":
            self.n_components = 1
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
            # the training loop's explosion guard watches it (selfsup.GUARD_TERM).
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
            for start in range(0, data.n, PREDICT_CHUNK):
                logits, mu, L = self._encode(data.rows(slice(start, start + PREDICT_CHUNK)))
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

    # ---------------------------------------------------------------- prediction
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
        chunk, _ = maps_sizes(data.y.device)
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
        densities of the proposal's parts hold a few (draws × voxels × K × d) temporaries,
        about 170 bytes a draw at the peak (2.06 GB for 32,768 voxels × 384 draws). The maps
        and :meth:`encode` both go through here, so they see the same draws."""
        step = max(1, maps_sizes(mu.device)[1] // int(self.n_samples))
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
        around the last round's posterior (:meth:`_em_rounds`)."""
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

    # ---------------------------------------------------------------- empirical Bayes
    def _after_training(self, data: Data, scheme: Scheme) -> dict | None:
        if self.prior != "gmm" or self.posterior != "is" or int(self.eb_rounds) == 0:
            return None
        return {"empirical_bayes": self._empirical_bayes(data, scheme)}

    def _empirical_bayes(self, data: Data, scheme: Scheme) -> dict:
        """Refit the mixture prior to the scan by maximum marginal likelihood (Monte-Carlo EM).

        The ELBO's own M-step (:meth:`_end_epoch`) fits the prior to the aggregate of the
        amortised q, so where q is too wide or misplaced (a long likelihood ridge: CSF-like
        voxels in MSDKI) the prior inherits its error. Here the E-step is importance sampling
        from the defensive proposal (:meth:`_propose`), which converges to the exact posterior,
        so EM climbs the marginal likelihood p(x) = ∫ p(x|z) p(z) dz of the data itself. Each
        round draws once; its EM updates reweight the same draws by the changed prior (the
        likelihood, the expensive part, is computed once per round). Moments are accumulated
        in float64 about the current means (a float32 E[x²] − E[x]² loses a spread of 10⁻³
        to cancellation). On several processes the sums are added over processes.

        Returns what a user needs to judge it: the mean log evidence estimate per voxel and
        the median effective sample size after each round, and the voxels used."""
        local = self._local(data)
        world = distributed.world_size() if distributed.active() else 1
        gen = torch.Generator().manual_seed(distributed.rank_seed(self.seed + 7))
        n_use = min(local.n, -(-int(self.eb_voxels) // world))
        if n_use < local.n:
            idx = torch.randperm(local.n, generator=gen)[:n_use].sort().values
            local = local.rows(idx.to(local.y.device))
        qs = []
        chunk, per_slice = maps_sizes(local.y.device)
        step = max(1, min(chunk, per_slice // int(self.eb_samples)))
        with self._frozen():
            for start in range(0, local.n, step):
                batch = local.rows(slice(start, start + step))
                qs.append((batch, *self._q_chunk(batch, scheme)))
        with torch.no_grad():
            return self._em_rounds(qs, scheme, gen, local.n)

    def _em_rounds(self, qs, scheme: Scheme, gen: torch.Generator, n_local: int) -> dict:
        """``eb_rounds`` rounds: draw, then ``eb_steps`` EM updates on those draws, sped up by
        SQUAREM (:func:`~.monte_carlo.squarem`). With ``eb_split_merge`` and three or more
        components, after each round but the last one split-and-merge move is tried
        (:func:`~.monte_carlo.split_merge`; a few seconds a round): EM alone cannot move
        a component from a cluster that two of them share to two clusters that one of them
        spans, and which clusters end up sharing depends on the path of training. The next
        round's fresh draws then measure the moved prior. Each round's entry records the move
        (None: none paid).

        From the second round on, the proposal has one more part per voxel: a Gaussian on the
        last round's importance-weighted posterior under the updated prior
        (:func:`~.monte_carlo.posterior_gaussian`). q was refined under the prior that
        training left, so where EM moves the prior the posterior leaves q behind; this part
        follows it (adaptive importance sampling)."""
        prior = self.net.prior
        n_all = float(all_reduce_sum(torch.tensor(float(n_local), device=prior.mu.device)))
        history = []
        rounds = int(self.eb_rounds)
        moving = bool(self.eb_split_merge) and prior.n_components >= 3  # K < 3: no move
        laplace = [self._extra_parts(batch, scheme, log_qy, L) for batch, log_qy, _, L in qs]
        adapted = [None] * len(qs)
        for round_ in range(rounds):
            draws, zs = [], []
            for (batch, log_qy, mu, L), lp, a in zip(qs, laplace, adapted, strict=True):
                extra = lp + ([a] if a is not None else [])
                z, log_r = self._propose(log_qy, mu, L, int(self.eb_samples), gen, extra)
                base = self._loglik(self.net.decoder(z), batch, scheme) - log_r
                draws.append(eb.prepare(prior, z, base))
                zs.append(z)
            log_ev, ess = eb.squarem(prior, draws, all_reduce_sum, int(self.eb_steps))
            entry = {"log_evidence_per_voxel": log_ev / n_all,
                     "median_ess": float(torch.cat(ess).median())}
            if moving and round_ < rounds - 1:
                move = eb.split_merge(prior, draws, all_reduce_sum, int(self.eb_steps), n_all)
                entry["split_merge"] = move
            history.append(entry)
            if round_ < rounds - 1:  # the next round's proposal part; none after the last
                adapted = [eb.posterior_gaussian(prior, dr, z)
                           for dr, z in zip(draws, zs, strict=True)]
        out = {"voxels": int(n_all), "rounds": history}
        if self.likelihood == "rician" and not self.net.noise.learned:
            out["noise_sigma"] = self._sigma_em(qs, draws, zs, scheme, gen)
        if self.eb_grid:
            grid = self._grid_eb(qs, scheme, gen)
            if grid is not None:
                out["grid"] = grid
        return out

    def _sigma_em(self, qs, draws, zs, scheme: Scheme, gen: torch.Generator) -> dict:
        """Re-estimate the Rician noise level with the prior, from the last round's draws: σ
        that maximises Σ_i E[log p(x_i | z, σ)] over each voxel's importance-weighted
        posterior (one EM update of σ, with the prior's; :func:`rician_sigma` maximises over
        the Rician's lost phase), from :data:`SIGMA_DRAWS` draws per voxel picked by weight.
        Three parameters per voxel against hundreds of measurements leave σ little missing
        information, so one update lands near the maximum of the marginal likelihood.

        Voxels whose own update is off the median voxel's by more than :data:`SIGMA_OUTLIER`
        standard errors (√(2/m) relative, m measurements) are left out: where the signal
        grows many times S0 by b = 3000 s/mm² (large D·K) a draw's signal errs by far more
        than σ at any finite number of draws (posterior sd down to 1e-5); with them the update
        was +4 % on the seed-0 ``paper-msdki`` scan (Rician, SNR 20).

        Why: under Rician noise the b ≥ 2000 s/mm² shells of CSF-like voxels lie at the noise
        floor, whose level fixes where along MSDKI's D–K ridge their evidence peaks; σ from
        the b = 0 volumes alone is off by its sampling error (−0.12 % on that scan), enough to
        move the maximum-evidence CSF-like component by 0.1 µm²/ms in D. Returns σ before and
        after (working units) and the voxels left out."""
        prior = self.net.prior
        noise = self.net.noise
        before = float(noise.sigma)
        ys, nus = [], []
        for (batch, *_), dr, z in zip(qs, draws, zs, strict=True):
            w = eb.posterior_weights(prior, dr)  # (S, n)
            pick = rng.multinomial(w.T.float(), SIGMA_DRAWS, gen).T  # (R, n)
            zp = z.gather(0, pick[..., None].expand(-1, -1, z.shape[-1]))
            nus.append(self.model.forward(self.model.split(self.net.decoder(zp)), scheme.work))
            ys.append(batch.yw)
        sigma, left = rician_sigma(torch.cat(ys), torch.cat(nus, 1), before, all_reduce_sum,
                                   outlier=SIGMA_OUTLIER,
                                   gather=lambda t: distributed.all_gather_object(t.cpu()))
        noise.log_sigma.fill_(math.log(sigma))
        return {"before": before, "after": sigma, "voxels_left_out": left}

    def _grid_eb(self, qs, scheme: Scheme, gen: torch.Generator) -> dict | None:
        """The grid refit of :mod:`~.empirical_bayes.grid` on up to ``GRID_VOXELS`` of the
        empirical-Bayes voxels (a random share on each process); None where it does not
        apply. Returns its log evidence per voxel before and after, and the moves made."""
        dims = eb_grid.grid_dims(self.model)
        prior = self.net.prior
        rician = self.likelihood == "rician"
        if (dims is None or not self.model.direction_independent
                or (scheme.weights is None and not rician)
                or self.net.decoder.kind != "identity" or prior.analytic):
            return None
        y = torch.cat([batch.yw for batch, *_ in qs])
        world = distributed.world_size() if distributed.active() else 1
        n_use = min(y.shape[0], -(-eb_grid.GRID_VOXELS // world))
        if n_use < y.shape[0]:
            y = y[torch.randperm(y.shape[0], generator=gen)[:n_use].to(y.device)]
        n_all = float(all_reduce_sum(torch.tensor(float(y.shape[0]), device=prior.mu.device)))
        if rician:  # every measurement: the shells' means and the Rician part per shell
            shells = Scheme.build(self.model, scheme.full, True, y.device)
            yw, _ = shells.working_signals(y)
            extra = {"rician": (y, shells.groups)}
        else:
            shells, yw, extra = scheme, y, {}
        grid = eb_grid.grid_likelihood(self.model, prior, dims, yw, shells.work,
                                       shells.weights, float(self.net.noise.sigma),
                                       all_reduce_sum, **extra)
        first = eb_grid.grid_em(prior, grid, all_reduce_sum, n_all)
        # EM stops short along the CSF-like ridge; L-BFGS finishes the climb where that pays
        if rician:
            eb_grid.polish(prior, grid, all_reduce_sum, n_all, margin=eb_grid.RELOCATE_MARGIN)
        moves = eb_grid.relocate(prior, grid, all_reduce_sum, n_all)
        if rician and moves:
            eb_grid.polish(prior, grid, all_reduce_sum, n_all, margin=eb_grid.RELOCATE_MARGIN)
        last, _ = eb_grid.grid_em_step(prior, grid, all_reduce_sum, update=False)
        return {**first, "log_evidence_per_voxel": last / n_all, "relocations": moves}

    def _moments(self, z: torch.Tensor, w: torch.Tensor):
        """Posterior mean and std of each bounded parameter from weighted draws of z
        (S, n, d) with weights (S, n) summing to 1 per voxel (directions: a mean axis)."""
        n = z.shape[1]
        theta = self.model.split(self.net.decoder(z))
        params, std = {}, {}
        for p in self.model.parameters:
            v = theta[p.name]
            if p.is_direction:
                ref = v.gather(0, w.argmax(0)[None, :, None].expand(1, n, 3))[0]
                sign = torch.sign((v * ref).sum(-1, keepdim=True)) + (v * ref).sum(-1,
                                                                                   keepdim=True).eq(0)
                m = (w[..., None] * v * sign).sum(0)
                params[p.name] = (m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()
                continue
            mean = (w * v).sum(0)
            var = (w * (v - mean) ** 2).sum(0)
            params[p.name] = mean.cpu().numpy()
            std[p.name] = var.clamp_min(0).sqrt().cpu().numpy()
        return params, std

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
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        data, scheme, _ = self._apply_data(signals, acquisition, allow_other_acquisition)
        net = self.net
        net.eval()
        # The same seeds and order of draws as LearnedFitter._result, so that the weighted
        # draws are those the maps were computed from.
        seed = self.seed + 1
        gen = rng.draw_generator(seed, data.y.device)
        pick = rng.draw_generator(seed + 1, data.y.device)
        chunk, _ = maps_sizes(data.y.device)
        zs, probs = [], []
        with self._frozen():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for start in range(0, data.n, chunk):
                    batch = data.rows(slice(start, start + chunk))
                    log_qy, mu, L = self._q_chunk(batch, scheme)
                    for _, z, w, p in self._weighted_draws(log_qy, mu, L, batch, scheme, gen):
                        idx = rng.multinomial(w.T, int(n_samples), pick)  # (n, S')
                        voxels = torch.arange(z.shape[1], device=z.device)[:, None]
                        zs.append(z[idx, voxels])  # (n, S', d)
                        probs.append(p)
        z = torch.cat(zs)
        prior = net.prior
        with torch.no_grad():
            z_prior = prior.to_prior_space(z)
        identity = net.decoder.kind == "identity"
        axes = [f"z{i + 1}" for i in range(z.shape[-1])]
        if identity:
            axes = []
            for p in self.model.parameters:
                axes += [f"{p.name}_{c}" for c in "xyz"] if p.is_direction else [p.name]
        space = ("unbounded parameters (working units)" if identity else "latent")
        prior_space = space if prior.analytic else "bounded parameters (working units)"
        return LatentSamples(
            z=z.cpu().numpy(), z_prior=z_prior.cpu().numpy(),
            cluster_probs=torch.cat(probs).cpu().numpy(),
            axes=axes, space=space, prior_space=prior_space,
            prior_means=prior.mu.detach().cpu().numpy().copy(),
            prior_stds=prior.log_std.detach().exp().cpu().numpy(),
            prior_weights=prior.log_pi().detach().exp().cpu().numpy(),
            signal_scale=float(signal_scale(signals, acquisition, self.model)),
        )


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


def maps_sizes(device: torch.device | str) -> tuple[int, int]:
    """(voxels per chunk, draws per slice) of the posterior maps on ``device``.

    CPU (and MPS): :data:`PREDICT_CHUNK` and :data:`DRAWS_PER_SLICE`, fixed (a CPU fit's maps
    depend on them through the order of the random draws, and they are as fast as larger
    ones there). CUDA: :data:`ACCEL_CHUNK` voxels and a share of the device's memory for the
    draws. At the CPU's sizes a whole brain would be 440 chunks of 100 refinement steps and
    1,760 slices of draws, every one a few hundred kernels on a few thousand voxels: the GPU
    would wait on the launches (the maps of 1,000 voxels are 41,800 tensor operations at the
    CPU's sizes, 5,000 at these, counted with torch.profiler on the CPU). The sizes follow the
    device's total memory, not what is free at the moment, so the same device always slices
    the same way, and a seed gives the same maps and :meth:`VAEFitter.encode` the maps' own
    draws."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return PREDICT_CHUNK, DRAWS_PER_SLICE
    total = torch.cuda.get_device_properties(dev).total_memory
    return ACCEL_CHUNK, max(DRAWS_PER_SLICE, int(total * ACCEL_MEMORY_SHARE) // DRAW_BYTES)


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
    Linv = torch.linalg.inv(L)  # (n, K, d, d), triangular, small
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


class GaussianVAEFitter(VAEFitter):
    """VAE-UniG: prior N(0, I) on the latent space (``vae``)."""

    name = "vae"

    def __init__(
        self,
        model: SignalModel | str,
        *,
        config: str = "default",
        latent_dim: int | None = None,
        hidden: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        kl_weight: float | None = None,
        likelihood: str | None = None,
        n_samples: int | None = None,
        refine_steps: int | None = None,
        precision: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        quiet: bool = True,
        **advanced,
    ) -> None:
        super().__init__(model, prior="gaussian", config=config, latent_dim=latent_dim,
                         hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                         kl_weight=kl_weight, likelihood=likelihood, n_samples=n_samples,
                         refine_steps=refine_steps, precision=precision, device=device,
                         seed=seed, quiet=quiet, **advanced)


class MixtureVAEFitter(VAEFitter):
    """VAE-GMM: categorical y and learned p(z|y) = N(μ_y, diag σ_y²), learned p(y)."""

    name = "vae-gmm"

    def __init__(
        self,
        model: SignalModel | str,
        *,
        config: str = "default",
        latent_dim: int | None = None,
        n_components: int | None = None,
        hidden: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        kl_weight: float | None = None,
        likelihood: str | None = None,
        n_samples: int | None = None,
        refine_steps: int | None = None,
        eb_rounds: int | None = None,
        eb_grid: bool | None = None,
        precision: str | None = None,
        device: str = "cpu",
        seed: int = 0,
        quiet: bool = True,
        **advanced,
    ) -> None:
        super().__init__(model, prior="gmm", config=config, latent_dim=latent_dim,
                         n_components=n_components, hidden=hidden, epochs=epochs,
                         batch_size=batch_size, lr=lr, kl_weight=kl_weight,
                         likelihood=likelihood, n_samples=n_samples, refine_steps=refine_steps,
                         eb_rounds=eb_rounds, eb_grid=eb_grid, precision=precision,
                         device=device, seed=seed, quiet=quiet, **advanced)
