"""Named example acquisition schemes for simulations and tests: ``hcp`` and ``clinical``
(diffusion), ``multi-echo`` (echo times)."""

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


SCHEMES = {"hcp": hcp_scheme, "clinical": clinical_scheme, "ivim": ivim_scheme}


def multi_echo_scheme() -> Acquisition:
    """A multi-echo spin-echo scheme: 16 echo times, 10 to 160 ms."""
    return Acquisition.from_fields({"TE": np.arange(1, 17) * 10.0}, source="multi-echo")


#: An example acquisition for each field a model may require (for simulations and tests).
EXAMPLE_FOR_FIELD = {"b": hcp_scheme, "direction": hcp_scheme, "TE": multi_echo_scheme}


def example_scheme(required_fields: tuple[str, ...]) -> Acquisition:
    """An example acquisition that has every field in ``required_fields``."""
    makers = {EXAMPLE_FOR_FIELD[f] for f in required_fields}
    if len(makers) > 1:
        raise ValueError(f"no example acquisition has all of {required_fields}")
    return (makers.pop() if makers else hcp_scheme)()
