#!/usr/bin/env bash
# One-shot GPU check, sized for an H200 session (target: under 8 minutes):
#   1. build the extension (CPU + CUDA kernels) in place,
#   2. run the GPU tests (cuda and triton backends on cuda tensors),
#   3. the benchmark harness's GPU sweep: both GPU backends, eager PyTorch, torch.compile (and
#      Liger when installed) with a device copy of the same bytes as the bandwidth yardstick,
#      over every op (divergences, token log-probs + entropy, full KL, softmax_cdist and the
#      Sinkhorn loss at G = 1024).
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

log "benchmark sweep (python -m benchmarks --device cuda)"
# Every op on every provider over N in {1024..16384} x V in {32000..256000}, bf16 (Sinkhorn ops:
# G = 1024 rows), stopped after 6 minutes so the whole check stays within its budget; the
# results so far are written after every case.
timeout 420 python -m benchmarks --device cuda --max-minutes 6 --no-progress 2>&1 | tail -80
if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/" 2>/dev/null || true; fi
log "done"
exit "$tests_rc"
