"""The Python API: fit a scan held in memory (numpy arrays, nibabel images, a dipy
``GradientTable``) or in files, read its maps as volumes, predict its signal, and save what
``mixmap fit`` writes; load a trained model and apply it to another scan.

    import mixmap
    fit = mixmap.fit("dwi.nii.gz", bvals="dwi.bval", bvecs="dwi.bvec", mask="mask.nii.gz",
                     model="msdki", method="vae-gmm")
    fit.maps["D"]          # (x, y, z) µm²/ms, NaN outside the mask
    fit.std["D"]           # its posterior standard deviation
    fit.save("maps/")      # what `mixmap fit` writes: maps, sidecars, report, the model

The command line loads, fits and writes through the same functions
(:func:`mixmap.io.load_dwi`, the fitters, :func:`mixmap.io.save_maps`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mixmap.acquisition import Acquisition
from mixmap.fitting import fitter_options, get_fitter, load_fitter
from mixmap.fitting.base import FitResult, Fitter
from mixmap.fitting.learned import LearnedFitter
from mixmap.io import AtomicOutput, DWIData, load_dwi, save_maps
from mixmap.io.naming import model_folder
from mixmap.io.nifti import dwi_from_array, load_image, vectors_to_volume
from mixmap.models import SignalModel, get_model

PathLike = str | Path


@dataclass
class Fit:
    """A fitted scan: the fitter's per-voxel :class:`~mixmap.fitting.FitResult`, the voxels it
    came from (:class:`~mixmap.io.DWIData`: mask, affine, header, acquisition) and the fitter
    (for a learned method, the trained model)."""

    result: FitResult
    data: DWIData
    fitter: Fitter

    @property
    def model(self) -> SignalModel:
        return get_model(self.result.model)

    @property
    def method(self) -> str:
        return self.result.method

    @property
    def noise_sigma(self) -> float | None:
        """The noise level the fit used or estimated, in the input's intensity units."""
        return self.result.noise_sigma

    def volume(self, values: np.ndarray) -> np.ndarray:
        """Per-voxel ``values`` (n,) or (n, k) as a float32 volume on the scan's grid, (x, y, z)
        or (x, y, z, k), NaN outside the fitted voxels."""
        return vectors_to_volume(np.asarray(values, dtype=np.float32), self.data.mask)

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """Parameter name -> volume in the units the model declares (``mixmap models``)."""
        return {k: self.volume(v) for k, v in self.result.params.items()}

    @property
    def std(self) -> dict[str, np.ndarray]:
        """Parameter name -> volume of its standard deviation (posterior for learned methods,
        asymptotic for lsq)."""
        return {k: self.volume(v) for k, v in self.result.std.items()}

    @property
    def cluster(self) -> np.ndarray | None:
        """The most likely mixture component per voxel (vae-gmm), a volume; else None."""
        c = self.result.clusters
        return None if c is None else self.volume(c.astype(np.float32))

    def predicted_signals(self, acquisition: Acquisition | None = None) -> np.ndarray:
        """(n_voxels, m) float64 signal of the model at each fitted voxel's estimates, for
        ``acquisition`` (default: the fitted one)."""
        acq = self.data.acquisition if acquisition is None else acquisition
        params = {k: torch.as_tensor(np.asarray(v, dtype=np.float64))
                  for k, v in self.result.params.items()}
        with torch.no_grad():
            return self.model.forward(params, acq).numpy()

    def predict(self, acquisition: Acquisition | None = None) -> np.ndarray:
        """(x, y, z, m) float32 signal of the model at the fitted maps, for ``acquisition``
        (default: the fitted one), NaN outside the fitted voxels."""
        return self.volume(self.predicted_signals(acquisition))

    def save(self, folder: PathLike, *, force: bool = False, save_model: bool = True,
             report: bool = True) -> list[Path]:
        """Write what ``mixmap fit`` writes into ``folder``: every map with the scan's affine
        and header, the JSON sidecars, ``*_fit.json``, for a learned method when
        ``save_model`` the trained model folder, and when ``report`` the HTML report
        (:mod:`mixmap.report`). Returns the map paths; an existing map is refused unless
        ``force``."""
        return save_maps(self.result, self.data, folder, force=force,
                         extras=lambda w: self.stage_extras(w, save_model=save_model,
                                                            report=report))

    def stage_extras(self, w: AtomicOutput, *, save_model: bool = True, report: bool = True,
                     command: str = "") -> None:
        """What a fit writes beside its maps, staged in the open
        :class:`~mixmap.io.AtomicOutput` that holds them (a failure, e.g. a full disk, leaves
        neither): a learned method's trained model (``save_model``) and the HTML report
        (``report``; ``command`` is the command line it shows)."""
        from mixmap.io.naming import report_name
        from mixmap.io.nifti import bids_entities
        from mixmap.report import write_report

        if save_model and isinstance(self.fitter, LearnedFitter):
            self.fitter.save(w.path(model_folder(self.result.model, self.result.method)))
        if report:
            write_report(self, w.path(report_name(bids_entities(self.data.path),
                                                  self.result.model)), command=command)

    def report(self, path: PathLike) -> Path:
        """Write the HTML report of this fit (:mod:`mixmap.report`) to ``path``."""
        from mixmap.report import write_report

        return write_report(self, path)


