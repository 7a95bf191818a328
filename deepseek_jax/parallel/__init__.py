"""Parallelism: one device mesh, one logical-axis rule table, named strategy presets.

  maybe_initialize_distributed()                    # first, in a multi-process run
  mesh = make_mesh(mesh_config)                     # or default_mesh_config("fsdp_tp", n)
  rules = logical_axis_rules("fsdp_tp", mesh)       # (both at once: mesh_and_rules)
  validate(config, mesh, rules, global_batch)       # errors that name the fix, before compiling
  state = init_sharded_state(rng, config, tx, mesh, rules)
  step = make_sharded_train_step(config, tx, mesh, rules)

Files: `mesh.py` (axes, sizes, multi-slice, jax.distributed), `rules.py` (the rule table,
presets, `sharding_context`), `sharding.py` (shardings derived from `jax.eval_shape` of the init,
`validate`), `step.py` (sharded init and train step).

Expert parallelism lives with the model (`model/dispatch.py`): when the rules split E over a
mesh axis larger than 1, the MoE layer exchanges tokens with all-to-all inside `shard_map`
(dropless, bounded buffer, overflow rounds); the axis comes from the same rule table
(`expert_axes(rules)`). When the batch is split but the experts are not (dp, fsdp, fsdp_tp),
each device routes and dispatches only its own tokens inside `shard_map`, with no exchange;
expert loads are still summed over the batch axes.
"""

from deepseek_jax.parallel.mesh import (MESH_AXES, MeshError, make_mesh,
                                        maybe_initialize_distributed, multi_process_launch,
                                        resolve_mesh_shape)
from deepseek_jax.parallel.rules import (LOGICAL_AXIS_RULES, PRESETS, Preset, batch_axes,
                                         default_mesh_config, expert_axes, get_preset,
                                         logical_axis_rules, mesh_and_rules, run_mesh_config,
                                         sharding_context)
from deepseek_jax.parallel.sharding import (batch_sharding, check_global_batch, logical_specs,
                                            param_shardings, state_shardings, validate)
from deepseek_jax.parallel.step import init_sharded_state, make_sharded_train_step

__all__ = [
    "LOGICAL_AXIS_RULES", "MESH_AXES", "MeshError", "PRESETS", "Preset", "batch_axes",
    "batch_sharding", "check_global_batch", "default_mesh_config", "expert_axes", "get_preset",
    "init_sharded_state", "logical_axis_rules", "logical_specs", "make_mesh",
    "make_sharded_train_step", "maybe_initialize_distributed", "mesh_and_rules",
    "multi_process_launch", "param_shardings", "resolve_mesh_shape", "run_mesh_config",
    "sharding_context", "state_shardings", "validate",
]
