"""Relaxometry: mixmap's lsq against a per-voxel scipy fit, and vae-gmm against lsq and the Bayes
floor, per tissue class.

    python benchmarks/relaxometry.py                  # both parts; rewrites docs/relaxometry.json
                                                      # (relaxometry-speed.json: the speed part)
                                                      # and the "relaxometry" section of RESULTS.md
    python benchmarks/relaxometry.py --part speed     # lsq against scipy only (100,000 voxels)
    python benchmarks/relaxometry.py --part classes --models t1-ir --snrs 10   # a subset; merged
    python benchmarks/relaxometry.py --section-only

Every model on its brain preset (:mod:`mixmap.simulation.presets`: white matter, grey matter
and CSF at 3 T), Rician noise (magnitude images) at the SNR shown, relative to M0 = 1 (for
t1-vfa: M0 = 10, so that its largest signals, 0.4-0.9, see about the nominal SNR).

- ``speed``: 100,000 voxels at SNR 20 (mwf: 100) on the research protocol, scipy timed on
  10,000 of them and scaled (its fits are independent). The reference is
  what users write by hand: ``scipy.optimize.least_squares`` per voxel (trust-region
  reflective, the same bounds), started from the best of a 1-D grid over the relaxation time
  with the scale solved in closed form (MWF: T2my 20 ms, MWF 0.1 and a grid over T2ie). Both
  in one process, one after the other; the ratio is scipy's seconds over lsq's.
- ``classes``: 5,000 voxels per protocol (research and clinical) and SNR (20 and 10; mwf: 100
  and 50, :data:`MODEL_SNRS`): lsq,
  vae-gmm at its defaults and the Bayes reference (the posterior mean under the preset's true
  prior and Rician noise: no method beats it on average); RMSE per class, vae-gmm over Bayes.
  ``--methods vae-gmm-rician`` adds vae-gmm trained with the Rician likelihood (a variant
  table; run for T2 on 32 echoes, whose late echoes sit in the noise floor).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from phantoms import keep_entry  # noqa: E402

from mixmap.evaluation.bayes import bayes_reference  # noqa: E402
from mixmap.fitting import get_fitter  # noqa: E402
from mixmap.models import get_model  # noqa: E402
from mixmap.paper.report import machine_description, markdown_table, update_section  # noqa: E402
from mixmap.simulation import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "relaxometry.json"
#: The speed part's results, kept apart so that the two parts can run at once.
SPEED_JSON = ROOT / "docs" / "relaxometry-speed.json"
RESULTS = ROOT / "docs" / "RESULTS.md"
#: model -> (preset, research protocol, clinical protocol or None, scored parameters)
MODELS = {
    "t2": ("t2-brain", "mese-32", "mese-16", ("T2",)),
    "t2star": ("t2star-brain", "mgre-12", "mgre-6", ("T2star",)),
    "mwf": ("mwf-brain", "mese-32", None, ("MWF", "T2ie")),
    "t1-ir": ("t1-ir-brain", "ir-10", "ir-4", ("T1",)),
    "t1-vfa": ("t1-vfa-brain", "vfa-6", "vfa-2", ("T1",)),
}
SNRS = (20, 10)
#: Myelin water imaging is done at first-echo SNRs of 100 and more: at 20 no method sees a
#: 10 % pool decaying within 40 ms (lsq's MWF RMSE in white matter is 0.27 at 50).
MODEL_SNRS = {"mwf": (100, 50)}
#: The SNR of the speed comparison (mwf: its usual SNR).
SPEED_SNR = {"mwf": 100}
SPEED_VOXELS = 100_000
#: The voxels the scipy reference fits (its time is scaled to :data:`SPEED_VOXELS`).
SCIPY_VOXELS = 10_000
CLASS_VOXELS = 5000
#: Points of the scipy reference's start grid over the relaxation time.
START_POINTS = 40


# ------------------------------------------------------------------------ the scipy reference
def _forward(model, acq):
    """signal(θ) for one voxel, θ in the model's parameter order: numpy, as written by hand."""
    fields = {n: acq.field(n) for n in acq.fields}
    if model.name in ("t2", "t2star"):
        te = fields["TE"]
        return lambda t: t[0] * np.exp(-te / t[1])
    if model.name == "mwf":
        te = fields["TE"]
        return lambda t: t[0] * (t[1] * np.exp(-te / t[2]) + (1 - t[1]) * np.exp(-te / t[3]))
    if model.name == "t1-ir":
        ti = fields["TI"]
        return lambda t: np.abs(t[0] * (1 - t[2] * np.exp(-ti / t[1])))
    if model.name == "t1-vfa":
        a, tr = np.deg2rad(fields["flip_angle"]), fields["TR"]

        def vfa(t):
            e1 = np.exp(-tr / t[1])
            return t[0] * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1)

        return vfa
    raise ValueError(f"no scipy reference for {model.name}")


