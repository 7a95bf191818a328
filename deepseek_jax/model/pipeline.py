"""Pipeline parallelism: a stack of identical blocks split into P stages, run as a GPipe
schedule over J micro-batches, each stage on its own ranks of the mesh axis "stage".

Layout. The stack's parameters keep their stored shape [L, ...]; stage p holds layers
p·I … p·I + I − 1 (I = L/P), because the rules split the L axis ("stage_layers") over
"stage" in contiguous blocks. Inside the schedule they are viewed as [P, I, ...], a reshape
that moves nothing. Each stage's I layers run as the same scanned (and rematerialized) blocks
as an unpipelined stack, so a checkpoint does not depend on the stage count.

Schedule, for x [B, T, D] split into J micro-batches of b = B/J rows (strided as
`train.step.split_microbatches` splits a batch, so every batch rank keeps an equal share):

  tick i = 0 … J + P − 2:   stage p runs its I layers on micro-batch i − p (when it exists)
                            every stage hands its output to stage p + 1 (one collective
                            permute of [b, T, D] over "stage"); stage 0 takes micro-batch i + 1

On a mesh with a stage axis each tick runs the stages inside a `shard_map` manual over "stage":
every device traces its own stage's layers as written, kernels and expert exchange unbatched
(JAX cannot batch `ragged_all_to_all`, TPU's and GPU's expert exchange, over a vmapped stage
axis); without one, a `jax.vmap` over the stages gives the same schedule on one device.

Micro-batch m leaves the last stage at tick m + P − 1. A stage with no micro-batch (the first
and last P − 1 ticks) computes on zeros or on a stale state and its output is never used: the
bubble, a fraction (P − 1)/(J + P − 1) of the stack's compute. The backward pass is JAX's
transpose of this loop: the ticks in reverse, the permutes the other way.

Inputs that travel with the rows but do not change in the stack (positions, the attention
mask's segment ids and token mask) are not permuted: each stage reads its micro-batch's
directly. The MoE statistics a stage sows count only the ticks where it holds a micro-batch;
over the micro-batches the expert loads (and dropped counts) are summed and the balance
losses averaged, as gradient accumulation combines them, so the train step sees one value per
layer as without a pipeline.

Outside the pipeline (embedding, unpipelined stacks, head, MTP, loss) the stage ranks split the
batch as data-parallel ranks do (the rules' batch axes include "stage"), so each process reads
rows of its own and no stage repeats another's work there; those weights are replicated over
"stage". At its entry the pipeline gathers the batch of its stage group over "stage" (every
stage sees every micro-batch), and at its exit splits the last stage's output back; inside, the
rules in context have "stage" struck from every name but the stages' own, so the blocks see
the batch axes of one stage.

Left out: circular (interleaved) stages, which shrink the bubble by the number of rounds;
1F1B and DualPipe schedules (JAX's autodiff of the loop gives GPipe's memory: every stage keeps
its residuals of all J micro-batches); stacks whose layer count P does not divide; decoding
(the sampler runs a pipelined stack unpipelined, each layer's weights gathered over "stage").
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from deepseek_jax.model import layers

STAGE = "act_stage"      # logical name of the pipeline's stage axis on activations


def split_rows(x: jax.Array, j: int) -> jax.Array:
    """[B, ...] → [J, B/J, ...], micro-batch i = rows i, i + J, i + 2J, …"""
    B = x.shape[0]
    return jnp.swapaxes(x.reshape(B // j, j, *x.shape[1:]), 0, 1)


def merge_rows(x: jax.Array) -> jax.Array:
    """The inverse of `split_rows`: [J, B/J, ...] → [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def by_stage(tree, stages: int):
    """Leaves [L, ...] → [P, L/P, ...]: stage p's layers along the new leading axis."""
    return jax.tree.map(lambda w: w.reshape(stages, w.shape[0] // stages, *w.shape[1:]), tree)


def _shift(state: jax.Array, stages: int) -> jax.Array:
    """[P, ...] → [P, ...] with stage p's entry moved to stage p + 1 (the last one's dropped,
    stage 0's zero): a collective permute over "stage" when the mesh in context has one."""
    axes = layers.split_axes(STAGE)
    if not axes:
        return jnp.concatenate([jnp.zeros_like(state[:1]), state[:-1]])
    perm = [(s, s + 1) for s in range(stages - 1)]

    def permute(local):                                  # [1, ...]: this stage's entry
        return jax.lax.ppermute(local, axes[0], perm)

    return jax.shard_map(permute, in_specs=PartitionSpec(axes[0]),
                         out_specs=PartitionSpec(axes[0]),
                         axis_names={axes[0]}, check_vma=False)(state)


def _each_stage(stage_fn: Callable) -> Callable:
    """`stage_fn` over a leading stage axis P of every argument and result: on the mesh, a
    `shard_map` manual over "stage" (each device runs its own stage's layers as written, with
    its kernels and the MoE exchange unbatched); without a stage axis, `jax.vmap`."""
    axes = layers.split_axes(STAGE)
    if not axes:
        return jax.vmap(stage_fn)
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)           # [1, ...] → [...]

    def local(v, h, mine, live):
        y, stats = stage_fn(first(v), h[0], first(mine), live[0])
        return y[None], jax.tree.map(lambda a: a[None], stats)

    spec = PartitionSpec(axes[0])
    return jax.shard_map(local, in_specs=spec, out_specs=spec, axis_names={axes[0]},
                         check_vma=False)


def _stage_rules():
    """The rules in context with "stage" struck from every logical name but the stages' own
    (`STAGE`, "stage_layers"): what the blocks inside the pipeline see."""
    def strike(name, axes):
        if name in (STAGE, "stage_layers"):
            return axes
        kept = tuple(a for a in (() if axes is None else (axes,) if isinstance(axes, str)
                                 else axes) if a != "stage")
        return kept[0] if len(kept) == 1 else (kept or None)
    return [(name, strike(name, axes)) for name, axes in nn.get_logical_axis_rules()]


def run(stage_fn: Callable, stage_vars, x: jax.Array, rows, *, stages: int,
        microbatches: int):
    """The GPipe schedule (module docstring), with the stage ranks' batch gathered at its entry
    and split again at its exit. Arguments and result as `_schedule`'s."""
    with nn.logical_axis_rules(_stage_rules()):
        x = layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))   # gathered
        rows = jax.tree.map(
            lambda r: layers.constrain(r, (layers.BATCH,) + (None,) * (r.ndim - 1)), rows)
        y, stats = _schedule(stage_fn, stage_vars, x, rows, stages=stages,
                             microbatches=microbatches)
        y = layers.constrain(y, (layers.BATCH, layers.LENGTH, layers.EMBED))
    return layers.constrain(y, (layers.BATCH, layers.LENGTH, layers.EMBED)), stats  # split


