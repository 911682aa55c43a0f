"""Tensor algebra shared by the tensor models (DTI, DKI) and ball-stick's start.

The diffusion tensor is parametrised by its Cholesky factor, D = L Lᵀ with L lower triangular and
a non-negative diagonal: D is positive semi-definite for every parameter value, and the signal
exp(−b·gᵀDg) = exp(−b·|Lᵀg|²) is a polynomial in the parameters (no eigen-decomposition in the
fit). The kurtosis tensor W (15 independent elements, dipy's order) enters the signal as
b²·MD²·W(g)/6 (Jensen et al., 2005). The maps readers want (FA, MD, AD, RD, the principal
direction, MK, AK, RK) are derived from D and W by :func:`tensor_maps` and :func:`kurtosis_maps`.
Units: b in ms/µm², diffusivities in µm²/ms, kurtosis dimensionless.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mixmap.acquisition import Acquisition, fibonacci_sphere
from mixmap.parameters import Parameter

#: The Cholesky factor's elements (row, column), row-major over the lower triangle.
CHOLESKY = (("Lxx", 0, 0), ("Lyx", 1, 0), ("Lyy", 1, 1), ("Lzx", 2, 0), ("Lzy", 2, 1),
            ("Lzz", 2, 2))
#: Bound of the factor's elements (√(µm²/ms)): diagonal in [0, 2], others in [−2, 2], so every
#: eigenvalue up to 4 µm²/ms (above free water at body temperature, 3.0) is reachable.
CHOLESKY_BOUND = 2.0

#: The kurtosis tensor's independent elements as powers (x, y, z) of the gradient (dipy's order).
KURTOSIS_POWERS = ((4, 0, 0), (0, 4, 0), (0, 0, 4), (3, 1, 0), (3, 0, 1), (1, 3, 0),
                   (0, 3, 1), (1, 0, 3), (0, 1, 3), (2, 2, 0), (2, 0, 2), (0, 2, 2),
                   (2, 1, 1), (1, 2, 1), (1, 1, 2))
KURTOSIS_NAMES = tuple("W" + "x" * a + "y" * b + "z" * c for a, b, c in KURTOSIS_POWERS)
#: Bound of the kurtosis tensor's elements: W(n)·MD²/D(n)² is the kurtosis along n, and along
#: a coherent fibre (D(n) ≈ 3·MD) a kurtosis of 1 already needs W ≈ 9.
KURTOSIS_BOUND = 10.0
#: Directional kurtosis is kept in [−3/7, 10] when averaged into MK, AK, RK (dipy's defaults;
#: −3/7 is the floor of the fourth-order expansion, 10 far above tissue values).
KURTOSIS_RANGE = (-3.0 / 7.0, 10.0)
#: Directions (hemisphere) over which the mean kurtosis is averaged, and per circle for RK.
SPHERE_POINTS = 100
CIRCLE_POINTS = 16


def cholesky_parameters() -> tuple[Parameter, ...]:
    """The six scalar parameters of L (:data:`CHOLESKY`)."""
    out = []
    for name, i, j in CHOLESKY:
        lo = 0.0 if i == j else -CHOLESKY_BOUND
        kind = "diagonal" if i == j else "off-diagonal"
        out.append(Parameter(name, "√(µm²/ms)", lo, CHOLESKY_BOUND,
                             f"Cholesky factor of the diffusion tensor (D = L·Lᵀ), {kind} "
                             f"element {name[1:]}"))
    return tuple(out)


def kurtosis_parameters() -> tuple[Parameter, ...]:
    """The 15 scalar elements of the kurtosis tensor (:data:`KURTOSIS_NAMES`)."""
    return tuple(Parameter(name, "1", -KURTOSIS_BOUND, KURTOSIS_BOUND,
                           f"kurtosis tensor element {name[1:]} (MD² convention)")
                 for name in KURTOSIS_NAMES)


def tensor_derived() -> tuple[Parameter, ...]:
    """The derived maps of a diffusion tensor, as BIDS/QSIRecon name them. Their bounds are
    what the factor's bounds allow (MD = |L|²/3 ≤ 8 µm²/ms, AD ≤ trace ≤ 24), wider than tissue."""
    top = 3 * 2 * CHOLESKY_BOUND**2 / 3  # the largest MD: every element of L at its bound
    return (
        Parameter("fa", "1", 0.0, 1.0, "fractional anisotropy"),
        Parameter("md", "µm²/ms", 0.0, top, "mean diffusivity (trace / 3)"),
        Parameter("ad", "µm²/ms", 0.0, 3 * top, "axial diffusivity (largest eigenvalue)"),
        Parameter("rd", "µm²/ms", 0.0, 1.5 * top, "radial diffusivity (mean of the other two)"),
        Parameter("v1", "1", -1.0, 1.0, "principal eigenvector (x, y, z), like FSL's V1",
                  size=3),
    )


