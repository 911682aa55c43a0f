"""Named example acquisition schemes for simulations and tests: ``hcp``, ``clinical`` and
``ivim`` (diffusion); multi-echo spin and gradient echoes, inversion recovery and variable flip
angles (relaxometry, :data:`RELAXOMETRY_SCHEMES`)."""

from __future__ import annotations

import numpy as np

from mixmap.acquisition.core import Acquisition


def fibonacci_sphere(n: int, hemisphere: bool = False) -> np.ndarray:
    """(n, 3) nearly uniform unit vectors (Fibonacci lattice); z >= 0 with ``hemisphere``."""
    i = np.arange(n) + 0.5
    z = 1 - i / n if hemisphere else 1 - 2 * i / n
    r = np.sqrt(np.clip(1 - z**2, 0, None))
    phi = np.pi * (3 - np.sqrt(5)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def hcp_scheme() -> Acquisition:
    """The paper's scheme: 18 b=0 and 90 directions at each of b = 1000, 2000, 3000 s/mm²."""
    bvals = [0.0] * 18
    bvecs = [np.zeros(3)] * 18
    for k, b in enumerate((1000.0, 2000.0, 3000.0)):
        dirs = fibonacci_sphere(90 + k)[:90]  # a slightly different set per shell
        bvals += [b] * 90
        bvecs += list(dirs)
    return Acquisition.from_arrays(np.array(bvals), np.array(bvecs), units="s/mm2", source="hcp")


def clinical_scheme() -> Acquisition:
    """A short clinical-style scheme: 2 b=0 and 10 directions at b = 1000, 2000, 3000 s/mm²."""
    bvals = [0.0, 0.0]
    bvecs = [np.zeros(3), np.zeros(3)]
    for b in (1000.0, 2000.0, 3000.0):
        bvals += [b] * 10
        bvecs += list(fibonacci_sphere(10))
    return Acquisition.from_arrays(
        np.array(bvals), np.array(bvecs), units="s/mm2", source="clinical"
    )


#: IVIM's b-values (s/mm²): most below 200, where the perfusion signal decays.
IVIM_BVALS = (10, 20, 30, 50, 80, 100, 150, 200, 300, 400, 600, 800, 1000)


def ivim_scheme() -> Acquisition:
    """A clinical IVIM scheme (body or brain): 2 b=0 and 3 orthogonal directions at each of
    b = 10 ... 1000 s/mm² (:data:`IVIM_BVALS`, 8 of them at most 200 s/mm²)."""
    bvals = [0.0, 0.0] + [float(b) for b in IVIM_BVALS for _ in range(3)]
    bvecs = [np.zeros(3)] * 2 + [np.eye(3)[i] for _ in IVIM_BVALS for i in range(3)]
    return Acquisition.from_arrays(np.array(bvals), np.array(bvecs), units="s/mm2",
                                   source="ivim")


def multi_echo_scheme(n: int = 16, spacing: float = 10.0) -> Acquisition:
    """A multi-echo spin echo: ``n`` echoes every ``spacing`` ms from ``spacing`` (16 × 10 ms:
    a clinical T2 protocol; 32 × 10 ms: the usual myelin water protocol)."""
    return Acquisition.from_fields({"TE": np.arange(1, n + 1) * float(spacing)},
                                   source=f"multi-echo-{n}")


def multi_gradient_echo_scheme(n: int = 12, first: float = 4.0, spacing: float = 4.0
                               ) -> Acquisition:
    """A multi-echo gradient echo: ``n`` echoes, the first at ``first`` ms, every ``spacing``
    ms (12 echoes 4 to 48 ms: a research T2* protocol at 3 T; 6 echoes of 5 ms: clinical)."""
    return Acquisition.from_fields({"TE": first + np.arange(n) * float(spacing)},
                                   source=f"mgre-{n}")


#: Inversion times (ms): Barral et al. 2010's four, and a ten-point research protocol.
INVERSION_TIMES = {4: (50.0, 400.0, 1100.0, 2500.0),
                   10: (50.0, 100.0, 200.0, 400.0, 700.0, 1000.0, 1500.0, 2000.0, 3000.0,
                        4500.0)}


def inversion_recovery_scheme(n: int = 4) -> Acquisition:
    """Inversion recovery at ``n`` (4 or 10) inversion times (:data:`INVERSION_TIMES`)."""
    return Acquisition.from_fields({"TI": np.array(INVERSION_TIMES[n])}, source=f"ir-{n}")


#: Flip angles (degrees) of variable-flip-angle protocols at TR = :data:`VFA_TR` ms: a
#: DESPOT1 pair about the Ernst angle of T1 ≈ 1 s, and six angles.
FLIP_ANGLES = {2: (4.0, 18.0), 6: (2.0, 4.0, 8.0, 12.0, 18.0, 25.0)}
VFA_TR = 15.0


def variable_flip_angle_scheme(n: int = 2, tr: float = VFA_TR) -> Acquisition:
    """Spoiled gradient echoes at ``n`` (2 or 6) flip angles (:data:`FLIP_ANGLES`), TR ``tr``
    ms."""
    angles = np.array(FLIP_ANGLES[n])
    return Acquisition.from_fields({"flip_angle": angles, "TR": np.full(angles.size, tr)},
                                   source=f"vfa-{n}")


#: Relaxometry schemes by name (``mixmap simulate --scheme``).
RELAXOMETRY_SCHEMES = {
    "mese-16": lambda: multi_echo_scheme(16),
    "mese-32": lambda: multi_echo_scheme(32),
    "mgre-6": lambda: multi_gradient_echo_scheme(6, 5.0, 5.0),
    "mgre-12": lambda: multi_gradient_echo_scheme(12),
    "ir-4": lambda: inversion_recovery_scheme(4),
    "ir-10": lambda: inversion_recovery_scheme(10),
    "vfa-2": lambda: variable_flip_angle_scheme(2),
    "vfa-6": lambda: variable_flip_angle_scheme(6),
}

SCHEMES = {"hcp": hcp_scheme, "clinical": clinical_scheme, "ivim": ivim_scheme,
           **RELAXOMETRY_SCHEMES}

#: An example acquisition for each field a model may require (for simulations and tests).
EXAMPLE_FOR_FIELD = {"b": hcp_scheme, "direction": hcp_scheme, "TE": multi_echo_scheme,
                     "TI": inversion_recovery_scheme, "flip_angle": variable_flip_angle_scheme,
                     "TR": variable_flip_angle_scheme}


def example_scheme(required_fields: tuple[str, ...]) -> Acquisition:
    """An example acquisition that has every field in ``required_fields``."""
    makers = {EXAMPLE_FOR_FIELD[f] for f in required_fields}
    if len(makers) > 1:
        raise ValueError(f"no example acquisition has all of {required_fields}")
    return (makers.pop() if makers else hcp_scheme)()
