#!/usr/bin/env bash
# Before `benchmarks/gpu_check.py` runs on the lent GPU machine (the `device` tool): fetch, here,
# the wheels that machine lacks into .whl/ (git-ignored), which the run carries. Its image has
# Python 3.12 with torch, numpy, scipy, typer, tqdm, matplotlib, safetensors, pytest and
# pytest-xdist, but not nibabel; it reaches no package registry. See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "nibabel==5.4.2"
ls -l .whl
