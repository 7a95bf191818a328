"""The math evaluation command (experiments/evaluate.py) on a tiny saved run: the report it
writes, that it scores the checkpoint it was pointed at, and bad input."""

import io
import json
import os
import subprocess
import sys

import jax
import optax
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.rl import evaluate as ev
from deepseek_jax.rl import math_answers
from deepseek_jax.rl.math_problems import ProblemFileError, read_problems
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train.step import init_train_state, model_variables
from experiments.evaluate import evaluate_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MATH = os.path.join(ROOT, "tests", "rl", "fixtures", "math_sample.jsonl")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A saved run of the tiny model (random weights), long enough for the fixtures' prompts."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = get_config("tiny", vocab_size=320, max_seq_len=160)
    state = init_train_state(jax.random.key(3), config, optax.sgd(0.1))
    ckpt.save_model_config(workdir, config)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), save_every=1, keep=1,
                                async_save=False)
    ckpt.save(manager, 1, state, jax.random.key(0), {}, force=True)
    manager.close()
    return workdir, config, model_variables(state.params, state.routing)


def test_report_of_a_saved_run(run):
    workdir, config, variables = run
    console = io.StringIO()
    report = evaluate_run(workdir, MATH, k=2, num_samples=3, max_new_tokens=8,
                          template="compact", console=console)
    path = os.path.join(workdir, "eval", "math_sample.json")
    assert json.load(open(path)) == json.loads(json.dumps(report))
    problems = read_problems(MATH)
    assert [p["reference"] for p in report["problems"]] == [p["reference"] for p in problems]
    # The greedy completions are the saved weights' (the command read the checkpoint it was
    # given), and each score follows from its text.
    greedy = ev.complete(variables, config, problems, "compact", max_new_tokens=8, batch_size=8)
    for p, problem, g in zip(report["problems"], problems, greedy):
        assert p["greedy"] == g[0]
        assert p["greedy"]["accuracy"] == ev.score_text(g[0]["text"], problem,
                                                        "compact")["accuracy"]
        assert p["sampled"]["n"] == len(p["sampled"]["answers"]) == 3
    s = report["summary"]
    correct = [p["sampled"]["correct"] for p in report["problems"]]
    assert s["pass@2"] == pytest.approx(
        sum(math_answers.pass_at_k(3, c, 2) for c in correct) / len(correct), abs=1e-15)
    assert s["problems"] == 4 and s["samples_per_problem"] == 3
    assert report["settings"]["temperature"] == 0.6
    out = console.getvalue()
    assert "greedy [####################] 4/4 0:00:" in out and "ETA ?" in out
    assert "3 samples [####################] 12/12" in out and f"report: {path}" in out


def test_greedy_only_and_an_explicit_report_path(run, tmp_path):
    workdir = run[0]
    report = evaluate_run(workdir, MATH, k=0, max_new_tokens=4, limit=2, template="compact",
                          out=str(tmp_path / "r.json"), console=io.StringIO())
    assert "pass@0" not in report["summary"] and "sampled" not in report["problems"][0]
    assert len(report["problems"]) == 2 and os.path.exists(tmp_path / "r.json")


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
