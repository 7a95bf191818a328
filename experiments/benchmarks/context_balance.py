"""Benchmark: each context rank's causal attention work, contiguous chunks against the zigzag order.

Under context parallelism (preset fsdp_cp) a step waits for its slowest rank. With contiguous
chunks rank r of n attends (r + 1/2)·T/n keys per query on average; the zigzag order
(`deepseek_jax.model.zigzag`) gives rank r chunks r and 2n − 1 − r. Two tables, both comparing the
two layouts in the same run:

  splash   the TPU kernel's own block tables: `attention_tpu.context_parallel_kernel` built for
           one head at length T over n ranks (no TPU needed: the tables are numpy), the count of
           query × key blocks each rank's shard visits (partial and full), in units of 128 × 128.
  blockwise  the plain-JAX flash kernel on this host: one rank's attention, forward + backward
           under `jax.jit` with the offset traced as inside the shard_map, timed for every rank
           (median of `--iters` after a warm-up). V3's head dims (A = 192, U = 128) at `--heads`
           heads, fp32.

For each: the slowest rank against the mean (1.0 is perfect balance) and the slowest rank of
the contiguous layout against the zigzag's (the step's attention speed-up, other ranks idle).

  python experiments/benchmarks/context_balance.py                     # T 16384, 8 ranks
  python experiments/benchmarks/context_balance.py --seq 4096 --iters 1  # a quick look

Left out: the gathers and the rest of the step (the same in both layouts), and timing splash
itself (it needs a TPU).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import parallel  # noqa: E402
from deepseek_jax.kernels import attention_tpu  # noqa: E402
from deepseek_jax.kernels.attention import blockwise_attention  # noqa: E402
from deepseek_jax.model.zigzag import Zigzag  # noqa: E402
from experiments.benchmarks.common import Results, median_seconds  # noqa: E402

LAYOUTS = ("contiguous", "zigzag")


def splash_blocks(length: int, ranks: int) -> dict[str, list[float]]:
    """Per rank: query × key blocks the splash kernel's tables visit, in 128 × 128 units."""
    out = {}
    for layout in LAYOUTS:
        positions = Zigzag(ranks).positions(length) if layout == "zigzag" else None
        kernel = attention_tpu.context_parallel_kernel(1, length, ranks, True, False, positions)
        info = kernel.fwd_mask_info
        table = np.asarray(info.block_mask)                                  # [1, q blocks, k]
        rows = length // table.shape[1]                                      # block side
        per_rank = (table.reshape(table.shape[0], ranks, -1, table.shape[-1]) > 0)
        out[layout] = [float(x) * (rows / 128) ** 2 for x in per_rank.sum(axis=(0, 2, 3))]
    return out


def blockwise_seconds(length: int, ranks: int, heads: int, iters: int) -> dict[str, list[float]]:
    """Per rank: seconds of its attention (forward + backward) on this host."""
    ks = jax.random.split(jax.random.key(0), 4)
    k = jax.random.normal(ks[0], (1, length, heads, 192), jnp.float32)
    v = jax.random.normal(ks[1], (1, length, heads, 128), jnp.float32)
    seg = jnp.zeros((1, length), jnp.int32)
    local = length // ranks
    q = jax.random.normal(ks[2], (1, local, heads, 192), jnp.float32)

    def loss(q, k, v, starts):            # the rank's query rows, in one or two chunks
        parts = jnp.split(q, len(starts), axis=1)
        outs = [blockwise_attention(p, k, v, scale=192 ** -0.5, segment_ids=seg[:, :p.shape[1]],
                                    kv_segment_ids=seg, q_offset=s)
                for p, s in zip(parts, starts)]
        return sum(jnp.sum(o) for o in outs)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    out = {}
    for layout in LAYOUTS:
        times = []
        for r in range(ranks):
            if layout == "zigzag":
                starts = tuple(Zigzag(ranks).chunk_offsets(jnp.int32(r), length))
            else:
                starts = (jnp.int32(r * local),)
            seconds, _ = median_seconds(grad, q, k, v, starts, warmup=1, iters=iters)
            times.append(seconds)
            print(f"  blockwise {layout} rank {r}: {seconds:.3f} s", flush=True)
        out[layout] = times
    return out


def table(name: str, unit: str, per_rank: dict[str, list[float]], fmt: str) -> str:
    worst = {k: max(v) for k, v in per_rank.items()}
    lines = [f"| {name} | per rank ({unit}) | slowest / mean | slowest: contiguous / this |",
             "|---|---|---|---|"]
    for layout, values in per_rank.items():
        shown = ", ".join(format(x, fmt) for x in values)
        lines.append(f"| {layout} | {shown} | {worst[layout] / np.mean(values):.2f} | "
                     f"{worst['contiguous'] / worst[layout]:.2f}× |")
    return "\n".join(lines)


def main(argv=None):
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = Results(args.json, {"host": jax.devices()[0].platform, **vars(args)})
    blocks = splash_blocks(args.seq, args.ranks)
    results.add("splash", blocks)
    seconds = blockwise_seconds(args.seq, args.ranks, args.heads, args.iters)
    results.add("blockwise", seconds)
    print(f"\nT = {args.seq} over {args.ranks} context ranks, causal")
    print(table("splash tables", "128² blocks", blocks, ".0f"))
    print()
    print(table("blockwise, this host", "s fwd+bwd", seconds, ".3f"))


if __name__ == "__main__":
    main()
