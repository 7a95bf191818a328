"""Benchmark: train steps/s on CPU with the einsum attention against the blockwise one.

A deep, narrow model where attention dominates: V3's attention shapes (H 128, R 64, U 128,
kv latent C 512, q latent Q 1536) at 4 heads on a width of 64, 16 routed experts top-8 (with
V3's shared expert and MTP module), vocabulary 129,280, `--layers` layers (default 61, V3's),
sequence 1024, batch 2, bf16 compute, fp32 parameters, full remat. The step is the project's
(`train.step.train_step`, AdamW) under one `jax.jit`; tokens are random ids.

For each backend (`ModelConfig.attention_backend`): compile seconds, median step seconds over
`--steps` steps after one warm-up, tokens/s, and the ratio of its steps/s to the baseline's
(einsum, measured in the same run), plus the first step's loss (the two must agree to bf16
rounding). One JSON file with the rows when `--json` is given.

  python experiments/benchmarks/attention_cpu.py                       # 61 layers: ~1 h on 2 cores
  python experiments/benchmarks/attention_cpu.py --layers 8 --steps 2  # a few minutes
  python experiments/benchmarks/attention_cpu.py --core                # the attention alone

`--core` times only the attention core at the same shapes (q, k [2, 1024, 4, 192], v
[2, 1024, 4, 128], bf16), forward + backward under `jax.jit`, best of 3 after a warm-up.

Left out: other backends (splash and cuDNN need their devices), memory (on CPU XLA reports no
peak of temporaries; the planner's TPU compile measures that).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deepseek_jax import parallel
from deepseek_jax.config import get_config  # noqa: E402
from deepseek_jax.train.optimizer import make_optimizer  # noqa: E402
from deepseek_jax.train.step import init_train_state, train_step  # noqa: E402
from experiments.benchmarks.common import Results, median_seconds  # noqa: E402

BASELINE = "einsum"


def model(layers: int, backend: str):
    return get_config("v3-671b", n_layers=layers, n_dense_layers=min(3, layers - 1), d_model=64,
                      d_ff=128, n_heads=4, n_routed_experts=16, n_experts_per_token=8,
                      moe_d_ff=32, n_expert_groups=8, n_limited_groups=4, dtype=jnp.bfloat16,
                      remat_policy="full", attention_backend=backend)


def measure(backend: str, layers: int, steps: int, batch: int, seq: int) -> dict:
    config = model(layers, backend)
    tx = make_optimizer(1e-4)
    state = jax.jit(lambda k: init_train_state(k, config, tx))(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, config.vocab_size)
    step = jax.jit(lambda s, b: train_step(s, b, config=config, tx=tx))
    t0 = time.perf_counter()
    compiled = step.lower(state, {"tokens": tokens}).compile()
    compile_s = time.perf_counter() - t0
    seconds, (_, metrics) = median_seconds(compiled, state, {"tokens": tokens}, warmup=1,
                                           iters=steps)
    return {"backend": backend, "layers": layers, "compile_s": compile_s, "step_s": seconds,
            "tokens_per_s": batch * seq / seconds, "loss": float(metrics["loss"])}


def measure_core(backend: str, batch: int, seq: int) -> dict:
    from deepseek_jax.model.attention import attention
    c = model(1, backend)
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [(batch, seq, c.n_heads, c.qk_head_dim)] * 2 + [(batch, seq, c.n_heads, c.v_head_dim)]
    q, k, v = (jax.random.normal(key, s, c.dtype) for key, s in zip(keys, shapes))
    loss = lambda q, k, v: attention(q, k, v, scale=c.softmax_scale,  # noqa: E731
                                     backend=backend).astype(jnp.float32).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(grad(q, k, v))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(q, k, v))
        times.append(time.perf_counter() - t0)
    return {"backend": backend, "core_s": min(times)}


def main(argv=None):
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per backend")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--backends", default="einsum,blockwise")
    ap.add_argument("--json", default=None)
    ap.add_argument("--core", action="store_true", help="time the attention core alone")
    args = ap.parse_args(argv)
    if args.core:
        rows = [measure_core(b, args.batch, args.seq) for b in args.backends.split(",")]
        print("| backend | attention fwd+bwd s | vs einsum |\n|---|---|---|")
        for r in rows:
            print(f"| {r['backend']} | {r['core_s']:.3f} | {rows[0]['core_s'] / r['core_s']:.2f}× |")
        return
    results = Results(args.json, {"host": "cpu", "layers": args.layers, "seq": args.seq,
                                  "batch": args.batch})
    rows = []
    for backend in args.backends.split(","):
        row = measure(backend, args.layers, args.steps, args.batch, args.seq)
        rows.append(row)
        results.add("rows", row)
        print(f"  {backend}: step {row['step_s']:.2f} s, compile {row['compile_s']:.0f} s",
              flush=True)
    base = next((r for r in rows if r["backend"] == BASELINE), rows[0])
    print(f"\n{args.layers} layers, batch {args.batch} × {args.seq}, bf16, full remat")
    print("| backend | compile s | step s | tokens/s | steps/s vs einsum | first loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['compile_s']:.0f} | {r['step_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {base['step_s'] / r['step_s']:.2f}× | {r['loss']:.4f} |")


if __name__ == "__main__":
    main()
