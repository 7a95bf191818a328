"""The pretraining loop, `train_and_evaluate(config, workdir)`; the command line is
`python -m experiments.pretrain --config=experiments/configs/pretrain.py:NAME --workdir=DIR`.

Reads top to bottom: mesh → data → model/optimizer → shardings → step → checkpoint → loop; the
mesh, checkpoint manager, metrics writer and SIGTERM handling are `train.run`'s, shared with GRPO.
Rerunning the same command resumes from the latest checkpoint in DIR/checkpoints, with the same
data order (the iterator state is checkpointed) and the same numbers. Outputs under DIR:
metrics.jsonl (one JSON object per logged step), tensorboard/, checkpoints/, goodput.json
(where the wall time went: `train.goodput`), data/ (the
prepared array_record files when data.data_dir is empty; DIR may be gs://, and then the data
goes to a local folder: `train.workdir.default_data_dir`).

Stops cleanly: SIGTERM (preemption; on any one process of a multi-process run) saves a
checkpoint at the next step boundary on every process and raises `train.run.Preempted`, which
the entrypoint turns into exit code 42 (`train.run.EXIT_PREEMPTED`: launchers restart on it);
a non-finite loss or gradient stops the run with an error before anything non-finite is saved.

`config` is a run config from `deepseek_jax.configs.pretrain`; tests, notebooks and the command
line (experiments/pretrain.py) all call `train_and_evaluate`.

Schedules (`train.schedules.from_run_config`): the learning rate, λ and γ follow the run's
fraction of tokens; with a batch ramp each step reads as many micro-batches as the ramp says
and the compiled step leaves the other slots empty. `init.pretrain_dir` starts a new run (an
extension phase) from another run's parameters and routing bias.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from deepseek_jax.configs.pretrain import to_model_config
from deepseek_jax.model import adapters
from deepseek_jax.data import run_config
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train import schedules, sharded
from deepseek_jax.train import workdir as run_dir
from deepseek_jax.train.flops import flops_per_token, peak_flops_per_device
from deepseek_jax.train.metrics import Throughput
from deepseek_jax.train.run import Run, run_mesh, scheduled, train_steps
from deepseek_jax.train.step import NonFiniteLoss, TrainState


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs (or resumes) the training described by `config`; returns the last logged metrics."""
    # --- mesh ---------------------------------------------------------------------------------
    model_config = to_model_config(config.model)
    mesh, rules = run_mesh(config.mesh)
    model_config = scheduled(model_config, mesh, config.mesh)
    sharded.validate(model_config, mesh, rules, config.data.global_batch)
    if model_config.vocab_size < run_config.vocab_size(config.data.tokenizer):
        raise ValueError(f"model.vocab_size={model_config.vocab_size} is smaller than the "
                         f"tokenizer's {run_config.vocab_size(config.data.tokenizer)}; raise it")
    # Absolute from here on (Orbax needs it), checked before the data or any compile.
    workdir = run_dir.prepare(workdir, model_config)
    if jax.process_index() == 0:
        ckpt.save_model_config(workdir, model_config)
        print(f"mesh {dict(mesh.shape)} preset {config.mesh.preset} on {jax.device_count()} "
              f"{jax.devices()[0].platform} devices", flush=True)

    # --- data ---------------------------------------------------------------------------------
    data_dir = run_dir.resolve(config.data.data_dir) or run_dir.default_data_dir(workdir)
    plan = schedules.from_run_config(config)
    train_data = config.data
    if plan.ramp:                   # the iterator yields micro-batches; a step reads k of them
        train_data = config.data.copy_and_resolve_references()
        train_data.global_batch = plan.microbatch_rows
    train_iter = run_config.train_iterator(train_data, data_dir)     # seeded by data.shuffle_seed
    eval_batches = lambda: run_config.eval_iterator(config.data, data_dir,
                                                    num_batches=config.train.eval_batches)

    # --- model, optimizer and the sharded steps -----------------------------------------------
    tx, step_fn, eval_fn, batch_sharding = train_steps(config, model_config, plan, mesh, rules)

    def to_device(batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                for k, v in batch.items()}

    with Run(workdir, config.train, async_save=config.train.async_checkpoint) as run:
        # --- checkpoint: restore or initialize ------------------------------------------------
        with run.timed("restore"):
            if run.manager.latest_step() is not None:
                state, rng, data_state = ckpt.restore_train_state(run.manager, model_config, tx,
                                                                  step_fn.shardings)
                train_iter.set_state(data_state)
                start = int(state.step)
                run.resumed(start)
            else:
                rng, init_rng = jax.random.split(jax.random.key(config.seed))
                state = _initial_state(config, model_config, tx, step_fn, init_rng, mesh, rules)
                start = 0

        # --- loop -----------------------------------------------------------------------------
        meter = Throughput(config.data.global_batch * config.data.seq_len,
                           flops_per_token(model_config, config.data.seq_len),
                           (peak_flops_per_device() or 0) * jax.device_count() or None,
                           start_step=start)
        pending = None          # (step, metrics) of the last step, checked one step late
        last = {}

        def flush() -> None:
            """Checks the pending step's metrics (stops on non-finite) and logs them if due."""
            nonlocal pending, last
            if pending is None:
                return
            step, m = pending[0], jax.device_get(pending[1])
            pending = None
            if not bool(m["finite"]):
                raise NonFiniteLoss(
                    f"step {step}: loss {float(m['loss'])}, grad norm {float(m['grad_norm'])}; "
                    "stopping before anything non-finite is saved. Lower optim.lr, raise "
                    "optim.warmup_steps or check the data, then rerun to resume from the last "
                    "good checkpoint")
            if step % config.train.log_every == 0 or step == config.train.steps:
                last = {**{k: v for k, v in m.items() if k != "finite"},
                        "lr": float(plan.learning_rate(step - 1)), **meter.read(step)}
                run.writer.write(step, last)

        for step in range(start, config.train.steps):
            run.profile(step + 1, state)             # train.profile_steps: trace this step?
            with run.timed("data"):
                if plan.ramp:
                    parts = [next(train_iter) for _ in range(plan.progress.microbatches(step))]
                    batch = to_device(schedules.assemble_microbatches(parts, plan.slots))
                else:
                    batch = to_device(next(train_iter))
            state, metrics = step_fn(state, batch)   # dispatched; runs while we check the last
            flush()
            pending = (step + 1, metrics)
            done = step + 1

            if config.train.eval_every and done % config.train.eval_every == 0:
                with run.timed("eval"):
                    parts = [jax.device_get(eval_fn(state, to_device(b))) for b in eval_batches()]
                run.writer.write(done, {k: float(np.mean([p[k] for p in parts]))
                                        for k in parts[0]}, prefix="eval_")

            stopping = run.stopping(done)
            if run.checkpoint_due(done, stopping):
                flush()              # never save a state that came from a non-finite step
                with run.timed("checkpoint"):
                    data_state = train_iter.merge_states(ckpt.gather_json(train_iter.get_state()))
                    ckpt.save(run.manager, done, state, rng, data_state, force=True)
            if stopping:
                run.stop(done, last)
        flush()
        return last


