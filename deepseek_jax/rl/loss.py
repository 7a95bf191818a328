"""The GRPO policy loss: clipped importance ratio, k3 KL penalty, three aggregations.

Per completion token t of completion i, with ρ = exp(logp − old_logp) and advantage A_i:

  ℓ_{i,t} = −min(ρ·A_i, clip(ρ, 1 − ε_low, 1 + ε_high)·A_i) + β·KL_{i,t}
  KL_{i,t} = exp(ref − logp) − (ref − logp) − 1          (k3: unbiased, ≥ 0; DeepSeekMath)

Aggregation over the mask m (1 on completion tokens, EOS included):

  "seq_mean_token_mean"     mean_i ( Σ_t m ℓ / Σ_t m )        the paper (GRPO, DeepSeekMath)
  "token_mean"              Σ_{i,t} m ℓ / Σ_{i,t} m           DAPO
  "seq_mean_token_sum_norm" mean_i ( Σ_t m ℓ / L_max )        Dr. GRPO (constant normalizer)

All sums run over the whole batch array, so under a sharded jit they are global (no per-shard
means). β = 0 needs no reference log-probs (pass None). Log-probs are those of the sampled tokens
under softmax(logits / temperature), the distribution the sampler drew from.
"""

from __future__ import annotations

import jax.numpy as jnp

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def kl_k3(logp, ref_logp):
    """k3 per token, e^d − d − 1 with d = ref − logp, computed as expm1(d) − d: near the
    reference (|d| ≪ 1, as in early steps) e^d rounds to 1 ± 6e-8 in fp32, so the textbook form
    is noise of that size on a value d²/2; this one is off by a few ulps of |d| at most."""
    d = ref_logp - logp
    return jnp.expm1(d) - d


def aggregate(per_token, mask, how: str, max_len: int | None = None):
    """Reduces per-token values [B, T] under mask [B, T] to a scalar (see module docstring)."""
    mask = mask.astype(jnp.float32)
    if how == "token_mean":
        return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if how == "seq_mean_token_mean":
        per_seq = jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
        return jnp.mean(per_seq)
    if how == "seq_mean_token_sum_norm":
        if not max_len:
            raise ValueError("seq_mean_token_sum_norm needs max_len (the generation limit)")
        return jnp.mean(jnp.sum(per_token * mask, -1) / max_len)
    raise ValueError(f"unknown aggregation {how!r}; use one of {AGGREGATIONS}")


def grpo_loss(logp, old_logp, advantages, mask, *, ref_logp=None, eps_low: float = 0.2,
              eps_high: float = 0.2, beta: float = 0.0, aggregation: str = "seq_mean_token_mean",
              max_len: int | None = None):
    """(loss, metrics) from log-probs [B, T], advantages [B] and the completion mask [B, T]."""
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs)")
    ratio = jnp.exp(logp - old_logp)                                           # [B, T]
    adv = advantages[:, None]                                                  # [B, 1]
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -jnp.minimum(unclipped, clipped)                               # [B, T]
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else jnp.zeros_like(logp)
    if beta:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_len)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    metrics = {
        "kl": jnp.sum(kl * m) / n,
        "clip_low_frac": jnp.sum(((ratio < 1 - eps_low) & (adv < 0)) * m) / n,
        "clip_high_frac": jnp.sum(((ratio > 1 + eps_high) & (adv > 0)) * m) / n,
        "ratio_mean": jnp.sum(ratio * m) / n,
    }
    return loss, metrics
