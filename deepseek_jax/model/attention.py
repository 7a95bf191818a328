"""The attention core of training and prefill: one entry point, a backend per platform.

  out = attention(q, k, v, scale=..., segment_ids=None, token_mask=None, backend="auto")

q [B, T, N, A], k [B, S=T, N, A], v [B, S, N, U] (A = H + R, one full q/k head; U may differ)
→ [B, T, N, U]. Causal self-attention (`causal=False` attends both ways) where query t sees
key s only inside its segment (`segment_ids` [B, T], packed sequences) and only if key s is a
real token (`token_mask` [B, T], false = padding). A padding query's output is zero, on every
backend. The token mask is folded into the segment ids (padding gets a segment no real token
has), so each backend only sees (causal, segment ids).

Backends (`config.ATTENTION_BACKENDS`, chosen by `ModelConfig.attention_backend`):

  einsum            the reference: scores [B, N, T, S] in fp32 and a dense mask
                    (`kernels.attention.attention_reference`)
  blockwise         online softmax over key blocks in plain JAX, masked blocks skipped, backward
                    recomputes (`kernels.attention.blockwise_attention`): memory linear in T
  splash            Pallas splash attention on TPU (`kernels.attention_tpu`)
  splash_interpret  the same kernels in Pallas' interpreter (CPU tests)
  cudnn             cuDNN flash attention on GPU (`kernels.attention_gpu`)
  auto              by platform: TPU → splash (blockwise when T is not a multiple of 128),
                    GPU → cudnn for 16-bit operands (blockwise for fp32, and under context
                    parallelism), CPU → einsum

The platform is that of the active mesh's devices (`jax.set_mesh`, as the sharded train step
and the planner's compile for a TPU topology set it, or `jax.sharding.use_abstract_mesh` with
an `AbstractDevice`, JAX's way to trace for another platform), else `jax.default_backend()`. CPU keeps
the einsum so that default numbers do not change; `blockwise` is faster there on long
sequences (BENCHMARKS.md, "Attention on CPU").

A backend the platform lacks, or a length or dtype its kernel cannot take, is a ValueError raised
while tracing, before compiling, naming what to change. Under a mesh with logical rules
(`parallel.sharding_context`), the Pallas and cuDNN kernels run inside a `shard_map` over the
batch ("act_batch") and head ("act_heads") axes: a Mosaic kernel cannot be partitioned by the
compiler. The plain-JAX backends are left to the compiler.

`SelfMask` is what the model carries through its block stacks for training and prefill instead
of a dense [B, T, S] mask: segment ids and token mask (either may be None), causal implied.
Decoding over a KV cache keeps a dense cache mask (`blocks.cache_mask`).

Context parallelism: when the rules split T (`act_length`, preset fsdp_cp), q, k and v arrive
split into contiguous chunks. Inside one `shard_map` over the batch and context axes each device
all-gathers the keys and values along T, or, with `expand`, what they are computed from (MLA's
latents: 576 values a token in V3 against 40,960 expanded), expands them, and runs its query
chunk at offset chunk index × T/n against every key (`kernels.attention`: q_offset; splash:
its block tables split by query chunk, `attention_tpu.context_parallel_kernel`). The gather's
transpose reduce-scatters the gradients in the gathered form. cuDNN takes no offset: asked for
by name it is an error, and "auto" takes blockwise instead. Heads split over tensor as well are
refused. With contiguous chunks causal work is uneven: rank r visits (r + 1)/n of the key
blocks. With `order` (a `zigzag.Zigzag`, as the train step passes it) the sequence arrives in the
zigzag order: each device un-permutes the gathered latents to natural order and runs its two
query chunks at their own offsets, and every rank visits the same number of key blocks.

Left out: cross-attention (S ≠ T), ring attention (keys split too), and the absorbed
(latent-space) path, which stays an einsum (`mla.absorbed_attention`).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ATTENTION_BACKENDS
from deepseek_jax.kernels import attention_gpu, attention_tpu
from deepseek_jax.kernels.platform import active_platform
from deepseek_jax.kernels.attention import (attention_reference, blockwise_attention,
                                            dense_mask)
from deepseek_jax.model import layers
from deepseek_jax.model.zigzag import Zigzag
from deepseek_jax.parallel.rules import axis_names

# backend → the platforms it lowers for
PLATFORMS = {"einsum": ("cpu", "gpu", "tpu"), "blockwise": ("cpu", "gpu", "tpu"),
             "splash": ("tpu",), "splash_interpret": ("cpu", "gpu", "tpu"), "cudnn": ("gpu",)}


@flax.struct.dataclass
class SelfMask:
    """Causal self-attention over packed segments: segment_ids [B, T] and token_mask [B, T]
    (true = a real token), each optional; `order`, when set, says that T is stored in the zigzag
    order of context parallelism (`zigzag.Zigzag`), and causality follows natural positions."""
    segment_ids: jax.Array | None = None
    token_mask: jax.Array | None = None
    order: Zigzag | None = flax.struct.field(pytree_node=False, default=None)

    def dense(self, batch: int, length: int) -> jax.Array:
        """[B, T, S] bool, the same mask for the einsum paths (`blocks.attention_mask` semantics
        and, with a token mask, no padding key)."""
        mask = dense_mask(length, self.segment_ids, self.order is None, batch)   # [B, T, S]
        if self.order is not None:                     # causal over natural positions
            pos = self.order.positions(length)                                   # [T]
            mask = mask & (pos[:, None] >= pos[None, :])[None]                   # [B, T, S]
        if self.token_mask is not None:
            mask = mask & self.token_mask[:, None, :]
        return mask


def platform() -> str:
    """"cpu", "gpu" or "tpu": the active mesh's devices, else JAX's default backend."""
    return active_platform()


def resolve_backend(backend: str, length: int, dtype, on: str | None = None) -> str:
    """The backend `backend` names for a length-`length` sequence of `dtype` operands on
    platform `on` (default: `platform()`); "auto" picks one. Raises ValueError for a backend the
    platform lacks or inputs its kernel cannot take."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={backend!r}: use one of {ATTENTION_BACKENDS}")
    on = on or platform()
    if backend == "auto":
        if on == "tpu":
            return "splash" if length % attention_tpu.LANES == 0 else "blockwise"
        if on == "gpu":
            is_16 = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            return "cudnn" if is_16 else "blockwise"
        return "einsum"
    if on not in PLATFORMS[backend]:
        ok = [b for b, p in PLATFORMS.items() if on in p]
        raise ValueError(
            f"attention_backend={backend!r} runs on {'/'.join(PLATFORMS[backend])}, not on {on} "
            f"(the platform of the active mesh's devices, else JAX's default backend); use one "
            f"of {ok} (or 'auto'); to lower for another platform from this host, trace under a "
            "mesh of its devices (jax.set_mesh, or jax.sharding.use_abstract_mesh with an "
            "AbstractDevice)")
    if backend.startswith("splash"):
        attention_tpu.check_length(length)
    if backend == "cudnn":
        attention_gpu.check_dtype(dtype)
    return backend


