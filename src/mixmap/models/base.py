"""The signal-model interface: parameters declared as data and a torch forward pass."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from mixmap.acquisition import Acquisition, VolumeGroup
from mixmap.parameters import Constant, Parameter

Params = dict[str, torch.Tensor]

log = logging.getLogger(__name__)


class UnsupportedAcquisition(ValueError):
    """The acquisition cannot determine this model's parameters."""


class SignalModel:
    """A closed-form signal model φ(params, acquisition) -> signal.

    Subclasses set :attr:`name`, :attr:`parameters` and implement :meth:`forward`. They may
    override :meth:`initial_estimates` (a good start for least squares) and
    :meth:`check_acquisition`; the defaults work for any model.
    """

    name: str = ""
    description: str = ""
    parameters: tuple[Parameter, ...] = ()
    #: True when the signal depends on b only (not on the gradient direction): least squares
    #: then fits the shell means weighted by their counts, which has the same minimiser.
    direction_independent: bool = False
    #: Ranges least squares keeps to by default where physics rules out part of a parameter's
    #: declared range (name -> (lower, upper), inside it). A fit without a prior needs them;
    #: the learned fitters use the declared ranges and learn from the scan where values lie.
    lsq_bounds: Mapping[str, tuple[float, float]] = {}
    #: The parameter the signal is proportional to (S0, M0 ...), or None: fitters may solve or
    #: integrate it in closed form, and a grid need not span it.
    scale_parameter: str | None = "S0"
    #: BIDS suffix of the maps (``sub-01_model-msdki_param-D_dwimap.nii.gz``).
    output_suffix: str = "dwimap"
    #: The per-volume acquisition fields the signal depends on (names of
    #: :data:`mixmap.acquisition.FIELDS`); checked before any fit.
    required_fields: tuple[str, ...] = ()
    #: Maps computed from the parameters by :meth:`derive` (FA and MD from a tensor, ...),
    #: declared like parameters (their bounds: the range of possible values). Every fitter
    #: gives them with their std, and they are written and reported like parameters.
    derived: tuple[Parameter, ...] = ()
    #: Parameters the physics needs but nobody reads (a tensor's Cholesky factor): kept in
    #: fit results (``predict`` uses them), neither written as maps nor shown in reports.
    hidden: frozenset[str] = frozenset()
    #: Direction maps shown with their colours scaled by a scalar map in [0, 1] (the report's
    #: colour FA): direction name -> scalar name.
    direction_brightness: Mapping[str, str] = {}
    #: Fixed physical constants of the signal (not fitted; :meth:`with_constants` sets them).
    constants: tuple[Constant, ...] = ()

    # ---------------------------------------------------------------- declared structure
    @property
    def parameter_names(self) -> list[str]:
        return [p.name for p in self.parameters]

    def parameter(self, name: str) -> Parameter:
        """The fitted or derived parameter ``name``."""
        for p in self.parameters + self.derived:
            if p.name == name:
                return p
        raise KeyError(f"model {self.name} has no parameter {name!r}")

    @property
    def map_parameters(self) -> tuple[Parameter, ...]:
        """What is written and reported as maps: the parameters not :attr:`hidden`, then the
        :attr:`derived` ones."""
        return tuple(p for p in self.parameters if p.name not in self.hidden) + self.derived

    def derive(self, params: Params) -> Params:
        """The :attr:`derived` maps from bounded parameters of any leading shape (...,):
        name -> (...,), or (..., 3) for a direction. None by default."""
        return {}

    def constant(self, name: str) -> float:
        """The value of the constant ``name``."""
        for c in self.constants:
            if c.name == name:
                return c.value
        raise KeyError(f"model {self.name} has no constant {name!r}")

    def constant_values(self) -> dict[str, float]:
        """name -> value of every constant (what a fit records and a saved model restores)."""
        return {c.name: c.value for c in self.constants}

    def with_constants(self, values: Mapping[str, float]) -> SignalModel:
        """A copy of the model with the named constants set (ex-vivo diffusivities ...); a
        ValueError names an unknown constant or a value outside its admissible range."""
        by_name = {c.name: c for c in self.constants}
        for name, value in values.items():
            c = by_name.get(name)
            if c is None:
                have = ", ".join(by_name) or "none"
                raise ValueError(f"constant {name}=...: model {self.name} has no constant "
                                 f"{name!r}; its constants: {have} (see `mixmap models`)")
            value = float(value)
            if not (np.isfinite(value) and c.lower < value <= c.upper):
                raise ValueError(f"constant {name}={value:g}: give a value in ({c.lower:g}, "
                                 f"{c.upper:g}] {c.unit}")
            by_name[name] = replace(c, value=value)
        out = copy.copy(self)
        out.constants = tuple(by_name[c.name] for c in self.constants)
        return out

    def grid_parameters(self) -> list[str]:
        """The scalar parameters a quadrature grid spans: all but the scale parameter, or none
        when the model has a direction (a grid cannot integrate the sphere cheaply)."""
        if self.scale_parameter not in self.parameter_names or any(
                p.is_direction for p in self.parameters):
            return []
        return [p.name for p in self.parameters if p.name != self.scale_parameter]

    def declared_bounds(self) -> dict[str, tuple[float, float]]:
        """(lower, upper) of every scalar parameter that is not relative to the scan's scale."""
        return {p.name: (p.lower, p.upper) for p in self.parameters
                if not (p.is_direction or p.scaled)}

    def with_bounds(self, bounds: Mapping[str, tuple[float, float]]) -> SignalModel:
        """A copy of the model whose named parameters keep to narrower ranges (the physics is
        the same; :meth:`split` and :meth:`join` map to the new ranges)."""
        by_name = {p.name: p for p in self.parameters}
        for name, pair in bounds.items():
            p = by_name.get(name)
            if p is None or p.is_direction or p.scaled:
                can = ", ".join(self.declared_bounds())
                raise ValueError(f"bounds {name}=...: model {self.name} has no parameter "
                                 f"{name!r} whose range can be set; choose from {can}")
            lo, hi = (float(x) for x in pair)
            unit = "" if p.unit == "1" else f" {p.unit}"
            if not (p.lower <= lo < hi <= p.upper):
                raise ValueError(
                    f"bounds {name}={lo:g},{hi:g}: give lower < upper inside {name}'s declared "
                    f"range [{p.lower:g}, {p.upper:g}]{unit} (see `mixmap models`)")
            by_name[name] = replace(p, lower=lo, upper=hi)
        out = copy.copy(self)
        out.parameters = tuple(by_name[p.name] for p in self.parameters)
        return out

    @property
    def n_unbounded(self) -> int:
        """Number of unbounded numbers a network must output for one voxel."""
        return sum(p.size for p in self.parameters)

    def split(self, u: torch.Tensor) -> Params:
        """Split a (..., n_unbounded) tensor into bounded parameters (scalars squeezed)."""
        out: Params = {}
        i = 0
        for p in self.parameters:
            chunk = u[..., i : i + p.size]
            out[p.name] = p.to_bounded(chunk if p.is_direction else chunk[..., 0])
            i += p.size
        return out

    def join(self, params: Params) -> torch.Tensor:
        """Inverse of :meth:`split`: bounded parameters -> (..., n_unbounded)."""
        cols = []
        for p in self.parameters:
            v = p.to_unbounded(params[p.name])
            cols.append(v if p.is_direction else v[..., None])
        return torch.cat(cols, dim=-1)

    # ---------------------------------------------------------------- physics
    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        """Signal for each voxel and measurement, shape (n_voxels, n_meas)."""
        raise NotImplementedError

    def __call__(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        return self.forward(params, acquisition)

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params | None:
        """Optional analytic derivatives of the signal with respect to each bounded parameter:
        name -> (n, m), or (n, m, 3) for a direction. ``None`` (the default) lets least
        squares use forward-mode automatic differentiation instead, which is exact but slower.
        """
        return None

    def signal_and_jacobian(self, params: Params, acquisition: Acquisition
                            ) -> tuple[torch.Tensor, Params] | None:
        """(:meth:`forward`, :meth:`jacobian`), or None without an analytic Jacobian; a model
        whose Jacobian computes the signal on the way overrides it to do the work once."""
        jac = self.jacobian(params, acquisition)
        return None if jac is None else (self.forward(params, acquisition), jac)

    def unbounded_jacobian(
        self, u: torch.Tensor, acquisition: Acquisition
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Signal (n, m) and its Jacobian (n, m, n_unbounded) with respect to the unbounded
        coordinates, from :meth:`jacobian` and the chain rule; None without an analytic one."""
        params = self.split(u)
        both = self.signal_and_jacobian(params, acquisition)
        if both is None:
            return None
        signal, jac = both
        cols = []
        i = 0
        for p in self.parameters:
            d = p.bounded_jacobian(u[..., i : i + p.size] if p.is_direction else u[..., i])
            if p.is_direction:
                cols.append(jac[p.name] @ d)  # (n, m, 3) @ (n, 3, 3)
            else:
                cols.append((jac[p.name] * d[..., None])[..., None])
            i += p.size
        return signal, torch.cat(cols, -1)

    def normal_equations(
        self,
        u: torch.Tensor,
        signals: torch.Tensor,
        acquisition: Acquisition,
        sqrt_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Optional fused Gauss-Newton terms at the unbounded coordinates ``u`` (n, P) for
        ``signals`` (n, m): (cost (n,), JᵀJ (n, P, P), Jᵀr (n, P)) with r = (forward − signals)
        · ``sqrt_weights`` (m,) and cost = Σ r². A model overrides this when it can form them
        without the (n, m, P) Jacobian; ``None`` (the default) lets least squares build them
        from :meth:`unbounded_jacobian` or automatic differentiation."""
        return None

    def check_acquisition(self, acquisition: Acquisition) -> None:
        """Raise :class:`UnsupportedAcquisition` if the scheme cannot determine the model: a
        required field is missing, or :meth:`check_scheme` refuses it."""
        missing = [f for f in self.required_fields if not acquisition.has(f)]
        if missing:
            from mixmap.acquisition import FIELDS

            what = ", ".join(f"{FIELDS[f].description} ({f})" for f in missing)
            raise UnsupportedAcquisition(
                f"model {self.name} needs {what} in the acquisition; it has "
                f"{', '.join(acquisition.fields)}")
        self.check_scheme(acquisition)

    def check_scheme(self, acquisition: Acquisition) -> None:
        """Model-specific checks of an acquisition that has the required fields."""

    def scheme_warnings(self, acquisition: Acquisition) -> list[str]:
        """Where a scheme the model can fit lies partly outside where the model holds (e.g.
        b-values beyond a signal expansion's range): one sentence each, naming the volumes and
        the remedy; empty when it holds everywhere. Fits go on, and say them."""
        return []

    def check_fit(self, acquisition: Acquisition, where: str) -> None:
        """What every fit runs first: :meth:`check_acquisition` (raises), then each of
        :meth:`scheme_warnings` logged as a warning prefixed with ``where`` (the file)."""
        self.check_acquisition(acquisition)
        for warning in self.scheme_warnings(acquisition):
            log.warning("%s: %s: %s", where, self.name, warning)

    def example_acquisition(self) -> Acquisition:
        """An acquisition this model is meant for (simulations, tests, documentation)."""
        from mixmap.acquisition import example_scheme

        return example_scheme(self.required_fields)

    # ---------------------------------------------------------------- reference volumes
    def reference_volumes(self, acquisition: Acquisition) -> np.ndarray:
        """(n,) bool: the volumes whose signal is the scale parameter alone (diffusion: b=0).
        They set the signal scale and, when repeated, the noise level. None by default."""
        return np.zeros(acquisition.n, dtype=bool)

    #: The acquisition field whose equal values make volumes repeats of one another for a
    #: direction-independent model (diffusion: b), or None.
    group_field: str | None = None

    def volume_groups(self, acquisition: Acquisition, exact: bool = False) -> list[VolumeGroup]:
        """Groups of volumes of equal :attr:`group_field` (diffusion: shells). ``exact``:
        only equal values (their means are a lossless reduction); else values within the
        field's usual tolerance. One group a volume where the model has no group field."""
        if self.group_field is None:
            return [VolumeGroup(float(i), (i,)) for i in range(acquisition.n)]
        return acquisition.groups(self.group_field)

    def reference_signal(self, signals: torch.Tensor, acquisition: Acquisition) -> torch.Tensor:
        """(n,) mean signal of the reference volumes per voxel (the largest signal where the
        acquisition has none)."""
        ref = torch.as_tensor(self.reference_volumes(acquisition), device=signals.device)
        if bool(ref.any()):
            return signals[:, ref].mean(1)
        return signals.max(1).values

    # ---------------------------------------------------------------- fitting support
    def initial_estimates(self, signals: torch.Tensor, acquisition: Acquisition) -> Params:
        """A start for least squares from (n, m) signals scaled so that S0 is about 1.

        The default works for any model: evaluate a fixed quasi-random set of parameter
        values inside the bounds and keep, per voxel, the one with the least squared error
        (S0 solved in closed form for each candidate).
        """
        return grid_search(self, signals, acquisition, self.candidate_grid(signals.device))

    def candidate_grid(self, device, n: int = 2048) -> Params:
        """Quasi-random candidates covering the bounds (S0 fixed to 1, solved later)."""
        eng = torch.quasirandom.SobolEngine(self.n_unbounded, scramble=True, seed=0)
        u = eng.draw(n).to(device)
        out: Params = {}
        i = 0
        for p in self.parameters:
            if p.is_direction:
                v = torch.special.ndtri(u[:, i : i + 3].clamp(1e-4, 1 - 1e-4))
                out[p.name] = v / v.norm(dim=-1, keepdim=True)
            else:
                out[p.name] = p.lower + (p.upper - p.lower) * u[:, i]
            i += p.size
        if self.scale_parameter is not None:
            out[self.scale_parameter] = torch.ones(n, device=device)
        return out


def grid_search(
    model: SignalModel,
    signals: torch.Tensor,
    acquisition: Acquisition,
    candidates: Params,
    chunk: int = 4096,
) -> Params:
    """Best candidate per voxel by least squares with S0 >= 0 solved in closed form.

    ``candidates`` holds C parameter sets with S0 = 1; their signals form a (C, m) basis and
    each voxel picks the one whose scaled copy fits best.
    """
    basis = model.forward(candidates, acquisition)  # (C, m)
    bb = (basis * basis).sum(-1)  # (C,)
    best_idx = []
    best_s0 = []
    for start in range(0, signals.shape[0], chunk):
        y = signals[start : start + chunk]
        yb = y @ basis.T  # (n, C)
        s0 = (yb / bb).clamp_min(0)
        # residual |y|^2 - 2 s0 yb + s0^2 bb, up to the |y|^2 constant
        cost = -2 * s0 * yb + s0**2 * bb
        idx = cost.argmin(dim=1)
        best_idx.append(idx)
        best_s0.append(s0.gather(1, idx[:, None])[:, 0])
    idx = torch.cat(best_idx)
    out = {k: v[idx] for k, v in candidates.items()}
    out[model.scale_parameter] = torch.cat(best_s0)
    return out


SAFE_EXP_CAP = 15.0


def safe_exp(x: torch.Tensor, cap: float = SAFE_EXP_CAP) -> torch.Tensor:
    """exp(x) with x softly limited below ``cap``: identical to exp for x well under the cap
    (error < 1e-5 relative at x = cap - 11), finite with a usable gradient everywhere."""
    return torch.exp(cap - torch.nn.functional.softplus(cap - x))


def sphere_directions(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, 3) directions on a hemisphere (Fibonacci lattice), for direction grids."""
    from mixmap.acquisition import fibonacci_sphere

    return torch.as_tensor(fibonacci_sphere(n, hemisphere=True), dtype=dtype, device=device)


__all__ = [
    "Params",
    "SignalModel",
    "UnsupportedAcquisition",
    "grid_search",
    "safe_exp",
    "SAFE_EXP_CAP",
    "sphere_directions",
]
