"""Simulated scans: mixture presets, signals with Gaussian or Rician noise, brain-shaped
layouts, and the folders ``mixmap simulate`` writes."""

from mixmap.simulation.brain import brain_layout, simulate_brain
from mixmap.simulation.files import (
    grid_shape,
    preset_from_info,
    read_simulation_info,
    write_simulation,
)
from mixmap.simulation.presets import NOISE_TYPES, PRESETS, Cluster, Preset, get_preset, get_scheme
from mixmap.simulation.synthesize import Simulation, add_noise, sample_parameters, simulate

__all__ = [
    "NOISE_TYPES",
    "PRESETS",
    "Cluster",
    "Preset",
    "Simulation",
    "add_noise",
    "brain_layout",
    "get_preset",
    "get_scheme",
    "grid_shape",
    "preset_from_info",
    "read_simulation_info",
    "sample_parameters",
    "simulate",
    "simulate_brain",
    "write_simulation",
]
