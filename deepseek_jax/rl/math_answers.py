"""Math answers: a completion's final answer, a reference solution's, whether two agree, pass@k.

  extract_answer(text)      the text of the LAST <answer>…</answer> block, or of the last
                            \\boxed{…} inside it when it has one; with no answer block, the last
                            \\boxed{…} of the whole text; else None. At most MAX_ANSWER_CHARS
                            characters (a longer one is None: it costs the parser time, and no
                            reference answer is that long)
  last_boxed(text)          the content of the last \\boxed{…} (or \\fbox{…}), braces matched, so
                            nested braces stay: "\\boxed{\\frac{1}{2}}" → "\\frac{1}{2}"
  gsm8k_final(solution)     the number after GSM8K's "#### " marker, thousands commas dropped
  is_equivalent(got, ref)   the two answers mean the same thing, as HF's `math-verify` decides:
                            both are parsed as LaTeX (wrapped in $…$ unless they hold an
                            unescaped $) or as plain expressions into sympy and compared
                            numerically and symbolically: "1,000" = "1000", "0.5" = "1/2" = "\\frac{1}{2}",
                            "2\\sqrt{2}" = "\\sqrt{8}", "50\\%" = "0.5". Numbers agree when equal
                            after rounding to 6 decimals (math-verify's default). When neither
                            side parses, the strings are compared with whitespace removed.
  math_reward(text, ref)    1.0 when the completion's extracted answer is equivalent to `ref`,
                            else 0.0 (the accuracy reward of math problems, rl/rewards.py)
  pass_at_k(n, c, k)        the unbiased estimator 1 − C(n−c, k)/C(n, k) of the chance that at
                            least one of k samples is right, from n ≥ k samples of which c are
                            right (Chen et al. 2021, "Evaluating Large Language Models Trained on
                            Code", §2.1), as a product so that large n does not overflow

math-verify bounds each parse and comparison with a 5 s SIGALRM timeout, which only the main
thread can set; elsewhere the calls run without one. It is imported on first use, so the task
rewards (rl/rewards.py) and GRPO on the procedural tasks do not need it.

Left out: answer-format rules beyond math-verify's (multiple-choice letters, units in words).
"""

from __future__ import annotations

import functools
import re
import threading

MAX_ANSWER_CHARS = 1000
TIMEOUT_S = 5

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DOLLAR = re.compile(r"(?<!\\)\$")          # a math delimiter, not an escaped \$
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{…}/\\fbox{…} whose braces close, else None."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The completion's final answer (module docstring), or None."""
    blocks = _ANSWER.findall(text)
    if blocks:
        answer = last_boxed(blocks[-1])
        answer = blocks[-1].strip() if answer is None else answer
    else:
        answer = last_boxed(text)
    if answer is None or not answer or len(answer) > MAX_ANSWER_CHARS:
        return None
    return answer


def gsm8k_final(solution: str) -> str | None:
    """"… #### 1,234" → "1234"; None without the marker."""
    m = _GSM8K.search(solution)
    return None if m is None else m.group(1).replace(",", "").strip()


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _verifier():
    try:
        import math_verify
    except ImportError:
        raise ImportError("checking math answers needs the `math-verify` package: "
                          "pip install math-verify") from None
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> tuple:
    """math-verify's parses of `text`: as LaTeX in $…$ first, then as it stands."""
    mv = _verifier()
    tries = [text] if _DOLLAR.search(text) else [f"${text}$", text]
    for t in tries:
        parsed = mv.parse(t, parsing_timeout=_timeout())
        if parsed:
            return tuple(parsed)
    return ()


def is_equivalent(got: str, reference: str) -> bool:
    """Whether answer `got` means `reference` (module docstring)."""
    gold, pred = _parse(reference), _parse(got)
    if gold and pred:
        return bool(_verifier().verify(list(gold), list(pred), timeout_seconds=_timeout()))
    return "".join(got.split()) == "".join(reference.split())


def math_reward(completion: str, reference: str) -> float:
    answer = extract_answer(completion)
    return float(answer is not None and is_equivalent(answer, reference))


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k)/C(n, k) = 1 − Π_{i=n−c+1..n} (1 − k/i), for 0 ≤ c ≤ n and 1 ≤ k ≤ n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss
