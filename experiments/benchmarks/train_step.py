"""Benchmark: one training step at DeepSeek-V2-Lite widths on one GPU — tokens/s and MFU, bf16 and fp8.

The model is `get_config("v2-lite")` (D 2048, 16 heads, C 512, 64 routed experts of width 1408,
top-6, 2 shared experts, vocabulary 102,400) with only `--layers` layers (default 4: one dense,
three MoE; 2.25B parameters), so that fp32 parameters and AdamW moments (27 GB), their gradients
and the activations of a batch of 4096-token sequences fit one GPU without rematerialization.
Attention is cuDNN's fused kernel (the model's "auto" on a GPU), so no [B, N, T, S] scores are
kept. The batch (`--batch`, default `default_batch`: the largest of 16, 8, 4, 2, 1 whose step
needs at most 90 % of the allocator's memory) follows what the step was compiled to need for an
H100 and an H200 on a CPU host (`gpu_compile.py`; BENCHMARKS.md, "GPU programs compiled without
a GPU"): 4 × 4096 on an H100, 16 × 4096 on an H200.
The step is the project's own
(`deepseek_jax.train.step.train_step`: forward with MTP/balance bookkeeping, LM loss, backward,
clipped AdamW, routing-bias update) under one `jax.jit` with the state donated; the tokens are
random ids (no data pipeline: the step's cost does not depend on their values).

  variant bf16   `dtype=bfloat16` activations and GEMMs, fp32 parameters and optimizer state
  variant fp8    the same plus `fp8=True` (DeepSeek's block-scaled e4m3 projections)

Per variant one JSON row: compile seconds, median step seconds over `--steps` steps after one
warm-up (host time around `block_until_ready`), tokens/s, model FLOP/s from
`deepseek_jax.train.flops.flops_per_token` (6·active matmul parameters + attention; no remat
FLOPs), MFU against the chip's dense bf16 peak (989 TFLOP/s on an H200; the fp8 row uses the same
denominator, so its MFU says how much of the bf16 peak its useful work reaches), peak device
memory, and the losses of the timed steps (finite, or the step is broken). A batch that does
not fit is retried once at half the rows. `--trace FILE` then records one more step with
`jax.profiler` and stores the trace directory as FILE (a .tar.gz), when it is under 16 MiB.

  python experiments/benchmarks/train_step.py --variant bf16 --json train.json
  python experiments/benchmarks/train_step.py --variant fp8 --json train.json   # adds its row
  python experiments/benchmarks/train_step.py --smoke --variant bf16            # CPU, tiny

In experiments/benchmarks/h200.sh this is part 4, one process per variant with its own time limit
(the fp8 step may compile slowly or take a slow path; it must not cost the bf16 row).

No ml_collections / grain / tfds imports: the GPU host does not have them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from anywhere
# JAX's allocator takes 75 % of the device by default; the state and activations need more.
MEM_FRACTION = "0.92"
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import parallel  # noqa: E402
from deepseek_jax.config import get_config  # noqa: E402
from deepseek_jax.tools import buffers  # noqa: E402
from deepseek_jax.train import flops as flops_mod  # noqa: E402
from deepseek_jax.train.optimizer import make_optimizer  # noqa: E402
from deepseek_jax.train.step import init_train_state, train_step  # noqa: E402
from experiments.benchmarks.common import (Results, check_imports, device_memory_bytes,  # noqa: E402
                                           device_meta, is_oom)

MAX_TRACE_BYTES = 16 * 2**20
WARMUP = 1          # compiled ahead of time: one call settles allocations
LAYERS, SEQ = 4, 4096
# What one bf16 step needs, from XLA's memory analysis of the step compiled for an H100 and an
# H200 (gpu_compile.py): arguments, temporaries and outputs not aliased to the donated state
# come to 57.2 GB at batch 4 and 76.2 GB at batch 8, about STATE_GB + PER_SEQUENCE_GB × batch
# (the fp8 step needs less).
STATE_GB, PER_SEQUENCE_GB = 38.2, 4.75


def default_batch(allocator_bytes: int | None) -> int:
    """The largest of 16, 8, 4, 2, 1 whose step needs ≤ 90 % of `allocator_bytes`, the memory
    JAX's allocator holds (4 where it is unknown). The 10 % is headroom for what the two
    compiles' straight line does not model (allocator fragmentation, cuDNN and cuBLAS
    workspaces)."""
    if not allocator_bytes:
        return 4
    for batch in (16, 8, 4, 2):
        if (STATE_GB + PER_SEQUENCE_GB * batch) * 1e9 <= 0.9 * allocator_bytes:
            return batch
    return 1


def model_config(variant: str, layers: int, seq: int, smoke: bool, remat: str = "none"):
    fp8 = variant == "fp8"
    if smoke:
        return get_config("tiny", n_layers=2, n_dense_layers=1, dtype=jnp.bfloat16,
                          max_seq_len=max(seq, 64), fp8=fp8, remat_policy=remat)
    return get_config("v2-lite", n_layers=layers, n_dense_layers=1, dtype=jnp.bfloat16,
                      param_dtype=jnp.float32, max_seq_len=max(seq, 4096), fp8=fp8,
                      remat_policy=remat)


def train_program(config):
    """(init(key) → state, step(state, batch) → (state, metrics)), both jitted, the state donated
    (also compiled without a GPU by `gpu_compile.py`)."""
    tx = make_optimizer(1e-4)
    init = jax.jit(lambda k: init_train_state(k, config, tx))
    step = jax.jit(lambda s, b: train_step(s, b, config=config, tx=tx), donate_argnums=0)
    return init, step


def run(variant: str, layers: int, batch: int, seq: int, steps: int, smoke: bool,
        remat: str = "none"):
    """(row, a function that traces one more step into a file)."""
    config = model_config(variant, layers, seq, smoke, remat)
    init, step = train_program(config)
    state = init(jax.random.key(0))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size,
                                jnp.int32)
    data = {"tokens": tokens}

    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    print(f"  compiled in {compile_s:.1f} s", flush=True)    # before the steps: a part cut short
    # The compiler's two memory counts, to set beside the device's measured peak: the step's
    # allocations (what the planner reports for GPUs) and XLA's live-range peak.
    m = compiled.memory_analysis()

    losses, times = [], []
    for i in range(WARMUP + steps):                  # warm-ups, then timed steps
        t0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready((state, metrics))
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
    step_s = float(np.median(times))
    tokens_per_step = batch * seq
    fpt = flops_mod.flops_per_token(config, seq)
    peak = flops_mod.peak_flops_per_device()
    row = {
        "variant": variant, "layers": config.n_layers, "dense_layers": config.n_dense_layers,
        "batch": batch, "seq": seq, "params": n_params, "compile_s": compile_s,
        "step_s": step_s, "steps_timed": steps, "tokens_per_s": tokens_per_step / step_s,
        "model_tflops_per_s": fpt * tokens_per_step / step_s / 1e12,
        "flops_per_token": fpt, "mfu_vs_bf16_peak": (fpt * tokens_per_step / step_s / peak
                                                    if peak else None),
        "losses": losses, "finite": bool(np.all(np.isfinite(losses))),
        "moe_backend": config.moe_backend, "fp8": config.fp8, "remat": config.remat_policy,
        "compiled_need_gb": buffers.allocated_bytes(m) / 1e9,
        "compiler_peak_gb": (getattr(m, "peak_memory_in_bytes", 0) or 0) / 1e9 or None,
    }
    try:    # what "auto" became on this device (informative only)
        from deepseek_jax.kernels import fp8 as fp8_kernels, grouped_gemm
        row["moe_backend_resolved"] = grouped_gemm.default_backend(fp8=config.fp8)
        row["fp8_backend_resolved"] = fp8_kernels._resolve_backend("auto")
    except Exception:  # noqa: BLE001
        pass
    try:
        stats = jax.devices()[0].memory_stats() or {}
        row["peak_memory_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9 or None
    except Exception:  # noqa: BLE001
        pass
    return row, lambda out_file: record_trace(compiled, state, data, out_file)


def record_trace(compiled, state, data, out_file: str) -> str:
    """One more step under jax.profiler; the trace directory packed as out_file if small enough."""
    tmp = tempfile.mkdtemp(prefix="train_trace_")
    try:
        jax.profiler.start_trace(tmp)
        try:
            state, metrics = compiled(state, data)
            jax.block_until_ready((state, metrics))
        finally:
            jax.profiler.stop_trace()
        staged = pathlib.Path(tmp + ".tar.gz")
        with tarfile.open(staged, "w:gz") as tar:
            tar.add(tmp, arcname="trace")
        size = staged.stat().st_size
        if size > MAX_TRACE_BYTES:
            staged.unlink()
            return f"not kept: {size / 2**20:.1f} MiB > 16 MiB"
        shutil.move(str(staged), out_file)
        return f"{out_file} ({size / 2**20:.1f} MiB)"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--layers", type=int, default=LAYERS, help="layers, the first dense")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per step (default: default_batch of the device's memory)")
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    p.add_argument("--remat", default="none",
                   help="model.remat_policy (MFU still counts model FLOPs only)")
    p.add_argument("--smoke", action="store_true", help="tiny model and batch (CPU rehearsal)")
    p.add_argument("--json", default="", help="add the row to this file (kept up to date)")
    p.add_argument("--trace", default="", help="also trace one step into this .tar.gz")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.steps = 2, 32, 2
    elif args.batch is None:
        args.batch = default_batch(device_memory_bytes())

    results = Results(args.json or None, device_meta(), merge=True)
    print(f"train step, {args.variant}: {'tiny (smoke)' if args.smoke else 'v2-lite'} widths, "
          f"{2 if args.smoke else args.layers} layers, batch {args.batch} x {args.seq} on "
          f"{jax.devices()[0].device_kind}", flush=True)
    batch = args.batch
    while True:
        try:
            row, trace = run(args.variant, args.layers, batch, args.seq, args.steps, args.smoke,
                             args.remat)
            break
        except Exception as e:  # noqa: BLE001 - one retry at half the batch, else report
            if is_oom(e) and batch > 1:
                results.error(f"{args.variant} batch {batch}", e)
                batch //= 2
                print(f"  out of memory: retrying at batch {batch}", flush=True)
                continue
            results.error(args.variant, e)
            results.add("rows", {"variant": args.variant, "batch": batch, "seq": args.seq,
                                 "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                 if str(e) else type(e).__name__})
            check_imports()
            sys.exit(1)
    results.add("rows", row)                       # saved before anything else can fail
    mfu = row["mfu_vs_bf16_peak"]
    print(f"  compile {row['compile_s']:.1f} s, step {row['step_s'] * 1e3:.1f} ms, "
          f"{row['tokens_per_s']:,.0f} tokens/s, {row['model_tflops_per_s']:.1f} TFLOP/s, "
          f"MFU {'-' if mfu is None else f'{100 * mfu:.1f} %'}, losses "
          f"{[round(x, 3) for x in row['losses']]}, peak memory {row.get('peak_memory_gb')} GB "
          f"(compiled: {row['compiled_need_gb']:.2f} allocated, "
          f"{row['compiler_peak_gb'] or 0:.2f} peak)", flush=True)
    if args.trace:
        try:
            row["trace"] = trace(args.trace)
            results.save()
            print(f"  trace: {row['trace']}", flush=True)
        except Exception as e:  # noqa: BLE001 - the trace is optional
            results.error("trace", e)
    rows = [r for r in results.data.get("rows", []) if "tokens_per_s" in r]
    by = {r["variant"]: r for r in rows}
    if "bf16" in by and "fp8" in by:
        ratio = by["fp8"]["tokens_per_s"] / by["bf16"]["tokens_per_s"]
        results.set("fp8_over_bf16_tokens_per_s", ratio)
        print(f"  fp8 / bf16 tokens/s: {ratio:.2f} (goal ≥ 1.3)", flush=True)
    check_imports()
    if not row["finite"]:
        print("  NON-FINITE LOSS", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
