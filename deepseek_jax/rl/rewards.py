"""Rule-based rewards for R1-Zero-style RL on the procedural tasks.

The prompts they judge come from `data/r1.py` (the templates, `make_prompt`). With a prefilled
template (`prefills_think`) the completion reads "… </think> <answer> … </answer>"; the format
reward judges "<think>" + completion, the same text either way.

Rewards are pure functions of text (never executed as code):

  format_reward      1 if the completion (after the template's prefilled "<think>", if any) is
                     exactly <think>…</think> <answer>…</answer> with each tag once (whitespace
                     allowed before, between and after), else 0
  countdown_reward   1 if the answer is an expression of + − × ÷ that reaches the target using
                     each given number at most once (a safe parser: `data.tasks.evaluate_expression`
                     — no `**`, no names, no unary minus, values capped at 1e12)
  arithmetic_reward  1 if the answer is the integer result
  math_reward        for a math problem ({"question", "reference"}: `rl/math_problems.py`), 1 if
                     its final answer (<answer> block or \\boxed{}) means the reference, as
                     `rl/math_answers.py` checks it (math-verify; `math_answers.math_reward`)
  total              accuracy + format_weight · format. The default weight 1 is R1's (§2.2.2:
                     the two rule-based rewards, added); `FORMAT_WEIGHTS` names the choices
                     ("r1" = 1, "tinyzero" = 0.1, TinyZero's countdown reward, the demo's;
                     "accuracy_only" = 0), and a run config may set any number

The answer is the text of the LAST <answer>…</answer> (several answers score only the last, so
listing guesses does not pay), stripped, at most 128 characters (longer answers score 0: they
cost the parser time and are never needed here).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from deepseek_jax.data import tasks
from deepseek_jax.data.r1 import prefills_think
from deepseek_jax.rl import math_answers

FORMAT_WEIGHTS = {"r1": 1.0, "tinyzero": 0.1, "accuracy_only": 0.0}

_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
MAX_ANSWER_CHARS = 128


def extract_answer(completion: str) -> str | None:
    found = _ANSWER.findall(completion)
    if not found:
        return None
    answer = found[-1].strip()
    return answer if len(answer) <= MAX_ANSWER_CHARS else None


def format_reward(completion: str, template: str = "r1_zero") -> float:
    """1 for exactly one think block followed by exactly one answer block, else 0 (the think
    block opened by the prompt when `template` prefills it, by the completion otherwise)."""
    text = ("<think>" if prefills_think(template) else "") + completion
    once = all(text.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))
    return 1.0 if once and _FORMAT.match(text) else 0.0


def countdown_reward(completion: str, numbers: Sequence[int], target: int) -> float:
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    try:
        return 1.0 if tasks.check_countdown(answer, list(numbers), int(target)) else 0.0
    except (RecursionError, MemoryError, OverflowError):   # pathological nesting
        return 0.0


def arithmetic_reward(completion: str, answer: str) -> float:
    got = extract_answer(completion)
    if got is None or not re.fullmatch(r"-?\d{1,40}", got):
        return 0.0
    return 1.0 if int(got) == int(answer) else 0.0


def accuracy_reward(completion: str, problem: dict[str, Any]) -> float:
    """The problem's own check: math (a "reference" answer), countdown or arithmetic, told apart
    by the problem's fields."""
    if "reference" in problem:
        return math_answers.math_reward(completion, problem["reference"])
    if "op" in problem or "numbers" not in problem:
        return arithmetic_reward(completion, str(problem["answer"]))
    return countdown_reward(completion, problem["numbers"], problem["target"])


def score(completion: str, problem: dict[str, Any], format_weight: float = FORMAT_WEIGHTS["r1"],
          template: str = "r1_zero") -> dict[str, float]:
    """{"accuracy", "format", "total"} for one completion of a `template` prompt."""
    acc = accuracy_reward(completion, problem)
    fmt = format_reward(completion, template)
    return {"accuracy": acc, "format": fmt, "total": acc + format_weight * fmt}


