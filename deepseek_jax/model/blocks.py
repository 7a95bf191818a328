"""The transformer block, its stacking (scanned or unrolled, with remat), the attention masks, and
the block's KV-cache path.

  x = x + MLA(RMSNorm(x))
  x = x + FFN(RMSNorm(x))        FFN = dense SwiGLU (first `n_dense_layers`) or DeepSeekMoE

Identical blocks are stacked with `nn.scan` so compile time and HLO size stay flat in depth (the
61-layer V3 compiles as two loop bodies); the parameters of a scanned stack get a leading layer
axis L (logical name "layers"). `scan_layers=False` unrolls the stack for debugging; its
parameters are then named `layer_0`, `layer_1`, … (not interchangeable with the scanned layout).
Rematerialization wraps each block with the policy `config.remat_policy` names (`remat_policy`
below): "full" keeps only the block's input for the backward pass, a `jax.checkpoint_policies`
name keeps what that policy saves, and a preset or "custom:NAME=ACTION,..." spec keeps the
activations the model names (`config.REMAT_NAMES`, tagged where they are computed with
`checkpoint_name`), in device memory or offloaded to the host. Values computed inside a kernel's
own custom VJP (the fused attention backends, the FSDP-chunked experts) are not named: the
kernel's residuals are recomputed with the rest under any policy other than "none".

Decoding (`cache` given; `deepseek_jax.sampling` builds the caches). A cache slot is a position:
row b's token at position p lives in slot p, so rows of different lengths simply sit at
different slots, and a query at position p sees slots 0 … p (`cache_mask`). One layer's cache
is a dict of arrays, one of two kinds:

  latent    {"c_kv": [B, S, C], "k_rope": [B, S, R]}          what MLA needs: C + R per token
  expanded  {"k": [B, N, S, H+R], "v": [B, N, S, U]}          the MHA-style baseline

(the expanded cache is heads-major, as MHA decode caches usually are: the attention matmuls
batch over (B, N), and with S between B and N those batch dimensions would not be contiguous,
which XLA typically resolves by transposing the whole cache each step, an unfair baseline).

A block writes the new tokens' entries at their positions into a copy of its layer's cache,
attends over it (latent: `MLA.attend` with `config.attention_impl`, which the sampler sets to
"absorbed" for decode steps; expanded: `expanded_cache_attention`), and returns the new entries
[B, T, ...] only; `BlockStack` writes the entries of all its layers into the stacked cache
[L, B, S, ...] once, after the scan (in place when the caller donates the cache). The transient
copy is one layer's cache, not a second copy of the whole stack.

Masks: without a cache the blocks carry an `attention.SelfMask` (segment ids, token mask; causal
implied) down to MLA, which hands it to the attention backends (`model/attention.py`); with a
cache they carry the dense cache mask [B, T, S]. `attention_mask` below is the dense form of the
former, the einsum reference's mask.

Parameter names (frozen): attn_norm (HF input_layernorm), attn (self_attn), ffn_norm
(post_attention_layernorm), mlp (dense FFN) or moe (MoE FFN).

Left out: paged or ring-buffer caches, cache quantization, fused decode-attention kernels.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.config import ModelConfig, remat_names
from deepseek_jax.model import layers, pipeline
from deepseek_jax.model.layers import MLP, RMSNorm
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE, combine_microbatch_stats
from deepseek_jax.model.rope import rope_angles

_MASKED = -1e30  # as in mla.py: finite, so a fully masked row stays NaN-free


def attention_mask(batch: int, length: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal mask [B, T, S=T], True where query t may attend key s; packed segments stay apart.
    (`attention.SelfMask(segment_ids).dense(B, T)` is the same mask.)"""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (batch, length, length))
    if segment_ids is not None:                                   # [B, T]
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask                                                   # [B, T, S]


# --- cache helpers (pure) -------------------------------------------------------------------------

def cache_mask(positions: jax.Array, length: int) -> jax.Array:
    """[B, T, S]: query at position p (positions [B, T]) may read cache slots 0 … p of S."""
    slots = jnp.arange(length)
    return slots[None, None, :] <= positions[:, :, None]          # [B, T, S]


def cache_length(layer_cache: dict) -> int:
    """S of one layer's cache, stacked ([L, B, ...]) or not: the axis before the last."""
    return (layer_cache["c_kv"] if "c_kv" in layer_cache else layer_cache["v"]).shape[-2]


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """One entry of one layer: new [B, T, ...] written at slots `positions` [B, T] of cache
    [B, S, ...] (latent) or [B, N, S, ...] (expanded, new [B, T, N, ...]).

    Slots outside [0, S) are dropped (the sampler checks lengths before compiling).
    """
    rows = jnp.arange(cache.shape[0])[:, None]                    # [B, 1]
    new = new.astype(cache.dtype)
    if cache.ndim == 3:                                           # [B, S, C|R]
        return cache.at[rows, positions].set(new, mode="drop")
    # [B, N, S, .]: the two index arrays sit apart, so the indexed shape is [B, T, N, .] = new's.
    return cache.at[rows, :, positions].set(new, mode="drop")


