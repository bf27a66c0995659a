#!/usr/bin/env bash
# One-shot GPU check, sized for one device-tool command (at most 600 s; the steps' default
# budgets add up to 540 s, and an H200 should need well under that):
#   1. build the extension (CPU + CUDA kernels) in place,
#   2. run the GPU tests (cuda and triton backends on cuda tensors),
#   3. the benchmark harness's GPU sweep: both GPU backends, eager PyTorch, torch.compile (and
#      Liger when installed) with a device copy of the same bytes as the bandwidth yardstick,
#      over every op (divergences, token log-probs + entropy, full KL, softmax_cdist and the
#      Sinkhorn loss at G = 1024).
# Results go to benchmarks/results/<GPU name>/ and, when $OUT is set (device tool), to $OUT
# too, with every step's full log: what was written comes back even if the command is cut off.
#
# Knobs (environment): GPU_CHECK_STEPS (default "build tests bench"; e.g. "build bench" for a
# rerun that skips the tests), BUILD_S / TESTS_S / BENCH_S (each step's time limit, seconds),
# BENCH_MINUTES (no new benchmark case after this long), TEST_WORKERS (pytest-xdist workers when
# it is installed: the Triton compiles are CPU work), PYTHON (default: python3, else python;
# on the device image python3 is the interpreter that holds torch).
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-$(command -v python3 || command -v python)}
STEPS=${GPU_CHECK_STEPS:-build tests bench}
logs=${OUT:-/tmp}/gpu_check_logs
mkdir -p "$logs"
log() { echo "[gpu_check $(date +%T)] $*"; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }

log "python $PY; steps: $STEPS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if wants build; then
  log "build"
  t0=$SECONDS
  if ! timeout "${BUILD_S:-240}" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
      > "$logs/build.log" 2>&1; then
    tail -40 "$logs/build.log"; log "build FAILED after $((SECONDS - t0)) s"; exit 1
  fi
  log "built in $((SECONDS - t0)) s"
fi
"$PY" -c "import pykernels as pk; print('backends:', pk.available_backends(), 'cuda tensors:', pk.available_backends('cuda'))" || exit 1

tests_rc=0
if wants tests; then
  workers=()
  if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${TEST_WORKERS:-4}"); fi
  log "GPU tests ${workers[*]}"
  timeout "${TESTS_S:-150}" "$PY" -m pytest tests -m gpu -q --maxfail=10 -p no:cacheprovider \
    "${workers[@]}" > "$logs/tests.log" 2>&1
  tests_rc=$?
  tail -60 "$logs/tests.log"
  log "GPU tests rc=$tests_rc (124: time limit)"
fi

if wants bench; then
  log "benchmark sweep (--device cuda)"
  # Every op on every provider over N in {1024..16384} x V in {32000..256000}, bf16 (Sinkhorn
  # ops: G = 1024 rows), headline shapes of every op first, no new case after BENCH_MINUTES.
  # Results are written after every case, straight into $OUT when the device tool runs this.
  results_dir=benchmarks/results
  if [ -n "${OUT:-}" ]; then results_dir="$OUT/results"; fi
  timeout "${BENCH_S:-150}" "$PY" -m benchmarks --device cuda --max-minutes "${BENCH_MINUTES:-2}" \
    --no-progress --results-dir "$results_dir" > "$logs/bench.log" 2>&1
  log "benchmark rc=$? (124: time limit)"
  tail -80 "$logs/bench.log"
fi
log "done"
exit "$tests_rc"
