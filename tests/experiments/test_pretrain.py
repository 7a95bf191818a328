"""The pretraining entrypoint end to end on the tiny config: metrics, resume, a real kill -9,
SIGTERM, a resharded restore, non-finite loss and bad configs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deepseek_jax.configs.pretrain import get_config
from deepseek_jax.train import goodput
from deepseek_jax.train.run import EXIT_PREEMPTED
from deepseek_jax.trainers import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "pretrain.py")


def _tiny(**train):
    c = get_config("tiny")
    c.train.update(train)
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process run of 12 steps (the baseline for the resume tests)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    pretrain.train_and_evaluate(_tiny(steps=12, checkpoint_every=4, eval_every=6), workdir)
    return workdir, _losses(workdir)


def test_run_writes_metrics_checkpoints_and_events(reference):
    workdir, losses = reference
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1]
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train_row = next(r for r in rows if "loss" in r)
    for key in ("lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr", "tokens_per_s",
                "load_imbalance", "bias_spread"):
        assert key in train_row, key
    assert any("eval_loss" in r for r in rows)
    steps = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
    assert max(steps) == 12 and len(steps) <= 3
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    # Where the time went (`train.goodput`): the run's segment ran steps 1..12 (a rerun of the
    # finished run, another test here, adds a segment after it), its parts add up to its wall
    # time (to fp64 rounding of a few sums of seconds), and the step compile counts as compile.
    first = _goodput(workdir)["segments"][0]
    assert (first["first_step"], first["last_step"], first["resumed_from"]) == (1, 12, None)
    parts = sum(first[f"{p}_s"] for p in goodput.PARTS)
    assert parts == pytest.approx(first["wall_s"], rel=1e-9)
    assert first["compile_s"] > 0 and first["steps_s"] > 0 and first["checkpoint_s"] > 0


def test_rerun_of_finished_run_resumes_and_does_nothing(reference):
    workdir, losses = reference
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    pretrain.train_and_evaluate(_tiny(steps=12, checkpoint_every=4, eval_every=6), workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


def test_held_out_accuracy_at_every_checkpoint(reference):
    """`held_out_accuracy.py --every_checkpoint`, run as its docstring gives it (relative run and
    data paths, from the directory that holds the run): one row per checkpoint the run kept, in
    step order, each with accuracies that are shares of problems."""
    workdir, _ = reference
    parent, run = os.path.split(workdir)
    script = os.path.join(ROOT, "experiments", "benchmarks", "held_out_accuracy.py")
    out = subprocess.run(
        [sys.executable, script, "--config=tiny", f"--data_dir={run}/data",
         "--num_problems=4", "--batch_size=4", "--work_it_out", "--every_checkpoint", run],
        cwd=parent, env={**os.environ, "XLA_FLAGS": "", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"},
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kept = sorted(ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps())
    assert [r["step"] for r in rows] == kept and len(kept) >= 2
    for r in rows:
        assert r["run"] == run
        assert all(k * 4 == int(k * 4) and 0 <= k <= 1
                   for k in (r["accuracy"], r["work_it_out"], r["estimating"])), r


def _goodput(workdir):
    with open(os.path.join(workdir, "goodput.json")) as f:
        return json.load(f)


def _launch(workdir, *overrides, env_extra=None):
    # Like the in-process tests (conftest): XLA's slow optimizations off, so subprocess and
    # in-process runs compile the same programs; the compile cache conftest names is shared.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "experiments.pretrain", f"--config={CONFIG}:tiny",
           f"--workdir={workdir}", "--config.train.steps=12", "--config.train.checkpoint_every=4",
           "--config.train.eval_every=6", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _logged(workdir, step):
    return os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(
        _losses(workdir) or [0]) >= step


def _checkpointed(workdir, step):
    """Orbax renames a checkpoint's temporary folder to its step number once it is complete."""
    return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def _wait_for(event, proc, timeout=240):
    """Polls every 10 ms for something the run writes, so the signal lands with at least the
    run's remaining steps to spare (here ≥ 8 steps, ~0.3 s each, plus two saves and an eval)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if event():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the event:\n{proc.stdout.read()}")
        time.sleep(0.01)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def process_reference(tmp_path_factory):
    """The same run as `reference`, uninterrupted, in a fresh 1-device process: bit-exact
    comparisons need the same device count and XLA flags as the processes under test."""
    workdir = str(tmp_path_factory.mktemp("process_reference"))
    proc = _launch(workdir)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    return _losses(workdir)


def test_kill_9_then_rerun_gives_identical_losses(process_reference, tmp_path):
    """A real process killed with SIGKILL mid-run; rerunning the command resumes from the last
    checkpoint and reproduces the uninterrupted run's losses exactly (CPU, fp32, same seed)."""
    want = process_reference
    workdir = str(tmp_path)
    proc = _launch(workdir)
    _wait_for(lambda: _checkpointed(workdir, 4), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it was killed"
    rerun = _launch(workdir)
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out
    assert "resumed from step" in out
    got = _losses(workdir)
    assert sorted(got) == list(range(1, 13))      # each step logged once after truncation
    for step in range(1, 13):
        assert got[step] == want[step], (step, got[step], want[step])
    # The killed segment was last written at a checkpoint (4 or later); the rerun resumed from
    # the last complete checkpoint and ran the rest. The steps the killed run had done past it
    # are charged to it as lost, and the run's goodput counts them out.
    resumed = int(out.split("resumed from step ")[1].split()[0])
    killed, rerun = _goodput(workdir)["segments"]
    assert killed["first_step"] == 1 and killed["last_step"] >= 4
    assert (rerun["resumed_from"], rerun["first_step"], rerun["last_step"]) == (resumed,
                                                                              resumed + 1, 12)
    run = _goodput(workdir)["run"]
    assert run["goodput"] == pytest.approx(
        (killed["steps_s"] + rerun["steps_s"] - killed["lost_s"]) / (killed["wall_s"]
                                                                     + rerun["wall_s"]),
        rel=1e-9)
    assert any(l.startswith("time ") and "goodput" in l for l in out.splitlines()), out


def test_sigterm_saves_and_exits_with_the_preempted_code(tmp_path):
    """Exit code 42 (not 0): launchers restart a run that was preempted after saving, and only
    that one."""
    workdir = str(tmp_path)
    proc = _launch(workdir)
    _wait_for(lambda: _logged(workdir, 2), proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, out
    assert "stopped by signal at step " in out, out
    stopped_at = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert 2 <= stopped_at < 12
    steps = ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).all_steps()
    assert max(steps) == stopped_at                  # saved at the step it stopped, not before


def test_restore_onto_another_preset(process_reference, tmp_path):
    """Saved under `dp` on 1 device, resumed under `fsdp_ep_cp` on 8 (fsdp 2 × expert 2 ×
    context 2: the weights resharded, the experts split, each sequence split into 2 ranks'
    zigzag chunks), with eval under the same rules: the run continues from the saved state.
    Compared with the uninterrupted 1-device process run:

    - up to the step it stopped at, the losses are that run's exactly (same process set-up);
    - the first step after the restore starts from the same parameters and data, so its loss
      differs only by summation order: a mean of positive per-token terms over B·T = 256 tokens
      and V = 64 logits each, at most 2·γ(320) ≈ 3.8e-5 relative;
    - later steps follow an AdamW update computed in another order, which moves entries with
      near-zero gradients by up to 2·lr and can flip a near-tied routing choice, so no bound is
      derivable for them: they are checked to be logged once, finite, and still learning.
    """
    want = process_reference
    workdir = str(tmp_path)
    first = _launch(workdir)                           # a 1-device process, stopped by SIGTERM
    _wait_for(lambda: _checkpointed(workdir, 4), first)
    first.send_signal(signal.SIGTERM)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == EXIT_PREEMPTED and "stopped by signal" in out, out
    stopped_at = int(out.split("stopped by signal at step ")[1].split(";")[0])
    assert 4 <= stopped_at < 12
    c2 = _tiny(steps=12, checkpoint_every=4, eval_every=6)
    c2.mesh.preset = "fsdp_ep_cp"
    pretrain.train_and_evaluate(c2, workdir)
    got = _losses(workdir)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, stopped_at + 1):
        assert got[step] == want[step], (step, got[step], want[step])
    np.testing.assert_allclose(got[stopped_at + 1], want[stopped_at + 1],
                               rtol=2 * 320 * 2.0 ** -24 / (1 - 320 * 2.0 ** -24))
    assert all(np.isfinite(got[s]) for s in got) and got[12] < got[1]


