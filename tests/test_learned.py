"""Learned fitters (ssl, vae, vae-gmm): end to end on tiny simulations, save/load/apply,
safety of model files, reproducibility, and the likelihoods they rest on."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from mixmap.acquisition import clinical_scheme
from mixmap.fitting import FITTERS, get_fitter
from mixmap.fitting.selfsup import Scheme, TrainingDiverged
from mixmap.io.checkpoint import load_fitter
from mixmap.models import get_model
from mixmap.nn.likelihoods import gaussian_loglik, rician_loglik
from mixmap.simulate import Cluster, Preset, simulate

torch.set_num_threads(1)

TWO = Preset(
    "two",
    "msdki",
    (
        Cluster("tissue", 0.5, {"D": 1.0, "K": 1.0}, {"D": 0.08, "K": 0.08}),
        Cluster("fluid", 0.5, {"D": 2.8, "K": 0.1}, {"D": 0.08, "K": 0.08}),
    ),
    n_voxels=600,
)
FAST = dict(epochs=30, min_epochs=5, batch_size=128, hidden=32, n_samples=8)


@pytest.fixture(scope="module")
def sim():
    return simulate(TWO, clinical_scheme(), snr=15, seed=1)


@pytest.fixture(scope="module")
def gmm_fit(sim):
    f = get_fitter("vae-gmm", "msdki", n_components=2, epochs=80, min_epochs=30,
                   batch_size=128, hidden=32, n_samples=16, seed=0)
    return f, f.fit(sim.signals, sim.acquisition)


def _kw(method):
    if method == "ssl":
        return dict(epochs=100, min_epochs=5, batch_size=64, lr=3e-3)
    if method == "vae":
        return FAST
    return {**FAST, "n_components": 2}


@pytest.mark.parametrize("method", ["ssl", "vae", "vae-gmm"])
def test_each_method_fits_end_to_end(sim, method):
    r = get_fitter(method, "msdki", **_kw(method)).fit(sim.signals, sim.acquisition)
    model = get_model("msdki")
    assert r.method == method and r.model == "msdki"
    for p in model.parameters:
        v = r.params[p.name]
        assert v.shape == (sim.signals.shape[0],) and v.dtype == np.float32
        assert np.all(np.isfinite(v))
        lo, hi = (p.lower, p.upper)
        if not p.scaled:
            assert v.min() >= lo and v.max() <= hi
    assert len(r.history) >= 5 and "loss" in r.history[0]
    json.dumps(r.settings)  # JSON-ready
    # D is recovered in the informative cluster to within a generous tolerance (the paper's
    # voxelwise baseline is known to be poor: a looser bound)
    tissue = sim.labels == 0
    # (vae, with its N(0, I) prior, is also weaker than lsq in the WM-like cluster: RESULTS.md)
    tol = {"ssl": 0.5, "vae": 0.15}.get(method, 0.1)
    assert np.sqrt(np.mean((r.params["D"] - sim.truth["D"])[tissue] ** 2)) < tol
    if method != "ssl":
        assert set(r.std) == {"S0", "D", "K"} and np.all(r.std["D"] > 0)
        assert {"recon", "kl_z", "kl_y", "elbo"} <= set(r.history[-1])
        assert r.noise_sigma == pytest.approx(sim.sigma, rel=0.25)
    if method == "vae-gmm":
        assert r.cluster_probs.shape == (sim.signals.shape[0], 2)
        np.testing.assert_allclose(r.cluster_probs.sum(1), 1, atol=1e-5)
    else:
        assert r.cluster_probs is None


def test_gmm_separates_clusters_and_beats_lsq_where_noisy(sim, gmm_fit):
    _, r = gmm_fit
    agree = np.mean(r.clusters == sim.labels)
    assert max(agree, 1 - agree) > 0.97
    lsq = get_fitter("lsq", "msdki").fit(sim.signals, sim.acquisition)
    fluid = sim.labels == 1  # the noisier cluster (high D: little signal at high b)

    def rmse(res, name):
        return np.sqrt(np.mean((res.params[name] - sim.truth[name])[fluid] ** 2))

    # Along MSDKI's D-K ridge the fluid cluster's data say little: the learned prior helps D
    # there (about 15% here) but not K (measured: about 10% worse than lsq on this set; see
    # docs/RESULTS.md); in the informative tissue cluster both improve.
    assert rmse(r, "D") < 0.9 * rmse(lsq, "D")
    fluid = sim.labels == 0
    assert rmse(r, "D") < 0.8 * rmse(lsq, "D")
    assert rmse(r, "K") < 0.9 * rmse(lsq, "K")


def test_save_load_apply_reproduces_maps(sim, gmm_fit, tmp_path):
    f, r = gmm_fit
    f.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["method"] == "vae-gmm" and cfg["acquisition"]["fingerprint"]
    assert cfg["hyper"]["n_components"] == 2
    g = load_fitter(tmp_path / "m")
    assert isinstance(g, FITTERS["vae-gmm"])
    r2 = g.apply(sim.signals, sim.acquisition)
    for k in r.params:
        np.testing.assert_allclose(r2.params[k], r.params[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r2.cluster_probs, r.cluster_probs, atol=1e-6)


def test_ssl_save_load_apply(sim, tmp_path):
    f = get_fitter("ssl", "msdki", **_kw("ssl"))
    r = f.fit(sim.signals, sim.acquisition)
    f.save(tmp_path / "s")
    r2 = load_fitter(tmp_path / "s" / "config.json").apply(sim.signals, sim.acquisition)
    np.testing.assert_array_equal(r2.params["D"], r.params["D"])


def test_apply_refuses_other_acquisition(sim, gmm_fit):
    f, _ = gmm_fit
    other = sim.acquisition.subset(np.arange(sim.acquisition.n - 1))
    with pytest.raises(ValueError, match="acquisition .* differs"):
        f.apply(sim.signals[:, :-1], other)


class _Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Payload.marker),))


def test_loading_never_executes_code(sim, gmm_fit, tmp_path):
    f, _ = gmm_fit
    folder = tmp_path / "m"
    f.save(folder)
    _Payload.marker = str(tmp_path / "pwned")
    (folder / "weights.safetensors").write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(ValueError, match="weights.safetensors"):
        load_fitter(folder)
    assert not (tmp_path / "pwned").exists()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_fitter(folder)
    with pytest.raises(ValueError, match="not a model folder"):
        load_fitter(tmp_path / "missing")


def test_same_seed_same_maps(sim):
    data = sim.signals[:200]
    kw = {**FAST, "epochs": 6, "n_components": 2}
    a = get_fitter("vae-gmm", "msdki", seed=3, **kw).fit(data, sim.acquisition)
    b = get_fitter("vae-gmm", "msdki", seed=3, **kw).fit(data, sim.acquisition)
    c = get_fitter("vae-gmm", "msdki", seed=4, **kw).fit(data, sim.acquisition)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["D"], c.params["D"])


def test_diverging_training_fails_clearly(sim, monkeypatch):
    f = get_fitter("vae", "msdki", **{**FAST, "epochs": 20})

    def nan_loss(batch, scheme, epoch):
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(f, "_loss", nan_loss)
    with pytest.raises(TrainingDiverged, match="learning rate lowered"):
        f.fit(sim.signals[:100], sim.acquisition)


def test_rician_option_fits(sim):
    r = get_fitter("vae-gmm", "msdki", likelihood="rician", **{**FAST, "epochs": 5,
                   "n_components": 2}).fit(sim.signals[:200], sim.acquisition)
    assert np.all(np.isfinite(r.params["D"])) and r.settings["likelihood"] == "rician"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="likelihood"):
        get_fitter("vae-gmm", "msdki", likelihood="laplace")
    with pytest.raises(ValueError, match="latent_dim"):
        get_fitter("vae-gmm", "msdki", latent_dim=7)
    with pytest.raises(ValueError, match="config"):
        get_fitter("vae", "msdki", config="huge")


def test_rician_loglik_matches_scipy():
    from scipy.stats import rice

    y = torch.tensor([[0.02, 0.5, 1.3, 40.0]], dtype=torch.float64)
    nu = torch.tensor([[0.0, 0.4, 1.2, 39.0]], dtype=torch.float64)
    sigma = torch.tensor(0.3, dtype=torch.float64)
    ours = rician_loglik(y, nu, sigma)
    ref = rice.logpdf(y.numpy(), nu.numpy() / 0.3, scale=0.3).sum()
    assert float(ours) == pytest.approx(ref, rel=1e-6)


def test_shell_mean_likelihood_equals_full(sim):
    model = get_model("msdki")
    acq = sim.acquisition
    y = torch.as_tensor(sim.signals[:50])
    params = {"S0": torch.ones(50), "D": torch.full((50,), 1.2), "K": torch.full((50,), 0.8)}
    sigma = torch.tensor(0.07)
    full = gaussian_loglik(y, model.forward(params, acq), sigma)
    sch = Scheme.build(model, acq, True, "cpu")
    yw, extra = sch.working_signals(y)
    red = gaussian_loglik(yw, model.forward(params, sch.work), sigma, sch.weights, extra,
                          sch.n_meas)
    torch.testing.assert_close(red, full, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("method", ["vae", "vae-gmm"])
def test_paper_config_fits_saves_and_reloads(sim, method, tmp_path):
    kw = {"n_components": 2} if method == "vae-gmm" else {}
    f = get_fitter(method, "msdki", config="paper", epochs=4, min_epochs=1, **kw)
    r = f.fit(sim.signals[:200], sim.acquisition)
    assert r.settings["latent_dim"] == 4 and r.settings["decoder"] == "linear"
    f.save(tmp_path / "p")
    r2 = load_fitter(tmp_path / "p").apply(sim.signals[:200], sim.acquisition)
    np.testing.assert_array_equal(r2.params["K"], r.params["K"])


def test_interrupted_training_resumes_to_the_same_maps(sim, tmp_path, monkeypatch):
    """Kill training after a few epochs (checkpoint left behind), resume: same maps as an
    uninterrupted run, and the checkpoint is refused for other data."""
    data = sim.signals[:200]
    kw = {**FAST, "epochs": 8, "min_epochs": 8, "n_components": 2}
    full = get_fitter("vae-gmm", "msdki", seed=5, **kw).fit(data, sim.acquisition)

    ckpt = tmp_path / "ckpt.pt"
    f = get_fitter("vae-gmm", "msdki", seed=5, **kw)
    f.use_checkpoint(ckpt)
    original = type(f)._end_epoch

    def crash_at_epoch_4(self, d, scheme, epoch):
        original(self, d, scheme, epoch)
        if epoch == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(type(f), "_end_epoch", crash_at_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        f.fit(data, sim.acquisition)
    monkeypatch.setattr(type(f), "_end_epoch", original)
    assert ckpt.exists()

    other = get_fitter("vae-gmm", "msdki", seed=5, **kw)
    other.use_checkpoint(ckpt, resume=True)
    with pytest.raises(ValueError, match="written for other data or settings"):
        other.fit(sim.signals[200:400], sim.acquisition)

    g = get_fitter("vae-gmm", "msdki", seed=5, **kw)
    g.use_checkpoint(ckpt, resume=True)
    resumed = g.fit(data, sim.acquisition)
    assert [h["epoch"] for h in resumed.history] == [h["epoch"] for h in full.history]
    for k in full.params:
        np.testing.assert_array_equal(resumed.params[k], full.params[k])
    g.finish_checkpoint()
    assert not ckpt.exists()


def test_nan_loss_is_undone_and_training_recovers(sim, monkeypatch, caplog):
    """Two mini-batches give NaN: each step is undone, the learning rate halved, training goes
    on and the maps are finite."""
    f = get_fitter("vae-gmm", "msdki", **{**FAST, "epochs": 6, "n_components": 2})
    original = f._loss
    calls = {"n": 0}

    def sometimes_nan(batch, scheme, epoch):
        calls["n"] += 1
        loss, terms = original(batch, scheme, epoch)
        if calls["n"] in (2, 3):
            return loss * float("nan"), terms
        return loss, terms

    monkeypatch.setattr(f, "_loss", sometimes_nan)
    caplog.set_level("WARNING")
    res = f.fit(sim.signals[:200], sim.acquisition)
    assert "step undone, learning rate lowered" in caplog.text
    lrs = [h["lr"] for h in res.history]
    # 2 mini-batches an epoch: the 2nd (epoch 0) and the 3rd (epoch 1) were bad
    assert lrs[0] == pytest.approx(f.lr / 2) and lrs[1] == pytest.approx(f.lr / 4)
    for v in res.params.values():
        assert np.isfinite(v).all()


def test_model_file_with_other_bounds_is_refused(sim, gmm_fit, tmp_path):
    fitter, _ = gmm_fit
    folder = tmp_path / "m"
    fitter.save(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["parameters"][1]["upper"] = 3.0
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="other parameters or bounds"):
        load_fitter(folder)


def test_large_scans_train_on_a_random_subset_per_epoch_and_map_every_voxel(sim):
    """Above ``epoch_voxels`` an epoch is a fresh random subset (training cost stops growing
    with the scan); the loss and the EM update see that subset, and every voxel is mapped."""
    f = get_fitter("vae-gmm", "msdki", seed=0, **{**FAST, "epochs": 8, "n_components": 2})
    f.epoch_voxels = 250
    seen, em = [], []
    loss, end = f._loss, f._end_epoch

    def counting_loss(batch, scheme, epoch):
        seen.append((epoch, batch.n, batch.y[:, 0].sum().item()))
        return loss(batch, scheme, epoch)

    def counting_end(data, scheme, epoch):
        em.append(data.n)
        return end(data, scheme, epoch)

    f._loss, f._end_epoch = counting_loss, counting_end
    res = f.fit(sim.signals, sim.acquisition)
    assert res.settings["epoch_voxels"] == 250
    per_epoch = {}
    for epoch, k, _ in seen:
        per_epoch[epoch] = per_epoch.get(epoch, 0) + k
    assert set(per_epoch.values()) == {250}  # of 600 voxels
    assert em == [250] * len(res.history)
    sums = {}
    for epoch, _, s in seen:
        sums[epoch] = sums.get(epoch, 0.0) + s
    assert len({round(v, 3) for v in sums.values()}) > 1  # another subset each epoch
    assert res.params["D"].shape == (600,) and np.isfinite(res.params["D"]).all()