def _schedule(stage_fn: Callable, stage_vars, x: jax.Array, rows, *, stages: int,
              microbatches: int):
    """The GPipe schedule (module docstring).

    Args:
      stage_fn: (vars of one stage, x [b, T, D], rows of its micro-batch, live: bool scalar)
        → (y [b, T, D], stats: a tree of per-layer arrays [I, ...]); `live` is false in the
        bubble, where `stats` must be zeros.
      stage_vars: a tree with leaves [P, I, ...] (`by_stage`).
      x: [B, T, D], the stack's input.
      rows: a tree of arrays [B, ...] read per micro-batch (positions, masks); may be empty.
      stages: P. microbatches: J (with the batch axes' split, it must divide B).

    Returns:
      (y [B, T, D], stats): stats with leaves [P, I, ...] summed over the micro-batches.
    """
    P, J = stages, microbatches
    B = x.shape[0]
    split = layers.split_axes(layers.BATCH)
    k = layers.split_size(split)
    if B % (J * k):
        raise ValueError(
            f"the pipeline cuts a batch of {B} rows into pipeline_microbatches={J}, and each "
            f"micro-batch must split over the batch axes {'×'.join(split) or '(none)'} = {k}: "
            f"use a pipeline_microbatches that divides {B // k if B % k == 0 else B}, or a "
            f"batch (per gradient-accumulation micro-batch) that is a multiple of {J * k}")
    xs = split_rows(x, J)                                                   # [J, b, T, D]
    rows = jax.tree.map(lambda r: split_rows(r, J), rows)                   # [J, b, ...]
    stage_ids = jnp.arange(P)                                               # [P]
    per_stage = lambda a: layers.constrain(a, (STAGE,) + (None,) * (a.ndim - 1))
    run_stages = _each_stage(stage_fn)

    def tick(carry, i):
        state, out = carry                             # [P, b, T, D], [P, J, b, T, D]
        mb = i - stage_ids                                                  # [P]
        live = (mb >= 0) & (mb < J)                                         # [P]
        mine = jax.tree.map(lambda r: r[jnp.clip(mb, 0, J - 1)], rows)      # [P, b, ...]
        y, stats = run_stages(stage_vars, per_stage(state), mine, live)     # [P, b, T, D]
        y = per_stage(y)
        # the last stage's output is micro-batch i − (P − 1); every stage writes its own
        # row of `out` (no communication), only the last one's is read
        done = jnp.clip(i - (P - 1), 0, J - 1)
        out = jax.lax.dynamic_update_index_in_dim(out, y[:, None], done, axis=1)
        nxt = jnp.where(i + 1 < J, xs[jnp.minimum(i + 1, J - 1)], 0)        # [b, T, D]
        state = jnp.where((stage_ids == 0)[:, None, None, None], nxt[None],
                          _shift(y, P))                                     # [P, b, T, D]
        return (state, out), stats

    first = jnp.zeros((P, *xs.shape[1:]), x.dtype).at[0].set(xs[0])         # [P, b, T, D]
    out = jnp.zeros((P, *xs.shape), x.dtype)                                # [P, J, b, T, D]
    (_, out), stats = jax.lax.scan(tick, (per_stage(first), per_stage(out)),
                                   jnp.arange(J + P - 1))
    stats = jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)               # [P, I, ...]
    return merge_rows(out[P - 1]), stats                                    # [B, T, D]
