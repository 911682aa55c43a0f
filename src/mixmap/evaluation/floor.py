"""The empirical floor of a simulation or phantom: each voxel's posterior mean under the empirical
distribution of the truth (importance weights over the truth values of the *other* voxels,
under the simulation's own noise model and level). No method that gives every voxel the same
prior can do better on average, up to the Monte-Carlo error of a finite set of atoms; unlike
:func:`mixmap.evaluation.bayes_reference` it needs no preset, so it serves phantoms of real
scans and any model."""

from __future__ import annotations

import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.models import SignalModel, get_model


def _atom_signals(model: SignalModel, atoms: dict[str, np.ndarray], acq: Acquisition
                  ) -> torch.Tensor:
    with torch.no_grad():
        return model.forward({k: torch.as_tensor(np.asarray(v, dtype=np.float64))
                              for k, v in atoms.items()}, acq)


#: Quantile knots of the table over an atom's signal on which a group's Rician term is
#: interpolated (besides knots every σ/16 over the atoms' range).
KNOTS = 256
#: At most this many evenly spaced knots (σ/16 apart, or wider over a range of more than
#: this many σ/16: atoms whose signal grows far above the data's, where log i0e is smooth).
EVEN_KNOTS = 4096


#: Rank of the separable approximation of log i0e(x s / σ²) over the columns that cannot be
#: tabulated, and the points of the grid (in units of σ) its factors are interpolated on.
RANK = 24
FACTOR_POINTS = 1500


