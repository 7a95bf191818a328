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

Why this kernel: it ships with the pinned JAX (no new dependency), takes U ≠ A, skips masked
blocks in all three passes, and is what MaxText runs DeepSeek with on TPU. tokamax carries a
copy of splash with more options (soft-cap, ring attention) that this model does not need.

Left out: sharding the sequence (ring attention), fused backward, sinks, soft-capping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

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


def _kernel(n_heads: int, length: int, causal: bool, interpret: bool):
    block = check_length(length)
    one = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha_single_device(splash.MultiHeadMask([one] * n_heads),
                                                block_sizes=sizes, interpret=interpret)


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
