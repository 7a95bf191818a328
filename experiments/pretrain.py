"""Pretraining from the command line:

    python -m experiments.pretrain --config=experiments/configs/pretrain.py:NAME --workdir=DIR \
        [--config.FIELD=VALUE ...]

The loop is `deepseek_jax.trainers.pretrain.train_and_evaluate` (its docstring says what a run
writes and how it resumes); this file reads the flags, makes every path absolute once, at
start-up, and calls it. Exit codes: 0 finished, 42 preempted after saving (rerun to resume),
anything else failed (`deepseek_jax.train.run`).
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.train.run import run_command
from deepseek_jax.trainers.pretrain import train_and_evaluate

__all__ = ["train_and_evaluate"]


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    tfds.disable_progress_bar()
    run_command(train_and_evaluate, flags.FLAGS.config, flags.FLAGS.workdir,
                ("data_dir", "tokenizer"))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Run configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and data.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
