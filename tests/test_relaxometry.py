"""A relaxometry model through the fitters: mono-exponential T2 over echo times, simulated with
three tissue-like T2 classes, recovered by least squares and by vae-gmm."""

from __future__ import annotations

import numpy as np
import pytest

from mixmap.acquisition import multi_echo_scheme
from mixmap.fitting import get_fitter

#: T2 (ms) mean and spread of white-matter-, grey-matter- and CSF-like voxels.
CLASSES = ((70.0, 5.0), (95.0, 8.0), (400.0, 30.0))


@pytest.fixture(scope="module")
def t2_scan():
    acq = multi_echo_scheme()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1500)
    t2 = np.array([rng.normal(*CLASSES[k]) for k in labels]).clip(20, 490)
    s0 = 800.0
    clean = s0 * np.exp(-acq.field("TE")[None] / t2[:, None])
    y = (clean + rng.normal(0, s0 / 50, clean.shape)).astype(np.float32)
    return y, acq, t2, labels, s0


@pytest.mark.parametrize("method, options, bounds", [
    ("lsq", {}, (3.0, 4.0, 40.0)),
    ("vae-gmm", {"epochs": 15}, (3.0, 4.0, 45.0)),
])
def test_t2_recovered_per_class(t2_scan, method, options, bounds):
    y, acq, t2, labels, s0 = t2_scan
    res = get_fitter(method, "t2", **options).fit(y, acq)
    err = res.params["T2"] - t2
    for k, bound in enumerate(bounds):
        rmse = float(np.sqrt(np.mean(err[labels == k] ** 2)))
        assert rmse < bound, (method, k, rmse)
    assert abs(float(np.median(res.params["S0"])) / s0 - 1) < 0.02
