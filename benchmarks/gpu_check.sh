#!/usr/bin/env bash
# One-shot GPU check, sized for one device-tool command on an H200 (at most 600 s, so the
# steps' timeouts add up to 570 s; target: well under 8 minutes):
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
if ! timeout 240 python -m pip install --no-build-isolation --no-deps --no-index -e . > /tmp/pk_build.log 2>&1; then
  tail -40 /tmp/pk_build.log; log "build FAILED"; exit 1
fi
log "built in $((SECONDS - t0)) s"
python -c "import pykernels as pk; print('backends:', pk.available_backends(), 'cuda tensors:', pk.available_backends('cuda'))"

log "GPU tests"
timeout 150 python -m pytest tests -m gpu -q --maxfail=10 -p no:cacheprovider 2>&1 | tail -60
tests_rc=${PIPESTATUS[0]}
log "GPU tests rc=$tests_rc"

log "benchmark sweep (python -m benchmarks --device cuda)"
# Every op on every provider over N in {1024..16384} x V in {32000..256000}, bf16 (Sinkhorn ops:
# G = 1024 rows), headline shapes of every op first, no new case started after 2.5 minutes.
# Results are written after every case, straight into $OUT when the device tool runs this,
# so a run cut short still returns what it measured.
results_dir=benchmarks/results
if [ -n "${OUT:-}" ]; then results_dir="$OUT/results"; fi
timeout 180 python -m benchmarks --device cuda --max-minutes 2.5 --no-progress \
  --results-dir "$results_dir" 2>&1 | tail -80
log "done"
exit "$tests_rc"
