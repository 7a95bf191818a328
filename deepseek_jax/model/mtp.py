"""Multi-Token Prediction (V3 §2.2): K sequential modules that each predict one token further.

Module k (k = 1 … K) at position i combines the previous depth's hidden state h^{k−1}_i with the
embedding of token t_{i+k} and predicts t_{i+k+1}:

  h'^k_i = eh_proj [ enorm(Emb(t_{i+k})) ; hnorm(h^{k−1}_i) ]     embedding first, as the
                                                                   released weights (the paper
                                                                   writes the reverse order)
  h^k    = Block_k(h'^k)                    one full MLA + FFN block, causal over positions
  P^k_i  = softmax(OutHead(norm_k(h^k_i)))  embedding and output head shared with the main model

h^0 is the main model's hidden state AFTER its final RMSNorm (the input of its output head),
and h^k (k ≥ 1) is depth k's block output before norm_k. Why after: DeepSeek published no MTP
code, and the paper says only "the representation given by the main model". The released
MTP weights (`model.layers.61` of V3/R1) are served by vLLM (`deepseek_mtp`) and SGLang
(`deepseek_nextn`), and both feed the module the final-normed state their main model returns
(vLLM's `DeepseekV2Model.forward` ends with `self.norm`; SGLang hands the drafter the hidden
states captured at its logits processor, after the norm). Those are the implementations the
released weights are deployed and measured with, and both chain further depths on the MTP
block's un-normed output, as here. So imported weights get the state they are served with,
and training from scratch makes the same choice, so that a module trained here drafts the way
it was trained. (MaxText feeds the state before the final norm; for a model trained from
scratch either is self-consistent, and one is kept.)
All depths keep the full length T: the input tokens are shifted left by k and the last k
positions, which have no t_{i+k}, see token 0; the loss masks every position whose target lies
beyond the sequence (`deepseek_jax.train.losses.mtp_loss`). When the sequence is stored in the
zigzag order of context parallelism (the mask's `order`), the shift is taken in natural order.
In training, each depth's backward pass completes its parameters' gradients before its input
gradient goes on into the trunk (`_params_grad_first`): an order for the compiler, no change of
value.

Parameter names (frozen; HF names of `model.layers.{n_layers + k − 1}`): layer_{k−1}/enorm,
hnorm, eh_proj [2D, D] (eh_proj, transposed), block (the decoder layer), norm
(shared_head.norm). HF's shared_head.head and embed_tokens copies are not stored.

Drafting (`MTP.draft`, used by speculative decoding in `deepseek_jax.sampling`): depth 1 alone,
with a KV cache for its block, on main hidden states h^0 [B, T, D] and the tokens that follow
them, t_{i+1} at position i; its logits at i are the draft distribution for t_{i+2}.

Left out: DeepSeek's inference-time zeroing of the embedding at absolute position 0 (not part of
the training objective), dropping the modules at inference (simply ignore the MTP logits), and
drafting with depths beyond the first (their caches would lag one position per depth).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.blocks import Block, take_positions, write_cache
from deepseek_jax.model.head import head_logits
from deepseek_jax.model.layers import RMSNorm, lookup, param


def shift_left(tokens: jax.Array, k: int) -> jax.Array:
    """tokens [B, T] → t_{i+k} at position i, 0 past the end."""
    pad = jnp.zeros((tokens.shape[0], k), tokens.dtype)
    return jnp.concatenate([tokens[:, k:], pad], axis=1)      # [B, T]


class MTPLayer(nn.Module):
    """One MTP depth: returns (h^k [B, T, D], norm_k(h^k) [B, T, D]), and the block's new cache
    entries as a third element when `cache` (one layer's cache, see `blocks`) is given."""
    config: ModelConfig

    @nn.compact
    def __call__(self, h_prev, emb_next, positions, mask, cache: dict | None = None,
                 token_mask: jax.Array | None = None):
        c = self.config
        D = c.d_model
        w = param(self, "eh_proj", (2 * D, D), ("mtp_in", "embed"), c)
        both = jnp.concatenate([RMSNorm(c, name="enorm")(emb_next),
                                RMSNorm(c, name="hnorm")(h_prev)], axis=-1)  # [B, T, 2D]
        x = jnp.einsum("BTI,ID->BTD", both, w.astype(c.dtype))                # [B, T, D]
        h, new = Block(c, moe=c.n_routed_experts > 0, name="block")(x, positions, mask, cache,
                                                                    token_mask)
        if cache is None:
            return h, RMSNorm(c, name="norm")(h)
        return h, RMSNorm(c, name="norm")(h), new


class MTP(nn.Module):
    """All K depths. Returns logits [K, B, T, V] (fp32); [k−1, :, i] predicts token t_{i+k+1}."""
    config: ModelConfig

    def setup(self):
        self.layers = [MTPLayer(self.config, name=f"layer_{k}")
                       for k in range(self.config.mtp_depth)]

    def __call__(self, h, tokens, embed, head, positions, mask, token_mask=None):
        """h [B, T, D] main hidden state, tokens [B, T], embed [V, D], head [D, V]; token_mask
        [B, T] or None: depth k's MoE statistics count position i when tokens i and i+k are
        both real (its two inputs)."""
        normed = self.hidden_states(h, tokens, embed, positions, mask, token_mask)
        return jnp.stack([_logits(x, head, self.config) for x in normed])        # [K, B, T, V]

    def hidden_states(self, h, tokens, embed, positions, mask, token_mask=None):
        """norm_k(h^k) [K, B, T, D] for k = 1 … K: what the shared head turns into depth k's
        logits (the train step applies the head itself, chunk by chunk). Arguments as in
        `__call__`."""
        c = self.config
        order = getattr(mask, "order", None)             # T in the zigzag order: shift in natural
        shift = shift_left if order is None else order.shift_left
        out = []
        for k in range(1, c.mtp_depth + 1):
            emb = lookup(embed, shift(tokens, k), c.dtype)                        # [B, T, D]
            mask_k = (None if token_mask is None
                      else token_mask & shift(token_mask, k))                    # [B, T]
            layer = self.layers[k - 1]
            if self.is_initializing():
                h, normed = layer(h, emb, positions, mask, None, mask_k)
            else:
                h, normed = _params_grad_first(layer, h, emb, positions, mask, mask_k)
            out.append(normed)                                                    # [B, T, D]
        return jnp.stack(out)                                                     # [K, B, T, D]

    def draft(self, h, next_tokens, embed, head, positions, mask, cache: dict,
              logits_index: jax.Array | None = None):
        """Depth 1 with a cache, for speculative decoding.

        Args:
          h: main hidden states h^0 [B, T, D] (after the final norm) at `positions` [B, T].
          next_tokens: t_{i+1} [B, T], the token that follows position i.
          embed, head: the main model's embedding [V, D] and output head [D, V].
          mask: [B, T, S] over the cache slots (`blocks.cache_mask`).
          cache: depth 1's layer cache {name: [B, S, ...]}.
          logits_index: [B, T'] indices along T where logits are wanted (default: all T).

        Returns:
          (logits [B, T (or T'), V] fp32, the draft distribution for t_{i+2}; the cache with the
          new entries written at `positions`).
        """
        c = self.config
        emb = lookup(embed, next_tokens, c.dtype)                                 # [B, T, D]
        _, normed, new = self.layers[0](h, emb, positions, mask, cache)
        cache = {k: write_cache(cache[k], new[k], positions) for k in cache}     # [B, S, ...]
        if logits_index is not None:
            normed = take_positions(normed, logits_index)                         # [B, T', D]
        return _logits(normed, head, c), cache                                    # [B, T', V]


def _layer(layer, h, emb, positions, mask, token_mask):
    return layer(h, emb, positions, mask, None, token_mask)


def _layer_fwd(layer, h, emb, positions, mask, token_mask):
    return nn.vjp(lambda m, h, e: m(h, e, positions, mask, None, token_mask), layer, h, emb)


def _layer_bwd(pull, g):
    d_params, d_h, d_emb = jax.lax.optimization_barrier(pull(g))
    return d_params, d_h, d_emb, None, None, None


# One MTP depth whose backward finishes its parameters' gradients (reduce-scatters included)
# before its input gradient flows on into the trunk. Its values are the layer's own; only the
# order changes. Without it the compiler may leave the depth's expert weight-gradient GEMMs,
# whose results nothing else waits for, until after the trunk's whole backward pass, holding
# their inputs (two [pairs, D]-sized buffers per projection: 2.5 GiB per chip for V3 on 512
# chips with EP8) or their full-size unreduced results through it. The trunk's scanned layers
# need no such fence: a loop iteration ends with its layer's gradients.
_params_grad_first = nn.custom_vjp(_layer, forward_fn=_layer_fwd, backward_fn=_layer_bwd)


def _logits(normed: jax.Array, head: jax.Array, c: ModelConfig) -> jax.Array:
    return head_logits(normed, head, c.dtype)                                     # [B, T, V]
