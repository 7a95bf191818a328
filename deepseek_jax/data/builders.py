"""TFDS builders that need no download, stored as array_record and read without TensorFlow.

Three datasets, each prepared with `build_dataset(name, data_dir, **options)`:

- `arithmetic`: `a op b` problems (`tasks.arithmetic_problem`); splits train/validation/test.
- `countdown`: solvable Countdown puzzles with one known solution (`tasks.countdown_problem`);
  splits train/validation/test.
- `text_files`: the user's own `.txt`/`.jsonl`/… files (`text_files.read_documents`); split train,
  plus validation when `validation_fraction > 0` (documents assigned by a hash of their text).

Every example has a `text` feature (the pretraining form; the Grain pipeline reads only that). The
task datasets also hold `prompt`, `answer`, `numbers`, `target` (and arithmetic `op`) for GRPO.
Text features come back from `data_source` as UTF-8 bytes, numbers as int64 arrays.

Options become a TFDS `BuilderConfig` whose name spells the seed and counts plus a hash of every
option (`seed0_1000_100_100_<hash>`; a text corpus is named by a hash of its files' paths, sizes
and mtimes), stored under `data_dir/NAME/CONFIG/1.0.0/`. Calling `build_dataset` again with the
same options finds the records and reuses them; changed options or files give a new config
directory. After `import deepseek_jax.data.builders` the datasets are also registered with TFDS,
so `tfds.data_source("arithmetic/CONFIG", data_dir=...)` works too.

Multi-process runs (`jax.distributed` initialized): `build_dataset` prepares once. Process 0
builds while the others wait at a barrier of the coordination service; then each of the others
opens the records, and builds them itself only if it cannot see them (a data_dir on local disk,
not shared), holding a file lock in data_dir so that processes sharing one machine's disk build
one at a time. Without this, TFDS's rename of its `incomplete.*` folder fails for all but one.

Left out: Beam (the corpora here are small enough for one process) and TFRecord output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import os
from typing import Any

import jax

import numpy as np
import tensorflow_datasets as tfds

from deepseek_jax.data import tasks, text_files
from deepseek_jax.parallel import processes

FILE_FORMAT = "array_record"
_VERSION = tfds.core.Version("1.0.0")


# --------------------------------------------------------------------------------------------
# Configs


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
    """Options shared by the procedural tasks: seed, examples per split, held-out share."""
    seed: int = 0
    num_train: int = 10_000
    num_validation: int = 1_000
    num_test: int = 1_000
    held_out_fraction: float = 0.1

    def counts(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation,
                "test": self.num_test}

    def task_kwargs(self) -> dict[str, Any]:
        shared = {f.name for f in dataclasses.fields(TaskConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in shared}


@dataclasses.dataclass(eq=False)
class ArithmeticConfig(TaskConfig):
    """`tasks.arithmetic_problem` knobs."""
    max_digits: int = 3
    ops: str = "+-*"
    min_digits: int = 1


@dataclasses.dataclass(eq=False)
class CountdownConfig(TaskConfig):
    """`tasks.countdown_problem` knobs."""
    min_numbers: int = 3
    max_numbers: int = 4
    max_number: int = 99
    max_target: int = 100


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """Which files, which JSONL field, and the validation share."""
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    validation_fraction: float = 0.0
    files: tuple[str, ...] = ()             # resolved by `make_config`


# --------------------------------------------------------------------------------------------
# Builders


def _text(**extra) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"prompt": tfds.features.Text(),
                                       "answer": tfds.features.Text(),
                                       "text": tfds.features.Text(),
                                       "numbers": tfds.features.Tensor(shape=(None,),
                                                                       dtype=np.int64),
                                       "target": np.int64, **extra})


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared split logic of the procedural tasks."""
    VERSION = _VERSION
    TASK = ""

    def _features(self):
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=type(self).__doc__,
                                     features=self._features())

    def _split_generators(self, dl_manager):
        del dl_manager                                            # nothing to download
        cfg = self.builder_config
        problems = tasks.generate_splits(self.TASK, cfg.seed, cfg.counts(),
                                         cfg.held_out_fraction, **cfg.task_kwargs())
        return {split: self._generate_examples(items) for split, items in problems.items()
                if items}

    def _generate_examples(self, problems):
        keys = list(self.info.features.keys())
        for i, problem in enumerate(problems):
            yield i, {k: problem[k] for k in keys}


