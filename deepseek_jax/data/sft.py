"""SFT samples (`chat.Sample`: tokens + assistant mask) to fixed-length rows and batches.

Rows have the pretraining layout (`data/packing.py`: `tokens`, `segment_ids`, `positions`,
`valid`, each [T]), so the pretraining train step runs them unchanged; the assistant mask lives
in `valid`. The LM loss scores position i against token i+1 with weight valid[i+1]
(`train/losses.py`), so with

    valid[j] = mask[j] · [token j continues the segment of token j−1]

exactly the assistant tokens are targets, and never the first token of a sample (no context
inside its segment). MTP depth k weighs the target t_{i+k} by valid[i+1]·…·valid[i+k], so it
trains on assistant tokens whose k predecessors are assistant tokens too: it skips the first
k−1 tokens of each assistant span.

Packing (`pack_samples(pack=True)`) places whole samples back to back, in order, and starts a new
row when the next one does not fit (no sample is split across rows: a conversation cut in two
would train its second half without its prompt). Segment ids keep samples apart in attention and
positions restart at 0 per sample, so a packed row computes what the same samples would one per
row (`pack=False`), up to fp32 rounding. A sample longer than T is cut to its first T tokens
(counted in `truncated`).

Batches (`SFTBatches`): rows are read in a fresh seeded permutation each epoch, and the batch of
step s is a pure function of (seed, s), so a resumed run reads the same batches with no iterator
state. Each process takes its share of the global batch's rows.

Left out: bin-packing heuristics (first-fit / best-fit; sequential filling wastes at most the
tail of each row) and streaming datasets larger than host memory.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from deepseek_jax.data import chat
from deepseek_jax.data.packing import FEATURES, check_seq_len, empty_row, valid_from_segments


@dataclasses.dataclass(frozen=True)
class Rows:
    arrays: dict[str, np.ndarray]    # FEATURES, each [R, T]
    truncated: int                   # samples cut to T tokens
    samples: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.arrays["tokens"])


def pack_samples(samples: Sequence[chat.Sample], seq_len: int, pad_id: int,
                 pack: bool = True) -> Rows:
    """Rows of `samples`: packed back to back (`pack`) or one sample per row."""
    check_seq_len(seq_len)
    rows, masks, truncated = [], [], 0
    fill = seq_len                                   # no open row yet
    for sample in samples:
        tokens, mask = sample.tokens[:seq_len], sample.mask[:seq_len]
        truncated += len(sample.tokens) > seq_len
        if not pack or fill + len(tokens) > seq_len:
            rows.append(empty_row(seq_len, pad_id))
            masks.append(np.zeros(seq_len, np.float32))
            fill = 0
        row, segment = rows[-1], int(rows[-1]["segment_ids"].max()) + 1
        span = slice(fill, fill + len(tokens))
        row["tokens"][span] = tokens
        row["segment_ids"][span] = segment
        row["positions"][span] = np.arange(len(tokens), dtype=np.int32)
        masks[-1][span] = mask
        fill += len(tokens)
    for row, mask in zip(rows, masks):
        row["valid"] = valid_from_segments(row["segment_ids"]) * mask
    arrays = {k: np.stack([r[k] for r in rows]) if rows else
              np.zeros((0, seq_len), empty_row(1, 0)[k].dtype) for k in FEATURES}
    return Rows(arrays, truncated, len(samples), pad_id)


def trained_tokens(batch: dict[str, np.ndarray]) -> int:
    """How many targets the LM loss counts in a batch (Σ valid over positions 1…T−1)."""
    return int(np.asarray(batch["valid"])[..., 1:].sum())


class SFTBatches:
    """Training batches over `rows`: `batch(step)` → this process's rows of the global batch."""

    def __init__(self, rows: Rows, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if not len(rows):
            raise ValueError("no training rows: the SFT data is empty")
        if global_batch % process_count:
            raise ValueError(f"data.global_batch={global_batch} does not split over "
                             f"{process_count} processes; use a multiple of {process_count}")
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        per = global_batch // process_count
        self._local = slice(process_index * per, (process_index + 1) * per)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def indices(self, step: int) -> np.ndarray:
        """Row indices of step `step`'s global batch: positions s·B … (s+1)·B−1 of the
        concatenated epoch permutations."""
        R, B = len(self.rows), self.global_batch
        positions = np.arange(step * B, (step + 1) * B)
        epochs = positions // R
        out = np.empty(B, np.int64)
        for e in np.unique(epochs):                    # one permutation per epoch touched
            here = epochs == e
            out[here] = self._order(int(e))[positions[here] % R]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)[self._local]
        return {k: v[idx] for k, v in self.rows.arrays.items()}


def eval_batches(rows: Rows, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Every row once, in order, in global batches padded with empty rows (tokens `pad_id`,
    every other array 0, as `empty_row`: they count no targets), each cut to this process's
    share. DPO's pair rows (`data/preference.py`) batch the same way."""
    per = global_batch // process_count
    local = slice(process_index * per, (process_index + 1) * per)
    out = []
    for start in range(0, len(rows), global_batch):
        part = {k: v[start: start + global_batch] for k, v in rows.arrays.items()}
        missing = global_batch - len(part["tokens"])
        if missing:
            part = {k: np.concatenate([v, np.full((missing,) + v.shape[1:],
                                                  rows.pad_id if k == "tokens" else 0, v.dtype)])
                    for k, v in part.items()}
        out.append({k: v[local] for k, v in part.items()})
    return out


def split_held_out(conversations: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded `fraction` of the conversations (at least one) held out, so
    every sample of one conversation lands on the same side. DPO splits its pairs the same
    way."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.validation_fraction={fraction}: use a share between 0 and 1, "
                         "or set data.eval_path")
    order = np.random.default_rng(seed).permutation(len(conversations))
    n = max(1, int(round(fraction * len(conversations))))
    if n >= len(conversations):
        raise ValueError(f"{len(conversations)} records leave none for training after "
                         f"holding out {n}; add data or lower data.validation_fraction")
    held = set(order[:n].tolist())
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def rows_from_config(data, encoder) -> tuple[Rows, Rows]:
    """(training rows, held-out rows) of a run config's `data` section: conversations from
    `path` (JSONL) or `hf_dataset`, held out from `eval_path` / `hf_eval_split` or a seeded
    `validation_fraction`, rendered with `chat_template` (or the tokenizer's own, or the byte
    template: `chat.default_template`) and packed to `seq_len`."""
    template = chat.default_template(data.tokenizer, data.chat_template)
    if bool(data.path) == bool(data.hf_dataset):
        raise ValueError("set exactly one of data.path (a JSONL file of conversations) and "
                         "data.hf_dataset")
    if data.path:
        train = chat.load_conversations(data.path)
        held = chat.load_conversations(data.eval_path) if data.eval_path else None
    else:
        train = chat.load_hf_dataset(data.hf_dataset, data.hf_split)
        held = (chat.load_hf_dataset(data.hf_dataset, data.hf_eval_split)
                if data.hf_eval_split else None)
    if held is None:
        train, held = split_held_out(train, data.validation_fraction, data.shuffle_seed)
    pack = lambda convs: pack_samples(chat.tokenize_all(convs, template, encoder),
                                      data.seq_len, encoder.pad_id, pack=data.pack)
    return pack(train), pack(held)