def attention(q, k, v, *, scale: float, causal: bool = True,
              segment_ids: jax.Array | None = None, token_mask: jax.Array | None = None,
              backend: str = "auto", expand=None, order: Zigzag | None = None) -> jax.Array:
    """q [B, T, N, A], k [B, T, N, A], v [B, T, N, U] → [B, T, N, U]; see the module docstring.

    order: optional zigzag order of T (every [B, T] input and the output are stored in it); only
    under context parallelism.

    expand: optional; then `k` is a pytree of [B, T, ...] arrays and `v` a pytree of weights that
    the keys and values are computed from (MLA: the latents and the up-projections), and
    `expand(k, v)` gives the [B, T, N, ·] keys and values. Under context parallelism each
    device gathers `k` along T and expands it itself, so only the latents cross devices, and
    their gradients come back reduce-scattered in that form."""
    B, T = q.shape[:2]
    if expand is None:
        if k.shape[:3] != (B, T, q.shape[2]) or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} must share B, "
                             "T (self-attention) and N")
    ctx = context_axes(T)
    n_ctx = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in ctx)
    chosen = resolve_backend(backend, T // n_ctx, q.dtype)        # a device's rows decide
    # cuDNN takes no query offset: under context parallelism "auto" falls back to blockwise.
    backend = "blockwise" if ctx and backend == "auto" and chosen == "cudnn" else chosen
    seg = _fold_padding(segment_ids, token_mask)                                  # [B, T] | None
    if order is not None and (len(ctx) == 0 or order.ranks != n_ctx):
        raise ValueError(f"attention: a zigzag order over {order.ranks} ranks needs the sequence "
                         f"split over as many context ranks; the mesh splits it over {n_ctx}")
    if ctx:
        out = _context_parallel(backend, ctx, q, k, v, expand, seg, scale, causal,
                                order)                                            # [B, T, N, U]
    else:
        if expand is not None:
            k, v = expand(k, v)                                                   # [B, T, N, ·]
        out = _run(backend, q, k, v, seg, scale, causal)                          # [B, T, N, U]
    if token_mask is not None:
        out = jnp.where(token_mask[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out


def _fold_padding(segment_ids, token_mask):
    """Segment ids [B, T] in which padding tokens have a segment of their own (or None)."""
    if token_mask is None:
        return segment_ids
    seg = jnp.zeros(token_mask.shape, jnp.int32) if segment_ids is None else segment_ids
    seg = seg.astype(jnp.int32)
    return jnp.where(token_mask, seg, jnp.min(seg) - 1)                            # [B, T]


def _run(backend, q, k, v, seg, scale, causal):
    if backend == "einsum":
        return attention_reference(q, k, v, scale=scale, causal=causal, segment_ids=seg)
    if backend == "blockwise":
        return blockwise_attention(q, k, v, scale=scale, causal=causal, segment_ids=seg)
    if backend == "cudnn":
        kernel = lambda q, k, v, s: attention_gpu.cudnn_attention(  # noqa: E731
            q, k, v, scale=scale, causal=causal, segment_ids=s)
    else:
        kernel = lambda q, k, v, s: attention_tpu.splash_attention(  # noqa: E731
            q, k, v, scale=scale, causal=causal, segment_ids=s,
            interpret=backend == "splash_interpret")
    return _per_shard(kernel, q, k, v, seg)


def _mesh_axes(logical: str, size: int, mesh, rules) -> tuple[str, ...]:
    """Mesh axes (of size > 1) that the rules give `logical`, if they divide `size`."""
    axes = tuple(a for a in axis_names(nn.logical_to_mesh_axes((logical,), rules)[0])
                 if mesh.shape.get(a, 1) > 1)
    return axes if size % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def context_axes(length: int) -> tuple[str, ...]:
    """Mesh axes that split the sequence (`act_length`, `layers.split_axes`) under the mesh and
    rules in context: () without context parallelism. Raises ValueError when they do not divide
    `length`."""
    axes = layers.split_axes(layers.LENGTH)
    n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
    if length % n:
        raise ValueError(f"context parallelism: sequence length {length} does not split over "
                         f"{'×'.join(axes)}={n}; use a length that is a multiple of {n}")
    return axes


def _context_parallel(backend, ctx, q, k, v, expand, seg, scale, causal, order):
    """Attention with the queries split along T over the context axes and every key on every
    device: each device attends its contiguous chunk of queries, at offset chunk index × T/n,
    to all keys, or with a zigzag `order` its two chunks at their own offsets. Inside one
    `shard_map`, k and v (or what `expand` takes) are all-gathered along T, so their gradients
    leave as a reduce-scatter; weights among them enter whole."""
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    B, T, N = q.shape[:3]
    n_ctx = math.prod(mesh.shape[a] for a in ctx)
    batch = _mesh_axes("act_batch", B, mesh, rules) or None
    if _mesh_axes("act_heads", N, mesh, rules):
        raise ValueError("context parallelism with the heads split (tensor) is not supported: "
                         "use a preset without one of them")
    if backend == "cudnn":
        raise ValueError("attention_backend='cudnn' does not take a query offset, which context "
                         "parallelism needs: use attention_backend='blockwise', or mesh.context=1")
    seg = jnp.zeros((B, T), jnp.int32) if seg is None else seg.astype(jnp.int32)
    if expand is None:                            # both per token: gathered, nothing to expand
        kv, expand = ((k, v), ()), lambda kv, _: kv
    else:                                         # per-token arrays, and weights entering whole
        kv = (k, v)
    kv_specs = (jax.tree.map(lambda _: P(batch, ctx), kv[0]), jax.tree.map(lambda _: P(), kv[1]))
    splash = backend.startswith("splash")
    positions = order.positions(T) if order is not None else None               # [T] | None
    kernel = (attention_tpu.context_parallel_kernel(N, T, n_ctx, causal,
                                                    backend == "splash_interpret", positions)
              if splash else None)
    k_spec = attention_tpu.kernel_spec(kernel, mesh, ctx) if splash else None
    seg_k = seg if order is None else order.natural(seg)          # the keys' ids, natural order

    def per_device(kernel, q, kv, seg_q, seg_k):  # q [b, T/n, N, A]; kv[0]: T/n of each
        tokens = jax.tree.map(lambda x: jax.lax.all_gather(x, ctx, axis=1, tiled=True), kv[0])
        if order is not None:                     # the gathered chunks back in natural order
            tokens = jax.tree.map(order.natural, tokens)
        k, v = expand(tokens, kv[1])                                              # [b, T, N, ·]
        if splash:
            return attention_tpu.splash_on_chunk(kernel, q, k, v, seg_q, seg_k, scale)
        core = functools.partial(attention_reference if backend == "einsum"
                                 else blockwise_attention, k=k, v=v, scale=scale,
                                 causal=causal, kv_segment_ids=seg_k)
        rank = jax.lax.axis_index(ctx)
        if order is None:
            return core(q, segment_ids=seg_q, q_offset=rank * q.shape[1])
        h = q.shape[1] // 2                       # two chunks, each at its natural offset
        outs = [core(q[:, i * h:(i + 1) * h], segment_ids=seg_q[:, i * h:(i + 1) * h],
                     q_offset=start)
                for i, start in enumerate(order.chunk_offsets(rank, T))]         # [b, h, N, U]
        return jnp.concatenate(outs, axis=1)                                     # [b, T/n, N, U]

    q_spec = P(batch, ctx)
    return jax.shard_map(per_device, in_specs=(k_spec, q_spec, kv_specs, P(batch, ctx),
                                               P(batch, None)),
                         out_specs=q_spec, check_vma=False)(kernel, q, kv, seg, seg_k)


def _per_shard(kernel, q, k, v, seg):
    """kernel(q, k, v, seg) directly, or inside a shard_map over batch and heads under a mesh."""
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return kernel(q, k, v, seg)
    batch = _mesh_axes("act_batch", q.shape[0], mesh, rules) or None
    heads = _mesh_axes("act_heads", q.shape[2], mesh, rules) or None
    qkv = P(batch, None, heads, None)
    if seg is None:
        return jax.shard_map(lambda q, k, v: kernel(q, k, v, None), in_specs=(qkv,) * 3,
                             out_specs=qkv, check_vma=False)(q, k, v)
    return jax.shard_map(kernel, in_specs=(qkv,) * 3 + (P(batch, None),), out_specs=qkv,
                         check_vma=False)(q, k, v, seg)
