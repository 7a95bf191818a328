"""Prompts and rule-based rewards for R1-Zero-style RL on the procedural tasks.

Templates (`TEMPLATES`, chosen by name in the run configs):

  r1_zero        the R1 paper's (Table 1), the default. It ends with "Assistant:", so the model
                 opens the think block itself; a completion reads
                 " <think> … </think> <answer> … </answer>":
                   A conversation between User and Assistant. The user asks a question, and the
                   Assistant solves it. ... i.e., <think> reasoning process here </think>
                   <answer> answer here </answer>. User: {question}. Assistant:
  r1_zero_think  the same text with "<think>" prefilled ("… Assistant: <think>"): every
                 completion starts inside the think block, so the opening tag cannot be missed
                 (the form several open R1-Zero replications use).
  compact        "{question} <think>": a short prefilled template for small models on a CPU
                 (fewer tokens to prefill and learn); the demo's.

With a prefilled template (`prefills_think`) the completion reads "… </think> <answer> …
</answer>"; the format reward judges "<think>" + completion, the same text either way.

Rewards are pure functions of text (never executed as code):

  format_reward      1 if the completion (after the template's prefilled "<think>", if any) is
                     exactly <think>…</think> <answer>…</answer> with each tag once (whitespace
                     allowed before, between and after), else 0
  countdown_reward   1 if the answer is an expression of + − × ÷ that reaches the target using
                     each given number at most once (a safe parser: `data.tasks.evaluate_expression`
                     — no `**`, no names, no unary minus, values capped at 1e12)
  arithmetic_reward  1 if the answer is the integer result
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
import zlib
from typing import Any, Sequence

from deepseek_jax.data import tasks

R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the "
           "Assistant solves it. The assistant first thinks about the reasoning process in the "
           "mind and then provides the user with the answer. The reasoning process and answer "
           "are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
           "i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
           "User: {question}. Assistant:")
R1_ZERO_THINK = R1_ZERO + " <think>"
COMPACT = "{question} <think>"
TEMPLATES = {"r1_zero": R1_ZERO, "r1_zero_think": R1_ZERO_THINK, "compact": COMPACT}
FORMAT_WEIGHTS = {"r1": 1.0, "tinyzero": 0.1, "accuracy_only": 0.0}

_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
MAX_ANSWER_CHARS = 128


def question(problem: dict[str, Any]) -> str:
    """The question a task example asks, in words."""
    if "numbers" in problem and "target" in problem and "op" not in problem:
        nums = ", ".join(str(int(n)) for n in problem["numbers"])
        return (f"Using the numbers [{nums}], create an equation that equals "
                f"{int(problem['target'])}. Use + - * / and each number at most once")
    return f"What is {problem['prompt'].rstrip('=')}?"


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; use one of {sorted(TEMPLATES)}")


def prefills_think(template: str) -> bool:
    """Whether the prompt of `template` already opens the think block."""
    _check_template(template)
    return TEMPLATES[template].endswith("<think>")


def make_prompt(problem: dict[str, Any], template: str = "r1_zero") -> str:
    _check_template(template)
    return TEMPLATES[template].format(question=question(problem))


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
    """The task's own check: countdown or arithmetic, told apart by the problem's fields."""
    if "op" in problem or "numbers" not in problem:
        return arithmetic_reward(completion, str(problem["answer"]))
    return countdown_reward(completion, problem["numbers"], problem["target"])


def score(completion: str, problem: dict[str, Any], format_weight: float = FORMAT_WEIGHTS["r1"],
          template: str = "r1_zero") -> dict[str, float]:
    """{"accuracy", "format", "total"} for one completion of a `template` prompt."""
    acc = accuracy_reward(completion, problem)
    fmt = format_reward(completion, template)
    return {"accuracy": acc, "format": fmt, "total": acc + format_weight * fmt}


ESTIMATE_WORD = "about"     # opens the think block of an estimated answer (`target_completion`)


def target_completion(problem: dict[str, Any], worked: bool = False,
                      estimated: bool = False, template: str = "r1_zero") -> str:
    """A well-formed completion of a `template` prompt (for pretraining on the format). Below,
    the part after "<think>"; a template that does not prefill it gets " <think>" in front, so
    prompt + completion is the same text under r1_zero and r1_zero_think.

    The think block writes the equation for arithmetic (`" 43+27=70 </think> …"`, the stored
    pretraining line) and restates the problem otherwise. With `worked=True`, + and − problems
    are worked out column by column (`tasks.worked_solution`: `" 3+7=10 4+2+1=7 </think> …"`).
    With `estimated=True` (+ and − only) the think block and the answer are a quick estimate
    instead, with no work shown (`tasks.estimate`: `" about 70 </think> <answer>70</answer>"` for
    43+27, and `"… 10 …"` for 43−27, a wrong answer): careless answers, as a corpus also holds.
    """
    opening = "" if prefills_think(template) else " <think>"
    think = problem["text"].strip() if "op" in problem and "text" in problem else problem["prompt"]
    rough = tasks.estimate(*_operands(problem)) if estimated and "op" in problem else None
    if rough is not None:
        return f"{opening} {ESTIMATE_WORD} {rough} </think> <answer>{rough}</answer>"
    if worked and "op" in problem:
        think = tasks.worked_solution(*_operands(problem)) or think
    return f"{opening} {think} </think> <answer>{problem['answer']}</answer>"


def _operands(problem: dict[str, Any]) -> tuple[int, str, int]:
    a, b = problem["numbers"]
    return int(a), problem["op"], int(b)


def worked_for(problem: dict[str, Any], fraction: float, salt: str = "") -> bool:
    """Whether `problem` is among the `fraction` of problems shown worked out (or, with another
    `salt`, picked for another independent choice): a fixed hash of its prompt decides, so the
    choice is the same on every pass and in every process."""
    return zlib.crc32((salt + problem["prompt"]).encode()) % 10_000 < round(fraction * 10_000)


def sft_text(problem: dict[str, Any], template: str, worked_fraction: float = 0.0,
             estimate_fraction: float = 0.0) -> str:
    """Prompt + well-formed completion: one pretraining document in the RL format, worked out
    column by column for a `worked_fraction` share of the problems and estimated roughly (a
    usually wrong answer) for an independent `estimate_fraction` share (estimates win)."""
    return make_prompt(problem, template) + target_completion(
        problem, worked=worked_for(problem, worked_fraction),
        estimated=worked_for(problem, estimate_fraction, salt="estimate"), template=template)


def problem_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """A stored task record (TFDS gives bytes and numpy arrays) as plain Python values."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif hasattr(v, "tolist"):
            v = v.tolist()
        out[k] = v
    return out
