"""The context of one ``mixmap reproduce`` run (:class:`Run`: output folder, progress, written
files, timings) and the helpers every part uses: atomic writers, figures, and :func:`fit`."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mixmap.acquisition import Acquisition
from mixmap.fitting import FITTERS, get_fitter
from mixmap.fitting.learned import LearnedFitter
from mixmap.paper.report import update_section
from mixmap.paper.settings import Settings


class Run:
    """Shared state of one run: output folder, progress, written files, timings.

    Every writer is atomic (a temporary file renamed into place) and records the path in
    :attr:`written`, in the order first written.
    """

    def __init__(self, out: Path, settings: Settings, quiet: bool, methods: list[str]):
        self.out = Path(out)
        self.fig_dir = self.out / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.results = self.out / "RESULTS.md"
        self.s = settings
        self.quiet = quiet
        self.methods = methods
        self.written: list[Path] = []
        self.times: dict[str, float] = {}
        self.t0 = time.perf_counter()
        #: (model, method) pairs whose residual is far above least squares' (see goodness.unfit).
        self.unfit: set = set()
        #: (vae-gmm fitter, simulation, SNR) of the simulation nearest SNR 20, for repro-latent.
        self.latent_sim = None
        self.command = "mixmap reproduce" + (" --quick" if settings.name == "quick" else "")

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[reproduce {time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def _atomic(self, path: Path, write) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if path not in self.written:
            self.written.append(path)
        return path

    def figure(self, name: str, fig) -> Path:
        """Write ``fig`` as ``figures/<name>`` (PNG, 110 dpi) and close it."""
        import matplotlib.pyplot as plt

        path = self.fig_dir / name
        self._atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight",
                                                   format="png"))
        plt.close(fig)
        return path

    def json(self, name: str, data) -> Path:
        """Write ``data`` as ``<out>/<name>``; numpy values become numbers, NaN and inf null."""
        text = json.dumps(jsonable(data), indent=2, ensure_ascii=False)
        return self._atomic(self.out / name, lambda tmp: Path(tmp).write_text(text, "utf-8"))

    def csv(self, name: str, header: list[str], rows: list[list]) -> Path:
        """Write ``<out>/<name>``: floats with 6 significant digits, None as an empty cell."""
        def write(tmp):
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(header)
                for r in rows:
                    w.writerow(["" if x is None else (f"{x:.6g}" if isinstance(x, float) else x)
                                for x in r])

        return self._atomic(self.out / name, write)

    def section(self, name: str, body: str) -> None:
        """Replace section ``name`` of ``<out>/RESULTS.md`` (other sections are kept)."""
        update_section(self.results, name, body)
        if self.results not in self.written:
            self.written.append(self.results)

    def rel(self, path: Path) -> str:
        """Path of a figure as RESULTS.md links it."""
        return os.path.relpath(path, self.out)


def jsonable(x):
    """``x`` with numpy arrays and scalars as lists and numbers, non-finite floats as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def pyplot():
    """matplotlib.pyplot on the Agg backend (unless a backend was chosen already)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def placeholder(run: Run, name: str, text: str) -> Path:
    """A figure ``name`` that only says ``text`` (a part that could not run)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    return run.figure(name, fig)


def hyper_names(method: str) -> set[str]:
    """The hyper-parameters fitter ``method`` takes beyond seed and quiet (none for lsq's
    options, which :func:`fit` passes separately)."""
    cls = FITTERS[method]
    return set(cls.hyper_names) if issubclass(cls, LearnedFitter) else set()


def fitter_options(run: Run, method: str, epochs: int | None = None,
                   extra: dict | None = None, **options) -> dict:
    """The keyword arguments :func:`fit` gives fitter ``method``: the run's seed and quiet;
    for learned fitters ``epochs`` (default the run's), ``options``, and ``extra`` (default
    the run's ``learned_options``) only when the fitter takes every one of its options and
    none is given in ``options``; for least squares the run's ``lsq_options``."""
    opts: dict = {"seed": run.s.seed, "quiet": run.quiet}
    if issubclass(FITTERS[method], LearnedFitter):
        ep = run.s.epochs if epochs is None else epochs
        if ep is not None:
            opts["epochs"] = int(ep)
        opts.update(options)
        more = run.s.learned_options if extra is None else extra
        if set(more) <= hyper_names(method) - set(opts):
            opts.update(more)
    else:
        opts.update(run.s.lsq_options)
    return opts


def fit(run: Run, method: str, model: str, signals: np.ndarray, acq: Acquisition,
        epochs: int | None = None, extra: dict | None = None, **options):
    """Fit ``signals`` (n_voxels, n_meas) with ``method`` and :func:`fitter_options`.
    Returns (FitResult, fitter, seconds of the fit)."""
    fitter = get_fitter(method, model, **fitter_options(run, method, epochs, extra, **options))
    t = time.perf_counter()
    res = fitter.fit(signals, acq)
    return res, fitter, time.perf_counter() - t


def fmt(x, spec=".3f") -> str:
    """``x`` formatted with ``spec``; '–' for None and non-finite numbers."""
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


__all__ = ["Run", "fit", "fitter_options", "fmt", "hyper_names", "jsonable", "placeholder",
           "pyplot"]
