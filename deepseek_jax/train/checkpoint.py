"""Orbax checkpoints for training runs: async saves every K steps, keep-N, exact resume.

One checkpoint (a step directory under `WORKDIR/checkpoints`) holds three items:

  state   the TrainState pytree: step, params, optimizer state, routing bias (sharded arrays)
  rng     the run's PRNG key data (uint32), so that a resumed run draws the same numbers
  data    the data iterator's state (JSON), so that a resumed run sees the same batches

Orbax writes each checkpoint into a temporary directory and renames it when every item is
complete, so a save killed midway (kill -9, preemption) leaves the previous checkpoints intact;
the half-written temporary directory is ignored on restore and removed by the next manager.

Restoring goes through an abstract target that carries the *current* mesh's shardings
(`jax.ShapeDtypeStruct(shape, dtype, sharding=...)`), so a checkpoint saved under one mesh or
preset restores onto another.

A run that starts from another (`init.pretrain_dir`) records where in WORKDIR/start.json: that
run and the step it read (`save_start`), so a resumed run reads the same weights even if the
starting run has saved newer steps since. A run trained with LoRA adapters from such a start
saves only its adapters in `state.params` by default (`adapter.save_frozen=False`): the frozen
weights are the starting run's, merged and cast, and are read from there (`load_trained`,
`rl.policy.restore_state`). At V3 scale that is megabytes a checkpoint instead of the whole
model. The starting run's checkpoint at that step must then stay; reading without it is an
error that names it.

Left out: EMA parameters (V3 keeps an EMA on CPU; not needed for the runs here).
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.traverse_util as tu
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from deepseek_jax.config import ModelConfig, unscheduled
from deepseek_jax.model import adapters
from deepseek_jax.train.workdir import MODEL_CONFIG, is_remote

START = "start.json"


def make_manager(directory: str, *, save_every: int, keep: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager saving every `save_every` steps, keeping the newest `keep`."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(save_every, 1), max_to_keep=max(keep, 1),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("state", "rng", "data"))


def _encode_data_state(data_state: Any) -> dict:
    """Iterator states may be bytes or dicts; JSON holds either."""
    if isinstance(data_state, (bytes, bytearray)):
        return {"bytes": data_state.decode("latin-1")}
    return {"json": data_state}


def _decode_data_state(saved: dict) -> Any:
    if "bytes" in saved:
        return saved["bytes"].encode("latin-1")
    return saved.get("json")


def save(manager: ocp.CheckpointManager, step: int, state, rng: jax.Array, data_state: Any,
         *, force: bool = False) -> bool:
    """Starts an (async) save of step `step`; returns whether one was started."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        rng=ocp.args.ArraySave(np.asarray(jax.random.key_data(rng))),
        data=ocp.args.JsonSave(_encode_data_state(data_state)))
    return manager.save(step, args=args, force=force)


def gather_json(obj: Any) -> list:
    """Every process's `obj` (JSON-serialisable), in process order. A collective: every process
    calls it at the same point. Orbax writes JSON items from process 0 only, so per-process
    state (the data iterators') goes through this before a save."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(data.size))          # [processes]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)                         # [processes, max]
    return [json.loads(bytes(row[:n])) for row, n in zip(np.asarray(rows), np.asarray(sizes))]


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), with `shardings` if given."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def restore_train_state(manager: ocp.CheckpointManager, config, tx, shardings):
    """(state, rng, data_state) of the latest checkpoint of a run whose state is
    `step.init_train_state(…, config, tx)`, onto `shardings` (a TrainState of shardings)."""
    from deepseek_jax.train.step import init_train_state
    shapes = jax.eval_shape(lambda: init_train_state(jax.random.key(0), config, tx))
    return restore(manager, abstract_like(shapes, shardings))


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """(state, rng, data_state) of `step` (default: the latest) onto the target's shardings."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    out = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        rng=ocp.args.ArrayRestore(),
        data=ocp.args.JsonRestore()))
    rng = jax.random.wrap_key_data(np.asarray(out["rng"], np.uint32))
    return out["state"], rng, _decode_data_state(out["data"])


def _write_text(workdir: str, name: str, text: str) -> None:
    """WORKDIR/name by an atomic rename (on gs://, one object write, atomic by itself)."""
    if is_remote(workdir):
        (epath.Path(workdir) / name).write_text(text)
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(workdir, name))


def save_model_config(workdir: str, config: ModelConfig) -> None:
    """Writes WORKDIR/model_config.json (what `load_trained` reads to rebuild the model).
    Training runs and converted checkpoints write it the same way."""
    _write_text(workdir, MODEL_CONFIG, json.dumps(config.to_dict(), indent=1))


def save_start(workdir: str, run: str, step: int) -> None:
    """Writes WORKDIR/start.json: the run this one started from and the step it read."""
    _write_text(workdir, START, json.dumps({"run": run, "step": int(step)}, indent=1))


def load_start(workdir: str) -> tuple[str, int] | None:
    """(run, step) of WORKDIR/start.json, or None for a run that started from scratch."""
    path = epath.Path(workdir) / START
    if not path.exists():
        return None
    start = json.loads(path.read_text())
    return start["run"], int(start["step"])


def saved_params(manager: ocp.CheckpointManager, step: int | None = None) -> dict:
    """The metadata tree of a checkpoint's `state.params` (the latest unless `step`)."""
    step = manager.latest_step() if step is None else step
    path = epath.Path(manager.directory) / str(step) / "state"
    return ocp.PyTreeCheckpointer().metadata(path).item_metadata["params"]


