"""NODDI (Watson) against AMICO, on the two example brain scans and on realistic phantoms of them.

    bash benchmarks/setup_amico.sh                     # makes .venv-amico (AMICO's licence:
                                                       # research use; never imported by mixmap)
    python benchmarks/noddi.py                         # everything; rewrites docs/noddi.json
                                                       # and the "noddi" section of RESULTS.md
    python benchmarks/noddi.py --parts real --methods lsq amico   # a subset; merged
    python benchmarks/noddi.py --section-only          # the section from the JSON

Every fit uses the volumes with b ≤ 3000 s/mm² (NODDI's usual range). AMICO (``dmri-amico``,
``Evaluation`` with the NODDI model: its dictionary of Watson kernels with d_par 1.7 and d_iso
3.0 µm²/ms, as mixmap's defaults) runs in its own environment as a subprocess
(``--amico-worker IN.npz OUT.npz``): the signals go out as a NIfTI in the scan's mask, the maps
come back; its time counts loading and fitting, its kernel generation is reported apart (done
once per scheme).

Real scans: the median absolute difference of icvf (NDI), od (ODI) and isovf (FISO) between
each mixmap map and AMICO's, the median angle between directions, and the time of each.

Phantoms (:func:`mixmap.simulation.phantom.phantom_like`): the truth is mixmap's lsq NODDI fit of
the scan smoothed by 1 voxel, re-simulated on the scan's acquisition with Rician noise at b0
SNR 20; RMSE per tissue class for every method and the empirical floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "noddi.json"
RESULTS = ROOT / "docs" / "RESULTS.md"
SCANS = ("b1k_b2k", "multishell_b6k_max")
METHODS = ("amico", "lsq", "vae-gmm")
MAPS = ("icvf", "od", "isovf")
MAX_B = 3000.0
PHANTOM_SNR = 20.0
AMICO_PYTHON = ROOT / ".venv-amico" / "bin" / "python"


# ------------------------------------------------------------------ AMICO (its own environment)
def amico_worker(src: str, dst: str) -> None:
    """Run AMICO NODDI on the signals of ``src`` (npz: signals (n, m), mask, affine, bvals in
    s/mm², bvecs (m, 3)) and write its maps in mask order to ``dst`` (npz)."""
    import amico
    import nibabel as nib

    d = np.load(src)
    mask = d["mask"].astype(bool)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vol = np.zeros(mask.shape + (d["signals"].shape[1],), np.float32)
        vol[mask] = d["signals"]
        nib.save(nib.Nifti1Image(vol, d["affine"]), tmp / "dwi.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), d["affine"]), tmp / "mask.nii.gz")
        np.savetxt(tmp / "dwi.bval", d["bvals"][None], fmt="%.1f")
        np.savetxt(tmp / "dwi.bvec", d["bvecs"].T, fmt="%.6f")
        amico.set_verbose(1)
        t0 = time.perf_counter()
        amico.setup()
        setup_s = time.perf_counter() - t0
        amico.util.fsl2scheme(str(tmp / "dwi.bval"), str(tmp / "dwi.bvec"),
                              str(tmp / "dwi.scheme"))
        ae = amico.Evaluation(study_path=str(tmp), subject=".", output_path=str(tmp / "out"))
        t0 = time.perf_counter()
        ae.load_data("dwi.nii.gz", "dwi.scheme", mask_filename="mask.nii.gz", b0_thr=50)
        ae.set_model("NODDI")
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ae.generate_kernels(regenerate=True)
        ae.load_kernels()
        kernel_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ae.fit()
        fit_s = time.perf_counter() - t0
        names = list(ae.model.maps_name)
        maps = ae.RESULTS["MAPs"][mask]
        dirs = ae.RESULTS["DIRs"][mask]
    out = {"NDI": "icvf", "ODI": "od", "FWF": "isovf"}
    np.savez(dst, **{out[n]: maps[:, i] for i, n in enumerate(names) if n in out},
             direction=dirs, seconds=load_s + fit_s, kernel_seconds=kernel_s,
             setup_seconds=setup_s)


def amico_fit(signals: np.ndarray, acq, mask: np.ndarray, affine: np.ndarray,
              python: Path) -> dict:
    """AMICO's maps of ``signals`` through :func:`amico_worker` under ``python``."""
    if not Path(python).exists():
        raise SystemExit(f"{python}: no AMICO environment; run bash benchmarks/setup_amico.sh")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, signals=signals.astype(np.float32), mask=mask, affine=affine,
                 bvals=acq.bvals * 1000.0, bvecs=acq.bvecs)
        subprocess.run([str(python), __file__, "--amico-worker", str(src), str(dst)],
                       check=True, stdout=subprocess.DEVNULL)
        d = dict(np.load(dst))
    return {"maps": {k: d[k].astype(np.float64) for k in (*MAPS, "direction")},
            "std": None, "seconds": float(d["seconds"]),
            "kernel_seconds": float(d["kernel_seconds"])}


