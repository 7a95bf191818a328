"""What every training entrypoint sets up around its loop: the mesh from the run config, and a
`Run` holding the workdir's checkpoint manager, metrics writer and preemption handling.

  mesh, rules = run_mesh(config.mesh)
  model_config = scheduled(model_config, mesh, config.mesh)     # the pipeline's stages
  with Run(workdir, config.train) as run:
      with run.timed("restore"):
          state = ... run.manager.latest_step() ... (restore or initialize)
      for step in range(start, steps):
          run.profile(step + 1, state)       # starts/stops the trace of train.profile_steps
          with run.timed("data"):
              batch = ...
          ...
          stopping = run.stopping(done)
          if run.checkpoint_due(done, stopping):
              with run.timed("checkpoint"):
                  ckpt.save(run.manager, ...)
          if stopping:
              run.stop(done, result)         # raises Preempted once the checkpoint is written

Pretraining (`trainers.pretrain`), SFT and GRPO share it. Leaving the `with` block (normally,
by an error or after a signal) waits for pending checkpoint writes, closes the writer and the
manager, restores the SIGTERM handler that was there before, and prints where the segment's
wall time went (`train.goodput`; the trainers bracket restore, data, eval and checkpoint saves
with `run.timed(part)`).

Preemption. One process: a Python SIGTERM handler records the signal and the loop stops at the
next step boundary. Several processes (`jax.distributed` initialized): JAX's preemption sync
manager (started by `jax.distributed.initialize`) catches SIGTERM on whichever process gets it
and tells the others through the coordination service; `manager.reached_preemption(step)`,
asked at every step, turns True on every process at the same step (one past the largest step
any process had reached), so all of them save that step and stop together. No Python handler
is installed then: it would replace JAX's and leave the other processes running.

Profiles. `train.profile_steps` names the steps (counted from 1, as metrics.jsonl counts them)
whose work `jax.profiler` traces into WORKDIR/profile: "A,B" is steps A to B, "N" is N steps
after the first step this process runs (whose compile would swamp the trace), "" none. The
trace is an XPlane file under profile/plugins/profile/<time>/ (TensorBoard's profile plugin,
or xprof, reads it) and a perfetto_trace.json.gz beside it (open it at ui.perfetto.dev). The
state is waited for before the trace starts and before it stops, so the trace holds exactly
the device work of those steps (and the host work between them); a window that reaches the
run's last step stops when the run closes, and then also holds the last checkpoint's save. A
run resumed inside the window traces the rest of it. Left out: a gs:// WORKDIR (the profiler
writes local files; give a local run directory to profile).

Exit codes (the contract every entrypoint and launcher shares): 0 finished; EXIT_PREEMPTED (42)
stopped by a preemption after saving its checkpoint, so rerunning the command resumes (the
launchers restart on it); anything else failed (not restarted: a rerun would fail the same
way). The trainers raise `Preempted` and the entrypoints turn it into exit code 42.

Left out: signals other than SIGTERM (SIGINT stops a run like any exception: the last saved
checkpoint stays valid, the step in flight is lost).
"""

from __future__ import annotations

import signal

import jax
import numpy as np
from etils import epath

from deepseek_jax import parallel
from deepseek_jax.config import ConfigError, ModelConfig
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train.goodput import Ledger
from deepseek_jax.train.metrics import MetricsWriter, last_logged_step, truncate_after
from deepseek_jax.train.workdir import is_remote

EXIT_PREEMPTED = 42


class Preempted(Exception):
    """The run stopped for a preemption after saving `step`; `result` is what the trainer would
    have returned. Entrypoints exit with EXIT_PREEMPTED on it."""

    def __init__(self, step: int, result=None):
        super().__init__(f"preempted: checkpoint saved at step {step}; rerun to resume")
        self.step, self.result = step, result


def run_mesh(mesh_config, num_devices: int = 0, samples: bool = False):
    """(mesh, rules) of a run config's `mesh` section over every device, or over the first
    `num_devices` (single-process runs only). Starts multi-process JAX first when the config
    asks for it or a pod is detected (`mesh.distributed`). `samples`: the run decodes (GRPO,
    rejection sampling), which context parallelism does not cover; a context axis is refused."""
    parallel.maybe_initialize_distributed(mesh_config.distributed)
    if num_devices and (jax.process_count() > 1 or num_devices > jax.device_count()):
        raise ValueError(f"mesh.num_devices={num_devices}: use 0 (all devices) in multi-process "
                         f"runs, or at most the {jax.device_count()} devices here")
    devices = jax.devices()[: num_devices or None]
    sizes = parallel.run_mesh_config(mesh_config, len(devices), parallel.slice_count(devices))
    if samples and sizes.get("context", 1) > 1:
        raise ValueError(f"mesh.context={sizes['context']}: context parallelism splits training "
                         "sequences, not decoding over a KV cache; set mesh.context=1 and pick a "
                         "preset without it for runs that sample")
    mesh = parallel.make_mesh(sizes, devices)
    _check_context_groups(mesh)
    return mesh, parallel.logical_axis_rules(mesh_config.preset, mesh)


