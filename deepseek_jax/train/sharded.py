"""The model on a mesh: shardings derived from its logical names, the checks made before
compiling, sharded initialization and the sharded train step.

  jax.eval_shape(init)  →  logical PartitionSpecs (names from `nn.with_logical_partitioning`)
                        →  mesh PartitionSpecs under the rules  →  NamedSharding

`state_shardings` gives a whole `TrainState`: parameters from their names; optimizer-state
leaves that mirror a parameter (AdamW's mu and nu) get that parameter's sharding, other leaves
(step counts) are replicated; the routing bias [L, E] (no logical names in the model) is read as
("layers", "expert"), so E follows the expert axis when expert parallelism is on; the step is
replicated.

`validate` checks, without compiling, that every sharded dimension divides evenly and that the
global batch splits over the batch axes, and names the change that fixes each problem.

  state = init_sharded_state(rng, config, tx, mesh, rules)      # born sharded, never gathered
  step = make_sharded_train_step(config, tx, mesh, rules)
  state, metrics = step(state, batch)                           # state donated

Both check the shardings first (`validate`) and trace inside `parallel.sharding_context`, so the
activation constraints in the model follow the same rules as the parameters. The step is
`train.step.train_step` unchanged: jit's in/out shardings place the state and the batch, and the
compiler inserts the collectives (all-gathers of FSDP weights, gradient reduce-scatters, the
global expert-load sums for the bias update).

The mesh, the rule table and the batch sharding are `deepseek_jax.parallel`'s, which knows
nothing of the model; this module joins the two.

Left out: uneven (padded) sharding. JAX can pad a dimension that does not divide, but that
silently wastes memory and compute on every step, so here it is an error instead.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax
import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.config import MeshError, ModelConfig
from deepseek_jax.model import adapters
from deepseek_jax.model.transformer import init_variables
from deepseek_jax.parallel.mesh import MESH_AXES
from deepseek_jax.parallel.rules import (InContext, Rules, axis_names, mesh_axes_of,
                                         sharding_context)
from deepseek_jax.parallel.sharding import batch_problems, batch_sharding, check_global_batch
from deepseek_jax.parallel.processes import together
from deepseek_jax.train.schedules import StepSettings
from deepseek_jax.train.step import TrainState, init_train_state, train_step


@functools.lru_cache(maxsize=8)
def abstract_variables(config: ModelConfig) -> dict:
    """Shapes of `init_variables(config)`, parameters still boxed with their logical names.

    Cached per config (an eval_shape of the full model takes seconds at 671B); do not mutate.
    """
    return jax.eval_shape(lambda rng: init_variables(rng, config), jax.random.key(0))


def _routing_names(leaf) -> tuple[str, ...]:
    return ("layers", "expert") if leaf.ndim == 2 else ("expert",)


def logical_specs(config: ModelConfig) -> dict:
    """{"params": ..., "routing": ...} trees of logical PartitionSpecs (names, not mesh axes)."""
    variables = abstract_variables(config)
    specs = {"params": nn.get_partition_spec(variables["params"])}
    specs["routing"] = jax.tree.map(lambda x: P(*_routing_names(x)),
                                    variables.get("routing", {}))
    return specs


def _to_sharding(mesh: Mesh, rules: Rules):
    return lambda spec: NamedSharding(mesh, mesh_axes_of(tuple(spec), rules))


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Rules) -> dict:
    """{"params": ..., "routing": ...} trees of NamedSharding."""
    return jax.tree.map(_to_sharding(mesh, rules), logical_specs(config), is_leaf=_is_spec)


def state_shardings(config: ModelConfig, mesh: Mesh, rules: Rules,
                    tx: optax.GradientTransformation) -> TrainState:
    """A `TrainState` whose leaves are the NamedShardings of `init_train_state`'s arrays."""
    shardings = param_shardings(config, mesh, rules)
    params = shardings["params"]
    replicated = NamedSharding(mesh, P())
    abstract_params = flax.core.meta.unbox(abstract_variables(config)["params"])
    trained, _ = adapters.split(abstract_params, config)    # LoRA: the optimizer's are adapters
    abstract_opt = jax.eval_shape(tx.init, trained)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt,
                                adapters.split(params, config)[0],
                                transform_non_params=lambda _: replicated)
    # A state leaf shaped unlike its parameter (e.g. factored second moments) is replicated.
    opt = jax.tree.map(lambda a, s: s if len(s.spec) == a.ndim else replicated,
                       abstract_opt, opt)
    return TrainState(step=replicated, params=params, opt_state=opt,
                      routing=shardings["routing"])



# --- checks before compiling ----------------------------------------------------------------

def _fix(what: str, size: int, axes: tuple[str, ...], mesh: Mesh) -> str:
    """Suggests axis sizes that divide both `size` and the device count."""
    n = mesh.devices.size
    ok = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and size % d == 0)
    return f"use {'×'.join(axes)} in {{{ok}}}, or change {what}"


