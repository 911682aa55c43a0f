"""The README's relaxometry example, run through the command line, and its figure: brain-shaped
T2 and myelin-water phantoms (no download), fitted by lsq and vae-gmm, scored per tissue class.

    python benchmarks/relaxometry_example.py     # writes docs/figures/relaxometry_example.png
                                                 # and the "relaxometry-example" section of
                                                 # docs/RESULTS.md (work files in a temp folder)

Each phantom is ``mixmap simulate --layout brain`` (:func:`mixmap.simulation.brain_layout`:
white matter, a folded cortical ribbon, CSF rim and ventricles, deep grey nuclei; parameters
drawn from the preset's class and spatially smooth within it) with Rician noise; the maps are
``mixmap fit`` with each method's defaults, the scores those of ``mixmap evaluate``
(:func:`mixmap.evaluation.evaluate_dirs`, without its references: a 3-D Bayes grid over a
brain's voxels takes longer than the fits).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from mixmap.evaluation import evaluate_dirs
from mixmap.io.naming import map_name
from mixmap.paper.report import markdown_table, update_section
from mixmap.plots import map_panels, to_ras

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "RESULTS.md"
FIGURE = ROOT / "docs" / "figures" / "relaxometry_example.png"
GRID = "48,58,48"
#: (preset, model, option, field file, SNR, the parameter shown and scored, its colour range)
EXAMPLES = (
    ("t2-brain", "t2", "--echo-times", "echo_times.txt", 20, "T2", (40.0, 140.0)),
    ("mwf-brain", "mwf", "--echo-times", "echo_times.txt", 100, "MWF", (0.0, 0.2)),
)
METHODS = ("lsq", "vae-gmm")


def mixmap(*args) -> str:
    cmd = [sys.executable, "-m", "mixmap", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    return r.stdout


def run(work: Path, examples=EXAMPLES) -> tuple[dict, dict]:
    """(volumes for the figure, scores per example and method)."""
    volumes, scores = {}, {}
    for preset, model, option, field, snr, param, _ in examples:
        sim = work / preset
        mixmap("simulate", sim, "--preset", preset, "--layout", "brain", "--grid", GRID, "--snr",
               snr, "--noise", "rician", "--quiet")
        affine = nib.load(sim / "mask.nii.gz").affine
        mask = to_ras(np.asarray(nib.load(sim / "mask.nii.gz").dataobj) > 0, affine)
        truth = to_ras(np.asarray(nib.load(sim / "truth" / f"param-{param}.nii.gz").dataobj,
                                  np.float32), affine)
        vols = {"truth": {param: np.where(mask, truth, np.nan)}}
        scores[preset] = {"snr": snr, "param": param, "methods": {}}
        for method in METHODS:
            out = work / f"{preset}-{method}"
            mixmap("fit", sim / "dwi.nii.gz", option, sim / field, "--mask", sim / "mask.nii.gz",
                   "--model", model, "--method", method, "--out", out, "--quiet", "--no-report")
            img = nib.load(out / map_name("", model, param))
            vols[method] = {param: to_ras(np.asarray(img.dataobj, np.float32), img.affine)}
            report = evaluate_dirs(out, sim, bayes=False, floor=False)
            scores[preset]["methods"][method] = {"metrics": report["metrics"][param]}
        volumes[preset] = vols
    return volumes, scores


def figure(volumes: dict, examples=EXAMPLES) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for preset, _, _, _, _, param, (lo, hi) in examples:
        vols = volumes[preset]
        z = vols["truth"][param].shape[2] // 2 + 4
        panels.append(map_panels(vols, z, [param], {param: lo}, {param: hi}))
    # the two rows side by side in one image
    fig = Figure(figsize=(9, 2.7 * len(panels)), layout="constrained")
    for i, sub in enumerate(panels):
        canvas = FigureCanvasAgg(sub)
        canvas.draw()
        ax = fig.add_subplot(len(panels), 1, i + 1)
        ax.imshow(np.asarray(canvas.buffer_rgba()))
        ax.set_axis_off()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)


def section(scores: dict) -> str:
    body = ["## Relaxometry example: brain-shaped T2 and myelin-water phantoms", "",
            "Regenerate: `python benchmarks/relaxometry_example.py` (the README's commands: "
            f"`mixmap simulate --layout brain --grid {GRID}`, `mixmap fit`, `mixmap evaluate`). "
            "Rician noise; RMSE per tissue class (ms; MWF 1), and the ±1.96 sd coverage (the "
            "speed of each method is in the section above).", "",
            "![T2 and MWF maps: truth, lsq, vae-gmm](figures/relaxometry_example.png)", ""]
    rows = []
    for preset, e in scores.items():
        for method, r in e["methods"].items():
            m = r["metrics"]
            rows.append([preset, f"{e['snr']:g}", e["param"], method, m["all"]["rmse"],
                         *(m["clusters"][c]["rmse"] for c in ("WM", "GM", "CSF")),
                         m["all"].get("coverage_95")])
    body.append(markdown_table(["phantom", "SNR", "map", "method", "RMSE all", "WM",
                                "GM", "CSF", "within ±1.96 sd"], rows, floatfmt=".4g"))
    return "\n".join(body) + "\n"


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=[e[0] for e in EXAMPLES],
                    choices=[e[0] for e in EXAMPLES])
    examples = [e for e in EXAMPLES if e[0] in ap.parse_args(argv).presets]
    with tempfile.TemporaryDirectory() as tmp:
        volumes, scores = run(Path(tmp), examples)
    figure(volumes, examples)
    update_section(RESULTS, "relaxometry-example", section(scores))


if __name__ == "__main__":
    main()
