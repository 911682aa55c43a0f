"""``mixmap fit``: a scan, or a cohort of scans, -> parameter maps
(:func:`mixmap.pipeline.fit_inputs`)."""

from __future__ import annotations

from pathlib import Path

import typer

from mixmap.cli.common import (
    COHORT_HELP,
    MASK_PATTERN_HELP,
    Device,
    build_fitter,
    handle_errors,
    parse_bounds,
    setup_logging,
)

#: The learned fitters' hyper-parameter options of ``fit``, in the order of their block in its
#: signature; each goes to the fitter only when given, and only if the method takes it.
LEARNED_OPTIONS = ("config", "latent_dim", "n_components", "hidden", "epochs", "batch_size",
                   "lr", "kl_weight", "likelihood", "n_samples", "refine_steps", "eb_rounds",
                   "eb_grid", "precision")


@handle_errors
def fit(
    dwi: list[Path] = typer.Argument(..., help=COHORT_HELP),
    bvals: Path | None = typer.Option(
        None, help="FSL bval file (s/mm²; ms/µm² is detected). Cohort: optional, the same for "
        "all scans (default: each scan's sibling x_dwi.bval)."),
    bvecs: Path | None = typer.Option(
        None, help="FSL bvec file (3 rows, or 3 columns). Cohort: like --bvals."),
    mask: Path | None = typer.Option(None, help="3-D brain mask on the DWI grid (one scan)."),
    mask_pattern: str | None = typer.Option(None, help=MASK_PATTERN_HELP),
    model: str = typer.Option("msdki", help="Signal model (see `mixmap models`)."),
    method: str = typer.Option("lsq", help="lsq | ssl | vae | vae-gmm"),
    out: Path = typer.Option(..., help="Output folder for the maps."),
    device: Device = typer.Option(Device.cpu, help="auto | cpu | cuda | mps"),
    seed: int = typer.Option(0, help="Random seed (same seed, same maps on CPU)."),
    force: bool = typer.Option(False, help="Overwrite existing maps."),
    quiet: bool = typer.Option(False, help="No progress bar or messages."),
    save_model: bool = typer.Option(True, help="Learned: save the trained model in --out."),
    train_voxels: int | None = typer.Option(
        None, help="Cohort: the most voxels held in memory to train the shared model "
        "(default 2,000,000); a larger cohort trains on an equal random share of each scan "
        "and then maps the scans one at a time."),
    resume: bool = typer.Option(
        False, help="Learned: continue an interrupted training from its checkpoint in --out."),
    # ---- learned fitters' hyper-parameters: one block, the names in LEARNED_OPTIONS --------
    config: str | None = typer.Option(None, help="Learned: 'default' or 'paper'."),
    latent_dim: int | None = typer.Option(None, help="Learned: latent dimension."),
    n_components: int | None = typer.Option(None, help="vae-gmm: mixture components."),
    hidden: int | None = typer.Option(None, help="Learned: hidden width."),
    epochs: int | None = typer.Option(None, help="Learned: maximum epochs."),
    batch_size: int | None = typer.Option(None, help="Learned: mini-batch size."),
    lr: float | None = typer.Option(None, help="Learned: Adam learning rate."),
    kl_weight: float | None = typer.Option(None, help="Learned: KL weight (1 = true ELBO)."),
    likelihood: str | None = typer.Option(None, help="Learned: gaussian | rician."),
    n_samples: int | None = typer.Option(None, help="Learned: posterior samples per voxel."),
    refine_steps: int | None = typer.Option(
        None, help="vae, vae-gmm: per-voxel refinement steps of q before the maps (default "
        "100; fewer is faster, 0 = the encoder's q alone)."),
    eb_rounds: int | None = typer.Option(
        None, help="vae-gmm: empirical-Bayes rounds that refit the mixture prior to the scan "
        "after training (default 6; 0 = the prior the ELBO learned)."),
    eb_grid: bool | None = typer.Option(
        None, "--eb-grid/--no-eb-grid", help="vae-gmm: end the empirical-Bayes refit on a grid "
        "(marginal likelihood by quadrature; MSDKI and other models with at most two "
        "parameters besides S0, Gaussian or Rician likelihood; default on)."),
    precision: str | None = typer.Option(
        None, help="vae, vae-gmm: the encoder network's arithmetic, float32 (default) or "
        "bfloat16 / float16 mixed precision (physics and posterior stay float32)."),
    # ---- least squares ---------------------------------------------------------------------
    bounds: list[str] | None = typer.Option(
        None, help="lsq: NAME=LOWER,UPPER fits NAME within that range (repeatable; inside the "
        "declared range, see `mixmap models`). MSDKI's default is K=0,4 (non-negative "
        "kurtosis); --bounds K=-0.5,4 fits the declared range."),
) -> None:
    """Fit a model to a DWI scan, or one shared model to a cohort of scans, and write parameter
    maps (+ std maps, sidecars).

    A cohort (several scans, or a BIDS folder) must share one acquisition; each scan is
    normalised by its own signal scale, one model is fitted on all voxels, and each subject's
    maps go to OUT/sub-<label>/dwi/ (OUT/sub-<label>/ses-<label>/dwi/ with a session), the
    model to OUT/model-<m>_method-<method>/, a summary to OUT/cohort.json.

    Examples:

      mixmap fit dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --mask mask.nii.gz
      --model msdki --method lsq --out maps/

      mixmap fit dwi.nii.gz --bvals dwi.bval --bvecs dwi.bvec --model ball-stick
      --method vae-gmm --out maps/ --device cuda

      mixmap fit bids/ --model msdki --method vae-gmm --out bids/derivatives/mixmap/

      mixmap fit sub-01_dwi.nii.gz sub-02_dwi.nii.gz --method vae --out maps/
    """
    given = locals()
    from mixmap import pipeline
    from mixmap.models import get_model

    setup_logging(quiet)
    get_model(model)
    options = {name: given[name] for name in LEARNED_OPTIONS}
    options.update(bounds=parse_bounds(bounds), device=device.value, seed=seed, quiet=quiet)
    fitter = build_fitter(method, model, options)
    written = pipeline.fit_inputs(fitter, dwi, bvals=bvals, bvecs=bvecs, mask=mask,
                                  mask_pattern=mask_pattern, out=out, seed=seed, force=force,
                                  save_model=save_model, resume=resume,
                                  train_voxels=train_voxels)
    if not quiet and written.maps:
        typer.echo(written.summary(out))