def _dim_problem(path: str, name: str, size: int, axes: tuple[str, ...], mesh: Mesh,
                 config: ModelConfig) -> str:
    """The message for one dimension that does not divide its mesh axes."""
    k = math.prod(mesh.shape[a] for a in axes)
    where = f"{'×'.join(axes)}={k}"
    if name == "heads":
        return (f"n_heads={config.n_heads} is not divisible by {where}; "
                + _fix("n_heads", size, axes, mesh))
    if name == "expert":
        return (f"n_routed_experts={config.n_routed_experts} is not divisible by {where}; "
                + _fix("n_routed_experts", size, axes, mesh))
    if name == "vocab":
        padded = -(-size // k) * k
        return (f"vocab_size={size} is not divisible by {where} and is not padded "
                f"automatically; " + _fix(f"vocab_size (e.g. pad it to {padded})", size, axes,
                                          mesh))
    if name == "mlp":
        field = ("moe_d_ff" if "moe" in path and "shared" not in path
                 else "n_shared_experts·moe_d_ff" if "shared" in path else "d_ff")
        return f"{field}={size} is not divisible by {where}; " + _fix(field, size, axes, mesh)
    return (f"{path}: dimension {name!r} of size {size} is not divisible by {where}; "
            + _fix(f"the rule for {name!r}", size, axes, mesh))


def _pipeline_problems(config: ModelConfig, mesh: Mesh) -> list[str]:
    """The model's pipeline stages against the mesh's stage axis (`model/pipeline.py`)."""
    stages = mesh.shape.get("stage", 1)
    if config.pipeline_stages == stages:
        return []
    if stages == 1:
        return [f"model.pipeline_stages={config.pipeline_stages} but the mesh has no stage "
                f"axis; set mesh.stage={config.pipeline_stages} with a pipeline preset "
                "(fsdp_pp, fsdp_ep_pp), or model.pipeline_stages=1"]
    return [f"mesh stage={stages} but model.pipeline_stages={config.pipeline_stages}; set "
            f"model.pipeline_stages={stages} (the stacks split into one stage per stage rank)"]


def validate(config: ModelConfig, mesh: Mesh, rules: Rules,
             global_batch: int | None = None) -> None:
    """Checks shardings before anything compiles.

    Args:
      config: the model.
      mesh: from `make_mesh`.
      rules: from `logical_axis_rules`.
      global_batch: sequences per step over all devices; None skips the batch check.

    Raises:
      MeshError: listing every problem found, each with the change that fixes it.
    """
    problems = []
    for name, axes in rules:
        for a in axis_names(axes):
            if a not in mesh.shape:
                problems.append(f"rule ({name!r}, {axes!r}) names mesh axis {a!r}, which the "
                                f"mesh does not have; mesh axes are {', '.join(MESH_AXES)}")
    if problems:
        raise MeshError("\n".join(problems))

    if global_batch is not None:
        problems += batch_problems(mesh, rules, global_batch)
    problems += _pipeline_problems(config, mesh)

    variables = abstract_variables(config)
    named = {"params": variables["params"],
             "routing": jax.tree.map(lambda x: nn.LogicallyPartitioned(x, _routing_names(x)),
                                     variables.get("routing", {}))}
    seen = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            named, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        names = tuple(leaf.names)
        spec = mesh_axes_of(names, rules)
        for name, size, entry in zip(names, leaf.value.shape, spec):
            axes = axis_names(entry)
            if axes and size % math.prod(mesh.shape[a] for a in axes):
                msg = _dim_problem(jax.tree_util.keystr(path), name, size, axes, mesh, config)
                if msg not in seen:
                    seen.add(msg)
                    problems.append(msg)
    if problems:
        shape = ", ".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1) or "one device"
        raise MeshError(f"cannot shard the model on mesh ({shape}):\n  - "
                        + "\n  - ".join(problems))


# --- sharded init and step -------------------------------------------------------------------

def init_sharded_state(rng: jax.Array, config: ModelConfig, tx: optax.GradientTransformation,
                       mesh: Mesh, rules: Rules) -> TrainState:
    """`init_train_state` compiled with the state's shardings as `out_shardings`.

    Every device computes only its shards, so a model larger than one device's memory can be
    initialized. Values equal the unsharded init (JAX's partitionable threefry RNG).
    """
    validate(config, mesh, rules)
    shardings = state_shardings(config, mesh, rules, tx)
    init = together(jax.jit(lambda key: init_train_state(key, config, tx),
                            out_shardings=shardings), "init")
    with sharding_context(mesh, rules):
        return init(rng)


def make_sharded_train_step(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                            rules: Rules, microbatches: int = 1,
                            settings: StepSettings = StepSettings()
                            ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`train_step` jitted with the state and batch shardings; the input state is donated.
    `microbatches` > 1 accumulates gradients over that many strided micro-batches; `settings`
    (λ, α and γ) are passed through.

    Returns:
      step(state, batch) -> (state, metrics), metrics replicated scalars. `step.lower(state,
      batch)` lowers it (inside the sharding context) for ahead-of-time compiles and analysis;
      `step.shardings` is the TrainState of NamedShardings it expects.
    """
    validate(config, mesh, rules)
    shardings = state_shardings(config, mesh, rules, tx)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(functools.partial(train_step, config=config, tx=tx,
                                       microbatches=microbatches, settings=settings),
                     in_shardings=(shardings, batch_sharding(mesh, rules)),
                     out_shardings=(shardings, replicated), donate_argnums=0)

    in_context = InContext(jitted, mesh, rules)

    def step(state: TrainState, batch: dict):
        check_global_batch(mesh, rules, batch["tokens"].shape[0])
        return in_context(state, batch)

    def lower(state, batch):
        check_global_batch(mesh, rules, batch["tokens"].shape[0])
        return in_context.lower(state, batch)

    step.lower = lower
    step.shardings = shardings
    return together(step, "train step")
