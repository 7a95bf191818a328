"""Sharding of the batch, and the batch check made before compiling: mesh and rules only.

`batch_sharding` splits B of every [B, T] batch array over the batch axes; `check_global_batch`
says, before anything compiles, when a global batch does not split over them. The model's own
shardings (parameters, optimizer state) are derived in `train/sharded.py`, which joins the model
to the mesh; this package knows nothing of the model.

Multi-process runs: `to_global(x, sharding)` places a value every process holds in full (the
same prompts, the same initial parameters) on a sharding that spans other processes' devices,
where `jax.device_put` accepts only addressable devices; `to_host(x)` reads a global array back
whole on every process (an all-gather over processes), where `np.asarray` needs every shard to
be local. With one process both are the plain calls.
"""

from __future__ import annotations

import math

import jax
import numpy as np
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


def to_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """`x` (host data or a local array, the same on every process; or a global array) placed
    with `sharding`. PRNG key arrays go through their key data."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(to_global(jax.random.key_data(x), sharding),
                                        impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """The whole of `x` as numpy on every process (all-gathered when other processes hold parts
    of it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
