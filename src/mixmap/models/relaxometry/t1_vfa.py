"""T1 by variable flip angle (spoiled gradient echo, DESPOT1; Deoni et al. 2003):

S(α) = M0 · sin α · (1 − E1) / (1 − cos α · E1), E1 = exp(−TR/T1), TR and T1 in ms, α the
nominal flip angle (degrees). The transmit field must be uniform: without a B1 map, a flip angle
off by a factor r biases T1 by about r².
"""

from __future__ import annotations

import torch

from mixmap.acquisition import Acquisition, variable_flip_angle_scheme
from mixmap.models.base import Params
from mixmap.models.relaxometry.base import RelaxometryModel
from mixmap.parameters import Parameter


class VariableFlipAngleT1(RelaxometryModel):
    name = "t1-vfa"
    description = "variable flip angle (spoiled GRE): M0·sin α·(1−E1)/(1−cos α·E1)"
    required_fields = ("flip_angle", "TR")
    group_field = "flip_angle"
    output_suffix = "T1map"
    min_distinct = 2
    reference = None
    parameters = (
        # the Ernst-angle signal is a few % of M0 at TR ≪ T1: M0 is tens of signal scales
        Parameter("M0", "a.u.", 0.0, 60.0, "equilibrium magnetisation (bounds relative to the "
                  "scan scale)", scaled=True, bids_suffix="M0map"),
        Parameter("T1", "ms", 50.0, 6000.0, "longitudinal relaxation time", bids_suffix="T1map"),
    )
    scale_parameter = "M0"

    def _terms(self, params: Params, acquisition: Acquisition):
        t1 = params["T1"][..., None]
        alpha = torch.deg2rad(acquisition.tensor("flip_angle", t1.device, t1.dtype))
        tr = acquisition.tensor("TR", t1.device, t1.dtype)
        e1 = torch.exp(-tr / t1)
        return torch.sin(alpha), torch.cos(alpha), tr, t1, e1, 1 - torch.cos(alpha) * e1

    def forward(self, params: Params, acquisition: Acquisition) -> torch.Tensor:
        sin, _, _, _, e1, den = self._terms(params, acquisition)
        return params["M0"][..., None] * sin * (1 - e1) / den

    def jacobian(self, params: Params, acquisition: Acquisition) -> Params:
        sin, cos, tr, t1, e1, den = self._terms(params, acquisition)
        m0 = params["M0"][..., None]
        d_e1 = sin * (cos - 1) / den**2  # d signal / d E1, per unit M0
        return {"M0": sin * (1 - e1) / den, "T1": m0 * d_e1 * e1 * tr / t1**2}

    def example_acquisition(self) -> Acquisition:
        return variable_flip_angle_scheme(6)
