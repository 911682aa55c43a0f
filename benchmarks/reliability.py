"""Reliability report: every bad input of the matrix run through the real `mixmap fit` command,
the message it printed, and what it left behind; every real-world variant of a clean scan and
how far its maps are from the clean scan's; a full disk, a read-only folder and two runs on one
output folder; a killed and an interrupted run.

    python benchmarks/reliability.py        # rewrites docs/RELIABILITY.md
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mixmap.paper.report import markdown_table
from mixmap.simulation import simulate, write_simulation
from mixmap.testing import bad_input_cases, left_behind, map_difference, real_world_cases

ROOT = Path(__file__).resolve().parents[1]


def mixmap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixmap", *args], capture_output=True,
                          text=True)


def clean(msg: str, tmp: Path) -> str:
    return msg.strip().replace(str(tmp) + "/", "")


def fit_args(scan: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", str(scan / "dwi.nii.gz"), "--bvals", str(scan / "dwi.bval"), "--bvecs",
            str(scan / "dwi.bvec"), "--mask", str(scan / "mask.nii.gz"), "--out", str(out),
            "--quiet", *extra]


def real_world_rows(scan: Path, tmp: Path) -> list[list]:
    """Each variant fitted with `mixmap fit --model msdki` and compared with the clean scan."""
    reference = tmp / "clean-maps"
    assert mixmap(*fit_args(scan, reference)).returncode == 0
    rows = []
    (tmp / "variants").mkdir()
    for i, case in enumerate(real_world_cases(scan, tmp / "variants")):
        out = tmp / f"rw-{i}"
        r = mixmap("fit", *case.args, "--model", "msdki", "--out", str(out), "--quiet")
        said = "; ".join(ln.split(": ", 1)[-1] for ln in clean(r.stderr, tmp).splitlines()
                         if ln.strip()).replace("|", "\\|") or "(nothing)"
        diff = map_difference(out, reference) if r.returncode == 0 else float("inf")
        ok = r.returncode == 0 and diff <= case.tolerance
        rows.append([case.name, r.returncode, f"`{said}`", f"{diff:.1e}",
                     f"{case.tolerance:.0e} ({case.why})", "yes" if ok else "**NO**"])
    return rows


def _mount(where: Path, size_kib: int, *options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size_kib}k", *options))
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def disk_rows(scan: Path, tmp: Path) -> list[list]:
    """A real full disk and a real read-only folder (small tmpfs mounts, when this process may
    mount: root); otherwise said in the row and left to the tests' simulated failures."""
    reference = tmp / "clean-maps"
    need_kib = sum(-(-f.stat().st_size // 4096) * 4 for f in reference.rglob("*")
                   if f.is_file())
    rows = []
    full, ro = tmp / "full", tmp / "readonly"
    if not _mount(full, need_kib // 2):
        return [["full disk / read-only folder", "-", "not run: this process cannot mount a "
                 "small filesystem (needs root); tests/test_inputs.py simulates both", "-", "-"]]
    try:
        r = mixmap(*fit_args(scan, full / "maps"))
        left = left_behind(full / "maps")
        ok = r.returncode == 2 and "free some space" in r.stderr and not left
        rows.append([f"output on a full disk (tmpfs of {need_kib // 2} KiB, half the maps)",
                     r.returncode, f"`{clean(r.stderr, tmp)}`", left or "nothing",
                     "yes" if ok else "**NO**"])
    finally:
        subprocess.run(["umount", str(full)], check=False)
    if _mount(ro, 1024, "ro"):
        try:
            r = mixmap(*fit_args(scan, ro / "maps"))
            left = left_behind(ro / "maps")
            ok = r.returncode == 2 and "choose a folder you may write to" in r.stderr
            rows.append(["output in a read-only folder (tmpfs mounted ro)", r.returncode,
                         f"`{clean(r.stderr, tmp)}`", left or "nothing",
                         "yes" if ok and not left else "**NO**"])
        finally:
            subprocess.run(["umount", str(ro)], check=False)
    return rows


def concurrent_row(big: Path, tmp: Path) -> list:
    """Two real runs on one --out: the second is refused while the first fits, and the first's
    maps are exactly the files a run on its own writes."""
    out, alone = tmp / "shared-out", tmp / "alone-out"
    assert mixmap(*fit_args(big, alone, "--model", "ball-stick")).returncode == 0
    cmd = [sys.executable, "-m", "mixmap", *fit_args(big, out, "--model", "ball-stick")]
    cmd.remove("--quiet")
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first.stderr.readline()  # data loaded, fit started: the first run holds the folder
    second = mixmap(*fit_args(big, out, "--model", "ball-stick"))
    overlapped = first.poll() is None  # the first was still fitting when the second ended
    first.communicate()
    same = left_behind(out) == left_behind(alone)
    ok = (second.returncode == 2 and "another mixmap run" in second.stderr
          and first.returncode == 0 and same and overlapped)
    return ["a second run on the same --out while the first fits", second.returncode,
            f"`{clean(second.stderr, tmp)}`",
            "first run's maps only, the files a run alone writes" if same else
            "**files differ from a run alone**", "yes" if ok else "**NO**"]


def signalled_run(scan: Path, out: Path, sig: int) -> tuple[int, str, list[str]]:
    cmd = [sys.executable, "-m", "mixmap", "fit", str(scan / "dwi.nii.gz"),
           "--bvals", str(scan / "dwi.bval"), "--bvecs", str(scan / "dwi.bvec"),
           "--mask", str(scan / "mask.nii.gz"), "--model", "ball-stick", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stderr.readline()  # data loaded, fit started
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate()
    # the last line the program wrote, not a progress bar's (tqdm redraws with \r)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    return proc.returncode, lines[-1] if lines else "", left_behind(out)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scan = tmp / "scan"
        write_simulation(simulate("paper-msdki", "hcp", snr=20, n_voxels=400, seed=0), scan)
        for case in bad_input_cases(scan, tmp):
            r = mixmap("fit", *case.args)
            msg = r.stderr.strip().replace(str(tmp) + "/", "")
            lines = len(msg.splitlines())
            left = left_behind(case.out)
            ok = r.returncode == 2 and case.message in msg and lines == 1 and not left
            rows.append([case.name, r.returncode, f"`{msg}`", "nothing" if not left else left,
                         "yes" if ok else "**NO**"])
        fitted_rows = real_world_rows(scan, tmp)
        rows += disk_rows(scan, tmp)
        out = tmp / "maps"
        first = mixmap("fit", str(scan / "dwi.nii.gz"), "--bvals", str(scan / "dwi.bval"),
                       "--bvecs", str(scan / "dwi.bvec"), "--mask", str(scan / "mask.nii.gz"),
                       "--out", str(out), "--quiet")
        assert first.returncode == 0, first.stderr
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        again = mixmap("fit", str(scan / "dwi.nii.gz"), "--bvals", str(scan / "dwi.bval"),
                       "--bvecs", str(scan / "dwi.bvec"), "--mask", str(scan / "mask.nii.gz"),
                       "--out", str(out), "--quiet")
        unchanged = {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
        msg = again.stderr.strip().replace(str(tmp) + "/", "")
        rows.append(["output folder already holds maps", again.returncode, f"`{msg}`",
                     "earlier maps untouched" if unchanged else "**changed**",
                     "yes" if again.returncode == 2 and unchanged else "**NO**"])
        # A trained model whose weights file was replaced by a pickle that would run code.
        model_out = tmp / "learned"
        fitted = mixmap("fit", str(scan / "dwi.nii.gz"), "--bvals", str(scan / "dwi.bval"),
                        "--bvecs", str(scan / "dwi.bvec"), "--mask", str(scan / "mask.nii.gz"),
                        "--method", "vae-gmm", "--epochs", "5", "--out", str(model_out),
                        "--quiet")
        assert fitted.returncode == 0, fitted.stderr
        import pickle

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {tmp}/pwned",))

        weights = model_out / "model-msdki_method-vae-gmm" / "weights.safetensors"
        weights.write_bytes(pickle.dumps(Payload()))
        applied = mixmap("apply", str(weights.parent), str(scan / "dwi.nii.gz"), "--bvals",
                         str(scan / "dwi.bval"), "--bvecs", str(scan / "dwi.bvec"), "--out",
                         str(tmp / "applied"), "--quiet")
        ran = (tmp / "pwned").exists()
        msg = applied.stderr.strip().replace(str(tmp) + "/", "")
        rows.append(["model file with a pickle payload (`mixmap apply`)", applied.returncode,
                     f"`{msg}`", "nothing" if not left_behind(tmp / "applied") else "**files**",
                     "yes (payload not run)" if applied.returncode == 2 and not ran
                     else "**NO**"])
        big = tmp / "big"
        # big enough that the fit is still running 0.5 s after it starts (a fast machine fits
        # 20,000 ball-stick voxels in under a second)
        write_simulation(simulate("ball-stick", "hcp", snr=20, n_voxels=100_000, seed=0), big)
        rows.append(concurrent_row(big, tmp))
        for sig, name in ((signal.SIGKILL, "killed (SIGKILL) during the fit"),
                          (signal.SIGINT, "interrupted (Ctrl-C) during the fit")):
            code, last, left = signalled_run(big, tmp / f"out-{name[:6]}", sig)
            maps = [f for f in left if f.endswith("_dwimap.nii.gz")]
            rows.append([name, code, f"`{last}`" if last else "(no message: killed)",
                         "nothing" if not maps else maps,
                         "yes" if not maps else "**NO**"])
    table = markdown_table(["input", "exit", "message (stderr)", "left behind", "as required"],
                           rows)
    fitted = markdown_table(["input", "exit", "what mixmap said (stderr)",
                             "difference from the clean scan's maps", "tolerance (why)",
                             "as required"], fitted_rows)
    text = (
        "# Reliability\n\nProduced by `python benchmarks/reliability.py` (the same cases run in "
        "`make test`: tests/test_cli.py::test_bad_input_matrix, tests/test_inputs.py, "
        "tests/test_reliability.py).\n\n## Inputs refused\n\n"
        "Each bad input must give exit status 2, one line naming the file and the fix, no "
        "traceback, and leave no output.\n\n" + table + "\n\n"
        "## Inputs as scanners and tools write them\n\n"
        "Each variant of the clean scan is fitted with `mixmap fit --model msdki` (least "
        "squares) and must give the clean scan's maps: the difference is the larger over D and "
        "K of RMS(map − clean map) / RMS(clean map) over the mask.\n\n" + fitted + "\n\n"
        "## Interrupted and damaged runs\n\n"
        "Learned fits keep a training checkpoint in `--out` after every epoch; `--resume` "
        "continues an interrupted run and gives maps bit-identical to an uninterrupted one, and "
        "a checkpoint of other data or settings is refused "
        "(tests/test_learned.py::test_interrupted_training_resumes_to_the_same_maps). A NaN or "
        "exploding loss undoes the step and halves the learning rate "
        "(test_nan_loss_is_undone_and_training_recovers); after 12 bad steps the run stops "
        "with an error instead of writing NaN maps (test_diverging_training_fails_clearly). "
        "The same inputs and seed give bit-identical maps on CPU "
        "(tests/test_cli.py::test_same_seed_gives_bit_identical_maps_and_checksums_recorded, "
        "tests/test_learned.py::test_same_seed_same_maps).\n\n"
        "NaN/Inf voxels are not an error: they are left out of the fit, counted in the log and "
        "in `DroppedVoxels` of `*_fit.json`, and NaN in the maps "
        "(tests/test_cli.py::test_nan_voxels_are_masked_out_and_counted).\n"
    )
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "RELIABILITY.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
