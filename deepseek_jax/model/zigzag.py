"""The load-balanced ("zigzag") order of a sequence split over n context ranks.

Under context parallelism each rank holds the queries of T/n positions and attends them to every
key before them. With contiguous chunks, rank r attends (r + 1/2)·T/n keys per query on average:
the last rank does 2n − 1 times the first's work, and the step waits for it. The zigzag order cuts
the sequence into 2n chunks of h = T/2n positions and gives rank r chunks r and 2n − 1 − r, so
every rank attends the same number of query-key blocks: (r + 1/2) + (2n − 1 − r + 1/2) = 2n chunk
widths of keys per query chunk pair.

Stored along T, the order is chunks [0, 2n−1, 1, 2n−2, …, n−1, n]: rank r's contiguous slice of the
stored sequence is its two chunks. In training every [B, T] array of a batch (tokens, positions,
segment ids, masks, loss weights) is put in this order once, at the step's entry (`stored`); the
position-wise layers (embedding, projections, MoE, norms, head) and the sums over a sequence
(the balance loss, expert loads, the loss) do not care, and the three things that read the
sequence's order ask this object:

  - attention un-permutes the all-gathered keys' latents to natural order on each device and runs
    its two query chunks at their own offsets (`model.attention`);
  - MTP's and the loss's "token i + k at position i" shift in natural order (`shift_left`);
  - capacity dropping counts each sequence's pairs in natural order (`natural`, then `stored`).

Permuting the int tokens and masks costs a few bytes a token once a step; the latents are
un-permuted locally (a reshape and a reversal, no gather).

Left out: decoding under context parallelism (caches stay in natural order).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import layers


@dataclasses.dataclass(frozen=True)
class Zigzag:
    """The zigzag order over `ranks` context ranks (≥ 2)."""
    ranks: int

    def stored(self, x: jax.Array, axis: int = 1) -> jax.Array:
        """Natural order → stored order along `axis` (length a multiple of 2·ranks)."""
        n = self.ranks
        chunks = _chunked(x, axis, 2 * n)                                    # [..., 2n, h, ...]
        first = jax.lax.slice_in_dim(chunks, 0, n, axis=axis)               # chunks 0 … n−1
        second = jnp.flip(jax.lax.slice_in_dim(chunks, n, 2 * n, axis=axis), axis)  # 2n−1 … n
        pairs = jnp.stack([first, second], axis=axis + 1)                   # [..., n, 2, h, ...]
        return _merged(pairs, axis, 3)

    def natural(self, x: jax.Array, axis: int = 1) -> jax.Array:
        """Stored order → natural order along `axis`: the inverse of `stored`."""
        n = self.ranks
        chunks = _chunked(x, axis, 2 * n)                    # [..., 2n, h, ...]: 0, 2n−1, 1, …
        first = jax.lax.slice_in_dim(chunks, 0, 2 * n, 2, axis=axis)        # chunks 0 … n−1
        second = jnp.flip(jax.lax.slice_in_dim(chunks, 1, 2 * n, 2, axis=axis), axis)  # n … 2n−1
        return _merged(jnp.concatenate([first, second], axis=axis), axis, 2)

    def shift_left(self, x: jax.Array, k: int) -> jax.Array:
        """x [B, T] in stored order → x_{i+k} at (stored) position i, 0 past the sequence's end."""
        natural = self.natural(x)                                            # [B, T]
        pad = jnp.zeros((x.shape[0], k), x.dtype)
        return self.stored(jnp.concatenate([natural[:, k:], pad], axis=1))  # [B, T]

    def positions(self, length: int) -> np.ndarray:
        """int32 [T]: the natural position of each stored row."""
        n = self.ranks
        chunks = np.arange(length, dtype=np.int32).reshape(2 * n, -1)       # [2n, h]
        rank = np.arange(n)
        return chunks[np.stack([rank, 2 * n - 1 - rank], axis=1).reshape(-1)].reshape(-1)

    def chunk_offsets(self, rank: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
        """The natural positions where rank `rank`'s two chunks start: (r·h, (2n − 1 − r)·h)."""
        h = length // (2 * self.ranks)
        return rank * h, (2 * self.ranks - 1 - rank) * h


def for_length(length: int) -> Zigzag | None:
    """The zigzag order for a length-`length` sequence under the mesh and rules in context: None
    when the rules do not split the sequence (`act_length`), or when its length is not a multiple
    of 2 × the context ranks (then attention keeps contiguous chunks, correct but uneven)."""
    axes = layers.split_axes(layers.LENGTH)
    n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes) if axes else 1
    return Zigzag(n) if n > 1 and length % (2 * n) == 0 else None


def _chunked(x: jax.Array, axis: int, parts: int) -> jax.Array:
    """x with `axis` split into [parts, length / parts]."""
    return x.reshape(*x.shape[:axis], parts, -1, *x.shape[axis + 1:])


def _merged(x: jax.Array, axis: int, dims: int) -> jax.Array:
    """x with its `dims` axes from `axis` on merged into one."""
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + dims:])