# ------------------------------------------------------------------ mixmap side
def fit_all(signals, acq, mask, affine, methods, amico_python, seed: int = 0) -> dict:
    """name -> {"maps", "std", "seconds"} for every method, run one after another."""
    from mixmap.fitting import get_fitter

    out = {}
    for m in methods:
        print(f"    noddi: {m} on {signals.shape[0]} voxels", file=sys.stderr, flush=True)
        if m == "amico":
            out[m] = amico_fit(signals, acq, mask, affine, amico_python)
            continue
        t = time.perf_counter()
        opts = {} if m == "lsq" else {"seed": seed}
        res = get_fitter(m, "noddi", **opts).fit(signals, acq)
        out[m] = {"maps": res.params, "std": res.std, "seconds": time.perf_counter() - t}
    return out


def load_scan(scan: str):
    from mixmap import datasets
    from mixmap.io import load_dwi

    paths = datasets.fetch(scan)
    return paths, load_dwi(paths["dwi"], paths["bvals"], paths["bvecs"], paths["mask"],
                           max_b=MAX_B)


def run_real(scan: str, methods, amico_python) -> dict:
    from phantoms import angle_deg

    _, dwi = load_scan(scan)
    fits = fit_all(dwi.signals, dwi.acquisition, dwi.mask, dwi.affine, methods, amico_python)
    ref = fits.get("amico")
    entry = {"scan": scan, "n_voxels": int(dwi.signals.shape[0]),
             "n_measurements": int(dwi.acquisition.n), "methods": {}}
    for m, f in fits.items():
        row = {"seconds": f["seconds"], "median": {p: float(np.median(f["maps"][p]))
                                                   for p in MAPS}}
        if "kernel_seconds" in f:
            row["kernel_seconds"] = f["kernel_seconds"]
        if ref is not None and m != "amico":
            row["median_abs_diff"] = {p: float(np.median(np.abs(f["maps"][p] - ref["maps"][p])))
                                      for p in MAPS}
            row["direction_angle_deg"] = angle_deg(f["maps"]["direction"],
                                                   ref["maps"]["direction"])
        entry["methods"][m] = row
    return entry


def run_phantom(scan: str, methods, amico_python, snr: float = PHANTOM_SNR, seed: int = 0
                ) -> dict:
    from phantoms import angle_deg, score

    from mixmap.evaluation.floor import empirical_floor
    from mixmap.simulation.phantom import phantom_like

    paths, _ = load_scan(scan)
    sim = phantom_like(paths["dwi"], paths["bvals"], paths["bvecs"], paths["mask"], "noddi",
                       snr=snr, noise="rician", seed=seed, max_b=MAX_B)
    entry = {"scan": scan, "snr": snr, "n_voxels": int(sim.signals.shape[0]),
             "n_measurements": int(sim.acquisition.n),
             "classes": sim.info["tissue_classes"]["counts"], "methods": {}}
    t = time.perf_counter()
    floor = empirical_floor(sim.signals, sim.acquisition, "noddi", sim.truth, sim.sigma,
                            "rician", seed=seed)
    entry["methods"]["floor"] = {
        "seconds": time.perf_counter() - t, "ess_median": float(np.median(floor["ess"])),
        "params": score(floor, {p: floor[f"{p}:std"] for p in MAPS}, sim.truth, sim.labels,
                        sim.mask, MAPS),
        "direction_angle_deg": angle_deg(floor["direction"], sim.truth["direction"])}
    fits = fit_all(sim.signals, sim.acquisition, sim.mask, sim.affine, methods, amico_python,
                   seed)
    for m, f in fits.items():
        std = {p: f["std"][p] for p in MAPS if p in f["std"]} if f["std"] else None
        entry["methods"][m] = {
            "seconds": f["seconds"],
            "params": score(f["maps"], std, sim.truth, sim.labels, sim.mask, MAPS),
            "direction_angle_deg": angle_deg(f["maps"]["direction"], sim.truth["direction"])}
    return entry


