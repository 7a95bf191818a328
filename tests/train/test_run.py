"""The run scaffolding both trainers share (train/run.py): the mesh from a run config, when
checkpoints are due, SIGTERM, resuming and closing."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from deepseek_jax.configs.pretrain import get_config
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train.run import Run, run_mesh


def _train(steps=10, every=4):
    t = ml_collections.ConfigDict()
    t.steps, t.checkpoint_every, t.keep_checkpoints = steps, every, 2
    return t


def test_run_mesh_takes_the_first_devices_or_all():
    mesh_config = get_config("tiny").mesh
    mesh, rules = run_mesh(mesh_config)
    assert mesh.devices.size == jax.device_count() == 8
    mesh, _ = run_mesh(mesh_config, num_devices=2)
    assert mesh.devices.size == 2 and rules
    with pytest.raises(ValueError, match="num_devices=16"):
        run_mesh(mesh_config, num_devices=16)


def test_checkpoints_are_due_every_n_steps_at_the_end_and_when_stopping(tmp_path):
    with Run(str(tmp_path), _train(steps=10, every=4)) as run:
        due = [d for d in range(1, 11) if run.checkpoint_due(d)]
        assert due == [4, 8, 10]
        assert run.checkpoint_due(3, stopping=True)


def test_sigterm_sets_stopping_and_the_old_handler_comes_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Run(str(tmp_path), _train()) as run:
        assert not run.stopping(1)
        os.kill(os.getpid(), signal.SIGTERM)     # the handler only records it
        assert run.stopping(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_resuming_drops_metrics_past_the_checkpoint_and_a_save_survives_the_exit(tmp_path,
                                                                                 capsys):
    workdir = str(tmp_path)
    state = {"w": jnp.arange(3.0)}
    with Run(workdir, _train(), unit="GRPO step") as run:
        for step in (1, 2, 3):
            run.writer.write(step, {"loss": float(step)})
        ckpt.save(run.manager, 2, state, jax.random.key(0), {"step": 2}, force=True)
    with Run(workdir, _train(), unit="GRPO step") as run:
        assert run.manager.latest_step() == 2      # written before the first Run closed
        run.resumed(2)
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [1, 2]
    assert "resumed from GRPO step 2" in capsys.readouterr().out