def scheduled(model_config: ModelConfig, mesh, mesh_config) -> ModelConfig:
    """The model as the run's mesh (a Mesh, or its {axis: size}) runs it: pipeline_stages = the
    mesh's stage size (`model/pipeline.py`), and the mesh section's pipeline_microbatches when
    set (0 keeps the model's, 2·stages by default). Raises MeshError when no layer stack splits
    into the stages, or when the model asks for a stage count the mesh does not have."""
    stages = dict(getattr(mesh, "shape", mesh)).get("stage", 1)
    if model_config.pipeline_stages not in (1, stages):
        raise parallel.MeshError(
            f"model.pipeline_stages={model_config.pipeline_stages} but mesh.stage={stages}: the "
            "stage count is the mesh's; set mesh.stage (with a pipeline preset: fsdp_pp, "
            "fsdp_ep_pp)")
    micro = int(mesh_config.get("pipeline_microbatches", 0) or 0)
    try:
        return model_config.replace(
            pipeline_stages=stages,
            pipeline_microbatches=micro or model_config.pipeline_microbatches)
    except ConfigError as e:
        raise parallel.MeshError(f"mesh.stage={stages}: {e}") from None


def _check_context_groups(mesh) -> None:
    """Context ranks must share a process: each process reads whole rows of its own sequences
    (the data pipeline shards rows by process), so a sequence split over two processes would
    get different rows on each. Raises MeshError naming the largest context size that fits."""
    n = mesh.shape.get("context", 1)
    if n == 1:
        return
    groups = np.moveaxis(mesh.devices, mesh.axis_names.index("context"), -1).reshape(-1, n)
    if all(len({d.process_index for d in g}) == 1 for g in groups):
        return
    local = jax.local_device_count()
    raise parallel.MeshError(
        f"mesh.context={n} puts one sequence's chunks on several processes (each holds "
        f"{local} devices), but each process reads whole rows of its own sequences: use a "
        f"context size whose ranks fit in one process (context × expert × tensor ≤ {local}), "
        "and split across hosts with fsdp or data")


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """`train.profile_steps` as (A, B) for "A,B", (0, N) for a count "N", None for ""."""
    spec = str(spec).strip()
    if not spec:
        return None
    parts = spec.split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1 and numbers[0] > 0:
        return 0, numbers[0]
    if len(numbers) == 2 and 1 <= numbers[0] <= numbers[1]:
        return numbers[0], numbers[1]
    raise ValueError(f"train.profile_steps={spec!r}: use \"A,B\" (steps A to B, 1 <= A <= B), "
                     "a count \"N\" (N steps after the first), or \"\" for no profile")


class Profiler:
    """Traces the steps of `train.profile_steps` into `directory` (module docstring)."""

    def __init__(self, spec: str, directory: str):
        self.window = parse_profile_steps(spec)
        self.directory = directory
        self.active = self.done = False

    def __call__(self, step: int, state=None) -> None:
        """At the top of step `step` (counted from 1), with the state the step starts from."""
        if self.window is None:
            return
        if self.window[0] == 0:                  # a count: after the first step run here
            self.window = (step + 1, step + self.window[1])
        first, last = self.window
        if first <= step <= last and not (self.active or self.done):     # a resume may land
            jax.block_until_ready(state)                                 # inside the window
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True
        elif step > last and self.active:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active, self.done = False, True


