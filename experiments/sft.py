"""Supervised fine-tuning from the command line:

    python -m experiments.sft --config=experiments/configs/sft.py:NAME --workdir=DIR \
        --config.data.path=CONVERSATIONS.jsonl [--config.init.pretrain_dir=RUN] \
        [--config.FIELD=VALUE ...]

The loop is `deepseek_jax.trainers.sft.train_and_evaluate` (its docstring says what it trains on
and writes); this file reads the flags, makes every path absolute once, at start-up, and calls
it. Exit codes: 0 finished, 42 preempted after saving (rerun to resume), anything else failed
(`deepseek_jax.train.run`).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.run import EXIT_PREEMPTED, Preempted
from deepseek_jax.trainers.sft import train_and_evaluate

__all__ = ["train_and_evaluate"]


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    config = flags.FLAGS.config
    config.init.pretrain_dir = run_dir.resolve(config.init.pretrain_dir, remote=True)
    for field in ("path", "eval_path", "tokenizer", "chat_template"):
        config.data[field] = run_dir.resolve(config.data[field])
    try:
        train_and_evaluate(config, run_dir.resolve(flags.FLAGS.workdir, remote=True))
    except Preempted as e:           # saved; launchers restart on this code (train/run.py)
        print(e, flush=True)
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "SFT configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
