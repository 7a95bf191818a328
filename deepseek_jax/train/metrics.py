"""Where metrics go: the console (with a progress bar), DIR/metrics.jsonl, TensorBoard, and
Weights & Biases when asked for.

`MetricsWriter.write(step, metrics)` appends one JSON object per logged step to metrics.jsonl
(flushed at once, so a killed run keeps every line it printed), adds TensorBoard scalars through
tensorboardX (no TensorFlow needed), logs the numbers to W&B when the run has a
`wandb_project`, and prints one progress line (`progress_line`: the bar, the time since this
process started the run, and an ETA at the pace of the steps logged since its first logged
step, so that the first step's compile does not count: `Clock`). Only process 0 writes.

W&B is optional and never a dependency: with `wandb_project` empty nothing imports it; with it
set, a missing `wandb` package is an error saying how to install it or turn it off. The W&B run
id is kept in DIR/wandb_run_id, so a resumed run continues the same W&B run (W&B ignores steps it
has already seen, so the steps redone after a resume appear once, with their first values).

On resume, `truncate_after(step)` drops the lines of steps after the restored checkpoint, so the
file reads as one run whose steps each appear once.

A remote DIR (gs://) is written through `etils.epath`: objects cannot be appended to, so the
writer keeps metrics.jsonl's lines and rewrites the object at each logged step, and TensorBoard
events go to a local staging folder whose files are copied to DIR/tensorboard after each write.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import uuid

import jax
import numpy as np
from etils import epath

from deepseek_jax.train.workdir import is_remote


def _to_python(x):
    x = np.asarray(x)
    return x.item() if x.size == 1 else x.tolist()


def _rows(path) -> list[dict]:
    """metrics.jsonl's rows; a line cut by a kill is left out."""
    rows = []
    for line in epath.Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def last_logged_step(path) -> int:
    """The largest step metrics.jsonl (a local path or a gs:// URL) has a row for; 0 if none."""
    if not epath.Path(path).exists():
        return 0
    return max((r.get("step", 0) for r in _rows(path)), default=0)


def truncate_after(path, step: int) -> None:
    """Keeps the lines of metrics.jsonl whose step is ≤ `step` (a local path or a gs:// URL)."""
    path = epath.Path(path)
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines(keepends=True) if l.strip()]
    keep = []
    for l in lines:
        try:
            if json.loads(l).get("step", 0) <= step:
                keep.append(l)
        except json.JSONDecodeError:      # a line cut by a kill: drop it
            pass
    if is_remote(path):
        path.write_text("".join(keep))           # one object write: atomic
        return
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def progress_bar(step: int, total: int, width: int = 20) -> str:
    done = int(width * min(step, total) / max(total, 1))
    return "[" + "#" * done + "." * (width - done) + f"] {step}/{total}"


def duration(seconds: float) -> str:
    """Seconds as H:MM:SS (hours past 24 keep counting: "31:00:00")."""
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int, elapsed: float,
                  seconds_per_step: float | None = None) -> str:
    """The bar, `elapsed` seconds, and the ETA of the steps left at `seconds_per_step` ("ETA ?"
    without a pace yet)."""
    left = max(total - step, 0)
    eta = "?" if seconds_per_step is None else duration(seconds_per_step * left)
    return f"{progress_bar(step, total)} {duration(elapsed)} elapsed, ETA {eta}"


class Clock:
    """Elapsed time since it was made, and the pace of the steps since the first one it was
    shown: the time before that (start-up, the first step's compile) does not count toward the
    ETA, so the first line's ETA is "?"."""

    def __init__(self):
        self.start = time.perf_counter()
        self._first = None                 # (time, step) of the first line

    def line(self, step: int, total: int, now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        if self._first is None:
            self._first = (now, step)
        t1, s1 = self._first
        pace = (now - t1) / (step - s1) if step > s1 else None
        return progress_line(step, total, now - self.start, pace)


def open_wandb(project: str, workdir: str):
    """A W&B run logging to `project` under the name of WORKDIR, resumed from the id in
    WORKDIR/wandb_run_id when there is one; None when `project` is empty."""
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        raise ImportError(f"train.wandb_project={project!r} needs the `wandb` package: pip "
                          "install wandb, or leave train.wandb_project empty") from None
    id_file = epath.Path(workdir) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, resume="allow",
                      name=os.path.basename(os.fspath(workdir).rstrip("/")),
                      dir=None if is_remote(workdir) else os.fspath(workdir))


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, *, console=sys.stdout,
                 wandb_project: str = ""):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.console = console
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.remote = is_remote(workdir)
        self._tb = self._lines = self._wandb = None
        self.restart_clock()
        if self.enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            self._wandb = open_wandb(wandb_project, workdir)
            from tensorboardX import SummaryWriter
            if self.remote:
                self._lines = (self.path.read_text().splitlines(keepends=True)
                               if self.path.exists() else [])
                self._tb_local = tempfile.mkdtemp(prefix="tensorboard-")
                self._tb_remote = epath.Path(workdir) / "tensorboard"
                self._tb = SummaryWriter(self._tb_local)
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def restart_clock(self) -> None:
        """Times the progress line from now (a resumed run restarts it)."""
        self.clock = Clock()

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{prefix + k: _to_python(v) for k, v in metrics.items()}}
        if self.remote:
            self._lines.append(json.dumps(row) + "\n")
            self.path.write_text("".join(self._lines))
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self.remote:
            self._copy_events()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items() if k != "step" and not isinstance(v, list))
        line = self.clock.line(step, self.total_steps)
        print(f"{line} {shown}", file=self.console, flush=True)

    def _copy_events(self) -> None:
        """The local TensorBoard event files, copied whole to DIR/tensorboard."""
        self._tb_remote.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self._tb_local):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                (self._tb_remote / name).write_bytes(f.read())

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            if self.remote:
                self._copy_events()


class Throughput:
    """Tokens/s and MFU between two logged steps (wall time, so it includes host overhead)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float,
                 peak_flops_total: float | None, start_step: int = 0):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self._t, self._step = time.perf_counter(), start_step

    def read(self, step: int) -> dict:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        tokens = (step - self._step) * self.tokens_per_step
        self._t, self._step = now, step
        out = {"tokens_per_s": tokens / dt}
        if self.peak:
            out["mfu"] = tokens * self.flops_per_token / dt / self.peak
        return out
