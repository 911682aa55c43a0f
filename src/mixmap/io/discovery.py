"""Scans on disk: the DWI files of a cohort (a list of files, or a BIDS dataset folder
``sub-*/[ses-*/]dwi/*_dwi.nii.gz``), each with its gradient files, mask and BIDS entities.

Files of a scan ``<prefix>_dwi.nii.gz`` (or ``dwi.nii.gz``, prefix empty):

- gradients: the siblings ``<prefix>_dwi.bval`` and ``<prefix>_dwi.bvec`` (same stem), unless
  ``bvals``/``bvecs`` are given for all scans;
- mask, the first that exists: ``mask_pattern`` when given (then it must exist); the sibling
  ``<prefix>_desc-brain_mask.nii.gz``, then ``<prefix>_mask.nii.gz``; for a BIDS folder, the same
  two names in ``ROOT/derivatives/<pipeline>/<same sub/ses/dwi folder>/`` (exactly one pipeline
  may have it). Without a mask, :func:`~mixmap.io.load_dwi`'s rule selects the voxels (positive
  mean b=0 signal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mixmap.acquisition import Acquisition
from mixmap.io.gradients import gradient_files, read_gradients
from mixmap.io.nifti import DWIData, InputError, bids_entities, load_dwi, load_image

DWI_SUFFIXES = ("_dwi.nii.gz", "_dwi.nii")
MASK_NAMES = ("desc-brain_mask.nii.gz", "mask.nii.gz")


@dataclass(frozen=True)
class Scan:
    """One scan of a cohort: its files, and its BIDS entities (``sub-01_ses-2``)."""

    dwi: Path
    bvals: Path  # an FSL bval file, or an MRtrix .b table when bvecs is None
    bvecs: Path | None
    mask: Path | None
    entities: str
    mask_threshold: float | None = None
    ignore_mask_affine: bool = False
    max_b: float | None = None  # s/mm²: volumes above it are left out

    def load(self) -> DWIData:
        """The scan's voxels (:func:`~mixmap.io.load_dwi` with this scan's mask options and
        volume selection)."""
        return load_dwi(self.dwi, self.bvals, self.bvecs, self.mask,
                        mask_threshold=self.mask_threshold,
                        ignore_mask_affine=self.ignore_mask_affine, max_b=self.max_b)

    def acquisition(self) -> Acquisition:
        """The acquisition of the volumes its gradient files and ``max_b`` keep (the image's
        header only is read, for the affine an MRtrix table needs)."""
        return read_gradients(self.bvals, self.bvecs, load_image(self.dwi, "DWI").affine
                              ).at_most(self.max_b, self.bvals).acquisition

    @property
    def subject(self) -> str:
        return self.entities.split("_")[0]

    @property
    def session(self) -> str | None:
        return next((e for e in self.entities.split("_") if e.startswith("ses-")), None)

    @property
    def folder(self) -> str:
        """The scan's output folder relative to OUT: ``sub-01/[ses-2/]dwi``."""
        return "/".join([self.subject, *([self.session] if self.session else []), "dwi"])


def _name_base(dwi: Path) -> tuple[str, str]:
    """(stem, base): ``sub-01_dwi.nii.gz`` -> (``sub-01_dwi``, ``sub-01_``); ``dwi.nii`` ->
    (``dwi``, ``''``). Sibling files are ``stem + '.bval'`` and ``base + 'mask.nii.gz'``."""
    name = dwi.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    base = name[: -len("dwi")] if name.endswith("dwi") else name + "_"
    return name, base


def gradient_siblings(dwi: Path) -> tuple[Path, Path]:
    """``x_dwi.nii.gz`` -> (``x_dwi.bval``, ``x_dwi.bvec``) in the same folder."""
    stem, _ = _name_base(dwi)
    return dwi.with_name(stem + ".bval"), dwi.with_name(stem + ".bvec")


def find_mask(dwi: Path, root: Path | None = None, mask_pattern: str | None = None) -> Path | None:
    """The mask of ``dwi`` by the rule in the module docstring, or None.

    ``mask_pattern`` is a path template: ``{dir}`` (the DWI's folder), ``{base}`` (its name up to
    ``dwi``, e.g. ``sub-01_``), ``{entities}``, ``{sub}``, ``{ses}`` (empty without a session)
    and ``{root}`` (the BIDS folder, else the DWI's folder); a relative result is taken from the
    DWI's folder.
    """
    _, base = _name_base(dwi)
    if mask_pattern is not None:
        entities = bids_entities(dwi)
        parts = entities.split("_") if entities else []
        fields = {"dir": str(dwi.parent), "base": base, "entities": entities,
                  "sub": parts[0] if parts else "",
                  "ses": next((p for p in parts if p.startswith("ses-")), ""),
                  "root": str(root if root is not None else dwi.parent)}
        try:
            rel = mask_pattern.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"--mask-pattern {mask_pattern!r}: cannot fill it in ({exc}); use the fields "
                + ", ".join("{" + k + "}" for k in fields)
            ) from None
        path = Path(rel) if Path(rel).is_absolute() else dwi.parent / rel
        if not path.exists():
            raise InputError(f"{path}: mask of {dwi} (from --mask-pattern) not found; check the "
                             f"pattern or add the mask")
        return path
    for name in MASK_NAMES:
        sibling = dwi.with_name(base + name)
        if sibling.exists():
            return sibling
    if root is not None and (root / "derivatives").is_dir():
        rel = dwi.parent.relative_to(root)
        for name in MASK_NAMES:
            found = sorted((root / "derivatives").glob(f"*/{rel.as_posix()}/{base}{name}"))
            if len(found) > 1:
                raise InputError(
                    f"{dwi}: several masks in derivatives/ ({found[0]}, {found[1]}); choose one "
                    f"with --mask-pattern"
                )
            if found:
                return found[0]
    return None


def discover_bids(root: Path) -> list[Path]:
    """The DWI files ``sub-*/[ses-*/]dwi/*_dwi.nii[.gz]`` of a BIDS dataset folder, sorted."""
    found = {p for pattern in ("sub-*/dwi/*", "sub-*/ses-*/dwi/*") for p in root.glob(pattern)
             if p.name.endswith(DWI_SUFFIXES)}
    if not found:
        raise InputError(
            f"{root}: no sub-*/[ses-*/]dwi/*_dwi.nii.gz found; give a BIDS dataset folder or "
            f"the DWI files themselves"
        )
    return sorted(found)


def find_scans(
    inputs: Sequence[Path],
    *,
    bvals: Path | None = None,
    bvecs: Path | None = None,
    grad: Path | None = None,
    mask_pattern: str | None = None,
    mask_threshold: float | None = None,
    ignore_mask_affine: bool = False,
    max_b: float | None = None,
    participants: Sequence[str] | None = None,
) -> list[Scan]:
    """The scans of a cohort: ``inputs`` is one BIDS folder, or DWI files; only those of the
    ``participants`` (labels without ``sub-``) when given, a label without a scan refused.

    Every scan needs BIDS entities in its name (``sub-<label>[_ses-<label>]..._dwi.nii.gz``),
    as they name its output folder, and no two scans may have the same. Gradient files are the
    siblings unless ``bvals`` and ``bvecs``, or an MRtrix table ``grad``, are given (then they
    serve every scan, each in its own image's space).
    """
    root, files = _dwi_files([Path(p) for p in inputs])
    if participants is not None:
        files = _of_participants(files, participants, root or files[0].parent)
    shared_bvals, shared_bvecs = gradient_files(bvals, bvecs, grad)
    if (bvals is None) != (bvecs is None):
        raise ValueError("give both --bvals and --bvecs (used for every scan), or neither (each "
                         "scan's sibling .bval/.bvec are used)")
    scans: list[Scan] = []
    seen: dict[str, Path] = {}
    for dwi in files:
        entities = _unique_entities(dwi, seen)
        if shared_bvals is not None:
            bval, bvec = shared_bvals, shared_bvecs
        else:
            bval, bvec = _existing_siblings(dwi)
        scans.append(Scan(dwi, Path(bval), None if bvec is None else Path(bvec),
                          find_mask(dwi, root, mask_pattern), entities, mask_threshold,
                          ignore_mask_affine, max_b))
    return scans


def _dwi_files(inputs: list[Path]) -> tuple[Path | None, list[Path]]:
    """(the BIDS folder or None, the DWI files): one folder is searched, files are kept."""
    dirs = [p for p in inputs if p.is_dir()]
    if dirs and len(inputs) > 1:
        raise ValueError(
            f"{dirs[0]}: a folder among several inputs; give one BIDS dataset folder, or DWI "
            f"files only"
        )
    root = dirs[0] if dirs else None
    return root, discover_bids(root) if root is not None else inputs


def _unique_entities(dwi: Path, seen: dict[str, Path]) -> str:
    """The BIDS entities of an existing ``dwi``, refused when missing or already in ``seen``
    (entities -> DWI, updated here): they name the scan's output folder."""
    if not dwi.exists():
        raise InputError(f"{dwi}: file not found; check the DWI path")
    entities = bids_entities(dwi)
    if not entities:
        raise InputError(
            f"{dwi}: not a BIDS name; a cohort writes each scan to its sub-<label>/ folder, "
            f"so name it sub-<label>[_ses-<label>]_dwi.nii.gz"
        )
    if entities in seen:
        raise InputError(
            f"{dwi}: same entities ({entities}) as {seen[entities]}; each scan of a cohort "
            f"needs its own sub-/ses-/run- labels"
        )
    seen[entities] = dwi
    return entities


def _existing_siblings(dwi: Path) -> tuple[Path, Path]:
    """:func:`gradient_siblings` of ``dwi``, refused when either is missing."""
    bval, bvec = gradient_siblings(dwi)
    for f, opt in ((bval, "--bvals"), (bvec, "--bvecs")):
        if not f.exists():
            raise InputError(
                f"{f}: not found beside {dwi.name}; put {f.name} next to it, or give "
                f"{opt} (one file for all scans)"
            )
    return bval, bvec


def _of_participants(files: list[Path], labels: Sequence[str], where: Path) -> list[Path]:
    subject = {f: f.name.split("_")[0].removeprefix("sub-") for f in files}
    found = sorted(set(subject.values()))
    unknown = [lab for lab in labels if lab not in found]
    if unknown:
        raise InputError(f"{where}: no DWI scan of participant(s) {', '.join(unknown)}; it "
                         f"has {', '.join(found)}")
    return [f for f in files if subject[f] in labels]
