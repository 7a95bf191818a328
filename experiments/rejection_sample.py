"""Rejection sampling from the command line (R1's stage 3, between GRPO and SFT):

    python -m experiments.rejection_sample --run=RUN --k=K --out=OUT.jsonl \
        [--problems=PROBLEMS.jsonl | --config=experiments/configs/grpo.py:NAME
         --config.data.data_dir=DATA --split=train --num_problems=N] \
        [--keep=all|unique|shortest|pairs] [--batch_prompts=P] [--seed=S]

Samples K completions per problem from RUN's latest checkpoint, keeps those the verifiable
rewards accept and appends them to OUT as SFT-ready JSONL ({"prompt", "completion", ...}, read by
`experiments.sft`); with --keep=pairs it writes DPO pairs instead, an accepted and a rejected
completion of the same problem ({"prompt", "chosen", "rejected", ...}, read by `experiments.dpo`). The GRPO run config (`--config`, default `grpo.py:small`) gives the task,
the prompt template, the sampling temperature, max_new_tokens, the tokenizer and the mesh; the
task's records are read from `--config.data.data_dir`, by default RUN/data, where a GRPO run
keeps them unless told otherwise. `--problems` takes task problems (arithmetic, countdown) or
math problems in GSM8K or MATH form (answers checked by math-verify, as `experiments.evaluate`
checks them). Rerunning the same command resumes: finished problems are skipped
(`deepseek_jax.rl.rejection`, whose docstring gives the details).
"""

from __future__ import annotations

import json

import tensorflow_datasets as tfds
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.configs import grpo as grpo_configs
from deepseek_jax.rl import rejection
from deepseek_jax.train import workdir as run_dir

flags.DEFINE_string("run", None, "Run directory whose latest checkpoint samples.")
flags.DEFINE_string("out", None, "Output JSONL (appended to; rerun to resume).")
flags.DEFINE_integer("k", 8, "Completions sampled per problem.")
flags.DEFINE_string("problems", "", "JSONL of problems; empty: the run config's task.")
flags.DEFINE_string("split", "train", "The task's split when --problems is empty.")
flags.DEFINE_integer("num_problems", 0, "Use the first N problems; 0 = all.")
flags.DEFINE_integer("batch_prompts", 16, "Problems per sampling batch (x K rows).")
flags.DEFINE_enum("keep", "all", list(rejection.KEEP), "Which accepted completions to keep (pairs: DPO pairs).")
flags.DEFINE_bool("require_format", True, "Accept only well-formed think/answer blocks.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    tfds.disable_progress_bar()
    FLAGS = flags.FLAGS
    config = FLAGS.config or grpo_configs.get_config("small")
    config.data.data_dir = run_dir.resolve(config.data.data_dir)
    config.data.tokenizer = run_dir.resolve(config.data.tokenizer)
    result = rejection.from_run(
        run_dir.resolve(FLAGS.run, remote=True), config, out=run_dir.resolve(FLAGS.out), k=FLAGS.k,
        problems_file=run_dir.resolve(FLAGS.problems), split=FLAGS.split,
        num_problems=FLAGS.num_problems, batch_prompts=FLAGS.batch_prompts, keep=FLAGS.keep,
        require_format=FLAGS.require_format, seed=FLAGS.seed)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "GRPO run config describing the task.",
                                    lock_config=True)
    flags.mark_flags_as_required(["run", "out"])
    app.run(main)
