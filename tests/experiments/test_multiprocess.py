"""Multi-process runs on this machine: 2 CPU processes × 4 fake devices each, joined by a real
coordinator on a free localhost port (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`; gloo collectives, JAX's CPU default), against 1 process × 8 devices.

What is checked: the dataset is prepared once while both processes start together; each process
reads its own data shards; the 2-process losses are the 1-process ones; SIGTERM to one process
makes both save the same step and exit 42; the rerun resumes exactly; the checkpoint written by
both processes resumes in 1 process × 8 devices; pipeline stages on separate processes give the
1-process losses; GRPO gives the 1-process metrics. What is not:
real TPU/GPU hosts, DCN, NCCL.
"""

import json
import os
import shutil
import signal
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from multihost_helpers import finish, start

from deepseek_jax.configs.pretrain import get_config
from deepseek_jax.train.run import EXIT_PREEMPTED
from deepseek_jax.trainers import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "pretrain.py")
STEPS = 8
TIMEOUT = 420           # seconds for one multi-process run on two shared cores (~2 min seen)


def _start(argv, logdir):
    return start(argv, logdir, n=2, devices=4)


def _finish(procs, logdir, timeout=TIMEOUT):
    return finish(procs, logdir, timeout)


def _pretrain(workdir, logdir, *overrides):
    argv = ["-m", "experiments.pretrain", f"--config={CONFIG}:tiny", f"--workdir={workdir}",
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=4",
            "--config.train.eval_every=0", "--config.data.shards=2", *overrides]
    return _start(argv, logdir)


def _tiny():
    c = get_config("tiny")
    c.train.update(steps=STEPS, checkpoint_every=4, eval_every=0)
    c.data.shards = 2
    return c


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# Step 1 starts from the same parameters (initialized from one seed under the same mesh shape)
# and the same global batch (2 data shards either way), so its loss differs only by the order of
# the fp32 sums: a mean of positive per-token terms over B·T = 256 tokens of V = 320 logits
# each, at most 2·γ(576) relative (γ(n) = n·u / (1 − n·u), u = 2⁻²⁴). Later steps apply AdamW
# updates whose gradients were all-reduced in another order (gloo across processes): entries
# with near-zero gradients can move by up to 2·lr and flip a near-tied routing choice, so no
# bound follows for them; they are checked to stay close (1e-4 relative; seen: 1.5e-7 at most,
# two ulps, at two of eight steps, the others bit-equal).
_N = 576
STEP1_RTOL = 2 * _N * 2.0 ** -24 / (1 - _N * 2.0 ** -24)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: this (test) process, 8 devices, the same run in one go."""
    workdir = str(tmp_path_factory.mktemp("one_process"))
    pretrain.train_and_evaluate(_tiny(), workdir)
    return _losses(workdir)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same run in 2 processes × 4 devices, uninterrupted."""
    root = tmp_path_factory.mktemp("two_processes")
    workdir = str(root / "run")
    codes, logs = _finish(_pretrain(workdir, str(root / "logs")), str(root / "logs"))
    assert codes == [0, 0], logs
    return workdir, _losses(workdir)


def test_each_process_reads_its_own_shard_and_data_is_prepared_once(tmp_path):
    """Both processes build the dataset into one data_dir at once (process 0 prepares, the other
    waits), then read their own shard: process i's rows are shard i's, disjoint from the other's,
    and together they are the batch one process reads with 2 shards."""
    data_dir, out = str(tmp_path / "data"), str(tmp_path / "out")
    os.makedirs(out)
    script = (
        "import sys, numpy as np\n"
        "from deepseek_jax import parallel\n"
        "parallel.maybe_initialize_distributed()\n"
        "import jax\n"
        "from deepseek_jax.configs.pretrain import get_config\n"
        "from deepseek_jax.data import run_config\n"
        "c = get_config('tiny').data\n"
        "it = run_config.train_iterator(c, sys.argv[1])\n"
        "np.save(f'{sys.argv[2]}/{jax.process_index()}.npy', next(it)['tokens'])\n"
        "print('shards', it.shards)\n")
    codes, logs = _finish(_start(["-c", script, data_dir, out], str(tmp_path / "logs")),
                          str(tmp_path / "logs"), timeout=180)
    assert codes == [0, 0], logs
    assert "shards [0]" in logs[0] and "shards [1]" in logs[1]
    rows = [np.load(os.path.join(out, f"{i}.npy")) for i in range(2)]
    c = get_config("tiny").data
    c.shards = 2
    from deepseek_jax.data import run_config
    together = next(run_config.train_iterator(c, data_dir))["tokens"]
    np.testing.assert_array_equal(np.concatenate(rows), together)
    seen = [{tuple(r) for r in part} for part in rows]
    assert not seen[0] & seen[1]


def test_two_processes_give_the_one_process_losses(one_process, two_processes):
    _, got = two_processes
    want = one_process
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(got[1], want[1], rtol=STEP1_RTOL)
    for step in range(2, STEPS + 1):
        np.testing.assert_allclose(got[step], want[step], rtol=1e-4, err_msg=str(step))


