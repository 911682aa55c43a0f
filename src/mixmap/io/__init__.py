"""Input and output: NIfTI scans and gradient files (nifti), output names (naming), maps and
sidecars written atomically (output), trained models (model_store)."""

from mixmap.io.naming import MapName, map_name, parse_map_name
from mixmap.io.nifti import (
    DWIData,
    InputError,
    bids_entities,
    load_dwi,
    load_image,
    vectors_to_volume,
)
from mixmap.io.output import (
    AtomicOutput,
    OutputError,
    OutputExistsError,
    OutputLock,
    existing_maps,
    save_maps,
    stage_maps,
)

__all__ = [
    "AtomicOutput",
    "DWIData",
    "InputError",
    "MapName",
    "OutputError",
    "OutputExistsError",
    "OutputLock",
    "bids_entities",
    "existing_maps",
    "load_dwi",
    "load_image",
    "map_name",
    "parse_map_name",
    "save_maps",
    "stage_maps",
    "vectors_to_volume",
]
