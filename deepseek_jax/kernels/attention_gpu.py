"""GPU attention: cuDNN's fused flash attention through `jax.nn.dot_product_attention`.

  cudnn_attention(q, k, v, scale=..., causal=True, segment_ids=None)   → [B, T, N, U]

Same arguments and result as `kernels.attention.attention_reference`; q, k, v in bf16 or fp16
(cuDNN's flash kernels take no fp32, `check_dtype`). Causal masking is cuDNN's own (masked
blocks are skipped); packed segments go in as a boolean mask [B, 1, T, S] over all heads, which
cuDNN turns into an additive bias: B·T² bytes of mask and a bias pass, against N·B·T²·4 bytes
for the einsum's scores (1/512 of them for V3's 128 heads).

Head dims: the public `dot_product_attention` requires v's shape to equal k's, so v [.., U] is
zero-padded to A and the output sliced back to U (for V3: 192 instead of 128 columns in the
P·V product and its gradients). cuDNN ≥ 9.10 on Hopper takes U ≠ A itself, but only through a
private JAX function (`jax._src.cudnn.fused_attention_stablehlo`); the public one is kept.

Why cuDNN: it runs MLA's 192-wide heads, causal, forward and backward, at about 390 TFLOP/s on an
H200 (kernels notes), and is in JAX without a new dependency. JAX's Mosaic GPU flash kernel
(`pallas/ops/gpu/attention_mgpu.py`) needs equal q/k/v head dims and has no causal backward;
the Triton one pads heads to a power of two (256); tokamax's Mosaic GPU kernel takes U ≠ A and
would drop the padding, at the cost of a dependency the GPU host does not have.

Left out: cuDNN's packed (THD) layout with per-segment offsets, which would replace the segment
mask; fp8 attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_dtype(dtype) -> None:
    """Raises ValueError unless cuDNN's flash kernels take `dtype`."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(
            f"cudnn attention takes bfloat16 or float16 operands, got {jnp.dtype(dtype).name}: "
            "set the model's dtype to bfloat16, or use attention_backend='blockwise' or 'einsum' "
            "for an fp32 model")


def cudnn_attention(q, k, v, *, scale: float, causal: bool = True,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """cuDNN flash attention: q [B, T, N, A], k [B, S, N, A], v [B, S, N, U] → [B, T, N, U]."""
    check_dtype(q.dtype)
    A, U = q.shape[-1], v.shape[-1]
    v_wide = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, A - U))).astype(k.dtype)    # [B, S, N, A]
    mask = None
    if segment_ids is not None:                                                  # [B, T]
        mask = (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # [B, 1, T, S]
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v_wide.astype(q.dtype), mask=mask,
                                       scale=scale, is_causal=causal,
                                       implementation="cudnn")                   # [B, T, N, A]
    return out[..., :U].astype(v.dtype)                                          # [B, T, N, U]
