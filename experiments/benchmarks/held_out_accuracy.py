"""Benchmark: held-out greedy accuracy of several runs on one task, side by side (R1's stage 3:
the GRPO model against the model SFT'd on its rejection samples).

Each run's latest checkpoint answers the same problems with `deepseek_jax.rl.evaluate.evaluate`
(greedy, the task's template): the first `--num_problems` of the task's test split, the
problems a GRPO run evaluates on (`rl.problems.load_problems`). Runs after the first also report
how many problems they solve that the first does not ("gained") and the reverse ("lost"). The task comes from a GRPO run
config (default `grpo.py:small`, the demo's), read from `--data_dir`.

With `--every_checkpoint` each run is evaluated at every checkpoint it kept, in step order (one
row per step, "gained" and "lost" against the first row): accuracy over the course of training.
The checkpoints a run keeps are set by its `train.checkpoint_every` and `train.keep_checkpoints`.

With `--work_it_out` each run also answers with its think block prefilled with the equation's
left side ("What is 43+27? <think> 43+27="), greedy: how well the run computes when made to work
the problem out, whatever habit greedy decoding would follow (`work_it_out` in the output; for
+ and − task problems).

  python experiments/benchmarks/held_out_accuracy.py --data_dir=runs/demo/data \
      runs/demo/grpo runs/demo/sft
  python experiments/benchmarks/held_out_accuracy.py --data_dir=runs/demo/data \
      --work_it_out --every_checkpoint runs/demo/pretrain
"""

from __future__ import annotations

import argparse
import json
import re

from deepseek_jax import parallel
from deepseek_jax.configs.grpo import get_config
from deepseek_jax.data import r1, run_config
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import rewards
from deepseek_jax.rl.evaluate import complete, evaluate
from deepseek_jax.train import checkpoint as ckpt


def main() -> None:
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories to evaluate")
    ap.add_argument("--data_dir", required=True, help="where the task's records are")
    ap.add_argument("--config", default="small", help="GRPO run config naming the task")
    ap.add_argument("--num_problems", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=100)
    ap.add_argument("--work_it_out", action="store_true",
                    help="also answer with the equation's left side prefilled (module docstring)")
    ap.add_argument("--every_checkpoint", action="store_true",
                    help="evaluate every checkpoint a run kept, not only its latest")
    args = ap.parse_args()
    config = get_config(args.config)
    test = run_config.task_source(config.data, args.data_dir, "test")
    problems = [r1.problem_from_record(test[i])
                for i in range(min(args.num_problems, len(test)))]
    encoder = Encoder(config.data.tokenizer or None, add_bos=True)
    first = None
    for run in args.runs:
        for step in ckpt.saved_steps(run) if args.every_checkpoint else [None]:
            first = _report(run, step, args, config, problems, encoder, first)


def _report(run: str, step: int | None, args, config, problems, encoder: Encoder,
            first: list[bool] | None) -> list[bool]:
    """Prints one row for `run` at `step` (None: its latest checkpoint); returns the first row's
    per-problem correctness (this row's when `first` is None)."""
    model_config, variables = ckpt.load_trained(run, step, merged=True)
    result = evaluate(variables, model_config, problems, config.data.template,
                      max_new_tokens=config.rl.max_new_tokens, batch_size=args.batch_size,
                      encoder=encoder, show=3)
    estimating = sum(t.strip().startswith(r1.ESTIMATE_WORD) for t in result["completions"])
    right = [rewards.accuracy_reward(t, p) == 1.0
             for t, p in zip(result["completions"], problems)]
    first = right if first is None else first
    row = {"run": run} | ({"step": step} if step is not None else {}) | {
        "accuracy": result["accuracy"], "format": result["format"], "length": result["length"],
        "estimating": estimating / len(problems),
        "gained": sum(r and not f for r, f in zip(right, first)),
        "lost": sum(f and not r for r, f in zip(right, first)),
        "samples": result["samples"]}
    if args.work_it_out:
        row["work_it_out"] = work_it_out(variables, model_config, problems,
                                         config.data.template, args.batch_size, encoder)
    print(json.dumps(row), flush=True)
    return first


def work_it_out(variables, model_config, problems, template: str, batch_size: int,
                encoder: Encoder) -> float:
    """Greedy accuracy with the think block prefilled up to "=": the number the run writes next
    against the answer."""
    opening = "" if r1.prefills_think(template) else " <think>"
    done = complete(variables, model_config, problems, template, max_new_tokens=6,
                    batch_size=batch_size, encoder=encoder,
                    prefill=lambda p: f"{opening} {p['prompt']}")      # "… <think> 43+27="
    numbers = [re.match(r"-?\d+", row[0]["text"]) for row in done]
    return sum(bool(n) and n.group() == str(p["answer"])
               for n, p in zip(numbers, problems)) / len(problems)


if __name__ == "__main__":
    main()
