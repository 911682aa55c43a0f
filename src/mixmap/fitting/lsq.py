"""Batched, bounded non-linear least squares (Levenberg-Marquardt) for any signal model.

All voxels of a chunk are solved at once: the Jacobian of every voxel comes from one forward-mode
pass per unbounded coordinate (``torch.func``), the P×P normal equations are solved in a batch,
and each voxel keeps its own damping. Bounds are kept by optimising the unbounded coordinates of
:class:`~mixmap.parameters.Parameter` (a sigmoid), never by clamping. The start is the model's
:meth:`~mixmap.models.base.SignalModel.initial_estimates` (log-linear for MSDKI, a direction and
diffusivity grid for ball-stick, a quasi-random grid for any other model).

The standard deviation maps are the asymptotic ones, σ̂·sqrt(diag (JᵀJ)⁻¹) at the solution with
J taken with respect to the bounded parameters and σ̂ the residual noise level of the voxel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from tqdm.auto import tqdm

from mixmap.acquisition import Acquisition
from mixmap.fitting.base import FitResult, Fitter, Scheme, resolve_device, signal_scale
from mixmap.models import SignalModel


class LeastSquaresFitter(Fitter):
    """Voxelwise least squares, batched in torch.

    Parameters
    ----------
    model
        A registered model name or a :class:`SignalModel`.
    max_iter
        Levenberg-Marquardt iterations (most voxels converge in 10-30).
    tol
        Stop a voxel when its relative cost decrease falls below this.
    chunk_size
        Voxels solved together; bounds memory to about chunk·n_meas·P·12 bytes.
    """

    name = "lsq"

    def __init__(
        self,
        model: SignalModel | str,
        *,
        max_iter: int = 50,
        tol: float = 1e-7,
        chunk_size: int = 20000,
        device: str = "cpu",
        seed: int = 0,
        quiet: bool = True,
    ) -> None:
        super().__init__(model, device=device, seed=seed, quiet=quiet)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.chunk_size = int(chunk_size)

    def settings(self) -> dict:
        return {**super().settings(), "max_iter": self.max_iter, "tol": self.tol,
                "chunk_size": self.chunk_size}

    def fit(self, signals: np.ndarray, acquisition: Acquisition) -> FitResult:
        signals = self._check_inputs(signals, acquisition)
        device = resolve_device(self.device)
        scale = signal_scale(signals, acquisition)
        n = signals.shape[0]
        params: dict[str, list[np.ndarray]] = {p.name: [] for p in self.model.parameters}
        stds: dict[str, list[np.ndarray]] = {
            p.name: [] for p in self.model.parameters if not p.is_direction
        }
        sigmas = []
        starts = range(0, n, self.chunk_size)
        scheme = Scheme.build(self.model, acquisition, reduce=True, device=device)
        ones = torch.ones(scheme.work.n, device=device)
        for start in tqdm(starts, desc="lsq", disable=self.quiet or len(starts) == 1):
            y = torch.as_tensor(signals[start : start + self.chunk_size] / scale, device=device)
            y, within = scheme.working_signals(y)
            weights = ones if scheme.weights is None else scheme.weights
            extra_ss = torch.zeros_like(y[:, 0]) if within is None else within
            est, std, sigma = self._fit_chunk(y, scheme.work, weights, extra_ss, acquisition.n)
            for k in params:
                params[k].append(est[k])
            for k in stds:
                stds[k].append(std[k])
            sigmas.append(sigma)
        out = {k: np.concatenate(v) for k, v in params.items()}
        std_out = {k: np.concatenate(v) for k, v in stds.items()}
        for p in self.model.parameters:
            if p.scaled:
                out[p.name] = out[p.name] * scale
                std_out[p.name] = std_out[p.name] * scale
        sigma_all = np.concatenate(sigmas)
        return FitResult(
            model=self.model.name,
            method=self.name,
            params={k: v.astype(np.float32) for k, v in out.items()},
            std={k: v.astype(np.float32) for k, v in std_out.items()},
            settings={**self.settings(), "signal_scale": scale},
            noise_sigma=float(np.median(sigma_all) * scale),
        )

    # ------------------------------------------------------------------------------
    def _fit_chunk(self, y, acq, weights, extra_ss, n_meas):
        """Fit one chunk: ``y`` (k, m) scaled signals on scheme ``acq`` with per-measurement
        ``weights`` (m,); ``extra_ss`` (k,) is residual that no parameter can explain (the
        within-shell scatter when shells were averaged), ``n_meas`` the original count."""
        model = self.model
        sw = weights.sqrt()
        with torch.no_grad():
            init = model.initial_estimates(y, acq)
        u = model.join(init).detach()
        n = y.shape[0]
        dir_slices = _direction_slices(model)

        def signal(uu: torch.Tensor) -> torch.Tensor:
            return model.forward(model.split(uu), acq)

        lam = torch.full((n,), 1e-2, device=y.device, dtype=y.dtype)
        with torch.no_grad():
            cost = cost_of_sub(model, u, y, acq, sw)
        active = torch.ones(n, dtype=torch.bool, device=y.device)
        for _ in range(self.max_iter):
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            ua, ya = u[idx], y[idx]
            analytic = model.unbounded_jacobian(ua, acq)
            s_a, J = analytic if analytic is not None else batched_jacobian(signal, ua)
            with torch.no_grad():
                r = (s_a - ya) * sw
                J = J * sw[:, None]
                A = (J.transpose(1, 2) @ J).double()
                g = (J.transpose(1, 2) @ r[..., None])[..., 0].double()
                diag = torch.diagonal(A, dim1=1, dim2=2)
                # Marquardt scaling, floored so the redundant radial coordinate of a direction
                # (zero curvature) stays solvable.
                floor = 1e-6 * diag.mean(1, keepdim=True).clamp_min(1e-12)
                damp = lam[idx, None].double() * (diag + floor) + floor
                step = torch.linalg.solve(A + torch.diag_embed(damp), -g[..., None])[..., 0]
                trial = ua + step.to(ua.dtype)
                for sl in dir_slices:
                    trial[:, sl] = trial[:, sl] / trial[:, sl].norm(dim=1, keepdim=True)
                trial = torch.nan_to_num(trial, nan=0.0).clamp(-30, 30)
                new_cost = cost_of_sub(model, trial, ya, acq, sw)
                better = new_cost < cost[idx]
                rel = (cost[idx] - new_cost) / cost[idx].clamp_min(1e-20)
                u[idx[better]] = trial[better]
                cost[idx[better]] = new_cost[better]
                lam[idx] = torch.where(better, lam[idx] / 3, lam[idx] * 4).clamp(1e-9, 1e9)
                done = (better & (rel < self.tol)) | (lam[idx] >= 1e9)
                active[idx[done]] = False
        with torch.no_grad():
            est = model.split(u)
        std, sigma = self._asymptotic_std(est, acq, cost + extra_ss, n_meas, sw)
        return ({k: v.cpu().numpy() for k, v in est.items()}, std, sigma)

    def _asymptotic_std(self, est, acq, cost, m, sw):
        """σ̂·sqrt(diag (JᵀJ)⁻¹) with J over the bounded scalar parameters."""
        model = self.model
        scalars = [p.name for p in model.parameters if not p.is_direction]
        fixed = {p.name: est[p.name] for p in model.parameters if p.is_direction}
        P = len(scalars) + 2 * len(fixed)  # a direction has 2 degrees of freedom
        sigma = (cost / max(m - P, 1)).sqrt()

        def signal(x: torch.Tensor) -> torch.Tensor:
            params = {name: x[:, i] for i, name in enumerate(scalars)}
            params.update(fixed)
            return model.forward(params, acq)

        x = torch.stack([est[k] for k in scalars], 1)
        _, J = batched_jacobian(signal, x)
        J = J * sw[:, None]
        with torch.no_grad():
            A = (J.transpose(1, 2) @ J).double()
            A = A + 1e-10 * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
            cov = torch.linalg.pinv(A, hermitian=True)
            var = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0).float() * sigma[:, None] ** 2
            std = var.sqrt()
        return {k: std[:, i].cpu().numpy() for i, k in enumerate(scalars)}, sigma.cpu().numpy()


def batched_jacobian(fn, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Value (n, m) and per-voxel Jacobian (n, m, P) of a row-wise function of u (n, P).

    Rows are independent, so one forward-mode pass per column of u gives column k of every
    voxel's Jacobian at once: P passes instead of a per-voxel loop.
    """
    cols = []
    value = None
    with torch.no_grad(), fwAD.dual_level():
        for k in range(u.shape[1]):
            tangent = torch.zeros_like(u)
            tangent[:, k] = 1.0
            out = fwAD.unpack_dual(fn(fwAD.make_dual(u, tangent)))
            value = out.primal
            cols.append(out.tangent)
    return value, torch.stack(cols, -1)


def cost_of_sub(model: SignalModel, u: torch.Tensor, y: torch.Tensor, acq, sw) -> torch.Tensor:
    r = (model.forward(model.split(u), acq) - y) * sw
    c = (r * r).sum(-1)
    return torch.where(torch.isfinite(c), c, torch.full_like(c, float("inf")))


def _direction_slices(model: SignalModel) -> list[slice]:
    out, i = [], 0
    for p in model.parameters:
        if p.is_direction:
            out.append(slice(i, i + p.size))
        i += p.size
    return out
