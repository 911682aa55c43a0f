"""Accelerators: every fitter on CUDA (or MPS) against the same fit on the CPU, and the command
line with ``--device``. Where no accelerator is present (CI) only the refusal tests run; the
rest run on a machine with one (``benchmarks/gpu_check.py`` runs this file there)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mixmap.cli import app
from mixmap.evaluation import metrics
from mixmap.fitting import get_fitter
from mixmap.simulation import simulate

PRESENT = [d for d, ok in (
    ("cuda", torch.cuda.is_available()),
    ("mps", bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()),
) if ok]
#: MIXMAP_TEST_DEVICES=cpu runs the accelerator tests' logic on the CPU (a rehearsal).
ACCELERATORS = os.environ.get("MIXMAP_TEST_DEVICES", "").split() or PRESENT
needs_accelerator = pytest.mark.skipif(not ACCELERATORS, reason="no CUDA or MPS device here")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sim():
    return simulate("paper-msdki", "hcp", snr=20, n_voxels=3000, seed=3)


def rmse(res, sim, name: str) -> float:
    m = metrics(res.params, sim.truth, sim.labels, [c.name for c in sim.preset.clusters], [name])
    return m[name]["all"]["rmse"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(tiny_msdki_dir, tmp_path):
    d, out = tiny_msdki_dir, tmp_path / "maps"
    r = run("fit", d / "dwi.nii.gz", "--bvals", d / "dwi.bval", "--bvecs", d / "dwi.bvec",
            "--mask", d / "mask.nii.gz", "--device", "cuda", "--out", out, "--quiet")
    assert r.exit_code == 2
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert lines == ["mixmap fit: error: --device cuda: no CUDA device is available; use "
                     "--device cpu or auto"], r.output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(bool(PRESENT), reason="this machine has an accelerator")
def test_auto_picks_the_cpu_without_an_accelerator(tiny_msdki_dir, tmp_path):
    d, out = tiny_msdki_dir, tmp_path / "maps"
    r = run("fit", d / "dwi.nii.gz", "--bvals", d / "dwi.bval", "--bvecs", d / "dwi.bvec",
            "--mask", d / "mask.nii.gz", "--device", "auto", "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "model-msdki_fit.json").read_text())["Device"].startswith("cpu")


@needs_accelerator
@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("model,preset", [("msdki", "paper-msdki"), ("ball-stick", "ball-stick")])
def test_lsq_on_the_accelerator_matches_the_cpu(device, model, preset):
    s = simulate(preset, "hcp", snr=20, n_voxels=2000, seed=4)
    cpu = get_fitter("lsq", model).fit(s.signals, s.acquisition)
    acc = get_fitter("lsq", model, device=device).fit(s.signals, s.acquisition)
    assert acc.device.startswith(device)
    for name in cpu.params:
        if name == "n":  # direction: sign-free agreement
            cos = np.abs((cpu.params[name] * acc.params[name]).sum(1))
            assert np.median(cos) > 0.9999, name
            continue
        a, b = cpu.params[name], acc.params[name]
        close = np.abs(a - b) <= 1e-3 * (1 + np.abs(a))
        # float32 rounding moves voxels on flat ridges (CSF-like K, Dpar where f ~ 0)
        assert close.mean() > 0.9, (name, close.mean())
        if name != "S0":
            assert rmse(acc, s, name) <= 1.05 * rmse(cpu, s, name) + 1e-4, name


@needs_accelerator
@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("method", ["ssl", "vae", "vae-gmm"])
def test_learned_fitters_on_the_accelerator_recover_as_on_the_cpu(sim, device, method):
    options = dict(epochs=40, seed=0)
    cpu = get_fitter(method, "msdki", **options).fit(sim.signals, sim.acquisition)
    acc = get_fitter(method, "msdki", device=device, **options).fit(sim.signals,
                                                                     sim.acquisition)
    assert acc.device.startswith(device) and acc.timings["train"] > 0
    for name in ("D", "K"):
        assert np.isfinite(acc.params[name]).all()
        # other random streams on the device: the same quality, not the same numbers
        assert rmse(acc, sim, name) <= 1.2 * rmse(cpu, sim, name) + 0.005, name


@needs_accelerator
@pytest.mark.parametrize("device", ACCELERATORS)
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_on_the_accelerator_keeps_accuracy(sim, device, precision):
    base = get_fitter("vae-gmm", "msdki", device=device, epochs=40).fit(sim.signals,
                                                                         sim.acquisition)
    half = get_fitter("vae-gmm", "msdki", device=device, epochs=40,
                      precision=precision).fit(sim.signals, sim.acquisition)
    for name in ("D", "K"):
        assert rmse(half, sim, name) <= 1.2 * rmse(base, sim, name) + 0.005, name


@needs_accelerator
@pytest.mark.parametrize("device", ACCELERATORS)
def test_cli_fit_and_apply_on_the_accelerator(tiny_msdki_dir, tmp_path, device):
    d, out, again = tiny_msdki_dir, tmp_path / "maps", tmp_path / "applied"
    scan = ("--bvals", d / "dwi.bval", "--bvecs", d / "dwi.bvec", "--mask", d / "mask.nii.gz")
    r = run("fit", d / "dwi.nii.gz", *scan, "--method", "vae-gmm", "--epochs", "10",
            "--device", device, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    side = json.loads((out / "model-msdki_fit.json").read_text())
    assert side["Device"].startswith(device) and side["Settings"]["device"] == device
    ref = nib.load(d / "dwi.nii.gz")
    img = nib.load(out / "model-msdki_param-D_dwimap.nii.gz")
    np.testing.assert_array_equal(img.affine, ref.affine)
    r = run("apply", out / "model-msdki_method-vae-gmm", d / "dwi.nii.gz", *scan,
            "--device", device, "--out", again, "--quiet")
    assert r.exit_code == 0, r.output
    a = img.get_fdata()
    b = nib.load(again / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # a model trained on the accelerator maps on the CPU too: with the CPU's random draws,
    # so within Monte-Carlo error (another seed moves each voxel by a median 0.10-0.11
    # posterior sd on this scan, measured on the CPU)
    r = run("apply", out / "model-msdki_method-vae-gmm", d / "dwi.nii.gz", *scan,
            "--device", "cpu", "--out", tmp_path / "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    c = nib.load(tmp_path / "cpu" / "model-msdki_param-D_dwimap.nii.gz").get_fdata()
    sd = nib.load(out / "model-msdki_param-D_desc-std_dwimap.nii.gz").get_fdata()
    inside = np.isfinite(a) & (sd > 0)
    assert np.median(np.abs(c[inside] - a[inside]) / sd[inside]) < 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_maps_on_cuda_use_large_chunks_and_draw_on_the_device():
    from mixmap.fitting.learned.posterior import DRAWS_PER_SLICE, PREDICT_CHUNK, maps_sizes
    from mixmap.nn import rng

    chunk, draws = maps_sizes("cuda")
    assert chunk > PREDICT_CHUNK and draws >= DRAWS_PER_SLICE
    assert maps_sizes("cuda") == (chunk, draws)  # the same every time: reproducible maps
    gen = rng.draw_generator(1, "cuda")
    assert gen.device.type == "cuda"
    z = rng.randn((3, 4), gen, torch.device("cuda"))
    k = rng.multinomial(torch.rand(5, 3, device="cuda"), 6, gen)
    assert z.device.type == "cuda" and k.device.type == "cuda" and k.shape == (5, 6)
    again = rng.randn((3, 4), rng.draw_generator(1, "cuda"), torch.device("cuda"))
    torch.testing.assert_close(z, again, rtol=0, atol=0)
