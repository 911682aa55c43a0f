"""Output names: the one place that builds and parses the names of what ``mixmap`` writes.

Maps are BIDS-derivative names, ``[<entities>_]model-<m>_param-<p>[_desc-<d>]_<suffix>.nii.gz``,
where ``<suffix>`` is the model's :attr:`~mixmap.models.base.SignalModel.output_suffix`
(``dwimap`` for every diffusion model); a parameter with a qMRI-BIDS suffix of its own
(:attr:`~mixmap.parameters.Parameter.bids_suffix`: ``T2map``, ``T1map``, ``M0map`` ...) is named
by it instead, ``[<entities>_]model-<m>[_desc-<d>]_T2map.nii.gz``. Beside them:
``[<entities>_]model-<m>_fit.json`` and ``..._loss.csv``; a saved model is the folder
``model-<m>_method-<method>``; a cohort adds ``cohort.json`` and ``cohort_model-<m>_loss.csv``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The summary of a cohort fit, at the top of its output folder.
COHORT_JSON = "cohort.json"

_MAP_RE = re.compile(
    r"^(?:(?P<entities>sub-[^_]+(?:_[A-Za-z0-9]+-[^_]+)*)_)?model-(?P<model>[A-Za-z0-9]+)"
    r"(?:_param-(?P<param>[A-Za-z0-9]+))?(?:_desc-(?P<desc>[A-Za-z0-9]+))?"
    r"_(?P<suffix>[A-Za-z0-9]+)\.nii\.gz$"
)


def label(s: str) -> str:
    """A BIDS label (alphanumeric only): ``ball-stick`` -> ``ballstick``."""
    return "".join(ch for ch in s if ch.isalnum())


def output_suffix(model: str) -> str:
    """The map suffix the registered model ``model`` declares (``dwimap``, ``T2map`` ...)."""
    from mixmap.models import MODELS

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[model].output_suffix


def model_prefix(entities: str, model: str) -> str:
    """``[<entities>_]model-<m>_``: what every file of one model's fit of one scan starts with."""
    return (entities + "_" if entities else "") + f"model-{label(model)}_"


def parameter_suffix(model: str, param: str) -> str | None:
    """The qMRI-BIDS suffix of parameter ``param`` of the registered model ``model`` (``T2map``
    ...), or None (then it is named ``param-<param>``)."""
    from mixmap.models import MODELS

    for p in MODELS[model].parameters + MODELS[model].derived:
        if p.name == param:
            return p.bids_suffix
    return None


def map_name(entities: str, model: str, param: str, desc: str | None = None) -> str:
    """``[<entities>_]model-<model>_param-<param>[_desc-<desc>]_<suffix>.nii.gz``, the suffix
    being the model's ``output_suffix``; ``[<entities>_]model-<model>[_desc-<desc>]_<own>
    .nii.gz`` for a parameter with a qMRI-BIDS suffix of its own (:func:`parameter_suffix`)."""
    suffix = output_suffix(model)
    own = parameter_suffix(model, param)
    name = model_prefix(entities, model).rstrip("_")
    if own is None:
        name += f"_param-{label(param)}"
    if desc:
        name += f"_desc-{label(desc)}"
    return f"{name}_{own or suffix}.nii.gz"


def sidecar_name(map_file: str) -> str:
    """The JSON sidecar of a map: ``x.nii.gz`` -> ``x.json``."""
    return map_file.replace(".nii.gz", ".json")


def fit_json_name(entities: str, model: str) -> str:
    """``[<entities>_]model-<m>_fit.json``: the whole run of one scan."""
    return model_prefix(entities, model) + "fit.json"


def loss_csv_name(entities: str, model: str) -> str:
    """``[<entities>_]model-<m>_loss.csv``: a learned fit's loss curve."""
    return model_prefix(entities, model) + "loss.csv"


def report_name(entities: str, model: str) -> str:
    """``[<entities>_]model-<m>_report.html``: the HTML report of one scan's fit."""
    return model_prefix(entities, model) + "report.html"


def cohort_loss_csv_name(model: str) -> str:
    """``cohort_model-<m>_loss.csv``: the loss curve of a cohort's shared model."""
    return f"cohort_model-{label(model)}_loss.csv"


def model_folder(model: str, method: str) -> str:
    """``model-<m>_method-<method>``: the folder a trained model is saved in."""
    return f"model-{model}_method-{method}"


def checkpoint_name(scope: str, model: str, method: str) -> str:
    """``.mixmap-checkpoint-<scope>-<m>-<method>.pt``, the training checkpoint kept in OUT;
    ``scope`` is the scan's entities (``scan`` without), or ``cohort``."""
    return f".mixmap-checkpoint-{scope}-{model}-{method}.pt"


@dataclass(frozen=True)
class MapName:
    """The parts of a map file name (labels as written, e.g. model ``ballstick``)."""

    entities: str
    model: str
    param: str | None  # None: a qMRI-BIDS suffix names the parameter
    desc: str | None
    suffix: str


def parse_map_name(name: str) -> MapName | None:
    """The parts of a map name built by :func:`map_name`, or None for any other file name."""
    m = _MAP_RE.match(name)
    if m is None:
        return None
    return MapName(m["entities"] or "", m["model"], m["param"], m["desc"], m["suffix"])


__all__ = [
    "COHORT_JSON",
    "MapName",
    "checkpoint_name",
    "cohort_loss_csv_name",
    "fit_json_name",
    "label",
    "loss_csv_name",
    "map_name",
    "model_folder",
    "model_prefix",
    "output_suffix",
    "parameter_suffix",
    "parse_map_name",
    "sidecar_name",
]