# ------------------------------------------------------------------ the section
def _real_table(entries: list[dict]) -> list[str]:
    from mixmap.paper.report import markdown_table

    head = ["scan", "voxels", "method", "seconds", "AMICO s / method s",
            "median abs. difference from AMICO", "direction angle (°)", "medians"]
    rows = []
    for e in entries:
        ref = e["methods"].get("amico", {}).get("seconds")
        for m, r in e["methods"].items():
            diff = ", ".join(f"{p} {v:.3f}" for p, v in r.get("median_abs_diff", {}).items())
            med = ", ".join(f"{p} {v:.3f}" for p, v in r["median"].items())
            secs = f"{r['seconds']:.1f}" + (f" (+{r['kernel_seconds']:.0f} kernels)"
                                             if "kernel_seconds" in r else "")
            rows.append([e["scan"], e["n_voxels"], m, secs,
                         f"{ref / r['seconds']:.2f}" if ref else "", diff or "(reference)",
                         f"{r['direction_angle_deg']:.1f}" if "direction_angle_deg" in r
                         else "", med])
    return [markdown_table(head, rows)]


def _phantom_table(e: dict) -> list[str]:
    from phantoms import RESOLVED_ESS, class_table_rows

    from mixmap.paper.report import markdown_table
    from mixmap.simulation.phantom import CLASS_NAMES

    head, rows = class_table_rows(e, "direction_angle_deg", "direction")
    cls = ", ".join(f"{c} {n}" for c, n in e["classes"].items())
    ess = e["methods"]["floor"]["ess_median"]
    lines = [f"#### Phantom of {e['scan']}, b0 SNR {e['snr']:g} (Rician)", "",
             f"{e['n_voxels']} voxels ({cls}), {e['n_measurements']} measurements; floor: "
             f"median effective atoms {ess:.1f}"
             + ("." if ess >= RESOLVED_ESS else " (not resolved: its numbers are not a bound)."),
             "", markdown_table(head, rows, floatfmt=".4f")]
    ms = e["methods"]
    for a, b in (("vae-gmm", "lsq"), ("vae-gmm", "amico"), ("lsq", "amico")):
        if a in ms and b in ms:
            ga, gb = ms[a]["params"], ms[b]["params"]
            worse = [f"{p} {c}" for p in ga for c in CLASS_NAMES
                     if ga[p]["classes"][c]["rmse"] is not None
                     and ga[p]["classes"][c]["rmse"] > gb[p]["classes"][c]["rmse"]]
            lines += ["", f"- {a} worse than {b} in: " + (", ".join(worse) or "none")]
    return lines


def section(results: dict) -> str:
    from mixmap.paper.report import machine_description

    real = [results[k] for k in sorted(results) if k.startswith("real|")]
    phantoms = [results[k] for k in sorted(results) if k.startswith("phantom|")]
    body = [
        "## NODDI: mixmap against AMICO", "",
        "Regenerate: `bash benchmarks/setup_amico.sh`, then `python benchmarks/noddi.py` "
        "(docs/noddi.json). mixmap's NODDI (Watson; lsq, vae-gmm) against AMICO's NODDI "
        "(`dmri-amico`, its dictionary fit), all on the volumes with b ≤ 3000 s/mm², with the "
        "same constants (d_par 1.7, d_iso 3.0 µm²/ms). icvf = NDI, od = ODI, isovf = FISO. "
        f"Times on {machine_description()}, one run each; AMICO's kernels are generated once "
        "per scheme and shown apart. A ratio above 1 means faster than AMICO.",
        "", "### Real scans: agreement with AMICO and time", "",
        *(_real_table(real) if real else ["Not run yet."]),
        "", "### Realistic phantoms: accuracy per tissue class", "",
    ]
    for e in phantoms:
        body += _phantom_table(e) + [""]
    if not phantoms:
        body.append("Not run yet.")
    return "\n".join(body).rstrip() + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", nargs="+", default=list(SCANS), choices=SCANS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--parts", nargs="+", default=["real", "phantom"],
                    choices=["real", "phantom"])
    ap.add_argument("--phantom-scans", nargs="+", default=list(SCANS), choices=SCANS)
    ap.add_argument("--amico-python", type=Path, default=AMICO_PYTHON)
    ap.add_argument("--section-only", action="store_true")
    ap.add_argument("--amico-worker", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.amico_worker:
        amico_worker(*args.amico_worker)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from phantoms import keep_entry

    from mixmap.paper.report import update_section

    results = json.loads(JSON.read_text()) if JSON.exists() else {}
    if not args.section_only:
        if "real" in args.parts:
            for scan in args.scans:
                print(f"real {scan}", file=sys.stderr, flush=True)
                keep_entry(results, f"real|{scan}", run_real(scan, args.methods,
                                                              args.amico_python), JSON)
        if "phantom" in args.parts:
            for scan in args.phantom_scans:
                print(f"phantom {scan}", file=sys.stderr, flush=True)
                keep_entry(results, f"phantom|{scan}",
                           run_phantom(scan, args.methods, args.amico_python), JSON)
    update_section(RESULTS, "noddi", section(results))


if __name__ == "__main__":
    main()
