"""Packing: exact rows on hand-made documents, invariants, `valid` vs the LM loss, restore."""

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.data import packing
from deepseek_jax.train import losses

PAD = 2


def rows_of(docs, seq_len):
    return list(packing.pack_documents([np.asarray(d) for d in docs], seq_len, PAD))


def test_hand_made_rows_are_exact():
    rows = rows_of([[10, 11, 12], [20, 21], [30, 31, 32, 33]], 5)
    assert len(rows) == 2
    np.testing.assert_array_equal(rows[0]["tokens"], [10, 11, 12, 20, 21])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(rows[0]["valid"], [0, 1, 1, 0, 1])
    np.testing.assert_array_equal(rows[1]["tokens"], [30, 31, 32, 33, PAD])
    np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3, 0])
    np.testing.assert_array_equal(rows[1]["valid"], [0, 1, 1, 1, 0])
    assert rows[0]["tokens"].dtype == np.int32 and rows[0]["valid"].dtype == np.float32


def test_document_that_does_not_fit_continues_in_the_next_row():
    rows = rows_of([[1, 3, 4], [5, 6, 7, 8, 9, 11, 12, 13, 14, 15]], 4)
    tokens = [r["tokens"].tolist() for r in rows]
    segs = [r["segment_ids"].tolist() for r in rows]
    pos = [r["positions"].tolist() for r in rows]
    valid = [r["valid"].tolist() for r in rows]
    assert tokens == [[1, 3, 4, 5], [6, 7, 8, 9], [11, 12, 13, 14], [15, PAD, PAD, PAD]]
    assert segs == [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert pos == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 2, 3], [0, 0, 0, 0]]
    assert valid == [[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]


def test_random_documents_keep_every_token_and_every_invariant():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 90, size=int(rng.integers(1, 20))) for _ in range(60)]
    seq_len = 16
    rows = rows_of(docs, seq_len)
    stream = np.concatenate(docs)
    real = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
    np.testing.assert_array_equal(real, stream)                   # nothing dropped or reordered
    for n, r in enumerate(rows):
        seg = r["segment_ids"]
        nonzero = seg[seg > 0]
        assert nonzero[0] == 1 and np.all(np.diff(nonzero) >= 0) and np.all(np.diff(nonzero) <= 1)
        if n < len(rows) - 1:
            assert np.all(seg > 0)                                # only the last row has padding
        for s in np.unique(nonzero):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))       # contiguous
            np.testing.assert_array_equal(r["positions"][idx], np.arange(len(idx)))
        np.testing.assert_array_equal(r["valid"], packing.valid_from_segments(seg))
    # Each (row, segment) piece is a contiguous slice of exactly one document.
    bounds = np.cumsum([0] + [len(d) for d in docs])
    offset = 0
    for r in rows:
        for s in np.unique(r["segment_ids"][r["segment_ids"] > 0]):
            length = int(np.sum(r["segment_ids"] == s))
            doc = np.searchsorted(bounds, offset, side="right") - 1
            assert offset + length <= bounds[doc + 1]
            offset += length


def test_valid_makes_lm_loss_ignore_cross_document_targets():
    """Logits perfect on in-document targets and wrong on every other give loss ~0."""
    rows = rows_of([[10, 11, 12], [20, 21], [30, 31, 32, 33], [40]], 6)
    tokens = np.stack([r["tokens"] for r in rows])               # [B, T]
    seg = np.stack([r["segment_ids"] for r in rows])
    valid = np.stack([r["valid"] for r in rows])
    _, weights = losses.shifted_targets(jnp.asarray(tokens), jnp.asarray(valid), 1)
    same_doc = np.zeros_like(valid)
    same_doc[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    np.testing.assert_array_equal(np.asarray(weights), same_doc)

    vocab = 64
    good = np.zeros(tokens.shape + (vocab,), np.float32)
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    wrong = (targets + 1) % vocab
    pick = np.where(same_doc > 0, targets, wrong)
    np.put_along_axis(good, pick[..., None], 30.0, axis=-1)
    loss = losses.lm_loss(jnp.asarray(good), jnp.asarray(tokens), jnp.asarray(valid))
    assert float(loss) < 1e-6                                    # exp(-30) scale


def test_pack_iter_dataset_restores_mid_document():
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 90, size=int(rng.integers(1, 13))).astype(np.int32)
            for _ in range(30)]
    ds = packing.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(),
                                 seq_len=8, pad_id=PAD)
    expected = list(ds)
    assert len(expected) == len(rows_of(docs, 8))
    offsets = set()
    for k in range(len(expected)):
        it = iter(ds)
        for _ in range(k):
            next(it)
        state = it.get_state()
        offsets.add(state["offset"])
        fresh = iter(ds)
        fresh.set_state(state)
        rest = list(fresh)
        assert len(rest) == len(expected) - k
        for got, want in zip(rest, expected[k:]):
            for name in packing.FEATURES:
                np.testing.assert_array_equal(got[name], want[name])
    assert len(offsets) > 1                                      # some states were mid-document


@pytest.mark.parametrize("seq_len", [1, 0, -3])
def test_seq_len_below_two_is_refused(seq_len):
    with pytest.raises(ValueError, match="seq_len >= 2"):
        rows_of([[1, 2, 3]], seq_len)
