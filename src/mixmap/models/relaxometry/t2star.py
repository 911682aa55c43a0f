"""Mono-exponential T2* decay over the echoes of a multi-echo gradient echo:
S(TE) = S0 · exp(−TE / T2*), TE and T2* in ms (no correction for macroscopic field gradients)."""

from __future__ import annotations

from mixmap.acquisition import Acquisition, multi_gradient_echo_scheme
from mixmap.models.relaxometry.t2 import MonoExponentialT2
from mixmap.parameters import Parameter


class MonoExponentialT2star(MonoExponentialT2):
    name = "t2star"
    description = "mono-exponential T2*: S0·exp(−TE/T2*) (multi-echo gradient echo)"
    output_suffix = "T2starmap"
    parameters = (
        Parameter("S0", "a.u.", 0.0, 4.0, "signal at TE = 0 (bounds relative to the scan scale)",
                  scaled=True, bids_suffix="M0map"),
        Parameter("T2star", "ms", 1.0, 1000.0, "effective transverse relaxation time T2*",
                  bids_suffix="T2starmap"),
    )
    decay = "T2star"

    def example_acquisition(self) -> Acquisition:
        return multi_gradient_echo_scheme()
