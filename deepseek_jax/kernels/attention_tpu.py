"""TPU attention: JAX's Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`).

  splash_attention(q, k, v, scale=..., causal=True, segment_ids=None)   → [B, T, N, U]

Same arguments and result as `kernels.attention.attention_reference`. Splash works per sequence
on heads-major arrays ([N, T, A]); the batch is a `vmap`. The causal mask becomes its
`CausalMask` (a static block mask: blocks above the diagonal are skipped, in the forward and in
both backward kernels) and segment ids its `SegmentIds(q, kv)`. Splash takes no softmax scale,
so q is scaled first (in q's dtype).

Head dims: the installed JAX's kernel (0.11.2) reads v's head dim apart from q/k's
(`head_dim_v`; its output and dv blocks are [block, head_dim_v]), so MLA's A = 192 and U = 128
go in as they are, without padding v.

Block sizes: query and key blocks of 512, 256 or 128 rows, the largest that divides T (the
splash default is 128; larger blocks amortize the per-step overhead at V3's lengths). A length
that is not a multiple of 128 is refused (`check_length`) before anything is traced.

`interpret=True` runs the same kernels in Pallas' interpreter (CPU tests).

Context parallelism (`context_parallel_splash`, called inside the model's mesh): the kernel is
built once for the whole [T, T] mask with `q_seq_shards` = the context ranks (and `head_shards`
= the tensor ranks), and its block-mask tables are split with it (`manual_sharding_spec`), so
each device runs the rows of its own query chunk against every key; the kernel object is a
`shard_map` argument, not a closure, so that its tables arrive split. Blocks must divide the
local length T/n. Splash splits only the queries, so k and v enter whole.

Why this kernel: it ships with the pinned JAX (no new dependency), takes U ≠ A, skips masked
blocks in all three passes, and is what MaxText runs DeepSeek with on TPU. tokamax carries a
copy of splash with more options (soft-cap, ring attention) that this model does not need.

Left out: ring attention (keys split too), load-balanced query chunks, fused backward, sinks, soft-capping.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

LANES = 128                         # splash's smallest block (its key blocks are lane-aligned)
BLOCK_CHOICES = (512, 256, 128)


def check_length(length: int) -> int:
    """The block size splash uses for `length` rows; raises ValueError when none fits."""
    for b in BLOCK_CHOICES:
        if length % b == 0:
            return b
    raise ValueError(
        f"splash attention needs a sequence length that is a multiple of {LANES} (its blocks "
        f"are {'/'.join(map(str, BLOCK_CHOICES))} rows); got {length}. Pad the sequence to a "
        f"multiple of {LANES} (e.g. {-(-length // LANES) * LANES}), or use "
        "attention_backend='blockwise' (any length) or 'einsum'")


def _mask_and_sizes(n_heads: int, length: int, block: int, causal: bool):
    one = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.MultiHeadMask([one] * n_heads), sizes


def _kernel(n_heads: int, length: int, causal: bool, interpret: bool):
    mask, sizes = _mask_and_sizes(n_heads, length, check_length(length), causal)
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, *, scale: float, causal: bool = True,
                     segment_ids: jax.Array | None = None, interpret: bool = False) -> jax.Array:
    """Splash attention: q [B, T, N, A], k [B, T, N, A], v [B, T, N, U] → [B, T, N, U]."""
    B, T, N, _ = q.shape
    kernel = _kernel(N, T, causal, interpret)
    q = jnp.einsum("BTNA->BNTA", q * jnp.asarray(scale, q.dtype))               # [B, N, T, A]
    k = jnp.einsum("BSNA->BNSA", k)                                             # [B, N, S, A]
    v = jnp.einsum("BSNU->BNSU", v)                                             # [B, N, S, U]
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)                                         # [B, N, T, U]
    else:
        seg = splash.SegmentIds(q=segment_ids.astype(jnp.int32),
                                kv=segment_ids.astype(jnp.int32))               # [B, T] each
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, seg)
    return jnp.einsum("BNTU->BTNU", out)                                        # [B, T, N, U]


def context_parallel_splash(q, k, v, seg, *, scale: float, causal: bool, interpret: bool,
                            batch, heads, context: tuple[str, ...]) -> jax.Array:
    """Splash with the queries split along T over the mesh axes `context` (B over `batch`, N
    over `heads`, either None): q [B, T, N, A], k [B, T, N, A], v [B, T, N, U] → [B, T, N, U],
    seg [B, T] or None. Must run under the mesh (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    B, T, N, _ = q.shape
    n_ctx = math.prod(mesh.shape[a] for a in context)
    n_heads = math.prod(mesh.shape[a] for a in heads) if heads else 1
    block = check_length(T // n_ctx)
    mask, sizes = _mask_and_sizes(N, T, block, causal)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=n_heads,
                                    q_seq_shards=n_ctx, interpret=interpret)
    k_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(heads, context)))
    q = jnp.einsum("BTNA->BNTA", q * jnp.asarray(scale, q.dtype))               # [B, N, T, A]
    k = jnp.einsum("BSNA->BNSA", k)                                             # [B, N, S, A]
    v = jnp.einsum("BSNU->BNSU", v)                                             # [B, N, S, U]
    seg = jnp.zeros((B, T), jnp.int32) if seg is None else seg.astype(jnp.int32)

    def per_device(kernel, q, k, v, seg_q, seg_k):  # q [b, h, T/n, A]; k, v [b, h, T, ·]
        one = lambda q, k, v, sq, sk: kernel(  # noqa: E731
            q, k, v, segment_ids=splash.SegmentIds(q=sq, kv=sk))
        return jax.vmap(one)(q, k, v, seg_q, seg_k)

    q_spec, kv_spec = P(batch, heads, context, None), P(batch, heads, None, None)
    out = jax.shard_map(per_device, in_specs=(k_spec, q_spec, kv_spec, kv_spec, P(batch, context),
                                              P(batch, None)),
                        out_specs=q_spec, check_vma=False)(kernel, q, k, v, seg, seg)
    return jnp.einsum("BNTU->BTNU", out)                                        # [B, T, N, U]
