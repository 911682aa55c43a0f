"""Example datasets: fetched from the mdt wheel once, checked, unpacked to the cache.

The download needs PyPI; where it is unreachable the test is skipped with the reason."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mixmap import datasets
from mixmap.io import load_dwi


@pytest.fixture(scope="module")
def b1k_b2k():
    try:
        return datasets.fetch("b1k_b2k")
    except RuntimeError as exc:  # no registry access on this machine
        pytest.skip(str(exc))


def test_fetch_gives_a_loadable_scan(b1k_b2k):
    data = load_dwi(b1k_b2k["dwi"], b1k_b2k["bvals"], b1k_b2k["bvecs"], b1k_b2k["mask"])
    assert data.signals.shape == (8865, 103)
    assert data.acquisition.n_b0 == 13
    assert nib.load(b1k_b2k["dwi"]).shape[:3] == (104, 104, 2)
    assert np.isfinite(data.signals).all()


def test_fetch_is_cached_and_checked(b1k_b2k, tmp_path, monkeypatch):
    assert datasets.is_cached("b1k_b2k")
    # A corrupted cached wheel is detected by its checksum and fetched again.
    monkeypatch.setenv("MIXMAP_CACHE", str(tmp_path))
    (tmp_path / datasets.WHEEL).write_bytes(b"not a wheel")
    paths = datasets.fetch("multishell_b6k_max")
    assert paths["dwi"].exists()
    assert datasets._sha256(tmp_path / datasets.WHEEL) == datasets.WHEEL_SHA256


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'hcp'; choose one of: b1k_b2k"):
        datasets.fetch("hcp")


def test_fetch_to_a_folder_gives_the_quick_start_names(b1k_b2k, tmp_path):
    from typer.testing import CliRunner

    from mixmap.cli import app

    r = CliRunner().invoke(app, ["datasets", "fetch", "b1k_b2k", "--to", str(tmp_path / "ex")])
    assert r.exit_code == 0, r.output
    ex = tmp_path / "ex"
    assert sorted(p.name for p in ex.iterdir()) == ["dwi.bval", "dwi.bvec", "dwi.nii.gz",
                                                    "mask.nii.gz"]
    assert (ex / "dwi.nii.gz").read_bytes() == b1k_b2k["dwi"].read_bytes()
    data = load_dwi(ex / "dwi.nii.gz", ex / "dwi.bval", ex / "dwi.bvec", ex / "mask.nii.gz")
    assert data.signals.shape == (8865, 103)
    # a second copy into the same folder is refused with the folder's name, nothing changed
    again = CliRunner().invoke(app, ["datasets", "fetch", "b1k_b2k", "--to", str(ex)])
    assert again.exit_code == 2
    assert f"{ex}: already holds dwi.nii.gz" in again.output
