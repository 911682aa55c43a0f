"""Fitter contract: every registered fitter, on every registered model, passes the same checks
(maps for every parameter with the right shapes, inside the bounds, reproducible from the seed,
and, for learned fitters, the same maps after a save / load round trip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmap.fitting import FITTERS, get_fitter, load_fitter
from mixmap.fitting.learned import LearnedFitter
from mixmap.models import MODELS, get_model

N_VOXELS = 240
SCALE = 500.0  # signals in arbitrary scanner units, not near 1
#: Fast settings, each passed to the fitters that declare it.
FAST = {"epochs": 3, "n_samples": 16, "refine_steps": 3, "eb_rounds": 1, "eb_voxels": 500,
        "eb_samples": 32, "min_epochs": 1}


def fast_options(method: str) -> dict:
    cls = FITTERS[method]
    if not issubclass(cls, LearnedFitter):
        return {}
    return {k: v for k, v in FAST.items() if k in cls.hyper_names}


def scan(model, seed=0):
    """(signals, acquisition, truth) for ``model``: parameters spread inside their bounds,
    Gaussian noise of 3 % of the scale."""
    acq = model.example_acquisition()
    g = torch.Generator().manual_seed(seed)
    truth = model.split(0.7 * torch.randn(N_VOXELS, model.n_unbounded, generator=g))
    truth[model.scale_parameter] = torch.full((N_VOXELS,), SCALE)
    clean = model.forward(truth, acq)
    y = clean + 0.03 * SCALE * torch.randn(clean.shape, generator=g)
    return y.numpy().astype(np.float32), acq, truth


CASES = [(m, f) for m in sorted(MODELS) for f in FITTERS]


@pytest.fixture(scope="module")
def fits():
    """Each (model, method) fitted once, on demand."""
    cache: dict = {}

    def get(model_name, method, seed=0):
        key = (model_name, method, seed)
        if key not in cache:
            model = get_model(model_name)
            y, acq, _ = scan(model)
            fitter = get_fitter(method, model_name, seed=seed, **fast_options(method))
            cache[key] = (fitter, fitter.fit(y, acq), y, acq)
        return cache[key]

    return get


@pytest.mark.parametrize("model_name, method", CASES)
def test_maps_have_every_parameter_inside_its_bounds(fits, model_name, method):
    fitter, res, y, _ = fits(model_name, method)
    model = fitter.model
    assert set(res.params) == {p.name for p in model.parameters + model.derived}
    scale = res.settings["signal_scale"]
    for p in model.parameters + model.derived:
        v = np.asarray(res.params[p.name])
        assert v.shape == ((y.shape[0], 3) if p.is_direction else (y.shape[0],)), p.name
        assert np.isfinite(v).all(), p.name
        if p.is_direction:
            np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
            continue
        lo, hi = (p.lower * scale, p.upper * scale) if p.scaled else (p.lower, p.upper)
        assert (v >= lo - 1e-6 * abs(hi)).all() and (v <= hi + 1e-6 * abs(hi)).all(), p.name
    for name, sd in res.std.items():
        assert name in res.params
        assert np.shape(sd) == np.shape(res.params[name]), name
        assert (np.asarray(sd) >= 0).all(), name


@pytest.mark.parametrize("model_name, method", CASES)
def test_same_seed_same_maps(fits, model_name, method):
    _, first, y, acq = fits(model_name, method)
    again = get_fitter(method, model_name, seed=0, **fast_options(method)).fit(y, acq)
    for name, v in first.params.items():
        np.testing.assert_array_equal(again.params[name], v, err_msg=name)


@pytest.mark.parametrize("model_name, method",
                         [c for c in CASES if issubclass(FITTERS[c[1]], LearnedFitter)])
def test_saved_model_maps_the_same(fits, model_name, method, tmp_path):
    fitter, _, y, acq = fits(model_name, method)
    fitter.save(tmp_path / "model")
    loaded = load_fitter(tmp_path / "model")
    assert type(loaded) is type(fitter) and loaded.model.name == model_name
    want, got = fitter.apply(y, acq), loaded.apply(y, acq)
    for name, v in want.params.items():
        np.testing.assert_array_equal(got.params[name], v, err_msg=name)


def test_every_fitter_and_model_is_covered():
    assert {m for m, _ in CASES} == set(MODELS) and {f for _, f in CASES} == set(FITTERS)
