"""Procedural tasks with verifiable answers: multi-digit arithmetic and Countdown.

Both tasks are pure functions of a `numpy.random.Generator`, so a seed fixes every problem. Each
problem is a plain dict that the TFDS builders store as-is:

- `prompt`: the question text, kept plain so that GRPO can wrap it in its own template.
- `answer`: the reference answer text (arithmetic: the result; Countdown: one known solution).
- `text`: the pretraining line, `prompt` + separator + `answer` + newline (formats below).
- `numbers`, `target` (and `op` for arithmetic): the structured fields a reward parser checks.

Formats (all ASCII: one byte id per character):

- arithmetic: prompt `"417+85="`, answer `"502"`, text `"417+85=502\\n"`. Operators are `+`, `-`
  and `*`; a subtraction may give a negative result (`"12-85=-73\\n"`).
- Countdown: prompt `"numbers 3 7 25 50 target 79"`, answer `"50+25+7-3"` (an expression without
  spaces and with only the parentheses it needs, e.g. `"(71-26)/45"`), text
  `"numbers 3 7 25 50 target 79: 50+25+7-3\\n"` (prompt, colon, space, answer). The rule is
  "reach the target with + - * /, using each number at most once"; the stored solution uses every
  number exactly once (all intermediate values positive integers), so it also passes TinyZero's
  stricter exactly-once check.

Held-out splits are disjoint by construction: a problem's split is a hash of its canonical key
(`problem_key`: operands of + and * sorted; Countdown numbers sorted), so the same problem can never
land in two splits, whatever the example counts; `generate_splits` also drops duplicates within
a split.

Left out: reward parsing of model outputs (the GRPO rewards module owns the R1-Zero template and
the `<answer>` extraction; `evaluate_expression` and `check_countdown` here are the exact checks it
can reuse), and curriculum schedules (the generators take difficulty knobs instead).
"""

from __future__ import annotations

import ast
import fractions
import hashlib
import itertools
from typing import Any, Callable

import numpy as np

SPLITS = ("train", "validation", "test")
_OPS = {"+": 1, "-": 1, "*": 2, "/": 2}     # operator -> precedence; leaves have precedence 3
_MAX_MAGNITUDE = 10 ** 12                   # evaluate_expression refuses anything larger


# --------------------------------------------------------------------------------------------
# Arithmetic


def _operand(rng: np.random.Generator, max_digits: int, min_digits: int = 1) -> int:
    digits = int(rng.integers(min_digits, max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10 ** digits))


def arithmetic_problem(rng: np.random.Generator, max_digits: int = 3,
                       ops: str = "+-*", min_digits: int = 1) -> dict[str, Any]:
    """One `a op b` problem; each operand has a uniform number of digits in
    min_digits..max_digits (equal bounds give fixed-width operands, an easier layout for small
    models: every digit sits at the same place in every prompt).

    Args:
        rng: the random generator (advanced in place).
        max_digits: the most digits an operand may have (>= 1).
        ops: which operators to draw from, a non-empty subset of "+-*".
        min_digits: the fewest digits an operand may have (1..max_digits).

    Returns:
        dict with `prompt`, `answer`, `text`, `numbers` ([a, b]), `target` (the result) and `op`.
    """
    if max_digits < 1:
        raise ValueError(f"max_digits={max_digits}; use max_digits >= 1")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"min_digits={min_digits}; use 1 <= min_digits <= max_digits")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops={ops!r}; use a non-empty subset of '+-*'")
    a, b = _operand(rng, max_digits, min_digits), _operand(rng, max_digits, min_digits)
    op = ops[int(rng.integers(0, len(ops)))]
    result = a + b if op == "+" else a - b if op == "-" else a * b
    prompt = f"{a}{op}{b}="
    return {"prompt": prompt, "answer": str(result), "text": f"{prompt}{result}\n",
            "numbers": [a, b], "target": result, "op": op}


