"""The transformer block, its stacking (scanned or unrolled, with remat), and the attention mask.

  x = x + MLA(RMSNorm(x))
  x = x + FFN(RMSNorm(x))        FFN = dense SwiGLU (first `n_dense_layers`) or DeepSeekMoE

Identical blocks are stacked with `nn.scan` so compile time and HLO size stay flat in depth (the
61-layer V3 compiles as two loop bodies); the parameters of a scanned stack get a leading layer
axis L (logical name "layers"). `scan_layers=False` unrolls the stack for debugging; its
parameters are then named `layer_0`, `layer_1`, … (not interchangeable with the scanned layout).
Rematerialization wraps each block with a named `jax.checkpoint_policies` policy.

Parameter names (frozen): attn_norm (HF input_layernorm), attn (self_attn), ffn_norm
(post_attention_layernorm), mlp (dense FFN) or moe (MoE FFN).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import layers
from deepseek_jax.model.layers import MLP, RMSNorm
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE


def attention_mask(batch: int, length: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal mask [B, T, S=T], True where query t may attend key s; packed segments stay apart."""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (batch, length, length))
    if segment_ids is not None:                                   # [B, T]
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask                                                   # [B, T, S]


class Block(nn.Module):
    """One pre-norm transformer block; returns (x, None) so that it can be scanned."""
    config: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array):
        c = self.config
        x = layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))        # [B, T, D]
        x = x + MLA(c, name="attn")(RMSNorm(c, name="attn_norm")(x), positions, mask)
        h = RMSNorm(c, name="ffn_norm")(x)                                        # [B, T, D]
        ffn = MoE(c, name="moe") if self.moe else MLP(c, c.d_ff, name="mlp")
        x = x + ffn(h)                                                            # [B, T, D]
        return layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED)), None


def _remat(cls, config: ModelConfig):
    if config.remat_policy == "none":
        return cls
    policy = (None if config.remat_policy == "full"
              else getattr(jax.checkpoint_policies, config.remat_policy))
    # prevent_cse is only needed outside scan (scan already stops XLA from merging the recompute).
    return nn.remat(cls, policy=policy, prevent_cse=not config.scan_layers)


class BlockStack(nn.Module):
    """`n` identical blocks (all dense or all MoE) applied in order to x [B, T, D]."""
    config: ModelConfig
    n: int
    moe: bool

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        block = _remat(Block, c)
        if c.scan_layers:
            stack = nn.scan(block, length=self.n,
                            variable_axes={"params": 0, "routing": 0, "moe_stats": 0},
                            split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast),
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(c, self.moe, name="layers")(x, positions, mask)
            return x
        for i in range(self.n):
            x, _ = block(c, self.moe, name=f"layer_{i}")(x, positions, mask)
        return x
