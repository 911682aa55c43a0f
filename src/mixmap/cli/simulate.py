"""``mixmap simulate``: a scan with known truth, written as NIfTI + FSL gradients + truth/."""

from __future__ import annotations

from pathlib import Path

import typer

from mixmap.cli.common import Noise, handle_errors, setup_logging


def parse_grid(grid: str) -> tuple[int, int, int]:
    """``"145,174,145"`` -> (145, 174, 145); three sizes of at least 8."""
    try:
        shape = tuple(int(s) for s in grid.split(","))
        assert len(shape) == 3 and min(shape) >= 8
    except (ValueError, AssertionError):
        raise ValueError(f"--grid {grid!r}: give three sizes >= 8 like 145,174,145") from None
    return shape  # type: ignore[return-value]


def _phantom(like: Path, bvals: Path | None, bvecs: Path | None, mask: Path | None,
             model: str, **options):
    """The realistic phantom of ``mixmap simulate --like`` (see
    :func:`mixmap.simulation.phantom.phantom_like`)."""
    from mixmap.simulation.phantom import phantom_like

    if bvals is None or mask is None:
        raise ValueError(f"--like {like}: give the scan's --bvals, --bvecs and --mask too")
    if options["noise_factor"] is not None:
        options["snr"] = None
    return phantom_like(like, bvals, bvecs, mask, model, **options)


@handle_errors
def simulate(
    out: Path = typer.Argument(..., help="Folder to write dwi.nii.gz, bval/bvec (relaxometry: "
                               "echo_times.txt ...), mask, truth/."),
    preset: str = typer.Option(
        "paper-msdki", help="paper-msdki | msdki-4 | ball-stick | noddi | ivim-body | t2-brain | "
        "t2star-brain | mwf-brain | t1-ir-brain | t1-vfa-brain"),
    like: Path | None = typer.Option(
        None, help="A realistic phantom of this real scan (4-D NIfTI; with --bvals, --bvecs, "
        "--mask): truth = its fit (--model, --truth-method), smoothed (--smooth); its "
        "acquisition, mask and affine; tissue classes from a tensor fit."),
    model: str = typer.Option("msdki", help="--like: the model whose fit is the truth."),
    mask: Path | None = typer.Option(None, help="--like: the scan's brain mask."),
    smooth: float = typer.Option(1.0, help="--like: Gaussian smoothing of the truth (voxels)."),
    noise_factor: float | None = typer.Option(
        None, help="--like: noise = the scan's own σ (from its b=0 volumes) times this, "
        "instead of --snr."),
    max_b: float | None = typer.Option(
        None, help="--like: keep only the volumes with b at most this (s/mm²)."),
    truth_method: str = typer.Option("lsq", help="--like: the method whose fit is the truth."),
    scheme: str | None = typer.Option(
        None, help="hcp (18 b0 + 3×90) | clinical (2 b0 + 3×10) | ivim (2 b0 + 13 b-values × 3, "
        "8 of them ≤ 200 s/mm²) | mese-16, mese-32 (echoes every 10 ms) | mgre-6, mgre-12 | "
        "ir-4, ir-10 (inversion times) | vfa-2, vfa-6 (flip angles, TR 15 ms); default: the "
        "preset's."),
    bvals: Path | None = typer.Option(None, help="Use this FSL bval file as the scheme."),
    bvecs: Path | None = typer.Option(None, help="FSL bvec file (with --bvals)."),
    snr: float = typer.Option(20.0, help="Signal-to-noise ratio relative to S0 (--like: to the "
                              "median S0 of the truth)."),
    noise: Noise = typer.Option(Noise.gaussian, help="Noise model."),
    n_voxels: int | None = typer.Option(None, help="Voxels (default: the preset's, 10,000)."),
    layout: str = typer.Option(
        "mixture", help="mixture: voxels drawn independently, one slice; brain: a brain-shaped "
        "grid with spatially smooth tissue classes (for scale benchmarks)."),
    grid: str = typer.Option("145,174,145", help="--layout brain: grid size X,Y,Z (HCP's)."),
    seed: int = typer.Option(0, help="Random seed."),
    force: bool = typer.Option(False, help="Overwrite existing files."),
    quiet: bool = typer.Option(False, help="Print nothing but errors."),
) -> None:
    """Simulate a scan with known truth.

    Examples: mixmap simulate sim/ --preset paper-msdki --snr 20

      mixmap simulate brain/ --preset ball-stick --layout brain --grid 72,87,72

      mixmap simulate ph/ --like dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --mask mask.nii.gz
      --model msdki --snr 20 --noise rician
    """
    from mixmap.simulation import get_scheme, simulate_brain, write_simulation
    from mixmap.simulation import simulate as run_simulation

    setup_logging(quiet)
    if (bvals is None) != (bvecs is None):
        raise ValueError("give both --bvals and --bvecs, or neither (then --scheme is used)")
    if like is not None:
        sim = _phantom(like, bvals, bvecs, mask, model, smooth=smooth, snr=snr,
                       noise_factor=noise_factor, noise=noise.value, seed=seed,
                       max_b=max_b, truth_method=truth_method)
        write_simulation(sim, out, force=force)
        if not quiet:
            counts = ", ".join(f"{k} {v}" for k, v in sim.info["tissue_classes"]["counts"]
                               .items())
            typer.echo(f"wrote a {model} phantom of {like} to {out}/: {sim.signals.shape[0]} "
                       f"voxels × {sim.acquisition.n} measurements, {noise.value} noise "
                       f"σ = {sim.sigma:.4g} (b0 SNR {sim.snr:.1f}); {counts}")
        return
    from mixmap.simulation import get_preset

    acq = get_scheme((str(bvals), str(bvecs)) if bvals else scheme or get_preset(preset).scheme)
    if layout == "brain":
        sim = simulate_brain(preset, acq, shape=parse_grid(grid), snr=snr, noise=noise.value,
                             seed=seed)
    elif layout == "mixture":
        sim = run_simulation(preset, acq, snr=snr, noise=noise.value, n_voxels=n_voxels,
                             seed=seed)
    else:
        raise ValueError(f"--layout {layout!r}: choose mixture or brain")
    write_simulation(sim, out, force=force)
    if not quiet:
        typer.echo(f"wrote {sim.signals.shape[0]} voxels × {acq.n} measurements to {out}/")
