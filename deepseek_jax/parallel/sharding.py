"""Sharding of the batch, and the batch check made before compiling: mesh and rules only.

`batch_sharding` splits B of every [B, T] batch array over the batch axes; `check_global_batch`
says, before anything compiles, when a global batch does not split over them. The model's own
shardings (parameters, optimizer state) are derived in `train/sharded.py`, which joins the model
to the mesh; this package knows nothing of the model.
"""

from __future__ import annotations

import math

from jax.sharding import Mesh, NamedSharding

from deepseek_jax.config import MeshError
from deepseek_jax.parallel.rules import Rules, batch_axes, mesh_axes_of


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of every [B, T] batch array (tokens, valid, segment_ids, positions)."""
    return NamedSharding(mesh, mesh_axes_of(("act_batch", "act_length"), rules))


def batch_problems(mesh: Mesh, rules: Rules, global_batch: int) -> list[str]:
    axes = batch_axes(rules)
    k = math.prod(mesh.shape[a] for a in axes)
    if global_batch % k == 0:
        return []
    sizes = " × ".join(f"{a}={mesh.shape[a]}" for a in axes)
    return [f"global batch {global_batch} is not divisible by the batch axes {sizes} = {k}; "
            f"use a global batch that is a multiple of {k}"]


def check_global_batch(mesh: Mesh, rules: Rules, global_batch: int) -> None:
    """Raises MeshError unless `global_batch` splits evenly over the batch axes."""
    problems = batch_problems(mesh, rules, global_batch)
    if problems:
        raise MeshError(problems[0])
