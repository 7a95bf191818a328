"""Evaluation of a policy on problems: completions generated in batches, each one scored.

Two kinds of problem, told apart by their fields:

  task problems   the procedural tasks' records (arithmetic, countdown: `data/tasks.py`); the
                  prompt is `r1.make_prompt`, the answer is checked by the task's own reward
  math problems   {"question", "reference"} (`math_problems.read_problems`, GSM8K or MATH
                  files); the prompt is the template around the question text, the answer is
                  extracted from <answer> tags or \\boxed{} and checked by
                  `math_answers.is_equivalent`

Either way the score is GRPO's accuracy reward (`rewards.accuracy_reward`), so evaluation and
training judge a completion alike.

Every completion also gets the format reward (one think block, then one answer block).

  complete(...)   per problem, `samples` scored completions (greedy at temperature 0, or sampled;
                  sample j of problem i uses the key fold_in(fold_in(rng, i), j), so it does not
                  depend on the batch it falls in)
  evaluate(...)   GRPO's held-out evaluation: greedy accuracy, format, length
  summarize(...)  the evaluation command's summary: greedy accuracy and pass@k

The last batch is padded by repeating its last row; the padding's scores are dropped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.data import r1
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.rl import math_answers, rewards, rollout


def prompt_text(problem: dict[str, Any], template: str) -> str:
    """The `template` prompt of a math problem (its question text) or a task problem."""
    if "reference" in problem:
        r1.prefills_think(template)                     # an unknown template is an error
        return r1.TEMPLATES[template].format(question=problem["question"])
    return r1.make_prompt(problem, template)


def score_text(text: str, problem: dict[str, Any], template: str) -> dict[str, Any]:
    """{"answer", "accuracy", "format"} of one completion (module docstring)."""
    extract = math_answers.extract_answer if "reference" in problem else rewards.extract_answer
    return {"answer": extract(text), "accuracy": rewards.accuracy_reward(text, problem),
            "format": rewards.format_reward(text, template)}


def _row_keys(rng, rows: list[tuple[int, int]]) -> jax.Array:
    i, j = (jnp.asarray([r[k] for r in rows], jnp.int32) for k in (0, 1))
    return jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(rng, a), b))(i, j)


def complete(variables, config: ModelConfig, problems: Sequence[dict[str, Any]], template: str,
             *, max_new_tokens: int, batch_size: int, samples: int = 1,
             temperature: float = 0.0, top_p: float | None = None, rng=None, mesh=None,
             rules=None, encoder: Encoder = rollout.BYTES,
             progress: Callable[[int, int], None] | None = None,
             prefill: Callable[[dict[str, Any]], str] | None = None) -> list[list[dict]]:
    """Per problem, `samples` dicts {"text", "answer", "accuracy", "format", "length"} (length
    in tokens, the EOS included). `progress(done_rows, total_rows)` is called after each batch.
    `prefill(problem)`, when given, is text appended to each prompt, as if the model had written
    it; "text" and the scores are of what the model writes after it."""
    from deepseek_jax.sampling import generate
    prompts = [encoder.encode_prompt(prompt_text(p, template) + (prefill(p) if prefill else ""))
               for p in problems]
    rows = [(i, j) for i in range(len(problems)) for j in range(samples)]
    out_rows: list[list[dict]] = [[] for _ in problems]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)             # one compiled shape
        keys = None if temperature == 0 else _row_keys(rng, chunk)
        out = generate(variables, config, [prompts[i] for i, _ in chunk],
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       eos_id=encoder.eos_id, rng=keys, mesh=mesh, rules=rules)
        tokens, lengths = parallel.to_host(out.tokens), parallel.to_host(out.lengths)
        for (i, _), ids, length in zip(chunk[:n], rollout.completion_ids(tokens, lengths),
                                       lengths[:n]):
            text = encoder.decode(ids)
            out_rows[i].append({"text": text, **score_text(text, problems[i], template),
                                "length": int(length)})
        if progress is not None:
            progress(start + n, len(rows))
    return out_rows


def evaluate(variables, config: ModelConfig, problems: Sequence[dict[str, Any]], template: str,
             *, max_new_tokens: int, batch_size: int, show: int = 0, mesh=None,
             rules=None, encoder: Encoder = rollout.BYTES) -> dict:
    """{"accuracy", "format", "length", "samples", "completions"} of greedy completions of
    `problems`: means over problems; `samples` are the first `show` completions, `completions`
    all of them, in problem order."""
    done = [r[0] for r in complete(variables, config, problems, template,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   mesh=mesh, rules=rules, encoder=encoder)]
    texts = [d["text"] for d in done]
    return {k: float(np.mean([d[k] for d in done])) for k in ("accuracy", "format", "length")} | {
        "samples": texts[:show], "completions": texts}


def summarize(greedy: list[list[dict]], sampled: list[list[dict]], k: int) -> dict[str, float]:
    """{"problems", "greedy_accuracy", "greedy_format", "pass@k", "sample_accuracy",
    "samples_per_problem", "mean_length"}: pass@k by the unbiased estimator over each problem's
    n ≥ k samples (no sampled keys when `sampled` is empty)."""
    out = {"problems": len(greedy),
           "greedy_accuracy": float(np.mean([g[0]["accuracy"] for g in greedy])),
           "greedy_format": float(np.mean([g[0]["format"] for g in greedy])),
           "mean_length": float(np.mean([g[0]["length"] for g in greedy]))}
    if sampled:
        n = len(sampled[0])
        correct = [sum(int(s["accuracy"] > 0) for s in row) for row in sampled]
        out[f"pass@{k}"] = float(np.mean([math_answers.pass_at_k(n, c, k) for c in correct]))
        out["sample_accuracy"] = float(np.mean(correct) / n)
        out["samples_per_problem"] = n
    return out