def _start_grid(model, acq, y: np.ndarray) -> np.ndarray:
    """The best of :data:`START_POINTS` values of the main relaxation time (log-spaced over its
    bounds) with the scale solved in closed form, the other parameters at typical values."""
    names = model.parameter_names
    typical = {"MWF": 0.1, "T2my": 20.0, "k": 1.9}
    main = {"t2": "T2", "t2star": "T2star", "mwf": "T2ie", "t1-ir": "T1", "t1-vfa": "T1"}[
        model.name]
    p = model.parameter(main)
    values = np.geomspace(p.lower * 1.01, p.upper * 0.99, START_POINTS)
    theta = np.array([[typical.get(n, 1.0) for n in names]] * START_POINTS)
    theta[:, names.index(main)] = values
    with torch.no_grad():
        basis = model.forward({n: torch.as_tensor(theta[:, i]) for i, n in enumerate(names)},
                              acq).numpy()  # (P, m), scale 1
    scale = np.clip(y @ basis.T / (basis * basis).sum(1), 1e-6, None)  # (n, P)
    cost = ((y[:, None, :] - scale[..., None] * basis[None]) ** 2).sum(-1)
    best = cost.argmin(1)
    start = theta[best]
    start[:, names.index(model.scale_parameter)] = scale[np.arange(y.shape[0]), best]
    return start


