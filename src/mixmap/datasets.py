"""Real in-vivo example data without internet access to a data host.

The PyPI wheel ``mdt==1.2.7`` (Microstructure Diffusion Toolbox, LGPL) carries two small brain
scans under ``mdt/data/mdt_example_data/``. ``fetch`` downloads the wheel once with
``pip download --no-deps`` into the cache (``~/.cache/mixmap``, or ``$MIXMAP_CACHE``), checks
its checksum, and unpacks only the requested scan. Nothing is committed or bundled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL = "mdt-1.2.7-py2.py3-none-any.whl"
WHEEL_SHA256 = "8a3351be197a25a60c45cdbd97e88c13d39a15c0c4b08bdd06ef475fb3e9546a"
_ROOT = "mdt/data/mdt_example_data"


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    stem: str  # file stem inside the wheel folder

    def files(self) -> dict[str, str]:
        return {
            "dwi": f"{self.stem}_example_slices_24_38.nii.gz",
            "mask": f"{self.stem}_example_slices_24_38_mask.nii.gz",
            "bvals": f"{self.stem}.bval",
            "bvecs": f"{self.stem}.bvec",
        }


DATASETS = {
    "b1k_b2k": Dataset(
        "b1k_b2k",
        "in-vivo brain, 2 slices of 104×104 at 2 mm; 13 b=0, 30 dirs at b=1000, 60 at b=2000",
        "b1k_b2k",
    ),
    "multishell_b6k_max": Dataset(
        "multishell_b6k_max",
        "in-vivo brain, 2 slices of 104×104 at 2 mm; 6 b=0 and 8 shells b=800...6000 s/mm²",
        "multishell_b6k_max",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MIXMAP_CACHE", Path.home() / ".cache" / "mixmap"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel(quiet: bool = True) -> Path:
    """The mdt wheel in the cache, downloaded once and checked."""
    cache = cache_dir()
    wheel = cache / WHEEL
    if wheel.exists() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "mdt==1.2.7", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL
        if proc.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"could not download mdt==1.2.7 with pip ({proc.stderr.strip()[-300:]}); "
                f"check access to PyPI, or put {WHEEL} into {cache}"
            )
        if _sha256(got) != WHEEL_SHA256:
            raise RuntimeError(f"{got}: checksum mismatch; the download is not the expected wheel")
        os.replace(got, wheel)
    return wheel


def fetch(name: str, quiet: bool = True) -> dict[str, Path]:
    """Paths of the dataset's files (dwi, mask, bvals, bvecs), fetching them once."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    ds = DATASETS[name]
    target = cache_dir() / name
    paths = {k: target / v for k, v in ds.files().items()}
    if all(p.exists() for p in paths.values()):
        return paths
    wheel = _wheel(quiet)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
    try:
        with zipfile.ZipFile(wheel) as z:
            for fname in ds.files().values():
                with z.open(f"{_ROOT}/{name}/{fname}") as src, open(staging / fname, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


#: The names :func:`copy_to` gives the files, as ``mixmap simulate`` writes a scan.
PLAIN_NAMES = {"dwi": "dwi.nii.gz", "mask": "mask.nii.gz", "bvals": "dwi.bval",
               "bvecs": "dwi.bvec"}


def copy_to(name: str, folder: str | Path, quiet: bool = True) -> dict[str, Path]:
    """Fetch dataset ``name`` and copy its files into ``folder`` as dwi.nii.gz, dwi.bval,
    dwi.bvec and mask.nii.gz (the names a quick start can type). Returns their paths; a
    folder that already holds one of them is refused (ValueError) before anything is copied."""
    folder = Path(folder)
    targets = {k: folder / v for k, v in PLAIN_NAMES.items()}
    there = [p.name for p in targets.values() if p.exists()]
    if there:
        raise ValueError(f"{folder}: already holds {', '.join(there)}; choose an empty folder")
    paths = fetch(name, quiet)
    folder.mkdir(parents=True, exist_ok=True)
    for k, target in targets.items():
        tmp = target.with_name(f".{target.name}.part")
        shutil.copyfile(paths[k], tmp)
        os.replace(tmp, target)
    return targets


def is_cached(name: str) -> bool:
    ds = DATASETS[name]
    return all((cache_dir() / name / f).exists() for f in ds.files().values())
