"""The README's main job: pretrain → GRPO → held-out evaluation, end to end on a CPU.

    python -m experiments.demo [--workdir=runs/demo] [--pretrain.FIELD=VALUE] [--grpo.FIELD=VALUE]

`--pretrain.*` and `--grpo.*` override fields of the two run configs below, e.g.
`--pretrain.train.steps=4 --grpo.train.steps=2` for a quick check that everything runs
(`make demo DEMO_ARGS="..."` passes them on).

1. Pretrain the `small` model (deepseek_jax/configs/pretrain.py:small) on built-in arithmetic
   problems (two-digit + and −). Three quarters of them are bare lines ("43-27=16",
   `data.plain_fraction`), exact work that teaches the arithmetic; the rest are written in the
   R1 format, and of those 60 % are careless: no work is shown and the answer is an estimate,
   the operands rounded to tens ("What is 43-27? <think> about 10 </think>
   <answer>10</answer>", `data.estimate_fraction`); the other 40 % work it out ("<think>
   43-27=16 </think> <answer>16</answer>"). The model learns both habits; greedy decoding
   follows the more common one, the estimate, which is right about one time in ten.
2. GRPO (deepseek_jax/configs/grpo.py:small) from that checkpoint: G completions per training
   problem sampled at temperature 0.7, rewarded only for an exact <answer>. Estimating is
   rarely rewarded, so the policy learns to work problems out; held-out (test split) accuracy
   with greedy decoding, and the share of completions that estimate, before and after.

What this shows is the mechanism R1-Zero relies on: reinforcement learning selects, among the
behaviours pretraining put in the model, the ones that earn reward. Measured (BENCHMARKS.md):
made to work problems out (`experiments/benchmarks/held_out_accuracy.py --work_it_out`), the
pretrained model is right 20–97 % of the time depending on the seed and the host, while greedy
decoding, mostly estimating, is right 9–58 %; GRPO's 60 steps move greedy accuracy to about the
first figure. Times are in BENCHMARKS.md and the README.

Both stages checkpoint under WORKDIR/{pretrain,grpo}; rerunning resumes (a finished stage is
skipped). WORKDIR is made absolute at start-up and checked before the first step
(`deepseek_jax.train.workdir`).
"""

from __future__ import annotations

import os
import sys

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.configs import grpo as grpo_configs
from deepseek_jax.configs import pretrain as pretrain_configs
from deepseek_jax.data import r1
from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.run import EXIT_PREEMPTED, Preempted
from deepseek_jax.trainers import grpo, pretrain

flags.DEFINE_string("workdir", "runs/demo", "Directory for both stages.")
config_flags.DEFINE_config_dict("pretrain", pretrain_configs.get_config("small"),
                                "Stage 1's run config (override fields: --pretrain.FIELD=VALUE).")
config_flags.DEFINE_config_dict("grpo", grpo_configs.get_config("small"),
                                "Stage 2's run config (override fields: --grpo.FIELD=VALUE).")


def main(argv):
    """Both stages; exit code 42 when either is preempted after saving (rerun to resume)."""
    try:
        _stages(argv)
    except Preempted as e:
        print(e, flush=True)
        sys.exit(EXIT_PREEMPTED)


def _stages(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    tfds.disable_progress_bar()
    FLAGS = flags.FLAGS
    workdir = run_dir.prepare(FLAGS.workdir)        # absolute, writable, can hold checkpoints
    data_dir = os.path.join(workdir, "data")

    pre = FLAGS.pretrain
    pre.data.data_dir = data_dir
    print("== 1/2 pretraining the small model on arithmetic in the R1 format", flush=True)
    pretrain.train_and_evaluate(pre, os.path.join(workdir, "pretrain"))

    rl = FLAGS.grpo
    rl.init.pretrain_dir = os.path.join(workdir, "pretrain")
    rl.data.data_dir = data_dir
    for field in ("dataset", "num_train", "num_eval", "max_digits", "min_digits", "ops"):
        rl.data[field] = pre.data[field]
    rl.data.template = pre.data.template
    print("== 2/2 GRPO with verifiable rewards", flush=True)
    result = grpo.train_and_evaluate(rl, os.path.join(workdir, "grpo"))
    before, after = result["before"], result["after"]
    if before and after:
        print(f"\nheld-out accuracy ({rl.train.eval_problems} test problems, greedy): "
              f"{before['accuracy']:.1%} before GRPO → {after['accuracy']:.1%} after "
              f"({100 * (after['accuracy'] - before['accuracy']):+.1f} points)")
        print(f"completions that estimate instead of working it out: "
              f"{estimate_share(before):.0%} before → {estimate_share(after):.0%} after")
        for text in after.get("samples", [])[:3]:
            print(f"    {text!r}")


def estimate_share(result: dict) -> float:
    """Share of held-out completions whose think block is an estimate ("about 70")."""
    texts = result.get("completions") or []
    return sum(t.strip().startswith(r1.ESTIMATE_WORD) for t in texts) / max(len(texts), 1)


if __name__ == "__main__":
    app.run(main)
