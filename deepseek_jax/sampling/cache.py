"""KV caches for decoding: the MLA latent cache, the expanded (MHA-style) baseline, their sizes.

  cache = init_cache(config, batch_size, max_len)                  # latent, config.dtype
  logits, hidden, cache = Transformer(config).apply(variables, tokens, positions, cache,
                                                    method="decode")

A cache is a plain dict of arrays, one entry per block stack of the model, each stacked over
that stack's layers like its parameters, plus one entry for MTP depth 1 when `mtp=True`
(speculative decoding drafts with it):

  kind="latent"    {"dense_layers": {"c_kv": [L, B, S, C], "k_rope": [L, B, S, R]},
                    "moe_layers": {...},  "mtp": {"c_kv": [B, S, C], "k_rope": [B, S, R]}}
  kind="expanded"  the same with {"k": [L, B, N, S, H+R], "v": [L, B, N, S, U]} (heads-major)

c_kv is the normalized kv latent and k_rope the rotated RoPE key (`MLA.latents`): C + R values
per token per layer, 576 for V3. The expanded cache keeps keys and values per head, N·(H+R) +
N·U values (40,960 for V3), and exists as the baseline the latent cache is measured against
(`experiments/benchmarks/decode.py`). Slot s of a row holds that row's token at position s
(see `deepseek_jax.model.blocks`); nothing else is stored: the sampler tracks positions.

Sharding: `cache_logical_axes` names every axis (batch "act_batch", heads "act_heads", the rest
unsharded), so under the parallel presets the cache splits its batch over the batch axes.

Left out: quantized caches (V2 serves a ~6-bit cache), paged / ring-buffer layouts, and
sharding the cache's length (sequence parallelism).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.blocks import cache_length

KINDS = ("latent", "expanded")


def _stacks(config: ModelConfig) -> dict[str, int]:
    """{stack name: layers}, as `Transformer` builds its stacks."""
    n_dense = config.n_layers if not config.n_routed_experts else config.n_dense_layers
    return {name: n for name, n in (("dense_layers", n_dense),
                                    ("moe_layers", config.n_moe_layers)) if n}


def _row_shapes(config: ModelConfig, kind: str, S: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one row of one layer's cache entries."""
    c = config
    if kind == "latent":
        return {"c_kv": (S, c.kv_lora_rank), "k_rope": (S, c.qk_rope_head_dim)}
    if kind == "expanded":
        return {"k": (c.n_heads, S, c.qk_head_dim), "v": (c.n_heads, S, c.v_head_dim)}
    raise ValueError(f"unknown cache kind {kind!r}; use one of {KINDS}")


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None, *,
               kind: str = "latent", mtp: bool = False) -> dict:
    """A zeroed cache for `batch_size` rows of `max_len` slots.

    Args:
      config: the model.
      batch_size: B.
      max_len: S, slots per row: the longest prompt plus the tokens to generate (plus one more
        for speculative decoding, whose verify step writes one slot past the last token).
      dtype: storage dtype (default `config.dtype`).
      kind: "latent" (MLA: c_kv and k_rope) or "expanded" (per-head k and v).
      mtp: also a cache for MTP depth 1 (needed by speculative decoding).

    Returns:
      the dict described in the module docstring. Use `jax.eval_shape` to size it without
      allocating.
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be positive")
    if mtp and not config.mtp_depth:
        raise ValueError("mtp=True needs a model with MTP modules; this config has mtp_depth=0")
    dtype = config.dtype if dtype is None else dtype
    shapes = _row_shapes(config, kind, max_len)
    cache = {name: {k: jnp.zeros((n, batch_size, *s), dtype) for k, s in shapes.items()}
             for name, n in _stacks(config).items()}
    if mtp:
        cache["mtp"] = {k: jnp.zeros((batch_size, *s), dtype) for k, s in shapes.items()}
    return cache


def cache_kind(cache: dict) -> str:
    """"latent" or "expanded", read from the entry names."""
    keys = set(next(iter(cache.values())))
    return "latent" if keys == {"c_kv", "k_rope"} else "expanded"


def cache_logical_axes(cache: dict) -> dict:
    """The cache's tree with a tuple of logical axis names per array (`deepseek_jax.parallel`)."""
    row = {"c_kv": ("act_length", None), "k_rope": ("act_length", None),
           "k": ("act_heads", "act_length", None), "v": ("act_heads", "act_length", None)}
    return {name: {k: (("act_batch",) if name == "mtp" else ("layers", "act_batch")) + row[k]
                   for k in entries}
            for name, entries in cache.items()}


def cache_bytes(cache: dict) -> int:
    """Bytes the cache occupies (works on `jax.eval_shape` results)."""
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(cache))


def cache_bytes_per_token_per_layer(cache: dict) -> int:
    """Bytes one token takes in one layer's cache, measured from the arrays (abstract ones too).

    Latent: (C + R)·itemsize (576 values for V3); expanded: (N·(H+R) + N·U)·itemsize.
    """
    sizes = set()
    for name, entries in cache.items():
        tokens = math.prod(next(iter(entries.values())).shape[:1 if name == "mtp" else 2])
        tokens *= cache_length(entries)                                   # (L·)B·S
        sizes.add(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                      for a in entries.values()) // tokens)
    if len(sizes) != 1:
        raise ValueError(f"cache layers differ in size per token: {sorted(sizes)}")
    return sizes.pop()
