"""Mono-exponential T2 decay over echo times: S(TE) = S0 · exp(−TE / T2), TE and T2 in ms.

The simplest relaxometry model (multi-echo spin echo, ignoring stimulated echoes): the
shortest echoes are the reference volumes that set the signal scale. T2* over the echoes of a
multi-echo gradient echo is the same decay (:mod:`mixmap.models.relaxometry.t2star`).
"""

from __future__ import annotations

import torch

from mixmap.acquisition import Acquisition, multi_echo_scheme
from mixmap.models.base import Params
from mixmap.models.relaxometry.base import RelaxometryModel
from mixmap.parameters import Parameter


class MonoExponentialT2(RelaxometryModel):
    name = "t2"
    description = "mono-exponential T2: S0·exp(−TE/T2)"
    required_fields = ("TE",)
    group_field = "TE"
    output_suffix = "T2map"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 4.0, "signal at TE = 0 (bounds relative to the scan scale)",
                  scaled=True, bids_suffix="M0map"),
        Parameter("T2", "ms", 1.0, 3000.0, "transverse relaxation time", bids_suffix="T2map"),
    )
    #: The decay-time parameter (T2, T2star).
    decay = "T2"

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        rate = params[self.decay]
        te = acquisition.tensor("TE", rate.device, rate.dtype)
        return params["S0"][..., None] * torch.exp(-te / rate[..., None])

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        rate = params[self.decay][..., None]
        te = acquisition.tensor("TE", rate.device, rate.dtype)
        e = torch.exp(-te / rate)
        return {"S0": e, self.decay: params["S0"][..., None] * e * te / rate**2}

    def example_acquisition(self) -> Acquisition:
        return multi_echo_scheme()
