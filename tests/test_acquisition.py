"""Gradient tables: FSL parsing, orientation, units, shells, and the errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixmap.acquisition import Acquisition, AcquisitionError, clinical_scheme, hcp_scheme


def write(path, arr, fmt="%g"):
    np.savetxt(path, np.atleast_2d(arr), fmt=fmt)
    return path


def test_from_fsl_rows_and_columns_agree(tmp_path):
    bvals = np.array([0, 1000, 1000, 2000])
    vecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])
    a = Acquisition.from_fsl(write(tmp_path / "b", bvals), write(tmp_path / "v", vecs.T))
    b = Acquisition.from_fsl(write(tmp_path / "b2", bvals), write(tmp_path / "v2", vecs))
    np.testing.assert_array_equal(a.bvecs, b.bvecs)
    np.testing.assert_allclose(a.bvals, [0, 1, 1, 2])


def test_bvecs_normalised_and_zero_at_b0():
    acq = Acquisition.from_arrays([5, 1000], np.array([[0.3, 0, 0], [0, 2.05 / 2, 0]]))
    np.testing.assert_array_equal(acq.bvecs[0], 0)
    np.testing.assert_allclose(np.linalg.norm(acq.bvecs[1]), 1)


def test_ms_um2_units_detected(caplog):
    caplog.set_level("INFO")
    acq = Acquisition.from_arrays([0, 1, 2, 3], np.eye(4, 3)[[0, 0, 1, 2]])
    np.testing.assert_allclose(acq.bvals, [0, 1, 2, 3])
    assert "ms/µm²" in caplog.text


def test_shells_with_tolerance():
    acq = Acquisition.from_arrays([0, 5, 995, 1005, 2000, 1990],
                                  np.r_[np.zeros((2, 3)), np.eye(3), [[1, 0, 0]]])
    shells = acq.shells()
    assert [round(s.bval * 1000) for s in shells] == [2, 1000, 1995]
    assert [s.n for s in shells] == [2, 2, 2]
    assert acq.n_b0 == 2


def test_standard_schemes():
    hcp = hcp_scheme()
    assert hcp.n == 288 and hcp.n_b0 == 18
    assert [(round(s.bval * 1000), s.n) for s in hcp.dw_shells()] == [
        (1000, 90), (2000, 90), (3000, 90)]
    assert clinical_scheme().n == 32


def test_fingerprint_changes_with_scheme():
    assert hcp_scheme().fingerprint() == hcp_scheme().fingerprint()
    assert hcp_scheme().fingerprint() != clinical_scheme().fingerprint()


@pytest.mark.parametrize(
    "bvals, bvecs, match",
    [
        ([0, 1000, 2000], np.eye(3)[:2].T, "2 gradient directions but 3 b-values"),
        ([0, 1000], np.ones((4, 2)), "expected 3 rows"),
        ([0, -1000], np.eye(3)[:2], "negative b-value"),
        ([0, 1000], np.array([[0, 0, 0], [2.5, 0, 0]]), "norm 2.5, not 1"),
        ([0, np.nan], np.eye(3)[:2], "NaN"),
    ],
)
def test_bad_tables_are_refused(bvals, bvecs, match):
    with pytest.raises(AcquisitionError, match=match):
        Acquisition.from_arrays(np.array(bvals, float), bvecs)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(AcquisitionError, match="missing.bval: file not found"):
        Acquisition.from_fsl(tmp_path / "missing.bval", None)
    (tmp_path / "words.bval").write_text("zero thousand\n")
    with pytest.raises(AcquisitionError, match="words.bval: not a table of numbers"):
        Acquisition.from_fsl(tmp_path / "words.bval", None)
    write(tmp_path / "ok.bval", [0, 1000, 1000])
    write(tmp_path / "one.bvec", [1, 0, 0])
    with pytest.raises(AcquisitionError, match="one.bvec: one row of 3 numbers"):
        Acquisition.from_fsl(tmp_path / "ok.bval", tmp_path / "one.bvec")


def test_from_dipy_gradient_table():
    from dipy.core.gradients import gradient_table

    hcp = hcp_scheme()
    gt = gradient_table(hcp.bvals * 1000, bvecs=hcp.bvecs)
    acq = Acquisition.from_gradient_table(gt)
    np.testing.assert_allclose(acq.bvals, hcp.bvals)
    np.testing.assert_allclose(acq.bvecs, hcp.bvecs, atol=1e-12)


unit_vectors = st.lists(
    st.tuples(*(st.floats(-1, 1, allow_nan=False) for _ in range(3))).filter(
        lambda v: np.linalg.norm(v) > 0.1
    ),
    min_size=3,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(vecs=unit_vectors, b=st.floats(100, 10000), transpose=st.booleans())
def test_fsl_round_trip_property(tmp_path_factory, vecs, b, transpose):
    """Any table of directions survives write -> read, in either orientation."""
    d = tmp_path_factory.mktemp("rt")
    v = np.array(vecs)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(len(v), round(b))]
    vecs_all = np.r_[np.zeros((1, 3)), v]
    write(d / "x.bval", bvals)
    write(d / "x.bvec", vecs_all if transpose else vecs_all.T, fmt="%.8f")
    acq = Acquisition.from_fsl(d / "x.bval", d / "x.bvec")
    if len(v) + 1 == 3:  # a 3x3 table is read as FSL rows; only that orientation round-trips
        return
    np.testing.assert_allclose(acq.bvecs, vecs_all, atol=1e-6)
    np.testing.assert_allclose(acq.bvals * 1000, bvals)


@settings(max_examples=30, deadline=None)
@given(bvals=st.lists(st.floats(0, 49.9), min_size=2, max_size=30))
def test_small_bvals_always_read_as_ms_um2(bvals):
    acq = Acquisition.from_arrays(np.array(bvals), None)
    np.testing.assert_allclose(acq.bvals, np.array(bvals))


# ---------------------------------------------------------------- named fields
def test_fields_other_than_diffusion_are_validated_and_grouped():
    from mixmap.acquisition import Acquisition, AcquisitionError

    acq = Acquisition.from_fields({"TE": [10.0, 10.0, 20.0, 40.0]}, source="te.txt")
    assert acq.n == 4 and not acq.is_diffusion and acq.n_b0 == 0
    assert [(g.value, g.indices) for g in acq.groups("TE")] == [
        (10.0, (0, 1)), (20.0, (2,)), (40.0, (3,))]
    red = acq.reduced(acq.groups("TE"), by="TE")
    assert red.field("TE").tolist() == [10.0, 20.0, 40.0]
    with pytest.raises(AcquisitionError, match=r"te.txt: .* no diffusion weighting \(b\)"):
        acq.field("b")
    with pytest.raises(AcquisitionError, match="te.txt: TE contains NaN"):
        Acquisition.from_fields({"TE": [10.0, float("nan")]}, source="te.txt")
    with pytest.raises(AcquisitionError, match="unknown acquisition field"):
        Acquisition.from_fields({"echo": [10.0]})
    with pytest.raises(AcquisitionError, match="different lengths"):
        Acquisition.from_fields({"TE": [10.0, 20.0], "TR": [1000.0]})


def test_record_round_trip_and_fingerprints():
    import hashlib

    from mixmap.acquisition import Acquisition, hcp_scheme, multi_echo_scheme

    hcp = hcp_scheme()
    # The diffusion fingerprint is the one model files have always stored.
    data = np.concatenate([np.round(hcp.bvals * 1000), np.round(hcp.bvecs.ravel() * 1000)])
    assert hcp.fingerprint() == hashlib.sha256(data.astype(np.int64).tobytes()).hexdigest()[:16]
    for acq in (hcp, multi_echo_scheme()):
        back = Acquisition.from_record(acq.to_record())
        assert back.fingerprint() == acq.fingerprint() == acq.to_record()["fingerprint"]
        assert set(back.fields) == set(acq.fields)
    assert multi_echo_scheme().fingerprint() != hcp.fingerprint()
