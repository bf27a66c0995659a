#!/usr/bin/env bash
# One-shot GPU check, sized for an H200 session (target: under 8 minutes):
#   1. build the extension (CPU + CUDA kernels) in place,
#   2. run the GPU tests (cuda and triton backends on cuda tensors),
#   3. time both GPU backends against eager PyTorch and a device copy (N = 8192, V = 128256, bf16).
# Results go to benchmarks/results/<GPU name>/ and, when $OUT is set (device tool), to $OUT too.
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-16}
unset TRITON_INTERPRET
log() { echo "[gpu_check $(date +%T)] $*"; }

log "nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

log "build"
t0=$SECONDS
if ! timeout 300 python -m pip install --no-build-isolation --no-deps --no-index -e . > /tmp/pk_build.log 2>&1; then
  tail -40 /tmp/pk_build.log; log "build FAILED"; exit 1
fi
log "built in $((SECONDS - t0)) s"
python -c "import pykernels as pk; print('backends:', pk.available_backends(), 'cuda tensors:', pk.available_backends('cuda'))"

log "GPU tests"
timeout 240 python -m pytest tests -m gpu -q -x -p no:cacheprovider 2>&1 | tail -25
tests_rc=${PIPESTATUS[0]}
log "GPU tests rc=$tests_rc"

log "benchmark"
timeout 180 python -m benchmarks.gpu_divergence 2>&1 | tail -20
if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/" 2>/dev/null || true; fi
log "done"
exit "$tests_rc"
