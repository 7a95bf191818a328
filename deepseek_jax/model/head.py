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

  head_nll(hiddens ([B, T, D], ...), head [D, V], targets ([B, T], ...), dtype, chunk)

is the cross entropy −log softmax(logits)[target] of each position of each hidden (the main
head's and every MTP depth's, which share the head) with its own backward pass, written for the
step's peak memory under FSDP, where the head [D, V] is split along D and must be gathered:
  - the head is gathered once per pass in the compute dtype (1.7 GiB for V3 in bf16) and used by
    every hidden and every chunk, not gathered again in each chunk's recomputation;
  - the forward runs `chunk` positions at a time and keeps only each position's log-sum-exp;
  - the backward runs over n_v ≥ ⌈T / chunk⌉ slices of the vocabulary instead (a slice's
    logits [B, T, V/n_v] are at most the size of a forward chunk's), recomputing the slice's
    logits from the saved log-sum-exp. Each slice of the head gradient is then complete after one matmul over
    all positions: it is cast to the compute dtype and constrained to the head's own sharding,
    so it is reduce-scattered slice by slice and no whole [D, V] gradient (3.5 GiB fp32 for V3)
    is held or accumulated across chunks. The hidden gradient sums over the slices in fp32.
Where V is split over `tensor` in tp shards, slice j is the j-th window of width V/(tp·n_v) of
every shard: a reshape [D, V] → [D, tp, n_v, width] keeps each shard's ids where they are, so the
slices are windows along an unsplit axis and nothing is copied or moved (`vocab_slices` picks n_v
so that the width is a multiple of 128 when it can: V3's 129,280 ids give 10 windows of 12,928).
A V that tp·n_v does not divide is padded with zero columns, masked out of the softmax. The backward's
probabilities are exp(logit − lse); its dlogits are cast to the compute dtype before their two
matmuls (the precision TPUs give fp32 operands by default anyway). chunk = 0 is not taken here:
it computes whole logits (`map_head_chunks`).

Left out: fusing the head matmul with the softmax (a Pallas kernel); vocabulary-parallel cross
entropy written by hand (XLA partitions the log-sum-exp over a sharded V itself).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
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
    return _position_chunks(lambda h, *xs: scanned(h, head, *xs), chunk, hidden, *per_token,
                            rest_fn=lambda h, *xs: alone(h, head, *xs))


def _gathered_head(head: jax.Array, dtype) -> jax.Array:
    """The head [D, V] in the compute dtype with D whole on every device (V keeps its rule);
    cast where it is stored, so that it is gathered in the compute dtype."""
    local = layers.constrain(head.astype(dtype), ("embed", "vocab"))
    return layers.constrain(local, (None, "vocab"))


def _position_chunks(fn: Callable[..., Any], chunk: int, *xs: jax.Array,
                     rest_fn: Callable[..., Any] | None = None) -> Any:
    """fn(*xs) computed `chunk` positions at a time (xs [B, T, ...], outputs [B, t, ...]) by a
    scan over whole chunks and one call of `rest_fn` (default fn) on the shorter rest."""
    B, T = xs[0].shape[:2]
    n, rest = divmod(T, chunk)
    full = n * chunk
    parts = []
    if n:
        def split(x):                                   # [B, n·chunk, ...] → [n, B, chunk, ...]
            return jnp.swapaxes(x[:, :full].reshape(B, n, chunk, *x.shape[2:]), 0, 1)

        _, out = jax.lax.scan(lambda _, ys: (None, fn(*ys)), None, tuple(map(split, xs)))
        parts.append(jax.tree.map(                      # [n, B, chunk, ...] → [B, n·chunk, ...]
            lambda y: jnp.swapaxes(y, 0, 1).reshape(B, full, *y.shape[3:]), out))
    if rest:
        parts.append((rest_fn or fn)(*(x[:, full:] for x in xs)))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *ys: jnp.concatenate(ys, axis=1), *parts)      # [B, T, ...]


def _forward_chunk(h: jax.Array, w: jax.Array, t: jax.Array):
    """(nll, lse) [B, t] of hidden h [B, t, D] under the gathered head w [D, V], targets t [B, t]."""
    logits = jnp.einsum("BTD,DV->BTV", h, w, preferred_element_type=jnp.float32)   # [B, t, V]
    logits = layers.constrain(logits, (layers.BATCH, layers.LENGTH, layers.VOCAB))
    lse = jax.nn.logsumexp(logits, axis=-1)                                        # [B, t]
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    picked = jnp.sum(jnp.where(ids == t[..., None], logits, 0.0), axis=-1)         # [B, t]
    return lse - picked, lse


def vocab_slices(V: int, T: int, chunk: int, shards: int = 1) -> tuple[int, int]:
    """(n_v, width): the backward's number of vocabulary slices and ids per slice per shard of
    V. n_v is at least ⌈T / chunk⌉ (a slice's logits then hold no more than a forward chunk's),
    a divisor of V / shards where one lies within 4× of that, preferring one whose width is a
    multiple of 128 (TPU lanes: the slice is then a plain window of the head). Otherwise V is
    padded to shards · n_v · width."""
    target = max(1, -(-T // chunk))
    local, rest = divmod(V, shards)
    if not rest:
        fits = [n for n in range(target, 4 * target + 1) if local % n == 0]
        aligned = [n for n in fits if (local // n) % 128 == 0]
        if aligned or fits:
            n_v = (aligned or fits)[0]
            return n_v, local // n_v
    return target, -(-V // (shards * target))


def _vocab_shards() -> int:
    """How many ways the `vocab` rule splits V under the mesh and rules in context (1 without)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return 1
    axes = nn.logical_to_mesh_axes(("vocab",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape.get(a, 1) for a in axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def head_nll(hiddens: Sequence[jax.Array], head: jax.Array, targets: Sequence[jax.Array],
             dtype, chunk: int) -> tuple[jax.Array, ...]:
    """(−log softmax(head_logits(h, head, dtype))[t] [B, T] fp32 for h, t in zip(hiddens,
    targets)), with the memory-lean backward of the module docstring; chunk ≥ 1."""
    return _head_nll_fwd(hiddens, head, targets, dtype, chunk)[0]


def _head_nll_fwd(hiddens, head, targets, dtype, chunk):
    if chunk < 1:
        raise ValueError(f"head_nll takes chunk >= 1, got {chunk} (0 is map_head_chunks' path)")
    w = _gathered_head(head, dtype)                                               # [D, V]
    outs = [_position_chunks(lambda h_, t_: _forward_chunk(h_, w, t_), chunk, h, t)
            for h, t in zip(hiddens, targets)]
    nll = tuple(o[0] for o in outs)
    lse = tuple(o[1] for o in outs)
    return nll, (tuple(hiddens), head, tuple(targets), lse)


def _head_nll_bwd(dtype, chunk, res, g):
    hiddens, head, targets, lse = res                   # g: (dnll [B, T], ...) per hidden
    D, V = head.shape
    tp = _vocab_shards()
    n_v, width = vocab_slices(V, hiddens[0].shape[1], chunk, tp)
    w = _gathered_head(head, dtype)                                               # [D, V]
    if tp * n_v * width != V:
        w = jnp.pad(w, ((0, 0), (0, tp * n_v * width - V)))
    # Slice j is window j of each of the tp shards of V: w[:, t, j·width + c] holds the id
    # (t·n_v + j)·width + c. A reshape that keeps each shard's ids in place, so no copy.
    w = w.reshape(D, tp, n_v * width)
    offsets = jnp.arange(tp)[:, None] * (n_v * width) + jnp.arange(width)         # [tp, width]
    # The hiddens side by side, so that each slice's head gradient is one sum over all of
    # their positions (one reduction across devices, not one per hidden).
    h, t, s, gk = (jnp.stack(x) for x in (hiddens, targets, lse, g))   # [N, B, T, (D)]

    def body(dh, j):
        wj = jax.lax.dynamic_slice_in_dim(w, j * width, width, axis=2)       # [D, tp, width]
        ids = offsets + j * width                                             # [tp, width]
        logits = jnp.einsum("NBTD,DSC->NBTSC", h, wj,
                            preferred_element_type=jnp.float32)               # [N, B, T, tp, C]
        p = jnp.where(ids < V, jnp.exp(logits - s[..., None, None]), 0.0)
        dlogits = (gk[..., None, None] * (p - (t[..., None, None] == ids))).astype(dtype)
        dh = dh + jnp.einsum("NBTSC,DSC->NBTD", dlogits, wj,
                             preferred_element_type=jnp.float32)
        dw = jnp.einsum("NBTD,NBTSC->DSC", h, dlogits, preferred_element_type=jnp.float32)
        return dh, layers.constrain(dw.astype(dtype), ("embed", "vocab", None))  # [D, tp, C]

    dh, dws = jax.lax.scan(body, jnp.zeros(h.shape, jnp.float32), jnp.arange(n_v))
    dhead = jnp.moveaxis(dws, 0, 2).reshape(D, tp * n_v * width)[:, :V]          # [D, V]
    dhead = layers.constrain(dhead, ("embed", "vocab")).astype(head.dtype)
    dhiddens = tuple(dh[k].astype(x.dtype) for k, x in enumerate(hiddens))
    return dhiddens, dhead, tuple(None for _ in targets)


head_nll.defvjp(_head_nll_fwd, _head_nll_bwd)
