"""The pieces plain and speculative decoding share: what a run returns, its static and traced
settings, the two models a run steps (prefill and decode step), the prompts' prefill, the
cache's sharding constraints and row repetition, per-row keys and the token choice.

`generate.py` runs plain decoding and dispatches to `speculative.py`; both loops build on this
file, so neither imports the other's loop. `batching.py` (shared prefill, continuous batching)
builds on all three.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer, layers
from deepseek_jax.sampling.cache import cache_logical_axes, init_cache
from deepseek_jax.sampling.sample import choose, token_logprobs


class Generation(NamedTuple):
    """What `generate` returns (device arrays).

    tokens: [B, N] int32 generated ids (prompt not included), `pad_id` after each row's end.
    logprobs: [B, N] fp32 log-prob of each generated token (see the module docstring), 0 after
      the end.
    lengths: [B] int32 tokens generated per row, EOS included.
    prompt_lengths: [B] int32 prompt tokens per row.
    steps: [] int32 model passes after the prefill (decode steps, or verify steps when
      speculative).
    drafted: [B] int32 MTP drafts that could have become tokens (0 unless speculative).
    accepted: [B] int32 drafts accepted.
    """
    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    prompt_lengths: jax.Array
    steps: jax.Array
    drafted: jax.Array
    accepted: jax.Array

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafted ones, over all rows (nan when nothing was drafted)."""
        drafted = int(np.sum(np.asarray(self.drafted)))
        return float(np.sum(np.asarray(self.accepted))) / drafted if drafted else float("nan")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The static (compile-time) part of a generate call; everything else is a runtime value
    (temperature, top-k, top-p, EOS and pad ids), so changing those does not recompile."""
    max_new_tokens: int
    speculative: bool
    cache_len: int
    cache_kind: str


class Knobs(NamedTuple):
    """Sampling settings as traced scalars: temperature (0 = greedy), top_k (0 = off), top_p
    (1 = off)."""
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array


def step_models(config: ModelConfig, kind: str) -> tuple[Transformer, Transformer]:
    """(prefill model, decode-step model): decode steps use absorbed MLA over the latent cache."""
    step = config.replace(attention_impl="absorbed") if kind == "latent" else config
    return Transformer(config), Transformer(step)


def prefill(variables, ids, lengths, *, config: ModelConfig, s: Settings, mtp: bool = False):
    """The prompts' pass: (logits [B, V] fp32 at each row's last prompt token, hidden [B, P, D]
    (MTP's input), a cache of `s.cache_len` slots with the prompts written). The pass runs over
    a cache of the prompt width P, then the cache is padded to S slots: the prefill's attention
    (expanded, per `config.attention_impl`) up-projects every slot it reads, so its cost grows
    with the slots, and P ≪ S when many tokens are generated. `mtp` adds the (still empty) MTP
    depth-1 cache that speculative decoding fills.

    Under a mesh whose batch axes do not divide B (a GRPO step's few distinct prompts on many
    devices), the pass runs on B rounded up to a multiple of them, the extra rows a one-token
    prompt, and returns the B real rows: the MoE's per-device routing and expert-parallel
    exchange need every device to hold whole rows."""
    B, P = ids.shape
    shards = math.prod(jax.sharding.get_abstract_mesh().shape[a]
                       for a in layers.split_axes(layers.BATCH))
    extra = -B % shards
    if extra:
        ids = jnp.pad(ids, ((0, extra), (0, 0)))                                # [B', P]
        lengths = jnp.pad(lengths, (0, extra), constant_values=1)              # [B']
    model, _ = step_models(config, s.cache_kind)
    cache = constrain_cache(init_cache(config, B + extra, P, kind=s.cache_kind, mtp=mtp))
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B + extra, P))
    logits, hidden, cache = model.apply(variables, ids, positions, cache, (lengths - 1)[:, None],
                                        method="decode")                        # [B', 1, V]
    if extra:
        cache = {name: jax.tree.map(lambda a: a[:B] if name == "mtp" else a[:, :B], entries)
                 for name, entries in cache.items()}
    return logits[:B, 0], hidden[:B], constrain_cache(pad_slots(cache, s.cache_len))


def pad_slots(cache: dict, length: int) -> dict:
    """The cache with its slot axis (the one before the last) zero-padded to `length` slots."""
    def pad(a):
        widths = [(0, 0)] * a.ndim
        widths[-2] = (0, length - a.shape[-2])
        return jnp.pad(a, widths)
    return jax.tree.map(pad, cache)


def repeat_rows(cache: dict, times: int) -> dict:
    """A cache with each row repeated `times` times in a row (row b → rows b·times … b·times +
    times − 1): one prompt's prefilled entries handed to its samples."""
    return constrain_cache({name: jax.tree.map(
        lambda a: jnp.repeat(a, times, axis=0 if name == "mtp" else 1), entries)
        for name, entries in cache.items()})


def constrain_cache(cache: dict) -> dict:
    """Logical sharding constraints on a cache (no-op outside a mesh with rules)."""
    return jax.tree.map(lambda a, names: nn.with_logical_constraint(a, names), cache,
                        cache_logical_axes(cache))


def fold_counts(keys: jax.Array, counts: jax.Array) -> jax.Array:
    """keys [B] each folded with its own count [B] (token k of a row uses fold_in(key, k))."""
    return jax.vmap(jax.random.fold_in)(keys, counts)


def fold_keys(keys: jax.Array, *data) -> jax.Array:
    """keys [B] with each of `data` (ints or int scalars) folded in, in order."""
    def one(key):
        for d in data:
            key = jax.random.fold_in(key, d)
        return key
    return jax.vmap(one)(keys)


def pick(logits, keys, knobs: Knobs):
    """(tokens [B], log-probs [B]) for logits [B, V]."""
    tokens = choose(logits, keys, knobs.temperature, knobs.top_k, knobs.top_p)
    return tokens, token_logprobs(logits, tokens, knobs.temperature)
