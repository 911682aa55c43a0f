"""Mono-exponential T2 decay over echo times: S(TE) = S0 · exp(−TE / T2), TE and T2 in ms.

The simplest relaxometry model (multi-echo spin echo, ignoring stimulated echoes): the
shortest echoes are the reference volumes that set the signal scale.
"""

from __future__ import annotations

import numpy as np
import torch

from mixmap.acquisition import Acquisition, VolumeGroup
from mixmap.models.base import Params, SignalModel, UnsupportedAcquisition
from mixmap.parameters import Parameter

#: Echo times within this (ms) of a group's shortest count as one echo time (encoder features).
TE_TOLERANCE = 0.5


class MonoExponentialT2(SignalModel):
    name = "t2"
    description = "mono-exponential T2: S0·exp(−TE/T2)"
    direction_independent = True
    required_fields = ("TE",)
    group_field = "TE"
    output_suffix = "T2map"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 4.0, "signal at TE = 0 (bounds relative to the scan scale)",
                  scaled=True),
        Parameter("T2", "ms", 1.0, 500.0, "transverse relaxation time"),
    )

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        te = acquisition.tensor("TE", params["T2"].device, params["T2"].dtype)
        return params["S0"][..., None] * torch.exp(-te / params["T2"][..., None])

    def check_scheme(self, acquisition: Acquisition) -> None:
        n_te = len(acquisition.groups("TE"))
        if n_te < 2:
            raise UnsupportedAcquisition(
                f"T2 needs at least 2 distinct echo times; this acquisition has {n_te}")

    def reference_volumes(self, acquisition: Acquisition) -> np.ndarray:
        te = acquisition.field("TE")
        return te == te.min()

    def volume_groups(self, acquisition: Acquisition, exact: bool = False) -> list[VolumeGroup]:
        return acquisition.groups("TE", 0.0 if exact else TE_TOLERANCE)
