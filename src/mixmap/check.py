"""``mixmap check``: inspect a dataset before fitting; say whether, and with what, it fits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixmap.acquisition import (
    B0_THRESHOLD,
    FIELDS,
    SHELL_RELATIVE_TOLERANCE,
    SHELL_TOLERANCE,
    Acquisition,
)
from mixmap.fitting.base import noise_sigma_from_repeats
from mixmap.io import load_dwi
from mixmap.models import MODELS, UnsupportedAcquisition


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    supported_models: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = list(self.lines)
        out.append("fittable models: " + (", ".join(self.supported_models) or "none"))
        if self.problems:
            out += ["problems:"] + [f"  - {p}" for p in self.problems]
        else:
            out.append("OK: the dataset can be fitted")
        return "\n".join(out)


def shell_lines(acq: Acquisition) -> list[str]:
    """How the volumes were grouped into shells (:meth:`Acquisition.shells`, the grouping
    every fit uses): the rule, then one line per shell with its b-value range and count."""
    shells = acq.shells()
    out = [f"b=0 volumes: {acq.n_b0}; volumes grouped into {len(shells)} shells, each of the "
           f"b-values within max({SHELL_TOLERANCE * 1000:g} s/mm², "
           f"{SHELL_RELATIVE_TOLERANCE:.0%} of b) of its lowest:"]
    for s in shells:
        b = acq.bvals[list(s.indices)] * 1000
        low, high = (f"{round(float(x), 1):g}" for x in (b.min(), b.max()))
        span = f"{low}–{high}, " if low != high else ""
        ref = ", b=0 reference" if s.bval <= B0_THRESHOLD else ""
        out.append(f"  shell b{'≈' if span else '='}{round(s.bval * 1000)} s/mm² "
                   f"({span}{s.n} volume{'s' if s.n > 1 else ''}{ref})")
    return out


def field_lines(acq: Acquisition) -> list[str]:
    """A relaxometry acquisition's fields: per field its distinct values (grouped as the fits
    group them) with the number of volumes at each."""
    from mixmap.models.relaxometry.base import GROUP_TOLERANCE

    out = []
    for name, values in acq.fields.items():
        spec = FIELDS[name]
        groups = acq.groups(name, GROUP_TOLERANCE)
        listed = ", ".join(f"{g.value:.4g}" + (f" (×{g.n})" if g.n > 1 else "")
                           for g in groups[:12]) + (" ..." if len(groups) > 12 else "")
        out.append(f"{spec.description}s ({name}, {spec.unit}): {len(groups)} distinct of "
                   f"{values.size} volumes: {listed}")
    return out


def check_dataset(
    dwi: str | Path,
    bvals: str | Path,
    bvecs: str | Path | None,
    mask: str | Path | None = None,
    model: str | None = None,
    *,
    mask_threshold: float | None = None,
    ignore_mask_affine: bool = False,
    max_b: float | None = None,
) -> CheckReport:
    """Load the dataset the way ``mixmap fit`` does and describe it.

    Errors that make the dataset unusable (unreadable files, count mismatches ...) propagate
    as the same one-line errors ``fit`` gives; problems that only rule out some models are
    listed in the report. ``bvecs`` None: ``bvals`` is an MRtrix gradient table.
    """
    data = load_dwi(dwi, bvals, bvecs, mask, mask_threshold=mask_threshold,
                    ignore_mask_affine=ignore_mask_affine, max_b=max_b)
    acq = data.acquisition
    rep = CheckReport()
    zooms = tuple(float(z) for z in data.header.get_zooms()[:3])
    rep.lines.append(f"image: {data.path}  grid {data.shape} × {acq.n} volumes, "
                     f"voxel {zooms[0]:.3g}×{zooms[1]:.3g}×{zooms[2]:.3g} mm")
    if acq.is_diffusion:
        rep.lines.append(f"gradients: {'; '.join(acq.notes)}")
        rep.lines += shell_lines(acq)
    else:
        rep.lines.append(f"acquisition: {'; '.join(acq.notes)}")
        rep.lines += field_lines(acq)
    n_grid = int(np.prod(data.shape))
    rep.lines.append(
        f"voxels fitted: {data.signals.shape[0]} of {n_grid} "
        f"({100 * data.signals.shape[0] / n_grid:.1f} %)"
        + (f" from mask {mask}" if mask
           else f" (no mask: voxels with positive {'b=0' if acq.is_diffusion else 'mean'} "
                "signal)")
    )
    if data.n_dropped:
        rep.lines.append(f"voxels left out for NaN/Inf: {data.n_dropped}")
    for vol, why in data.dropped_volumes.items():
        rep.lines.append(f"volume {vol} left out: {why}")
    neg = float((data.signals < 0).mean())
    if neg > 0:
        rep.lines.append(f"negative values: {100 * neg:.2f} % of the fitted data")
    sigma = noise_sigma_from_repeats(data.signals, acq) if acq.is_diffusion else None
    if not acq.is_diffusion:
        rep.lines.append("noise: σ will be estimated from the fit's residuals")
    elif sigma is not None and sigma > 0:
        s0 = float(np.median(data.signals[:, acq.b0_mask].mean(1)))
        rep.lines.append(f"noise σ from {acq.n_b0} b=0 volumes: {sigma:.4g}; "
                         f"SNR at b=0 ≈ {s0 / sigma:.1f}")
    else:
        rep.lines.append("noise: fewer than 2 b=0 volumes, σ will be estimated from residuals")
    if acq.is_diffusion and acq.n_b0 == 0:
        rep.lines.append("no b=0 volume: S0 is fitted freely as a model parameter")
    names = [model] if model else list(MODELS)
    for name in names:
        try:
            candidate = MODELS[name]()
            candidate.check_acquisition(acq)
            rep.supported_models.append(name)
            rep.lines += [f"{name}: fittable, but {w}" for w in candidate.scheme_warnings(acq)]
        except UnsupportedAcquisition as exc:
            if model:
                rep.problems.append(str(exc))
            else:
                rep.lines.append(f"{name}: not fittable: {exc}")
    if not rep.supported_models and not rep.problems:
        rep.problems.append("no registered model can be fitted with this acquisition")
    return rep
