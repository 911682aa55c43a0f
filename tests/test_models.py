"""Contract tests: every registered signal model passes the same checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmap.acquisition import Acquisition, clinical_scheme, hcp_scheme
from mixmap.models import MODELS, UnsupportedAcquisition, get_model
from mixmap.models.diffusion import DiffusionModel

HCP = hcp_scheme()


def acq_for(model):
    """The acquisition the model is meant for (HCP for diffusion, low b-values for IVIM)."""
    return model.example_acquisition()


def small_acq_for(model):
    """A short acquisition for the float64 gradient checks: the model's own when short, the
    clinical diffusion scheme in place of HCP."""
    acq = acq_for(model)
    return acq if acq.n <= 64 else clinical_scheme()


def random_params(model, n, seed=0, dtype=torch.float32, spread=1.0):
    """Parameter values strictly inside the bounds (unbounded coordinates ~ N(0, spread²))."""
    g = torch.Generator().manual_seed(seed)
    u = spread * torch.randn(n, model.n_unbounded, generator=g, dtype=dtype)
    return model.split(u)


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return get_model(request.param)


def test_forward_shape_and_finite(model):
    ACQ = acq_for(model)
    params = random_params(model, 50)
    s = model.forward(params, ACQ)
    assert s.shape == (50, ACQ.n)
    assert torch.isfinite(s).all()


def test_declared_fields_and_reference_volumes(model):
    ACQ = acq_for(model)
    model.check_acquisition(ACQ)
    for name in model.required_fields:
        assert ACQ.has(name)
    ref = model.reference_volumes(ACQ)
    assert ref.shape == (ACQ.n,) and ref.dtype == bool
    groups = model.volume_groups(ACQ, exact=True)
    assert sorted(i for g in groups for i in g.indices) == list(range(ACQ.n))


def test_signal_at_b0_is_S0(model):
    if not isinstance(model, DiffusionModel):
        pytest.skip(f"{model.name} is not a diffusion model")
    ACQ = acq_for(model)
    params = random_params(model, 20)
    s = model.forward(params, ACQ)
    b0 = torch.as_tensor(model.reference_volumes(ACQ))
    torch.testing.assert_close(s[:, b0], params["S0"][:, None].expand(-1, int(b0.sum())))


def test_signal_proportional_to_scale_parameter(model):
    ACQ = acq_for(model)
    params = random_params(model, 10)
    scale = model.scale_parameter
    doubled = {**params, scale: 2 * params[scale]}
    torch.testing.assert_close(model.forward(doubled, ACQ), 2 * model.forward(params, ACQ))


def test_bounds_transform_round_trip(model):
    params = random_params(model, 30, dtype=torch.float64)
    back = model.split(model.join(params))
    for p in model.parameters:
        torch.testing.assert_close(back[p.name], params[p.name], rtol=1e-6, atol=1e-8)
        assert p.contains(params[p.name]).all()


def test_extreme_unbounded_values_stay_in_bounds_and_finite(model):
    u = torch.tensor([[-50.0] * model.n_unbounded, [50.0] * model.n_unbounded])
    params = model.split(u)
    for p in model.parameters:
        if not p.is_direction:
            assert ((params[p.name] >= p.lower) & (params[p.name] <= p.upper)).all()
    s = model.forward(params, acq_for(model))
    assert torch.isfinite(s).all()


def test_gradcheck_float64(model):
    # a moderate spread: DKI's signal at the far ends of W's range is ~1e7·S0, where finite
    # differences are round-off
    params = random_params(model, 3, seed=1, dtype=torch.float64, spread=0.5)
    u = model.join(params).detach().requires_grad_(True)

    small = small_acq_for(model)  # a few measurements keep the float64 gradcheck fast

    def f(uu):
        return model.forward(model.split(uu), small)

    assert torch.autograd.gradcheck(f, (u,), eps=1e-6, atol=1e-5)


def test_parameters_declared(model):
    names = model.parameter_names
    assert names[0] == model.scale_parameter and model.parameter(names[0]).scaled
    assert len(set(names)) == len(names)
    for p in model.parameters:
        assert p.unit and p.description


def test_initial_estimates_inside_bounds(model):
    ACQ = acq_for(model)
    params = random_params(model, 200, seed=2)
    y = model.forward(params, ACQ)
    init = model.initial_estimates(y, ACQ)
    for p in model.parameters:
        assert p.contains(init[p.name]).all(), p.name


# ----------------------------------------------------------------- numpy reference values
def test_msdki_reference_value():
    m = get_model("msdki")
    p = {"S0": torch.tensor([2.0]), "D": torch.tensor([1.2]), "K": torch.tensor([0.8])}
    b = HCP.bvals
    expected = 2.0 * np.exp(-b * 1.2 + b**2 * 1.2**2 * 0.8 / 6)
    np.testing.assert_allclose(m.forward(p, HCP)[0].numpy(), expected, rtol=1e-5)


def test_msdki_stays_finite_where_exponent_blows_up():
    """D·K at the upper bounds gives an exponent near 100 at b=3: must stay finite with a
    usable gradient, and equal exp() where the exponent is modest (signal above S0 allowed)."""
    m = get_model("msdki")
    D = torch.tensor([4.0, 1.3], requires_grad=True)
    p = {"S0": torch.ones(2), "D": D, "K": torch.tensor([4.0, 2.0])}
    s = m.forward(p, HCP)
    assert torch.isfinite(s).all()
    s.sum().backward()
    assert torch.isfinite(D.grad).all() and D.grad.abs().sum() > 0
    b = torch.as_tensor(HCP.bvals, dtype=torch.float32)
    exact = torch.exp(-b * 1.3 + b**2 * 1.3**2 * 2.0 / 6)
    assert exact.max() > 1.0  # the white-matter-like case where S(b=3000) > S0
    torch.testing.assert_close(s[1].detach(), exact, rtol=1e-4, atol=1e-6)


def test_ball_stick_reference_value():
    m = get_model("ball-stick")
    n = np.array([0.0, 0.6, 0.8])
    p = {"S0": torch.tensor([1.5]), "f": torch.tensor([0.4]), "Dpar": torch.tensor([1.8]),
         "Diso": torch.tensor([0.9]), "n": torch.tensor(n[None], dtype=torch.float32)}
    b, g = HCP.bvals, HCP.bvecs
    expected = 1.5 * (0.4 * np.exp(-b * 1.8 * (g @ n) ** 2) + 0.6 * np.exp(-b * 0.9))
    np.testing.assert_allclose(m.forward(p, HCP)[0].numpy(), expected, rtol=1e-5)


def test_ivim_reference_value():
    m = get_model("ivim")
    p = {"S0": torch.tensor([1.0]), "f": torch.tensor([0.1]), "D": torch.tensor([0.8]),
         "Dstar": torch.tensor([20.0])}
    b = HCP.bvals
    expected = 0.1 * np.exp(-b * 20) + 0.9 * np.exp(-b * 0.8)
    np.testing.assert_allclose(m.forward(p, HCP)[0].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_t2_reference_value():
    m = get_model("t2")
    acq = Acquisition.from_fields({"TE": [10.0, 40.0, 80.0]})
    p = {"S0": torch.tensor([3.0]), "T2": torch.tensor([60.0])}
    expected = 3.0 * np.exp(-np.array([10.0, 40.0, 80.0]) / 60.0)
    np.testing.assert_allclose(m.forward(p, acq)[0].numpy(), expected, rtol=1e-6)
    assert m.reference_volumes(acq).tolist() == [True, False, False]


def test_unsupported_acquisitions_are_named():
    one_shell = Acquisition.from_arrays([0, 1000, 1000, 1000],
                                        np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    with pytest.raises(UnsupportedAcquisition, match="MSDKI needs at least 2"):
        get_model("msdki").check_acquisition(one_shell)
    no_dirs = Acquisition.from_arrays([0, 1000, 2000])
    with pytest.raises(UnsupportedAcquisition, match="ball-stick needs at least 6"):
        get_model("ball-stick").check_acquisition(no_dirs)
    with pytest.raises(UnsupportedAcquisition, match=r"model t2 needs echo time \(TE\)"):
        get_model("t2").check_acquisition(HCP)
    with pytest.raises(UnsupportedAcquisition, match=r"model msdki needs diffusion weighting"):
        get_model("msdki").check_acquisition(Acquisition.from_fields({"TE": [10.0, 20.0]}))
    with pytest.raises(UnsupportedAcquisition, match="t2 needs at least 2 distinct echo"):
        get_model("t2").check_acquisition(Acquisition.from_fields({"TE": [10.0, 10.0]}))


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="choose one of: msdki, ball-stick, dti, dki, noddi, ivim"):
        get_model("dti2")


def test_analytic_jacobian_matches_autodiff(model):
    """Where a model gives analytic derivatives, they equal forward-mode AD (float64)."""
    ACQ = acq_for(model)
    params = random_params(model, 20, seed=3, dtype=torch.float64)
    u = model.join(params)
    got = model.unbounded_jacobian(u, ACQ)
    if got is None:
        pytest.skip(f"{model.name} has no analytic Jacobian (AD is used)")
    from mixmap.fitting.lsq import batched_jacobian

    value, jac = batched_jacobian(lambda uu: model.forward(model.split(uu), ACQ), u)
    torch.testing.assert_close(got[0], value)
    torch.testing.assert_close(got[1], jac, rtol=1e-7, atol=1e-9)


def test_fused_normal_equations_match_autodiff(model):
    """Where a model forms JᵀJ and Jᵀr itself, they equal those of the forward-mode AD
    Jacobian (float64), with and without measurement weights, off the unit sphere too."""
    ACQ = acq_for(model)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(30, model.n_unbounded, generator=g, dtype=torch.float64)
    y = model.forward(model.split(u + 0.2 * torch.randn(u.shape, generator=g,
                                                         dtype=torch.float64)), ACQ)
    if model.normal_equations(u, y, ACQ) is None:
        pytest.skip(f"{model.name} has no fused normal equations")
    from mixmap.fitting.lsq import batched_jacobian

    s, J = batched_jacobian(lambda uu: model.forward(model.split(uu), ACQ), u)
    sw = torch.rand(ACQ.n, generator=g, dtype=torch.float64) + 0.5
    for w in (None, sw):
        r = (s - y) * (1 if w is None else w)
        Jw = J * (1 if w is None else w[:, None])
        cost, A, grad = model.normal_equations(u, y, ACQ, w)
        torch.testing.assert_close(cost, (r * r).sum(1))
        torch.testing.assert_close(A, Jw.transpose(1, 2) @ Jw, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(grad, (Jw.transpose(1, 2) @ r[..., None])[..., 0],
                                   rtol=1e-9, atol=1e-9)


def test_ball_stick_start_direction():
    """The start's stick direction is near the truth in tissue (tensor-fit candidate), and where
    f ≈ 0.03 the high-b candidate makes it better than the tensor fit alone."""
    from mixmap.models.diffusion.ball_stick import tensor_direction
    from mixmap.simulation import simulate

    sim = simulate("ball-stick", "hcp", snr=50, n_voxels=2000, seed=1)
    y = torch.as_tensor(sim.signals)
    start = get_model("ball-stick").initial_estimates(y, sim.acquisition)

    def angle(n):
        cos = np.abs((n * sim.truth["n"]).sum(1))
        return np.degrees(np.arccos(np.clip(cos, 0, 1)))

    err = angle(start["n"].numpy())
    assert np.median(err[sim.labels == 0]) < 0.5
    assert np.median(err[sim.labels == 1]) < 1.5
    csf = sim.labels == 2
    tensor_only = angle(tensor_direction(y, sim.acquisition).numpy())
    assert np.median(err[csf]) < 0.8 * np.median(tensor_only[csf])
