"""Simulation presets: the paper's mixture, noise models, the brain layout, files on disk."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from mixmap.io import load_dwi
from mixmap.simulation import PRESETS, brain_layout, simulate, simulate_brain, write_simulation


def test_paper_preset_statistics():
    sim = simulate("paper-msdki", "hcp", snr=20, seed=0)
    assert sim.signals.shape == (10000, 288) and sim.signals.dtype == np.float32
    frac = np.bincount(sim.labels, minlength=3) / sim.labels.size
    np.testing.assert_allclose(frac, np.array([0.5, 0.4, 1.0]) / 1.9, atol=0.015)
    wm = sim.labels == 0
    assert abs(sim.truth["D"][wm].mean() - 1.0) < 0.02
    assert abs(sim.truth["K"][wm].var() - 0.1) < 0.01
    csf = sim.labels == 2
    assert abs(sim.truth["D"][csf].var() - 0.01) < 0.002
    np.testing.assert_array_equal(sim.truth["S0"], 1.0)


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_noise_level(noise):
    sim = simulate("paper-msdki", "hcp", snr=25, n_voxels=2000, noise=noise, seed=1)
    b0 = sim.signals[:, sim.acquisition.b0_mask]
    # At b=0 (S0 = 1, SNR 25) Rician noise is nearly Gaussian with the same sigma.
    assert np.std(b0) == pytest.approx(1 / 25, rel=0.05)
    if noise == "rician":
        assert (sim.signals >= 0).all()


def test_truth_inside_bounds_for_every_preset():
    from mixmap.models import get_model

    for name, preset in PRESETS.items():
        sim = simulate(name, n_voxels=3000, seed=2)  # on the preset's own scheme
        model = get_model(preset.model)
        for p in model.parameters:
            if not p.is_direction:
                assert (sim.truth[p.name] >= p.lower).all() and (
                    sim.truth[p.name] <= p.upper).all(), (name, p.name)


def test_brain_layout_is_brain_sized():
    labels = brain_layout()
    n = np.bincount(labels[labels >= 0])
    assert 800_000 < n.sum() < 1_000_000  # about an HCP brain mask
    assert n[0] > n[1] > 0 and n[2] > 0


def test_brain_simulation_round_trips_through_nifti(tmp_path):
    sim = simulate_brain("ball-stick", "clinical", shape=(24, 28, 20), snr=30)
    write_simulation(sim, tmp_path / "b")
    data = load_dwi(tmp_path / "b" / "dwi.nii.gz", tmp_path / "b" / "dwi.bval",
                    tmp_path / "b" / "dwi.bvec", tmp_path / "b" / "mask.nii.gz")
    np.testing.assert_array_equal(data.mask, sim.mask)
    np.testing.assert_allclose(data.signals, sim.signals)
    f = nib.load(tmp_path / "b" / "truth" / "param-f.nii.gz").get_fdata()
    np.testing.assert_allclose(f[sim.mask], sim.truth["f"], rtol=1e-6)
    info = json.loads((tmp_path / "b" / "simulation.json").read_text())
    assert info["layout"] == "brain" and info["shape"] == [24, 28, 20]


def test_rows_are_in_c_order_of_the_mask_with_and_without_mask(tmp_path):
    """Rows must come back in the order vectors_to_volume scatters them (a multi-slice scan)."""
    rng = np.random.default_rng(0)
    vol = rng.uniform(1, 2, (5, 4, 3, 7)).astype(np.float32)
    vol[0, 0, 0] = 0  # no signal: outside the automatic mask
    mask = np.ones((5, 4, 3), bool)
    mask[1, 2, 0] = False
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "d.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    np.savetxt(tmp_path / "b", [[0, 1000, 1000, 1000, 2000, 2000, 2000]], fmt="%g")
    np.savetxt(tmp_path / "v", np.c_[np.zeros(3), np.eye(3), np.eye(3)], fmt="%g")
    with_mask = load_dwi(tmp_path / "d.nii.gz", tmp_path / "b", tmp_path / "v",
                         tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(with_mask.signals, vol[mask])
    auto = load_dwi(tmp_path / "d.nii.gz", tmp_path / "b", tmp_path / "v")
    expected = vol[:, :, :, 0] > 0
    np.testing.assert_array_equal(auto.mask, expected)
    np.testing.assert_array_equal(auto.signals, vol[expected])


def test_load_dwi_reads_a_gzipped_scan_in_one_pass_of_volume_blocks(tmp_path, monkeypatch):
    """Blocks of whole volumes through one open file: the .nii.gz is opened once per pass,
    whatever the number of blocks (z slabs re-decompressed the file once per slab), and the
    rows equal a full read, with b=0 volumes that are not contiguous."""
    import nibabel.openers

    from mixmap.io import nifti

    rng = np.random.default_rng(1)
    vol = rng.uniform(1, 2, (6, 5, 4, 9)).astype(np.float32)
    vol[2, 3, 1, 5] = np.nan  # a masked voxel with NaN in one diffusion volume: dropped
    vol[0, 0, 0, :] = 0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "d.nii.gz")
    mask = rng.uniform(size=(6, 5, 4)) > 0.3  # rows must follow the mask's C order
    mask[2, 3, 1] = True
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    np.savetxt(tmp_path / "b", [[0, 1000, 1000, 0, 1000, 2000, 2000, 0, 2000]], fmt="%g")
    z, gx, gy, gz = [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]
    np.savetxt(tmp_path / "v", np.array([z, gx, gy, z, gz, gx, gy, z, gz]).T, fmt="%g")
    monkeypatch.setattr(nifti, "READ_BLOCK_BYTES", 2 * 4 * 6 * 5 * 4)  # 2 volumes a block
    opened = []
    real_init = nibabel.openers.Opener.__init__

    def counting_init(self, fileish, *args, **kwargs):
        if str(fileish).endswith("d.nii.gz"):
            opened.append(fileish)
        real_init(self, fileish, *args, **kwargs)

    monkeypatch.setattr(nibabel.openers.Opener, "__init__", counting_init)
    masked = load_dwi(tmp_path / "d.nii.gz", tmp_path / "b", tmp_path / "v", tmp_path / "m.nii.gz")
    keep = mask & np.isfinite(vol).all(-1)
    np.testing.assert_array_equal(masked.signals, vol[keep])
    assert masked.n_dropped == 1
    n_masked_opens = len(opened)
    auto = load_dwi(tmp_path / "d.nii.gz", tmp_path / "b", tmp_path / "v")
    expected = (vol[..., [0, 3, 7]].mean(-1) > 0) & np.isfinite(vol).all(-1)
    np.testing.assert_array_equal(auto.mask, expected)
    np.testing.assert_array_equal(auto.signals, vol[expected])
    # 5 blocks per pass, yet 3 opens: the format sniff, the header and one kept-open data handle.
    assert n_masked_opens <= 3
    assert len(opened) - n_masked_opens <= 3


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_streamed_4d_writer_round_trips_data_and_affine(tmp_path, name):
    """AtomicOutput.nifti_volumes (used for whole-brain simulations) writes blocks of volumes
    without the 4-D array; nibabel reads back the same data, affine and dtype."""
    from mixmap.io import AtomicOutput

    rng = np.random.default_rng(2)
    vol = rng.normal(size=(4, 3, 5, 7)).astype(np.float32)
    affine = np.array([[1.25, 0, 0, -90], [0, 1.25, 0, -126], [0, 0, 1.25, -72], [0, 0, 0, 1]])
    with AtomicOutput(tmp_path) as w:
        w.nifti_volumes(name, vol.shape[:3], 7, affine, (vol[..., i : i + 3] for i in (0, 3, 6)))
    img = nib.load(tmp_path / name)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    with pytest.raises(ValueError, match="3 volumes written, 7 declared"), \
            AtomicOutput(tmp_path / "short") as w:
        w.nifti_volumes(name, vol.shape[:3], 7, affine, [vol[..., :3]])
    assert not (tmp_path / "short" / name).exists()
