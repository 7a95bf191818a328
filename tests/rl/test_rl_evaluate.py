"""Evaluation (rl/evaluate.py): task problems score exactly as GRPO's rewards score them, the
held-out evaluation returns what it returned before it was built on `complete`, sampled rows do
not depend on the batch they fall in, and the pass@k summary."""

import jax
import numpy as np
import pytest

from deepseek_jax import parallel
from deepseek_jax.config import get_config
from deepseek_jax.data import tasks
from deepseek_jax.model import init_variables
from deepseek_jax.rl import evaluate as ev
from deepseek_jax.rl import rewards, rollout
from deepseek_jax.sampling import generate

AR = {"prompt": "43+27=", "answer": "70", "numbers": [43, 27], "op": "+", "text": "43+27=70"}
CD = {"numbers": [3, 5, 7], "target": 22}


@pytest.fixture(scope="module")
def model():
    config = get_config("tiny", vocab_size=320)
    return config, init_variables(jax.random.key(0), config)


@pytest.mark.parametrize("answer", ["70", " 70 ", "70.0", "+70", "7e1", "070", "1,000", "69",
                                    "", r"\boxed{70}", "70 apples"])
@pytest.mark.parametrize("template", ["compact", "r1_zero"])
def test_task_problems_score_as_the_task_rewards(answer, template):
    """Numbers math-verify would accept ("70.0", "7e1") stay wrong on the arithmetic task: the
    accuracy reward (evaluation's and GRPO's) is still the task's exact check."""
    opening = "" if template == "compact" else " <think>"
    for body in (f"{opening} 43+27=70 </think> <answer>{answer}</answer>", f"<answer>{answer}"):
        got = ev.score_text(body, AR, template)
        assert got["accuracy"] == rewards.arithmetic_reward(body, "70")
        assert got["format"] == rewards.format_reward(body, template)
        assert got["answer"] == rewards.extract_answer(body)
    cd = f"{opening} x </think> <answer>3*5+7</answer>"
    assert ev.score_text(cd, CD, template)["accuracy"] == rewards.countdown_reward(
        cd, [3, 5, 7], 22) == 1


def test_the_accuracy_reward_checks_math_problems():
    problem = {"question": "Half of one?", "reference": r"\frac{1}{2}"}
    assert rewards.accuracy_reward("<answer>0.5</answer>", problem) == 1.0
    assert rewards.accuracy_reward(r"so \boxed{1/2}", problem) == 1.0
    assert rewards.accuracy_reward("<answer>0.6</answer>", problem) == 0.0
    assert rewards.score(" <think> x </think> <answer>0.5</answer>", problem) == {
        "accuracy": 1.0, "format": 1.0, "total": 2.0}


def _evaluate_before(variables, config, problems, template, *, max_new_tokens, batch_size,
                     show, mesh, rules):
    """Held-out evaluation as written before `complete` existed (generate, then the GRPO
    rollout scoring), kept here as the reference."""
    acc, fmt, lengths, texts = [], [], [], []
    for start in range(0, len(problems), batch_size):
        chunk = list(problems[start: start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)
        out = generate(variables, config, rollout.encode_prompts(chunk, template),
                       max_new_tokens=max_new_tokens, temperature=0.0,
                       eos_id=rollout.BYTES.eos_id, mesh=mesh, rules=rules)
        tokens, out_lengths = parallel.to_host(out.tokens), parallel.to_host(out.lengths)
        scores = rollout.score_completions(rollout.completion_ids(tokens, out_lengths), chunk,
                                           format_weight=0.0, template=template)
        acc += list(scores["accuracy"][:n])
        fmt += list(scores["format"][:n])
        lengths += list(out_lengths[:n])
        texts += scores["texts"][:n]
    return {"accuracy": float(np.mean(acc)), "format": float(np.mean(fmt)),
            "length": float(np.mean(lengths)), "samples": texts[:show], "completions": texts}


def test_held_out_evaluation_returns_what_it_did_before(model):
    config, variables = model
    rng = np.random.default_rng(0)
    problems = [tasks.arithmetic_problem(rng, 2, "+-", 2) for _ in range(11)]   # 2 batches
    mesh, rules = parallel.mesh_and_rules("dp")
    kw = dict(max_new_tokens=12, batch_size=8, show=2, mesh=mesh, rules=rules)
    assert ev.evaluate(variables, config, problems, "compact", **kw) == _evaluate_before(
        variables, config, problems, "compact", **kw)


def test_samples_do_not_depend_on_the_batch(model):
    config, variables = model
    problems = [{"question": q, "reference": "1"} for q in ("1-0?", "2-1?", "3/3?")]
    runs = [ev.complete(variables, config, problems, "compact", max_new_tokens=6,
                        batch_size=b, samples=3, temperature=1.0, rng=jax.random.key(1))
            for b in (4, 9)]
    texts = [[[s["text"] for s in row] for row in run] for run in runs]
    assert texts[0] == texts[1]
    assert len({t for row in texts[0] for t in row}) > 1          # samples, not one greedy text
    assert all(s["length"] <= 6 for row in runs[0] for s in row)


def test_summary_hand_computed():
    row = lambda *acc: [{"accuracy": a, "format": 1.0, "length": 4} for a in acc]
    greedy = [row(1.0), row(0.0)]
    sampled = [row(1.0, 0.0, 0.0, 1.0), row(0.0, 0.0, 0.0, 0.0)]
    s = ev.summarize(greedy, sampled, k=2)
    # problem 1: c = 2 of n = 4 → 1 − C(2,2)/C(4,2) = 1 − 1/6; problem 2: 0.
    assert s == {"problems": 2, "greedy_accuracy": 0.5, "greedy_format": 1.0, "mean_length": 4.0,
                 "pass@2": pytest.approx((1 - 1 / 6) / 2, abs=1e-15),
                 "sample_accuracy": 0.25, "samples_per_problem": 4}
    assert "pass@2" not in ev.summarize(greedy, [], k=2)



def test_prefilled_text_is_read_as_part_of_the_prompt(model):
    config, variables = model
    rng = np.random.default_rng(1)
    problems = [tasks.arithmetic_problem(rng, 2, "+-", 2) for _ in range(3)]
    prefill = lambda p: f" <think> {p['prompt']}"          # "… <think> 43+27="
    got = ev.complete(variables, config, problems, "compact", max_new_tokens=5, batch_size=4,
                      prefill=prefill)
    # The reference: the same prompts written out whole and generated in one batch; greedy
    # decoding of the same ids gives the same tokens.
    ids = [rollout.BYTES.encode_prompt(ev.prompt_text(p, "compact") + prefill(p))
           for p in problems]
    out = generate(variables, config, ids + [ids[-1]], max_new_tokens=5,
                   eos_id=rollout.BYTES.eos_id)
    want = [rollout.BYTES.decode(c) for c in rollout.completion_ids(
        parallel.to_host(out.tokens), parallel.to_host(out.lengths))][:3]
    assert [row[0]["text"] for row in got] == want
