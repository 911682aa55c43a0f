"""Simulation presets: tissue-like mixtures of parameter values (per cluster a weight and
per-parameter Gaussian means and spreads), and the named acquisition schemes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixmap.acquisition import SCHEMES, Acquisition
from mixmap.models import get_model

NOISE_TYPES = ("gaussian", "rician")


@dataclass(frozen=True)
class Cluster:
    """One tissue class: mixture weight and per-parameter Gaussian mean and standard deviation.

    Parameters not listed take S0 = 1 (no spread) or, for directions, a uniform random
    direction. Draws outside a parameter's bounds are redrawn (a truncated Gaussian).
    """

    name: str
    weight: float
    mean: dict[str, float]
    std: dict[str, float]


@dataclass(frozen=True)
class Preset:
    """A named mixture of :class:`Cluster` for one model, and its default voxel count."""

    name: str
    model: str
    clusters: tuple[Cluster, ...]
    n_voxels: int = 10000
    description: str = ""
    #: The named acquisition scheme the preset is simulated on unless another is given.
    scheme: str = "hcp"

    @property
    def weights(self) -> np.ndarray:
        w = np.array([c.weight for c in self.clusters], dtype=np.float64)
        return w / w.sum()

    def varying(self) -> list[str]:
        """Scalar parameters that the clusters set (the model's scale parameter excluded)."""
        scale = get_model(self.model).scale_parameter
        names: list[str] = []
        for c in self.clusters:
            for k in c.mean:
                if k not in names and k != scale:
                    names.append(k)
        return names


_SD = float(np.sqrt(0.1))  # the paper's variance 0.1 for white- and grey-matter-like clusters

PRESETS: dict[str, Preset] = {
    "paper-msdki": Preset(
        "paper-msdki",
        "msdki",
        (
            Cluster("WM", 0.5, {"D": 1.0, "K": 1.5}, {"D": _SD, "K": _SD}),
            Cluster("GM", 0.4, {"D": 1.5, "K": 1.0}, {"D": _SD, "K": _SD}),
            Cluster("CSF", 1.0, {"D": 3.0, "K": 0.0}, {"D": 0.1, "K": 0.1}),
        ),
        description="The paper's 3-cluster MSDKI simulation: (D, K) = (1, 1.5), (1.5, 1), (3, 0), "
        "weights 0.5:0.4:1, variance 0.1, 0.1, 0.01; S0 = 1",
    ),
    "msdki-4": Preset(
        "msdki-4",
        "msdki",
        (
            Cluster("A", 0.3, {"D": 0.8, "K": 1.8}, {"D": 0.15, "K": 0.25}),
            Cluster("B", 0.3, {"D": 1.2, "K": 1.2}, {"D": 0.2, "K": 0.2}),
            Cluster("C", 0.15, {"D": 2.0, "K": 0.6}, {"D": 0.25, "K": 0.2}),
            Cluster("D", 0.25, {"D": 2.9, "K": 0.1}, {"D": 0.1, "K": 0.1}),
        ),
        description="A 4-cluster MSDKI mixture unlike the paper's (other means, spreads and "
        "weights), to check that nothing is tuned to the paper's preset",
    ),
    "ball-stick": Preset(
        "ball-stick",
        "ball-stick",
        (
            Cluster("WM", 0.45, {"f": 0.6, "Dpar": 1.7, "Diso": 0.9},
                    {"f": 0.08, "Dpar": 0.2, "Diso": 0.15}),
            Cluster("GM", 0.35, {"f": 0.25, "Dpar": 1.5, "Diso": 1.0},
                    {"f": 0.08, "Dpar": 0.2, "Diso": 0.15}),
            Cluster("CSF", 0.2, {"f": 0.03, "Dpar": 2.0, "Diso": 3.0},
                    {"f": 0.02, "Dpar": 0.3, "Diso": 0.1}),
        ),
        description="Ball-stick with white-matter, grey-matter and CSF-like clusters, uniformly "
        "random stick directions; S0 = 1",
    ),
    "ivim-body": Preset(
        "ivim-body",
        "ivim",
        (
            Cluster("liver", 0.45, {"f": 0.25, "D": 1.05, "Dstar": 50.0},
                    {"f": 0.06, "D": 0.15, "Dstar": 15.0}),
            Cluster("kidney", 0.30, {"f": 0.20, "D": 2.0, "Dstar": 25.0},
                    {"f": 0.05, "D": 0.2, "Dstar": 8.0}),
            Cluster("spleen", 0.25, {"f": 0.10, "D": 0.85, "Dstar": 40.0},
                    {"f": 0.04, "D": 0.1, "Dstar": 12.0}),
        ),
        description="IVIM in the abdomen: liver (f 0.25, D 1.05, D* 50 µm²/ms), kidney "
        "cortex (0.20, 2.0, 25) and spleen (0.10, 0.85, 40), values of the order reported for "
        "free-breathing IVIM (Le Bihan 2019 review; Luciani 2008; Sigmund 2012); S0 = 1. "
        "Simulated on the clinical IVIM scheme (ivim) by default",
        scheme="ivim",
    ),
    "noddi": Preset(
        "noddi",
        "noddi",
        (
            Cluster("WM", 0.45, {"icvf": 0.65, "od": 0.15, "isovf": 0.05},
                    {"icvf": 0.08, "od": 0.06, "isovf": 0.03}),
            Cluster("GM", 0.40, {"icvf": 0.40, "od": 0.45, "isovf": 0.10},
                    {"icvf": 0.07, "od": 0.08, "isovf": 0.05}),
            Cluster("CSF", 0.15, {"icvf": 0.20, "od": 0.50, "isovf": 0.90},
                    {"icvf": 0.10, "od": 0.20, "isovf": 0.05}),
        ),
        description="NODDI (Watson) with white-matter (icvf 0.65, od 0.15, isovf 0.05), "
        "cortical grey-matter (0.40, 0.45, 0.10) and CSF-like (isovf 0.9) clusters, values of "
        "the order of Zhang et al. 2012 and Kodiweera et al. 2016; uniformly random "
        "directions; S0 = 1",
    ),
    # ---- relaxometry at 3 T: white matter, cortical grey matter, CSF ------------------------
    "t2-brain": Preset(
        "t2-brain",
        "t2",
        (
            Cluster("WM", 0.45, {"T2": 69.0}, {"T2": 5.0}),
            Cluster("GM", 0.40, {"T2": 99.0}, {"T2": 8.0}),
            Cluster("CSF", 0.15, {"T2": 1500.0}, {"T2": 250.0}),
        ),
        description="T2 at 3 T: white matter 69 ms and grey matter 99 ms (Stanisz et al. 2005, "
        "MRM 54:507), CSF of the order of 1.5 s (a long, poorly determined T2 over 320 ms of "
        "echoes); S0 = 1. 32 echoes of 10 ms (mese-32) by default; mese-16 is a clinical "
        "protocol",
        scheme="mese-32",
    ),
    "t2star-brain": Preset(
        "t2star-brain",
        "t2star",
        (
            Cluster("WM", 0.45, {"T2star": 53.0}, {"T2star": 4.0}),
            Cluster("GM", 0.40, {"T2star": 66.0}, {"T2star": 6.0}),
            Cluster("CSF", 0.15, {"T2star": 300.0}, {"T2star": 60.0}),
        ),
        description="T2* at 3 T: frontal white matter 53 ms and cortical grey matter 66 ms "
        "(Peters et al. 2007, MRI 25:748); CSF set to a long 300 ms (an assumed value, not a "
        "measurement); S0 = 1. 12 echoes 4-48 ms (mgre-12) by default; mgre-6 is clinical",
        scheme="mgre-12",
    ),
    "mwf-brain": Preset(
        "mwf-brain",
        "mwf",
        (
            Cluster("WM", 0.45, {"MWF": 0.12, "T2my": 18.0, "T2ie": 70.0},
                    {"MWF": 0.03, "T2my": 3.0, "T2ie": 5.0}),
            Cluster("GM", 0.40, {"MWF": 0.04, "T2my": 18.0, "T2ie": 90.0},
                    {"MWF": 0.02, "T2my": 3.0, "T2ie": 8.0}),
            Cluster("CSF", 0.15, {"MWF": 0.01, "T2my": 18.0, "T2ie": 1500.0},
                    {"MWF": 0.01, "T2my": 3.0, "T2ie": 250.0}),
        ),
        description="Two-pool myelin water at 3 T: white matter MWF 0.12, grey matter 0.04, "
        "myelin water T2 18 ms and intra/extracellular T2 70 and 90 ms, of the order of "
        "MacKay et al. 1994 and Prasloski et al. 2012 (MRM 68:1803); CSF MWF near 0 with a "
        "1.5 s T2; S0 = 1. 32 echoes of 10 ms (mese-32)",
        scheme="mese-32",
    ),
    "t1-ir-brain": Preset(
        "t1-ir-brain",
        "t1-ir",
        (
            Cluster("WM", 0.45, {"T1": 900.0, "k": 1.95}, {"T1": 60.0, "k": 0.03}),
            Cluster("GM", 0.40, {"T1": 1500.0, "k": 1.95}, {"T1": 120.0, "k": 0.03}),
            Cluster("CSF", 0.15, {"T1": 4300.0, "k": 1.82}, {"T1": 300.0, "k": 0.04}),
        ),
        description="T1 at 3 T: white matter 900 ms and grey matter 1500 ms (between "
        "Wansapura et al. 1999, JMRI 9:531: 832 and 1331 ms, and Stanisz et al. 2005: 1084 "
        "and 1820 ms), CSF about 4.3 s; inversion factor k 1.95 (inversion efficiency 0.95) "
        "and, for CSF, 1.82 (incomplete recovery at TR 10 s); M0 = 1. Ten inversion times "
        "50-4500 ms (ir-10) by default; ir-4 is Barral et al. 2010's four",
        scheme="ir-10",
    ),
    "t1-vfa-brain": Preset(
        "t1-vfa-brain",
        "t1-vfa",
        (
            Cluster("WM", 0.45, {"M0": 10.0, "T1": 900.0}, {"T1": 60.0}),
            Cluster("GM", 0.40, {"M0": 10.0, "T1": 1500.0}, {"T1": 120.0}),
            Cluster("CSF", 0.15, {"M0": 10.0, "T1": 4300.0}, {"T1": 300.0}),
        ),
        description="T1 at 3 T as t1-ir-brain, by variable flip angle at TR 15 ms; M0 = 10 in "
        "every class (one scale, as the Bayes reference needs), so that the largest signal is "
        "0.4-0.9 and the SNR is relative to a signal near the Ernst angle's. Six flip angles "
        "2-25° (vfa-6) by default; vfa-2 is a DESPOT1 pair (4°, 18°)",
        scheme="vfa-6",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset of :data:`PRESETS` called ``name``; ValueError listing them otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def get_scheme(name_or_files: str | tuple[str, str]) -> Acquisition:
    """A named scheme (``hcp``, ``clinical``) or an FSL (bval, bvec) pair of files."""
    if isinstance(name_or_files, tuple):
        return Acquisition.from_fsl(*name_or_files)
    try:
        return SCHEMES[name_or_files]()
    except KeyError:
        raise ValueError(
            f"unknown scheme {name_or_files!r}; choose one of: {', '.join(SCHEMES)} "
            f"or give --bvals and --bvecs files"
        ) from None


__all__ = ["NOISE_TYPES", "PRESETS", "Cluster", "Preset", "get_preset", "get_scheme"]
