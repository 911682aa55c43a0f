"""Input and output: NIfTI scans and gradient files, maps with BIDS-derivative names."""

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
    OutputExistsError,
    existing_maps,
    map_name,
    save_maps,
    stage_maps,
)

__all__ = [
    "AtomicOutput",
    "DWIData",
    "InputError",
    "OutputExistsError",
    "bids_entities",
    "existing_maps",
    "load_dwi",
    "load_image",
    "map_name",
    "save_maps",
    "stage_maps",
    "vectors_to_volume",
]
