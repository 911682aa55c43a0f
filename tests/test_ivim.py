"""IVIM made real: the body preset on its own clinical scheme, and the Bayes reference over its
three parameters."""

from __future__ import annotations

import numpy as np

from mixmap.evaluation import bayes
from mixmap.evaluation.bayes import bayes_reference, check_preset
from mixmap.fitting import get_fitter
from mixmap.models import get_model
from mixmap.simulation import get_preset, simulate


def test_ivim_preset_simulates_on_the_ivim_scheme_by_default():
    sim = simulate("ivim-body", snr=30, n_voxels=50, seed=0)
    assert sim.acquisition.source == "ivim"
    assert check_preset(get_preset("ivim-body"), get_model("ivim")) == ["f", "D", "Dstar"]


def test_bayes_reference_over_three_parameters_beats_lsq_and_is_calibrated(monkeypatch):
    # a coarser global grid than the default keeps the test short (the local grids resolve
    # what it misses)
    monkeypatch.setattr(bayes, "GRID_NODES_3D", 32)
    sim = simulate("ivim-body", snr=20, n_voxels=200, seed=1, noise="rician")
    ref = bayes_reference(sim.signals, sim.acquisition, "ivim-body", sim.sigma, "rician",
                          return_std=True)
    lsq = get_fitter("lsq", "ivim").fit(sim.signals, sim.acquisition)
    for p in ("f", "D", "Dstar"):
        err = ref[p] - sim.truth[p]
        assert np.sqrt(np.mean(err**2)) < np.sqrt(np.mean((lsq.params[p] - sim.truth[p]) ** 2))
        assert 0.8 < np.std(err / ref[f"{p}:std"]) < 1.25, p