def _initial_state(config, model_config, tx, step_fn, rng, mesh, rules) -> TrainState:
    """A new run's state: another run's parameters (`init.pretrain_dir`), or a random init."""
    init = config.get("init") or {}
    if init.get("pretrain_dir"):
        state = _from_run(run_dir.resolve(init.pretrain_dir, remote=True), model_config, tx, step_fn)
        if jax.process_index() == 0:
            print(f"starting from the parameters of {init.pretrain_dir}", flush=True)
        return state
    if init.get("required"):
        raise ValueError(f"run config {config.name!r} continues another run: set "
                         "--config.init.pretrain_dir to that run's directory")
    return sharded.init_sharded_state(rng, model_config, tx, mesh, rules)


def _from_run(path: str, model_config, tx, step_fn) -> TrainState:
    """A fresh TrainState (step 0, new optimizer state) holding the parameters and routing bias
    of the run at `path`, read into this run's shardings. The architectures must agree; the
    positions (RoPE/YaRN, max length) and numerics may differ."""
    previous = adapters.plain(ckpt.load_model_config(path))    # read merged, if trained so
    free = {"max_seq_len", "dtype", "remat_policy", "moe_impl", "moe_backend", "fp8", "loss_chunk",
            "attention_impl", "moe_capacity_factor", "moe_ep_buffer_factor", "moe_ep_transport"}
    free |= {f.name for f in dataclasses.fields(model_config) if f.name.startswith("rope_")
             and f.name != "rope_interleaved"} | {"fp8_backend"}
    differ = sorted(f.name for f in dataclasses.fields(model_config) if f.name not in free
                    and getattr(previous, f.name, None) != getattr(model_config, f.name))
    if differ:
        raise ValueError(f"init.pretrain_dir={path} holds another architecture: "
                         f"{', '.join(differ)} differ from this run's model config")
    shardings = step_fn.shardings
    _, variables = ckpt.load_trained(path, shardings={"params": shardings.params,
                                                     "routing": shardings.routing}, merged=True)
    params = variables["params"]
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(np.zeros((), np.int32), shardings.step),
                      params=params, opt_state=opt_state,
                      routing=variables.get("routing", {}))
