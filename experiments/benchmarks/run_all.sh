#!/usr/bin/env bash
# Every GPU benchmark in one go, for a lent H200 (about 8–11 minutes in all). Run from the
# repository root on a machine with jax[cuda], flax, optax, orbax and chex installed (no
# ml_collections, grain or TFDS needed). Each part prints its own table; the raw numbers go to
# $OUT (default ./benchmark_results) as JSON. Copy the tables into BENCHMARKS.md with the date.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmark_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"

echo "== 1. fp8 kernels: compiled kernel == reference (forward, dgrad, wgrad)"
JAX_PLATFORMS=cuda timeout 120 python -m pytest -q tests/kernels -k hardware -p no:cacheprovider || echo "(hardware tests failed)"
echo "== 2. fp8 block-scaled GEMM vs cuBLAS blockwise (torch._scaled_mm)"
timeout 300 python experiments/benchmarks/fp8_gemm.py --json "$OUT/fp8_gemm.json" || echo "(fp8_gemm failed)"
echo "== 3. decode: latent (MLA) cache vs expanded cache, MTP speculative speedup"
timeout 240 python experiments/benchmarks/decode.py --json "$OUT/decode.json" || echo "(decode failed)"
echo "== 4. fp8 vs bf16 training loss parity (small model)"
timeout 300 python experiments/benchmarks/fp8_training.py --steps 150 --json "$OUT/fp8_training.json" || echo "(fp8_training failed)"
echo "== 5. MoE: grouped GEMM backends vs dense GEMM, MoE layer vs active-FLOP dense SwiGLU"
timeout 420 python experiments/benchmarks/moe.py --json "$OUT/moe.json" || echo "(moe failed)"