def worked_solution(a: int, op: str, b: int) -> str | None:
    """Column arithmetic for `a op b` written out, ones column first, or None for `*`.

    Each column is one step "digit op digit [carry] = result": `"3+7=10 4+2+1=7"` for 43+27 (the
    carry into a column is written `+1`), `"13-7=6 4-2-1=1"` for 43−27 (a borrowed ten is
    written as the leading 1 of the top digit, the borrow paid back as `-1`). A subtraction with
    a smaller first operand is worked the other way round after `-(b-a)`: 27−43 gives
    `"-(43-27) 13-7=6 4-2-1=1"`. Operands are padded with zeros to a common width. The answer
    reads off the steps: the last digit of each result, from the last column back, the last
    column's whole result first; leading zeros dropped.
    """
    if op not in "+-" or a < 0 or b < 0:
        return None
    prefix = ""
    if op == "-" and a < b:
        prefix, (a, b) = f"-({b}-{a}) ", (b, a)
    width = max(len(str(a)), len(str(b)))
    top, bottom = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]   # ones digit first
    steps, carry = [], 0
    for da, db in zip(map(int, top), map(int, bottom)):
        if op == "+":
            value = da + db + carry
            steps.append(f"{da}+{db}{'+1' if carry else ''}={value}")
            carry = value // 10
        else:
            value = da - db - carry
            borrow = value < 0
            steps.append(f"{'1' if borrow else ''}{da}-{db}{'-1' if carry else ''}="
                         f"{value + 10 if borrow else value}")
            carry = int(borrow)
    return prefix + " ".join(steps)


def estimate(a: int, op: str, b: int) -> int | None:
    """A quick estimate of `a op b` (+ or −): each operand rounded to the nearest ten (halves up),
    then combined: 70 for 43+27 (40+30), 10 for 43−27 (40−30). None for `*`.

    Right only when the roundings cancel (about one problem in ten), so a corpus that mixes
    estimates with exact work holds a habit that a reward for exact answers can unlearn.
    """
    if op not in "+-":
        return None
    ra, rb = ((x + 5) // 10 * 10 for x in (a, b))
    return ra + rb if op == "+" else ra - rb


# --------------------------------------------------------------------------------------------
# Countdown


def _combine(op: str, left: tuple[str, int], right: tuple[str, int]) -> tuple[str, int]:
    """(expression, precedence) of `left op right` with only the parentheses it needs."""
    prec = _OPS[op]
    lhs = f"({left[0]})" if left[1] < prec else left[0]
    rhs = f"({right[0]})" if right[1] < prec or (right[1] == prec and op in "-/") else right[0]
    return f"{lhs}{op}{rhs}", prec


def _apply(op: str, a, b):
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def _random_solution(rng: np.random.Generator, numbers: list[int]) -> tuple[str, int] | None:
    """Combine all numbers in a random order with random operators; None if a step fails.

    Every intermediate value must be a positive integer (classic Countdown rules), so that the
    stored solution is easy to read and to check by hand.
    """
    pool = [(int(n), (str(n), 3)) for n in numbers]
    while len(pool) > 1:
        i, j = (int(k) for k in rng.choice(len(pool), size=2, replace=False))
        (a, ea), (b, eb) = pool[i], pool[j]
        op = "+-*/"[int(rng.integers(0, 4))]
        if op == "-" and a <= b or op == "/" and (b <= 1 or a % b):
            return None
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
        pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, _combine(op, ea, eb))]
    return pool[0][0], pool[0][1][0]


