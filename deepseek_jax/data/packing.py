"""Packing token documents into fixed-length rows that attention and loss never cross.

A row of `seq_len` tokens holds consecutive documents back to back. Per row:

- `tokens` [T] int32: the ids; padding positions hold `pad_id`.
- `segment_ids` [T] int32: 1, 2, … for the documents in the row, 0 for padding. The model's
  `attention_mask(…, segment_ids)` lets a token attend only within its segment.
- `positions` [T] int32: 0, 1, … restarting at each segment (RoPE positions).
- `valid` [T] float32: 1 at j iff token j is real and continues the segment of token j-1, i.e.
  `segment_ids[j] != 0 and j > 0 and segment_ids[j-1] == segment_ids[j]`.

Why `valid` looks like that: `train.losses.lm_loss(logits, tokens, valid)` scores position i
against `tokens[i+1]` with weight `valid[i+1]` (it shifts `valid` left by one together with the
tokens). So position i counts exactly when token i+1 lies in the same document as token i: the last
token of a document never predicts the first token of the next, padding is never a target, and
`valid[0]` is never read. (For MTP depth k the loss uses `valid[i+k]`, which only checks the last
of the k steps; an exact MTP mask would compare `segment_ids[i]` with `segment_ids[i+k]`.)

Documents that do not fit: a document is cut at the end of the row and its remainder starts the
next row as segment 1 with positions from 0 again, so no token is dropped and no row is wasted;
the cut loses one target (the first token of the continuation has no context). Positions restart
because the continuation cannot attend to its beginning either. A document longer than a row spans
several rows the same way. The final row of a finite stream is padded.

`pack_documents` is the plain generator (for tests and the eval path); `PackIterDataset` is the
same algorithm as a Grain `IterDataset` whose iterator state is (parent state before the current
document, tokens of it already emitted), so a restored iterator continues mid-document exactly.

Left out: best-fit/first-fit bin packing (Grain ships those; concat-and-split wastes no tokens,
which is what pretraining wants) and cross-row attention for long documents.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import grain
import numpy as np

FEATURES = ("tokens", "segment_ids", "positions", "valid")


def check_seq_len(seq_len: int) -> None:
    """Raise ValueError unless a row can hold at least one next-token target."""
    if int(seq_len) != seq_len or seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a row needs at least 2 tokens to hold one "
                         "next-token target; use seq_len >= 2")


def valid_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """float32 [..., T]: 1 where a real token continues the segment of the token before it."""
    seg = np.asarray(segment_ids)
    prev = np.concatenate([np.zeros_like(seg[..., :1]), seg[..., :-1]], axis=-1)
    return ((seg != 0) & (seg == prev)).astype(np.float32)


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of padding only (every mask 0)."""
    return {"tokens": np.full((seq_len,), pad_id, np.int32),
            "segment_ids": np.zeros((seq_len,), np.int32),
            "positions": np.zeros((seq_len,), np.int32),
            "valid": np.zeros((seq_len,), np.float32)}


def fill_row(seq_len: int, pad_id: int, current: tuple[np.ndarray, int] | None,
             read_next: Callable[[], np.ndarray | None]):
    """Fill one row; the step shared by `pack_documents` and `PackIterDataset`.

    Args:
        seq_len: row length T.
        pad_id: id written at padding positions.
        current: (document, tokens of it already emitted) carried over from the previous row, or
            None.
        read_next: returns the next document (int array [L], L >= 1), or None at the end.

    Returns:
        (row or None when there was nothing left to pack, the new `current`).
    """
    row = empty_row(seq_len, pad_id)
    fill, segment = 0, 0
    while fill < seq_len:
        if current is None or current[1] >= len(current[0]):
            doc = read_next()
            if doc is None:
                current = None
                break
            current = (np.asarray(doc, np.int32), 0)
        doc, offset = current
        take = min(seq_len - fill, len(doc) - offset)
        if take <= 0:                            # an empty document: nothing to place
            current = None
            continue
        segment += 1
        row["tokens"][fill:fill + take] = doc[offset:offset + take]
        row["segment_ids"][fill:fill + take] = segment
        row["positions"][fill:fill + take] = np.arange(take, dtype=np.int32)
        fill += take
        current = (doc, offset + take)
    if fill == 0:
        return None, current
    row["valid"] = valid_from_segments(row["segment_ids"])
    return row, current


def pack_documents(documents: Iterable[Any], seq_len: int,
                   pad_id: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Rows (dicts of `FEATURES`, each [T]) packed from an iterable of token documents."""
    check_seq_len(seq_len)
    it = iter(documents)
    current = None
    while True:
        row, current = fill_row(seq_len, pad_id, current, lambda: next(it, None))
        if row is None:
            return
        yield row


class _PackIterator(grain.DatasetIterator):
    """Iterator of `PackIterDataset`; state = parent state before the current document + offset."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._current = None
        self._doc_parent_state = self._parent.get_state()

    def _read_next(self):
        state = self._parent.get_state()
        try:
            doc = next(self._parent)
        except StopIteration:
            return None
        self._doc_parent_state = state
        return doc

    def __next__(self) -> dict[str, np.ndarray]:
        row, self._current = fill_row(self._seq_len, self._pad_id, self._current,
                                      self._read_next)
        if row is None:
            raise StopIteration
        return row

    def get_state(self) -> dict[str, Any]:
        if self._current is not None and self._current[1] < len(self._current[0]):
            return {"parent": self._doc_parent_state, "offset": int(self._current[1])}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc_parent_state = state["parent"]
        self._current = None
        if state["offset"]:
            doc = next(self._parent)
            self._current = (np.asarray(doc, np.int32), int(state["offset"]))


class PackIterDataset(grain.IterDataset):
    """Grain dataset of packed rows from a parent dataset of int token documents.

    Args:
        parent: IterDataset whose elements are 1-D int arrays (one document each).
        seq_len: row length T (>= 2).
        pad_id: id written at padding positions.
    """

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int):
        check_seq_len(seq_len)
        super().__init__(parent)
        self._seq_len = int(seq_len)
        self._pad_id = int(pad_id)

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"
