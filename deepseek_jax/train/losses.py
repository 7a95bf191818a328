"""Losses as pure functions: next-token cross entropy, the MTP loss, and their combination.

  total = LM + λ·MTP + α·Σ_layers L_Bal

LM and each MTP depth are token means over valid targets; MTP averages its K depths (the paper's
λ/K·Σ_k). The sequence-wise balance loss (routing.sequence_balance_loss) is summed over MoE layers,
each layer carrying its own L_Bal as in V3 eq. 17. Every function returns fp32 scalars.

Two forms of the same losses. On logits (`lm_loss`, `mtp_loss`, `total_loss`): the model's
[B, T, V] and [K, B, T, V] fp32 outputs. On what the head takes (`head_cross_entropy`,
`head_total_loss`, used by the train step): final-normed hidden states [B, T, D] (and
[K, B, T, D] for MTP) and the head [D, V]; the logits are then computed `chunk` positions at a
time, and in the backward pass a slice of the vocabulary at a time, the head gathered once per
pass for the main head and every depth (`model.head.head_nll`), so for chunk > 0 no [B, T, V]
array exists, let alone lives across the step. Both give the same values up to fp32 summation
order (and, in bf16, the rounding of the backward's dlogits to bf16); chunk = 0 is the logits
form exactly.

Targets: for int tokens [B, T] and a mask `valid` [B, T] (1 = a real token that continues the
document of the token before it; all ones for unpacked, unpadded rows), position i of the main
logits is scored against t_{i+1}, and position i of MTP depth k against t_{i+k+1}; a position
whose target lies past the end of the row, in padding, or in another document has weight 0.
Under context parallelism the train step stores T in the zigzag order (`model.zigzag`); the
shifts then take `order`, and the hidden states, tokens and masks all come in that order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.model.head import head_nll, map_head_chunks
from deepseek_jax.model.mtp import shift_left


def shifted_targets(tokens: jax.Array, valid: jax.Array, k: int, order=None):
    """(targets [B, T], weights [B, T] fp32) for predicting t_{i+k} at position i.

    valid[j] = 1 says token j is real and continues the document of token j−1 (the data
    pipeline's convention), so t_{i+k} is a fair target for position i only when every step
    i → i+1 → … → i+k stays inside one document: the weight is Π_{j=1..k} valid[i+j].
    order: the zigzag order tokens and valid are stored in, if any; i + k is taken in natural
    order and the results are stored like the inputs.
    """
    if order is not None:
        targets, weights = shifted_targets(order.natural(tokens), order.natural(valid), k)
        return order.stored(targets), order.stored(weights)
    valid = valid.astype(jnp.float32)
    weights = shift_left(valid, 1)
    for j in range(2, k + 1):
        weights = weights * shift_left(valid, j)
    return shift_left(tokens, k), weights


def _nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """−log softmax(logits)[target], fp32: logits [..., V], targets [...] → [...]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """(weighted sum of −log p(target), sum of weights) over logits [..., V] and targets [...]."""
    return jnp.sum(_nll(logits, targets) * weights), jnp.sum(weights)


def head_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                       weights: jax.Array, *, dtype, chunk: int):
    """`cross_entropy` of the logits head_logits(hidden [B, T, D], head [D, V], dtype) against
    targets [B, T] with weights [B, T], computing the logits `chunk` positions at a time
    (0 = all at once; see model/head.py)."""
    nll = _head_nlls([hidden], head, [targets], dtype, chunk)[0]                 # [B, T]
    return jnp.sum(nll * weights), jnp.sum(weights)


def _head_nlls(hiddens, head, targets, dtype, chunk):
    """−log p(target) [B, T] of each hidden: `head_nll` (the head gathered once for all of
    them), or from whole logits when chunk = 0."""
    if chunk == 0:
        return [map_head_chunks(_nll, h, head, t, dtype=dtype, chunk=0)
                for h, t in zip(hiddens, targets)]
    return head_nll(tuple(hiddens), head, tuple(targets), dtype, chunk)


def lm_loss(logits: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean next-token cross entropy of logits [B, T, V] on tokens [B, T]."""
    targets, weights = shifted_targets(tokens, valid, 1)
    total, count = cross_entropy(logits, targets, weights)
    return total / jnp.maximum(count, 1.0)


def mtp_loss(mtp_logits: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over the K depths of depth k's cross entropy against t_{i+k+1}; mtp_logits [K, B, T, V]."""
    per_depth = [lm_loss_at(mtp_logits[k], tokens, valid, k + 2)
                 for k in range(mtp_logits.shape[0])]
    return jnp.mean(jnp.stack(per_depth))


def lm_loss_at(logits: jax.Array, tokens: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """Mean cross entropy of logits [B, T, V] against t_{i+k}."""
    targets, weights = shifted_targets(tokens, valid, k)
    total, count = cross_entropy(logits, targets, weights)
    return total / jnp.maximum(count, 1.0)


def balance_loss(moe_stats: dict | None) -> jax.Array:
    """Σ over MoE layers of the sown sequence-balance losses (0 without MoE layers)."""
    if not moe_stats:
        return jnp.zeros((), jnp.float32)
    leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(moe_stats)
              if "balance_loss" in jax.tree_util.keystr(path)]
    return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def total_loss(logits, mtp_logits, moe_stats, tokens, valid, *, mtp_weight: float,
               balance_alpha: float):
    """(total, parts) with parts = {"lm_loss", "mtp_loss", "balance_loss"} (unweighted)."""
    lm = lm_loss(logits, tokens, valid)
    mtp = (mtp_loss(mtp_logits, tokens, valid) if mtp_logits is not None
           else jnp.zeros((), jnp.float32))
    return _combine(lm, mtp, moe_stats, mtp_weight, balance_alpha)


def head_total_loss(hidden, mtp_hidden, head, moe_stats, tokens, valid, *, mtp_weight: float,
                    balance_alpha: float, dtype, chunk: int, order=None):
    """`total_loss` from hidden [B, T, D], mtp_hidden [K, B, T, D] or None and the head [D, V]
    (`Transformer.head_inputs`), the logits computed `chunk` positions at a time (0 = whole).
    `order`: the zigzag order all of them are stored in, if any (`shifted_targets`)."""
    depths = 0 if mtp_hidden is None else mtp_hidden.shape[0]
    hiddens = [hidden] + [mtp_hidden[k] for k in range(depths)]     # targets t_{i+1}, t_{i+k+2}
    shifted = [shifted_targets(tokens, valid, k + 1, order) for k in range(depths + 1)]
    nlls = _head_nlls(hiddens, head, [t for t, _ in shifted], dtype, chunk)
    means = [jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
             for nll, (_, w) in zip(nlls, shifted)]
    lm = means[0]
    mtp = jnp.mean(jnp.stack(means[1:])) if depths else jnp.zeros((), jnp.float32)
    return _combine(lm, mtp, moe_stats, mtp_weight, balance_alpha)


def _combine(lm, mtp, moe_stats, mtp_weight, balance_alpha):
    bal = balance_loss(moe_stats)
    total = lm + mtp_weight * mtp + balance_alpha * bal
    return total, {"lm_loss": lm, "mtp_loss": mtp, "balance_loss": bal}
