"""Causal self-attention over packed segments: the einsum reference and a blockwise version.

Both take q [B, T, N, A], k [B, S, N, A], v [B, S, N, U] (A = H + R is one full q/k head and
U the value head, which may differ), a softmax scale, `causal`, and `segment_ids` [B, T] or
None: query t attends key s when s ≤ t (if causal) and both lie in the same segment. Scores and
softmax are fp32; probabilities meet v in v's dtype, as in `model/mla.py`. Padding is a segment
of its own for these functions; `model/attention.py` folds a token mask into the segment ids
and zeroes padded rows, for every backend alike.

Under context parallelism a device holds a contiguous chunk of the queries and every key
(`model/attention.py`). Both functions then take `q_offset`, the position of query row 0 among
the keys (a traced scalar inside a `shard_map`: the chunk index times T), and `kv_segment_ids`
[B, S] for the keys: query t attends key s when s ≤ t + q_offset. By default S = T, q_offset = 0
and the keys share the queries' segment ids.

* `attention_reference`: scores [B, N, T, S] in one piece, a dense mask, a softmax. Memory
  grows as T²; the numbers everything else is tested against.
* `blockwise_attention`: the online softmax (FlashAttention's recurrence) in plain JAX. Queries
  go in blocks of `block` rows (a Python loop); for each, a `lax.fori_loop` with a static trip
  count walks the key blocks, keeping a running max m, sum l and output accumulator. With a
  causal mask a query block stops at the key block that holds its last row: key blocks above
  the diagonal are never visited, so the score FLOPs are (n+1)/2n of the full matrix for n
  blocks. A `custom_vjp` saves only q, k, v, the output and the row log-sum-exp; the backward
  recomputes each visited block's probabilities (FlashAttention-2's backward), so memory grows
  linearly in T in both passes. Sequences that are not a multiple of `block` are padded with a
  segment no real token has, and the padding is sliced off.

With a traced `q_offset` the number of key blocks a query block visits is known only at run
time, so the `fori_loop` becomes a while loop (the backward is written by hand, so nothing
differentiates through it).

Left out: dropout, sliding windows, logit soft-capping (DeepSeek uses none), cross-attention
between unrelated sequences, and a CPU-tuned schedule beyond skipping hidden blocks. The HLO
holds one inner loop per query block, so it grows linearly in T / block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MASKED = -1e30          # added to masked scores (finite: the reference's rows stay NaN-free)
BLOCK = 256             # rows per query / key block of `blockwise_attention`


def dense_mask(length: int, segment_ids: jax.Array | None, causal: bool = True,
               batch: int = 1) -> jax.Array:
    """[B, T, S=T] bool, True where query t may attend key s (the reference's mask)."""
    return offset_mask(length, length, segment_ids, segment_ids, 0, causal, batch)


def offset_mask(length: int, kv_length: int, segment_ids, kv_segment_ids, q_offset,
                causal: bool = True, batch: int = 1) -> jax.Array:
    """[B, T, S] bool: query t (at position t + q_offset among the keys) may attend key s."""
    rows = q_offset + jnp.arange(length)                                # [T]
    cols = jnp.arange(kv_length)                                        # [S]
    mask = jnp.ones((1, length, kv_length), jnp.bool_)                  # [1, T, S]
    if causal:
        mask = (rows[:, None] >= cols[None, :])[None]                   # [1, T, S]
    if segment_ids is not None:                                         # [B, T], [B, S]
        mask = mask & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return jnp.broadcast_to(mask, (max(batch, mask.shape[0]), length, kv_length))


def attention_reference(q, k, v, *, scale: float, causal: bool = True,
                        segment_ids: jax.Array | None = None,
                        kv_segment_ids: jax.Array | None = None, q_offset=0) -> jax.Array:
    """Plain attention: q [B, T, N, A], k [B, S, N, A], v [B, S, N, U] → [B, T, N, U]."""
    B, T = q.shape[:2]
    S = k.shape[1]
    kv_seg = _kv_segments(segment_ids, kv_segment_ids, T, S, q_offset)
    scores = jnp.einsum("BTNA,BSNA->BNTS", q, k,
                        preferred_element_type=jnp.float32) * scale            # [B, N, T, S]
    mask = offset_mask(T, S, segment_ids, kv_seg, q_offset, causal, B)          # [B, T, S]
    scores = jnp.where(mask[:, None], scores, MASKED)                           # [B, N, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)                     # [B, N, T, S]
    return jnp.einsum("BNTS,BSNU->BTNU", probs, v)                              # [B, T, N, U]


def _kv_segments(segment_ids, kv_segment_ids, length, kv_length, q_offset):
    """The keys' segment ids: given, or the queries' own when the keys are the queries."""
    if kv_segment_ids is not None or segment_ids is None:
        return kv_segment_ids
    if kv_length != length or not (isinstance(q_offset, int) and q_offset == 0):
        raise ValueError(f"attention over {kv_length} keys for {length} queries at an offset: "
                         "pass the keys' kv_segment_ids")
    return segment_ids


def visited_blocks(n_blocks: int, causal: bool) -> list[int]:
    """Key blocks each query block visits: i + 1 for query block i when causal, else all."""
    return [i + 1 if causal else n_blocks for i in range(n_blocks)]


def _visits(i: int, n_q: int, n_k: int, q_offset, block: int, causal: bool):
    """Key blocks query block i visits: an int when q_offset is 0, else a traced count."""
    if isinstance(q_offset, int) and q_offset == 0 and n_q == n_k:
        return visited_blocks(n_q, causal)[i]
    if not causal:
        return n_k
    last_row = q_offset + (i + 1) * block - 1                           # position of its last row
    return jnp.minimum(last_row // block + 1, n_k)


def blockwise_attention(q, k, v, *, scale: float, causal: bool = True,
                        segment_ids: jax.Array | None = None,
                        kv_segment_ids: jax.Array | None = None, q_offset=0,
                        block: int = BLOCK) -> jax.Array:
    """Online-softmax attention, same arguments and result as `attention_reference`."""
    B, T = q.shape[:2]
    S = k.shape[1]
    kv_seg = _kv_segments(segment_ids, kv_segment_ids, T, S, q_offset)
    block = min(block, T, S)
    seg_q = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg_k = jnp.zeros((B, S), jnp.int32) if kv_seg is None else kv_seg.astype(jnp.int32)
    # Rows past a multiple of `block` are padding with a segment no real token has.
    fill = jnp.minimum(jnp.min(seg_q), jnp.min(seg_k)) - 1
    seg_q, q = _pad_rows(seg_q, q, block, fill)
    seg_k, k = _pad_rows(seg_k, k, block, fill)
    v = _pad_rows(None, v, block, fill)[1]
    out = _flash(q, k, v, seg_q, seg_k, q_offset, scale, causal, block)         # [B, T', N, U]
    return out[:, :T]


def _pad_rows(seg, x, block, fill):
    """(seg, x) padded along axis 1 to a multiple of `block` rows (seg with `fill`)."""
    n = x.shape[1]
    extra = -(-n // block) * block - n
    if not extra:
        return seg, x
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
    if seg is not None:
        seg = jnp.concatenate([seg, jnp.broadcast_to(fill, (seg.shape[0], extra))], axis=1)
    return seg, x


# --- the kernel: forward, backward ---------------------------------------------------------------

def _block_mask(seg_q, seg_k, q_offset, i, j, block, causal):
    """[B, 1, bq, bk] bool for query block i (static) and key block j (traced)."""
    sq = jax.lax.dynamic_slice_in_dim(seg_q, i * block, block, axis=1)        # [B, bq]
    sk = jax.lax.dynamic_slice_in_dim(seg_k, j * block, block, axis=1)        # [B, bk]
    mask = sq[:, :, None] == sk[:, None, :]                                     # [B, bq, bk]
    if causal:
        rows = q_offset + i * block + jnp.arange(block)
        cols = j * block + jnp.arange(block)
        mask = mask & (rows[:, None] >= cols[None, :])[None]                    # [B, bq, bk]
    return mask[:, None]                                                        # [B, 1, bq, bk]


def _scores(q_i, k, seg_q, seg_k, q_offset, i, j, block, scale, causal):
    """(masked fp32 scores [B, N, bq, bk] of query block i against key block j, the mask)."""
    k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)             # [B, bk, N, A]
    s = jnp.einsum("BTNA,BSNA->BNTS", q_i, k_j,
                   preferred_element_type=jnp.float32) * scale                  # [B, N, bq, bk]
    mask = _block_mask(seg_q, seg_k, q_offset, i, j, block, causal)             # [B, 1, bq, bk]
    return jnp.where(mask, s, MASKED), mask


def _forward(q, k, v, seg_q, seg_k, q_offset, scale, causal, block):
    """(out [B, T, N, U], lse [B, N, T] fp32)."""
    B, T, N, _ = q.shape
    U = v.shape[-1]
    n_q, n_k = T // block, k.shape[1] // block
    outs, lses = [], []
    for i in range(n_q):
        q_i = q[:, i * block:(i + 1) * block]                                   # [B, bq, N, A]

        def step(j, carry, q_i=q_i, i=i):
            m, l, acc = carry                                                   # [B,N,bq] ×2, [B,N,bq,U]
            s, mask = _scores(q_i, k, seg_q, seg_k, q_offset, i, j, block, scale, causal)
            m_new = jnp.maximum(m, s.max(-1))                                   # [B, N, bq]
            # where: a row whose keys so far are all masked has m_new = MASKED, exp(0) = 1
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)             # [B, N, bq, bk]
            alpha = jnp.exp(m - m_new)                                          # [B, N, bq]
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)     # [B, bk, N, U]
            pv = jnp.einsum("BNTS,BSNU->BNTU", p.astype(v.dtype), v_j,
                            preferred_element_type=jnp.float32)                 # [B, N, bq, U]
            return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

        init = (jnp.full((B, N, block), MASKED, jnp.float32),
                jnp.zeros((B, N, block), jnp.float32), jnp.zeros((B, N, block, U), jnp.float32))
        n_visit = _visits(i, n_q, n_k, q_offset, block, causal)
        m, l, acc = jax.lax.fori_loop(0, n_visit, step, init)
        outs.append(jnp.einsum("BNTU->BTNU", acc / l[..., None]).astype(v.dtype))
        lses.append(m + jnp.log(l))                                             # [B, N, bq]
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=-1)