def test_pipeline_stages_in_two_processes_give_the_one_process_losses(one_process, tmp_path):
    """fsdp_pp with stage = 2 over 2 processes × 4 devices: each process holds one stage (the
    stage axis is outer), reads its own rows (the stage ranks split the batch outside the
    pipeline), and the permutes between stages cross the processes. Same checks as above."""
    workdir, logdir = str(tmp_path / "run"), str(tmp_path / "logs")
    codes, logs = _finish(_pretrain(workdir, logdir, "--config.mesh.preset=fsdp_pp",
                                    "--config.mesh.stage=2",
                                    "--config.mesh.pipeline_microbatches=2"), logdir)
    assert codes == [0, 0], logs
    got, want = _losses(workdir), one_process
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(got[1], want[1], rtol=STEP1_RTOL)
    for step in range(2, STEPS + 1):
        np.testing.assert_allclose(got[step], want[step], rtol=1e-4, err_msg=str(step))


def _wait_for_step(workdir, step, procs, timeout=TIMEOUT):
    deadline = time.time() + timeout
    path = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline:
        if os.path.exists(path) and max(_losses(workdir) or [0]) >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a process ended before the signal")
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the run")


def test_sigterm_to_one_process_saves_the_same_step_on_both_then_resumes(two_processes,
                                                                         one_process, tmp_path):
    """SIGTERM reaches process 1 only; JAX's preemption sync makes both save the same step and
    exit 42. Rerunning in 2 processes reproduces the uninterrupted 2-process losses exactly;
    resuming a copy in 1 process × 8 devices continues the same data (shard states restored)
    with the 1-process losses."""
    _, uninterrupted = two_processes
    workdir, logdir = str(tmp_path / "run"), str(tmp_path / "logs")
    procs = _pretrain(workdir, logdir)
    _wait_for_step(workdir, 1, procs)
    procs[1].send_signal(signal.SIGTERM)
    codes, logs = _finish(procs, logdir)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs
    said = [log.split("preempted: checkpoint saved at step ")[1].split(";")[0] for log in logs]
    assert said[0] == said[1], said
    stopped = int(said[0])
    assert 1 <= stopped < STEPS
    assert ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step() == stopped

    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    codes, logs = _finish(_pretrain(workdir, str(tmp_path / "logs2")), str(tmp_path / "logs2"))
    assert codes == [0, 0], logs
    assert f"resumed from step {stopped}" in logs[0]
    got = _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == uninterrupted

    pretrain.train_and_evaluate(_tiny(), copy)          # 1 process, 8 devices
    resumed = _losses(copy)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(stopped + 1, STEPS + 1):
        np.testing.assert_allclose(resumed[step], one_process[step], rtol=1e-4,
                                   err_msg=str(step))


def test_grpo_in_two_processes_matches_one_process_through_a_preemption(tmp_path):
    """GRPO in 2 processes × 4 devices: prompts and initial parameters (the same on every
    process) are placed on the global mesh, completions and log-probs are read back whole on
    every process (`parallel.to_global` / `to_host`). SIGTERM reaches process 1 only after step
    1: both save the same step and exit 42, and the rerun resumes there. Every step's metrics
    are then the uninterrupted 1-process run's: the completions are the same tokens (row keys
    do not depend on the sharding, and the sampling key of a step is restored), so the metrics
    differ only by fp32 summation order in the forward passes (checked to 1e-4 relative; exact
    for counts such as rewards and lengths)."""
    from deepseek_jax.configs.grpo import get_config as grpo_config
    from deepseek_jax.trainers import grpo

    # No held-out evaluation: it would compile twice more in each of the three runs.
    overrides = {"steps": 3, "eval_every": 0, "checkpoint_every": 2}
    workdir = str(tmp_path / "two")
    argv = ["-m", "experiments.grpo", f"--config={ROOT}/experiments/configs/grpo.py:tiny",
            f"--workdir={workdir}", *(f"--config.train.{k}={v}" for k, v in overrides.items())]
    procs = _start(argv, str(tmp_path / "logs"))
    _wait_for_step(workdir, 1, procs)
    procs[1].send_signal(signal.SIGTERM)
    codes, logs = _finish(procs, str(tmp_path / "logs"))
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs
    said = [log.split("preempted: checkpoint saved at step ")[1].split(";")[0] for log in logs]
    assert said[0] == said[1], said
    stopped = int(said[0])
    assert 1 <= stopped < overrides["steps"]
    codes, logs = _finish(_start(argv, str(tmp_path / "logs2")), str(tmp_path / "logs2"))
    assert codes == [0, 0], logs
    assert f"resumed from GRPO step {stopped}" in logs[0]

    c = grpo_config("tiny")
    c.train.update(overrides)
    one = str(tmp_path / "one")
    grpo.train_and_evaluate(c, one)
    rows = lambda w: [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
    got, want = rows(workdir), rows(one)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-4, atol=1e-6, err_msg=key)
