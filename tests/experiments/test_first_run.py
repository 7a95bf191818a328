"""A new user's first run: `make demo` exactly as the README gives it (relative DEMO_DIR, from the
repository root) through a checkpoint and a resume, and the trainers with relative paths and a
workdir that cannot hold the run."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from deepseek_jax.configs import grpo as grpo_configs
from deepseek_jax.configs import pretrain as pretrain_configs
from deepseek_jax.train.workdir import WorkdirError
from deepseek_jax.trainers import grpo, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def relative_pretrain(tmp_path_factory):
    """A tiny pretraining run given the relative workdir "runs/pre" (checkpoints at 2 and 4)."""
    base = tmp_path_factory.mktemp("relative")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        config = pretrain_configs.get_config("tiny")
        config.train.update(steps=4, checkpoint_every=2, eval_every=0, log_every=1)
        pretrain.train_and_evaluate(config, "runs/pre")
    finally:
        os.chdir(cwd)
    return base


def test_pretrain_with_a_relative_workdir(relative_pretrain):
    run = relative_pretrain / "runs" / "pre"
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
    assert _steps(run / "metrics.jsonl") == [1, 2, 3, 4]


def test_grpo_with_relative_workdir_and_pretrain_dir(relative_pretrain, monkeypatch):
    monkeypatch.chdir(relative_pretrain)
    config = grpo_configs.get_config("tiny")
    config.init.pretrain_dir = "runs/pre"
    config.train.update(steps=2, checkpoint_every=1)
    grpo.train_and_evaluate(config, "runs/grpo")
    mu = config.rl.num_iterations         # GRPO's checkpoints count optimizer steps
    assert sorted(os.listdir(relative_pretrain / "runs" / "grpo" / "checkpoints"),
                  key=int) == [str(mu), str(2 * mu)]


def test_grpo_into_its_own_pretrain_dir_is_refused(relative_pretrain, monkeypatch):
    monkeypatch.chdir(relative_pretrain)
    config = grpo_configs.get_config("tiny")
    config.init.pretrain_dir = "runs/pre"
    with pytest.raises(ValueError, match="another --workdir"):
        grpo.train_and_evaluate(config, str(relative_pretrain / "runs" / "pre"))


def test_workdir_of_another_model_fails_before_the_first_step(relative_pretrain, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(relative_pretrain / "runs" / "pre", run)
    config = pretrain_configs.get_config("tiny")
    config.model.d_model = 2 * config.model.d_model
    config.train.steps = 6
    with pytest.raises(WorkdirError, match="another model .*d_model"):
        pretrain.train_and_evaluate(config, str(run))
    assert _steps(run / "metrics.jsonl") == [1, 2, 3, 4]      # nothing ran, nothing written


# --- make demo ------------------------------------------------------------------------------------

# A few steps per stage of the real demo (the `small` model), checkpointing every step or two.
_QUICK = ["--pretrain.data.num_train=400", "--pretrain.train.log_every=1",
          "--pretrain.train.eval_every=2", "--pretrain.train.eval_batches=1",
          "--pretrain.train.checkpoint_every=2",
          "--grpo.data.num_train=400", "--grpo.rl.prompts_per_step=2", "--grpo.rl.group_size=2",
          "--grpo.rl.max_new_tokens=12", "--grpo.train.eval_problems=4",
          "--grpo.train.log_every=1", "--grpo.train.checkpoint_every=1"]


def _make_demo(demo_dir: str, pretrain_steps: int, grpo_steps: int) -> str:
    args = _QUICK + [f"--pretrain.train.steps={pretrain_steps}",
                     f"--grpo.train.steps={grpo_steps}"]
    # -o: never rebuild the environment from the test; PY: this interpreter (the one with the
    # package installed), whether or not it lives in .venv.
    cmd = ["make", "--no-print-directory", "-o", ".venv/.installed", "demo",
           f"PY={sys.executable}", f"DEMO_DIR={demo_dir}", f"DEMO_ARGS={' '.join(args)}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, f"make demo failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_with_a_relative_demo_dir_checkpoints_and_resumes(tmp_path):
    demo_dir = os.path.relpath(tmp_path / "demo", ROOT)     # relative to the repository root
    assert not os.path.isabs(demo_dir)

    first = _make_demo(demo_dir, pretrain_steps=2, grpo_steps=1)
    assert "held-out accuracy" in first
    run = tmp_path / "demo"
    assert os.listdir(run / "pretrain" / "checkpoints") == ["2"]
    assert os.listdir(run / "grpo" / "checkpoints") == ["1"]

    second = _make_demo(demo_dir, pretrain_steps=4, grpo_steps=2)
    assert "resumed from step 2" in second and "resumed from GRPO step 1" in second
    assert sorted(os.listdir(run / "pretrain" / "checkpoints")) == ["2", "4"]
    assert sorted(os.listdir(run / "grpo" / "checkpoints")) == ["1", "2"]
    assert _steps(run / "pretrain" / "metrics.jsonl")[-1] == 4
    assert "held-out accuracy" in second
