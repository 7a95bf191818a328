"""Direct preference optimization from the command line:

    python -m experiments.dpo --config=experiments/configs/dpo.py:NAME --workdir=DIR \
        --config.data.path=PAIRS.jsonl [--config.init.pretrain_dir=RUN] \
        [--config.FIELD=VALUE ...]

The loop is `deepseek_jax.trainers.dpo.train_and_evaluate` (its docstring says what it trains on
and writes); this file reads the flags, makes every path absolute once, at start-up, and calls
it. Exit codes: 0 finished, 42 preempted after saving (rerun to resume), anything else failed
(`deepseek_jax.train.run`).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.train.run import run_command
from deepseek_jax.trainers.dpo import train_and_evaluate

__all__ = ["train_and_evaluate"]


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    run_command(train_and_evaluate, flags.FLAGS.config, flags.FLAGS.workdir,
                ("path", "eval_path", "tokenizer", "chat_template"))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "DPO configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
