"""The Grain pipeline: random-access documents to packed, batched, checkpointable token rows.

Training (`make_train_iterator`), in order:

  source ─ global shuffle(seed) ─ this process's shard ─ repeat ─ encode (+eos) ─ pack ─ batch

- The source is anything with `len` and `[i]`: a TFDS `data_source` split, a list of strings, …;
  an element is a string/bytes, or a dict whose `text_field` holds one.
- The shuffle is a global index permutation, the same on every process and different each epoch
  (Grain's `MapDataset.shuffle` reseeds per epoch); each process then takes a contiguous block of
  it (`shard_options`, by default `grain.sharding.ShardByJaxProcess(drop_remainder=True)`), so
  processes read disjoint documents and together cover the epoch.
- Encoding appends eos (`encoding.Encoder`): the byte tokenizer, or an HF tokenizer.json.
- Packing (`packing.PackIterDataset`) gives rows of `seq_len` tokens; see packing.py for
  `segment_ids`, `positions`, `valid` and how documents longer than a row are split.
- Batches are dicts of numpy arrays [B, T] with B = global_batch_size / process count:
  `tokens`, `segment_ids`, `positions` int32 and `valid` float32: the keys `train.step` reads
  (it passes positions and segment ids to `Transformer.apply` and `valid` to the losses), so a
  batch goes to the train step as it is.

The iterator is a `grain.DatasetIterator`: `next(it)`, `it.get_state() -> dict` (JSON-serialisable)
and `it.set_state(state)`. A restored iterator yields exactly the batches the uninterrupted one
would have. With Orbax, save it next to the train state:

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               data=grain.checkpoint.CheckpointRestore(it)))

(Grain writes one JSON file per process, `process_<i>-of-<n>.json`; restoring needs the same
process count, `worker_count` and pipeline arguments.) `worker_count > 0` starts Grain worker
processes with `spawn`, so a script that uses it needs the `if __name__ == "__main__":` guard.

Evaluation (`make_eval_iterator`): the same encode/pack/batch, no shuffle, no repeat; each
process reads its contiguous block once (`drop_remainder=False`, so every example is evaluated
exactly once across processes); the last batch is padded with empty rows (all masks 0) to the full
batch size. `num_batches` fixes the count (padding with empty batches or stopping early), which
keeps every process in step on multi-host runs.

Left out: mixing several sources (`grain.MapDataset.mix` does it), and device placement (the
trainer turns host batches into global arrays with its mesh).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import numpy as np

from deepseek_jax.data import packing
from deepseek_jax.data.encoding import Encoder


class _Encode(grain.transforms.Map):
    """Element (text, bytes, or dict holding `text_field`) -> int32 ids with eos."""

    def __init__(self, encoder: Encoder, text_field: str):
        self.encoder = encoder
        self.text_field = text_field

    def map(self, element: Any) -> np.ndarray:
        if isinstance(element, (str, bytes)):
            return self.encoder(element)
        try:
            text = element[self.text_field]
        except (KeyError, TypeError, IndexError):
            keys = sorted(element) if isinstance(element, dict) else type(element).__name__
            raise ValueError(f"source element has no {self.text_field!r} field ({keys}); set "
                             "text_field to the field that holds the text") from None
        return self.encoder(text)


def _make_encoder(tokenizer: Encoder | None, tokenizer_path: str | None) -> Encoder:
    if tokenizer is not None and tokenizer_path is not None:
        raise ValueError("pass either tokenizer= or tokenizer_path=, not both")
    return tokenizer if tokenizer is not None else Encoder(tokenizer_path)


def _shard_options(shard_options, drop_remainder: bool):
    if shard_options is None:
        return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    return shard_options


def per_process_batch(global_batch_size: int, shard_options: grain.sharding.ShardOptions) -> int:
    """global_batch_size / process count; ValueError if it does not divide."""
    count = shard_options.shard_count
    if global_batch_size < 1 or global_batch_size % count:
        raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of "
                         f"the {count} data-loading processes; use a multiple of {count}")
    return global_batch_size // count


def shard_range(num_examples: int, options: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of this shard's contiguous block of `num_examples`.

    With `drop_remainder` every shard gets num_examples // shard_count; without it the first
    num_examples % shard_count shards get one more, so the shards cover everything.
    """
    count, index = options.shard_count, options.shard_index
    size, extra = divmod(num_examples, count)
    if options.drop_remainder:
        start, end = index * size, (index + 1) * size
    else:
        start = index * size + min(index, extra)
        end = start + size + (index < extra)
    if options.drop_remainder and size == 0:
        raise ValueError(f"{num_examples} examples cannot be split over {count} processes; "
                         "use a bigger split or fewer processes")
    return start, end


