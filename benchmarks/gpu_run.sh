#!/usr/bin/env bash
# On the lent GPU machine (the `device` tool runs it in a copy of this repository, with .whl/
# carried; `bash benchmarks/gpu_prepare.sh` fills it here first): install those wheels beside
# the machine's own packages, then run the time-boxed check, which writes gpu_check.json to
# $OUT. Options go to benchmarks/gpu_check.py (e.g. --budget 420). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mixmap-site .whl/*.whl
export PYTHONPATH="/tmp/mixmap-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
exec "$PY" benchmarks/gpu_check.py --out "${OUT:-/tmp/mixmap-gpu}" "$@"
