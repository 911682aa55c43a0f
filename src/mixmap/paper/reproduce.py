"""`mixmap reproduce`: regenerate every table and figure of docs/RESULTS.md.

Four parts, each writing PNG figures, JSON/CSV numbers and a ``repro-…`` section of
``<out>/RESULTS.md`` (through :func:`~mixmap.paper.report.update_section`, so other sections
are kept), one module each:

1. :mod:`~mixmap.paper.simulation` (paper Fig. 1 and 7): the paper's 3-cluster MSDKI preset
   on the HCP scheme at several SNRs, every method and the Bayes-optimal posterior mean.
2. :mod:`~mixmap.paper.sensitivity` (paper Fig. 6): RMSE of D against latent size and KL
   weight.
3. :mod:`~mixmap.paper.real` (paper Fig. 2, 3, 5): maps, std maps, clusters and the latent
   space (:mod:`~mixmap.paper.latent`) of the ``b1k_b2k`` in-vivo scan (:mod:`~.scan`).
4. Real data without truth: :mod:`~mixmap.paper.repeatability`, :mod:`~mixmap.paper.goodness`,
   :mod:`~mixmap.paper.phantom`.

Every file is written in ``quick`` mode too (smaller), so a test can check them. Methods that are
not registered in :data:`mixmap.fitting.FITTERS` are skipped with a note. Where the real scan
cannot be fetched, part 3-4 write placeholder figures and a note instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mixmap.fitting import FITTERS
from mixmap.paper.real import reproduce_real
from mixmap.paper.repeatability import icc31, split_halves
from mixmap.paper.run import Run
from mixmap.paper.sensitivity import reproduce_sensitivity
from mixmap.paper.settings import ALL_METHODS, FULL, QUICK, Settings
from mixmap.paper.simulation import reproduce_simulation

PARTS = (("simulation", reproduce_simulation), ("sensitivity", reproduce_sensitivity),
         ("real", reproduce_real))


def _methods(methods: list[str] | None) -> tuple[list[str], list[str]]:
    """(methods to run, lsq first when not asked for; asked-for methods not registered)."""
    wanted = list(methods) if methods else list(ALL_METHODS)
    unknown = [m for m in wanted if m not in ALL_METHODS and m not in FITTERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    use = [m for m in wanted if m in FITTERS]
    skipped = [m for m in wanted if m not in FITTERS]
    if "lsq" not in use:
        use.insert(0, "lsq")  # the baseline and the phantom's truth
    return use, skipped


def _overview(run: Run, skipped: list[str], total: float) -> str:
    """Body of section repro-overview: the configuration, methods, reductions, timings."""
    settings, use = run.s, run.methods
    body = [
        f"Regenerate: `{run.command}` (configuration **{settings.name}**; "
        f"{torch.get_num_threads()} CPU threads; {total / 60:.1f} min: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in run.times.items()) + ").",
        f"- methods: {', '.join(use)}",
    ]
    if skipped:
        body.append(f"- **skipped** (not registered in `mixmap.fitting.FITTERS` when this ran): "
                    f"{', '.join(skipped)}")
    if settings.reductions:
        body += [f"- **reduced**: {r}" for r in settings.reductions]
    body.append(f"- learned fitters: epochs {settings.epochs or 'fitter default'} (simulation), "
                f"{settings.real_epochs or settings.epochs or 'fitter default'} (real data), "
                f"{settings.sens_epochs or settings.epochs or 'fitter default'} (sensitivity)"
                + (f"; options {settings.learned_options}" if settings.learned_options else "")
                + (f"; lsq options {settings.lsq_options}" if settings.lsq_options else ""))
    return "\n".join(body)


def run_reproduce(out: Path = Path("docs"), quick: bool = False, quiet: bool = False,
                  methods: list[str] | None = None, overrides: dict | None = None,
                  parts: list[str] | None = None) -> list[Path]:
    """Regenerate the figures (``<out>/figures/repro_*.png``), numbers
    (``<out>/repro_*.json|csv``) and ``repro-…`` sections of ``<out>/RESULTS.md``.

    Parameters
    ----------
    out
        Output folder (``docs``).
    quick
        Small configuration (:data:`QUICK`): a few minutes on 2 CPU cores, every file written.
    quiet
        No progress output (fitters are quiet too).
    methods
        Subset of ``lsq``, ``ssl``, ``vae``, ``vae-gmm`` (default: all); methods not registered
        in :data:`mixmap.fitting.FITTERS` are skipped with a note.
    overrides
        Fields of :class:`Settings` to change (a reduced run); list what was reduced in
        ``reductions`` so RESULTS.md says so.
    parts
        Subset of :data:`PARTS` (``simulation``, ``sensitivity``, ``real``; default: all):
        only their files and sections are rewritten; the overview section and
        ``repro_run.json`` keep the last full run's configuration and timings, and the parts'
        sections name the command with ``--parts``.

    Returns
    -------
    The paths written (figures, JSON, CSV and RESULTS.md).
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = QUICK if quick else FULL
    if overrides:
        settings = replace(settings, **overrides)
    use, skipped = _methods(methods)
    names = [name for name, _ in PARTS]
    chosen = list(parts) if parts else names
    bad = [p for p in chosen if p not in names]
    if bad:
        raise ValueError(f"--parts {','.join(bad)}: choose from {', '.join(names)}")
    run = Run(Path(out), settings, quiet, use)
    if parts:
        run.command += " --parts " + ",".join(chosen)
    if skipped:
        run.log(f"not registered in FITTERS, skipped: {', '.join(skipped)}")
    run.log(f"settings {settings.name}: methods {', '.join(use)}")
    if not parts:
        run.section("repro-overview", f"Regenerate: `{run.command}` (running or interrupted; "
                    f"configuration {settings.name}).")
    for part, fn in PARTS:
        if part not in chosen:
            continue
        t = time.perf_counter()
        fn(run)
        run.times[part] = time.perf_counter() - t
        run.log(f"{part} done in {run.times[part]:.0f} s")
    total = time.perf_counter() - run.t0
    meta = {"settings": asdict(settings), "methods": use, "skipped": skipped,
            "seconds": run.times, "total_seconds": total, "torch_threads": torch.get_num_threads()}
    if parts:  # a partial run: the last full run's record and overview stay
        run.log(f"parts {', '.join(chosen)} done in {total:.0f} s; the overview is left as is")
        return list(run.written)
    run.json("repro_run.json", meta)
    run.section("repro-overview", _overview(run, skipped, total))
    run.log(f"done in {total:.0f} s; {len(run.written)} files")
    return list(run.written)


__all__ = ["FULL", "QUICK", "Settings", "icc31", "run_reproduce", "split_halves"]