def fit(data, acquisition=None, *, bvals: PathLike | None = None,
        bvecs: PathLike | None = None, mask=None, model: str | SignalModel = "msdki",
        method: str = "vae-gmm", affine: np.ndarray | None = None, device: str = "cpu",
        seed: int = 0, quiet: bool = True, **options) -> Fit:
    """Fit ``model`` by ``method`` to a scan.

    ``data``: a 4-D DWI, as a path (.nii / .nii.gz), a nibabel image or an (x, y, z, m) array
    (``affine`` then says where it lies; identity by default). The acquisition, one of:
    ``bvals`` and ``bvecs`` FSL files (or ``bvals`` an MRtrix .b table); an
    :class:`~mixmap.acquisition.Acquisition`; a dipy ``GradientTable``; or a tuple (b-values
    (m,) in s/mm², directions (m, 3) or (3, m)). ``mask``: a path, image or 3-D array on the
    DWI grid (voxels > 0 fitted); None fits every voxel with a positive b=0 signal.
    ``options``: the method's hyper-parameters (e.g. ``epochs``, ``n_components``; see
    ``mixmap fit --help``), an unknown one is a ValueError naming the valid ones.
    """
    fitter = _fitter(method, model, device=device, seed=seed, quiet=quiet, **options)
    scan = load_scan(data, acquisition, bvals=bvals, bvecs=bvecs, mask=mask, affine=affine)
    fitter.model.check_fit(scan.acquisition, str(scan.path))
    return Fit(fitter.fit(scan.signals, scan.acquisition), scan, fitter)


def load_model(folder: PathLike, *, device: str = "cpu") -> LearnedFitter:
    """A trained model saved by :meth:`Fit.save` or ``mixmap fit`` (its
    ``model-<m>_method-<method>`` folder), ready for :func:`apply`."""
    return load_fitter(folder, device=device)


def apply(trained: LearnedFitter | PathLike, data, acquisition=None, *,
          bvals: PathLike | None = None, bvecs: PathLike | None = None, mask=None,
          affine: np.ndarray | None = None, allow_other_acquisition: bool = False,
          device: str = "cpu") -> Fit:
    """Map another scan with a trained model (a :func:`load_model` result or its folder),
    without training; the scan as for :func:`fit`. A scan of another acquisition is refused
    unless ``allow_other_acquisition``."""
    fitter = trained if isinstance(trained, LearnedFitter) else load_model(trained,
                                                                           device=device)
    scan = load_scan(data, acquisition, bvals=bvals, bvecs=bvecs, mask=mask, affine=affine)
    result = fitter.apply(scan.signals, scan.acquisition,
                          allow_other_acquisition=allow_other_acquisition)
    return Fit(result, scan, fitter)


def load_scan(data, acquisition=None, *, bvals: PathLike | None = None,
              bvecs: PathLike | None = None, mask=None, affine: np.ndarray | None = None
              ) -> DWIData:
    """The masked voxels of a scan given as for :func:`fit`. Files go through
    :func:`~mixmap.io.load_dwi` (the command line's checks and messages); arrays and images
    through :func:`~mixmap.io.nifti.dwi_from_array`, with the same rules for the mask, empty
    volumes and NaN voxels."""
    if acquisition is not None and bvals is not None:
        raise ValueError("give the acquisition either as an object or as bvals/bvecs files, "
                         "not both")
    files = isinstance(data, str | Path) and (mask is None or isinstance(mask, str | Path))
    if files and bvals is not None:
        return load_dwi(data, bvals, bvecs, mask)
    acq = _acquisition(acquisition, bvals, bvecs)
    source = "array"
    if isinstance(data, str | Path):
        source, data = str(data), load_image(data, "DWI")
    header = None
    if isinstance(data, nib.spatialimages.SpatialImage):
        affine, header = data.affine, data.header
        data = np.asarray(data.dataobj, dtype=np.float32)
    return dwi_from_array(np.asarray(data), acq, _mask_array(mask), affine=affine,
                          header=header, source=source)


def _acquisition(acquisition, bvals, bvecs) -> Acquisition:
    if isinstance(acquisition, Acquisition):
        return acquisition
    if acquisition is None:
        if bvals is None:
            raise ValueError("no acquisition: give bvals (and bvecs) files, an Acquisition, "
                             "a dipy GradientTable or a (bvals, bvecs) tuple")
        from mixmap.io.gradients import read_gradients

        return read_gradients(bvals, bvecs).acquisition
    if hasattr(acquisition, "bvals") and hasattr(acquisition, "bvecs"):  # dipy GradientTable
        return Acquisition.from_gradient_table(acquisition)
    if isinstance(acquisition, tuple) and len(acquisition) == 2:
        return Acquisition.from_arrays(np.asarray(acquisition[0]), np.asarray(acquisition[1]))
    raise ValueError(f"acquisition: got {type(acquisition).__name__}; give an Acquisition, a "
                     f"dipy GradientTable or a (bvals, bvecs) tuple")


def _mask_array(mask) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, str | Path):
        mask = load_image(mask, "mask")
    if isinstance(mask, nib.spatialimages.SpatialImage):
        mask = np.asarray(mask.dataobj)
    return np.asarray(mask)


def _fitter(method: str, model, **options) -> Fitter:
    """:func:`~mixmap.fitting.get_fitter`, with an unknown option named with the valid ones."""
    accepted, checks_own = fitter_options(method)
    if checks_own:
        return get_fitter(method, model, **options)
    wrong = [k for k in options if k not in accepted]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not an option of method {method}; it takes "
                         f"{', '.join(accepted)}")
    return get_fitter(method, model, **options)


__all__ = ["Fit", "apply", "fit", "load_model", "load_scan"]