def test_pipeline_run_resumes_without_the_pipeline(reference, tmp_path):
    """4 steps with the MoE stack in 2 pipeline stages (fsdp_pp: stage 2 × fsdp 4, 2 micro-
    batches of 4 rows), then the same workdir resumed to step 8 on the dp mesh with no pipeline:
    the checkpoint does not depend on the stage count. Step 1 starts from the same parameters
    and data as the dp reference run, so its loss differs by summation order only: a mean of
    positive per-token terms over B·T = 256 tokens and V = 320 logits each, at most 2·γ(576).
    Later steps follow AdamW updates computed in another order (no bound; see above)."""
    workdir = str(tmp_path)
    c = _tiny(steps=4, checkpoint_every=4, eval_every=4)
    c.mesh.preset, c.mesh.pipeline_microbatches = "fsdp_pp", 2   # stage 2: the preset's
    pretrain.train_and_evaluate(c, workdir)
    got = _losses(workdir)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose(got[1], reference[1][1],
                               rtol=2 * 576 * 2.0 ** -24 / (1 - 576 * 2.0 ** -24))
    pretrain.train_and_evaluate(_tiny(steps=8, checkpoint_every=4, eval_every=0), workdir)
    got = _losses(workdir)
    assert sorted(got) == list(range(1, 9))
    assert all(np.isfinite(v) for v in got.values()) and got[8] < got[1]


def test_non_finite_loss_stops_without_saving_it(tmp_path):
    workdir = str(tmp_path)
    c = _tiny(steps=6, checkpoint_every=1, eval_every=0)
    c.optim.lr = 1e30          # the first update makes the weights ~1e30: the next loss overflows
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 0.0
    with pytest.raises(pretrain.NonFiniteLoss, match="Lower optim.lr"):
        pretrain.train_and_evaluate(c, workdir)
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    for step in manager.all_steps():
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
        for leaf in jax.tree.leaves(restored):
            assert np.all(np.isfinite(np.asarray(leaf, np.float64))), step


@pytest.mark.parametrize("overrides, words", [
    (["--config.train.stepz=3"], "stepz"),
    (["--config.mesh.preset=fsdp", "--config.mesh.fsdp=3"], "fsdp=3 does not divide"),
])
def test_bad_config_fails_before_compiling(tmp_path, overrides, words):
    proc = _launch(str(tmp_path), *overrides,
                   env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and words in out, out
