"""The run config's `data` section to prepared datasets and iterators (what trainers call).

The run configs (`deepseek_jax.configs`) describe data with these fields (ml_collections `config.data`):

    dataset        "arithmetic", "countdown" or "text_files"
    num_train      procedural tasks: training examples
    num_eval       procedural tasks: examples in each of validation and test
    text_glob      text_files: a directory, glob or file (.txt, .jsonl, …); local paths
    text_field     text_files: the JSONL field that holds the text
    validation_fraction  text_files, optional (default 0.01): share of documents held out
    tokenizer      "" for the byte tokenizer, else an HF tokenizer.json path
    template       "text" (the stored pretraining line), or an R1 template name ("r1_zero",
                   "compact"): prompt + a well-formed <think>…</think> <answer>…</answer>
                   completion, to pretrain a model that GRPO then improves (GRPO's run
                   config names its prompt template the same way)
    worked_fraction  R1 templates, optional (default 0): share of + and − problems whose think
                   block works the sum out column by column (`tasks.worked_solution`) instead
                   of restating it; a fixed hash of each prompt picks them
    plain_fraction R1 templates, optional (default 0): share of problems written as the bare
                   stored line ("43+27=70\n") instead: ~6× more problems per token, so a brief
                   pretraining learns more arithmetic, while the rest teach the R1 format
    estimate_fraction R1 templates, optional (default 0): share of the R1-format + and −
                   problems whose think block and answer are a rough estimate instead
                   (`tasks.estimate`, operands rounded to tens: usually wrong), a careless
                   habit for GRPO to unlearn (the CPU demo)
    max_digits, min_digits, ops  arithmetic only: operand digit range and operators
    seq_len        tokens per row, T
    global_batch   rows per step over all processes
    shuffle_seed   the shuffle seed, unless the caller passes seed=
    shards         optional (default 0): training data shards; 0 = one per process, or the
                   count a resumed checkpoint was read with (`ShardedTrainIterator`)

`train_iterator(config.data, data_dir, seed=...)` and
`eval_iterator(config.data, data_dir, num_batches=...)` build the dataset under `data_dir`
(idempotent, so every call after the first only opens the records) and call the pipeline's
iterators with the config's values: training reads split "train", evaluation "validation".

Training data is read as `shards` shards (contiguous blocks of each epoch's global shuffle),
each process reading an equal, contiguous share of them and stacking their rows. A step's
global batch depends on the shard count only, not on the process count, so a checkpoint's
iterator state ({shard: state}, gathered from every process) resumes exactly on any process
count that divides the shard count, and a 1-process run with `shards=2` reads the batches a
2-process run reads.

Left out: remote paths (gs://…) for text_files; copy the corpus to local disk first.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import jax
import numpy as np

from deepseek_jax.data import builders, pipeline, r1
from deepseek_jax.data.encoding import Encoder


def _get(cfg, name: str, default: Any = None) -> Any:
    try:
        return getattr(cfg, name)
    except AttributeError:
        return default


def dataset_options(cfg) -> tuple[str, dict[str, Any]]:
    """(dataset name, `build_dataset` options) from the data section."""
    name = cfg.dataset
    if name == "text_files":
        glob = _get(cfg, "text_glob", "")
        if not glob:
            raise ValueError("dataset text_files needs config.data.text_glob: a directory, glob "
                             "or file of .txt/.jsonl documents")
        return name, {"paths": glob, "text_field": _get(cfg, "text_field", "text"),
                      "validation_fraction": _get(cfg, "validation_fraction", 0.01)}
    if name in ("arithmetic", "countdown"):
        num_eval = _get(cfg, "num_eval", 1000)
        options = {"num_train": _get(cfg, "num_train", 10_000),
                   "num_validation": num_eval, "num_test": num_eval}
        if name == "arithmetic":
            options.update(max_digits=_get(cfg, "max_digits", 3), ops=_get(cfg, "ops", "+-*"),
                           min_digits=_get(cfg, "min_digits", 1))
        return name, options
    raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(builders.BUILDERS)}")


class FormattedSource:
    """A random-access source whose records are rendered as text by `fn` (lazily, per index)."""

    def __init__(self, source, fn):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.fn(self.source[i])


def task_source(cfg, data_dir, split: str):
    """The split's records as stored (dicts), for consumers that need the structured fields."""
    if not data_dir:
        raise ValueError("data_dir is required with a config: the folder for the array_record "
                         "files")
    name, options = dataset_options(cfg)
    return builders.data_source(name, data_dir, split, **options)


