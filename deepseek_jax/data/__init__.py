"""Data: procedural tasks, TFDS builders (array_record, no TensorFlow), the Grain pipeline.

Public API (the Grain/TFDS parts are imported on first use, so `deepseek_jax.data.tokenizer` and
`synthetic` work on machines without grain or tensorflow-datasets):

    build_dataset(name, data_dir, **options) -> tfds.core.DatasetBuilder
        Prepare "arithmetic", "countdown" or "text_files" as array_record under data_dir
        (idempotent). Options: builders.build_dataset.
    data_source(name, data_dir, split="train", *, build=True, **options) -> random-access source
    make_train_iterator(source, *, seq_len, global_batch_size, seed=0, tokenizer=None,
                        tokenizer_path=None, text_field="text", shard_options=None,
                        num_epochs=None, read_threads=2, worker_count=0) -> grain.DatasetIterator
        Infinite, shuffled, packed batches {tokens, segment_ids, positions: int32 [B, T],
        valid: float32 [B, T]}; `get_state()`/`set_state()` resume exactly.
    make_eval_iterator(source, *, seq_len, global_batch_size, ..., num_batches=None)
        Finite, unshuffled batches of the same layout.
    train_iterator(config.data, data_dir, *, seed=None, ...)
    eval_iterator(config.data, data_dir, *, num_batches=None, ...)
        The same from a run config's data section (fields in run_config.py): the dataset is
        built under data_dir first; training reads "train", evaluation "validation".
    vocab_size(tokenizer="") -> int
        Ids the configured tokenizer emits (259 for the byte tokenizer).
    Encoder(path=None, *, add_bos=False, eos_token=None, ...)
        Text -> int32 ids + eos: byte tokenizer, or an HF tokenizer.json.
    arithmetic_problem(rng, max_digits=3, ops="+-*"), countdown_problem(rng, ...),
    solve_countdown(numbers, target), evaluate_expression(expr), check_countdown(expr, numbers,
    target, exactly_once=False)
        The task generators and checkers, pure functions (tasks.py).

Typical use:

    builder = data.build_dataset("arithmetic", "/tmp/data", num_train=5000)
    it = data.make_train_iterator(builder.as_data_source("train"), seq_len=128,
                                  global_batch_size=16, seed=0)
    batch = next(it)

Files: tokenizer.py (byte ids), synthetic.py (in-memory arithmetic stream for the demo),
tasks.py, text_files.py, builders.py (TFDS), encoding.py, packing.py, pipeline.py (Grain),
jsonl.py (JSONL input, errors that name the file and line),
run_config.py (the run config's data section), chat.py (conversations, chat templates and
assistant masks for SFT), sft.py (SFT rows, batches and the run config's SFT data section),
preference.py (DPO's preference pairs to rows).

Left out: downloads of public corpora (point `text_files` at them once downloaded).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "build_dataset": "builders", "data_source": "builders", "make_builder": "builders",
    "make_train_iterator": "pipeline", "make_eval_iterator": "pipeline",
    "Encoder": "encoding", "vocab_size": "run_config",
    "train_iterator": "run_config", "eval_iterator": "run_config",
    "pack_documents": "packing", "PackIterDataset": "packing",
    "arithmetic_problem": "tasks", "countdown_problem": "tasks", "solve_countdown": "tasks",
    "evaluate_expression": "tasks", "check_countdown": "tasks", "generate_splits": "tasks",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
