"""Where metrics go: the console (with a progress bar), DIR/metrics.jsonl, and TensorBoard.

`MetricsWriter.write(step, metrics)` appends one JSON object per logged step to metrics.jsonl
(flushed at once, so a killed run keeps every line it printed), adds TensorBoard scalars through
tensorboardX (no TensorFlow needed), and prints one progress line. Only process 0 writes.

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

import jax
import numpy as np
from etils import epath

from deepseek_jax.train.workdir import is_remote


def _to_python(x):
    x = np.asarray(x)
    return x.item() if x.size == 1 else x.tolist()


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


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, *, console=sys.stdout):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.console = console
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.remote = is_remote(workdir)
        self._tb = self._lines = None
        if self.enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter
            if self.remote:
                self._lines = (self.path.read_text().splitlines(keepends=True)
                               if self.path.exists() else [])
                self._tb_local = tempfile.mkdtemp(prefix="tensorboard-")
                self._tb_remote = epath.Path(workdir) / "tensorboard"
                self._tb = SummaryWriter(self._tb_local)
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self.remote:
            self._copy_events()
        shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items() if k != "step" and not isinstance(v, list))
        print(f"{progress_bar(step, self.total_steps)} {shown}", file=self.console, flush=True)

    def _copy_events(self) -> None:
        """The local TensorBoard event files, copied whole to DIR/tensorboard."""
        self._tb_remote.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(self._tb_local):
            with open(os.path.join(self._tb_local, name), "rb") as f:
                (self._tb_remote / name).write_bytes(f.read())

    def close(self) -> None:
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