def countdown_problem(rng: np.random.Generator, min_numbers: int = 3, max_numbers: int = 4,
                      max_number: int = 99, max_target: int = 100) -> dict[str, Any]:
    """One solvable Countdown puzzle with a known solution.

    Numbers are drawn uniformly from 1..max_number (repeats allowed). A random expression over all
    of them gives the target; puzzles whose target is out of 1..max_target or equals one of the
    numbers (trivial) are redrawn.

    Args:
        rng: the random generator (advanced in place).
        min_numbers: fewest numbers in a puzzle (>= 2).
        max_numbers: most numbers in a puzzle (>= min_numbers; the solver is brute force, so keep it
            at 6 or fewer).
        max_number: the largest number offered.
        max_target: the largest target.

    Returns:
        dict with `prompt`, `answer` (the solution expression), `text`, `numbers`, `target`.
    """
    if not 2 <= min_numbers <= max_numbers <= 6:
        raise ValueError(f"min_numbers={min_numbers}, max_numbers={max_numbers}; "
                         "use 2 <= min_numbers <= max_numbers <= 6")
    if max_number < 2 or max_target < 1:
        raise ValueError(f"max_number={max_number}, max_target={max_target}; "
                         "use max_number >= 2 and max_target >= 1")
    count = int(rng.integers(min_numbers, max_numbers + 1))
    for _ in range(10_000):
        numbers = [int(n) for n in rng.integers(1, max_number + 1, size=count)]
        for _ in range(20):
            found = _random_solution(rng, numbers)
            if found is None:
                continue
            target, solution = found
            if 1 <= target <= max_target and target not in numbers:
                prompt = f"numbers {' '.join(map(str, numbers))} target {target}"
                return {"prompt": prompt, "answer": solution, "text": f"{prompt}: {solution}\n",
                        "numbers": numbers, "target": target}
    raise ValueError(f"found no Countdown puzzle with targets in 1..{max_target} from numbers in "
                     f"1..{max_number}; raise max_target")


def evaluate_expression(expr: str) -> fractions.Fraction:
    """Exact value of an expression of non-negative integers, + - * / and parentheses.

    A safe replacement for `eval`: the expression is parsed with `ast` and only those nodes are
    allowed (no unary minus, no `**`, no names), and magnitudes above 10^12 are refused.

    Raises:
        ValueError: for anything else, including division by zero.
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expr!r} as an arithmetic expression") from None
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def walk(node) -> fractions.Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
            value = fractions.Fraction(node.value)
        elif isinstance(node, ast.BinOp) and type(node.op) in ops:
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and b == 0:
                raise ValueError(f"division by zero in {expr!r}")
            value = _apply(ops[type(node.op)], a, b)
        else:
            raise ValueError(f"{expr!r} may hold only non-negative integers, + - * / and "
                             f"parentheses; found {ast.dump(node)[:40]}")
        if abs(value) > _MAX_MAGNITUDE:
            raise ValueError(f"{expr!r} has an intermediate value above {_MAX_MAGNITUDE}")
        return value

    return walk(tree.body)


def expression_numbers(expr: str) -> list[int]:
    """The integer literals of an expression, in order of appearance."""
    return [node.value for node in ast.walk(ast.parse(expr.strip(), mode="eval"))
            if isinstance(node, ast.Constant)]


def check_countdown(expr: str, numbers: list[int], target: int, exactly_once: bool = False) -> bool:
    """Whether `expr` reaches `target` using each of `numbers` at most (or exactly) once."""
    try:
        value = evaluate_expression(expr)
        used = sorted(expression_numbers(expr))
    except (ValueError, SyntaxError):
        return False
    pool = sorted(int(n) for n in numbers)
    if exactly_once:
        uses_ok = used == pool
    else:
        remaining = list(pool)
        uses_ok = True
        for n in used:
            if n not in remaining:
                uses_ok = False
                break
            remaining.remove(n)
    return uses_ok and value == target


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """An expression reaching `target` with each number used at most once, or None.

    Brute force over every way of combining pairs (rational intermediates allowed, as in
    `evaluate_expression`): about 10^4 steps for 4 numbers, 10^6 for 5, 10^8 for 6.
    """
    target = fractions.Fraction(target)
    items = [(fractions.Fraction(int(n)), (str(int(n)), 3)) for n in numbers]
    for value, (expr, _) in items:
        if value == target:
            return expr
    seen: set[tuple] = set()

    def search(pool) -> str | None:
        key = tuple(sorted(v for v, _ in pool))
        if key in seen:
            return None
        seen.add(key)
        for i, j in itertools.combinations(range(len(pool)), 2):
            rest = [p for k, p in enumerate(pool) if k not in (i, j)]
            for swapped, ((a, ea), (b, eb)) in enumerate(((pool[i], pool[j]), (pool[j], pool[i]))):
                for op in "+-*/":
                    if swapped and op in "+*":
                        continue                      # commutative: one order is enough
                    if op == "/" and b == 0:
                        continue
                    value = _apply(op, a, b)
                    node = (value, _combine(op, ea, eb))
                    if value == target:
                        return node[1][0]
                    if rest and (found := search(rest + [node])) is not None:
                        return found
        return None

    return search(items)


# --------------------------------------------------------------------------------------------
# Keys and splits


def problem_key(problem: dict[str, Any]) -> str:
    """Canonical identity of a problem: `"85+417"` for 417+85, `"3,7,25,50->81"` for Countdown."""
    if "op" in problem:
        a, b = problem["numbers"]
        if problem["op"] in "+*":
            a, b = sorted((a, b))
        return f"{a}{problem['op']}{b}"
    return f"{','.join(map(str, sorted(problem['numbers'])))}->{problem['target']}"


def split_of(key: str, held_out_fraction: float = 0.1) -> str:
    """`validation`, `test` or `train` from a hash of the key: each of the first two gets
    `held_out_fraction` of the key space, and the same key always goes to the same split."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64
    if h < held_out_fraction:
        return "validation"
    if h < 2 * held_out_fraction:
        return "test"
    return "train"


