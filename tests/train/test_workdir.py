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


# --- gs:// run directories, through etils.epath (its testing mock stores gs://BUCKET/... under
# the working directory, so these run without a bucket; Orbax's own GCS writes are not covered)

@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    from etils.epath import testing
    monkeypatch.chdir(tmp_path)
    with testing.mock_epath():
        yield tmp_path / "gs:" / "bkt"


def test_resolve_keeps_gs_urls_for_run_directories_only():
    assert run_dir.resolve("gs://bkt/runs/r1/", remote=True) == "gs://bkt/runs/r1"
    with pytest.raises(run_dir.WorkdirError, match="use a gs:// URL"):
        run_dir.resolve("s3://bkt/r1", remote=True)
    with pytest.raises(run_dir.WorkdirError, match="plain file I/O"):
        run_dir.resolve("gs://bkt/tokenizer.json")
    assert run_dir.default_data_dir("gs://bkt/r1").startswith(os.path.expanduser("~"))
    assert run_dir.default_data_dir("/runs/r1") == "/runs/r1/data"


def test_prepare_a_gs_workdir_writes_and_removes_a_probe_and_checks_the_model(fake_gcs):
    tiny = get_config("tiny")
    assert run_dir.prepare("gs://bkt/runs/r1", tiny) == "gs://bkt/runs/r1"
    assert os.listdir(fake_gcs / "runs" / "r1") == []
    ckpt.save_model_config("gs://bkt/runs/r1", tiny)
    assert ckpt.load_model_config("gs://bkt/runs/r1") == tiny
    other = get_config("small")
    with pytest.raises(run_dir.WorkdirError, match="another model"):
        run_dir.prepare("gs://bkt/runs/r1", other)


def test_prepare_a_gs_workdir_that_cannot_be_written(fake_gcs, monkeypatch):
    from etils import epath

    def refuse(self, *args, **kwargs):
        raise PermissionError(403, "Forbidden")
    monkeypatch.setattr(epath.gpath.PosixGPath, "write_text", refuse)
    with pytest.raises(run_dir.WorkdirError, match="credentials may write there"):
        run_dir.prepare("gs://bkt/runs/r2")


def test_metrics_on_gs_are_rewritten_whole_and_truncated_on_resume(fake_gcs):
    from deepseek_jax.train.metrics import MetricsWriter, truncate_after
    writer = MetricsWriter("gs://bkt/r", total_steps=3, console=open(os.devnull, "w"))
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    writer.close()
    path = fake_gcs / "r" / "metrics.jsonl"
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
    events = os.listdir(fake_gcs / "r" / "tensorboard")
    assert events and all(n.startswith("events") for n in events)
    truncate_after("gs://bkt/r/metrics.jsonl", 2)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
    again = MetricsWriter("gs://bkt/r", total_steps=3, console=open(os.devnull, "w"))
    again.write(3, {"loss": 3.5})                     # a resumed run keeps the earlier lines
    again.close()
    assert [json.loads(l)["loss"] for l in path.read_text().splitlines()] == [1.0, 2.0, 3.5]