def write_stacked_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Stacked cache [L, B, ...] with new [L, B, T, ...] written at `positions` [B, T]."""
    return jax.vmap(write_cache, in_axes=(0, 0, None))(cache, new, positions)


def take_positions(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, T, ...] at indices `index` [B, T'] along T: [B, T', ...]."""
    index = index.reshape(*index.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)


def expanded_cache_attention(q_nope, q_rope, k, v, mask, scale, dtype):
    """Attention over an expanded (MHA-style) cache; the baseline the latent cache is measured by.

    q_nope [B, T, N, H], q_rope [B, T, N, R], k [B, N, S, H+R] (k_nope then the shared RoPE key
    repeated per head), v [B, N, S, U], mask [B, T, S]. Returns [B, T, N, U]. In the einsums,
    A = H + R is one full q/k head.
    """
    q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)      # [B, T, N, A]
    scores = jnp.einsum("BTNA,BNSA->BNTS", q.astype(dtype), k.astype(dtype),
                        preferred_element_type=jnp.float32) * scale           # [B, N, T, S]
    scores = jnp.where(mask[:, None, :, :], scores, _MASKED)                  # [B, N, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)                     # [B, N, T, S]
    return jnp.einsum("BNTS,BNSU->BTNU", probs, v.astype(dtype))              # [B, T, N, U]


def _cached_attention(attn: MLA, h: jax.Array, positions: jax.Array, mask: jax.Array,
                      cache: dict, c: ModelConfig) -> tuple[jax.Array, dict]:
    """MLA over h [B, T, D] with one layer's cache: (output [B, T, D], new entries [B, T, ...])."""
    cos, sin = rope_angles(positions, c)                                      # [B, T, R/2]
    q_nope, q_rope = attn.queries(h, cos, sin)             # [B, T, N, H], [B, T, N, R]
    c_kv, k_rope = attn.latents(h, cos, sin)               # [B, T, C], [B, T, R]
    if set(cache) == {"c_kv", "k_rope"}:
        new = {"c_kv": c_kv, "k_rope": k_rope}
        full = {k: write_cache(cache[k], new[k], positions) for k in new}   # [B, S, C|R]
        return attn.attend(q_nope, q_rope, full["c_kv"], full["k_rope"], mask), new
    if set(cache) != {"k", "v"}:
        raise ValueError(f"unknown cache entries {sorted(cache)}; expected c_kv/k_rope (latent) "
                         "or k/v (expanded), as deepseek_jax.sampling.init_cache builds them")
    k_nope = layers.einsum("BTC,CNH->BTNH", c_kv, attn.w_uk, c.dtype)        # [B, T, N, H]
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :].astype(c.dtype),
                              (*k_rope.shape[:2], c.n_heads, k_rope.shape[-1]))  # [B, T, N, R]
    new = {"k": jnp.concatenate([k_nope, k_rope], axis=-1),                  # [B, T, N, H+R]
           "v": layers.einsum("BTC,CNU->BTNU", c_kv, attn.w_uv, c.dtype)}    # [B, T, N, U]
    full = {k: write_cache(cache[k], new[k], positions) for k in new}       # [B, N, S, .]
    o = expanded_cache_attention(q_nope, q_rope, full["k"], full["v"], mask,
                                 c.softmax_scale, c.dtype)                    # [B, T, N, U]
    o = layers.constrain(o, (layers.BATCH, layers.LENGTH, layers.HEADS, None))
    return layers.einsum("BTNU,NUD->BTD", o, attn.w_o, c.dtype, c.fp8, c.fp8_backend,
                         attn.a_o), new                                       # [B, T, D]


class Block(nn.Module):
    """One pre-norm transformer block, scannable: returns (x, None), or (x, new cache entries)
    when `cache` (this layer's cache, see the module docstring) is given. `mask` is an
    `attention.SelfMask` without a cache, the dense cache mask [B, T, S] with one. `token_mask`
    [B, T] (true = a real token) keeps padding out of the MoE statistics (`MoE`)."""
    config: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask,
                 cache: dict | None = None, token_mask: jax.Array | None = None):
        c = self.config
        x = layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED))        # [B, T, D]
        x = checkpoint_name(x, "layer_input")
        attn = MLA(c, name="attn")
        h = RMSNorm(c, name="attn_norm")(x)                                       # [B, T, D]
        if cache is None:
            x = x + attn(h, positions, mask)                                      # [B, T, D]
        else:
            out, cache = _cached_attention(attn, h, positions, mask, cache, c)
            x = x + out                                                           # [B, T, D]
        h = RMSNorm(c, name="ffn_norm")(x)                                        # [B, T, D]
        if self.moe:
            x = x + MoE(c, name="moe")(h, token_mask,
                                       getattr(mask, "order", None))               # [B, T, D]
        else:
            x = x + MLP(c, c.d_ff, name="mlp")(h)                                 # [B, T, D]
        return layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.EMBED)), cache


