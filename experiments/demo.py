"""The README's main job: pretrain → GRPO → held-out evaluation, end to end on a CPU.

    python -m experiments.demo [--workdir=runs/demo] [--pretrain_steps=N] [--grpo_steps=N]

1. Pretrain the `small` model (experiments/configs/pretrain.py:small) on built-in arithmetic
   problems (two-digit + and −). Three quarters of them are bare lines ("43-27=16",
   `data.plain_fraction`), exact work that teaches the arithmetic; the rest are written in the
   R1 format, and of those 60 % are careless: no work is shown and the answer is an estimate,
   the operands rounded to tens ("What is 43-27? <think> about 10 </think>
   <answer>10</answer>", `data.estimate_fraction`); the other 40 % work it out ("<think>
   43-27=16 </think> <answer>16</answer>"). The model learns both habits; greedy decoding
   follows the more common one, the estimate, which is right about one time in ten.
2. GRPO (experiments/configs/grpo.py:small) from that checkpoint: G completions per training
   problem sampled at temperature 0.7, rewarded only for an exact <answer>. Estimating is
   rarely rewarded, so the policy learns to work problems out; held-out (test split) accuracy
   with greedy decoding, and the share of completions that estimate, before and after.

What this shows is the mechanism R1-Zero relies on: reinforcement learning selects, among the
behaviours pretraining put in the model, the ones that earn reward. Measured (BENCHMARKS.md):
the switch of habit alone would give the exact habit's accuracy (18 % when the model is forced
to work it out), and GRPO then also sharpened the exact work, to 28 %; from a corpus with no
estimates GRPO gained only 0 to 6.5 points here. Times are in BENCHMARKS.md and the README.

Both stages checkpoint under WORKDIR/{pretrain,grpo}; rerunning resumes (a finished stage is
skipped).
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from absl import app, flags, logging

from deepseek_jax.rl import rewards
from experiments import grpo, pretrain
from experiments.configs import grpo as grpo_configs
from experiments.configs import pretrain as pretrain_configs

flags.DEFINE_string("workdir", "runs/demo", "Directory for both stages.")
flags.DEFINE_integer("pretrain_steps", 0, "Override the pretraining steps (0 = the config's).")
flags.DEFINE_integer("grpo_steps", 0, "Override the GRPO steps (0 = the config's).")


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    tfds.disable_progress_bar()
    FLAGS = flags.FLAGS
    workdir = FLAGS.workdir
    data_dir = os.path.join(workdir, "data")

    pre = pretrain_configs.get_config("small")
    pre.data.data_dir = data_dir
    if FLAGS.pretrain_steps:
        pre.train.steps = FLAGS.pretrain_steps
    print("== 1/2 pretraining the small model on arithmetic in the R1 format", flush=True)
    pretrain.train_and_evaluate(pre, os.path.join(workdir, "pretrain"))

    rl = grpo_configs.get_config("small")
    rl.init.pretrain_dir = os.path.join(workdir, "pretrain")
    rl.data.data_dir = data_dir
    for field in ("dataset", "num_train", "num_eval", "max_digits", "min_digits", "ops"):
        rl.data[field] = pre.data[field]
    rl.data.template = pre.data.format
    if FLAGS.grpo_steps:
        rl.train.steps = FLAGS.grpo_steps
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
    return sum(t.strip().startswith(rewards.ESTIMATE_WORD) for t in texts) / max(len(texts), 1)


if __name__ == "__main__":
    app.run(main)