TASKS: dict[str, Callable[..., dict[str, Any]]] = {
    "arithmetic": arithmetic_problem,
    "countdown": countdown_problem,
}


def generate_splits(task: str, seed: int, counts: dict[str, int], held_out_fraction: float = 0.1,
                    **task_kwargs) -> dict[str, list[dict[str, Any]]]:
    """Distinct problems per split, deterministic from the seed.

    One stream of problems is drawn from `numpy.random.default_rng(seed)`; each goes to the split
    `split_of` names for it, unless that split is full or already holds it. A split's content
    therefore does not depend on the other splits' counts.

    Args:
        task: "arithmetic" or "countdown".
        seed: the seed of the stream.
        counts: examples wanted per split, e.g. {"train": 1000, "validation": 100, "test": 100}.
        held_out_fraction: share of the problem space for each of validation and test (0, 0.5).
        **task_kwargs: difficulty knobs passed to the generator (`max_digits`, `max_numbers`, ...).

    Returns:
        {split: [problem, ...]} with exactly counts[split] problems each.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if set(counts) - set(SPLITS) or any(n < 0 for n in counts.values()):
        raise ValueError(f"counts={counts}; use non-negative counts for {', '.join(SPLITS)}")
    if not 0.0 < held_out_fraction < 0.5:
        raise ValueError(f"held_out_fraction={held_out_fraction}; use a value in (0, 0.5)")
    make = TASKS[task]
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {s: [] for s in counts}
    keys: dict[str, set] = {s: set() for s in counts}
    patience = int(2_000 / held_out_fraction)     # draws without a new problem before giving up
    stale = 0
    while any(len(out[s]) < counts[s] for s in counts):
        if stale > patience:
            short = {s: f"{len(out[s])}/{counts[s]}" for s in counts}
            raise ValueError(f"only found {short} distinct {task} problems with {task_kwargs}; "
                             "lower the counts or make the task harder (more digits or numbers)")
        stale += 1
        problem = make(rng, **task_kwargs)
        key = problem_key(problem)
        split = split_of(key, held_out_fraction)
        if split in out and len(out[split]) < counts[split] and key not in keys[split]:
            out[split].append(problem)
            keys[split].add(key)
            stale = 0
    return out