def remat_policy(policy: str):
    """The `jax.checkpoint` policy for a config's `remat_policy` (not "none"): None (save nothing
    but the block's input) for "full", a `jax.checkpoint_policies` function by its name, or, for
    a preset or a "custom:" spec, one that saves or offloads the named activations
    (`config.REMAT_NAMES`) it lists. Offloaded values go to pinned host memory after the forward
    pass and come back for the backward (on CPU, which has one memory, they stay put)."""
    names = remat_names(policy)
    if names is None:
        return None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[n for n, a in names.items() if a == "save"],
        names_which_can_be_offloaded=[n for n, a in names.items() if a == "offload"],
        offload_src="device", offload_dst="pinned_host")


def _remat(cls, config: ModelConfig):
    if config.remat_policy == "none":
        return cls
    policy = remat_policy(config.remat_policy)
    # prevent_cse is only needed outside scan (scan already stops XLA from merging the recompute).
    return nn.remat(cls, policy=policy, prevent_cse=not config.scan_layers)


class BlockStack(nn.Module):
    """`n` identical blocks (all dense or all MoE) applied in order to x [B, T, D].

    Returns x, or (x, cache) when a stacked cache {name: [L, B, S, ...]} is given: the cache
    with the new tokens' entries written at `positions` [B, T] in every layer. `token_mask`
    (training only) goes to every block (see `Block`).
    """
    config: ModelConfig
    n: int
    moe: bool

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask,
                 cache: dict | None = None, token_mask: jax.Array | None = None):
        c = self.config
        if cache is None:
            block = _remat(Block, c)
            if c.scan_layers:
                if c.pipelined(self.n) and not self.is_initializing():
                    return self._pipelined(x, positions, mask, token_mask)
                stack = _scanned(block, self.n, c)
                x, _ = stack(c, self.moe, name="layers")(x, positions, mask, None, token_mask)
                return x
            for i in range(self.n):
                x, _ = block(c, self.moe, name=f"layer_{i}")(x, positions, mask, None,
                                                             token_mask)
            return x

        # Decoding: no remat (nothing is differentiated); the layer's cache slice is scanned
        # along with its parameters, the new entries [L, B, T, ...] come out as the scan's ys.
        if c.scan_layers:
            stack = _scanned(Block, self.n, c, in_axes=(nn.broadcast, nn.broadcast, 0))
            x, new = stack(c, self.moe, name="layers")(x, positions, mask, cache)
        else:
            entries = []
            for i in range(self.n):
                layer_cache = {k: v[i] for k, v in cache.items()}                # [B, S, ...]
                x, e = Block(c, self.moe, name=f"layer_{i}")(x, positions, mask, layer_cache)
                entries.append(e)
            new = jax.tree.map(lambda *e: jnp.stack(e), *entries)               # [L, B, T, ...]
        return x, {k: write_stacked_cache(cache[k], new[k], positions) for k in cache}

    def _pipelined(self, x, positions, mask, token_mask):
        """The training path of a stack split into pipeline stages (`model/pipeline.py`)."""
        c, P = self.config, self.config.pipeline_stages
        I, J = self.n // P, c.n_microbatches
        stage = _scanned(_remat(Block, c), I, c)(c, self.moe, parent=None)   # I layers
        variables = flax.core.meta.unbox(self.variables)
        stage_vars = pipeline.by_stage(
            {k: v["layers"] for k, v in variables.items() if k in ("params", "routing")}, P)
        rows = {"positions": positions, "mask": mask, "token_mask": token_mask}

        def stage_fn(v, h, mine, live):
            keep = jnp.broadcast_to(live, h.shape[:2])           # bubble: no statistics
            if mine["token_mask"] is not None:
                keep = keep & mine["token_mask"]                  # [b, T]
            (y, _), stats = stage.apply(v, h, mine["positions"], mine["mask"], None, keep,
                                        mutable=["moe_stats"])                 # [b, T, D]
            stats = jax.tree.map(lambda a: jnp.where(live, a, 0), stats.get("moe_stats", {}))
            return y, stats

        y, stats = pipeline.run(stage_fn, stage_vars, x, rows, stages=P, microbatches=J)
        if stats and self.is_mutable_collection("moe_stats"):
            stats = jax.tree.map(lambda a: a.reshape(self.n, *a.shape[2:]),
                                 combine_microbatch_stats(stats, J))          # [L, ...]
            self.put_variable("moe_stats", "layers", stats)
        return y


def _scanned(block, n: int, c: ModelConfig, in_axes=(nn.broadcast,) * 4):
    """`block` scanned over n layers; the layer axis is named "stage_layers" in a stack the
    config pipelines (`ModelConfig.pipelined`), "layers" otherwise."""
    name = "stage_layers" if c.pipelined(n) else "layers"
    return nn.scan(block, length=n, variable_axes={"params": 0, "routing": 0, "moe_stats": 0},
                   split_rngs={"params": True}, in_axes=in_axes,
                   metadata_params={nn.PARTITION_NAME: name})
