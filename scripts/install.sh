#!/usr/bin/env bash
# Installs the dependencies and builds pykernels (C++ CPU kernels; CUDA kernels too when nvcc
# and a CUDA build of torch are present) in place. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -r requirements.txt
# --no-build-isolation: compile against the torch just installed (an isolated build env would
# fetch a different torch and break the ABI).
python -m pip install --no-build-isolation -e .
python -c "import pykernels; print('pykernels backends:', pykernels.available_backends())"
