#!/usr/bin/env bash
# The README's test command: install + build, then the whole suite (no GPU needed; GPU tests
# skip without CUDA, Triton runs under TRITON_INTERPRET=1 on CPU tensors).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest tests -q "$@"