def _check_source(source) -> int:
    try:
        n = len(source)
    except TypeError:
        raise ValueError(f"the source must support len() and [i] (random access); got "
                         f"{type(source).__name__}") from None
    if n == 0:
        raise ValueError("the source is empty; build the dataset with more examples")
    return n


def make_train_iterator(source: Sequence[Any], *, seq_len: int, global_batch_size: int,
                        seed: int = 0, tokenizer: Encoder | None = None,
                        tokenizer_path: str | None = None, text_field: str = "text",
                        shard_options: grain.sharding.ShardOptions | None = None,
                        num_epochs: int | None = None, read_threads: int = 2,
                        worker_count: int = 0) -> grain.DatasetIterator:
    """Checkpointable iterator of packed training batches (module docstring has the layout).

    A run config's data section goes through `run_config.train_iterator` instead, which builds
    the dataset and calls this with the config's values.

    Args:
        source: random-access documents (a TFDS `data_source` split, a list of strings, …).
        seq_len: tokens per row, T (>= 2).
        global_batch_size: rows per step over all processes; each process yields B = this /
            process count rows.
        seed: the shuffle seed (0 <= seed < 2**32); the same seed gives the same batches.
        tokenizer: an `Encoder`; default the byte tokenizer.
        tokenizer_path: shorthand for `tokenizer=Encoder(tokenizer_path)` (HF tokenizer.json).
        text_field: the field of dict elements that holds the text.
        shard_options: which shard this process reads; default one shard per JAX process.
        num_epochs: passes over the data; None repeats forever.
        read_threads: Grain threads that read and encode ahead (0 reads in the main thread).
        worker_count: Grain worker processes (`mp_prefetch`); 0 keeps everything in-process.

    Returns:
        a `grain.DatasetIterator` of dicts `tokens`/`segment_ids`/`positions` (int32 [B, T]) and
        `valid` (float32 [B, T]).
    """
    packing.check_seq_len(seq_len)
    num = _check_source(source)
    options = _shard_options(shard_options, drop_remainder=True)
    batch = per_process_batch(global_batch_size, options)
    if not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed={seed}; use 0 <= seed < 2**32")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}; use a positive count or None (forever)")
    encoder = _make_encoder(tokenizer, tokenizer_path)
    start, end = shard_range(num, options)
    ds = grain.MapDataset.source(source).shuffle(seed=seed)[start:end].repeat(num_epochs)
    ds = ds.map(_Encode(encoder, text_field))
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(16, 8 * batch))
    rows = packing.PackIterDataset(ds.to_iter_dataset(read), seq_len=seq_len,
                                   pad_id=encoder.pad_id)
    batches = rows.batch(batch, drop_remainder=True)
    if worker_count:
        _allow_unparsed_absl_flags()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(batches)


def _allow_unparsed_absl_flags() -> None:
    """Grain 0.2.18's worker processes read an absl flag and fail when flags were never parsed
    (google/grain#1355, fixed after that release). Entrypoints run under `absl.app` parse them;
    in notebooks and tests mark them parsed, which keeps every flag at its default."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_eval_iterator(source: Sequence[Any], *, seq_len: int, global_batch_size: int,
                       tokenizer: Encoder | None = None, tokenizer_path: str | None = None,
                       text_field: str = "text",
                       shard_options: grain.sharding.ShardOptions | None = None,
                       num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Finite, deterministic, unshuffled batches over a held-out split; call it per evaluation.

    Args:
        source, seq_len, global_batch_size, tokenizer, tokenizer_path, text_field: as for
            `make_train_iterator` (`run_config.eval_iterator` reads a run config's split
            "validation").
        shard_options: default one shard per JAX process, covering every example.
        num_batches: yield exactly this many batches (padding with empty batches when the data
            ends first); None stops after the last (padded) batch of this process's shard.

    Yields:
        dicts like the training batches; padding rows have every mask 0.
    """
    packing.check_seq_len(seq_len)
    num = _check_source(source)
    options = _shard_options(shard_options, drop_remainder=False)
    batch = per_process_batch(global_batch_size, options)
    encoder = _make_encoder(tokenizer, tokenizer_path)
    start, end = shard_range(num, options)
    encode = _Encode(encoder, text_field)
    docs = (encode.map(source[i]) for i in range(start, end))
    rows = packing.pack_documents(docs, seq_len, encoder.pad_id)
    return _batches(rows, batch, seq_len, encoder.pad_id, num_batches)


def _batches(rows, batch: int, seq_len: int, pad_id: int, num_batches: int | None):
    empty = packing.empty_row(seq_len, pad_id)
    produced = 0
    while num_batches is None or produced < num_batches:
        chunk = [row for _, row in zip(range(batch), rows)]
        if not chunk and num_batches is None:
            return
        chunk += [empty] * (batch - len(chunk))
        yield {k: np.stack([row[k] for row in chunk]) for k in packing.FEATURES}
        produced += 1
