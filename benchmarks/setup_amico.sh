#!/usr/bin/env bash
# Make the benchmark-only virtual environment for AMICO (dmri-amico), the NODDI peer that
# benchmarks/noddi.py runs as a subprocess. mixmap never imports AMICO: its licence allows
# research and educational use only (see the package's LICENSE).
#
#   bash benchmarks/setup_amico.sh            # creates .venv-amico in the repository root
#   VENV=/some/where bash benchmarks/setup_amico.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-amico}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "dmri-amico==2.1.1" nibabel
"$VENV/bin/python" -c "
import importlib.metadata as m
import amico
print('dmri-amico', m.version('dmri-amico'), 'ready in $VENV')
"
