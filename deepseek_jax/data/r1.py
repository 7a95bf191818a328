"""R1-format documents: the prompt templates and the texts rendered from task problems.

One home for how a problem becomes text in the R1 format: the prompt of each template
(`TEMPLATES`), a well-formed completion (`target_completion`: the equation, a column-by-column
working, or a rough estimate in the think block), and a whole pretraining document
(`sft_text`). GRPO prompts with `make_prompt`; its rewards (`rl/rewards.py`) parse what the model
writes back.

Templates:

  r1_zero        the R1 paper's (Table 1), the default. It ends with "Assistant:", so the model
                 opens the think block itself; a completion reads
                 " <think> … </think> <answer> … </answer>".
  r1_zero_think  the same text with "<think>" prefilled ("… Assistant: <think>"): every
                 completion starts inside the think block.
  compact        "{question} <think>": a short prefilled template for small models on a CPU;
                 the demo's.
"""

from __future__ import annotations

import zlib
from typing import Any

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


def chosen(problem: dict[str, Any], fraction: float, salt: str = "") -> bool:
    """Whether `problem` is among a `fraction` of all problems: a fixed hash of its prompt (and
    `salt`, one per independent choice: worked out, estimated, a bare line) decides, so the
    choice is the same on every pass and in every process."""
    return zlib.crc32((salt + problem["prompt"]).encode()) % 10_000 < round(fraction * 10_000)


def sft_text(problem: dict[str, Any], template: str, worked_fraction: float = 0.0,
             estimate_fraction: float = 0.0) -> str:
    """Prompt + well-formed completion: one pretraining document in the RL format, worked out
    column by column for a `worked_fraction` share of the problems and estimated roughly (a
    usually wrong answer) for an independent `estimate_fraction` share (estimates win)."""
    return make_prompt(problem, template) + target_completion(
        problem, worked=chosen(problem, worked_fraction),
        estimated=chosen(problem, estimate_fraction, salt="estimate"), template=template)


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