class Arithmetic(_TaskBuilder):
    """Multi-digit `a op b` problems (+, -, *), e.g. text "417+85=502\\n"."""
    BUILDER_CONFIGS = [ArithmeticConfig(name="default")]
    TASK = "arithmetic"

    def _features(self):
        return _text(op=tfds.features.Text())


class Countdown(_TaskBuilder):
    """Solvable Countdown puzzles, e.g. text "numbers 3 7 25 50 target 81: ...\\n"."""
    BUILDER_CONFIGS = [CountdownConfig(name="default")]
    TASK = "countdown"

    def _features(self):
        return _text()


def _text_split(text: str, validation_fraction: float) -> str:
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2.0 ** 64
    return "validation" if h < validation_fraction else "train"


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """Documents from the user's own text and JSONL files."""
    VERSION = _VERSION
    BUILDER_CONFIGS = [TextFilesConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=type(self).__doc__,
                                     features=tfds.features.FeaturesDict({
                                         "text": tfds.features.Text(),
                                         "source": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if not cfg.files:
            raise ValueError("text_files needs paths=: a directory, glob or list of files")
        # A first pass counts the documents per split: TFDS cannot write an empty split.
        counts = {"train": 0, "validation": 0}
        for _, text in text_files.read_documents(cfg.files, cfg.text_field):
            counts[_text_split(text, cfg.validation_fraction)] += 1
        if cfg.validation_fraction > 0 and counts["validation"] == 0:
            raise ValueError(f"validation_fraction={cfg.validation_fraction} put none of the "
                             f"{counts['train']} documents in validation; add documents, raise "
                             "it, or set validation_fraction=0")
        if counts["train"] == 0:
            raise ValueError(f"all {counts['validation']} documents went to validation; lower "
                             "validation_fraction")
        return {split: self._generate_examples(split) for split, n in counts.items() if n}

    def _generate_examples(self, split):
        cfg = self.builder_config
        for key, text in text_files.read_documents(cfg.files, cfg.text_field):
            if _text_split(text, cfg.validation_fraction) == split:
                yield key, {"text": text, "source": key}


BUILDERS = {"arithmetic": (Arithmetic, ArithmeticConfig),
            "countdown": (Countdown, CountdownConfig),
            "text_files": (TextFiles, TextFilesConfig)}


# --------------------------------------------------------------------------------------------
# Public entry points


def _option_hash(cfg) -> str:
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in base}
    return hashlib.blake2b(repr(sorted(options.items())).encode(), digest_size=4).hexdigest()


def make_config(name: str, **options) -> tfds.core.BuilderConfig:
    """The `BuilderConfig` for dataset `name` with `options`, named after them."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(BUILDERS)}")
    _, config_cls = BUILDERS[name]
    allowed = {f.name for f in dataclasses.fields(config_cls)} - {
        f.name for f in dataclasses.fields(tfds.core.BuilderConfig)} - {"files"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; "
                         f"options: {sorted(allowed)}")
    if name == "text_files":
        paths = options.get("paths", ())
        paths = (paths,) if isinstance(paths, (str, os.PathLike)) else tuple(paths)
        options["paths"] = tuple(map(os.fspath, paths))
        files = tuple(text_files.find_files(options["paths"]))
        cfg = config_cls(name="tmp", files=files, **options)
        if not 0.0 <= cfg.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={cfg.validation_fraction}; use a value in "
                             "[0, 1), e.g. 0.01")
        label = text_files.fingerprint(files, cfg.text_field, cfg.validation_fraction)
        cfg.name = f"corpus_{label}"
        return cfg
    cfg = config_cls(name="tmp", **options)
    for field in ("num_train", "num_validation", "num_test"):
        if getattr(cfg, field) < 0:
            raise ValueError(f"{field}={getattr(cfg, field)}; use a count >= 0")
    if cfg.num_train + cfg.num_validation + cfg.num_test == 0:
        raise ValueError("all example counts are 0; set num_train (and num_validation/num_test)")
    cfg.name = (f"seed{cfg.seed}_{cfg.num_train}_{cfg.num_validation}_{cfg.num_test}_"
                f"{_option_hash(cfg)}")
    return cfg


def _check_data_dir(data_dir) -> str:
    if not data_dir:
        raise ValueError("data_dir is required: the folder that holds the prepared records")
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def make_builder(name: str, data_dir: str | os.PathLike, **options) -> tfds.core.DatasetBuilder:
    """The (unprepared) builder of dataset `name` with `options` under `data_dir`."""
    cfg = make_config(name, **options)
    builder_cls, _ = BUILDERS[name]
    return builder_cls(config=cfg, data_dir=_check_data_dir(data_dir), file_format=FILE_FORMAT)


def build_dataset(name: str, data_dir: str | os.PathLike, **options) -> tfds.core.DatasetBuilder:
    """Prepare the array_record files of dataset `name` (idempotent) and return its builder.

    Args:
        name: "arithmetic", "countdown" or "text_files".
        data_dir: where the records go (created if missing).
        **options: the dataset's config fields. Tasks: `seed`, `num_train`, `num_validation`,
            `num_test`, `held_out_fraction`, and `max_digits`/`ops` (arithmetic) or
            `min_numbers`/`max_numbers`/`max_number`/`max_target` (countdown). text_files:
            `paths` (directory, glob or list), `text_field` (JSONL), `validation_fraction`.

    Returns:
        The prepared builder: `builder.as_data_source(split)` gives a random-access source.
    """
    if not processes.multi_process():
        builder = make_builder(name, data_dir, **options)
        builder.download_and_prepare()
        return builder
    if jax.process_index() == 0:
        with _build_lock(data_dir):
            make_builder(name, data_dir, **options).download_and_prepare()
    processes.barrier(f"deepseek_jax/data/{name}/{make_config(name, **options).name}/"
                      f"{next(_BARRIERS)}", PREPARE_TIMEOUT_S)
    builder = make_builder(name, data_dir, **options)     # reads what process 0 wrote
    if not builder.is_prepared():                        # not shared with process 0
        with _build_lock(data_dir):
            builder = make_builder(name, data_dir, **options)
            builder.download_and_prepare()
    return builder


# Seconds the other processes wait for process 0 to prepare a dataset (a large text corpus
# takes a while); the coordination service's barrier fails after it, naming the key.
PREPARE_TIMEOUT_S = 3600
# A barrier key is used once; every process calls build_dataset in the same order, so the same
# count on each makes the keys agree.
_BARRIERS = itertools.count()


@contextlib.contextmanager
def _build_lock(data_dir):
    """An exclusive `flock` on data_dir/.prepare.lock (processes of one machine take turns)."""
    directory = _check_data_dir(data_dir)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".prepare.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def data_source(name: str, data_dir: str | os.PathLike, split: str = "train", *,
                build: bool = True, **options):
    """Random-access source (len, [i] -> dict) over one split of dataset `name`.

    Args:
        name, data_dir, **options: as for `build_dataset`.
        split: "train", "validation" or "test".
        build: prepare the records if they are missing; with False a missing dataset is an error.
    """
    if build:
        builder = build_dataset(name, data_dir, **options)
    else:
        builder = make_builder(name, data_dir, **options)
        if not builder.is_prepared():
            raise ValueError(f"{name}/{builder.builder_config.name} is not prepared under "
                             f"{builder.data_dir}; run build_dataset({name!r}, {data_dir!r}, ...) "
                             "first or pass build=True")
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        hint = "; set validation_fraction > 0" if name == "text_files" else ""
        raise ValueError(f"{name} has no split {split!r}, only {splits}{hint}")
    return builder.as_data_source(split)
