"""The task problems a GRPO run trains and evaluates on.

Training problems come from the dataset's "train" split in one seeded permutation, read in
order, `prompts_per_step` per step, each repeated G times in a row (the group). A resumed run
computes the same permutation, so step s always sees the same problems. Held-out problems are
the first `num_eval` of the "test" split.

The training row length is fixed once for the run (one compiled update): the longest prompt
among the first 2000 training problems and the held-out ones, plus 8 tokens of slack for a
longer unseen prompt, plus `max_new_tokens`. A prompt longer than that is an error in
`rollout.training_rows`, naming the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from deepseek_jax.data import r1, run_config
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import rollout

_LENGTH_SAMPLE = 2000      # training problems whose prompts set the row length
_SLACK = 8                 # extra prompt tokens a row allows beyond the longest seen


@dataclasses.dataclass(frozen=True)
class Problems:
    train: Any                      # random-access records of the "train" split
    order: np.ndarray               # [len(train)] the seeded reading order
    held_out: list[dict[str, Any]]  # the evaluation problems
    row_len: int                    # tokens per training row: prompt + completion + padding

    def for_step(self, step: int, per_step: int, group_size: int) -> list[dict[str, Any]]:
        """The step's `per_step` problems, each repeated `group_size` times in a row."""
        idx = self.order[np.arange(step * per_step, (step + 1) * per_step) % len(self.order)]
        return [p for p in _read(self.train, idx) for _ in range(group_size)]


def _read(source, indices) -> list[dict[str, Any]]:
    return [r1.problem_from_record(source[int(i)]) for i in indices]


def load_problems(data, data_dir: str, *, seed: int, num_eval: int, max_new_tokens: int,
                  encoder: Encoder) -> Problems:
    """Problems of the run config's `data` section (dataset prepared under `data_dir` if it is
    not there yet), the order seeded by `seed`, prompts in the `data.template` template."""
    train = run_config.task_source(data, data_dir, "train")
    test = run_config.task_source(data, data_dir, "test")
    held_out = _read(test, range(min(num_eval, len(test))))
    order = np.random.default_rng(seed).permutation(len(train))
    sample = _read(train, order[: min(len(order), _LENGTH_SAMPLE)]) + held_out
    longest = max(len(p) for p in rollout.encode_prompts(sample, data.template, encoder))
    return Problems(train, order, held_out, longest + _SLACK + max_new_tokens)
