"""Learned fitters (ssl, vae, vae-gmm): end to end on tiny simulations, save/load/apply,
safety of model files, reproducibility, and the likelihoods they rest on."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from mixmap.acquisition import clinical_scheme
from mixmap.fitting import FITTERS, get_fitter, load_fitter
from mixmap.fitting.base import Scheme
from mixmap.fitting.learned.training import TrainingDiverged, epoch_exploded
from mixmap.models import get_model
from mixmap.nn.likelihoods import gaussian_loglik, rician_loglik, rician_sigma
from mixmap.simulation import Cluster, Preset, simulate
from mixmap.testing import interrupt_training

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
FAST = dict(epochs=30, min_epochs=5, batch_size=128, hidden=32, n_samples=24)


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
        # (with FAST's 24 importance draws a voxel's weights can rest on one draw, std 0: one
        # of the 600 does with the grid refit, and without it one is at 4e-23)
        assert set(r.std) == {"S0", "D", "K"} and np.mean(r.std["D"] > 1e-6) > 0.99
        assert np.median(r.std["D"]) > 0.005
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


def test_rician_option_fits(sim, tmp_path):
    f = get_fitter("vae-gmm", "msdki", likelihood="rician", **{**FAST, "epochs": 5,
                   "n_components": 2})
    r = f.fit(sim.signals[:200], sim.acquisition)
    assert np.all(np.isfinite(r.params["D"])) and r.settings["likelihood"] == "rician"
    # the grid refit of the prior runs on every measurement's Rician likelihood too
    grid = r.settings["empirical_bayes"]["grid"]
    assert grid["voxels"] == 200
    assert grid["log_evidence_per_voxel"] >= grid["log_evidence_per_voxel_before"]
    # sigma re-estimated with the prior; the maps use it, and so does apply on the same scan
    sig = r.settings["empirical_bayes"]["noise_sigma"]
    assert sig["after"] != sig["before"] and sig["voxels_left_out"] < 20
    assert r.noise_sigma == pytest.approx(sig["after"] * r.settings["signal_scale"], rel=1e-5)
    assert f.trained["noise_sigma_factor"] == pytest.approx(sig["after"] / sig["before"])
    again = f.apply(sim.signals[:200], sim.acquisition)
    np.testing.assert_array_equal(again.params["D"], r.params["D"])
    f.save(tmp_path / "m")
    loaded = load_fitter(tmp_path / "m").apply(sim.signals[:200], sim.acquisition)
    np.testing.assert_allclose(loaded.params["D"], r.params["D"], rtol=1e-5, atol=1e-6)


def test_rician_sigma_maximises_the_rician_likelihood():
    gen = torch.Generator().manual_seed(3)
    sigma = 0.05
    # 4,000 voxels, each with signals from the noise floor to far above it (MSDKI's shells)
    nu = torch.tensor([0.0, 0.01, 0.05, 0.2, 1.0], dtype=torch.float64).repeat(4000, 1)
    noise = [sigma * torch.randn(nu.shape, generator=gen, dtype=torch.float64)
             for _ in range(2)]
    y = torch.sqrt((nu + noise[0]) ** 2 + noise[1] ** 2)
    for start in (0.02, 0.2):
        est, left = rician_sigma(y, nu, start)
        assert est == pytest.approx(sigma, rel=0.01) and left == 0
        ll = [float(rician_loglik(y, nu, torch.tensor(est * f, dtype=torch.float64)).sum())
              for f in (1 - 1e-3, 1.0, 1 + 1e-3)]
        assert ll[1] > ll[0] and ll[1] > ll[2]
    # draws of the signals (R, n, m) against the measurements (n, m)
    assert rician_sigma(y, torch.stack([nu, nu]), 0.1)[0] == pytest.approx(
        rician_sigma(y, nu, 0.1)[0], rel=1e-9)
    # a few voxels whose signals are badly off (a draw far from a needle-sharp posterior)
    # pull the plain estimate far up; leaving out the outlying voxels recovers sigma
    bad = nu.clone()
    bad[:20] *= 3.0
    assert rician_sigma(y, bad, sigma)[0] > 1.3 * sigma
    est, left = rician_sigma(y, bad, sigma, outlier=5.0)
    assert left == 20 and est == pytest.approx(rician_sigma(y[20:], nu[20:], sigma)[0])


def test_mixed_precision_encoder_gives_float32_outputs_and_the_same_maps(sim):
    kw = {**FAST, "epochs": 20, "n_components": 2}
    f32 = get_fitter("vae-gmm", "msdki", **kw).fit(sim.signals, sim.acquisition)
    f = get_fitter("vae-gmm", "msdki", precision="bfloat16", **kw)
    bf = f.fit(sim.signals, sim.acquisition)
    feats = torch.randn(7, f.net.encoder.trunk[0].in_features)
    assert all(t.dtype == torch.float32 for t in f.net.encoder(feats))
    # bfloat16 keeps 8 bits of mantissa; training takes another path, but the maps (float32
    # physics and posterior sums) are as accurate
    for k in ("D", "K"):
        rmse = [np.sqrt(np.mean((r.params[k] - sim.truth[k]) ** 2)) for r in (f32, bf)]
        assert rmse[1] < 1.25 * rmse[0]
    assert bf.settings["precision"] == "bfloat16"


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="likelihood"):
        get_fitter("vae-gmm", "msdki", likelihood="laplace")
    with pytest.raises(ValueError, match="latent_dim"):
        get_fitter("vae-gmm", "msdki", latent_dim=7)
    with pytest.raises(ValueError, match="config"):
        get_fitter("vae", "msdki", config="huge")
    with pytest.raises(ValueError, match="precision"):
        get_fitter("vae-gmm", "msdki", precision="half")


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


def test_ssl_leaves_the_saturated_start():
    """The voxelwise baseline starts at the median of quick per-voxel estimates and compresses
    the loss of voxels whose signal at high b is many times S0. From the old start (every
    output mid-range) it stayed where MSDKI's signal explodes: white-matter D RMSE 0.88 and
    0.72 overall after these 40 epochs, against 0.16 and 0.24 now."""
    sim = simulate("paper-msdki", "hcp", snr=20, n_voxels=2000, seed=1)
    r = get_fitter("ssl", "msdki", epochs=40, min_epochs=40).fit(sim.signals, sim.acquisition)
    wm = sim.labels == 0
    assert np.sqrt(np.mean((r.params["D"][wm] - sim.truth["D"][wm]) ** 2)) < 0.4
    assert np.sqrt(np.mean((r.params["D"] - sim.truth["D"]) ** 2)) < 0.4


def test_shell_means_in_blocks_equal_one_pass(sim, monkeypatch):
    """working_signals reduces a scan in blocks of rows (its temporaries stay small); the
    block boundaries change nothing."""
    import mixmap.fitting.base as base

    sch = Scheme.build(get_model("msdki"), sim.acquisition, True, "cpu")
    y = torch.as_tensor(sim.signals[:101])
    one = sch.working_signals(y)
    monkeypatch.setattr(base, "WORKING_BLOCK_ELEMENTS", 7 * sim.acquisition.n)  # 15 blocks
    blocks = sch.working_signals(y)
    for a, b in zip(one, blocks, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert blocks[0].shape == (101, len(sch.groups)) and blocks[1].shape == (101,)


@pytest.mark.parametrize("method", ["vae", "vae-gmm"])
def test_paper_config_fits_saves_and_reloads(sim, method, tmp_path):
    kw = {"n_components": 2} if method == "vae-gmm" else {}
    f = get_fitter(method, "msdki", config="paper", epochs=4, min_epochs=1, **kw)
    r = f.fit(sim.signals[:200], sim.acquisition)
    assert r.settings["latent_dim"] == 4 and r.settings["decoder"] == "linear"
    f.save(tmp_path / "p")
    r2 = load_fitter(tmp_path / "p").apply(sim.signals[:200], sim.acquisition)
    np.testing.assert_array_equal(r2.params["K"], r.params["K"])


def test_interrupted_training_resumes_to_the_same_maps(sim, tmp_path):
    """Kill training after a few epochs (checkpoint left behind), resume: same maps as an
    uninterrupted run, and the checkpoint is refused for other data."""
    data = sim.signals[:200]
    kw = {**FAST, "epochs": 8, "min_epochs": 8, "n_components": 2}
    full = get_fitter("vae-gmm", "msdki", seed=5, **kw).fit(data, sim.acquisition)

    ckpt = tmp_path / "ckpt.pt"
    f = get_fitter("vae-gmm", "msdki", seed=5, **kw)
    f.use_checkpoint(ckpt)
    interrupt_training(f, data, sim.acquisition, after_epoch=4)
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


def test_kl_warmup_does_not_trip_the_explosion_guard(caplog):
    """Ball-stick at high SNR: the KL term starts at over 1,000 nats (the prior starts narrow),
    so while the warm-up raises its weight from 0.1 to 1 the training loss rises tenfold
    although the ELBO improves every epoch. The old guard (loss > best + 10·(1 + |best|)) took
    that for an explosion, undid the epochs and halved the learning rate again and again (the
    under-trained real-data maps of issue #5); the guard now watches the loss at the final KL
    weight."""
    sim = simulate("ball-stick", clinical_scheme(), snr=100, n_voxels=400, seed=0)
    f = get_fitter("vae-gmm", "ball-stick", epochs=10, seed=0, refine_steps=0, n_samples=4)
    caplog.set_level("WARNING")
    res = f.fit(sim.signals, sim.acquisition)
    assert "exploding" not in caplog.text
    assert [h["epoch"] for h in res.history] == list(range(10))
    assert {h["lr"] for h in res.history} == {f.lr}
    # the grid refit of the prior needs at most two parameters besides S0 and no direction
    assert "grid" not in res.settings["empirical_bayes"]
    loss = [h["loss"] for h in res.history]
    final = [h["loss_final"] for h in res.history]
    # training was fine: the loss at the final weight and the ELBO improve ...
    assert final[-1] < final[0] and res.history[-1]["elbo"] > res.history[0]["elbo"]
    # ... while the training loss rose past the old rule's threshold (the case under test)
    assert any(v > min(loss[:i]) + 10 * (1 + abs(min(loss[:i])))
               for i, v in enumerate(loss) if i)


def test_explosion_rule():
    # warm-up: the watched loss (at the final KL weight) falls, nothing fires
    final = [1384.6, 1358.6, 1337.6, 1307.3, 1267.1, 1214.2, 1161.2, 1105.3, 1066.3, 1032.8]
    assert not any(epoch_exploded(v, min(final[:i]), final[0])
                   for i, v in enumerate(final) if i)
    # an ELBO's zero is arbitrary: a best near 0 does not make hundreds of nats an explosion
    # when training itself moved the loss by hundreds of nats
    assert not epoch_exploded(300.0, 2.0, 900.0)
    assert epoch_exploded(2e4, 2.0, 900.0)
    assert epoch_exploded(float("nan"), 2.0, 900.0)
    assert epoch_exploded(float("inf"), 2.0, 900.0)
    assert not epoch_exploded(5.0, math.inf, math.inf)  # the first epoch has nothing to beat
    assert epoch_exploded(0.5, 0.01, 0.02) is False and epoch_exploded(12.0, 0.01, 0.02)


def test_exploding_epoch_is_undone_and_training_recovers(sim, caplog):
    """An epoch whose loss at the final KL weight jumps 10⁴-fold is undone (weights and
    optimiser restored), the learning rate halved, and training goes on."""
    f = get_fitter("vae-gmm", "msdki", **{**FAST, "epochs": 8, "n_components": 2})
    original = f._loss

    def blow_up_epoch_3(batch, scheme, epoch):
        loss, terms = original(batch, scheme, epoch)
        if epoch == 3:
            terms = {**terms, "loss_final": terms["loss_final"].abs() * 1e4 + 1e6}
        return loss, terms

    f._loss = blow_up_epoch_3
    caplog.set_level("WARNING")
    res = f.fit(sim.signals[:300], sim.acquisition)
    assert "an exploding epoch loss; step undone" in caplog.text
    epochs = [h["epoch"] for h in res.history]
    assert 3 not in epochs and epochs[:3] == [0, 1, 2] and 4 in epochs
    lrs = {h["epoch"]: h["lr"] for h in res.history}
    assert lrs[2] == pytest.approx(f.lr) and lrs[4] == pytest.approx(f.lr / 2)
    for v in res.params.values():
        assert np.isfinite(v).all()


def test_encode_gives_posterior_samples_that_average_to_the_maps(sim, gmm_fit):
    """encode: documented shapes and coordinates; the samples are draws from the posterior the
    maps average (their mean is the map within Monte-Carlo error), and q(y|x) is the map's."""
    fitter, res = gmm_fit
    S = 400
    lat = fitter.encode(sim.signals, sim.acquisition, n_samples=S)
    n, K = sim.signals.shape[0], fitter.n_components
    assert lat.z.shape == (n, S, 3) and lat.z_prior.shape == (n, S, 3)
    assert lat.axes == ["S0", "D", "K"] and lat.space.startswith("unbounded parameters")
    assert lat.prior_space.startswith("bounded parameters")
    assert lat.cluster_probs.shape == (n, K)
    np.testing.assert_allclose(lat.cluster_probs, res.cluster_probs, atol=1e-5)
    assert lat.prior_means.shape == (K, 3) and lat.prior_stds.shape == (K, 3)
    assert lat.prior_weights.sum() == pytest.approx(1.0, abs=1e-5)
    model = get_model("msdki")
    theta = model.split(torch.as_tensor(lat.z))
    for name in ("D", "K"):
        # the prior's coordinates are the bounded parameters themselves
        np.testing.assert_allclose(lat.z_prior[..., model.parameter_names.index(name)],
                                   theta[name].numpy(), rtol=1e-5, atol=1e-6)
        mean = theta[name].numpy().mean(1)
        err = np.abs(mean - res.params[name]) / (res.std[name] / np.sqrt(S) + 1e-6)
        # (a fresh set of draws, not the maps' own, gives a median near 9 here)
        assert np.median(err) < 1.5 and np.quantile(err, 0.99) < 5, name
    # the two clusters of the preset land near two different prior components
    near = np.linalg.norm(lat.z_prior.mean(1)[:, None, 1:] - lat.prior_means[None, :, 1:],
                          axis=-1).argmin(1)
    assert {int(np.bincount(near[sim.labels == c]).argmax()) for c in (0, 1)} == {0, 1}
    with pytest.raises(ValueError, match="n_samples"):
        fitter.encode(sim.signals, sim.acquisition, n_samples=0)


def test_encode_paper_config_has_an_abstract_latent(sim):
    f = get_fitter("vae-gmm", "msdki", config="paper", epochs=3, min_epochs=1, hidden=16,
                   n_samples=4, latent_dim=4)
    f.fit(sim.signals[:200], sim.acquisition)
    lat = f.encode(sim.signals[:200], sim.acquisition, n_samples=5)
    assert lat.z.shape == (200, 5, 4) and lat.axes == ["z1", "z2", "z3", "z4"]
    assert lat.space == lat.prior_space == "latent"
    np.testing.assert_array_equal(lat.z, lat.z_prior)


def test_plateau_rule_follows_the_loss_at_the_final_weights(sim):
    """A loss raised on purpose after the first epoch (as a KL warm-up raises it) must not stop
    training: the plateau rule, like the guard, follows ``loss_final``. With the old rule the
    first epoch's loss stayed the best and training stopped at ``min_epochs``."""
    from mixmap.fitting.learned.ssl import SelfSupervisedFitter

    class Raised(SelfSupervisedFitter):
        def _loss(self, batch, scheme, epoch):
            mse, terms = super()._loss(batch, scheme, epoch)
            raised = mse + (0.0 if epoch == 0 else 1e4)  # same gradients, a higher loss
            return raised, {"loss": raised.detach(), "loss_final": mse.detach()}

    f = Raised("msdki", epochs=40, min_epochs=5, patience=3, batch_size=64, lr=3e-3, seed=0)
    res = f.fit(sim.signals, sim.acquisition)
    final = [h["loss_final"] for h in res.history]
    assert len(res.history) > 8 and final[-1] < final[4]


def test_importance_proposal_density_is_that_of_its_draws(sim, gmm_fit):
    """log r(z) from VAEFitter._propose is the density the draws come from: for any density
    g, E_r[g(z) / r(z)] = 1. Checked for the prior, for q's mixture and for the extra part
    around the least-squares estimate, which are parts of r (so the ratios are bounded and
    the check is tight), with and without that part."""
    from mixmap.fitting.learned.latent import mixture_log_prob

    f, _ = gmm_fit
    data, scheme, _ = f._apply_data(sim.signals[:5], sim.acquisition, False)
    with f._frozen():
        log_qy, mu, L = f._q_chunk(data, scheme)
    extra = f._extra_parts(data, scheme, log_qy, L)
    assert len(extra) == 1 and extra[0][0].shape == (5, mu.shape[-1])
    one = torch.zeros(5, 1)
    with torch.no_grad():
        for parts in ([], extra):
            z, log_r = f._propose(log_qy, mu, L, 30_000, torch.Generator().manual_seed(0),
                                  parts)
            assert z.shape == (30_000, 5, mu.shape[-1]) and torch.isfinite(log_r).all()
            densities = [f.net.prior.log_prob(z), mixture_log_prob(z, log_qy, mu, L)] + [
                mixture_log_prob(z, one, m[:, None], c[:, None]) for m, c in parts]
            for log_g in densities:
                ratio = torch.exp(log_g - log_r).double().mean(0)
                np.testing.assert_allclose(ratio.numpy(), 1.0, atol=0.03)


def test_empirical_bayes_fits_the_prior_to_the_data():
    """After training, the Monte-Carlo EM refit moves the learned prior toward the mixture
    that made the data (the ELBO's prior is wider than it where the data say little) and the
    maps improve; the same training without it is the control (same seed, same network)."""
    preset = Preset("narrow", "msdki", (
        Cluster("tissue", 0.5, {"D": 1.0, "K": 1.2}, {"D": 0.15, "K": 0.15}),
        Cluster("fluid", 0.5, {"D": 3.0, "K": 0.0}, {"D": 0.05, "K": 0.05}),
    ), n_voxels=1500)
    data = simulate(preset, "hcp", snr=20, seed=3)
    kw = dict(n_components=2, epochs=60, min_epochs=30, batch_size=128, hidden=32,
              n_samples=96, refine_steps=50, seed=0)
    runs = {}
    for rounds in (0, 4):
        f = get_fitter("vae-gmm", "msdki", eb_rounds=rounds, eb_samples=96, **kw)
        runs[rounds] = (f, f.fit(data.signals, data.acquisition))
    info = runs[4][1].settings["empirical_bayes"]
    assert info["voxels"] == 1500 and len(info["rounds"]) == 4
    assert "empirical_bayes" not in runs[0][1].settings
    grid = info["grid"]  # MSDKI: the prior is refitted on a grid after the sampled rounds
    assert grid["voxels"] == 1500 and grid["grid_points"] == 96 * 96
    assert grid["log_evidence_per_voxel"] >= grid["log_evidence_per_voxel_before"]
    fluid = data.labels == 1
    names = [p.name for p in get_model("msdki").parameters]

    def fluid_spread(f):
        k = int(torch.argmax(f.net.prior.mu[:, names.index("D")]))
        return float(f.net.prior.log_std[k, names.index("D")].exp())

    def rmse(res, name):
        return float(np.sqrt(np.mean((res.params[name] - data.truth[name])[fluid] ** 2)))

    before, after = fluid_spread(runs[0][0]), fluid_spread(runs[4][0])
    assert abs(after - 0.05) < 0.5 * abs(before - 0.05), (before, after)
    assert rmse(runs[4][1], "D") < 0.9 * rmse(runs[0][1], "D")
    assert rmse(runs[4][1], "K") < 0.9 * rmse(runs[0][1], "K")


def test_maps_and_encode_share_draws_when_sliced_for_memory(sim, gmm_fit, monkeypatch):
    """With the posterior draws evaluated in slices of voxels (a whole-brain chunk at the
    default 384 draws would otherwise hold 0.4 GB of temporaries), encode's samples are still
    the maps' own draws: their mean is the map within Monte-Carlo error."""
    import mixmap.fitting.learned.posterior as posterior

    fitter, _ = gmm_fit
    monkeypatch.setattr(posterior, "DRAWS_PER_SLICE", fitter.n_samples * 70)  # 70 voxels a slice
    res = fitter.apply(sim.signals, sim.acquisition)
    S = 400
    lat = fitter.encode(sim.signals, sim.acquisition, n_samples=S)
    theta = get_model("msdki").split(torch.as_tensor(lat.z))
    for name in ("D", "K"):
        err = np.abs(theta[name].numpy().mean(1) - res.params[name]) / (
            res.std[name] / np.sqrt(S) + 1e-6)
        assert np.median(err) < 1.5 and np.quantile(err, 0.99) < 5, name


def test_refinement_keeps_a_voxel_whose_gradient_turns_non_finite_and_refines_the_rest(
        sim, gmm_fit):
    """One voxel with a NaN in its signal: its q stays the encoder's, every other voxel's
    refinement is exactly what it is without that voxel's NaN (each voxel has its own
    parameters and loss terms; the same seed gives the same draws)."""
    from dataclasses import replace

    f, _ = gmm_fit
    data, scheme, _ = f._apply_data(sim.signals[:64], sim.acquisition, False)
    yw = data.yw.clone()
    yw[0] = float("nan")
    broken = replace(data, yw=yw)
    with f._frozen():
        with torch.no_grad():
            start = f.net.encoder(data.feats, f._base(data))
        refined = []
        for batch in (data, broken):
            torch.manual_seed(0)
            refined.append(f._refine(*start, batch, scheme))
    for s, good, bad in zip(start, *refined, strict=True):
        assert torch.isfinite(bad).all()
        torch.testing.assert_close(bad[0], s[0], rtol=0, atol=0)  # kept where it started
        torch.testing.assert_close(bad[1:], good[1:], rtol=0, atol=0)
        assert not torch.equal(good[1:], s[1:])  # and the rest were refined


@pytest.mark.parametrize("other", ["seed", "one chunk"])
def test_other_draws_move_the_maps_by_monte_carlo_error_only(sim, gmm_fit, monkeypatch,
                                                             other):
    """The maps with other random draws: another seed for them (what another device's random
    streams do), or every voxel in one chunk and one slice of draws (a GPU's sizes,
    posterior.maps_sizes) instead of small ones. Each voxel's posterior mean moves by a small
    fraction of its posterior sd: a median of 0.09-0.10 here at the default 384 draws, and
    0.10-0.11 for another seed on the 400-voxel HCP scan of the accelerator tests."""
    import mixmap.fitting.learned.posterior as posterior

    f, _ = gmm_fit
    monkeypatch.setattr(f, "n_samples", 384)  # the default's draws (the fixture has 16)
    monkeypatch.setattr(posterior, "PREDICT_CHUNK", 100)
    monkeypatch.setattr(posterior, "DRAWS_PER_SLICE", 384 * 30)
    base = f.apply(sim.signals, sim.acquisition)
    if other == "seed":
        monkeypatch.setattr(f, "seed", f.seed + 10)
    else:
        monkeypatch.setattr(posterior, "maps_sizes", lambda device: (10**6, 10**9))
    again = f.apply(sim.signals, sim.acquisition)
    for name in ("D", "K"):
        assert not np.array_equal(again.params[name], base.params[name])
        moved = np.abs(again.params[name] - base.params[name]) / np.maximum(
            base.std[name], 1e-6)
        assert np.median(moved) < 0.3, (name, np.median(moved))


def test_hyper_parameters_come_from_the_config_presets_plus_overrides():
    """A preset plus overrides; None keeps the preset's value; an unknown name or preset is a
    ValueError naming the valid ones; the signatures show each method's user-facing options."""
    import inspect

    from mixmap.fitting.learned import configs

    f = get_fitter("vae-gmm", "msdki", config="paper", hidden=None, lr=0.5)
    assert f.hidden == 256 and f.lr == 0.5 and f.n_components == 4
    assert tuple(f.hyper()) == f.hyper_names
    assert f.hyper_names[2:] == configs.field_names(configs.VAEConfig)
    with pytest.raises(ValueError, match="unknown option.*hiden.*valid options: config, "):
        get_fitter("vae", "msdki", hiden=3)
    with pytest.raises(ValueError, match="unknown config 'fast'; choose one of: "):
        get_fitter("ssl", "msdki", config="fast")
    for method in ("ssl", "vae", "vae-gmm"):
        names = [o.name for o in configs.user_options(method)]
        params = list(inspect.signature(FITTERS[method].__init__).parameters)
        assert params[2:-4] == names, method
    assert "n_components" not in [o.name for o in configs.user_options("vae")]
    opt = {o.name: o for o in configs.user_options("vae-gmm")}
    assert opt["eb_grid"].type is bool and opt["lr"].type is float and opt["lr"].default is None


def test_mixture_density_of_an_ill_conditioned_factor_is_finite():
    """q's Cholesky factor can be badly conditioned (a small diagonal beside large
    off-diagonal elements); the density divides by its diagonal only (a general inverse
    pivots and can report it singular)."""
    from mixmap.fitting.learned.latent import mixture_log_prob

    d, n = 22, 8
    g = torch.Generator().manual_seed(0)
    L = torch.tril(torch.randn(n, 1, d, d, generator=g) * 0.5, -1) + torch.diag_embed(
        torch.full((n, 1, d), 0.05))
    mu = torch.zeros(n, 1, d)
    z = mu[:, 0] + (L[:, 0] @ torch.randn(n, d, 1, generator=g))[..., 0]
    lp = mixture_log_prob(z[None], torch.zeros(n, 1), mu, L)
    assert torch.isfinite(lp).all()
