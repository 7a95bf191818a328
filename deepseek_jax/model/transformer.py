"""The DeepSeek-V3 language model: embedding, dense and MoE block stacks, final norm, head, MTP.

`Transformer(config).apply(variables, tokens)` with int tokens [B, T] returns a pair

  (logits [B, T, V] float32,  mtp_logits [K, B, T, V] float32 or None when config.mtp_depth = 0)

where logits[:, i] predicts token t_{i+1} and mtp_logits[k−1, :, i] predicts t_{i+k+1}.
`variables` holds "params" and, for V3-style routing, "routing" (the per-layer selection bias,
stacked [L, E] under scan; state updated by `routing.update_routing_bias`, never by the optimizer).
Apply with `mutable=["moe_stats"]` to also get the per-layer expert loads and sequence-balance
losses that the train step needs. `method="head_inputs"` returns what the output head takes
instead of logits — (hidden [B, T, D], mtp_hidden [K, B, T, D] or None, head [D, V]) — for a
loss that applies the head a chunk of positions at a time (`model/head.py`, train/losses.py).

Optional inputs: `positions` [B, T] (default 0 … T−1), `segment_ids` [B, T] for packed
sequences (tokens attend only within their segment), and `token_mask` [B, T] bool (true = a
real token, false = padding; default: all real), which keeps padding out of the MoE expert
loads and sequence-balance losses (the bias update and the balance loss); no output depends
on it.

Parameter names (frozen; HF names in brackets): embed [V, D] (embed_tokens), dense_layers /
moe_layers (the first `n_dense_layers` and the rest of model.layers), final_norm (norm),
lm_head [D, V] (lm_head, transposed; absent when embeddings are tied), mtp (model.layers.{n_layers…}).

Decoding: `apply(variables, tokens, positions, cache, method="decode")` runs the stacks over
a KV cache and returns (logits, hidden, cache); `method="draft"` runs MTP depth 1 over its own
cache for speculative decoding. Both are documented on the methods; caches, sampling and the
generation loop are in `deepseek_jax.sampling`. Without a cache nothing changes: `__call__`
runs exactly the training computation.

Pipeline parallelism (`config.pipeline_stages` > 1) changes how a stack runs in training, not
its parameters: `model/pipeline.py`, `blocks.BlockStack`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import layers
from deepseek_jax.model.attention import SelfMask
from deepseek_jax.model.blocks import BlockStack, cache_length, cache_mask, take_positions
from deepseek_jax.model.head import head_logits
from deepseek_jax.model.layers import RMSNorm, param
from deepseek_jax.model.mtp import MTP
from deepseek_jax.model.zigzag import Zigzag


class Transformer(nn.Module):
    config: ModelConfig

    def setup(self):
        # Attribute names are the frozen parameter names (see the module docstring); `embed`
        # before `lm_head` keeps the parameter RNG stream of earlier versions.
        c = self.config
        self.embed = param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"), c)
        n_dense = c.n_layers if not c.n_routed_experts else c.n_dense_layers
        if n_dense:
            self.dense_layers = BlockStack(c, n_dense, moe=False)
        if c.n_moe_layers:
            self.moe_layers = BlockStack(c, c.n_moe_layers, moe=True)
        if not c.tie_embeddings:
            self.lm_head = param(self, "lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"), c)
        self.final_norm = RMSNorm(c)
        if c.mtp_depth:
            self.mtp = MTP(c)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, token_mask: jax.Array | None = None):
        hidden, mtp_hidden, _ = self.head_inputs(tokens, positions, segment_ids, token_mask)
        logits = self._logits(hidden)                                            # [B, T, V]
        if mtp_hidden is None:
            return logits, None
        return logits, jnp.stack([self._logits(h) for h in mtp_hidden])         # [K, B, T, V]

    def head_inputs(self, tokens: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, token_mask: jax.Array | None = None,
                    order: Zigzag | None = None):
        """What the output head takes, for a loss that applies it itself (chunk by chunk,
        `model.head.map_head_chunks`) instead of holding whole logits. Same inputs as `__call__`,
        and `order`: under context parallelism, the zigzag order (`model.zigzag`) that every
        [B, T] input is stored in (positions default to its natural positions); the outputs
        are stored in it too.

        Returns:
          (hidden [B, T, D]: the final-normed states, `__call__`'s logits are
           head_logits(hidden, head, config.dtype);
           mtp_hidden [K, B, T, D]: depth k's normed states (k − 1 along K), None without MTP;
           head [D, V]: the output head as stored, param dtype; embed.T when tied).
        The MoE statistics are sown exactly as by `__call__`.
        """
        c = self.config
        B, T = tokens.shape
        if positions is None:
            natural = jnp.arange(T, dtype=jnp.int32) if order is None else order.positions(T)
            positions = jnp.broadcast_to(jnp.asarray(natural), (B, T))
        # causal within segments; no [B, T, S] array here
        mask = SelfMask(segment_ids, order=order)
        x = self._embed(tokens)                                                  # [B, T, D]
        if token_mask is not None:
            token_mask = token_mask.astype(jnp.bool_)                            # [B, T]
        for stack in self._stacks():
            x = stack(x, positions, mask, None, token_mask)                      # [B, T, D]
        normed = self.final_norm(x)                                              # [B, T, D]
        if not c.mtp_depth:
            return normed, None, self._head()
        # MTP reads the final-normed state, as the engines that serve the released MTP
        # weights do (mtp.py's docstring).
        mtp_hidden = self.mtp.hidden_states(normed, tokens, self.embed, positions, mask,
                                            token_mask)                          # [K, B, T, D]
        return normed, mtp_hidden, self._head()

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: dict,
               logits_index: jax.Array | None = None):
        """One prefill or decode step over a KV cache (built by `deepseek_jax.sampling.init_cache`).

        Args:
          tokens: int [B, T], the tokens at `positions`.
          positions: int [B, T]; token (b, t) is written to cache slot positions[b, t] and
            attends to slots 0 … positions[b, t] (earlier slots must hold that row's earlier
            tokens). Rows may sit at different positions.
          cache: {"dense_layers"?, "moe_layers"?: {name: [L, B, S, ...]}, "mtp"?: ...}; the
            "mtp" entry, if present, is passed through untouched (see `draft`).
          logits_index: int [B, T'] indices along T where logits are wanted (default: all T),
            e.g. each row's last prompt token in a prefill.

        Returns:
          (logits [B, T (or T'), V] fp32 — computed exactly as in `__call__`;
           hidden [B, T, D], the last block's output after the final norm (MTP's input);
           the cache with the new tokens' entries written).
        """
        cache, stacks = dict(cache), self._stacks()
        mask = cache_mask(positions, cache_length(cache[stacks[0].name]))        # [B, T, S]
        x = self._embed(tokens)                                                  # [B, T, D]
        for stack in stacks:
            x, cache[stack.name] = stack(x, positions, mask, cache[stack.name])  # [B, T, D]
        hidden = self.final_norm(x)                                              # [B, T, D]
        normed = hidden
        if logits_index is not None:
            normed = take_positions(hidden, logits_index)                        # [B, T', D]
        return self._logits(normed), hidden, cache

    def draft(self, hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array, cache: dict,
              logits_index: jax.Array | None = None):
        """MTP depth 1 over its cache: (logits [B, T (or T'), V] two tokens ahead, the cache).

        `hidden` [B, T, D] comes from `decode` at `positions` [B, T]; `next_tokens` [B, T] holds
        the token after each position. Only cache["mtp"] is read and written; see `MTP.draft`.
        """
        if not self.config.mtp_depth:
            raise ValueError("draft needs MTP modules; this config has mtp_depth=0")
        mask = cache_mask(positions, cache_length(cache["mtp"]))                 # [B, T, S]
        logits, mtp_cache = self.mtp.draft(hidden, next_tokens, self.embed, self._head(),
                                           positions, mask, cache["mtp"], logits_index)
        return logits, {**cache, "mtp": mtp_cache}

    def _stacks(self):
        return [getattr(self, n) for n in ("dense_layers", "moe_layers") if hasattr(self, n)]

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = layers.lookup(self.embed, tokens, self.config.dtype)                 # [B, T, D]
        return layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))

    def _head(self) -> jax.Array:
        return self.embed.T if self.config.tie_embeddings else self.lm_head      # [D, V]

    def _logits(self, normed: jax.Array) -> jax.Array:
        """Head logits [B, T, V] fp32 of final-normed states [B, T, D]."""
        return head_logits(normed, self._head(), self.config.dtype)


def init_variables(rng: jax.Array, config: ModelConfig, batch: int = 1, length: int = 8) -> dict:
    """Fresh variables {"params", "routing"?} for `Transformer(config)` (statistics dropped)."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    variables = jax.jit(Transformer(config).init)(rng, tokens)
    return {k: v for k, v in variables.items() if k != "moe_stats"}
