"""TFDS builders: array_record read without TensorFlow, determinism, disjoint splits, reuse."""

import ast
import fractions
import json
import os
import re
import subprocess
import sys

import grain
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")

from deepseek_jax import data  # noqa: E402
from deepseek_jax.data import builders, tasks, tokenizer  # noqa: E402

SMALL = dict(num_train=40, num_validation=8, num_test=8)


def records(source):
    return [source[i] for i in range(len(source))]


def as_text(x):
    return x.decode() if isinstance(x, bytes) else x


def value_and_numbers(expr):
    """The test's own evaluator: exact value and the integer literals used."""
    used = []

    def walk(node):
        if isinstance(node, ast.BinOp):
            a, b = walk(node.left), walk(node.right)
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b,
                    ast.Div: a / b if b else None}[type(node.op)]
        assert isinstance(node, ast.Constant) and type(node.value) is int
        used.append(node.value)
        return fractions.Fraction(node.value)

    return walk(ast.parse(expr, mode="eval").body), used


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def arithmetic(data_dir):
    return data.build_dataset("arithmetic", data_dir, seed=1, **SMALL)


@pytest.fixture(scope="module")
def countdown(data_dir):
    return data.build_dataset("countdown", data_dir, seed=1, **SMALL)


def test_records_are_array_record_and_read_without_tensorflow(arithmetic, tmp_path):
    files = os.listdir(arithmetic.data_dir)
    assert any(".array_record-" in f for f in files), files
    # In a fresh interpreter (another test may have imported anything into this one), building
    # and reading records leaves TensorFlow unimported. This can only fail where TensorFlow is
    # installed; where it is not (the dev environment), the records being built and read at all
    # is the evidence.
    code = ("import sys; from deepseek_jax import data; b = data.build_dataset('arithmetic', "
            "sys.argv[1], seed=1, num_train=4, num_validation=2, num_test=2); "
            "s = b.as_data_source('train'); print(len(s), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "4 False", out.stdout
    assert {s: len(arithmetic.as_data_source(s)) for s in ("train", "validation", "test")} == {
        "train": 40, "validation": 8, "test": 8}


def test_arithmetic_records(arithmetic):
    for r in records(arithmetic.as_data_source("train")):
        a, b = r["numbers"].tolist()
        op = as_text(r["op"])
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert r["target"] == result and as_text(r["answer"]) == str(result)
        assert as_text(r["prompt"]) == f"{a}{op}{b}="
        assert as_text(r["text"]) == f"{a}{op}{b}={result}\n"


def test_countdown_records_are_solvable_by_their_solution(countdown):
    for split in ("train", "validation", "test"):
        for r in records(countdown.as_data_source(split)):
            value, used = value_and_numbers(as_text(r["answer"]))
            assert value == r["target"]
            remaining = r["numbers"].tolist()
            for n in used:
                remaining.remove(n)                                # each number at most once
            assert re.fullmatch(r"numbers( \d+){3,4} target \d+", as_text(r["prompt"]))


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_splits_are_disjoint(name, arithmetic, countdown):
    builder = {"arithmetic": arithmetic, "countdown": countdown}[name]
    keys = {}
    for split in ("train", "validation", "test"):
        rows = records(builder.as_data_source(split))
        problems = [{"numbers": r["numbers"].tolist(), "target": int(r["target"]),
                     **({"op": as_text(r["op"])} if "op" in r else {})} for r in rows]
        keys[split] = {tasks.problem_key(p) for p in problems}
        assert len(keys[split]) == len(rows)
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_same_seed_same_records_and_reuse(tmp_path, arithmetic):
    again = data.build_dataset("arithmetic", tmp_path, seed=1, **SMALL)
    assert again.builder_config.name == arithmetic.builder_config.name
    a = records(arithmetic.as_data_source("train"))
    b = records(again.as_data_source("train"))
    assert [r["text"] for r in a] == [r["text"] for r in b]
    stamp = {f: os.stat(os.path.join(again.data_dir, f)).st_mtime_ns
             for f in os.listdir(again.data_dir)}
    reused = data.build_dataset("arithmetic", tmp_path, seed=1, **SMALL)    # idempotent
    assert reused.data_dir == again.data_dir
    assert stamp == {f: os.stat(os.path.join(again.data_dir, f)).st_mtime_ns
                     for f in os.listdir(again.data_dir)}
    other = builders.make_builder("arithmetic", tmp_path, seed=2, **SMALL)
    assert other.data_dir != again.data_dir                                # new options, new dir


def test_tfds_data_source_by_name(arithmetic, data_dir):
    import tensorflow_datasets as tfds
    name = f"arithmetic/{arithmetic.builder_config.name}"
    src = tfds.data_source(name, data_dir=str(data_dir), split="test")
    assert len(src) == 8 and src[0]["text"] == arithmetic.as_data_source("test")[0]["text"]


def test_train_iterator_on_a_built_dataset(arithmetic):
    it = data.make_train_iterator(arithmetic.as_data_source("train"), seq_len=32,
                                  global_batch_size=2, seed=0, read_threads=0,
                                  shard_options=grain.sharding.NoSharding())
    batch = next(it)
    text = tokenizer.decode(batch["tokens"][0][batch["segment_ids"][0] == 1])
    assert re.fullmatch(r"\d+[-+*]\d+=-?\d+\n", text), text


def write_corpus(root):
    (root / "notes").mkdir(parents=True)
    (root / "a.txt").write_text("first plain document\n")
    (root / "notes" / "b.md").write_text("second one")
    (root / ".hidden").write_text("never read")
    lines = [{"body": f"json line {i}", "id": i} for i in range(10)]
    (root / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return 12


def test_text_files_from_a_directory(tmp_path):
    n = write_corpus(tmp_path / "corpus")
    builder = data.build_dataset("text_files", tmp_path / "out", paths=tmp_path / "corpus",
                                 text_field="body")
    texts = sorted(as_text(r["text"]) for r in records(builder.as_data_source("train")))
    assert len(texts) == n
    assert "first plain document\n" in texts and "json line 3" in texts
    assert "never read" not in texts


def test_text_files_glob_validation_split_and_new_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i:02d}.txt").write_text(f"document number {i}")
    kw = dict(paths=str(corpus / "*.txt"), validation_fraction=0.3)
    builder = data.build_dataset("text_files", tmp_path / "out", **kw)
    train = {as_text(r["text"]) for r in records(builder.as_data_source("train"))}
    val = {as_text(r["text"]) for r in records(builder.as_data_source("validation"))}
    assert train and val and not train & val and len(train | val) == 30
    (corpus / "30.txt").write_text("a late addition")
    rebuilt = data.build_dataset("text_files", tmp_path / "out", **kw)
    assert rebuilt.data_dir != builder.data_dir
    src = data.data_source("text_files", tmp_path / "out", "validation", **kw)
    assert len(src) == len(rebuilt.as_data_source("validation"))


def test_text_files_errors(tmp_path):
    with pytest.raises(ValueError, match="no files match"):
        data.build_dataset("text_files", tmp_path / "out", paths=str(tmp_path / "*.txt"))
    with pytest.raises(ValueError, match="not a file, directory or glob"):
        data.build_dataset("text_files", tmp_path / "out", paths=tmp_path / "missing")
    (tmp_path / "x.jsonl").write_text('{"content": "hi"}\n')
    with pytest.raises(ValueError, match="set text_field"):
        data.build_dataset("text_files", tmp_path / "out", paths=tmp_path / "x.jsonl")
    (tmp_path / "one.txt").write_text("only document")
    with pytest.raises(ValueError, match="validation_fraction"):
        data.build_dataset("text_files", tmp_path / "out", paths=tmp_path / "one.txt",
                           validation_fraction=1e-9)
    with pytest.raises(ValueError, match="set validation_fraction > 0"):
        data.data_source("text_files", tmp_path / "out", "validation",
                         paths=tmp_path / "one.txt")


def test_dataset_errors_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="use one of arithmetic, countdown, text_files"):
        data.build_dataset("gsm8k", tmp_path)
    with pytest.raises(ValueError, match="unknown option"):
        data.build_dataset("arithmetic", tmp_path, max_digit=3)
    with pytest.raises(ValueError, match="data_dir is required"):
        data.build_dataset("arithmetic", "", **SMALL)
    with pytest.raises(ValueError, match="run build_dataset"):
        data.data_source("arithmetic", tmp_path / "empty", "train", build=False, **SMALL)
    with pytest.raises(ValueError, match="count >= 0"):
        data.build_dataset("countdown", tmp_path, num_train=-1)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        data.build_dataset("text_files", tmp_path, paths=__file__, validation_fraction=1.0)
