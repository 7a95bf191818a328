"""A run's directory (WORKDIR): paths made absolute once, and checked before anything compiles.

Every entrypoint calls `resolve` on each path it is given, at start-up: Orbax refuses relative
checkpoint paths, and a path resolved once keeps meaning the same place if the working
directory changes later. `prepare(workdir, model_config)` then checks, in seconds, what would
otherwise fail at the first checkpoint (step 100 of the demo) or, worse, silently mix two runs:

  - the path is a directory this process can create and write into;
  - the filesystem supports what an Orbax save does: write files into a fresh temporary
    directory, then rename that directory into place (how a checkpoint is committed);
  - WORKDIR does not already hold a run of another model (its model_config.json differs).

Each failure is a `WorkdirError` whose message names the fix.

Remote run directories: a `gs://bucket/path` WORKDIR (and `init.pretrain_dir`) is kept as given
(`resolve(path, remote=True)`); the run reaches it through `etils.epath` (metrics.jsonl,
model_config.json, TensorBoard event files copied from a local staging folder) and Orbax (the
checkpoints, committed with a marker file rather than a rename on GCS). `prepare` then checks
that an object can be written, read back and deleted there; the rename check does not apply.
The dataset's array_record files are read with local file I/O, so with a remote WORKDIR the
default data_dir is a local folder (`default_data_dir`).

Left out: a free-space check (a checkpoint's size depends on the optimizer and sharding; a full
disk fails at the save, and the previous checkpoints stay intact); remote schemes other than
gs://.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

from etils import epath

from deepseek_jax.config import SCHEDULE_FIELDS, ModelConfig

MODEL_CONFIG = "model_config.json"


class WorkdirError(ValueError):
    """WORKDIR cannot hold this run; the message says what to change."""


def is_remote(path) -> bool:
    """Whether `path` is a URL (gs://...) rather than a filesystem path."""
    return "://" in os.fspath(path)


def resolve(path: str, *, remote: bool = False) -> str:
    """`path` as an absolute, normalized path ('~' expanded); '' stays ''.

    With `remote`, a gs:// URL is kept as given (without a trailing slash): run directories
    (module docstring). Otherwise URLs are refused: data files and tokenizers are read with
    plain file I/O, so copy them to local disk or mount the bucket (gcsfuse).
    """
    if not path:
        return path
    if is_remote(path):
        if remote and path.startswith("gs://"):
            return path.rstrip("/")
        kind = "use a gs:// URL or" if remote else "this file is read with plain file I/O:"
        raise WorkdirError(f"{path!r}: {kind} give a filesystem path (mount the bucket, e.g. "
                           "with gcsfuse, and pass the mounted path)")
    return os.path.abspath(os.path.expanduser(path))


def default_data_dir(workdir: str) -> str:
    """WORKDIR/data; for a remote WORKDIR a local folder instead (~/.cache/deepseek_jax/data),
    which every process of a host shares and builds once (`data.builders`)."""
    if is_remote(workdir):
        return os.path.join(os.path.expanduser("~"), ".cache", "deepseek_jax", "data")
    return os.path.join(workdir, "data")


def _check_remote(workdir: str, flag: str) -> None:
    """Writes, reads back and deletes a small object under a remote WORKDIR."""
    probe = epath.Path(workdir) / f".write-probe-{uuid.uuid4().hex}"
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        probe.write_text("probe")
        if probe.read_text() != "probe":
            raise OSError(0, "an object read back differs from what was written")
        probe.unlink()
    except Exception as e:          # noqa: BLE001 — backends raise their own error types
        raise WorkdirError(f"cannot write to {workdir} ({e}): check the bucket name and that "
                           f"this machine's credentials may write there, or pass a local "
                           f"{flag}") from e


def check_writable(workdir: str, flag: str = "--workdir") -> None:
    """Creates `workdir` if missing; raises unless it is a directory this user can write."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"{workdir} is a file, not a directory: pass a directory as {flag} "
                           "(it is created if missing)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create {workdir} ({e.strerror}): pass a {flag} under a "
                           "directory you can write to") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"{workdir} is not writable by this user: pass another {flag}, or "
                           "fix its permissions")


def _check_checkpoint_commit(workdir: str, flag: str) -> None:
    """Does in small what an Orbax save does: files into a temporary directory, then a rename."""
    probe = None
    try:
        probe = tempfile.mkdtemp(prefix=".write-probe-", dir=workdir)
        with open(os.path.join(probe, "item"), "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        committed = probe + "-committed"
        os.rename(probe, committed)
        probe = committed
        with open(os.path.join(probe, "item"), "rb") as f:
            if f.read() != b"probe":
                raise OSError(0, "a file read back differs from what was written")
    except OSError as e:
        raise WorkdirError(
            f"{workdir} cannot hold checkpoints: writing a file into a new directory and "
            f"renaming the directory (how Orbax commits a checkpoint) failed "
            f"({e.strerror or e}). Use a local disk or a shared POSIX filesystem (NFS, a "
            f"gcsfuse mount) for {flag}") from e
    finally:
        if probe is not None:
            shutil.rmtree(probe, ignore_errors=True)


def check_same_model(workdir: str, model_config: ModelConfig) -> None:
    """Raises unless WORKDIR holds no model_config.json or one equal to `model_config` (the
    `SCHEDULE_FIELDS` aside)."""
    path = epath.Path(workdir) / MODEL_CONFIG
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} is unreadable ({e}): remove it if the run in {workdir} is "
                           "not wanted, or pass a fresh --workdir") from e
    wanted = json.loads(json.dumps(model_config.to_dict()))     # tuples as JSON lists
    # A field the saved file predates has its default there.
    default = json.loads(json.dumps(ModelConfig().to_dict()))
    differ = sorted(k for k in set(saved) | set(wanted)
                    if k not in SCHEDULE_FIELDS and saved.get(k, default.get(k)) != wanted.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now"
                          for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise WorkdirError(
            f"workdir {workdir} already holds a run of another model ({shown}{more}). "
            "Pass a fresh --workdir, or the config that run was started with to resume it")


def prepare(workdir: str, model_config: ModelConfig | None = None,
            flag: str = "--workdir") -> str:
    """Resolves WORKDIR, creates it and runs the checks above; returns the absolute path.

    `flag` is how the user gave the path (named in the messages); `model_config` None skips the
    same-model check (a caller that knows the model later runs `check_same_model`).
    """
    workdir = resolve(workdir, remote=True)
    if not workdir:
        raise WorkdirError(f"the directory is empty: pass {flag}=DIR")
    if is_remote(workdir):
        _check_remote(workdir, flag)
    else:
        check_writable(workdir, flag)
        _check_checkpoint_commit(workdir, flag)
    if model_config is not None:
        check_same_model(workdir, model_config)
    return workdir


def prepare_with_start(workdir: str, start_dir: str, stage: str) -> tuple[str, str]:
    """(the workdir, absolute, created and checked as `prepare` does; the run to start from,
    absolute, or "") of a stage that starts from another run's weights (`init.pretrain_dir`):
    the two must differ, since the stage writes checkpoints of its own."""
    workdir = prepare(workdir)
    start = resolve(start_dir, remote=True)
    if start == workdir:
        raise ValueError(f"init.pretrain_dir and the workdir are both {workdir}: {stage} writes "
                         "its own checkpoints, so give it another --workdir")
    return workdir, start
