"""Networks of the learned fitters: input features, fully connected trunks, the amortised
posterior q(y, z | x) of the mixture VAE, and the decoder from latent to unbounded parameters.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from mixmap.acquisition import Acquisition
from mixmap.models import SignalModel


def mlp(n_in: int, hidden: int, n_layers: int, n_out: int | None = None) -> nn.Sequential:
    """``n_layers`` Linear+ReLU layers of width ``hidden`` and, if ``n_out``, a linear output."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    if n_out is not None:
        layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class FeatureMap(nn.Module):
    """Encoder inputs from (n, m) signals already divided by the scan's signal scale.

    For a direction-independent model the group means (:meth:`SignalModel.volume_groups`:
    shells for diffusion) and the log of each relative to the reference volumes' mean (b=0)
    are the inputs: they carry all the information the model can use and make the encoder
    small. Otherwise the inputs are the signals and the signals over their reference mean.
    ``extra`` more columns (e.g. a least-squares estimate) can be appended by the caller.
    Features are standardised with statistics frozen at the first :meth:`calibrate` call and
    saved with the weights.
    """

    def __init__(self, model: SignalModel, acquisition: Acquisition, extra: int = 0,
                 reduce: bool = True) -> None:
        super().__init__()
        self.reduce = bool(reduce and model.direction_independent)
        shells = model.volume_groups(acquisition)
        member = torch.zeros(acquisition.n, len(shells))
        for j, s in enumerate(shells):
            member[list(s.indices), j] = 1.0 / s.n
        self.register_buffer("shell_avg", member)
        self.register_buffer("b0", torch.as_tensor(model.reference_volumes(acquisition),
                                                   dtype=torch.bool))
        n_base = 2 * len(shells) if self.reduce else 2 * acquisition.n
        self.raw_size = n_base
        self.n_features = n_base + int(extra)
        self.register_buffer("shift", torch.zeros(self.n_features))
        self.register_buffer("spread", torch.ones(self.n_features))
        self.register_buffer("calibrated", torch.tensor(False))

    def raw(self, y: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if bool(self.b0.any()):
            ref = y[:, self.b0].mean(1, keepdim=True)
        else:
            ref = y.max(1, keepdim=True).values
        ref = ref.clamp_min(1e-3)
        if self.reduce:
            means = y @ self.shell_avg
            cols = [means, torch.log((means / ref).clamp(1e-3, 10.0))]
        else:
            cols = [y, (y / ref).clamp(-10.0, 10.0)]
        if extra is not None:
            cols.append(extra)
        return torch.cat(cols, 1)

    @torch.no_grad()
    def calibrate(self, y: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        f = self.raw(y, extra)
        self.shift.copy_(f.mean(0))
        self.spread.copy_(f.std(0).clamp_min(1e-6))
        self.calibrated.fill_(True)

    def forward(self, y: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return (self.raw(y, extra) - self.shift) / self.spread


def _tril_indices(d: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tril_indices(d)


class MixtureEncoder(nn.Module):
    """q(y|x) = Categorical(softmax(logits)) and q(z|x, y=k) = N(μ_k(x), L_k(x) L_k(x)ᵀ).

    One trunk shared by all components; the heads output, per component, a mean and either a
    full lower-triangular Cholesky factor (``full_cov``; positive diagonal via softplus) or a
    diagonal one. With one component it is the encoder of a plain VAE.

    ``autocast`` (a 16-bit float type, or None): run the trunk and heads in mixed precision
    (``torch.autocast`` on the input's device); the outputs are float32 either way.
    """

    autocast: torch.dtype | None = None

    def __init__(self, n_in: int, latent_dim: int, n_components: int, hidden: int,
                 n_layers: int, full_cov: bool = True) -> None:
        super().__init__()
        self.d = int(latent_dim)
        self.k = int(n_components)
        self.full_cov = bool(full_cov)
        self.trunk = mlp(n_in, hidden, n_layers)
        width = hidden if n_layers > 0 else n_in
        n_chol = self.d * (self.d + 1) // 2 if self.full_cov else self.d
        self.head_logits = nn.Linear(width, self.k)
        self.head_mu = nn.Linear(width, self.k * self.d)
        self.head_chol = nn.Linear(width, self.k * n_chol)
        rows, cols = _tril_indices(self.d) if self.full_cov else (np.arange(self.d),) * 2
        self.register_buffer("rows", torch.tensor(np.array(rows), dtype=torch.long))
        self.register_buffer("cols", torch.tensor(np.array(cols), dtype=torch.long))
        with torch.no_grad():  # start with a narrow q: the likelihood is sharp
            self.head_chol.bias.fill_(0.0)
            self.head_chol.weight.mul_(0.1)

    def forward(self, f: torch.Tensor, base: torch.Tensor | None = None):
        """f (n, n_in) -> logits (n, K), μ (n, K, d), raw Cholesky entries (n, K, n_chol).

        ``base`` (n, d), when given, is added to every component's mean: the network then
        learns a correction to a per-voxel estimate (e.g. least squares) rather than the
        whole posterior location.
        """
        # The heads run in this order (mean, logits, Cholesky) on purpose: autograd sums their
        # gradients into the trunk in the reverse order, and another order changes training's
        # rounding, hence its path (.float() is a no-op on float32 outputs).
        with (contextlib.nullcontext() if self.autocast is None
              else torch.autocast(f.device.type, dtype=self.autocast)):
            h = self.trunk(f)
            n = f.shape[0]
            mu = self.head_mu(h).float().view(n, self.k, self.d)
            if base is not None:
                mu = mu + base[:, None, :]
            return self.head_logits(h).float(), mu, self.head_chol(h).float().view(n, self.k, -1)

    @torch.no_grad()
    def init_mean(self, anchor: torch.Tensor | None = None, shrink: float = 0.1) -> None:
        """Start q near a per-voxel estimate: small mean weights, bias ``anchor`` (d,)."""
        self.head_mu.weight.mul_(shrink)
        self.head_mu.bias.zero_()
        if anchor is not None:
            self.head_mu.bias.copy_(anchor.repeat(self.k))

    def cholesky(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw entries (..., n_chol) -> lower-triangular (..., d, d), diagonal > 0."""
        return raw_to_cholesky(raw, self.rows, self.cols, self.d)


def raw_to_cholesky(raw: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                    d: int) -> torch.Tensor:
    diag = rows == cols
    vals = torch.where(diag, torch.nn.functional.softplus(raw - 4.0) + 1e-4, raw * 0.1)
    L = raw.new_zeros(*raw.shape[:-1], d, d)
    L[..., rows, cols] = vals
    return L


class Decoder(nn.Module):
    """Latent z -> unbounded model parameters.

    ``identity``: the latent space *is* the unbounded parameter space. ``affine``: u = b + A z
    with A lower-triangular with a positive diagonal (invertible, so that a parameter estimate
    can be mapped back into the latent space). ``linear``: any latent dimension, the paper's
    one-layer decoder.
    """

    def __init__(self, latent_dim: int, n_unbounded: int, kind: str = "identity") -> None:
        super().__init__()
        if kind not in ("identity", "affine", "linear"):
            raise ValueError(f"unknown decoder {kind!r}; choose identity, affine or linear")
        if kind in ("identity", "affine") and latent_dim != n_unbounded:
            raise ValueError(
                f"an {kind} decoder needs latent_dim = {n_unbounded} (the model's number of "
                f"unbounded parameters), got {latent_dim}; use decoder='linear'"
            )
        self.kind = kind
        d = n_unbounded
        if kind == "linear":
            self.linear = nn.Linear(latent_dim, n_unbounded)
        elif kind == "affine":
            self.bias = nn.Parameter(torch.zeros(d))
            self.raw_diag = nn.Parameter(torch.zeros(d))
            self.lower = nn.Parameter(torch.zeros(d, d))
            self.register_buffer("strict", torch.tril(torch.ones(d, d), -1))

    @property
    def invertible(self) -> bool:
        return self.kind != "linear"

    def matrix(self) -> torch.Tensor:
        return torch.diag(self.raw_diag.exp()) + self.lower * self.strict

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return z
        if self.kind == "linear":
            return self.linear(z)
        return self.bias + z @ self.matrix().T

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """z with forward(z) = u (identity and affine decoders only)."""
        if self.kind == "identity":
            return u
        if self.kind == "linear":
            raise ValueError("a linear decoder with another latent dimension has no inverse")
        A = self.matrix()
        x = (u - self.bias)[..., None]
        return torch.linalg.solve_triangular(A, x, upper=False)[..., 0]

    @torch.no_grad()
    def init_from(self, u: torch.Tensor) -> None:
        """Start so that z ~ N(0, I) maps onto the spread of the parameter estimates u (n, d)."""
        if self.kind == "identity":
            return
        if self.kind == "linear":
            self.linear.bias.copy_(u.median(0).values)
            return
        mean = u.mean(0)
        cov = torch.cov(u.T) + 1e-3 * torch.eye(u.shape[1], device=u.device)
        L = torch.linalg.cholesky(cov)
        self.bias.copy_(mean)
        self.raw_diag.copy_(torch.diagonal(L).log())
        self.lower.copy_(torch.tril(L, -1))
