"""What every acquisition module shares: the error it raises and the thresholds that read,
group and check b-values and gradient directions (b in ms/µm², 1 ms/µm² = 1000 s/mm²)."""

from __future__ import annotations

#: A bval file whose largest value is below this is read as ms/µm² rather than s/mm².
MS_UM2_THRESHOLD = 50.0
#: b-values at or below this (ms/µm², i.e. 50 s/mm²) count as b=0 volumes.
B0_THRESHOLD = 0.05
#: Shells hold the b-values within max(SHELL_TOLERANCE, SHELL_RELATIVE_TOLERANCE · b) of their
#: lowest: 5 s/mm² keeps IVIM's b = 0, 10, 20, 30 ... s/mm² apart, 5 % of b takes in the few
#: s/mm² (HCP: 990-1010 at b = 1000) by which scanners jitter a shell
#: (:func:`~mixmap.acquisition.core.group_values`).
SHELL_TOLERANCE = 0.005
#: The relative part of the shell tolerance (a fraction of b).
SHELL_RELATIVE_TOLERANCE = 0.05
#: Gradient vectors whose norm differs from 1 by more than this are refused as not directions.
BVEC_NORM_TOLERANCE = 0.1


class AcquisitionError(ValueError):
    """A gradient table that cannot be used; the message names the file and the fix."""
