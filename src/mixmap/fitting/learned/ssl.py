"""The paper's voxelwise self-supervised baseline (``ssl``; Lim et al. 2022 style).

A fully connected network maps each voxel's signals to unbounded parameters: 3 hidden layers as
wide as the number of measurements, ReLU, a linear output of ``model.n_unbounded`` numbers, then
the parameters' bounded transform and the physics; the loss is the mean squared error between
the predicted and measured signals. No prior, no uncertainty: every voxel is on its own, the
network only shares the mapping.
"""

from __future__ import annotations

import torch
from torch import nn

import mixmap.fitting.learned.configs as configs
import mixmap.fitting.learned.distributed as distributed
from mixmap.acquisition import Acquisition
from mixmap.fitting.base import (
    Scheme,
)
from mixmap.fitting.learned.base import ROBUST_NATS, Data, LearnedFitter, robust_mean
from mixmap.models import SignalModel
from mixmap.nn.encoders import mlp

#: The output layer's weights are scaled by this at the start (see SelfSupervisedFitter._prepare).
START_WEIGHT_SCALE = 0.1


class _Identity(nn.Module):
    """Encoder inputs of the baseline: the signals in working units, unchanged (a feature map
    with the interface of :class:`~mixmap.nn.encoders.FeatureMap`)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n_features = n
        self.raw_size = n

    def calibrate(self, y, extra=None) -> None:
        pass

    def forward(self, y, extra=None):
        return y


class SelfSupervisedNet(nn.Module):
    def __init__(self, n_meas: int, hidden: int, n_layers: int, n_out: int) -> None:
        super().__init__()
        self.features = _Identity(n_meas)
        self.body = mlp(n_meas, hidden, n_layers, n_out)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.body(y)


class SelfSupervisedFitter(LearnedFitter):
    """Voxelwise self-supervised fitting: signals -> network -> bounded parameters -> physics,
    trained on the MSE of the signal over all voxels (mini-batches, Adam).

    Settings: the preset ``config`` (``paper``: the paper's network and stopping rule;
    ``default``: the same network with the VAEs' stopping rule) with keyword overrides, every
    name a field of :class:`~mixmap.fitting.learned.configs.SSLConfig`; None keeps the
    preset's value, an unknown name is a ValueError. ``hidden`` None is the number of
    measurements.
    """

    name = "ssl"
    hyper_names = ("config", *configs.field_names(configs.SSLConfig))

    def __init__(self, model: SignalModel | str, *, config: str = "default",
                 device: str = "cpu", seed: int = 0, quiet: bool = True, **options) -> None:
        super().__init__(model, device=device, seed=seed, quiet=quiet)
        values = configs.resolve(configs.SSL_PRESETS, config, options)
        self.config = config or "default"
        for k, v in values.items():
            setattr(self, k, v)
        if not self.lr > 0 or int(self.epochs) < 1 or int(self.batch_size) < 1:
            raise ValueError("lr must be > 0, epochs and batch_size >= 1")

    def _build(self, acq: Acquisition, sigma: float | None) -> nn.Module:
        hidden = int(self.hidden or acq.n)
        self._sigma_b0 = sigma
        return SelfSupervisedNet(acq.n, hidden, int(self.n_layers), self.model.n_unbounded)

    def _prepare(self, ys, acq, scheme, device, calibrate):
        """A data-driven start, as the VAEs have: the output layer's bias is the median of
        the model's quick per-voxel estimates and its weights are scaled down, so training
        starts at typical tissue values (from the middle of the bounds it did not train; see
        docs/design/learned-fitters.md)."""
        data = super()._prepare(ys, acq, scheme, device, calibrate)
        if calibrate:
            with torch.no_grad():
                u = self.model.join(self.model.initial_estimates(data.y, acq)).clamp(-8, 8)
                last = self.net.body[-1]
                last.bias.copy_(u.median(0).values)
                last.weight.mul_(START_WEIGHT_SCALE)
                # The scale of the per-voxel loss compression: the noise variance from the b=0
                # volumes, else the median residual of those estimates (the same in every
                # process: all hold all voxels).
                if self._sigma_b0 is not None:
                    var = float(self._sigma_b0) ** 2
                else:
                    start = self.model.forward(self.model.split(u), scheme.work)
                    var = float(self._mse(data, scheme, start).median())
                self._robust_mse = ROBUST_NATS * 2.0 * max(var, 1e-12) / scheme.n_meas
        return data

    def _signals(self, batch: Data, scheme: Scheme) -> torch.Tensor:
        u = self.net(batch.feats)
        return self.model.forward(self.model.split(u), scheme.work)

    def _mse(self, batch: Data, scheme: Scheme, signals: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Mean squared error over all original measurements, per voxel (n,), of the network's
        predicted signals (or of ``signals``, working units)."""
        pred = self._signals(batch, scheme) if signals is None else signals
        r2 = (pred - batch.yw) ** 2
        if scheme.weights is not None:
            r2 = r2 * scheme.weights
        ss = r2.sum(-1)
        if batch.extra_ss is not None:
            ss = ss + batch.extra_ss
        return ss / scheme.n_meas

    def _loss(self, batch: Data, scheme: Scheme, epoch: int):
        """Mean over voxels of the per-voxel MSE, compressed logarithmically where a voxel's
        Gaussian negative log-likelihood passes :data:`ROBUST_NATS` (as in
        the VAEs' loss): voxels whose signal at high b is many times S0 would otherwise steer
        the shared network alone. Each voxel's own minimiser is unchanged."""
        mse = self._mse(batch, scheme)
        loss = robust_mean(mse, self._robust_mse)
        return loss, {"loss": loss.detach(), "mse": mse.mean().detach()}

    def _sigma_working(self) -> float:
        return float(getattr(self, "_rms", float("nan")))

    def _predict(self, data: Data, scheme: Scheme, gen: torch.Generator):
        with torch.no_grad():
            u = self.net(data.feats)
            params = self.model.split(u)
            params.update(self.model.derive(params))
            mse = self._mse(data, scheme)
        self._rms = float(distributed.global_mean(mse).sqrt())
        return {k: v.cpu().numpy() for k, v in params.items()}, {}, None


# The signature shows the user-facing options, derived from the config's fields.
SelfSupervisedFitter.__init__.__signature__ = configs.init_signature("ssl")

__all__ = ["SelfSupervisedFitter"]