def scipy_fit(model, acq, signals: np.ndarray) -> dict[str, np.ndarray]:
    """Per-voxel ``scipy.optimize.least_squares`` (trf with Jacobian scaling, numerical
    derivatives, the model's bounds; the scale parameter in [0, 100 × the largest signal]) from
    :func:`_start_grid`."""
    from scipy.optimize import least_squares

    names = model.parameter_names
    f = _forward(model, acq)
    y = signals.astype(np.float64)
    out = np.zeros((y.shape[0], len(names)))
    top = 100.0 * float(np.abs(y).max())
    lo = np.array([0.0 if n == model.scale_parameter else model.parameter(n).lower
                   for n in names])
    hi = np.array([top if n == model.scale_parameter else model.parameter(n).upper
                   for n in names])
    starts = np.clip(_start_grid(model, acq, y), lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(y.shape[0]):
            out[i] = least_squares(lambda t, yi=y[i]: f(t) - yi, starts[i], bounds=(lo, hi),
                                   method="trf", x_scale="jac").x
    return {n: out[:, j] for j, n in enumerate(names)}


# ------------------------------------------------------------------------ scoring
def rmse_by_class(est: dict, truth: dict, labels, names, params) -> dict:
    out = {}
    for p in params:
        err = np.asarray(est[p], np.float64) - truth[p]
        out[p] = {"all": float(np.sqrt(np.mean(err ** 2))),
                  **{c: float(np.sqrt(np.mean(err[labels == k] ** 2)))
                     for k, c in enumerate(names)}}
    return out


def run_speed(model_name: str, seed: int = 0) -> dict:
    """lsq on :data:`SPEED_VOXELS` voxels and scipy on the first :data:`SCIPY_VOXELS` of them;
    both scored on those, scipy's time also scaled to all (its fits are independent)."""
    preset, scheme, _, params = MODELS[model_name]
    snr = SPEED_SNR.get(model_name, 20)
    sim = simulate(preset, scheme, snr=snr, noise="rician", n_voxels=SPEED_VOXELS, seed=seed)
    model = get_model(model_name)
    names = sim.class_names
    sub = slice(0, SCIPY_VOXELS)
    truth = {k: v[sub] for k, v in sim.truth.items()}
    entry = {"model": model_name, "scheme": scheme, "snr": snr, "n_voxels": SPEED_VOXELS,
             "scipy_voxels": SCIPY_VOXELS, "methods": {}}
    for method in ("lsq", "scipy"):
        print(f"  speed {model_name}: {method}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        if method == "scipy":
            est = scipy_fit(model, sim.acquisition, sim.signals[sub])
            seconds = (time.perf_counter() - t) * SPEED_VOXELS / SCIPY_VOXELS
        else:
            est = get_fitter("lsq", model_name).fit(sim.signals, sim.acquisition).params
            seconds = time.perf_counter() - t
            est = {k: v[sub] for k, v in est.items()}
        entry["methods"][method] = {"seconds": seconds,
                                    "rmse": rmse_by_class(est, truth, sim.labels[sub], names,
                                                          params)}
    return entry


#: The methods of the class tables, and a variant: vae-gmm trained with the Rician likelihood
#: (``--likelihood rician``), for echo trains that decay into the noise floor.
METHODS = ("bayes", "lsq", "vae-gmm")
VARIANTS = {"vae-gmm-rician": ("vae-gmm", {"likelihood": "rician"})}


def run_classes(model_name: str, scheme: str, snr: float, seed: int = 0,
                methods=METHODS) -> dict:
    preset, _, _, params = MODELS[model_name]
    sim = simulate(preset, scheme, snr=snr, noise="rician", n_voxels=CLASS_VOXELS, seed=seed)
    names = sim.class_names
    entry = {"model": model_name, "scheme": scheme, "snr": snr, "n_voxels": CLASS_VOXELS,
             "methods": {}}
    for method in methods:
        print(f"  {model_name} {scheme} SNR {snr:g}: {method}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        if method == "bayes":
            est = bayes_reference(sim.signals, sim.acquisition, preset, sim.sigma, "rician")
        else:
            name, opts = VARIANTS.get(method, (method, {}))
            opts = opts if name == "lsq" else {"seed": seed, **opts}
            est = get_fitter(name, model_name, **opts).fit(sim.signals, sim.acquisition).params
        entry["methods"][method] = {"seconds": time.perf_counter() - t,
                                    "rmse": rmse_by_class(est, sim.truth, sim.labels, names,
                                                          params)}
    return entry


# ------------------------------------------------------------------------ the section
CLASSES = ("WM", "GM", "CSF")


def _speed_rows(results: dict) -> list:
    rows = []
    for name in MODELS:
        e = results.get(f"speed/{name}")
        if e is None:
            continue
        lsq, ref = e["methods"]["lsq"], e["methods"]["scipy"]
        for p in MODELS[name][3]:
            rows.append([name, e["scheme"], f"{e['snr']:g}", p, ref["rmse"][p]["all"],
                         lsq["rmse"][p]["all"],
                         f"{ref['seconds']:.1f}", f"{lsq['seconds']:.1f}",
                         f"{ref['seconds'] / lsq['seconds']:.0f}×"])
    return rows


def _class_rows(results: dict) -> tuple[list, list, list[str]]:
    rows, variants, worse = [], [], []
    for key in sorted(k for k in results if k.startswith("classes/")):
        e = results[key]
        ms = e["methods"]
        for p in MODELS[e["model"]][3]:
            b, lsq, gmm = (ms[m]["rmse"][p] for m in ("bayes", "lsq", "vae-gmm"))
            rows.append([e["model"], e["scheme"], f"{e['snr']:g}", p,
                         *(f"{lsq[c]:.4g} / {gmm[c]:.4g} / {b[c]:.4g}" for c in CLASSES),
                         f"{gmm['all'] / b['all']:.2f}", f"{ms['vae-gmm']['seconds']:.0f}"])
            if "vae-gmm-rician" in ms:
                ric = ms["vae-gmm-rician"]["rmse"][p]
                variants.append([e["model"], e["scheme"], f"{e['snr']:g}", p,
                                 *(f"{gmm[c]:.4g} / {ric[c]:.4g} / {b[c]:.4g}" for c in CLASSES),
                                 f"{ms['vae-gmm']['seconds']:.0f} / "
                                 f"{ms['vae-gmm-rician']['seconds']:.0f}"])
            worse += [f"{e['model']} {e['scheme']} SNR {e['snr']:g} {p} {c} "
                      f"({gmm[c]:.4g} vs {lsq[c]:.4g})"
                      for c in CLASSES if gmm[c] > lsq[c]]
    return rows, variants, worse


def section(results: dict) -> str:
    body = ["## Relaxometry: lsq against scipy, vae-gmm against lsq and the Bayes floor", "",
            "Regenerate: `python benchmarks/relaxometry.py` (docs/relaxometry.json). Brain "
            "presets at 3 T (" + ", ".join(f"`{v[0]}`" for v in MODELS.values()) + "), Rician "
            "noise at the SNR shown (relative to M0 = 1). Times on "
            f"{machine_description()}, one run each, in one process.", "",
            f"### lsq against a per-voxel scipy fit ({SPEED_VOXELS:,} voxels)", "",
            "scipy: `least_squares` (trf, the same bounds) per voxel from the best of a "
            f"{START_POINTS}-point grid over the relaxation time, timed on {SCIPY_VOXELS:,} of "
            f"the voxels and scaled to {SPEED_VOXELS:,} (each voxel's fit is independent); lsq "
            f"timed on all {SPEED_VOXELS:,}; RMSE of both over the same {SCIPY_VOXELS:,}.", ""]
    rows = _speed_rows(results)
    if rows:
        body += [markdown_table(["model", "protocol", "SNR", "parameter", "scipy RMSE", "lsq RMSE",
                                 "scipy s", "lsq s", "lsq speed-up"], rows, floatfmt=".4g"),
                 ""]
    rows, variants, worse = _class_rows(results)
    body += [f"### Per tissue class ({CLASS_VOXELS:,} voxels): lsq / vae-gmm / Bayes RMSE", "",
             "Units: ms, MWF 1. `vae-gmm / Bayes`: overall RMSE over the floor's (the goal is "
             "at most 1.25).", ""]
    if rows:
        body += [markdown_table(["model", "protocol", "SNR", "parameter", *CLASSES,
                                 "vae-gmm / Bayes", "vae-gmm s"], rows), ""]
    body.append("vae-gmm worse than lsq in: " + ("; ".join(worse) or "none") + ".")
    if variants:
        body += ["", "vae-gmm trained with the Rician likelihood (`--likelihood rician`) against "
                 "its default (Gaussian training, a grid posterior under Rician noise only for "
                 "two-parameter models): default / rician / Bayes RMSE, and seconds.", "",
                 markdown_table(["model", "protocol", "SNR", "parameter", *CLASSES,
                                 "seconds"], variants)]
    return "\n".join(body).rstrip() + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("speed", "classes", "both"), default="both")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--snrs", nargs="+", type=float, default=None,
                    help="default: 20 and 10 (mwf: 100 and 50)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    choices=[*METHODS, *VARIANTS])
    ap.add_argument("--schemes", nargs="+", default=None, help="default: the model's two")
    ap.add_argument("--section-only", action="store_true")
    args = ap.parse_args(argv)
    results = json.loads(JSON.read_text()) if JSON.exists() else {}
    speed = json.loads(SPEED_JSON.read_text()) if SPEED_JSON.exists() else {}
    if not args.section_only:
        for name in args.models:
            if args.part in ("speed", "both"):
                keep_entry(speed, f"speed/{name}", run_speed(name), SPEED_JSON)
            if args.part in ("classes", "both"):
                for scheme in args.schemes or [s for s in MODELS[name][1:3] if s]:
                    for snr in args.snrs or MODEL_SNRS.get(name, SNRS):
                        keep_entry(results, f"classes/{name}/{scheme}/{snr:g}",
                                   run_classes(name, scheme, snr, methods=args.methods), JSON)
    update_section(RESULTS, "relaxometry", section({**results, **speed}))


if __name__ == "__main__":
    main()
