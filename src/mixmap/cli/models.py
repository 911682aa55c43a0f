"""``mixmap models``: the signal models, their parameters, units and bounds."""

from __future__ import annotations

import json

import typer


def models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the signal models, their parameters, units and bounds."""
    from mixmap.models import MODELS

    if as_json:
        typer.echo(json.dumps({name: {"description": cls.description,
                                      "parameters": [p.describe() for p in cls.parameters
                                                     if p.name not in cls.hidden],
                                      "hidden": sorted(cls.hidden),
                                      "derived": [p.describe() for p in cls.derived],
                                      "lsq_bounds": dict(cls.lsq_bounds),
                                      "constants": [c.describe() for c in cls.constants]}
                               for name, cls in MODELS.items()}, indent=2, ensure_ascii=False))
        return
    for name, cls in MODELS.items():
        typer.echo(f"{name}: {cls.description}")
        for p in cls().map_parameters:
            bounds = "unit vector" if p.is_direction else f"[{p.lower:g}, {p.upper:g}]"
            if p.scaled:
                bounds += " × signal scale"
            if p in cls.derived:
                bounds = "derived, " + bounds
            typer.echo(f"  {p.name:<6} {p.unit:<8} {bounds:<24} {p.description}")
        if cls.hidden:
            typer.echo(f"  fitted but not written: {', '.join(sorted(cls.hidden))}")
        for c in cls.constants:
            typer.echo(f"  constant {c.name} = {c.value:g} {c.unit}: {c.description} "
                       f"(--constant {c.name}=VALUE to change)")
        for pname, (lo, hi) in cls.lsq_bounds.items():
            typer.echo(f"  lsq fits {pname} in [{lo:g}, {hi:g}] by default (--bounds to change)")