class Run:
    """Checkpoints under WORKDIR/checkpoints (every `train.checkpoint_every` steps, the last
    `train.keep_checkpoints` kept), metrics.jsonl, goodput.json (`timed`, `train.goodput`) and
    tensorboard/ under WORKDIR (and W&B with `train.wandb_project`), profiles of
    `train.profile_steps` under WORKDIR/profile, and whether the run is being preempted (module
    docstring). `train` is the run config's `train` section; `async_save` writes checkpoints in
    the background while the next steps run; `unit` names a step in messages."""

    def __init__(self, workdir: str, train, *, async_save: bool = True, unit: str = "step"):
        self.workdir = workdir
        self.unit = unit
        self.steps = int(train.steps)
        self.every = int(train.checkpoint_every)
        self.is_lead = jax.process_index() == 0
        self.multi_process = jax.process_count() > 1
        self.wandb_project = str(train.get("wandb_project", "") or "")
        profile_steps = train.get("profile_steps", "")
        if profile_steps and is_remote(workdir):
            raise ValueError(f"train.profile_steps={profile_steps!r} with a gs:// workdir: the "
                             "profiler writes local files; profile a run with a local workdir")
        self.profile = Profiler(profile_steps, str(epath.Path(workdir) / "profile"))
        self.manager = ckpt.make_manager(epath.Path(workdir) / "checkpoints",
                                         save_every=self.every, keep=train.keep_checkpoints,
                                         async_save=async_save)
        self.writer = self.time = None
        self._signal = None
        self._previous = None

    def __enter__(self) -> "Run":
        try:
            self.writer = MetricsWriter(self.workdir, self.steps,
                                        wandb_project=self.wandb_project)
        except BaseException:                # e.g. W&B asked for but not installed
            self.manager.close()
            raise
        self.time = Ledger(epath.Path(self.workdir) / "goodput.json", write=self.is_lead)
        if not self.multi_process:           # several: JAX's preemption notifier has SIGTERM
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if not self.multi_process:
            signal.signal(signal.SIGTERM, self._previous)
        try:
            self.profile.stop()                  # a window reaching the last step ends here
            if exc[0] is None:
                with self.time.timed("checkpoint"):
                    self.manager.wait_until_finished()
        finally:
            self.writer.close()
            self.manager.close()
            self.say(self.time.close())

    def _on_sigterm(self, signum, _frame) -> None:
        self._signal = signum

    def say(self, text: str) -> None:
        """Prints on the lead process only."""
        if self.is_lead:
            print(text, flush=True)

    def timed(self, part: str):
        """`with run.timed(part):` counts the block as that part of the run's time
        (`train.goodput`: "restore", "data", "eval" or "checkpoint")."""
        return self.time.timed(part)

    def resumed(self, step: int) -> None:
        """After a restore at `step`: drops metrics.jsonl lines logged past it (a crashed run
        may have logged steps it never saved; their time counts as lost) and says so."""
        if self.is_lead:
            metrics = epath.Path(self.workdir) / "metrics.jsonl"
            self.time.resumed(step, last_logged_step(metrics))
            truncate_after(metrics, step)
        self.writer.restart_clock()
        self.say(f"resumed from {self.unit} {step}")

    def stopping(self, done: int) -> bool:
        """Whether to save step `done` and stop: SIGTERM arrived (one process), or every process
        reached the preemption sync point at `done` (several; the same answer on each). Call it
        at every step, on every process."""
        self.time.step_done(done)
        if self.multi_process:
            return self.manager.reached_preemption(done)
        return self._signal is not None or self.manager.reached_preemption(done)

    def checkpoint_due(self, done: int, stopping: bool = False) -> bool:
        return done % self.every == 0 or stopping or done == self.steps

    def stop(self, done: int, result=None):
        """Ends a preempted run: waits for its checkpoint at step `done`, says so, and raises
        `Preempted(done, result)`."""
        with self.time.timed("checkpoint"):
            self.manager.wait_until_finished()
        self.say(f"stopped by signal at {self.unit} {done}; checkpoint saved")
        raise Preempted(done, result)


def run_command(train_and_evaluate, config, workdir: str, data_paths: tuple[str, ...]) -> None:
    """A training command line's body: the run config's paths (`init.pretrain_dir` when it has
    one, and the `data` fields named in `data_paths`) and the workdir made absolute once, at
    start-up (gs:// kept), then `train_and_evaluate(config, workdir)`; a run preempted after
    saving exits with EXIT_PREEMPTED, the code launchers restart on."""
    import sys
    from deepseek_jax.train.workdir import resolve
    if "init" in config and "pretrain_dir" in config.init:
        config.init.pretrain_dir = resolve(config.init.pretrain_dir, remote=True)
    for field in data_paths:
        config.data[field] = resolve(config.data[field])
    try:
        train_and_evaluate(config, resolve(workdir, remote=True))
    except Preempted as e:
        print(e, flush=True)
        sys.exit(EXIT_PREEMPTED)


def train_steps(config, model_config, plan, mesh, rules):
    """(tx, step, eval_step, batch sharding) of a run config whose loss is the pretraining loss
    (pretraining, SFT): AdamW from its `optim` section and `plan.learning_rate`, the sharded
    train step with its micro-batches and λ/α/γ (`plan.train`), and the jitted eval step under
    the same shardings."""
    from deepseek_jax.train import sharded
    from deepseek_jax.train.optimizer import make_optimizer
    from deepseek_jax.train.step import eval_step
    tx = make_optimizer(plan.learning_rate, b1=config.optim.b1, b2=config.optim.b2,
                        weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm)
    step_fn = sharded.make_sharded_train_step(model_config, tx, mesh, rules,
                                               microbatches=config.train.microbatches,
                                               settings=plan.train)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    eval_fn = parallel.together(parallel.InContext(jax.jit(
        lambda s, b: eval_step(s, b, config=model_config, settings=plan.train),
        in_shardings=(step_fn.shardings, batch_sharding)), mesh, rules), "eval step")
    return tx, step_fn, eval_fn, batch_sharding
