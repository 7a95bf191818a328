"""Procedural tasks: determinism, formats, Countdown solvability, the safe evaluator, splits."""

import ast
import fractions
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from deepseek_jax.data import tasks


def independent_eval(expr: str) -> tuple[fractions.Fraction, list[int]]:
    """A second, tiny evaluator written for the test: (exact value, integer literals used)."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}
    used = []

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and type(node.value) is int, ast.dump(node)
        used.append(node.value)
        return fractions.Fraction(node.value)

    return walk(ast.parse(expr, mode="eval").body), used


def test_arithmetic_is_deterministic_and_correct():
    a = [tasks.arithmetic_problem(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    ops_seen = set()
    for _ in range(300):
        p = tasks.arithmetic_problem(rng, max_digits=3)
        x, y = p["numbers"]
        assert 0 <= x < 1000 and 0 <= y < 1000
        expected = {"+": x + y, "-": x - y, "*": x * y}[p["op"]]
        assert p["target"] == expected and p["answer"] == str(expected)
        assert p["prompt"] == f"{x}{p['op']}{y}=" and p["text"] == f"{x}{p['op']}{y}={expected}\n"
        assert re.fullmatch(r"\d+[-+*]\d+=-?\d+\n", p["text"])
        ops_seen.add(p["op"])
    assert ops_seen == {"+", "-", "*"}


def test_countdown_puzzles_are_solvable_with_their_stored_solution():
    rng = np.random.default_rng(1)
    sizes = set()
    for _ in range(200):
        p = tasks.countdown_problem(rng)
        value, used = independent_eval(p["answer"])
        assert value == p["target"]
        assert sorted(used) == sorted(p["numbers"])              # each number exactly once
        assert 1 <= p["target"] <= 100 and p["target"] not in p["numbers"]
        assert all(1 <= n <= 99 for n in p["numbers"])
        nums = " ".join(map(str, p["numbers"]))
        assert p["prompt"] == f"numbers {nums} target {p['target']}"
        assert p["text"] == f"{p['prompt']}: {p['answer']}\n"
        sizes.add(len(p["numbers"]))
    assert sizes == {3, 4}


def test_solver_agrees_with_generator_and_respects_at_most_once():
    rng = np.random.default_rng(2)
    for _ in range(40):
        p = tasks.countdown_problem(rng)
        solution = tasks.solve_countdown(p["numbers"], p["target"])
        value, used = independent_eval(solution)
        assert value == p["target"]
        remaining = list(p["numbers"])
        for n in used:                                           # at most once
            remaining.remove(n)
    assert tasks.solve_countdown([2, 3], 100) is None
    assert tasks.solve_countdown([5], 10) is None                # 5+5 would reuse 5
    assert independent_eval(tasks.solve_countdown([1, 5, 5, 5], 24))[0] == 24   # needs 1/5
    assert tasks.solve_countdown([3, 3, 8, 8], 24) == "3*8"     # a subset is enough


@pytest.mark.parametrize("expr, value", [("(1+2)/3", 1), ("50+25+7-3", 79), ("7-9", -2),
                                         ("6/4", fractions.Fraction(3, 2)), ("((8))", 8)])
def test_evaluate_expression_exact(expr, value):
    assert tasks.evaluate_expression(expr) == value


@pytest.mark.parametrize("expr", ["2**3", "-3+5", "x+1", "1/0", "99*99*99*99*99*99*99",
                                  "1+", "__import__('os')", "1.5+1", "True+1"])
def test_evaluate_expression_refuses(expr):
    with pytest.raises(ValueError):
        tasks.evaluate_expression(expr)


def test_check_countdown():
    assert tasks.check_countdown("50+25+7-3", [3, 7, 25, 50], 79)
    assert tasks.check_countdown("50+25", [3, 7, 25, 50], 75)                 # subset: at most once
    assert not tasks.check_countdown("50+25", [3, 7, 25, 50], 75, exactly_once=True)
    assert not tasks.check_countdown("50+50", [3, 7, 25, 50], 100)           # reused
    assert not tasks.check_countdown("50+25+7-3", [3, 7, 25, 50], 80)        # wrong value
    assert not tasks.check_countdown("5**2", [5, 2], 25)                    # not allowed


def test_problem_key_is_canonical():
    add = {"numbers": [417, 85], "op": "+", "target": 502}
    assert tasks.problem_key(add) == tasks.problem_key({**add, "numbers": [85, 417]})
    sub = {"numbers": [417, 85], "op": "-", "target": 332}
    assert tasks.problem_key(sub) != tasks.problem_key({**sub, "numbers": [85, 417]})
    cd = {"numbers": [7, 3, 50, 25], "target": 79}
    assert tasks.problem_key(cd) == tasks.problem_key({"numbers": [3, 7, 25, 50], "target": 79})


@pytest.mark.parametrize("task", ["arithmetic", "countdown"])
def test_generate_splits_deterministic_disjoint_and_stable(task):
    counts = {"train": 60, "validation": 12, "test": 12}
    a = tasks.generate_splits(task, 3, counts)
    assert a == tasks.generate_splits(task, 3, counts)
    assert a != tasks.generate_splits(task, 4, counts)
    keys = {s: {tasks.problem_key(p) for p in a[s]} for s in a}
    for s in a:
        assert len(a[s]) == counts[s] and len(keys[s]) == counts[s]     # exact and distinct
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # Held-out content does not depend on how much training data is asked for.
    b = tasks.generate_splits(task, 3, {**counts, "train": 5})
    assert b["validation"] == a["validation"] and b["test"] == a["test"]


def test_bad_task_arguments_say_what_to_change():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="max_digits >= 1"):
        tasks.arithmetic_problem(rng, max_digits=0)
    with pytest.raises(ValueError, match="subset of"):
        tasks.arithmetic_problem(rng, ops="/")
    with pytest.raises(ValueError, match="min_numbers"):
        tasks.countdown_problem(rng, min_numbers=1)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate_splits("sudoku", 0, {"train": 1})
    with pytest.raises(ValueError, match="lower the counts"):
        tasks.generate_splits("arithmetic", 0, {"train": 500}, max_digits=1, ops="+")


def test_tasks_and_tokenizer_import_without_grain_or_tfds():
    """The GPU benchmark machine has neither; the demo imports tokenizer/synthetic from here."""
    code = ("import sys, deepseek_jax.data as d; from deepseek_jax.data import tokenizer, "
            "synthetic, tasks, encoding; d.solve_countdown([1, 2], 3); "
            "print(sorted(m for m in ('grain', 'tensorflow_datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "[]"


def _read_off(trace: str) -> int:
    """The answer a worked solution leads to, read back independently of how it was written:
    the last digit of each column's result, last column's whole result first, sign from -(…)."""
    negative = trace.startswith("-(")
    steps = trace.split(") ", 1)[1].split() if negative else trace.split()
    results = [s.split("=")[1] for s in steps]
    digits = results[-1] + "".join(r[-1] for r in reversed(results[:-1]))
    return -int(digits) if negative else int(digits)


def test_worked_solution_leads_to_the_answer():
    pairs = [(a, b) for a in range(100) for b in range(100)] + \
        [(999, 1), (1, 999), (500, 499), (123, 4567), (4567, 123), (1000, 1000)]
    for a, b in pairs:
        assert _read_off(tasks.worked_solution(a, "+", b)) == a + b, (a, b)
        assert _read_off(tasks.worked_solution(a, "-", b)) == a - b, (a, b)
    assert tasks.worked_solution(43, "+", 27) == "3+7=10 4+2+1=7"
    assert tasks.worked_solution(27, "-", 43) == "-(43-27) 13-7=6 4-2-1=1"
    # Each step's arithmetic is itself right (what the model is taught to imitate).
    for step in tasks.worked_solution(4567, "-", 1238).split():
        lhs, rhs = step.split("=")
        assert tasks.evaluate_expression(lhs) == int(rhs), step
    assert tasks.worked_solution(12, "*", 3) is None


def test_estimate_rounds_each_operand_to_tens():
    assert tasks.estimate(43, "+", 27) == 70                     # 40+30
    assert tasks.estimate(43, "-", 27) == 10                     # 40-30
    assert tasks.estimate(27, "-", 43) == -10                    # 30-40
    assert tasks.estimate(45, "+", 95) == 150                    # 50+100: halves round up
    assert tasks.estimate(12, "*", 3) is None
    # Right exactly when the rounding errors cancel: an independent count over all 2-digit
    # pairs (for + the errors must sum to 0, for - be equal).
    def err(x):
        return (x + 5) // 10 * 10 - x
    right = wrong = 0
    for a in range(10, 100):
        for b in range(10, 100):
            for op, truth, cancel in (("+", a + b, err(a) + err(b) == 0),
                                      ("-", a - b, err(a) == err(b))):
                hit = tasks.estimate(a, op, b) == truth
                assert hit == cancel, (a, op, b)
                right, wrong = right + hit, wrong + (not hit)
    assert 0.05 < right / (right + wrong) < 0.15      # a careless habit: ~1 in 10 right
