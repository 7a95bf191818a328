"""Parallelism: one device mesh, one logical-axis rule table, named strategy presets.

  maybe_initialize_distributed()                    # first, in a multi-process run
  mesh = make_mesh(mesh_config)                     # or default_mesh_config("fsdp_tp", n)
  rules = logical_axis_rules("fsdp_tp", mesh)       # (both at once: mesh_and_rules)
  with sharding_context(mesh, rules): ...           # the mesh and rules every trace reads
  step = InContext(jax.jit(fn), mesh, rules)        # a program that always traces in them

The ground floor: nothing here imports the model or the trainers. The model's shardings, the
checks before compiling and the sharded train step are in `train/sharded.py`
(`validate`, `state_shardings`, `init_sharded_state`, `make_sharded_train_step`).

Files: `mesh.py` (axes, sizes, layout on a TPU torus, multi-slice, jax.distributed), `rules.py` (the rule table,
presets, `sharding_context`), `sharding.py` (the batch's sharding and its check; `to_global` /
`to_host` for host values in multi-process runs), `processes.py` (in multi-process runs, every
process compiles a program before any runs it: XLA's CPU collectives give the others 30 s).

Expert parallelism lives with the model (`model/dispatch.py`): when the rules split E over a
mesh axis larger than 1, the MoE layer exchanges tokens with all-to-all inside `shard_map`
(dropless, bounded buffer, overflow rounds); the axis comes from the same rule table
(`expert_axes(rules)`). When the batch is split but the experts are not (dp, fsdp, fsdp_tp),
each device routes and dispatches only its own tokens inside `shard_map`, with no exchange;
expert loads are still summed over the batch axes.
"""

from deepseek_jax.parallel.mesh import (MESH_AXES, MeshError, make_mesh,
                                        maybe_initialize_distributed, multi_process_launch,
                                        resolve_mesh_shape, skip_absent_tpu, slice_count,
                                        split_dimensions, torus_layout)
from deepseek_jax.parallel.rules import (LOGICAL_AXIS_RULES, PRESETS, InContext, Preset,
                                         axis_names, batch_axes, default_mesh_config, expert_axes,
                                         get_preset, logical_axis_rules, mesh_and_rules,
                                         run_mesh_config, sharding_context)
from deepseek_jax.parallel.sharding import batch_sharding, check_global_batch, to_global, to_host
from deepseek_jax.parallel.processes import together

__all__ = [
    "InContext", "LOGICAL_AXIS_RULES", "MESH_AXES", "MeshError", "PRESETS", "Preset",
    "axis_names",
    "batch_axes", "batch_sharding", "check_global_batch", "default_mesh_config", "expert_axes",
    "get_preset", "logical_axis_rules", "make_mesh", "maybe_initialize_distributed",
    "mesh_and_rules", "multi_process_launch", "resolve_mesh_shape", "run_mesh_config",
    "sharding_context", "skip_absent_tpu", "slice_count", "split_dimensions", "to_global",
    "to_host", "together", "torus_layout",
]