def _backward(q, k, v, seg_q, seg_k, q_offset, out, lse, d_out, scale, causal, block):
    """(dq, dk, dv) by recomputing each visited block's probabilities from lse."""
    delta = jnp.einsum("BTNU,BTNU->BNT", d_out.astype(jnp.float32),
                       out.astype(jnp.float32))                                 # [B, N, T]
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)                                        # [B, S, N, A]
    dv = jnp.zeros(v.shape, jnp.float32)                                        # [B, S, N, U]
    n_q, n_k = q.shape[1] // block, k.shape[1] // block
    for i in range(n_q):
        rows = slice(i * block, (i + 1) * block)
        q_i, do_i = q[:, rows], d_out[:, rows]                                  # [B, bq, N, A|U]
        lse_i, delta_i = lse[..., rows], delta[..., rows]                       # [B, N, bq]

        def step(j, carry, q_i=q_i, do_i=do_i, lse_i=lse_i, delta_i=delta_i, i=i):
            dq_i, dk, dv = carry
            s, _ = _scores(q_i, k, seg_q, seg_k, q_offset, i, j, block, scale, causal)
            p = jnp.exp(s - lse_i[..., None])           # masked: exp(-1e30 - lse) = 0 exactly
            k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)     # [B, bk, N, A]
            v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)     # [B, bk, N, U]
            dv_j = jnp.einsum("BNTS,BTNU->BSNU", p.astype(do_i.dtype), do_i,
                              preferred_element_type=jnp.float32)               # [B, bk, N, U]
            dp = jnp.einsum("BTNU,BSNU->BNTS", do_i, v_j,
                            preferred_element_type=jnp.float32)                 # [B, N, bq, bk]
            ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)        # [B, N, bq, bk]
            dq_i = dq_i + jnp.einsum("BNTS,BSNA->BTNA", ds, k_j,
                                     preferred_element_type=jnp.float32)        # [B, bq, N, A]
            dk_j = jnp.einsum("BNTS,BTNA->BSNA", ds, q_i,
                              preferred_element_type=jnp.float32)               # [B, bk, N, A]
            dk = _add_block(dk, dk_j, j * block)
            dv = _add_block(dv, dv_j, j * block)
            return dq_i, dk, dv

        dq_i = jnp.zeros(q_i.shape, jnp.float32)                                # [B, bq, N, A]
        n_visit = _visits(i, n_q, n_k, q_offset, block, causal)
        dq_i, dk, dv = jax.lax.fori_loop(0, n_visit, step, (dq_i, dk, dv))
        dq_blocks.append(dq_i)
    dq = jnp.concatenate(dq_blocks, axis=1)                                     # [B, T, N, A]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _add_block(total, part, start):
    """total [B, S, ...] with part [B, b, ...] added at rows start … start + b."""
    old = jax.lax.dynamic_slice_in_dim(total, start, part.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(total, old + part, start, axis=1)


def _flash(q, k, v, seg_q, seg_k, q_offset, scale, causal, block):
    """The custom-VJP kernel; a Python-int offset stays static (trip counts known at trace)."""
    if isinstance(q_offset, int):
        return _flash_vjp(q, k, v, seg_q, seg_k, jnp.int32(q_offset), scale, causal, block,
                          q_offset)
    return _flash_vjp(q, k, v, seg_q, seg_k, q_offset, scale, causal, block, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash_vjp(q, k, v, seg_q, seg_k, q_offset, scale, causal, block, static_offset):
    offset = q_offset if static_offset is None else static_offset
    return _forward(q, k, v, seg_q, seg_k, offset, scale, causal, block)[0]


def _flash_fwd(q, k, v, seg_q, seg_k, q_offset, scale, causal, block, static_offset):
    offset = q_offset if static_offset is None else static_offset
    out, lse = _forward(q, k, v, seg_q, seg_k, offset, scale, causal, block)
    return out, (q, k, v, seg_q, seg_k, q_offset, out, lse)


def _flash_bwd(scale, causal, block, static_offset, residuals, d_out):
    q, k, v, seg_q, seg_k, q_offset, out, lse = residuals
    offset = q_offset if static_offset is None else static_offset
    dq, dk, dv = _backward(q, k, v, seg_q, seg_k, offset, out, lse, d_out, scale, causal, block)
    return dq, dk, dv, None, None, None


_flash_vjp.defvjp(_flash_fwd, _flash_bwd)
