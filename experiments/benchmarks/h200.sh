#!/usr/bin/env bash
# Every GPU path checked and measured in one run of at most 8 minutes on one H200, or one H100
# (the same parts; the train step's batch follows the memory: 16 × 4096 on an H200, 4 on an H100).
#
#   OUT=/some/empty/dir experiments/benchmarks/h200.sh            # on the GPU machine
#   OUT=/tmp/h200_smoke experiments/benchmarks/h200.sh --smoke    # CPU rehearsal, tiny sizes
#   OUT=... experiments/benchmarks/h200.sh --parts=1,4            # only those parts (a rerun)
#
# Run from anywhere (it moves to the repository root). Needs python3 with jax[cuda], flax, optax,
# orbax, chex, numpy, pytest (pytest-timeout used when present) and, for the cuBLAS baseline,
# torch; no ml_collections, grain, TFDS or tensorboardX (nothing here imports them).
#
# Parts, in order, each in its own process under its own time limit (`timeout`), each appending
# its output to $OUT/log.txt and keeping its JSON file under $OUT up to date row by row, so a part
# that runs out of time loses its unfinished rows, not the run:
#
#   part  budget  writes             what
#   env     15 s  (log only)         nvidia-smi, versions, JAX sees the GPU
#   1      105 s  correctness.json   hardware tests in tests/kernels and tests/model (-k hardware):
#                                    fp8 GEMM fwd/dgrad/wgrad, grouped GEMMs with gradients, fp8
#                                    grouped GEMM; fails loudly if none ran
#   2       75 s  fp8_gemm.json      fp8 GEMM TFLOP/s at DeepGEMM's V3 shapes and 8192³: ours,
#                                    torch._scaled_mm blockwise (cuBLAS), XLA bf16, XLA reference
#   3       80 s  moe.json           grouped GEMM (bf16, fp8) vs dense; MoE layer fwd+bwd (bf16,
#                                    fp8) vs dense SwiGLU
#   4    60+65 s train.json          V2-Lite-width train step, bf16 then fp8: tokens/s, MFU
#                                    (batch by device memory: 4 × 4096 on an H100, 16 on an H200)
#                 trace.tar.gz       (jax.profiler trace of one bf16 step, if under 16 MiB)
#   5       50 s  decode.json        latent vs expanded cache decode, MTP speculative round
#
# Budgets add up to 450 s; the whole script stops starting parts at H200_TOTAL_S (465 s) and
# shortens the last one to fit, so it ends within 8 minutes, JAX start-ups and compiles included.
# Correctness is never cut; later parts are cut from the end. At most 7 files land in $OUT.
# The closing summary (h200_summary.py) prints every goal as met / MISSED / not measured.
set -uo pipefail

SMOKE=0
PARTS="1,2,3,4,5"
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    --parts=*) PARTS="${arg#--parts=}" ;;
    *) echo "unknown argument: $arg (--smoke: the CPU rehearsal; --parts=1,4: only those parts)"
       exit 2 ;;
  esac
done
[[ "${H200_SMOKE:-0}" == 1 ]] && SMOKE=1

OUT="${OUT:-benchmark_results}"          # relative to where the script is called from
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/log.txt"
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if (( SMOKE )); then
  # CPU rehearsal: tiny shapes through the same code; XLA's optimizations off (compile time).
  export JAX_PLATFORMS=cpu JAX_DISABLE_MOST_OPTIMIZATIONS=true
  S=--smoke
  TOTAL="${H200_TOTAL_S:-1500}"
  B_ENV=60 B_CORRECT=240 B_GEMM=240 B_MOE=240 B_TRAIN_BF16=240 B_TRAIN_FP8=300 B_DECODE=300
else
  export JAX_PLATFORMS=cuda
  S=
  TOTAL="${H200_TOTAL_S:-465}"
  B_ENV=15 B_CORRECT=105 B_GEMM=75 B_MOE=80 B_TRAIN_BF16=60 B_TRAIN_FP8=65 B_DECODE=50
fi

log() { echo "$*" | tee -a "$LOG"; }

