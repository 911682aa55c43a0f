"""Shared fixtures: tiny simulated scans written as NIfTI, and torch limited to 2 threads."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import settings

from mixmap.simulation import simulate, write_simulation

torch.set_num_threads(2)

# CI draws the same examples every run (a failure there is reproducible, not a coin toss);
# a developer's run keeps drawing new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_msdki_dir(tmp_path_factory):
    """A 400-voxel paper-msdki scan at SNR 30 on the HCP scheme, written by write_simulation."""
    out = tmp_path_factory.mktemp("sim_msdki")
    sim = simulate("paper-msdki", "hcp", snr=30, n_voxels=400, seed=1)
    write_simulation(sim, out, force=True)
    return out


@pytest.fixture()
def scan(tiny_msdki_dir, tmp_path):
    """A private copy of the tiny simulated scan, safe to damage."""
    d = tmp_path / "scan"
    shutil.copytree(tiny_msdki_dir, d)
    return d


@pytest.fixture()
def rng():
    return np.random.default_rng(0)
