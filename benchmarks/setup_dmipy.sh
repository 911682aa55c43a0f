#!/usr/bin/env bash
# Make the benchmark-only virtual environment for dmipy 1.0.x (the classic dmipy API that
# benchmarks/lsq.py compares our ball-stick least squares against). mixmap never imports dmipy.
#
#   bash benchmarks/setup_dmipy.sh            # creates .venv-dmipy in the repository root
#   VENV=/some/where bash benchmarks/setup_dmipy.sh
#
# dmipy 1.0.5 (MIT licence) pins scipy==1.4.1, which has no wheel for Python >= 3.9, so it is
# installed with --no-deps on top of a numpy/scipy/dipy set checked here on Python 3.11 (it
# imports, and ball-stick brute2fine fits the simulated data with sensible estimates).
# numba makes dmipy's models faster; pathos gives it parallel voxel fitting.
# The PyPI package "dmipy" 2.x is a different project (JAX engines dmipy-sim / dmipy-fit, AGPL-3.0
# or commercial) without the classic API, hence the pin.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-dmipy}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
    "numpy==1.23.5" "scipy==1.10.1" "dipy==1.7.0" "numba==0.58.1" "pathos==0.3.5"
"$VENV/bin/python" -m pip install --quiet --no-deps "dmipy==1.0.5"
"$VENV/bin/python" -c "
from dmipy.core.modeling_framework import MultiCompartmentModel
from dmipy.signal_models import cylinder_models, gaussian_models
import importlib.metadata as m
MultiCompartmentModel([gaussian_models.G1Ball(), cylinder_models.C1Stick()])
print('dmipy', m.version('dmipy'), 'ready in $VENV')
"
