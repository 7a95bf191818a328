"""Benchmark: the demo's pretraining step on CPU per MoE path — seconds per step and the ratio to
the dense dispatch, measured in one process.

The step is the `small` run config's (deepseek_jax/configs/pretrain.py: 8 × 128 tokens, 16 routed
experts top-4, one MTP module, fp32), compiled once per variant:

  dense        every expert on every token (`moe_impl="dense"`; E/X = 4× the routed work)
  tiled        sorted pairs, the "tiled" grouped GEMM (what "auto" picks on CPU)
  ragged_dot   sorted pairs, `jax.lax.ragged_dot` (XLA's CPU backend runs it densely)

Steps are timed round-robin (one step of each variant in turn, `--rounds` times) so that a
machine whose load changes during the run slows every variant alike; the table gives each
variant's median and its ratio to dense.

  python experiments/benchmarks/demo_step.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax

from deepseek_jax import parallel
from deepseek_jax.configs.pretrain import get_config, to_model_config
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.schedules import from_run_config
from deepseek_jax.train.step import init_train_state, train_step

VARIANTS = {"dense": dict(moe_impl="dense"),
            "tiled": dict(moe_impl="ragged", moe_backend="tiled"),
            "ragged_dot": dict(moe_impl="ragged", moe_backend="ragged_dot")}


def main() -> None:
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per variant")
    args = ap.parse_args()
    run = get_config("small")
    settings = from_run_config(run).train
    batch = {"tokens": jax.random.randint(jax.random.key(1),
                                          (run.data.global_batch, run.data.seq_len), 0, 259)}
    steps, states = {}, {}
    for name, fields in VARIANTS.items():
        config = to_model_config(run.model).replace(**fields)
        tx = make_optimizer(1e-3)
        steps[name] = jax.jit(functools.partial(train_step, config=config, tx=tx,
                                                settings=settings))
        states[name], m = steps[name](init_train_state(jax.random.key(0), config, tx), batch)
        jax.block_until_ready(m)                                   # compile + warm-up
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            start = time.perf_counter()
            states[name], m = steps[name](states[name], batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["dense"])
    tokens = run.data.global_batch * run.data.seq_len
    print(f"{'variant':<12} {'s/step':>8} {'tokens/s':>9} {'× dense':>8}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:<12} {t:8.3f} {tokens / t:9.0f} {base / t:8.2f}")


if __name__ == "__main__":
    main()
