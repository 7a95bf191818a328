"""The math evaluation command (experiments/evaluate.py) on a tiny saved run taught two answers:
the report it writes, that it scores the checkpoint it was pointed at, right and wrong, and bad
input."""

import functools
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.rl import evaluate as ev
from deepseek_jax.rl import math_answers
from deepseek_jax.rl.rollout import BYTES
from deepseek_jax.rl.math_problems import ProblemFileError, read_problems
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train.step import init_train_state, model_variables, train_step
from experiments.evaluate import evaluate_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MATH = os.path.join(ROOT, "tests", "rl", "fixtures", "math_sample.jsonl")


# What the fixture run is taught to answer to the first two MATH fixture problems: the first
# right in another form than the reference (\frac{1}{2}), the second wrong (2\sqrt{2}).
TAUGHT = [" half </think> <answer>0.5</answer>", " root </think> <answer>3</answer>"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A saved run of a one-layer model that has memorized TAUGHT after the compact prompts of
    the first two MATH fixture problems (200 Adam steps on those two rows: loss ≈ 0.03 a token,
    so greedy decoding writes them back)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = get_config("tiny", vocab_size=320, max_seq_len=160, n_layers=1, n_dense_layers=1,
                        mtp_depth=0)
    problems = read_problems(MATH, limit=2)
    rows = [BYTES.encode_prompt(ev.prompt_text(p, "compact")) + list(BYTES(a))
            for p, a in zip(problems, TAUGHT)]
    tokens = np.zeros((2, max(map(len, rows))), np.int32)
    valid = np.zeros(tokens.shape, np.float32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], valid[i, : len(r)] = r, 1
    tx = optax.adam(3e-3)
    state = init_train_state(jax.random.key(0), config, tx)
    step = jax.jit(functools.partial(train_step, config=config, tx=tx))
    for _ in range(200):
        state, _ = step(state, {"tokens": tokens, "valid": valid})
    ckpt.save_model_config(workdir, config)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), save_every=1, keep=1,
                                async_save=False)
    ckpt.save(manager, 200, state, jax.random.key(0), {}, force=True)
    manager.close()
    return workdir, config, model_variables(state.params, state.routing)


def test_report_of_a_saved_run(run):
    workdir, config, variables = run
    console = io.StringIO()
    report = evaluate_run(workdir, MATH, k=2, num_samples=3, max_new_tokens=40, limit=2,
                          template="compact", console=console)
    path = os.path.join(workdir, "eval", "math_sample.json")
    assert json.load(open(path)) == json.loads(json.dumps(report))
    problems = read_problems(MATH, limit=2)
    # The checkpoint's greedy completions are what it was taught, scored right ("0.5" is
    # \frac{1}{2}) and wrong ("3" is not 2\sqrt{2}), both well-formed.
    assert [p["greedy"]["text"] for p in report["problems"]] == TAUGHT
    assert [(p["greedy"]["answer"], p["greedy"]["accuracy"], p["greedy"]["format"])
            for p in report["problems"]] == [("0.5", 1.0, 1.0), ("3", 0.0, 1.0)]
    assert [p["reference"] for p in report["problems"]] == [r"\frac{1}{2}", r"2\sqrt{2}"]
    # The same as the in-memory weights give (the command read the checkpoint it was given).
    greedy = ev.complete(variables, config, problems, "compact", max_new_tokens=40,
                         batch_size=8)
    assert [p["greedy"] for p in report["problems"]] == [g[0] for g in greedy]
    s = report["summary"]
    assert (s["problems"], s["greedy_accuracy"], s["greedy_format"]) == (2, 0.5, 1.0)
    # The sampled scores follow from the sampled answers, and pass@k from the counts.
    for p, problem in zip(report["problems"], problems):
        right = [a is not None and math_answers.is_equivalent(a, problem["reference"])
                 for a in p["sampled"]["answers"]]
        assert p["sampled"]["correct"] == sum(right) and p["sampled"]["n"] == 3
    correct = [p["sampled"]["correct"] for p in report["problems"]]
    assert s["pass@2"] == pytest.approx(
        sum(math_answers.pass_at_k(3, c, 2) for c in correct) / 2, abs=1e-15)
    assert s["samples_per_problem"] == 3 and report["settings"]["temperature"] == 0.6
    out = console.getvalue()
    assert "greedy [####################] 2/2 0:00:" in out and "ETA ?" in out
    assert "3 samples [####################] 6/6" in out and f"report: {path}" in out


def test_greedy_only_and_an_explicit_report_path(run, tmp_path):
    report = evaluate_run(run[0], MATH, k=0, max_new_tokens=40, limit=2, template="compact",
                          out=str(tmp_path / "r.json"), console=io.StringIO())
    assert "pass@0" not in report["summary"] and "sampled" not in report["problems"][0]
    assert report["summary"]["greedy_accuracy"] == 0.5
    assert json.load(open(tmp_path / "r.json"))["summary"] == report["summary"]


def test_a_prompt_too_long_for_the_model_is_named_before_generating(run):
    # The longest compact prompt is line 4's: BOS + 47 bytes.
    with pytest.raises(ValueError, match=r"problem line 4: its prompt \(48 tokens\) plus "
                                         r"--max_new_tokens=150 exceeds the model's max_seq_len "
                                         r"160"):
        evaluate_run(run[0], MATH, max_new_tokens=150, template="compact", console=io.StringIO())


def test_bad_flags_and_problem_files_fail_before_the_run_is_read(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    absent = str(tmp_path / "no_run")
    with pytest.raises(ProblemFileError, match=r"bad.jsonl:2: missing fields"):
        evaluate_run(absent, str(bad))
    with pytest.raises(ValueError, match=r"--num_samples=2 must be at least --k=4"):
        evaluate_run(absent, MATH, k=4, num_samples=2)
    with pytest.raises(ValueError, match=r"--temperature=0.0: pass@k needs sampling"):
        evaluate_run(absent, MATH, temperature=0.0)
    with pytest.raises(ValueError, match="unknown template"):
        evaluate_run(absent, MATH, template="chatml")


def test_command_line_names_the_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x?"}\n')
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--run={tmp_path}",
                           f"--problems={bad}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert f"{bad}:1: missing fields" in proc.stderr and "MATH-style" in proc.stderr
