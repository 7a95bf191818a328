"""The run directory: relative paths made absolute, and each way a workdir can fail caught before
the first step, with a message that names the fix."""

import errno
import json
import os

import pytest

from deepseek_jax.config import get_config
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train import workdir as run_dir


def test_resolve_makes_relative_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_dir.resolve("runs/demo") == str(tmp_path / "runs" / "demo")
    assert run_dir.resolve("./a/../b") == str(tmp_path / "b")
    assert run_dir.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert run_dir.resolve("/abs/path") == "/abs/path"
    assert run_dir.resolve("") == ""


def test_resolve_refuses_urls():
    with pytest.raises(run_dir.WorkdirError, match="mount the bucket"):
        run_dir.resolve("gs://bucket/run")


def test_prepare_creates_the_directory_and_leaves_no_probe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_dir.prepare("a/b/run", get_config("tiny"))
    assert out == str(tmp_path / "a" / "b" / "run")
    assert os.path.isdir(out) and os.listdir(out) == []


def test_workdir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(run_dir.WorkdirError, match="is a file, not a directory"):
        run_dir.prepare(str(tmp_path / "f"))


def test_workdir_that_cannot_be_created(tmp_path):
    (tmp_path / "f").write_text("x")          # a file where a parent directory should be
    with pytest.raises(run_dir.WorkdirError, match="cannot create .*--workdir"):
        run_dir.prepare(str(tmp_path / "f" / "run"))


def test_filesystem_without_directory_rename(tmp_path, monkeypatch):
    """A filesystem that cannot rename a directory cannot commit an Orbax checkpoint."""
    def no_rename(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(run_dir.os, "rename", no_rename)
    with pytest.raises(run_dir.WorkdirError, match="cannot hold checkpoints.*POSIX filesystem"):
        run_dir.prepare(str(tmp_path / "run"))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "run") == []            # the probe was cleaned up


def test_workdir_holding_another_model(tmp_path):
    ckpt.save_model_config(str(tmp_path), get_config("tiny"))
    assert run_dir.prepare(str(tmp_path), get_config("tiny")) == str(tmp_path)   # same model: ok
    other = get_config("tiny", d_model=get_config("tiny").d_model * 2)
    with pytest.raises(run_dir.WorkdirError,
                       match=r"another model \(d_model: .*fresh --workdir"):
        run_dir.prepare(str(tmp_path), other)


def test_unreadable_model_config(tmp_path):
    (tmp_path / run_dir.MODEL_CONFIG).write_text("{not json")
    with pytest.raises(run_dir.WorkdirError, match="unreadable"):
        run_dir.prepare(str(tmp_path), get_config("tiny"))


def test_saved_config_round_trips_through_json(tmp_path):
    """The comparison sees the config as JSON stores it (tuples become lists): no false alarm
    for any named variant."""
    for name in ("tiny", "small", "v3-671b"):
        ckpt.save_model_config(str(tmp_path / name), get_config(name))
        run_dir.check_same_model(str(tmp_path / name), get_config(name))
        with open(tmp_path / name / run_dir.MODEL_CONFIG) as f:
            assert json.load(f)["d_model"] == get_config(name).d_model
