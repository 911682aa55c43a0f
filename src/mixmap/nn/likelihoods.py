"""Noise models p(x | signal) shared by the learned fitters: Gaussian and Rician.

Both take the noise standard deviation σ in the fitter's working units (signals divided by the
scan's signal scale). σ is either fixed (estimated from repeated b=0 volumes) or learned, as an
unconstrained log σ trained with everything else.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LIKELIHOODS = ("gaussian", "rician")


def gaussian_loglik(
    y: torch.Tensor,
    s: torch.Tensor,
    sigma: torch.Tensor,
    weights: torch.Tensor | None = None,
    extra_ss: torch.Tensor | None = None,
    n_meas: int | None = None,
) -> torch.Tensor:
    """Σ_j log N(y_j; s_j, σ²) per voxel.

    ``y`` (n, m), ``s`` (..., n, m) broadcast against y; returns (..., n). With ``weights``
    (m,) the columns are shell means that stand for ``weights`` measurements each, and
    ``extra_ss`` (n,) is the within-shell scatter Σ (y_j − ȳ_b)² that no parameter explains:
    then the result equals the log-likelihood of all ``n_meas`` original measurements.
    """
    r2 = (y - s) ** 2
    if weights is not None:
        r2 = r2 * weights
    ss = r2.sum(-1)
    m = y.shape[-1] if n_meas is None else n_meas
    if extra_ss is not None:
        ss = ss + extra_ss
    return -0.5 * ss / sigma**2 - m * torch.log(sigma) - 0.5 * m * math.log(2 * math.pi)


def rician_loglik(y: torch.Tensor, s: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Σ_j log Rice(y_j; ν = s_j, σ) per voxel, (..., n).

    log p = log y − 2 log σ − (y − ν)²/(2σ²) + log I0e(yν/σ²), using the exponentially scaled
    Bessel function I0e(z) = e^{−z} I0(z) so that large yν/σ² neither overflows nor loses the
    Gaussian limit.
    """
    y = y.clamp_min(1e-8)
    nu = s.abs()
    z = y * nu / sigma**2
    lp = (
        torch.log(y)
        - 2 * torch.log(sigma)
        - (y - nu) ** 2 / (2 * sigma**2)
        + torch.log(torch.special.i0e(z))
    )
    return lp.sum(-1)


def rician_sigma(y: torch.Tensor, nu: torch.Tensor, sigma: float,
                 reduce=lambda t: t, *, outlier: float | None = None, gather=lambda t: [t],
                 max_iter: int = 200, tol: float = 1e-9) -> tuple[float, int]:
    """The σ that maximises Σ log Rice(y; ν, σ) over measurements ``y`` (n, m) of n voxels with
    signals ``nu`` (n, m), or (R, n, m) draws of each voxel's signals (each draw counting
    once), by EM on the lost phase (the magnitude of a complex Gaussian): with
    r = I1(yν/σ²) / I0(yν/σ²), the expected cosine of the phase,

        σ² ← Σ (y² + ν² − 2 y ν r) / 2N,

    from ``sigma`` until σ² changes by under ``tol`` relatively; each update raises the
    likelihood. A measurement at the noise floor (ν ≈ 0) adds y²/2, one far above it
    (y − ν)²/2. ``reduce`` sums over processes.

    ``outlier``: first leave out the voxels whose own first update of σ² is off the median
    voxel's by more than ``outlier`` standard errors (√(2/m) relative); ``gather`` collects
    a tensor from every process for that median. Returns (σ, voxels left out, over all
    processes)."""
    y, nu = torch.broadcast_tensors(y.double(), nu.double().abs())

    def cross(s2: float) -> torch.Tensor:  # y ν r, r the expected cosine of the lost phase
        z = y * nu / s2
        return y * nu * (torch.special.i1e(z) / torch.special.i0e(z))

    left = 0
    if outlier is not None:
        term = y * y + nu * nu - 2 * cross(float(sigma) ** 2)
        own = term.mean(-1).reshape(-1, y.shape[-2]).mean(0)  # (n,) each voxel's own σ² × 2
        mid = float(torch.cat([t.to(own.device) for t in gather(own)]).median())
        keep = (own / mid - 1).abs() <= outlier * math.sqrt(2.0 / y.shape[-1])
        y, nu = y[..., keep, :], nu[..., keep, :]
        left = int(reduce(torch.tensor(float((~keep).sum()), dtype=torch.float64,
                                       device=y.device)))
    yy = reduce((y * y + nu * nu).sum())
    count = float(reduce(torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)))
    s2 = float(sigma) ** 2
    for _ in range(int(max_iter)):
        new = float(yy - 2.0 * reduce(cross(s2).sum())) / (2.0 * count)
        done = abs(new - s2) <= tol * s2
        s2 = new
        if done:
            break
    return math.sqrt(s2), left


