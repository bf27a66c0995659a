#!/usr/bin/env bash
# One-shot GPU check, sized for an H200 session (target: under 8 minutes):
#   1. build the extension (CPU + CUDA kernels) in place,
#   2. run the GPU tests (cuda and triton backends on cuda tensors),
#   3. time both GPU backends against eager PyTorch and a device copy (N = 8192, bf16): the
#      divergences at V = 128256, token log-probs + entropy at V = 151936, and the Sinkhorn
#      cost matrix (softmax_cdist, both costs) at G = 1024, V = 128256.
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
timeout 180 python -m benchmarks.gpu_divergence --ops forward_kl jsd 2>&1 | tail -12
# RL: token log-probs + entropy at Qwen2.5's vocabulary (published fused figure to beat:
# 0.89 ms on an H100 against 12.8 ms eager, TRL issue 7244).
timeout 120 python -m benchmarks.gpu_divergence --ops logprobs_entropy --vocab 151936 \
  --out "benchmarks/results/gpu/logprobs_$(date +%F).json" 2>&1 | tail -6
# Sinkhorn's cost matrix at G = 1024 rows, V = 128256 (compute-bound: G^2 V pair terms).
timeout 150 python -m benchmarks.gpu_divergence --ops cdist_l1 cdist_sqeuclidean --rows 1024 \
  --out "benchmarks/results/gpu/cdist_$(date +%F).json" 2>&1 | tail -8
if [ -n "${OUT:-}" ]; then cp -r benchmarks/results "$OUT/" 2>/dev/null || true; fi
log "done"
exit "$tests_rc"
