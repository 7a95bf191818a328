"""Math problems from a JSONL file (one JSON object a line), GSM8K- or MATH-style.

  GSM8K  {"question": "...", "answer": "... worked solution ... #### 72"}: the reference is the
         number after "#### " (a bare answer without the marker is taken as it stands)
  MATH   {"problem": "...", "solution": "... \\boxed{\\frac{1}{2}} ..."} and/or "answer": the
         reference is `answer` when given, else the last \\boxed{…} of the solution

Each problem becomes {"question", "reference", "id"}: `id` is the record's own "id" (or
"unique_id") when it has one, else "line N". Blank lines are skipped. A line that is not a
JSON object, lacks the fields of both formats, or has no reference answer is an error naming
the file, the line and the fields expected, raised before anything compiles.

Left out: other layouts (a HF `datasets` loader, nested chat messages); convert them to one of
the two first.
"""

from __future__ import annotations

from typing import Any

from etils import epath

from deepseek_jax.data import jsonl
from deepseek_jax.rl.math_answers import gsm8k_final, last_boxed

EXPECTED = ('GSM8K-style {"question", "answer" ending "#### N"} or MATH-style {"problem", '
            '"solution" with \\boxed{…} and/or "answer"}')


class ProblemFileError(ValueError):
    """A problem file line cannot be read; the message names the file, the line and the fix."""


def _reference(record: dict[str, Any]) -> tuple[str, str | None] | None:
    """(question, reference or None) of a record in either format, or None for neither."""
    if "question" in record and "answer" in record:
        answer = str(record["answer"])
        return str(record["question"]), gsm8k_final(answer) or answer.strip() or None
    if "problem" in record and ("answer" in record or "solution" in record):
        if "answer" in record and str(record["answer"]).strip():
            return str(record["problem"]), str(record["answer"]).strip()
        return str(record["problem"]), last_boxed(str(record.get("solution", "")))
    return None


def parse_problem(record: Any, where: str, default_id: str = "") -> dict[str, Any]:
    """One record as {"question", "reference", "id"}; `where` ("FILE:LINE") names it in errors,
    `default_id` is its id when the record has none."""
    if not isinstance(record, dict):
        raise ProblemFileError(f"{where}: expected a JSON object, {EXPECTED}; got "
                               f"{type(record).__name__}")
    found = _reference(record)
    if found is None:
        raise ProblemFileError(f"{where}: missing fields: expected {EXPECTED}; this line has "
                               f"{sorted(record)}")
    question, reference = found
    if not reference:
        raise ProblemFileError(f"{where}: no reference answer: give \"answer\", or a solution "
                               "with \\boxed{…} (MATH) or ending \"#### N\" (GSM8K)")
    return {"question": question, "reference": reference,
            "id": str(record.get("id", record.get("unique_id", default_id or where)))}


def read_problems(path: str, limit: int = 0) -> list[dict[str, Any]]:
    """The problems of a JSONL file (module docstring), the first `limit` when > 0."""
    path = epath.Path(path)
    if not path.exists():
        raise ProblemFileError(f"{path}: no such problem file")
    problems = []
    for where, number, record in jsonl.records(
            str(path), ProblemFileError, f"; expected one object a line, {EXPECTED}"):
        problems.append(parse_problem(record, where, f"line {number}"))
        if limit and len(problems) == limit:
            break
    if not problems:
        raise ProblemFileError(f"{path}: no problems; expected one JSON object a line, "
                               f"{EXPECTED}")
    return problems
