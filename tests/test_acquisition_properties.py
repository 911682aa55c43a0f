"""Properties of acquisitions over random schemes: jittered multi-shell tables load into the
shells they were drawn from, survive the FSL files and the JSON record, do not depend on the
sign or order of their directions, IVIM's low b-values stay apart, and bad tables are refused
with a one-line :class:`AcquisitionError` that says what is wrong.

b-values are drawn in s/mm² (the files' unit); :class:`Acquisition` holds ms/µm².
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mixmap.acquisition import Acquisition, AcquisitionError

#: Few examples and no deadline: the file runs in seconds on 2 slow cores.
FAST = settings(max_examples=40, deadline=None)

B_MIN, B_MAX = 200.0, 6000.0  # s/mm², the range of the drawn diffusion shells
JITTER = 3.0  # s/mm², well inside the shell tolerance (5 s/mm², 5 % of b)
#: Consecutive shell centres differ by at least this factor: with ±JITTER the gap stays
#: wider than the 5 % relative tolerance, so the drawn shells are the right answer.
MIN_RATIO = 1.15
MAX_VOLUMES = 60
IVIM_LOW = (0, 10, 20, 30, 50, 80, 100, 150, 200)  # s/mm²


@dataclass(frozen=True)
class Scheme:
    """A drawn scheme and the answer: ``bvals`` (n,) s/mm², ``bvecs`` (n, 3) unit and zero at
    b=0, ``shell`` (n,) the index of each volume's drawn shell (ascending b, b=0 first when
    present) and ``centres`` the drawn shell b-values (s/mm²)."""

    bvals: np.ndarray
    bvecs: np.ndarray
    shell: np.ndarray
    centres: tuple[float, ...]

    @property
    def n(self) -> int:
        return self.bvals.size

    def members(self, j: int) -> set[int]:
        return set(np.flatnonzero(self.shell == j).tolist())


def unit_directions(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    # a normal vector this short is astronomically rare; keep the normalisation well posed
    v[np.linalg.norm(v, axis=1) < 1e-3] = (1.0, 0.0, 0.0)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@st.composite
def schemes(draw, min_volumes: int = 1) -> Scheme:
    """b=0 (or not) and 1-4 diffusion shells between B_MIN and B_MAX, each of 1-20 volumes
    jittered by up to ±JITTER s/mm², random unit directions, in random volume order."""
    has_b0 = draw(st.booleans())
    k = draw(st.integers(1, 4))
    # shell centres log-spaced at least MIN_RATIO apart: k sorted points in a shortened
    # interval, then the i-th shifted by i gaps
    gap = math.log(MIN_RATIO)
    span = math.log(B_MAX / B_MIN) - (k - 1) * gap
    xs = sorted(draw(st.lists(st.floats(0, span), min_size=k, max_size=k)))
    centres = [0.0] * has_b0 + [B_MIN * math.exp(x + i * gap) for i, x in enumerate(xs)]
    per_shell = min(20, MAX_VOLUMES // len(centres))
    counts = draw(st.lists(st.integers(1, per_shell), min_size=len(centres),
                           max_size=len(centres)))
    assume(sum(counts) >= min_volumes)
    bvals, shell = [], []
    for j, (c, m) in enumerate(zip(centres, counts, strict=True)):
        low, high = (0.0, JITTER) if c == 0 else (-JITTER, JITTER)
        bvals += [c + d for d in draw(st.lists(st.floats(low, high), min_size=m, max_size=m))]
        shell += [j] * m
    order = np.array(draw(st.permutations(range(len(bvals)))), dtype=int)
    bvals, shell = np.array(bvals)[order], np.array(shell)[order]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bvecs = unit_directions(rng, bvals.size)
    bvecs[bvals < B_MIN / 2] = 0.0
    return Scheme(bvals, bvecs, shell, tuple(centres))


def load(scheme: Scheme) -> Acquisition:
    """The drawn scheme, directions given as FSL's 3 rows: an (n, 3) table with n = 3 would
    be read as rows, i.e. transposed."""
    return Acquisition.from_arrays(scheme.bvals, scheme.bvecs.T)


def assert_same_shells(a: Acquisition, b: Acquisition, rtol: float = 1e-12) -> None:
    sa, sb = a.shells(), b.shells()
    assert [s.indices for s in sa] == [s.indices for s in sb]
    np.testing.assert_allclose([s.bval for s in sa], [s.bval for s in sb], rtol=rtol)


def save_and_load(acq: Acquisition) -> Acquisition:
    with tempfile.TemporaryDirectory() as d:
        bval, bvec = Path(d) / "dwi.bval", Path(d) / "dwi.bvec"
        acq.save_fsl(bval, bvec)
        return Acquisition.from_fsl(bval, bvec)


def refusal(bvals, bvecs) -> str:
    """The one-line message with which ``from_arrays`` refuses the table."""
    with pytest.raises(AcquisitionError) as info:
        Acquisition.from_arrays(bvals, bvecs)
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ---------------------------------------------------------------- valid schemes load
@FAST
@given(scheme=schemes())
def test_drawn_shells_are_found(scheme):
    acq = load(scheme)
    assert acq.n == scheme.n
    # each volume keeps its own b (jitter and all), in ms/µm²
    np.testing.assert_allclose(acq.bvals, scheme.bvals / 1000, rtol=1e-12, atol=0)
    np.testing.assert_allclose(acq.bvecs, scheme.bvecs, atol=1e-12)
    shells = acq.shells()
    assert len(shells) == len(scheme.centres)
    indices = sorted(i for s in shells for i in s.indices)
    assert indices == list(range(scheme.n))  # every volume in exactly one shell
    for j, (s, centre) in enumerate(zip(shells, scheme.centres, strict=True)):
        assert set(s.indices) == scheme.members(j)
        assert abs(s.bval * 1000 - centre) <= JITTER + 1e-9
    assert acq.n_b0 == (len(scheme.members(0)) if scheme.centres[0] == 0 else 0)


# ---------------------------------------------------------------- round trips
@FAST
@given(scheme=schemes())
def test_fsl_files_round_trip(scheme):
    acq = load(scheme)
    back = save_and_load(acq)
    # b and directions written with 10 digits, directions renormalised on reading
    np.testing.assert_allclose(back.bvals, acq.bvals, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(back.bvecs, acq.bvecs, atol=1e-9)
    assert_same_shells(back, acq, rtol=1e-9)


# A component within a rounding step of fingerprint()'s 1e-3 boundary (0.1004999 -> 100 or
# 101 after a file with fewer digits): matching goes by tolerance, so the scheme read back
# still matches the one a model was trained on.
@FAST
@example(scheme=Scheme(np.array([0.0, 1000.0]),
                       np.array([[0.0, 0.0, 0.0], [0.1004999, math.sqrt(1 - 0.1004999**2), 0.0]]),
                       np.array([0, 1]), (0.0, 1000.0)))
@given(scheme=schemes())
def test_fsl_files_round_trip_is_the_same_scheme(scheme):
    acq = load(scheme)
    assert save_and_load(acq).same_scheme(acq)
    with tempfile.TemporaryDirectory() as d:  # files written with 6 decimals, as tools do
        bval, bvec = Path(d) / "dwi.bval", Path(d) / "dwi.bvec"
        np.savetxt(bval, scheme.bvals[None], fmt="%g")
        np.savetxt(bvec, scheme.bvecs.T, fmt="%.6f")
        assert Acquisition.from_fsl(bval, bvec).same_scheme(acq)


@FAST
@given(scheme=schemes(), data=st.data())
def test_other_schemes_are_not_the_same(scheme, data):
    acq = load(scheme)
    weighted = np.flatnonzero(scheme.bvals > B_MIN / 2)
    assume(weighted.size and scheme.n >= 2)
    i = weighted[data.draw(st.integers(0, weighted.size - 1))]
    shifted = scheme.bvals.copy()  # one volume's b moved by more than 1 s/mm²
    shifted[i] += data.draw(st.sampled_from([-1, 1])) * data.draw(st.floats(1.5, 90))
    # units stated: the shortened table may hold only b=0-like values (e.g. b=1 s/mm²),
    # which the unit detection would rightly read as ms/µm²
    unit = {"units": "s/mm2"}
    assert not Acquisition.from_arrays(shifted, scheme.bvecs.T, **unit).same_scheme(acq)
    shorter = Acquisition.from_arrays(scheme.bvals[:-1], scheme.bvecs[:-1].T, **unit)
    assert not shorter.same_scheme(acq)
    flipped = Acquisition.from_arrays(scheme.bvals, -scheme.bvecs.T, **unit)
    assert flipped.same_scheme(acq)  # a direction's sign does not change the measurement


def test_shortened_table_of_b0_like_values_keeps_its_stated_units():
    # the case hypothesis found: [1, 200] s/mm² cut to [1] is b=0 in s/mm², not 1 ms/µm²
    bvecs = np.array([[0.0, 0.0, 0.0], [0.16021416, -0.81812893, 0.55226487]])
    full = Acquisition.from_arrays(np.array([1.0, 200.0]), bvecs.T)
    short = Acquisition.from_arrays(np.array([1.0]), bvecs[:1].T, units="s/mm2")
    assert short.n_b0 == 1 and not short.same_scheme(full)
    # without units, a lone b=1 reads as ms/µm², and a zero direction there is refused
    assert "norm 0" in refusal(np.array([1.0]), bvecs[:1].T)


@settings(max_examples=5, deadline=None)
@given(b=st.floats(B_MIN, B_MAX), seed=st.integers(0, 2**32 - 1))
def test_single_volume_fsl_round_trip(b, seed):
    direction = unit_directions(np.random.default_rng(seed), 1)
    acq = Acquisition.from_arrays(np.array([b]), direction.T)
    back = save_and_load(acq)
    np.testing.assert_allclose(back.bvecs, acq.bvecs, atol=1e-9)
    assert back.same_scheme(acq)


@FAST
@example(scheme=Scheme(np.array([1000.0] * 3), np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]),
                       np.zeros(3, dtype=int), (1000.0,)))
@given(scheme=schemes())
def test_record_round_trips_through_json(scheme):
    acq = load(scheme)
    rec = json.loads(json.dumps(acq.to_record()))
    back = Acquisition.from_record(rec)
    assert back.fingerprint() == acq.fingerprint() == rec["fingerprint"]
    np.testing.assert_array_equal(back.bvals, acq.bvals)
    np.testing.assert_allclose(back.bvecs, acq.bvecs, rtol=0, atol=1e-15)
    assert_same_shells(back, acq)


@FAST
@given(scheme=schemes())
def test_bvec_columns_load_like_rows(scheme):
    assume(scheme.n != 3)  # a 3x3 table is read as FSL rows
    rows = load(scheme)
    cols = Acquisition.from_arrays(scheme.bvals, scheme.bvecs)
    np.testing.assert_array_equal(rows.bvals, cols.bvals)
    np.testing.assert_array_equal(rows.bvecs, cols.bvecs)
    assert rows.fingerprint() == cols.fingerprint()


# ---------------------------------------------------------------- sign and order
@FAST
@given(scheme=schemes(), data=st.data())
def test_direction_signs_do_not_change_shells(scheme, data):
    signs = np.array(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=scheme.n,
                                        max_size=scheme.n)))
    acq = load(scheme)
    flipped = Acquisition.from_arrays(scheme.bvals, (scheme.bvecs * signs[:, None]).T)
    np.testing.assert_allclose(flipped.bvecs, acq.bvecs * signs[:, None], atol=1e-12)
    assert_same_shells(flipped, acq)


@FAST
@given(scheme=schemes(), data=st.data())
def test_permuting_volumes_permutes_shells(scheme, data):
    p = np.array(data.draw(st.permutations(range(scheme.n))), dtype=int)
    acq = load(scheme)
    moved = Acquisition.from_arrays(scheme.bvals[p], scheme.bvecs[p].T)
    np.testing.assert_array_equal(moved.bvals, acq.bvals[p])
    np.testing.assert_allclose(moved.bvecs, acq.bvecs[p], atol=1e-12)
    shells, moved_shells = acq.shells(), moved.shells()
    assert len(moved_shells) == len(shells)
    for s, m in zip(shells, moved_shells, strict=True):
        # volume i of the permuted table is volume p[i] of the original
        assert sorted(p[list(m.indices)].tolist()) == list(s.indices)
        assert m.bval == pytest.approx(s.bval, rel=1e-12)


# ---------------------------------------------------------------- IVIM
@FAST
@given(values=st.lists(st.sampled_from(IVIM_LOW), min_size=3, unique=True), data=st.data())
def test_ivim_low_b_values_are_one_shell_each(values, data):
    repeats = data.draw(st.lists(st.integers(1, 4), min_size=len(values),
                                 max_size=len(values)))
    bvals = np.repeat(np.array(values, dtype=float), repeats)
    bvals = bvals[np.array(data.draw(st.permutations(range(bvals.size))), dtype=int)]
    bvecs = unit_directions(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))),
                            bvals.size)
    bvecs[bvals <= 50] = 0.0
    acq = Acquisition.from_arrays(bvals, bvecs.T, units="s/mm2")
    shells = acq.shells()
    assert [round(s.bval * 1000, 6) for s in shells] == sorted(values)
    for s in shells:
        assert set(s.indices) == set(np.flatnonzero(bvals == round(s.bval * 1000)).tolist())
    assert acq.n_b0 == (bvals <= 50).sum()


# ---------------------------------------------------------------- refused tables
@FAST
@given(scheme=schemes(), data=st.data())
def test_negative_b_value_is_refused(scheme, data):
    i = data.draw(st.integers(0, scheme.n - 1))
    bvals = scheme.bvals.copy()
    bvals[i] = data.draw(st.floats(-B_MAX, -0.01))
    assert "negative b-value" in refusal(bvals, scheme.bvecs.T)


@FAST
@given(scheme=schemes(), data=st.data())
def test_nan_or_inf_b_value_is_refused(scheme, data):
    i = data.draw(st.integers(0, scheme.n - 1))
    bvals = scheme.bvals.copy()
    bvals[i] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    assert "NaN or Inf" in refusal(bvals, scheme.bvecs.T)


@FAST
@given(scheme=schemes(), data=st.data())
def test_direction_count_mismatch_is_refused(scheme, data):
    m = data.draw(st.integers(1, scheme.n + 5).filter(lambda m: m != scheme.n))
    vecs = unit_directions(np.random.default_rng(m), m)
    msg = refusal(scheme.bvals, vecs.T if data.draw(st.booleans()) else vecs)
    assert "gradient directions but" in msg
    assert re.search(rf"\b{m}\b", msg) and re.search(rf"\b{scheme.n}\b", msg), msg


@FAST
@given(scheme=schemes())
def test_two_column_directions_are_refused(scheme):
    # (3, 2) has 3 rows: it reads as 2 FSL directions and is refused as a count mismatch
    assume(scheme.n != 3)
    msg = refusal(scheme.bvals, scheme.bvecs[:, :2])
    assert "gradient directions have shape" in msg
    assert f"({scheme.n}, 2)" in msg


@FAST
@given(scheme=schemes(), data=st.data())
def test_long_directions_are_refused_naming_the_first(scheme, data):
    dw = np.flatnonzero(scheme.bvals > B_MIN / 2).tolist()
    bad = sorted(data.draw(st.lists(st.sampled_from(dw), min_size=1, unique=True)))
    bvecs = scheme.bvecs.copy()
    # norms 1.5-3 are neither unit nor the volume's b-value (>= 197 s/mm²)
    bvecs[bad] *= np.array(data.draw(st.lists(st.floats(1.5, 3.0), min_size=len(bad),
                                              max_size=len(bad))))[:, None]
    msg = refusal(scheme.bvals, bvecs.T)
    assert re.search(rf"gradient direction {bad[0]}\b", msg), msg