class _SeparableBessel:
    """log i0e(x s/σ²) ≈ Σ_r a_r(x) b_r(s): a truncated SVD of the function on a grid over
    x/σ and s/σ (about 3e-6 nats at rank 24), so that the sum over measurements of every
    voxel-atom pair is :data:`RANK` matrix products instead of an element-wise Bessel
    function (direction-dependent signals, where no column is shared)."""

    def __init__(self, S: torch.Tensor, sigma: float):
        from scipy.special import i0e

        self.sigma = sigma
        self.top = 1.05 * float(S.max()) / sigma + 10.0  # x up to the signal plus noise
        grid = np.concatenate([[0.0], np.geomspace(1e-3, self.top, FACTOR_POINTS - 1)])
        U, sv, Vt = np.linalg.svd(np.log(i0e(np.outer(grid, grid))))
        self.grid = torch.as_tensor(grid)
        self.a = torch.as_tensor(U[:, :RANK] * sv[:RANK])  # (G, r)
        self.b = torch.as_tensor(Vt[:RANK].T)  # (G, r)
        self.B = self._factor(S, self.b)  # (r, A, m)

    def _factor(self, v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """(r, *v.shape) float32: factor ``f`` interpolated at ``v``/σ (clamped to the grid)."""
        u = (v / self.sigma).clamp(0.0, self.top).contiguous()
        hi = torch.searchsorted(self.grid, u).clamp(1, self.grid.numel() - 1)
        g0, g1 = self.grid[hi - 1], self.grid[hi]
        t = ((u - g0) / (g1 - g0)).unsqueeze(-1)
        out = f[hi - 1] * (1 - t) + f[hi] * t  # (*v.shape, r)
        return out.movedim(-1, 0).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(c, A) float64 Σ_m log i0e(x_m S_m/σ²) for rows ``x`` (c, m)."""
        A = self._factor(x, self.a)  # (r, c, m)
        return torch.bmm(A, self.B.transpose(1, 2)).sum(0, dtype=torch.float64)


class _RicianTerm:
    """Σ_m log i0e(x_m S_m/σ²) for voxels x and atoms' signals S. Columns where every atom's
    signal is the same (a shell of a direction-independent model) share one table per voxel
    over the signal, interpolated at each atom's value; the other columns go through
    :class:`_SeparableBessel`."""

    def __init__(self, S: torch.Tensor, sigma: float):
        self.s2 = sigma * sigma
        keys, inverse = np.unique(S.numpy().T, axis=0, return_inverse=True)
        groups = [np.flatnonzero(inverse.ravel() == g) for g in range(keys.shape[0])]
        self.tabled = [g for g in groups if g.size > 1]
        rest = [g for g in groups if g.size == 1]
        self.direct = np.concatenate(rest) if rest else np.zeros(0, dtype=np.int64)
        self.separable = _SeparableBessel(S[:, self.direct], sigma) if rest else None
        self.knots, self.pos = [], []
        for g in self.tabled:
            # knots at the atoms' quantiles (dense where they are) and every σ/16 between
            s = S[:, g[0]].contiguous()
            q = torch.quantile(s.float(), torch.linspace(0, 1, KNOTS)).double()
            top = min(float(s.max()), float(q[-2]) + 4 * sigma)
            step = max(sigma / 16, (top - float(s.min())) / EVEN_KNOTS)
            even = torch.arange(float(s.min()), top, step, dtype=torch.float64)
            knots = torch.unique(torch.cat([q, even, s.min()[None], s.max()[None] + 1e-9]))
            hi = torch.searchsorted(knots, s).clamp(1, knots.numel() - 1)
            t = (s - knots[hi - 1]) / (knots[hi] - knots[hi - 1])
            self.knots.append(knots)
            self.pos.append((hi - 1, t.clamp(0, 1).float()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(c, A) float64 for rows ``x`` (c, m)."""
        out = torch.zeros(x.shape[0], self.pos[0][0].numel() if self.pos else
                          self.separable.B.shape[1], dtype=torch.float64)
        if self.separable is not None:
            out += self.separable(x[:, self.direct])
        for g, knots, (lo, t) in zip(self.tabled, self.knots, self.pos, strict=True):
            z = x[:, g][:, :, None] * knots[None, None] / self.s2  # (c, |g|, K)
            table = torch.log(torch.special.i0e(z)).sum(1).float()  # (c, K)
            out += torch.lerp(table[:, lo], table[:, lo + 1], t[None]).double()
        return out


def _log_weights(x: torch.Tensor, S: torch.Tensor, S2: torch.Tensor, sigma: float,
                 rician: _RicianTerm | None) -> torch.Tensor:
    """(c, A) log-likelihood of rows ``x`` (c, m) at atoms' signals ``S`` (A, m), up to a
    per-row constant; ``S2`` (A,) = Σ S². Gaussian: (x·S − S²/2)/σ². Rician: the same plus
    Σ log i0e(x S/σ²) (log I0(z) = z + log i0e(z): the large part stays a float64 product)."""
    ll = (x @ S.T - 0.5 * S2[None]) / (sigma * sigma)
    if rician is not None:
        ll += rician(x)
    return ll


#: Atoms at most when none are given and the Rician term cannot be tabulated (direction-
#: dependent signals): its cost is voxels × atoms × copies × measurements × :data:`RANK`.
SEPARABLE_ATOMS = 2000
#: Copies of each atom drawn from its kernel, and the neighbour whose distance sets the kernel.
COPIES = 16
NEIGHBOUR = 5


def _robust_scale(v: np.ndarray) -> float:
    q75, q25 = np.percentile(v, [75, 25])
    s = (q75 - q25) / 1.349
    return float(s if s > 0 else v.std())


def smoothed_atoms(atoms: dict[str, np.ndarray], model: SignalModel, copies: int,
                   neighbour: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``copies`` draws around each atom from a Gaussian kernel whose width is the distance to
    the atom's ``neighbour``-th nearest atom (scalars standardised by their robust spread;
    a direction through n nᵀ, so that an angle θ is a distance of about √2 θ): the
    empirical distribution smoothed just enough that a voxel whose likelihood is narrower than
    the atoms' spacing still finds mass under it. Scalars are reflected into their bounds."""
    from scipy.spatial import cKDTree

    scal = [p for p in model.parameters if not p.is_direction]
    dirs = [p for p in model.parameters if p.is_direction]
    scales = {p.name: _robust_scale(atoms[p.name]) for p in scal}
    cols = [atoms[p.name] / scales[p.name] for p in scal if scales[p.name] > 0]
    for p in dirs:
        d = np.einsum("ai,aj->aij", atoms[p.name], atoms[p.name])
        cols += [d[:, i, j] * (np.sqrt(2) if i != j else 1.0) for i in range(3)
                 for j in range(i, 3)]
    feats = np.stack(cols, 1)
    k = min(neighbour, feats.shape[0] - 1)
    dist, _ = cKDTree(feats).query(feats, k=k + 1)
    h = np.repeat(dist[:, -1], copies)  # (A·copies,)
    out = {}
    for p in scal:
        v = np.repeat(atoms[p.name], copies) + h * scales[p.name] * rng.standard_normal(h.size)
        lo, hi = p.lower, (np.inf if p.scaled else p.upper)
        v = np.where(v < lo, 2 * lo - v, v)
        v = np.where(v > hi, 2 * hi - v, v)
        out[p.name] = np.clip(v, lo, hi)
    for p in dirs:
        n = np.repeat(atoms[p.name], copies, axis=0)
        e = rng.standard_normal(n.shape)
        e -= (e * n).sum(1, keepdims=True) * n  # tangent
        n = n + (h / np.sqrt(2))[:, None] * e
        out[p.name] = n / np.linalg.norm(n, axis=1, keepdims=True)
    return out


def empirical_floor(signals: np.ndarray, acquisition: Acquisition, model: str | SignalModel,
                    truth: dict[str, np.ndarray], sigma: float, noise: str = "gaussian", *,
                    max_atoms: int | None = None, copies: int = COPIES,
                    neighbour: int = NEIGHBOUR, seed: int = 0, chunk: int | None = None,
                    return_std: bool = True) -> dict[str, np.ndarray]:
    """Posterior means under the empirical distribution of ``truth``.

    ``signals`` (n, m) noisy rows; ``truth`` name -> (n,) or (n, 3) the true parameters of the
    same rows (every parameter of ``model``), which are also the prior's atoms: row i is
    weighted over every other row's truth (leave-one-out), or over ``max_atoms`` rows drawn at
    random (``seed``); None: every row, but at most :data:`SEPARABLE_ATOMS` where the Rician
    term cannot be tabulated (direction-dependent signals). Each atom is spread into
    ``copies`` draws of a kernel (:func:`smoothed_atoms`). ``sigma`` and ``noise``
    (gaussian | rician) are the simulation's.

    Returns name -> (n,) float32 posterior means of the parameters and the derived maps (a
    direction: the principal eigenvector of the weighted mean of n nᵀ), ``name:std`` (n,)
    posterior standard deviations of the scalars with ``return_std``, and ``ess`` (n,) the
    effective number of atoms each voxel's mean rests on (1 / Σ w²; a few means the floor
    is resolved coarsely there).
    """
    model = _checked_model(model, truth, noise)
    n = signals.shape[0]
    rng = np.random.default_rng(seed)
    idx = _atom_rows(n, model, noise, max_atoms, rng)
    atoms = {p.name: np.asarray(truth[p.name], dtype=np.float64)[idx] for p in model.parameters}
    if copies > 1:
        atoms = smoothed_atoms(atoms, model, copies, neighbour, rng)
    owner = np.repeat(np.arange(idx.size), max(1, copies))  # the truth row of each atom
    S = _atom_signals(model, atoms, acquisition).double()
    S2 = (S * S).sum(1)
    rician = _RicianTerm(S, float(sigma)) if noise == "rician" else None
    if chunk is None:  # the separable Rician term holds rank × chunk × measurements values
        chunk = 1024
    atoms.update(derived_values(model, atoms))
    every = model.parameters + model.derived
    scalars = [p.name for p in every if not p.is_direction]
    dirs = [p.name for p in every if p.is_direction]
    theta = torch.as_tensor(np.stack([atoms[k] for k in scalars], 1))  # (A, P)
    dyads = {k: torch.as_tensor(np.einsum("ai,aj->aij", atoms[k], atoms[k]).reshape(-1, 9))
             for k in dirs}
    atom_row = torch.as_tensor(idx[owner])  # (A,) the voxel each atom comes from
    out = {k: np.empty(n, np.float32) for k in scalars + [f"{k}:std" for k in scalars] + ["ess"]}
    out.update({k: np.empty((n, 3), np.float32) for k in dirs})
    x_all = torch.as_tensor(np.asarray(signals, dtype=np.float64))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ll = _log_weights(x_all[start:stop], S, S2, float(sigma), rician)
        mine = torch.arange(start, stop)[:, None] == atom_row[None]
        ll.masked_fill_(mine, -torch.inf)  # leave the voxel's own truth out
        _store_posterior(out, slice(start, stop), torch.softmax(ll, 1), theta, scalars, dyads)
    if not return_std:
        for k in scalars:
            del out[f"{k}:std"]
    return out


def derived_values(model: SignalModel, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's derived maps (:meth:`~mixmap.models.base.SignalModel.derive`) of parameter
    arrays, as float64 arrays (empty for a model without any)."""
    if not model.derived:
        return {}
    with torch.no_grad():
        out = model.derive({p.name: torch.as_tensor(np.asarray(params[p.name], np.float64))
                            for p in model.parameters})
    return {k: v.numpy() for k, v in out.items()}


def _checked_model(model: str | SignalModel, truth: dict[str, np.ndarray], noise: str
                   ) -> SignalModel:
    """The model of :func:`empirical_floor`, once its noise and truth are known to fit it."""
    model = get_model(model) if isinstance(model, str) else model
    if noise not in ("gaussian", "rician"):
        raise ValueError(f"unknown noise {noise!r}; choose gaussian or rician")
    missing = [p.name for p in model.parameters if p.name not in truth]
    if missing:
        raise ValueError(f"truth lacks parameter(s) {', '.join(missing)} of {model.name}")
    return model


def _atom_rows(n: int, model: SignalModel, noise: str, max_atoms: int | None,
               rng: np.random.Generator) -> np.ndarray:
    """The rows whose truth is the prior's atoms, sorted: all ``n``, or ``max_atoms`` drawn
    (by default at most :data:`SEPARABLE_ATOMS` where the Rician term cannot be tabulated)."""
    if max_atoms is None and noise == "rician" and not model.direction_independent:
        max_atoms = SEPARABLE_ATOMS
    if max_atoms is not None and max_atoms < n:
        return np.sort(rng.choice(n, size=max_atoms, replace=False))
    return np.arange(n)


def _store_posterior(out: dict[str, np.ndarray], rows: slice, w: torch.Tensor,
                     theta: torch.Tensor, scalars: list[str], dyads: dict[str, torch.Tensor]
                     ) -> None:
    """Write the ``rows`` of ``out`` from their (rows, A) weights ``w`` over the atoms: each
    scalar's mean and std over ``theta`` (A, P), each direction's principal eigenvector of
    the weighted mean dyad, and the effective number of atoms."""
    mean = w @ theta
    var = (w @ theta**2 - mean**2).clamp_min(0.0)
    for j, k in enumerate(scalars):
        out[k][rows] = mean[:, j].numpy()
        out[f"{k}:std"][rows] = var[:, j].sqrt().numpy()
    for k, dyad in dyads.items():
        _, vec = torch.linalg.eigh((w @ dyad).reshape(-1, 3, 3))
        out[k][rows] = vec[:, :, -1].numpy()
    out["ess"][rows] = (1.0 / (w * w).sum(1)).numpy()


__all__ = ["derived_values", "empirical_floor"]
