"""DTI and DKI: recovery of the derived maps, agreement with dipy, the uncertainty of derived
maps, what each scheme allows, and the files a fit writes."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from mixmap.acquisition import Acquisition, hcp_scheme
from mixmap.fitting import get_fitter
from mixmap.models import UnsupportedAcquisition, get_model
from mixmap.models.diffusion import tensor as T

SNR = 30.0


def single_shell() -> Acquisition:
    """HCP's b=0 volumes and its 90 directions at b = 1000 s/mm²."""
    acq = hcp_scheme()
    return acq.subset(np.flatnonzero(acq.bvals < 1.5))


def tensors(n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Tissue-like tensors (eigenvalues 0.2-1.8 µm²/ms, random orientation) as parameters."""
    ev = np.sort(rng.uniform(0.2, 1.8, (n, 3)), 1)[:, ::-1]
    R = np.linalg.qr(rng.standard_normal((n, 3, 3)))[0]
    L = np.linalg.cholesky(np.einsum("nij,nj,nkj->nik", R, ev, R))
    out = {name: torch.tensor(L[:, i, j]) for name, i, j in T.CHOLESKY}
    out["S0"] = torch.full((n,), 1000.0, dtype=torch.float64)
    return out


def two_compartment(acq: Acquisition, n: int, rng: np.random.Generator) -> np.ndarray:
    """Noise-free signals (n, m) of a stick-like axon compartment plus a hindered one: a
    non-Gaussian signal with kurtosis, as in white and grey matter."""
    f = rng.uniform(0.2, 0.6, n)
    dx = rng.uniform(0.6, 1.2, n)
    axis = np.linalg.qr(rng.standard_normal((n, 3, 3)))[0][:, :, 0]
    b, g = acq.bvals, acq.bvecs
    c2 = (axis @ g.T) ** 2
    return 1000.0 * (f[:, None] * np.exp(-b * (2.0 * c2 + 0.05 * (1 - c2)))
                     + (1 - f[:, None]) * np.exp(-b * dx[:, None] * (1 + 0.5 * c2)))


def noisy(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = 1000.0 / SNR
    return (clean + rng.normal(0, sigma, clean.shape)).astype(np.float32)


def test_dti_lsq_recovers_the_tensor_maps_with_calibrated_sd():
    rng = np.random.default_rng(0)
    model, acq = get_model("dti"), single_shell()
    truth = tensors(600, rng)
    y = noisy(model.forward(truth, acq).numpy(), rng)
    want = model.derive(truth)
    res = get_fitter("lsq", "dti").fit(y, acq)
    assert "Lxx" in res.params and "Lxx" not in res.maps()  # fitted, not written
    for name, bound in (("fa", 0.03), ("md", 0.02), ("ad", 0.05), ("rd", 0.03)):
        err = res.params[name] - want[name].numpy()
        assert np.sqrt(np.mean(err**2)) < bound, name
        z = err / res.std[name]
        assert 0.8 < np.std(z) < 1.25, name  # the delta method's sd fits the scatter
    cos = np.abs((res.params["v1"] * want["v1"].numpy()).sum(1))
    assert np.median(np.degrees(np.arccos(np.clip(cos, 0, 1)))) < 5


def test_dti_agrees_with_dipy():
    gradients = pytest.importorskip("dipy.core.gradients")
    dti = pytest.importorskip("dipy.reconst.dti")
    rng = np.random.default_rng(1)
    model, acq = get_model("dti"), single_shell()
    y = noisy(model.forward(tensors(400, rng), acq).numpy(), rng)
    ours = get_fitter("lsq", "dti").fit(y, acq)
    gtab = gradients.gradient_table(acq.bvals * 1000.0, bvecs=acq.bvecs)
    theirs = dti.TensorModel(gtab, fit_method="NLLS").fit(y.astype(np.float64))
    assert np.median(np.abs(ours.params["fa"] - theirs.fa)) < 0.005
    assert np.median(np.abs(ours.params["md"] - theirs.md * 1000.0)) < 0.005


def test_dki_lsq_recovers_kurtosis_and_agrees_with_dipy():
    rng = np.random.default_rng(2)
    acq = hcp_scheme()
    clean = two_compartment(acq, 300, rng)
    y = noisy(clean, rng)
    res = get_fitter("lsq", "dki").fit(y, acq)
    exact = get_fitter("lsq", "dki").fit(clean.astype(np.float32), acq)  # noise-free fit
    for name, bound in (("fa", 0.05), ("md", 0.05), ("mk", 0.12), ("rk", 0.2)):
        err = res.params[name] - exact.params[name]
        assert np.sqrt(np.mean(err**2)) < bound, name
    assert 0.3 < np.median(exact.params["mk"]) < 1.5  # the compartments give kurtosis
    dki = pytest.importorskip("dipy.reconst.dki")
    gradients = pytest.importorskip("dipy.core.gradients")
    gtab = gradients.gradient_table(acq.bvals * 1000.0, bvecs=acq.bvecs)
    theirs = dki.DiffusionKurtosisModel(gtab, fit_method="WLS").fit(clean)
    # noise-free: both fit the same model; the remaining gap is MK's averaging (100
    # directions here, dipy's closed form)
    mk = theirs.mk(min_kurtosis=-3 / 7, max_kurtosis=10)
    assert np.median(np.abs(exact.params["mk"] - mk)) < 0.02
    assert np.median(np.abs(exact.params["fa"] - theirs.fa)) < 0.01


def test_learned_fitter_gives_derived_maps_as_posterior_moments():
    rng = np.random.default_rng(3)
    model, acq = get_model("dti"), single_shell()
    truth = tensors(300, rng)
    y = noisy(model.forward(truth, acq).numpy(), rng)
    res = get_fitter("vae", "dti", epochs=30, n_samples=32, refine_steps=5, seed=0).fit(y, acq)
    want = model.derive(truth)
    for name in ("fa", "md"):
        assert res.std[name].shape == (300,) and (res.std[name] > 0).all()
        err = res.params[name] - want[name].numpy()
        assert np.sqrt(np.mean(err**2)) < 0.06, name


def test_schemes_each_model_refuses_or_warns(caplog):
    axes = np.repeat(np.eye(3), 4, 0)
    few = Acquisition.from_arrays(np.r_[0.0, np.full(12, 1000.0)],
                                  np.r_[np.zeros((1, 3)), axes], units="s/mm2")
    with pytest.raises(UnsupportedAcquisition, match="determine 3 of its 6 elements"):
        get_model("dti").check_acquisition(few)
    with pytest.raises(UnsupportedAcquisition, match="at least 2 non-zero b-value shells"):
        get_model("dki").check_acquisition(single_shell())
    clinical = Acquisition.from_arrays(
        np.r_[0.0, np.full(10, 1000.0), np.full(10, 2000.0)],
        np.r_[np.zeros((1, 3)), hcp_scheme().bvecs[18:28], hcp_scheme().bvecs[18:28]],
        units="s/mm2")
    with pytest.raises(UnsupportedAcquisition, match="kurtosis tensor; this scheme's "
                                                     "directions determine"):
        get_model("dki").check_acquisition(clinical)  # 10 directions: W needs 15
    with caplog.at_level(logging.WARNING):
        get_model("dti").check_fit(hcp_scheme(), "dwi.nii.gz")
    assert "b = 2000, 3000 s/mm²" in caplog.text and "--max-b 1500" in caplog.text


def test_fit_cli_writes_fa_md_v1_and_not_the_factor(tmp_path):
    from typer.testing import CliRunner

    from mixmap.cli import app

    rng = np.random.default_rng(4)
    model, acq = get_model("dti"), single_shell()
    y = noisy(model.forward(tensors(60, rng), acq).numpy(), rng)
    vol = y.reshape(3, 4, 5, acq.n)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "dwi.nii.gz")
    acq.save_fsl(tmp_path / "dwi.bval", tmp_path / "dwi.bvec")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "dwi.nii.gz"), "--bvals",
                                 str(tmp_path / "dwi.bval"), "--bvecs",
                                 str(tmp_path / "dwi.bvec"), "--model", "dti", "--method",
                                 "lsq", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    names = {p.name for p in out.iterdir()}
    for param in ("fa", "md", "ad", "rd", "S0"):
        assert f"model-dti_param-{param}_dwimap.nii.gz" in names
        assert f"model-dti_param-{param}_desc-std_dwimap.nii.gz" in names
    assert nib.load(out / "model-dti_param-v1_dwimap.nii.gz").shape == (3, 4, 5, 3)
    assert not any("Lxx" in n for n in names)
    report = (out / "model-dti_report.html").read_text()
    assert "fractional anisotropy" in report and "Lxx" not in report
