"""Signal models. A new model is one file here plus one line in :data:`MODELS`."""

from __future__ import annotations

from mixmap.models.base import Params, SignalModel, UnsupportedAcquisition
from mixmap.models.diffusion.ball_stick import BallStick
from mixmap.models.diffusion.dki import DKI
from mixmap.models.diffusion.dti import DTI
from mixmap.models.diffusion.ivim import IVIM
from mixmap.models.diffusion.msdki import MSDKI
from mixmap.models.diffusion.noddi import NODDI
from mixmap.models.relaxometry.mwf import MyelinWaterFraction
from mixmap.models.relaxometry.t1_ir import InversionRecoveryT1
from mixmap.models.relaxometry.t1_vfa import VariableFlipAngleT1
from mixmap.models.relaxometry.t2 import MonoExponentialT2
from mixmap.models.relaxometry.t2star import MonoExponentialT2star

MODELS: dict[str, type[SignalModel]] = {
    MSDKI.name: MSDKI,
    BallStick.name: BallStick,
    DTI.name: DTI,
    DKI.name: DKI,
    NODDI.name: NODDI,
    IVIM.name: IVIM,
    MonoExponentialT2.name: MonoExponentialT2,
    MonoExponentialT2star.name: MonoExponentialT2star,
    MyelinWaterFraction.name: MyelinWaterFraction,
    InversionRecoveryT1.name: InversionRecoveryT1,
    VariableFlipAngleT1.name: VariableFlipAngleT1,
}


def get_model(name: str) -> SignalModel:
    """An instance of the registered model ``name`` (a clear error lists the choices)."""
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(MODELS)}"
        ) from None


__all__ = ["MODELS", "Params", "SignalModel", "UnsupportedAcquisition", "get_model"]
