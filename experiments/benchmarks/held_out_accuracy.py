"""Benchmark: held-out greedy accuracy of several runs on one task, side by side (R1's stage 3:
the GRPO model against the model SFT'd on its rejection samples).

Each run's latest checkpoint answers the same problems with `deepseek_jax.rl.evaluate.evaluate`
(greedy, the task's template): the first `--num_problems` of the task's test split, the
problems a GRPO run evaluates on (`rl.problems.load_problems`). Runs after the first also report
how many problems they solve that the first does not ("gained") and the reverse ("lost"). The task comes from a GRPO run
config (default `grpo.py:small`, the demo's), read from `--data_dir`.

  python experiments/benchmarks/held_out_accuracy.py --data_dir=runs/demo/data \
      runs/demo/grpo runs/demo/sft
"""

from __future__ import annotations

import argparse
import json

from deepseek_jax.configs.grpo import get_config
from deepseek_jax.data import r1, run_config
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import rewards
from deepseek_jax.rl.evaluate import evaluate
from deepseek_jax.train import checkpoint as ckpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run directories to evaluate")
    ap.add_argument("--data_dir", required=True, help="where the task's records are")
    ap.add_argument("--config", default="small", help="GRPO run config naming the task")
    ap.add_argument("--num_problems", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=100)
    args = ap.parse_args()
    config = get_config(args.config)
    test = run_config.task_source(config.data, args.data_dir, "test")
    problems = [r1.problem_from_record(test[i])
                for i in range(min(args.num_problems, len(test)))]
    first = None
    for run in args.runs:
        model_config, variables = ckpt.load_trained(run)
        result = evaluate(variables, model_config, problems, config.data.template,
                          max_new_tokens=config.rl.max_new_tokens, batch_size=args.batch_size,
                          encoder=Encoder(config.data.tokenizer or None, add_bos=True), show=3)
        estimating = sum(t.strip().startswith(r1.ESTIMATE_WORD) for t in result["completions"])
        right = [rewards.accuracy_reward(t, p) == 1.0
                 for t, p in zip(result["completions"], problems)]
        first = right if first is None else first
        print(json.dumps({"run": run, "accuracy": result["accuracy"],
                          "format": result["format"], "length": result["length"],
                          "estimating": estimating / len(problems),
                          "gained": sum(r and not f for r, f in zip(right, first)),
                          "lost": sum(f and not r for r, f in zip(right, first)),
                          "samples": result["samples"]}), flush=True)


if __name__ == "__main__":
    main()
