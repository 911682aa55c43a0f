"""Models know where they hold: MSDKI beyond b ≈ 3000 s/mm² is fitted with a warning that names
the shells and the remedy (`--max-b`), IVIM without perfusion-range b-values is refused, and
`--max-b` leaves the volumes above it out of `check`, `fit` and the record in fit.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mixmap.acquisition import Acquisition, fibonacci_sphere, hcp_scheme, ivim_scheme
from mixmap.cli import app
from mixmap.io import load_dwi
from mixmap.models import UnsupportedAcquisition, get_model
from mixmap.simulation import simulate, write_simulation

runner = CliRunner()


def beyond_kurtosis_scheme() -> Acquisition:
    """3 b=0 and 12 directions at each of b = 1000, 2000, 3000, 5000 s/mm² (volumes 39-50 at
    b = 5000)."""
    bvals = [0.0] * 3 + [b for b in (1000.0, 2000.0, 3000.0, 5000.0) for _ in range(12)]
    bvecs = np.concatenate([np.zeros((3, 3)), np.tile(fibonacci_sphere(12), (4, 1))])
    return Acquisition.from_arrays(np.array(bvals), bvecs, units="s/mm2")


@pytest.fixture(scope="module")
def high_b(tmp_path_factory):
    d = tmp_path_factory.mktemp("high_b")
    sim = simulate("paper-msdki", beyond_kurtosis_scheme(), snr=30, n_voxels=200, seed=2)
    write_simulation(sim, d, force=True)
    return d


def args(d, *extra):
    return [str(d / "dwi.nii.gz"), "--bvals", str(d / "dwi.bval"), "--bvecs", str(d / "dwi.bvec"),
            "--mask", str(d / "mask.nii.gz"), *extra]


def test_msdki_warns_beyond_its_b_range_naming_shells_and_remedy():
    (warning,) = get_model("msdki").scheme_warnings(beyond_kurtosis_scheme())
    assert warning.startswith("12 volumes at b = 5000 s/mm², beyond b ≈ 3000 s/mm²")
    assert "--max-b 3000" in warning
    assert get_model("msdki").scheme_warnings(hcp_scheme()) == []  # b ≤ 3000: holds


def test_ivim_needs_perfusion_range_b_values():
    with pytest.raises(UnsupportedAcquisition, match=r"perfusion range \(0 < b ≤ 200 s/mm²\)"
                       r".*the lowest non-zero b here is 1000 s/mm²"):
        get_model("ivim").check_acquisition(hcp_scheme())
    get_model("ivim").check_acquisition(ivim_scheme())  # its own scheme is fine


def test_ivim_reference_volumes_are_b0_only():
    acq = ivim_scheme()
    ref = get_model("ivim").reference_volumes(acq)
    assert ref.sum() == 2 and np.all(acq.bvals[ref] == 0)
    assert acq.b0_mask.sum() > 2  # b = 10-50 s/mm² count as b=0 for the other models


def test_check_says_where_msdki_holds_and_max_b_removes_it(high_b):
    r = runner.invoke(app, ["check", *args(high_b)])
    assert r.exit_code == 0, r.output
    assert "msdki: fittable, but 12 volumes at b = 5000 s/mm²" in r.output
    assert "ivim: not fittable: IVIM needs b-values in the perfusion range" in r.output
    cut = runner.invoke(app, ["check", *args(high_b, "--max-b", "3000")])
    assert cut.exit_code == 0, cut.output
    assert "msdki: fittable, but" not in cut.output and "dki: fittable, but" not in cut.output
    assert "dti: fittable, but" in cut.output  # the tensor holds to b ≈ 1500 s/mm² only
    assert "volume 39 left out: b above --max-b 3000 s/mm²" in cut.output


def test_fit_warns_then_max_b_fits_the_subset_and_records_it(high_b, tmp_path):
    r = runner.invoke(app, ["fit", *args(high_b), "--model", "msdki", "--method", "lsq",
                            "--out", str(tmp_path / "all"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "msdki: 12 volumes at b = 5000 s/mm², beyond b ≈ 3000 s/mm²" in r.output
    r = runner.invoke(app, ["fit", *args(high_b, "--max-b", "3000"), "--model", "msdki",
                            "--method", "lsq", "--out", str(tmp_path / "cut"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "beyond b" not in r.output
    record = json.loads((tmp_path / "cut" / "model-msdki_fit.json").read_text())
    dropped = record["DroppedVolumes"]
    assert sorted(map(int, dropped)) == list(range(39, 51))
    assert set(dropped.values()) == {"b above --max-b 3000 s/mm²"}
    # the same voxels, the volumes ≤ 3000 only
    full = load_dwi(high_b / "dwi.nii.gz", high_b / "dwi.bval", high_b / "dwi.bvec",
                    high_b / "mask.nii.gz")
    cut = load_dwi(high_b / "dwi.nii.gz", high_b / "dwi.bval", high_b / "dwi.bvec",
                   high_b / "mask.nii.gz", max_b=3000)
    np.testing.assert_array_equal(cut.signals, full.signals[:, :39])
    assert cut.acquisition.bvals.max() == pytest.approx(3.0)


def test_max_b_that_leaves_no_diffusion_weighting_is_refused(high_b, tmp_path):
    out = tmp_path / "none"
    r = runner.invoke(app, ["fit", *args(high_b, "--max-b", "500"), "--model", "msdki",
                            "--method", "lsq", "--out", str(out), "--quiet"])
    assert r.exit_code == 2
    assert (f"{high_b / 'dwi.bval'}: no diffusion-weighted volume has b at most --max-b 500 "
            f"s/mm² (the lowest is 1000)") in r.output
    assert not out.exists() or not any(out.iterdir())