def holds_frozen(params_meta: dict) -> bool:
    """Whether a checkpoint's params (their metadata tree) hold weights besides adapters: false
    for a LoRA run's adapters-only checkpoint (module docstring)."""
    return not all(adapters.is_adapter(k) for k in tu.flatten_dict(params_meta))


def load_model_config(workdir: str) -> ModelConfig:
    """The ModelConfig in WORKDIR/model_config.json (a training run's or a converted checkpoint's),
    without the run's pipeline schedule (`config.unscheduled`): a reader sets its own."""
    path = epath.Path(workdir) / MODEL_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training run's directory?")
    return unscheduled(ModelConfig.from_dict(json.loads(path.read_text())))


def saved_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints a training run kept under WORKDIR/checkpoints, ascending."""
    if not is_remote(workdir):
        workdir = os.path.abspath(workdir)      # Orbax reads absolute paths only
    manager = ocp.CheckpointManager(epath.Path(workdir) / "checkpoints")
    steps = sorted(manager.all_steps())
    manager.close()
    return steps


def load_trained(workdir: str, step: int | None = None, shardings=None, merged: bool = False):
    """(ModelConfig, {"params", "routing"?}) of a training run's latest (or given) checkpoint.

    Only the parameters and routing bias are read; the optimizer state is left on disk. Arrays
    land with `shardings` ({"params", "routing"} trees of shardings, e.g. from
    `deepseek_jax.sharded.param_shardings`), or on the first device when None.

    merged=True: a run trained with LoRA adapters comes back as the plain model, each adapted
    weight W + s·A·B (`model.adapters.merge`), with the config without adapters; `shardings`
    are then the plain model's (the adapters land like their weights). What a new run starts
    from. merged=False: the parameters as saved, adapters and all, with the saved config. A
    checkpoint of adapters only gets its frozen weights from the run it started from
    (`load_start`), read the same way and cast to the stored dtype, as training saw them.
    """
    if not is_remote(workdir):
        workdir = os.path.abspath(workdir)      # Orbax reads absolute paths only
    config = load_model_config(workdir)
    if step is None:
        step = (saved_steps(workdir) or [None])[-1]
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    path = epath.Path(workdir) / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path).item_metadata
    wanted = {k: meta[k] for k in ("params", "routing") if k in meta}
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {k: shardings[k] if shardings and k in shardings else
              jax.tree.map(lambda _: one, wanted[k]) for k in wanted}
    adapted = merged and config.adapter_rank
    plain_s = shardings["params"] if adapted and shardings else None
    frozen = None
    if config.adapter_rank and not holds_frozen(wanted["params"]):
        frozen_s = plain_s or (adapters.split(shardings["params"], config)[1] if shardings
                               else None)
        frozen = frozen_from_start(workdir, config, frozen_s)
    if adapted and shardings:
        shapes = {**tu.flatten_dict(frozen or {}), **tu.flatten_dict(wanted["params"])}
        target["params"] = _with_adapter_shardings(plain_s, wanted["params"], shapes)
    elif frozen is not None and shardings:              # the adapters' part of the full tree
        target["params"] = adapters.split(target["params"], config)[0]
    abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                            wanted, target)
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
    variables = {"params": adapters.combine(restored["params"], frozen or {})}
    if restored.get("routing"):
        variables["routing"] = restored["routing"]
    if adapted:
        variables["params"] = jax.jit(lambda p: adapters.merge(p, config),
                                      out_shardings=plain_s)(variables["params"])
        config = adapters.plain(config)
    return config, variables


def frozen_from_start(workdir: str, config: ModelConfig, shardings) -> dict:
    """The frozen weights of a LoRA run whose checkpoints hold adapters only: its starting
    run's parameters at the recorded step, merged, in the stored dtype (`param_dtype`)."""
    start = load_start(workdir)
    if start is None:
        raise FileNotFoundError(f"{workdir}'s checkpoints hold LoRA adapters only, and its "
                                f"{START}, which names the run with the frozen weights, is "
                                "missing; restore it beside model_config.json")
    run, step = start
    steps = saved_steps(run) if (epath.Path(run) / "checkpoints").exists() else []
    if step not in steps:
        raise FileNotFoundError(
            f"{workdir} trained LoRA adapters on {run} at step {step}, and its checkpoints hold "
            f"the adapters only; that checkpoint is gone (the run keeps steps {steps}). "
            f"Restore it (if the run moved, write its new path into {workdir}/{START}), or "
            "train with adapter.save_frozen=True")
    _, base = load_trained(run, step, None if shardings is None else {"params": shardings},
                           merged=True)
    cast = lambda t: jax.tree.map(lambda x: x.astype(config.param_dtype), t)  # noqa: E731
    return jax.jit(cast, out_shardings=shardings, donate_argnums=0)(base["params"])  # no copy


def _with_adapter_shardings(plain: dict, saved: dict, shapes: dict) -> dict:
    """Shardings for the saved params (`saved`, their metadata tree) from the plain model's
    `plain`: a weight as in `plain`, each A and B like its weight's inputs and outputs.
    `shapes`: {flattened path: anything with a shape}, every weight and adapter."""
    flat = tu.flatten_dict(plain)
    out = {}
    for key in tu.flatten_dict(saved):
        if not adapters.is_adapter(key):
            out[key] = flat[key]
            continue
        name = str(key[-1])
        w_key, which = (*key[:-1], name[:-len("_lora_a")]), name[-1]
        a = shapes[(*key[:-1], w_key[-1] + "_lora_a")].shape
        b = shapes[(*key[:-1], w_key[-1] + "_lora_b")].shape
        out[key] = adapters.adapter_sharding(flat[w_key], a, b, len(shapes[w_key].shape), which)
    return tu.unflatten_dict(out)
