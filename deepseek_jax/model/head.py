"""The output head: logits of final-normed states, whole or a chunk of positions at a time.

  head_logits(normed [B, T, D], head [D, V], dtype)  ->  logits [B, T, V] fp32

Both operands in the compute dtype, fp32 accumulation. V3 keeps the output head out of fp8
(§3.3), so `config.fp8` never reaches it. The logits carry the (batch, length, vocab) logical
constraint, so V follows the vocabulary rule (tensor-sharded under the tp presets).

  map_head_chunks(fn, hidden [B, T, D], head [D, V], *per_token, dtype, chunk)

gives fn(logits, *per_token) for every position without a [B, T, V] array: the positions are
cut into chunks of `chunk` per row, and each chunk's logits [B, chunk, V] are computed, handed to
`fn` with the matching slices of the per-token arrays ([B, T, ...] each), and dropped. `fn`
maps logits [B, t, V] (and the slices) to per-position outputs [B, t, ...] (a pytree), e.g. the
cross entropy of each position (train/losses.py) or a target's log-prob (rl/step.py). Each chunk
runs under `jax.checkpoint` inside a `lax.scan`, so the backward pass recomputes that chunk's
logits instead of keeping them: what lives across the step is the hidden states and the
per-position outputs, and at any moment one chunk's logits and their gradient. The head's
gradient is summed over the chunks in the head's own dtype (pass the fp32 master weight; it is
cast to `dtype` inside each chunk). A length the chunk does not divide ends with one shorter
chunk. chunk = 0 computes all positions at once, without recomputation: the reference path,
which does hold [B, T, V].

Why chunks of positions and not of the vocabulary: a chunk of positions holds whole rows of V
logits, so `fn` sees complete softmax rows and runs unchanged — the same code as on the whole
logits, giving the same values — with no running log-sum-exp across vocabulary pieces and no
second pass for the gradient. T is never sharded (act_length), so cutting it needs no
communication, while B stays on the batch axes and V on the vocabulary rule as before. A chunk
costs B_local·chunk·V·4 bytes (V3: 0.5 MiB per position of a row, 250 MiB for 512 positions).

Left out: fusing the head matmul with the softmax (a Pallas kernel); vocabulary-parallel cross
entropy written by hand (XLA partitions the log-sum-exp over a sharded V itself).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from deepseek_jax.model import layers


def head_logits(normed: jax.Array, head: jax.Array, dtype) -> jax.Array:
    """Logits [B, T, V] fp32 of final-normed states [B, T, D] under the head [D, V]."""
    logits = jnp.einsum("BTD,DV->BTV", normed, head.astype(dtype),
                        preferred_element_type=jnp.float32)                    # [B, T, V]
    return layers.constrain(logits, (layers.BATCH, layers.LENGTH, layers.VOCAB))


def map_head_chunks(fn: Callable[..., Any], hidden: jax.Array, head: jax.Array,
                    *per_token: jax.Array, dtype, chunk: int) -> Any:
    """fn(head_logits(hidden, head), *per_token) computed `chunk` positions at a time (see the
    module docstring); hidden [B, T, D], per_token arrays [B, T, ...]; chunk ≥ 0."""
    if chunk < 0:
        raise ValueError(f"chunk={chunk} must be >= 0 (0 = all positions at once)")
    if chunk == 0:
        return fn(head_logits(hidden, head, dtype), *per_token)

    def chunk_fn(h, w, *xs):
        return fn(head_logits(h, w, dtype), *xs)

    # Outside a scan the recomputation needs prevent_cse, or XLA may merge it with the forward
    # and keep the logits; inside one it cannot, and the barrier would only cost.
    scanned, alone = jax.checkpoint(chunk_fn, prevent_cse=False), jax.checkpoint(chunk_fn)
    B, T, _ = hidden.shape
    n, rest = divmod(T, chunk)
    full = n * chunk
    parts = []
    if n:
        def split(x):                                   # [B, n·chunk, ...] → [n, B, chunk, ...]
            return jnp.swapaxes(x[:, :full].reshape(B, n, chunk, *x.shape[2:]), 0, 1)

        def body(_, xs):
            return None, scanned(xs[0], head, *xs[1:])

        _, out = jax.lax.scan(body, None, (split(hidden), *map(split, per_token)))
        parts.append(jax.tree.map(                      # [n, B, chunk, ...] → [B, n·chunk, ...]
            lambda y: jnp.swapaxes(y, 0, 1).reshape(B, full, *y.shape[3:]), out))
    if rest:
        parts.append(alone(hidden[:, full:], head, *(x[:, full:] for x in per_token)))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *parts)      # [B, T, ...]
