"""Seeing a run (train/metrics.py, train/run.py): the progress line's elapsed time and ETA,
`train.profile_steps` traces, and the optional Weights & Biases writer."""

import glob
import gzip
import io
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from deepseek_jax.train.metrics import Clock, MetricsWriter, duration, progress_line
from deepseek_jax.train.run import Run, parse_profile_steps


def _train(steps=6, **extra):
    t = ml_collections.ConfigDict()
    t.steps, t.checkpoint_every, t.keep_checkpoints = steps, 100, 1
    t.update(extra)
    return t


def test_duration_and_progress_line():
    assert duration(0) == "0:00:00"
    assert duration(59.6) == "0:01:00"
    assert duration(3 * 3600 + 7 * 60 + 5) == "3:07:05"
    assert duration(31 * 3600) == "31:00:00"
    # 4 of 10 steps, 120 s in, 30 s a step: 6 steps left → 180 s.
    assert progress_line(4, 10, 120.0, 30.0) == ("[########............] 4/10 0:02:00 "
                                                 "elapsed, ETA 0:03:00")
    assert progress_line(0, 10, 5.0).endswith("0:00:05 elapsed, ETA ?")
    assert progress_line(10, 10, 5.0, 2.0).endswith("ETA 0:00:00")


def test_the_clock_paces_from_its_first_line():
    clock = Clock()
    t0 = clock.start
    # Step 10 is first shown 100 s in (start-up and compile): no pace yet.
    assert clock.line(10, 100, now=t0 + 100).endswith("0:01:40 elapsed, ETA ?")
    # 20 steps in the next 40 s: 2 s a step, 70 steps left → 140 s.
    assert clock.line(30, 100, now=t0 + 140).endswith("0:02:20 elapsed, ETA 0:02:20")


def test_the_writer_prints_the_progress_line(tmp_path):
    console = io.StringIO()
    writer = MetricsWriter(str(tmp_path), total_steps=10, console=console)
    writer.write(5, {"loss": 1.5})
    writer.close()
    assert re.fullmatch(r"\[#{10}\.{10}\] 5/10 0:00:\d\d elapsed, ETA \? loss 1.5\n",
                        console.getvalue())


@pytest.mark.parametrize("spec, window", [("", None), ("5,8", (5, 8)), (" 3 ", (0, 3)),
                                          ("2,2", (2, 2))])
def test_profile_steps_parse(spec, window):
    assert parse_profile_steps(spec) == window


@pytest.mark.parametrize("spec", ["8,5", "0", "0,3", "1,2,3", "a,b", "-2"])
def test_bad_profile_steps_say_what_to_write(spec, tmp_path):
    with pytest.raises(ValueError, match=r"train.profile_steps=.*use \"A,B\""):
        Run(str(tmp_path), _train(profile_steps=spec))


def _loop(run, start, steps):
    """A stand-in training loop: one jitted update per step, the hook at the top of each."""
    update = jax.jit(lambda w: jnp.tanh(w @ w))
    state = jnp.eye(64) * 0.5
    for step in range(start, steps):
        run.profile(step + 1, state)
        state = update(state)
    return state


@pytest.mark.parametrize("spec", ["2,3", "2", "5,6"])
def test_profile_steps_write_a_trace(tmp_path, spec):
    """A window inside the run, a count, and a window reaching the last step (stopped when the
    run closes) each leave one XPlane trace and one Perfetto trace under WORKDIR/profile."""
    with Run(str(tmp_path), _train(profile_steps=spec)) as run:
        _loop(run, 0, 6)
        assert run.profile.done == (spec != "5,6")
    assert not run.profile.active
    xplane = glob.glob(str(tmp_path / "profile/plugins/profile/*/*.xplane.pb"))
    perfetto = glob.glob(str(tmp_path / "profile/plugins/profile/*/perfetto_trace.json.gz"))
    assert len(xplane) == 1 and os.path.getsize(xplane[0]) > 0
    assert len(perfetto) == 1
    with gzip.open(perfetto[0]) as f:
        assert json.load(f)["traceEvents"]


def test_no_profile_without_profile_steps_and_a_resume_inside_the_window(tmp_path):
    with Run(str(tmp_path / "none"), _train()) as run:
        _loop(run, 0, 3)
    assert not os.path.exists(tmp_path / "none" / "profile")
    with Run(str(tmp_path / "resumed"), _train(profile_steps="2,4")) as run:
        _loop(run, 2, 6)                          # resumed at step 2: traces steps 3 and 4
        assert run.profile.done
    assert glob.glob(str(tmp_path / "resumed/profile/plugins/profile/*/*.xplane.pb"))


def test_wandb_asked_for_but_absent_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)           # `import wandb` fails
    with pytest.raises(ImportError, match=r"train.wandb_project='demo' needs the `wandb` "
                                          r"package: pip install wandb"):
        with Run(str(tmp_path), _train(wandb_project="demo")):
            pass


def test_wandb_absent_and_not_asked_for_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with Run(str(tmp_path), _train(wandb_project="")) as run:
        run.writer.write(1, {"loss": 2.0})
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "goodput.json", "metrics.jsonl",
                                            "tensorboard"]


def test_wandb_offline_logs_the_metrics(tmp_path, monkeypatch):
    """Runs only where `wandb` is installed (it is not a dependency, so CI skips this)."""
    pytest.importorskip("wandb", reason="wandb is not installed (optional; not in CI)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for loss in (2.0, 3.0):                                    # a rerun resumes the same W&B run
        with Run(str(tmp_path), _train(wandb_project="demo")) as run:
            run.writer.write(1, {"loss_" + str(int(loss)): loss})
        ids.append((tmp_path / "wandb_run_id").read_text())
    assert ids[0] == ids[1]
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert runs and all(r.endswith("-" + ids[0]) for r in runs)
    logged = b"".join(open(f, "rb").read() for r in runs for f in glob.glob(f"{r}/*.wandb"))
    assert b"loss_2" in logged and b"loss_3" in logged
