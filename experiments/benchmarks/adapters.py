"""Benchmark: the train step with LoRA adapters against full fine-tuning, on this host.

For one model config, the same batch and the pretraining train step (`train.step.train_step`,
AdamW as the fine-tuning configs build it), one row per variant: full fine-tuning, then
adapters of rank `--rank` on attention and the FFNs, then on the routed experts too. Columns:
trained parameters, AdamW state bytes, and the step's median seconds after a warm-up, with its
ratio to full fine-tuning measured in the same run.

  python experiments/benchmarks/adapters.py                       # small, 8 × 128, rank 16
  python experiments/benchmarks/adapters.py --iters 2 --model tiny  # a quick look

Left out: sharding (the planner compiles the step for a pod: `python -m deepseek_jax.tools.plan
--set=adapter_rank=16`), and the rollouts of GRPO, which sample the merged plain model.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from anywhere

import jax  # noqa: E402

from deepseek_jax import parallel  # noqa: E402
from deepseek_jax.config import get_config  # noqa: E402
from deepseek_jax.model import adapters  # noqa: E402
from deepseek_jax.train.optimizer import make_optimizer  # noqa: E402
from deepseek_jax.train.step import init_train_state, train_step  # noqa: E402
from experiments.benchmarks.common import Results, median_seconds  # noqa: E402

VARIANTS = (("full fine-tuning", ()), ("adapters: attention, mlp", ("attention", "mlp")),
            ("adapters: attention, mlp, experts", ("attention", "mlp", "experts")))


def measure(config, batch: dict, iters: int) -> dict:
    """Trained parameters, AdamW bytes and median step seconds of `config`'s train step."""
    tx = make_optimizer(1e-4)
    state = init_train_state(jax.random.key(0), config, tx, batch=1,
                             length=batch["tokens"].shape[1])
    trained, _ = adapters.split(state.params, config)
    step = jax.jit(lambda s, b: train_step(s, b, config=config, tx=tx))
    seconds, _ = median_seconds(step, state, batch, warmup=1, iters=iters)
    return {"trained": sum(x.size for x in jax.tree.leaves(trained)),
            "optimizer_bytes": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
            "seconds": seconds}


def main(argv=None):
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = Results(args.json, {"host": jax.devices()[0].platform, **vars(args)})
    base = get_config(args.model)
    batch = {"tokens": jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0,
                                          base.vocab_size)}
    rows = {}
    for name, targets in VARIANTS:
        if targets and "experts" in targets and not base.n_routed_experts:
            continue
        config = base.replace(adapter_rank=args.rank, adapter_alpha=2.0 * args.rank,
                              adapter_targets=targets) if targets else base
        rows[name] = measure(config, batch, args.iters)
        results.add(name, rows[name])
        print(f"  {name}: {rows[name]['seconds']:.3f} s", flush=True)
    full = rows["full fine-tuning"]
    print(f"\n{args.model}, batch {args.batch} × {args.seq}, rank {args.rank}, "
          f"{jax.devices()[0].platform}")
    print("| variant | trained parameters | AdamW state | step | step / full |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['trained']:,} | {r['optimizer_bytes'] / 2 ** 20:.1f} MiB | "
              f"{r['seconds']:.3f} s | {r['seconds'] / full['seconds']:.2f} |")


if __name__ == "__main__":
    main()
