"""NODDI (Watson): the dispersed stick against direct integration over the sphere, the analytic
Jacobian against automatic differentiation, closed forms at the limits, noise-free recovery by
least squares, the scheme it needs, and its constants (set, refused, saved with a model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixmap.fitting import get_fitter, load_fitter
from mixmap.models import get_model
from mixmap.models.diffusion import noddi as N
from mixmap.models.diffusion.noddi import kappa_of, watson_moments


def sphere_average(beta: float, kappa: float, t: float, n: int = 1500) -> float:
    """E_W[exp(−β (g·n)²)] by brute force: Gauss–Legendre in cos θ about μ, uniform in φ."""
    u, wu = np.polynomial.legendre.leggauss(n)
    phi = np.linspace(0, 2 * np.pi, 128, endpoint=False)
    gn = t * u[:, None] + math.sqrt(1 - t * t) * np.sqrt(1 - u[:, None] ** 2) * np.cos(phi)
    dens = np.exp(kappa * (u**2 - 1)) * wu
    return float((np.exp(-beta * gn**2).mean(1) * dens).sum() / dens.sum())


@pytest.mark.parametrize("beta", [0.5, 1.7, 6.8])
@pytest.mark.parametrize("od", [0.02, 0.1, 0.4, 1.0])
def test_dispersed_stick_matches_integration_over_the_sphere(beta, od):
    kappa = kappa_of(torch.tensor([od], dtype=torch.float64))
    wl, _ = watson_moments(kappa)
    a = N.stick_coefficients(torch.tensor([beta], dtype=torch.float64))
    coef = N._series_coefficients(a, wl)
    for t in (0.0, 0.3, 0.8, 1.0):
        got, = N.legendre_series(torch.tensor([[t]], dtype=torch.float64), coef)
        assert float(got) == pytest.approx(sphere_average(beta, float(kappa), t), abs=1e-7)


def test_isotropic_limit_has_closed_forms():
    """od = 1 (κ = 0): the stick average is √(π/4β)·erf(√β) whatever the direction, and the
    zeppelin is isotropic with τ = 1/3."""
    m = get_model("noddi")
    acq = m.example_acquisition()
    n = 4
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, dtype=torch.float64), dim=1)
    p = {"S0": torch.ones(n, dtype=torch.float64), "icvf": torch.ones(n, dtype=torch.float64),
         "od": torch.ones(n, dtype=torch.float64), "isovf": torch.zeros(n, dtype=torch.float64),
         "direction": dirs}
    b = torch.as_tensor(acq.bvals, dtype=torch.float64)
    beta = (b * 1.7).clamp_min(1e-12)
    want = torch.where(b > 0, torch.sqrt(math.pi / (4 * beta)) * torch.erf(beta.sqrt()),
                       torch.ones_like(b))
    torch.testing.assert_close(m.forward(p, acq), want.expand(n, -1), atol=1e-9, rtol=0)
    _, tau = watson_moments(torch.zeros(1, dtype=torch.float64))
    assert float(tau) == pytest.approx(1 / 3, abs=1e-12)


def test_analytic_jacobian_equals_automatic_differentiation():
    m = get_model("noddi")
    acq = m.example_acquisition()
    u = torch.randn(6, m.n_unbounded, dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(1))
    _, J = m.unbounded_jacobian(u, acq)
    auto = torch.func.vmap(torch.func.jacfwd(
        lambda x: m.forward(m.split(x[None]), acq)[0]))(u)
    torch.testing.assert_close(J, auto, atol=1e-10, rtol=1e-8)


def noddi_truth(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return {"S0": torch.tensor(rng.uniform(400, 600, n)),
            "icvf": torch.tensor(rng.uniform(0.2, 0.8, n)),
            "od": torch.tensor(rng.uniform(0.05, 0.7, n)),
            "isovf": torch.tensor(rng.uniform(0.0, 0.4, n)), "direction": torch.tensor(d)}


def test_least_squares_recovers_noise_free_signals():
    m = get_model("noddi")
    acq = m.example_acquisition()
    truth = noddi_truth(150)
    y = m.forward(truth, acq).numpy()
    res = get_fitter("lsq", m).fit(y, acq)
    for name in ("icvf", "od", "isovf"):
        np.testing.assert_allclose(res.params[name], truth[name].numpy(), atol=1e-3,
                                   err_msg=name)
    cos = np.abs((res.params["direction"] * truth["direction"].numpy()).sum(1))
    assert np.degrees(np.arccos(np.clip(cos, 0, 1))).max() < 0.5


def test_single_shell_is_refused_with_the_reason():
    from mixmap.acquisition import Acquisition, fibonacci_sphere

    dirs = fibonacci_sphere(30)
    acq = Acquisition.from_arrays(np.r_[np.zeros(2), np.full(30, 1000.0)],
                                  np.r_[np.zeros((2, 3)), dirs])
    with pytest.raises(ValueError, match="at least 2 non-zero b-value shells.*has 1 \\(1000"):
        get_model("noddi").check_acquisition(acq)


def test_constants_change_the_signal_and_are_checked():
    m = get_model("noddi")
    acq = m.example_acquisition()
    p = {k: v[:3] for k, v in noddi_truth(3).items()}
    ex_vivo = m.with_constants({"dpar": 0.6})
    assert ex_vivo.constant("dpar") == 0.6 and m.constant("dpar") == 1.7
    assert not torch.allclose(ex_vivo.forward(p, acq), m.forward(p, acq))
    with pytest.raises(ValueError, match="no constant 'dperp'; its constants: dpar, diso"):
        m.with_constants({"dperp": 1.0})
    with pytest.raises(ValueError, match=r"constant dpar=-1: give a value in \(0, 4\]"):
        m.with_constants({"dpar": -1})


def test_a_saved_model_keeps_its_constants(tmp_path):
    m = get_model("noddi").with_constants({"dpar": 1.2, "diso": 2.5})
    acq = m.example_acquisition()
    y = m.forward(noddi_truth(200), acq).numpy().astype(np.float32)
    fitter = get_fitter("vae", m, epochs=2, min_epochs=1, n_samples=8, refine_steps=2)
    res = fitter.fit(y, acq)
    assert res.settings["constants"] == {"dpar": 1.2, "diso": 2.5}
    fitter.save(tmp_path / "model")
    loaded = load_fitter(tmp_path / "model")
    assert loaded.model.constant_values() == {"dpar": 1.2, "diso": 2.5}
    np.testing.assert_array_equal(loaded.apply(y, acq).params["icvf"],
                                  fitter.apply(y, acq).params["icvf"])