def _source(cfg, data_dir, split: str):
    source = task_source(cfg, data_dir, split)
    fmt = _get(cfg, "template", "text")
    if fmt == "text":
        return source
    if fmt not in r1.TEMPLATES or cfg.dataset == "text_files":
        raise ValueError(f"data.template={fmt!r}: use 'text', or one of {sorted(r1.TEMPLATES)} "
                         "with the arithmetic or countdown dataset")
    worked = float(_get(cfg, "worked_fraction", 0.0))
    plain = float(_get(cfg, "plain_fraction", 0.0))
    estimated = float(_get(cfg, "estimate_fraction", 0.0))
    for name, share in (("worked_fraction", worked), ("plain_fraction", plain),
                        ("estimate_fraction", estimated)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"data.{name}={share}; use a share between 0 and 1")

    def render(record):
        problem = r1.problem_from_record(record)
        if r1.chosen(problem, plain, salt="plain"):
            return problem["text"]                    # the bare line, e.g. "43+27=70\n"
        return r1.sft_text(problem, fmt, worked, estimated)
    return FormattedSource(source, render)


def vocab_size(tokenizer: str = "") -> int:
    """Ids the tokenizer can emit: 259 for the byte tokenizer, else the HF file's size."""
    return Encoder(tokenizer or None).vocab_size


def train_iterator(cfg, data_dir, *, seed: int | None = None, **kwargs):
    """A `ShardedTrainIterator` of `pipeline.make_train_iterator`s, one per data shard this
    process reads (`cfg.shards`, module docstring), over split "train" of the dataset `cfg`
    describes. A caller passing `shard_options` picks the shard itself and gets that one
    pipeline iterator."""
    seed = _get(cfg, "shuffle_seed", 0) if seed is None else seed
    source = _source(cfg, data_dir, "train")
    if "shard_options" in kwargs:
        return pipeline.make_train_iterator(
            source, seq_len=cfg.seq_len, global_batch_size=cfg.global_batch, seed=seed,
            tokenizer_path=_get(cfg, "tokenizer", "") or None, **kwargs)

    def make(index: int, count: int):
        return pipeline.make_train_iterator(
            source, seq_len=cfg.seq_len, global_batch_size=cfg.global_batch, seed=seed,
            tokenizer_path=_get(cfg, "tokenizer", "") or None,
            shard_options=grain.sharding.ShardOptions(index, count, drop_remainder=True),
            **kwargs)
    shards = int(_get(cfg, "shards", 0) or 0)
    return ShardedTrainIterator(make, shards or jax.process_count(), fixed=bool(shards))


class ShardedTrainIterator:
    """This process's share of `shard_count` training data shards: shards
    [p·k, (p+1)·k) for process p of n (k = shard_count / n), one iterator each from
    `make(index, count)`; a batch is their batches' rows stacked in shard order.

    `get_state()` gives {"shard_count", "shards": {index: state}} for this process's shards;
    `merge_states` joins every process's into the checkpoint's, and `set_state` takes its own
    shards from that. A checkpoint read with another shard count is an error when the count was
    fixed (`fixed`), else this iterator switches to the checkpoint's count.
    """

    def __init__(self, make: Callable[[int, int], Any], shard_count: int, *, fixed: bool):
        self._make, self._fixed = make, fixed
        self._open(shard_count)

    def _open(self, count: int) -> None:
        n, p = jax.process_count(), jax.process_index()
        if count < 1 or count % n:
            raise ValueError(f"data.shards={count} is not a multiple of the {n} processes; use "
                             f"a multiple of {n} (or 0: one shard per process)")
        k = count // n
        self.shard_count, self.shards = count, list(range(p * k, (p + 1) * k))
        self._iters = [self._make(i, count) for i in self.shards]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iters]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def get_state(self) -> dict:
        return {"shard_count": self.shard_count,
                "shards": {str(i): it.get_state() for i, it in zip(self.shards, self._iters)}}

    def set_state(self, state: dict) -> None:
        if "shards" not in state:       # saved by a single, unsharded iterator
            if len(self._iters) != 1:
                raise ValueError("the checkpoint holds one data iterator's state; resume it "
                                 "with one process and data.shards=0")
            self._iters[0].set_state(state)
            return
        count = int(state["shard_count"])
        if count != self.shard_count:
            if self._fixed:
                raise ValueError(f"the checkpoint's data was read as {count} shards, this run "
                                 f"reads {self.shard_count}: set data.shards={count} (or 0) "
                                 "to resume it")
            self._open(count)
        for i, it in zip(self.shards, self._iters):
            it.set_state(state["shards"][str(i)])

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state covering every shard, from each process's `get_state()`."""
        return {"shard_count": states[0]["shard_count"],
                "shards": {i: s for state in states for i, s in state["shards"].items()}}


def eval_iterator(cfg, data_dir, **kwargs):
    """`pipeline.make_eval_iterator` over split "validation" of the dataset `cfg` describes."""
    return pipeline.make_eval_iterator(
        _source(cfg, data_dir, "validation"), seq_len=cfg.seq_len,
        global_batch_size=cfg.global_batch, tokenizer_path=_get(cfg, "tokenizer", "") or None,
        **kwargs)
