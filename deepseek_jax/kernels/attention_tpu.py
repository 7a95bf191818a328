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

Context parallelism (`context_parallel_kernel`, `kernel_spec`, `splash_on_chunk`, used by
`model/attention.py` inside its shard_map): the kernel is built once for the whole [T, T] mask
with `q_seq_shards` = the context ranks, and its block-mask tables are split with it
(`manual_sharding_spec`), so each device runs the rows of its own query chunk against every
key; the kernel object is a `shard_map` argument, not a closure, so that its tables arrive
split. Blocks must divide the local length T/n. Splash splits only the queries, so every
device holds all of k and v. For the zigzag order (`model.zigzag`), where a device's rows are two
chunks far apart, the causal mask is computed on each row's natural position (`q_positions`,
splash's `q_sequence`: the row order the kernel and its block tables see) against the keys in
natural order; blocks then divide the chunk, T/2n, where one fits.

Why this kernel: it ships with the pinned JAX (no new dependency), takes U ≠ A, skips masked
blocks in all three passes, and is what MaxText runs DeepSeek with on TPU. tokamax carries a
copy of splash with more options (soft-cap, ring attention) that this model does not need.

Left out: ring attention (keys split too), fused backward, sinks, soft-capping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


def _mask_and_sizes(n_heads: int, length: int, block: int, causal: bool, q_positions=None):
    one = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    if causal and q_positions is not None:     # kernel row i is the query at q_positions[i]
        one.q_sequence = np.asarray(q_positions, np.int32)
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


def context_parallel_kernel(n_heads: int, length: int, n_ctx: int, causal: bool,
                            interpret: bool, q_positions=None):
    """The splash kernel for the whole [T, T] mask with its tables split into `n_ctx` query
    chunks; pass it into the shard_map with `kernel_spec` and call `splash_on_chunk` inside.
    q_positions: optional int [T], the natural position of each query row (zigzag order); the
    keys stay in natural order."""
    local = length // n_ctx
    if q_positions is not None and (local // 2) % LANES == 0:
        local //= 2                           # blocks inside one of a device's two chunks
    mask, sizes = _mask_and_sizes(n_heads, length, check_length(local), causal, q_positions)
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=n_ctx,
                                  interpret=interpret)


def kernel_spec(kernel, mesh, context: tuple[str, ...]):
    """The shard_map spec of `context_parallel_kernel`'s tables: split by query chunk."""
    return kernel.manual_sharding_spec(NamedSharding(mesh, P(None, context)))


def splash_on_chunk(kernel, q, k, v, seg_q, seg_k, scale: float) -> jax.Array:
    """Inside the shard_map: this device's query chunk q [b, T/n, N, A] against every key,
    k [b, T, N, A], v [b, T, N, U], segment ids [b, T/n] and [b, T] → [b, T/n, N, U]."""
    q = jnp.einsum("BTNA->BNTA", q * jnp.asarray(scale, q.dtype))               # [b, N, t, A]
    k = jnp.einsum("BSNA->BNSA", k)                                             # [b, N, S, A]
    v = jnp.einsum("BSNU->BNSU", v)                                             # [b, N, S, U]
    one = lambda q, k, v, sq, sk: kernel(  # noqa: E731
        q, k, v, segment_ids=splash.SegmentIds(q=sq, kv=sk))
    out = jax.vmap(one)(q, k, v, seg_q, seg_k)                                  # [b, N, t, U]
    return jnp.einsum("BNTU->BTNU", out)                                        # [b, t, N, U]
