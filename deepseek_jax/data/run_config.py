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

`train_iterator(config.data, data_dir, seed=...)` and
`eval_iterator(config.data, data_dir, num_batches=...)` build the dataset under `data_dir`
(idempotent, so every call after the first only opens the records) and call the pipeline's
iterators with the config's values: training reads split "train", evaluation "validation".

Left out: remote paths (gs://…) for text_files; copy the corpus to local disk first.
"""

from __future__ import annotations

from typing import Any

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
    """`pipeline.make_train_iterator` over split "train" of the dataset `cfg` describes."""
    seed = _get(cfg, "shuffle_seed", 0) if seed is None else seed
    return pipeline.make_train_iterator(
        _source(cfg, data_dir, "train"), seq_len=cfg.seq_len,
        global_batch_size=cfg.global_batch, seed=seed,
        tokenizer_path=_get(cfg, "tokenizer", "") or None, **kwargs)


def eval_iterator(cfg, data_dir, **kwargs):
    """`pipeline.make_eval_iterator` over split "validation" of the dataset `cfg` describes."""
    return pipeline.make_eval_iterator(
        _source(cfg, data_dir, "validation"), seq_len=cfg.seq_len,
        global_batch_size=cfg.global_batch, tokenizer_path=_get(cfg, "tokenizer", "") or None,
        **kwargs)
