"""Math answers and problem files (rl/math_answers.py, rl/math_problems.py): extraction, the
equivalence check, the pass@k estimator against enumeration, and the GSM8K/MATH fixtures."""

import itertools
import json
import os

import pytest

from deepseek_jax.rl import math_answers as ma
from deepseek_jax.rl.evaluate import score_text
from deepseek_jax.rl.math_problems import ProblemFileError, read_problems

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
GSM8K = os.path.join(FIXTURES, "gsm8k_sample.jsonl")
MATH = os.path.join(FIXTURES, "math_sample.jsonl")


@pytest.mark.parametrize("text, answer", [
    ("<think> 2+2 </think> <answer> 4 </answer>", "4"),
    ("<answer>3</answer> then <answer>5</answer>", "5"),                   # the last block
    (r"<answer>so \boxed{\frac{1}{2}}</answer>", r"\frac{1}{2}"),          # boxed inside wins
    (r"<answer>\boxed{1} or \boxed{ {2}+3 }</answer>", "{2}+3"),           # last, nested braces
    (r"the answer is $\boxed{\sqrt{\frac{a}{b}}}$.", r"\sqrt{\frac{a}{b}}"),  # no tags: boxed
    (r"\fbox{7}", "7"),
    (r"<answer>\boxed{12</answer>", r"\boxed{12"),                         # unclosed: as written
    ("no answer here", None),
    ("<answer>  </answer>", None),
    ("<answer>" + "9" * (ma.MAX_ANSWER_CHARS + 1) + "</answer>", None),
])
def test_extract_answer(text, answer):
    assert ma.extract_answer(text) == answer


def test_last_boxed_and_gsm8k_final():
    assert ma.last_boxed(r"\boxed{a} x \boxed{b{c}d}") == "b{c}d"
    assert ma.last_boxed(r"\boxed{never closed") is None
    assert ma.gsm8k_final("3 * 12 = 36\n#### 1,234") == "1234"
    assert ma.gsm8k_final("no marker 42") is None


@pytest.mark.parametrize("got, ref", [
    ("1,000", "1000"), ("0.5", "1/2"), (r"\frac{1}{2}", "0.5"), (r"\dfrac{3}{4}", "0.75"),
    (r"2\sqrt{2}", r"\sqrt{8}"), ("42.0", "42"), ("x = 4", "4"), (r"50\%", "0.5"),
    (r"\$18", "18"), ("1+x^2", "x^2+1"), (r"\frac{9}{4}", "2.25"), ("Paris", " Paris"),
])
def test_equivalent_answers(got, ref):
    assert ma.is_equivalent(got, ref)


@pytest.mark.parametrize("got, ref", [
    ("7", "8"), ("-5", "5"), ("3.14", r"\pi"), (r"\frac{1}{3}", "0.33"), ("x^2", "2x"),
    ("Paris", "London"),
])
def test_different_answers(got, ref):
    assert not ma.is_equivalent(got, ref)


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n samples (the first c right) holding a right one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_subsets():
    # The product form multiplies at most n ≤ 7 factors, each rounded to 2^-53 relative, and
    # the enumeration divides two exact integers: they agree to ~n·1.1e-16; 1e-12 is ample.
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert ma.pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k),
                                                              abs=1e-12), (n, c, k)
    assert ma.pass_at_k(200, 0, 100) == 0.0 and ma.pass_at_k(200, 101, 100) == 1.0
    with pytest.raises(ValueError, match="1 <= k <= n"):
        ma.pass_at_k(4, 1, 5)


def test_fixtures_in_both_formats():
    gsm8k, math = read_problems(GSM8K), read_problems(MATH)
    assert [p["reference"] for p in gsm8k] == ["29", "12", "2000", "6"]
    assert [p["reference"] for p in math] == [r"\frac{1}{2}", r"2\sqrt{2}", "4", r"\frac{9}{4}"]
    assert gsm8k[0]["id"] == "line 1" and math[0]["id"] == "algebra/1"
    assert read_problems(MATH, limit=2) == math[:2]


# A right completion of each fixture problem, its answer in another form than the reference's.
RIGHT = {"29": "29", "12": r"\$12.00", "2000": "2,000", "6": r"\boxed{6}",
         r"\frac{1}{2}": "0.5", r"2\sqrt{2}": r"\sqrt{8}", "4": "x = 4", r"\frac{9}{4}": "2.25"}


@pytest.mark.parametrize("template", ["r1_zero", "compact"])
def test_fixture_problems_score_right_and_wrong_completions(template):
    opening = "" if template == "compact" else " <think>"
    for problem in read_problems(GSM8K) + read_problems(MATH):
        right = f"{opening} working </think> <answer>{RIGHT[problem['reference']]}</answer>"
        assert score_text(right, problem, template) == {
            "answer": ma.extract_answer(right), "accuracy": 1.0, "format": 1.0}, problem
        wrong = f"{opening} working </think> <answer>17</answer>"
        assert score_text(wrong, problem, template)["accuracy"] == 0.0
    # A boxed answer without the tags is right, but not well-formed.
    assert score_text(r"so \boxed{29}", read_problems(GSM8K)[0], template) == {
        "answer": "29", "accuracy": 1.0, "format": 0.0}


def _write(tmp_path, lines):
    path = tmp_path / "problems.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_problem_files_name_the_file_line_and_fields(tmp_path):
    good = json.dumps({"question": "1+1?", "answer": "#### 2"})
    path = _write(tmp_path, [good, "", json.dumps({"question": "2+2?", "solution": "4"})])
    with pytest.raises(ProblemFileError, match=r"problems.jsonl:3: missing fields: expected "
                       r"GSM8K-style .*\['question', 'solution'\]"):
        read_problems(path)
    with pytest.raises(ProblemFileError, match=r"problems.jsonl:2: not valid JSON"):
        read_problems(_write(tmp_path, [good, "{oops"]))
    with pytest.raises(ProblemFileError, match=r"problems.jsonl:1: expected a JSON object"):
        read_problems(_write(tmp_path, ["[1, 2]"]))
    with pytest.raises(ProblemFileError, match=r"problems.jsonl:1: no reference answer"):
        read_problems(_write(tmp_path, [json.dumps({"problem": "?", "solution": "no box"})]))
    with pytest.raises(ProblemFileError, match="no problems"):
        read_problems(_write(tmp_path, [""]))
    with pytest.raises(ProblemFileError, match="no such problem file"):
        read_problems(str(tmp_path / "absent.jsonl"))
