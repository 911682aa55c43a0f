"""Model parameters declared as data: name, unit, bounds, and the bounded <-> unbounded transform.

Every fitter, the simulator, the output naming and the CLI listing are derived from these
declarations, so a signal model states each of its parameters exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Margin kept away from the bounds when mapping a bounded value back to the unbounded space,
#: so that values exactly on a bound map to a finite number.
_EPS = 1e-6


@dataclass(frozen=True)
class Parameter:
    """One parameter of a signal model.

    Attributes
    ----------
    name
        Field name (``S0``, ``D``, ``K``, ``f``, ``Dpar`` ...), used in output file names.
    unit
        Unit of the value as written to maps (``µm²/ms``, ``1``, ``a.u.``).
    lower, upper
        Bounds. For a ``scaled`` parameter (S0) they are multiples of the scan's signal scale.
    description
        One line for ``mixmap models`` and the JSON sidecar.
    size
        1 for a scalar, 3 for a unit direction vector (stored as x, y, z components).
    scaled
        True when the value is proportional to the signal intensity (S0): fitters work on
        signals divided by a scale and multiply the estimate back.
    bids_suffix
        The qMRI-BIDS map suffix of this quantity (``T2map``, ``T1map``, ``M0map`` ...), or
        None: its maps are then named with ``param-<name>`` and the model's suffix.
    """

    name: str
    unit: str
    lower: float
    upper: float
    description: str
    size: int = 1
    scaled: bool = False
    bids_suffix: str | None = None

    def __post_init__(self) -> None:
        if self.size not in (1, 3):
            raise ValueError(f"parameter {self.name}: size must be 1 or 3, got {self.size}")
        if self.size == 1 and not self.lower < self.upper:
            raise ValueError(f"parameter {self.name}: lower bound must be below upper bound")

    @property
    def is_direction(self) -> bool:
        return self.size == 3

    def to_bounded(self, u: torch.Tensor) -> torch.Tensor:
        """Map unbounded numbers to the parameter's range.

        Scalars go through a sigmoid scaled to ``[lower, upper]``: smooth, never clamped, so a
        network or optimiser always has a gradient. Directions (last axis of size 3) are
        normalised to unit length.
        """
        if self.is_direction:
            return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.lower + (self.upper - self.lower) * torch.sigmoid(u)

    def bounded_jacobian(self, u: torch.Tensor) -> torch.Tensor:
        """d to_bounded / du: (...,) for a scalar; (..., 3, 3) for a direction, whose
        normalisation has the Jacobian (I − n nᵀ) / |u|."""
        if self.is_direction:
            norm = u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            n = u / norm
            eye = torch.eye(3, dtype=u.dtype, device=u.device)
            return (eye - n[..., :, None] * n[..., None, :]) / norm[..., None]
        s = torch.sigmoid(u)
        return (self.upper - self.lower) * s * (1 - s)

    def to_unbounded(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_bounded` (directions are returned unchanged)."""
        if self.is_direction:
            return x
        p = (x - self.lower) / (self.upper - self.lower)
        p = p.clamp(_EPS, 1 - _EPS)
        return torch.log(p) - torch.log1p(-p)

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of values inside the bounds (directions: unit norm within 1e-3)."""
        if self.is_direction:
            return (x.norm(dim=-1) - 1).abs() < 1e-3
        return (x >= self.lower) & (x <= self.upper)

    def describe(self) -> dict:
        """JSON-ready description, as written to sidecars and listed by ``mixmap models``."""
        return {
            "name": self.name,
            "unit": self.unit,
            "lower": self.lower,
            "upper": self.upper,
            "size": self.size,
            "scaled": self.scaled,
            "description": self.description,
        }


@dataclass(frozen=True)
class Constant:
    """A fixed physical constant of a signal model (NODDI's intrinsic diffusivity ...): not
    fitted, but a user may set it (``mixmap fit --constant NAME=VALUE``) within
    ``(lower, upper]``; fits record the value used."""

    name: str
    value: float
    unit: str
    lower: float
    upper: float
    description: str

    def describe(self) -> dict:
        """JSON-ready description (``mixmap models``, sidecars)."""
        return {"name": self.name, "value": self.value, "unit": self.unit,
                "description": self.description}