# part NAME BUDGET COMMAND...: runs COMMAND under min(BUDGET, time left) seconds, output to the
# log and to stdout; records "== part NAME: rc=RC in Ns" (rc 124 = time limit).
part() {
  local name=$1 budget=$2; shift 2
  if [[ "$name" != env && ",$PARTS," != *",${name%%-*},"* ]]; then
    log "== part $name: skipped (not in --parts=$PARTS)"
    return 0
  fi
  local left=$((TOTAL - SECONDS))
  local limit=$(( budget < left ? budget : left ))
  if (( limit < 10 )); then
    log "== part $name: skipped (${left} s left of ${TOTAL} s)"
    return 0
  fi
  log ""
  log "== part $name: limit ${limit} s, started at ${SECONDS} s ($(date -u +%H:%M:%S) UTC)"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local note=""
  (( rc == 124 || rc == 137 )) && note=" (TIME LIMIT)"
  log "== part $name: rc=$rc in $((SECONDS - t0)) s$note"
  return 0
}

if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT with uncommitted changes"
else
  COMMIT="unknown (no git metadata)"
fi
log "h200.sh $( ((SMOKE)) && echo --smoke) at $(date -u '+%Y-%m-%d %H:%M:%S') UTC; OUT=$OUT;" \
    "commit $COMMIT"

part env "$B_ENV" bash -c '
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  fi
  '"$PY"' -c "
import sys, jax, jaxlib
print(\"python\", sys.version.split()[0], \"jax\", jax.__version__, \"jaxlib\", jaxlib.__version__)
print(\"devices:\", jax.devices(), \"backend:\", jax.default_backend())
for m in (\"flax\", \"optax\", \"orbax.checkpoint\", \"chex\", \"numpy\", \"pytest\", \"torch\", \"triton\"):
    try:
        mod = __import__(m, fromlist=[\"_\"]); print(\" \", m, getattr(mod, \"__version__\", \"?\"))
    except Exception as e:
        print(\" \", m, \"MISSING:\", type(e).__name__)
want = \"'"${JAX_PLATFORMS}"'\"
if want == \"cuda\" and jax.default_backend() != \"gpu\":
    sys.exit(\"JAX does not see a GPU: every GPU part below would fail\")
"'

# Part 1: the hardware tests. Selected by name (-k hardware) across tests/kernels and tests/model;
# JAX_PLATFORMS=cuda overrides the CPU default of tests/conftest.py. The plugin writes each
# test's outcome as it finishes; the check after it prints how many ran and fails if none did.
TIMEOUT_ARGS=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout=75)
export PYTEST_RESULTS_JSON="$OUT/correctness.json"
part 1-correctness "$B_CORRECT" "$PY" -m pytest -q -rs --durations=10 -p no:cacheprovider \
  -p experiments.benchmarks.pytest_results "${TIMEOUT_ARGS[@]}" -k hardware tests/kernels tests/model
unset PYTEST_RESULTS_JSON
if [[ ",$PARTS," != *",1,"* ]]; then
  :
elif [[ -f "$OUT/correctness.json" ]]; then
  if (( SMOKE )); then
    "$PY" experiments/benchmarks/pytest_results.py "$OUT/correctness.json" 2>&1 | tee -a "$LOG"
  else
    "$PY" experiments/benchmarks/pytest_results.py "$OUT/correctness.json" --require-ran 2>&1 \
      | tee -a "$LOG"
    (( PIPESTATUS[0] )) && log "!!!! CORRECTNESS FAILED: see above; the measurements below still run"
  fi
else
  log "!!!! CORRECTNESS: no results file (pytest did not start?)"
fi

part 2-fp8-gemm "$B_GEMM" "$PY" experiments/benchmarks/fp8_gemm.py $S --json "$OUT/fp8_gemm.json"

part 3-moe "$B_MOE" "$PY" experiments/benchmarks/moe.py $S --json "$OUT/moe.json"

[[ ",$PARTS," == *",4,"* ]] && rm -f "$OUT/train.json"   # its two processes add to one file
part 4-train-bf16 "$B_TRAIN_BF16" "$PY" experiments/benchmarks/train_step.py $S --variant bf16 \
  --json "$OUT/train.json" --trace "$OUT/trace.tar.gz"
part 4-train-fp8 "$B_TRAIN_FP8" "$PY" experiments/benchmarks/train_step.py $S --variant fp8 \
  --json "$OUT/train.json"

part 5-decode "$B_DECODE" "$PY" experiments/benchmarks/decode.py $S --train-steps 0 \
  --json "$OUT/decode.json"

# Leftovers of a part killed mid-write (*.tmp) would count against the files that come back.
rm -f "$OUT"/*.tmp
"$PY" experiments/benchmarks/h200_summary.py "$OUT" 2>&1 | tee -a "$LOG"
log "h200.sh done in ${SECONDS} s"
