"""Choosing tokens from logits: temperature, top-k, top-p, log-probs, speculative acceptance.

Pure functions on fp32 logits [B, V] (the model's logits are fp32 already), one key per row.
Temperature (0 = greedy), top-k and top-p may be Python numbers or traced scalars, so one
compiled generation loop serves every setting; a disabled top-k / top-p costs nothing.

  sampling_logits   logits / T with every token outside top-k / top-p set to −inf: the
                    distribution tokens are drawn from. top-k is applied first, then top-p on
                    the renormalized top-k distribution: keep the most likely tokens until their
                    mass reaches top_p (always at least one; ties at the cut are all kept).
  choose            greedy argmax when T = 0 (first index on ties), else one draw per row from
                    softmax(sampling_logits).
  token_logprobs    log softmax(logits / T)[token] in fp32, with T = 1 when greedy: the log-prob
                    under the UNtruncated tempered distribution, whatever top-k / top-p did. This
                    is what a trainer computes as log_softmax(logits / T) at the same position
                    (GRPO compares the two), and it stays finite for every token.
  speculative_accept  the speculative-sampling rule: accept a draft d ~ q with probability
                    min(1, p(d)/q(d)), otherwise draw from the residual max(0, p − q)
                    (renormalized). The result is distributed exactly as p.

Left out: repetition / frequency penalties, min-p, beam search, per-row settings (temperature,
top-k and top-p are the same for every row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _when(flag, fn, x, *args):
    """fn(x, *args) if flag else x; `flag` may be a Python bool or a traced scalar."""
    if isinstance(flag, (bool, np.bool_)):
        return fn(x, *args) if flag else x
    return jax.lax.cond(flag, fn, lambda x, *_: x, x, *args)


def _keep_top_k(scaled, k):
    ordered = -jnp.sort(-scaled, axis=-1)                                     # [..., V] descending
    kth = jnp.take(ordered, k - 1, axis=-1)[..., None]                        # [..., 1]
    return jnp.where(scaled >= kth, scaled, -jnp.inf)


def _keep_top_p(scaled, top_p):
    probs = jax.nn.softmax(scaled, axis=-1)                                   # [..., V]
    ordered = -jnp.sort(-probs, axis=-1)                                      # [..., V] descending
    before = jnp.cumsum(ordered, axis=-1) - ordered                           # mass ahead of each
    cut = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= cut, scaled, -jnp.inf)                          # [..., V]


def sampling_logits(logits: jax.Array, temperature, top_k=None, top_p=None) -> jax.Array:
    """Tempered logits [..., V] fp32 with tokens outside top-k / top-p at −inf.

    temperature > 0. top_k: None or 0 = off, else an int in [1, V]; top_p: None or ≥ 1 = off.
    All three may be traced scalars (one compiled program serves every setting).
    """
    scaled = logits.astype(jnp.float32) / temperature                        # [..., V]
    if top_k is not None:
        scaled = _when(top_k > 0, _keep_top_k, scaled, top_k)
    if top_p is not None:
        scaled = _when(top_p < 1, _keep_top_p, scaled, top_p)
    return scaled


def sampling_probs(logits: jax.Array, temperature, top_k=None, top_p=None) -> jax.Array:
    """softmax(sampling_logits): the (truncated) distribution [..., V] tokens are drawn from."""
    return jax.nn.softmax(sampling_logits(logits, temperature, top_k, top_p), axis=-1)


def _safe(temperature):
    """(greedy flag, a temperature safe to divide by: 1 when greedy)."""
    greedy = temperature <= 0
    if isinstance(greedy, (bool, np.bool_)):
        return greedy, 1.0 if greedy else temperature
    return greedy, jnp.where(greedy, 1.0, temperature)


def choose(logits: jax.Array, keys: jax.Array, temperature, top_k=None,
           top_p=None) -> jax.Array:
    """Tokens [B] int32 from logits [B, V]: argmax (first index on ties) when temperature is 0,
    else one draw per row (keys [B]) from softmax(sampling_logits(...))."""
    greedy, t = _safe(temperature)

    def draw(logits):
        masked = sampling_logits(logits, t, top_k, top_p)                     # [B, V]
        return jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)

    def argmax(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    if isinstance(greedy, (bool, np.bool_)):
        return argmax(logits) if greedy else draw(logits)
    return jax.lax.cond(greedy, argmax, draw, logits)


def tempered_log_softmax(logits: jax.Array, temperature) -> jax.Array:
    """log softmax(logits / T) in fp32, [..., V]; T = 1 when temperature is 0 (greedy)."""
    _, t = _safe(temperature)
    return jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)       # [..., V]


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature) -> jax.Array:
    """log softmax(logits / T)[tokens] fp32: logits [..., V], tokens [...] → [...]; T = 1 when
    temperature is 0. The sampler (per step, [B, V]) and the GRPO trainer (per sequence,
    [B, T, V]) both use it, so their log-probs agree by construction."""
    logp = tempered_log_softmax(logits, temperature)                          # [..., V]
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]      # [...]


def residual_distribution(p: jax.Array, q: jax.Array) -> jax.Array:
    """max(0, p − q) renormalized, [..., V]; p itself where p = q (nothing is rejected then)."""
    residual = jnp.maximum(p - q, 0.0)                                         # [..., V]
    mass = residual.sum(-1, keepdims=True)                                     # [..., 1]
    return jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)


def speculative_accept(p: jax.Array, q: jax.Array, draft: jax.Array,
                       keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling for one drafted token per row.

    Args:
      p: target distribution [B, V] (the main model's sampling distribution at this position).
      q: draft distribution [B, V] that `draft` was drawn from.
      draft: drafted tokens [B].
      keys: one PRNG key per row [B].

    Returns:
      (tokens [B] int32: the draft where accepted, else a draw from the residual;
       accepted [B] bool). Marginally, tokens ~ p.
    """
    def one(p, q, d, key):
        k_accept, k_resample = jax.random.split(key)
        u = jax.random.uniform(k_accept, dtype=jnp.float32)
        accepted = u * q[d] < p[d]                                # u < p(d)/q(d), no division
        resampled = jax.random.categorical(k_resample, jnp.log(residual_distribution(p, q)))
        return jnp.where(accepted, d, resampled).astype(jnp.int32), accepted
    return jax.vmap(one)(p.astype(jnp.float32), q.astype(jnp.float32), draft, keys)
