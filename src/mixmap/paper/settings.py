"""What a ``mixmap reproduce`` run does: :class:`Settings`, the :data:`FULL` and :data:`QUICK`
configurations, the methods and the display ranges every figure shares."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Methods in display order (the paper's columns).
ALL_METHODS = ("lsq", "ssl", "vae", "vae-gmm")
#: Real-data parameters shown per model (directions are scored separately).
REAL_PARAMS = {"ball-stick": ("f", "Dpar", "Diso"), "msdki": ("D", "K")}
#: Fixed display range per parameter, so every method shares one colour scale.
DISPLAY_RANGE = {"f": (0.0, 0.8), "Dpar": (0.0, 3.0), "Diso": (0.0, 3.0), "D": (0.0, 3.0),
                 "K": (0.0, 2.0)}


@dataclass
class Settings:
    """What a run does; ``QUICK`` and ``FULL`` below, or a modified copy (``overrides``)."""

    name: str = "full"
    seed: int = 0
    # 1. simulation
    n_sim: int = 10000
    snrs: tuple[float, ...] = (10.0, 20.0, 50.0)
    #: Epochs of the learned fitters (None: each fitter's own default and stopping rule).
    epochs: int | None = None
    #: Extra options for the learned fitters, used only where the fitter takes all of them.
    learned_options: dict = field(default_factory=dict)
    #: Options of least squares (e.g. fewer iterations in quick mode).
    lsq_options: dict = field(default_factory=dict)
    # 2. sensitivity
    sens_n: int = 10000
    sens_snr: float = 20.0
    sens_epochs: int | None = None
    latent_dims: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    kl_weights: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    #: Configuration of the learned fitter for the sweeps ("paper": a decoder from a latent
    #: space of any size; the default configuration fixes latent_dim to the parameter count).
    sens_config: str | None = "paper"
    #: Extra options of the learned fitter in the sweeps (where it takes all of them).
    sens_options: dict = field(default_factory=dict)
    #: Learned fitter of the sweeps: the first of these that runs.
    sens_methods: tuple[str, ...] = ("vae-gmm", "vae")
    # 3-4. real data
    dataset: str = "b1k_b2k"
    #: Fit at most this many voxels of the scan (a crop around the centre of the fullest
    #: slice); None: every voxel of the mask.
    real_crop: int | None = None
    #: Epochs of the learned fitters on real data and the phantom (None: as ``epochs``).
    real_epochs: int | None = None
    #: Gaussian smoothing of the phantom truth, standard deviation in voxels.
    phantom_smooth_vox: float = 1.0
    #: What was reduced relative to the brief's full configuration (shown in RESULTS.md).
    reductions: tuple[str, ...] = ()


FULL = Settings()
QUICK = Settings(
    name="quick", n_sim=1000, snrs=(20.0,), epochs=2,
    learned_options={"refine_steps": 0, "n_samples": 4, "min_epochs": 1,
                     "lsq_features": False},
    lsq_options={"max_iter": 10},
    sens_options={"n_samples": 4, "min_epochs": 1},
    sens_n=200, sens_epochs=1, latent_dims=(2, 8), kl_weights=(1e-2, 1.0), real_crop=150,
    reductions=("quick mode: 1,000 simulated voxels at SNR 20 only, 2 epochs, no per-voxel "
                "refinement, no least-squares encoder input, 4 posterior samples, 10 "
                "least-squares iterations, a 2-point sensitivity grid on 200 voxels, a crop of "
                "about 150 voxels of the real scan — for testing the pipeline, not for "
                "conclusions",),
)

__all__ = ["ALL_METHODS", "DISPLAY_RANGE", "FULL", "QUICK", "REAL_PARAMS", "Settings"]
