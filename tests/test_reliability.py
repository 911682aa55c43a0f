"""Nothing lost: a killed or interrupted run leaves no map or complete maps, never a truncated
file; staged writes vanish on error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from mixmap.io import AtomicOutput
from mixmap.simulation import simulate, write_simulation


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), AtomicOutput(out) as w:
        w.text("a.txt", "first")
        w.nifti("b.nii.gz", np.zeros((2, 2, 2), np.float32), np.eye(4))
        raise RuntimeError("crash in the middle")
    assert list(out.iterdir()) == []


def test_atomic_output_refuses_existing_before_moving_anything(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="b.txt: already exists; use --force"):
        with AtomicOutput(out) as w:
            w.text("a.txt", "new")
            w.text("b.txt", "overwrite?")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert (out / "b.txt").read_text() == "precious"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_fit_leaves_no_partial_map(tmp_path, sig):
    scan = tmp_path / "scan"
    # Enough voxels that the signal usually lands inside the fit (ball-stick lsq fits 10,000
    # voxels in about a second).
    write_simulation(simulate("ball-stick", "hcp", snr=20, n_voxels=20000, seed=0), scan)
    out = tmp_path / "maps"
    cmd = [sys.executable, "-m", "mixmap", "fit", str(scan / "dwi.nii.gz"),
           "--bvals", str(scan / "dwi.bval"), "--bvecs", str(scan / "dwi.bvec"),
           "--mask", str(scan / "mask.nii.gz"), "--model", "ball-stick", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # Wait until the data are loaded and the fit has started, then signal it.
    first = proc.stderr.readline()
    assert b"voxels" in first, first
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    maps = sorted(out.glob("*_dwimap.nii.gz")) if out.exists() else []
    if proc.returncode == 0:  # finished before the signal: every map must be complete
        assert len(maps) == 9
    else:
        # Killed: no map at all, or (signal after the atomic move) every map complete.
        assert len(maps) in (0, 9), f"a killed run left {len(maps)} of 9 maps"
        if sig == signal.SIGINT and not maps:
            assert proc.returncode == 130 and b"interrupted" in err
    for m in maps:
        assert np.isfinite(nib.load(m).get_fdata()).any()
