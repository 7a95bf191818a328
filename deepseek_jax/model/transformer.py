"""The DeepSeek-V3 language model: embedding, dense and MoE block stacks, final norm, head, MTP.

`Transformer(config).apply(variables, tokens)` with int tokens [B, T] returns a pair

  (logits [B, T, V] float32,  mtp_logits [K, B, T, V] float32 or None when config.mtp_depth = 0)

where logits[:, i] predicts token t_{i+1} and mtp_logits[k−1, :, i] predicts t_{i+k+1}.
`variables` holds "params" and, for V3-style routing, "routing" (the per-layer selection bias,
stacked [L, E] under scan; state updated by `moe.update_routing_bias`, never by the optimizer).
Apply with `mutable=["moe_stats"]` to also get the per-layer expert loads and sequence-balance
losses that the train step needs.

Optional inputs: `positions` [B, T] (default 0 … T−1) and `segment_ids` [B, T] for packed
sequences (tokens attend only within their segment).

Parameter names (frozen; HF names in brackets): embed [V, D] (embed_tokens), dense_layers /
moe_layers (the first `n_dense_layers` and the rest of model.layers), final_norm (norm),
lm_head [D, V] (lm_head, transposed; absent when embeddings are tied), mtp (model.layers.{n_layers…}).

Left out: KV caches and decoding (deepseek_jax.sampling), pipeline parallelism.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import layers
from deepseek_jax.model.blocks import BlockStack, attention_mask
from deepseek_jax.model.layers import RMSNorm, param
from deepseek_jax.model.mtp import MTP


class Transformer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None):
        c = self.config
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        mask = attention_mask(B, T, segment_ids)                                # [B, T, S]

        embed = param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"), c)
        x = jnp.take(embed, tokens, axis=0).astype(c.dtype)                      # [B, T, D]
        x = layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))

        n_dense = c.n_layers if not c.n_routed_experts else c.n_dense_layers
        if n_dense:
            x = BlockStack(c, n_dense, moe=False, name="dense_layers")(x, positions, mask)
        if c.n_moe_layers:
            x = BlockStack(c, c.n_moe_layers, moe=True, name="moe_layers")(x, positions, mask)

        head = (embed.T if c.tie_embeddings
                else param(self, "lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"), c))
        normed = RMSNorm(c, name="final_norm")(x)                                # [B, T, D]
        logits = jnp.einsum("BTD,DV->BTV", normed, head.astype(c.dtype),
                            preferred_element_type=jnp.float32)                  # [B, T, V]
        logits = layers.constrain(logits, (layers.BATCH, layers.LENGTH, layers.VOCAB))
        if not c.mtp_depth:
            return logits, None
        mtp_logits = MTP(c, name="mtp")(x, tokens, embed, head, positions, mask)  # [K, B, T, V]
        return logits, mtp_logits


def init_variables(rng: jax.Array, config: ModelConfig, batch: int = 1, length: int = 8) -> dict:
    """Fresh variables {"params", "routing"?} for `Transformer(config)` (statistics dropped)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    variables = jax.jit(Transformer(config).init)(rng, tokens)
    return {k: v for k, v in variables.items() if k != "moe_stats"}