def kurtosis_derived() -> tuple[Parameter, ...]:
    """The derived kurtosis maps (each directional kurtosis kept in :data:`KURTOSIS_RANGE`)."""
    lo, hi = KURTOSIS_RANGE
    return (
        Parameter("mk", "1", lo, hi, "mean kurtosis (over all directions)"),
        Parameter("ak", "1", lo, hi, "axial kurtosis (along the principal eigenvector)"),
        Parameter("rk", "1", lo, hi, "radial kurtosis (mean perpendicular to it)"),
    )


def factor(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """L (..., 3, 3) from the parameters."""
    ref = params["Lxx"]
    L = ref.new_zeros(*ref.shape, 3, 3)
    for name, i, j in CHOLESKY:
        L[..., i, j] = params[name]
    return L


def tensor(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """D = L Lᵀ (..., 3, 3) in µm²/ms."""
    L = factor(params)
    return L @ L.transpose(-1, -2)


def projections(params: dict[str, torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """Lᵀg for every gradient: (..., m, 3), so that gᵀDg = |Lᵀg|²."""
    gx, gy, gz = g[:, 0], g[:, 1], g[:, 2]

    def p(name):
        return params[name][..., None]

    q0 = p("Lxx") * gx + p("Lyx") * gy + p("Lzx") * gz
    q1 = p("Lyy") * gy + p("Lzy") * gz
    q2 = p("Lzz") * gz
    return torch.stack([q0, q1, q2], -1)


def projection_jacobian(q: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """d|Lᵀg|²/dL_ij (..., m) for each element, from q = Lᵀg (..., m, 3): 2·q_j·g_i."""
    return {name: 2.0 * q[..., j] * g[:, i] for name, i, j in CHOLESKY}


def mean_diffusivity(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """tr(D)/3 = |L|²_F / 3 (...,)."""
    return sum(params[name] ** 2 for name, _, _ in CHOLESKY) / 3.0


def kurtosis_design(g: torch.Tensor) -> torch.Tensor:
    """(m, 15) W(g) = design @ w: each element's monomial times its multiplicity."""
    cols = []
    for a, b, c in KURTOSIS_POWERS:
        mult = math.factorial(4) / (math.factorial(a) * math.factorial(b) * math.factorial(c))
        cols.append(mult * g[:, 0] ** a * g[:, 1] ** b * g[:, 2] ** c)
    return torch.stack(cols, 1)


def kurtosis_vector(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 15 elements of W stacked (..., 15)."""
    return torch.stack([params[name] for name in KURTOSIS_NAMES], -1)


def eigen(params: dict[str, torch.Tensor]
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D = L Lᵀ (..., 3, 3) in the parameters' dtype and its eigenvalues (..., 3) and
    eigenvectors (..., 3, 3), ascending, in float64: computed once for :func:`tensor_maps` and
    :func:`kurtosis_maps`."""
    D = tensor(params)
    vals, vecs = torch.linalg.eigh(D.double())
    return D, vals, vecs


def tensor_maps(params: dict[str, torch.Tensor], eig=None) -> dict[str, torch.Tensor]:
    """FA, MD, AD, RD (...,) and the principal direction v1 (..., 3) of D = L Lᵀ (``eig``:
    :func:`eigen` of ``params``, computed here when None).

    FA comes from the trace and the Frobenius norm (smooth everywhere, also where eigenvalues
    meet); AD and v1 from the eigen-decomposition, in float64."""
    D, vals, vecs = eigen(params) if eig is None else eig
    md = D.diagonal(dim1=-2, dim2=-1).sum(-1) / 3.0
    fro2 = (D * D).sum((-2, -1))
    fa = torch.sqrt((1.5 * (fro2 - 3.0 * md * md)).clamp_min(0) / fro2.clamp_min(1e-20))
    ad = vals[..., 2].to(D.dtype)
    return {"fa": fa.clamp(0.0, 1.0), "md": md, "ad": ad, "rd": (3.0 * md - ad) / 2.0,
            "v1": vecs[..., :, 2].to(D.dtype)}


def _directional_kurtosis(D: torch.Tensor, w: torch.Tensor, md: torch.Tensor,
                          dirs: torch.Tensor) -> torch.Tensor:
    """K along each of ``dirs`` (..., k, 3) or (k, 3): MD²·W(n)/D(n)², kept in range."""
    if dirs.dim() == 2:
        wn = w @ kurtosis_design(dirs).T  # (..., k)
        dn = torch.einsum("...ij,ki,kj->...k", D, dirs, dirs)
    else:
        flat = dirs.reshape(-1, 3)
        design = kurtosis_design(flat).reshape(*dirs.shape[:-1], 15)
        wn = (design * w[..., None, :]).sum(-1)
        dn = torch.einsum("...ij,...ki,...kj->...k", D, dirs, dirs)
    k = md[..., None] ** 2 * wn / dn.clamp_min(1e-6) ** 2
    return k.clamp(*KURTOSIS_RANGE)


def kurtosis_maps(params: dict[str, torch.Tensor], eig=None) -> dict[str, torch.Tensor]:
    """MK (the mean over :data:`SPHERE_POINTS` directions), AK (along v1) and RK (the mean over
    :data:`CIRCLE_POINTS` directions perpendicular to v1) of the kurtosis tensor, each
    directional kurtosis kept in :data:`KURTOSIS_RANGE` (as dipy does); ``eig`` as in
    :func:`tensor_maps`."""
    D, _, vecs = eigen(params) if eig is None else eig
    D = D.double()
    w = kurtosis_vector(params).double()
    md = D.diagonal(dim1=-2, dim2=-1).sum(-1) / 3.0
    sphere = torch.as_tensor(fibonacci_sphere(SPHERE_POINTS, hemisphere=True), dtype=D.dtype,
                             device=D.device)
    mk = _directional_kurtosis(D, w, md, sphere).mean(-1)
    v1, v2, v3 = vecs[..., :, 2], vecs[..., :, 1], vecs[..., :, 0]
    ak = _directional_kurtosis(D, w, md, v1[..., None, :])[..., 0]
    theta = torch.arange(CIRCLE_POINTS, dtype=D.dtype, device=D.device) * (
        math.pi / CIRCLE_POINTS)
    circle = (torch.cos(theta)[:, None] * v2[..., None, :]
              + torch.sin(theta)[:, None] * v3[..., None, :])  # (..., C, 3)
    rk = _directional_kurtosis(D, w, md, circle).mean(-1)
    dt = params["Lxx"].dtype
    return {"mk": mk.to(dt), "ak": ak.to(dt), "rk": rk.to(dt)}


# ------------------------------------------------------------------------ linear starts
def tensor_design(acquisition: Acquisition, kurtosis: bool, device, dtype=torch.float64
                  ) -> torch.Tensor:
    """(m, 7) or (m, 22) design of log S = log S0 − b·gᵀDg [+ b²·(MD²W)(g)/6]: columns 1,
    the six elements of D (xx, yy, zz, xy, xz, yz) and, with ``kurtosis``, the 15 of MD²·W."""
    b, g = acquisition.torch(device, dtype)
    gx, gy, gz = g.T
    cols = [torch.ones_like(b), -b * gx * gx, -b * gy * gy, -b * gz * gz,
            -2 * b * gx * gy, -2 * b * gx * gz, -2 * b * gy * gz]
    X = torch.stack(cols, 1)
    if kurtosis:
        X = torch.cat([X, (b * b / 6.0)[:, None] * kurtosis_design(g)], 1)
    return X


def weighted_log_fit(signals: torch.Tensor, acquisition: Acquisition, kurtosis: bool = False
                     ) -> torch.Tensor:
    """Per-voxel weighted linear least squares of the log signal (weights y², the usual WLLS,
    so that noise-level measurements at high b do not dominate), in float64: the
    coefficients (n, 7) or (n, 22) of :func:`tensor_design`."""
    dev = signals.device
    X = tensor_design(acquisition, kurtosis, dev)
    y = signals.double()
    floor = 1e-3 * y.abs().amax(1, keepdim=True).clamp_min(1e-12)
    y = torch.maximum(y, floor)
    p = X.shape[1]
    w = y * y
    XtWX = (w @ (X[:, :, None] * X[:, None, :]).reshape(X.shape[0], -1)).reshape(-1, p, p)
    XtWz = (w * torch.log(y)) @ X
    ridge = 1e-9 * torch.diagonal(XtWX, dim1=1, dim2=2).mean(1)[:, None, None]
    eye = torch.eye(p, dtype=y.dtype, device=dev)
    return torch.nan_to_num(torch.linalg.solve(XtWX + ridge * eye, XtWz[..., None])[..., 0])


def tensor_of(coef: torch.Tensor) -> torch.Tensor:
    """D (n, 3, 3) from the coefficients of :func:`weighted_log_fit`."""
    dxx, dyy, dzz, dxy, dxz, dyz = coef[:, 1:7].unbind(1)
    return torch.stack([torch.stack([dxx, dxy, dxz], 1), torch.stack([dxy, dyy, dyz], 1),
                        torch.stack([dxz, dyz, dzz], 1)], 1)


#: Eigenvalue range (µm²/ms) a start's tensor is projected into before its Cholesky factor.
START_EIGENVALUES = (0.02, 3.5)


def cholesky_start(D: torch.Tensor) -> dict[str, torch.Tensor]:
    """The factor's elements (n,) of D (n, 3, 3) projected to eigenvalues in
    :data:`START_EIGENVALUES` (a log-linear fit can give a tensor that is not positive)."""
    vals, vecs = torch.linalg.eigh(torch.nan_to_num(D.double()))
    vals = vals.clamp(*START_EIGENVALUES)
    L = torch.linalg.cholesky((vecs * vals[:, None, :]) @ vecs.transpose(1, 2))
    margin = 0.01 * CHOLESKY_BOUND
    out = {}
    for name, i, j in CHOLESKY:
        lo = margin if i == j else -CHOLESKY_BOUND + margin
        out[name] = L[:, i, j].clamp(lo, CHOLESKY_BOUND - margin)
    return out


def principal_direction(D: torch.Tensor) -> torch.Tensor:
    """(n, 3) eigenvector of D (n, 3, 3) with the largest eigenvalue."""
    _, vecs = torch.linalg.eigh(torch.nan_to_num(D.double()))
    return vecs[:, :, -1]


def direction_ranks(acquisition: Acquisition) -> tuple[int, int]:
    """Ranks of the diffusion-weighted directions' second-order (g gᵀ: 6 for a tensor) and
    fourth-order (the 15 monomials of :data:`KURTOSIS_POWERS`: 15 for a kurtosis tensor)
    products: what the scheme can determine of D and W."""
    g = acquisition.bvecs[~acquisition.b0_mask]
    if g.size == 0:
        return 0, 0
    dyads = np.stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, g[:, 0] * g[:, 1],
                      g[:, 0] * g[:, 2], g[:, 1] * g[:, 2]], 1)
    quartic = kurtosis_design(torch.as_tensor(g, dtype=torch.float64)).numpy()
    return (int(np.linalg.matrix_rank(dyads, tol=1e-6)),
            int(np.linalg.matrix_rank(quartic, tol=1e-6)))
