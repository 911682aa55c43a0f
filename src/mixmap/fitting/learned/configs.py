"""Hyper-parameters of the learned fitters, declared once: a frozen dataclass per family
(:class:`SSLConfig`, :class:`VAEConfig`) whose fields carry their help text, the methods they
apply to and whether the command line offers them, and named presets (``default``, ``paper``).

The fitters take a preset name plus overrides (:func:`resolve`); ``hyper_names``, the saved
``config.json`` and the fitters' keyword signatures (:func:`init_signature`) are derived from
the fields, and :func:`user_options` lists what a command line should offer per method.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, NamedTuple

SSL = ("ssl",)
VAE = ("vae", "vae-gmm")
GMM = ("vae-gmm",)
LEARNED = SSL + VAE

#: The help text of ``config``, the preset name every learned fitter takes.
CONFIG_HELP = "Learned: 'default' or 'paper'."


def option(default: Any, help: str, methods: tuple[str, ...], *, cli: bool = False):
    """A dataclass field with its metadata: ``help`` (one line), ``methods`` it applies to,
    ``cli`` (offered on the command line and as an explicit keyword of those fitters)."""
    return field(default=default, metadata={"help": help, "methods": methods, "cli": cli})


# Fields that both families have share their wording.
_EPOCHS = "Learned: maximum epochs."
_BATCH = "Learned: mini-batch size."
_LR = "Learned: Adam learning rate."
_HIDDEN = "Learned: hidden width."
_N_LAYERS = "Number of hidden layers of the network."
_PATIENCE = "Stop after this many epochs without a relative gain of tol."
_TOL = "Relative gain of the loss that counts as progress (see patience)."
_MIN_EPOCHS = "Train at least this many epochs before the plateau rule may stop."


@dataclass(frozen=True)
class SSLConfig:
    """Settings of the voxelwise self-supervised baseline (``ssl``)."""

    hidden: int | None = option(None, _HIDDEN + " (default: the number of measurements)",
                                SSL, cli=True)
    n_layers: int = option(3, _N_LAYERS, SSL)
    epochs: int = option(300, _EPOCHS, SSL, cli=True)
    batch_size: int = option(256, _BATCH, SSL, cli=True)
    lr: float = option(1e-3, _LR, SSL, cli=True)
    patience: int = option(30, _PATIENCE, SSL)
    tol: float = option(1e-4, _TOL, SSL)
    min_epochs: int = option(100, _MIN_EPOCHS, SSL)


@dataclass(frozen=True)
class VAEConfig:
    """Settings of the VAE fitters (``vae``, ``vae-gmm``); None where the fitter derives the
    value from the model (``latent_dim``, ``decoder``)."""

    latent_dim: int | None = option(
        None, "Learned: latent dimension.", VAE, cli=True)
    n_components: int = option(3, "vae-gmm: mixture components.", GMM, cli=True)
    hidden: int = option(128, _HIDDEN, VAE, cli=True)
    n_layers: int = option(3, _N_LAYERS, VAE)
    epochs: int = option(300, _EPOCHS, VAE, cli=True)
    batch_size: int = option(512, _BATCH, VAE, cli=True)
    lr: float = option(2e-3, _LR, VAE, cli=True)
    kl_weight: float = option(1.0, "Learned: KL weight (1 = true ELBO).", VAE, cli=True)
    warmup_epochs: int = option(
        10, "Epochs over which the KL weight rises linearly to kl_weight.", VAE)
    likelihood: str = option("gaussian", "Learned: gaussian | rician.", VAE, cli=True)
    n_samples: int = option(384, "Learned: posterior samples per voxel.", VAE, cli=True)
    full_cov: bool = option(True, "Full-covariance (else diagonal) Gaussian q(z|x,y).", VAE)
    lsq_features: bool = option(
        True, "The encoder also sees the voxel's least-squares estimate.", VAE)
    shell_features: bool = option(
        True, "Encoder features from shell means (direction-independent models).", VAE)
    decoder: str | None = option(
        None, "identity | affine | linear (default: identity for vae-gmm, affine for vae).",
        VAE)
    y_inference: str = option(
        "exact", "exact (sum over components) or gumbel (straight-through Gumbel-softmax).",
        VAE)
    refine_steps: int = option(
        100, "vae, vae-gmm: per-voxel refinement steps of q before the maps (default 100; "
        "fewer is faster, 0 = the encoder's q alone).", VAE, cli=True)
    refine_lr: float = option(0.04, "Adam learning rate of the per-voxel refinement.", VAE)
    posterior: str = option(
        "is", "is (importance-weighted posterior moments) or q (moments of q).", VAE)
    patience: int = option(30, _PATIENCE, VAE)
    tol: float = option(1e-4, _TOL, VAE)
    min_epochs: int = option(100, _MIN_EPOCHS, VAE)
    prior_update: str = option(
        "em", "em (closed-form M-step after each epoch) or grad (Adam) for the mixture prior.",
        GMM)
    prior_space: str = option(
        "bounded", "bounded (prior over the bounded parameters) or latent.", GMM)
    eb_rounds: int = option(
        6, "vae-gmm: empirical-Bayes rounds that refit the mixture prior to the scan after "
        "training (default 6; 0 = the prior the ELBO learned).", GMM, cli=True)
    eb_steps: int = option(10, "EM updates per empirical-Bayes round (on its draws).", GMM)
    eb_voxels: int = option(20_000, "Most voxels the empirical-Bayes refit uses.", GMM)
    eb_samples: int = option(192, "Importance draws per voxel in each empirical-Bayes round.",
                             GMM)
    eb_split_merge: bool = option(
        True, "Try a split-and-merge move of the mixture between empirical-Bayes rounds.", GMM)
    eb_grid: bool = option(
        True, "vae-gmm: end the empirical-Bayes refit on a grid (marginal likelihood by "
        "quadrature; MSDKI and other models with at most two parameters besides S0, Gaussian "
        "or Rician likelihood; default on).", GMM, cli=True)
    grid_posterior: str = option(
        "auto", "vae-gmm: for models a grid covers (MSDKI), the maps of the gridded parameters "
        "and S0 from the posterior under a non-parametric prior fitted to the scan on the grid "
        "(S0 integrated out, Rician likelihood): auto (for magnitude data, i.e. no negative "
        "values, as in real scans), on, off.", GMM, cli=True)
    precision: str = option(
        "float32", "vae, vae-gmm: the encoder network's arithmetic, float32 (default) or "
        "bfloat16 / float16 mixed precision (physics and posterior stay float32).", VAE,
        cli=True)


SSL_PRESETS: dict[str, SSLConfig] = {
    "paper": SSLConfig(hidden=None, n_layers=3, epochs=100, batch_size=256, lr=1e-3,
                       patience=15, tol=1e-3, min_epochs=30),
    "default": SSLConfig(hidden=None, n_layers=3, epochs=300, batch_size=256, lr=1e-3,
                         patience=30, tol=1e-4, min_epochs=100),
}

VAE_PRESETS: dict[str, VAEConfig] = {
    "default": VAEConfig(
        latent_dim=None, n_components=3, hidden=128, n_layers=3, epochs=300, batch_size=512,
        lr=2e-3, kl_weight=1.0, warmup_epochs=10, likelihood="gaussian", n_samples=384,
        full_cov=True, lsq_features=True, shell_features=True, decoder=None,
        y_inference="exact", refine_steps=100, refine_lr=0.04, posterior="is", patience=30,
        tol=1e-4, min_epochs=100, prior_update="em", prior_space="bounded", eb_rounds=6,
        eb_steps=10, eb_voxels=20_000, eb_samples=192, eb_split_merge=True, eb_grid=True,
        grid_posterior="auto", precision="float32"),
    "paper": VAEConfig(
        latent_dim=4, n_components=4, hidden=256, n_layers=2, epochs=300, batch_size=256,
        lr=1e-3, kl_weight=1.0, warmup_epochs=0, likelihood="gaussian", n_samples=128,
        full_cov=False, lsq_features=False, shell_features=False, decoder="linear",
        y_inference="gumbel", refine_steps=0, refine_lr=0.02, posterior="q", patience=20,
        tol=1e-4, min_epochs=40, prior_update="grad", prior_space="latent", eb_rounds=0,
        eb_steps=10, eb_voxels=20_000, eb_samples=192, eb_split_merge=False, eb_grid=False,
        grid_posterior="off", precision="float32"),
}


def field_names(config_class: type) -> tuple[str, ...]:
    """The hyper-parameter names of a config dataclass, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(config_class))