class NoiseModel(nn.Module):
    """A likelihood with its noise level: fixed σ (a buffer) or learned log σ (a parameter).

    Parameters
    ----------
    kind
        ``gaussian`` or ``rician``.
    sigma
        Noise standard deviation in working units, or None to learn it (starting at
        ``sigma_init``).
    """

    def __init__(self, kind: str = "gaussian", sigma: float | None = None,
                 sigma_init: float = 0.05) -> None:
        super().__init__()
        if kind not in LIKELIHOODS:
            raise ValueError(
                f"unknown likelihood {kind!r}; choose one of: {', '.join(LIKELIHOODS)}"
            )
        self.kind = kind
        self.learned = sigma is None
        value = torch.tensor(math.log(sigma if sigma is not None else sigma_init))
        if self.learned:
            self.log_sigma = nn.Parameter(value)
        else:
            self.register_buffer("log_sigma", value)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def forward(self, y: torch.Tensor, s: torch.Tensor, *, weights=None, extra_ss=None,
                n_meas=None) -> torch.Tensor:
        """Log-likelihood per voxel, (..., n). For ``rician`` the signals must be the full
        measurements (no shell averaging), so ``weights`` must be None."""
        if self.kind == "gaussian":
            return gaussian_loglik(y, s, self.sigma, weights, extra_ss, n_meas)
        if weights is not None:
            raise ValueError("the Rician likelihood needs every measurement, not shell means")
        return rician_loglik(y, s, self.sigma)


#: Knots of a :class:`RiceTable`.
RICE_TABLE_SIZE = 256


class RiceTable:
    """The one non-Gaussian part of a group's Rician log-likelihood, tabulated in its signal.

    For measurements y_j (j in a group whose model signal is one value s, such as a shell of a
    direction-independent model), Σ_j log Rice(y_j; s, σ) = (the Gaussian form
    −Σ_j (y_j − s)²/(2σ²) up to a constant) + h(s), h(s) = Σ_j log i0e(y_j s/σ²). h is smooth
    and nearly linear in asinh(s/σ²) (constant below about σ², −½ log s per measurement above),
    so it is tabulated per voxel at :data:`RICE_TABLE_SIZE` asinh-spaced knots over
    [``s_min``, min(``s_max``, ``cap``)] and interpolated, linearly (:meth:`positions`) or
    cubically with its slope (:meth:`lookup`); the Gaussian part is added exactly by the
    caller. Shared by the Bayes reference
    (:func:`mixmap.evaluation.bayes_reference`) and the grid refit of the prior
    (:mod:`mixmap.fitting.empirical_bayes.grid`).
    """

    def __init__(self, sigma: float, s_min: float, s_max: float, cap: float = 20.0,
                 size: int = RICE_TABLE_SIZE) -> None:
        self.sigma2 = float(sigma) ** 2
        self.size = int(size)
        lo = math.asinh(max(float(s_min), 0.0) / self.sigma2)
        hi = math.asinh(min(max(float(s_max), 0.0), cap) / self.sigma2)
        self.t0, self.dt = lo, max(hi - lo, 1e-6) / (self.size - 1)

    def h(self, y: torch.Tensor) -> torch.Tensor:
        """(n, size) float32: Σ_j log i0e(y_j s/σ²) at each knot s, for y (n, members)."""
        t = self.t0 + self.dt * torch.arange(self.size, dtype=torch.float64)
        scaled = torch.sinh(t).float().to(y.device)  # knots / σ²
        return torch.special.i0e(y.float()[:, :, None] * scaled).log_().sum(1)

    def positions(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Knot index (int64) and linear weight (float32) of signals ``s`` (any shape, computed
        in its float type): h at s is ``h[i] + w (h[i + 1] − h[i])`` (w > 1 past the last
        knot)."""
        pos = self._knot_position(s)
        i = pos.floor().clamp(0, self.size - 2).long()
        return i, (pos - i).float()

    def _knot_position(self, s: torch.Tensor) -> torch.Tensor:
        """Signals ``s`` in units of knots (0 at the first), computed in their float type."""
        return (torch.asinh(s.clamp_min(0.0) / self.sigma2) - self.t0) / self.dt

    def lookup(self, h: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (n, size) of :meth:`h` at signals ``s`` (n, k): its value and its derivative in s,
        each (n, k) float32, by Catmull–Rom cubic interpolation in asinh(s/σ²) (the linear
        interpolant's error, 256 knots, shifted the maximum of a scan's evidence along MSDKI's
        D–K ridge by 0.02 µm²/ms; the cubic one's is some 20× smaller). In the first and the
        last segment and past the last knot, where a cubic lacks a neighbour, the line through
        the next inner segment's knots is extended."""
        pos = self._knot_position(s.float())
        i = pos.floor().clamp(1, self.size - 3).long()
        u = pos - i
        p0, p1, p2, p3 = (torch.gather(h, 1, i + k) for k in (-1, 0, 1, 2))
        a = 2 * p0 - 5 * p1 + 4 * p2 - p3
        b = 3 * (p1 - p2) + p3 - p0
        inner = (u >= 0) & (u <= 1)
        value = torch.where(inner, p1 + 0.5 * u * (p2 - p0 + u * (a + u * b)),
                            p1 + u * (p2 - p1))
        du = torch.where(inner, 0.5 * (p2 - p0) + u * (a + 1.5 * u * b), p2 - p1)
        # d asinh(s/σ²) / ds = 1 / √(σ⁴ + s²)
        return value, du / (self.dt * torch.sqrt(self.sigma2**2 + s.float() ** 2))
