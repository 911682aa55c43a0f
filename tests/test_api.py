"""The Python API (mixmap.fit / apply / load_model): files, nibabel images, arrays and dipy
gradient tables give the same maps as the command line, and save writes what it writes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

import mixmap
from mixmap.acquisition import Acquisition
from mixmap.cli import app


def files(d):
    return dict(bvals=d / "dwi.bval", bvecs=d / "dwi.bvec", mask=d / "mask.nii.gz")


def test_files_images_arrays_and_gradient_tables_give_the_cli_maps(scan, tmp_path):
    from dipy.core.gradients import gradient_table

    by_files = mixmap.fit(scan / "dwi.nii.gz", **files(scan), method="lsq")
    img, mask = nib.load(scan / "dwi.nii.gz"), nib.load(scan / "mask.nii.gz")
    acq = Acquisition.from_fsl(scan / "dwi.bval", scan / "dwi.bvec")
    by_image = mixmap.fit(img, acq, mask=mask, method="lsq")
    gtab = gradient_table(np.loadtxt(scan / "dwi.bval"), bvecs=np.loadtxt(scan / "dwi.bvec"))
    by_array = mixmap.fit(np.asarray(img.dataobj), gtab, mask=np.asarray(mask.dataobj),
                          affine=img.affine, method="lsq")
    by_tuple = mixmap.fit(np.asarray(img.dataobj), (np.loadtxt(scan / "dwi.bval"),
                                                    np.loadtxt(scan / "dwi.bvec")),
                          mask=np.asarray(mask.dataobj), method="lsq")
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["fit", str(scan / "dwi.nii.gz"), "--bvals",
                                 str(scan / "dwi.bval"), "--bvecs", str(scan / "dwi.bvec"),
                                 "--mask", str(scan / "mask.nii.gz"), "--model", "msdki",
                                 "--method", "lsq", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    cli_d = nib.load(out / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    for f in (by_files, by_image, by_array, by_tuple):
        assert f.maps["D"].shape == img.shape[:3]
        np.testing.assert_array_equal(np.isnan(f.maps["D"]), np.isnan(cli_d))
        np.testing.assert_allclose(f.maps["D"], cli_d, rtol=1e-6, equal_nan=True)
        assert set(f.std) == {"S0", "D", "K"}
    saved = by_array.save(tmp_path / "api")
    names = {p.name for p in (tmp_path / "api").iterdir()}
    assert names == {p.name for p in out.iterdir()}
    assert {p.name for p in saved} <= names
    back = nib.load(tmp_path / "api" / "model-msdki_param-D_dwimap.nii.gz")
    np.testing.assert_allclose(back.affine, img.affine)


def test_predict_gives_the_signal_of_the_maps(scan):
    fit = mixmap.fit(scan / "dwi.nii.gz", **files(scan), method="lsq")
    pred = fit.predict()
    data = np.asarray(nib.load(scan / "dwi.nii.gz").dataobj, dtype=np.float64)
    inside = fit.data.mask
    assert pred.shape == data.shape and np.isnan(pred[~inside]).all()
    residual = (data[inside] - pred[inside]).std()
    assert 0.8 < residual / fit.noise_sigma < 1.25  # the fit leaves the noise, no more


def test_learned_fit_saves_loads_and_applies_to_the_same_maps(scan, tmp_path):
    opts = dict(epochs=6, min_epochs=2, eb_rounds=1, refine_steps=5, n_samples=32)
    fit = mixmap.fit(scan / "dwi.nii.gz", **files(scan), method="vae-gmm", **opts)
    assert fit.cluster is not None and fit.cluster.shape == fit.maps["D"].shape
    fit.save(tmp_path / "maps")
    model = mixmap.load_model(tmp_path / "maps" / "model-msdki_method-vae-gmm")
    again = mixmap.apply(model, nib.load(scan / "dwi.nii.gz"),
                         Acquisition.from_fsl(scan / "dwi.bval", scan / "dwi.bvec"),
                         mask=scan / "mask.nii.gz")
    for k in fit.maps:
        np.testing.assert_array_equal(again.maps[k], fit.maps[k])
    by_folder = mixmap.apply(tmp_path / "maps" / "model-msdki_method-vae-gmm",
                             scan / "dwi.nii.gz", **files(scan))
    np.testing.assert_array_equal(by_folder.maps["D"], fit.maps["D"])


@pytest.mark.parametrize("call, says", [
    (lambda d: mixmap.fit(d / "dwi.nii.gz", **files(d), method="lsq", epochs=3),
     "epochs: not an option of method lsq; it takes max_iter"),
    (lambda d: mixmap.fit(d / "dwi.nii.gz", method="lsq"), "no acquisition: give bvals"),
    (lambda d: mixmap.fit(np.ones((4, 4, 2, 5)), (np.zeros(3), np.zeros((3, 3)))),
     "array: 5 volumes but the acquisition has 3 measurements"),
    (lambda d: mixmap.fit(nib.load(d / "dwi.nii.gz"),
                          Acquisition.from_fsl(d / "dwi.bval", d / "dwi.bvec"),
                          mask=np.ones((2, 2, 2)), method="lsq"),
     "mask of shape (2, 2, 2) on a DWI grid"),
    (lambda d: mixmap.fit(np.ones((4, 4, 2, 3)), "dwi.bval"), "acquisition: got str"),
    (lambda d: mixmap.fit(d / "dwi.nii.gz", **files(d), method="nope"), "unknown method"),
])
def test_bad_calls_say_what_to_give(scan, call, says):
    with pytest.raises(ValueError, match=None) as info:
        call(scan)
    assert says in str(info.value)