def resolve(presets: dict, config: str | None, overrides: dict) -> dict:
    """The preset ``config`` (None: ``default``) with ``overrides`` applied, as a dict of field
    values; an override of None keeps the preset's value. An unknown preset or override name
    is a ValueError that lists the valid ones."""
    config = config or "default"
    if config not in presets:
        raise ValueError(f"unknown config {config!r}; choose one of: {', '.join(presets)}")
    preset = presets[config]
    names = field_names(type(preset))
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid options: "
                         f"config, {', '.join(names)}")
    return {k: (getattr(preset, k) if overrides.get(k) is None else overrides[k])
            for k in names}


class Option(NamedTuple):
    """One user-facing option of a method: its name, value type, default and help."""

    name: str
    type: type
    default: None
    help: str


def _value_type(config_class: type, name: str) -> type:
    hint = typing.get_type_hints(config_class)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


CONFIG_CLASSES: dict[str, type] = {"ssl": SSLConfig, "vae": VAEConfig, "vae-gmm": VAEConfig}


def user_options(method: str) -> list[Option]:
    """The command-line options of a learned ``method``: ``config`` first, then every field
    marked ``cli`` that applies to it; the default is None (= the preset's value)."""
    if method not in CONFIG_CLASSES:
        raise ValueError(f"unknown learned method {method!r}; choose one of: "
                         f"{', '.join(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[method]
    out = [Option("config", str, None, CONFIG_HELP)]
    for f in dataclasses.fields(cls):
        if f.metadata["cli"] and method in f.metadata["methods"]:
            out.append(Option(f.name, _value_type(cls, f.name), None, f.metadata["help"]))
    return out


def init_signature(method: str, extra: dict[str, Any] | None = None) -> inspect.Signature:
    """The keyword signature of a learned fitter's ``__init__``: model, ``config``, the
    method's :func:`user_options`, ``device``, ``seed``, ``quiet``, then ``**advanced`` (the
    other fields, checked by :func:`resolve`). ``extra``: more keyword defaults (e.g. a
    ``prior``) placed after ``config``."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("config", kw, default="default", annotation=str)]
    params += [inspect.Parameter(k, kw, default=v) for k, v in (extra or {}).items()]
    params += [inspect.Parameter(o.name, kw, default=None, annotation=o.type | None)
               for o in user_options(method)[1:]]
    params += [inspect.Parameter("device", kw, default="cpu", annotation=str),
               inspect.Parameter("seed", kw, default=0, annotation=int),
               inspect.Parameter("quiet", kw, default=True, annotation=bool),
               inspect.Parameter("advanced", inspect.Parameter.VAR_KEYWORD)]
    return inspect.Signature(params, return_annotation=None)


__all__ = ["SSLConfig", "SSL_PRESETS", "VAEConfig", "VAE_PRESETS", "Option", "field_names",
           "init_signature", "resolve", "user_options"]
