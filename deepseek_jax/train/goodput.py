"""Where a run's wall time goes, and its goodput: the fraction of it spent on training steps
whose progress was kept.

A `Ledger` lives as long as one process runs the trainer's loop (a *segment*: each start or
resume of the command adds one). It splits the segment's wall time into

  compile     tracing, lowering and XLA compiles (or loads from the persistent compilation
              cache), wherever they happen: JAX reports each as a time span
              (`jax.monitoring`), and nested or overlapping spans are counted once
  restore     reading the checkpoint resumed from, or initializing the state
  data        waiting for the next batch (the host pipeline and the copy to the devices)
  eval        held-out evaluations
  checkpoint  the loop's blocking part of checkpoint saves, and the wait for the last write
  steps       the rest: dispatching steps, waiting for their results, logging

with compile taken out of whichever other part it happened in, so the parts add up to the
wall time. A resumed run redoes the steps its previous segment ran past the checkpoint it
resumes from; those are *lost*, costed at that segment's mean step time (steps ÷ the steps it
ran). Goodput = (steps − lost) ÷ wall, over every segment.

WORKDIR/goodput.json holds one row per segment and the whole run's goodput. Process 0 rewrites
it after each checkpoint save, at most every `WRITE_EVERY_S` seconds at a step boundary, and when
the segment ends, where it also prints one line (`summary`).

Left out: time before the trainer's `Run` starts (interpreter start-up, imports,
`jax.distributed`, building the mesh and preparing the data) and, for a process killed without
warning, the time after its last write; what happens inside a step on the devices (a profile of
`train.profile_steps` shows that).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from contextlib import contextmanager

import jax
from etils import epath

from deepseek_jax.train.workdir import is_remote

PARTS = ("compile", "restore", "data", "eval", "checkpoint", "steps")
TIMED = ("restore", "data", "eval", "checkpoint")        # the parts a trainer brackets
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
WRITE_EVERY_S = 30.0


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of (start, end) spans, as sorted disjoint spans."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in merged(spans))


def uncovered(span: tuple[float, float], spans: list[tuple[float, float]]):
    """The pieces of `span` outside the sorted disjoint `spans`."""
    out, (a, b) = [], span
    for c, d in spans:
        if d <= a or c >= b:
            continue
        if c > a:
            out.append((a, c))
        a = max(a, d)
    return out + [(a, b)] if a < b else out


def overlap(spans: list[tuple[float, float]], others: list[tuple[float, float]]) -> float:
    """Seconds of `spans` that are also in `others`, each union counted once."""
    return sum(max(0.0, min(b, d) - max(a, c))
               for a, b in merged(spans) for c, d in merged(others))


class Ledger:
    """The parts of one segment's wall time (module docstring). `path` is WORKDIR/goodput.json;
    `write` is whether this process writes it (process 0).

    Its bookkeeping stays the same size however long the run: each part is a running total.
    A timed block adds its seconds less the compile inside it when it closes. A compile span
    that JAX reports after a block it overlaps has closed (a compile on another thread) is taken
    out of that block's part when it arrives; blocks and compile spans older than `KEEP_S` are
    folded into the totals and no longer matched against later spans. A lock orders a span's
    arrival and a block's close, which can happen on different threads."""

    KEEP_S = 3600.0

    def __init__(self, path, *, write: bool = True, clock=time.time):
        self.path = epath.Path(path)
        self.write_file = write
        self.clock = clock
        self.start = clock()
        self.compile = []                # recent compile spans, merged (sorted, disjoint)
        self.compile_s = 0.0             # seconds of compile spans folded out of `compile`
        self.timed_s = dict.fromkeys(TIMED, 0.0)   # closed blocks' seconds, less compile
        self.closed = deque()            # (part, start, end) of blocks closed within KEEP_S
        self._open = 0                   # blocks open now (an inner block counts as the outer)
        self._lock = threading.Lock()
        self.first_step = self.last_step = None     # steps this segment ran, counted from 1
        self.resumed_from = None
        self.lost_s = 0.0
        self.earlier = self._read()
        self._written = self.start
        jax.monitoring.register_event_time_span_listener(self._on_span)
        self._listening = True

    def _on_span(self, event: str, start: float, end: float, **_) -> None:
        if event not in COMPILE_EVENTS:
            return
        with self._lock:
            new = uncovered((start, end), self.compile)
            for part, a, b in reversed(self.closed):     # closed in time order: latest end first
                if b <= start:
                    break
                self.timed_s[part] -= overlap([(a, b)], new)
            self.compile = merged([*self.compile, (start, end)])

    def _fold(self, now: float) -> None:
        """Folds blocks and compile spans that ended more than KEEP_S before `now`."""
        while self.closed and self.closed[0][2] < now - self.KEEP_S:
            self.closed.popleft()
        while self.compile and self.compile[0][1] < now - self.KEEP_S:
            a, b = self.compile.pop(0)
            self.compile_s += b - a

    def _read(self) -> list[dict]:
        """The rows of earlier segments of this run (none for a new run)."""
        if not (self.write_file and self.path.exists()):
            return []
        try:
            return json.loads(self.path.read_text())["segments"]
        except (json.JSONDecodeError, KeyError):     # a file cut by a kill: start it over
            return []

    @contextmanager
    def timed(self, part: str):
        """Counts the time inside the block as `part` (one of TIMED), less the compile inside
        it. A block inside another counts as the outer block's part."""
        if self._open:
            yield
            return
        t0 = self.clock()
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1
            t1 = self.clock()
            with self._lock:
                self.timed_s[part] += (t1 - t0) - overlap([(t0, t1)], self.compile)
                self.closed.append((part, t0, t1))
                self._fold(t1)
        if part == "checkpoint":
            self.write()

    def resumed(self, step: int, logged_until: int = 0) -> None:
        """The segment resumes from the checkpoint at `step`. Its previous segment ran steps up
        to the larger of its own last row's and `logged_until` (the last step metrics.jsonl had
        logged); the steps past `step` are lost, at that segment's mean step time."""
        self.resumed_from = step
        if not self.earlier:
            return
        prev = self.earlier[-1]
        ran = (prev["last_step"] or 0) - (prev["first_step"] or 1) + 1
        redone = max(prev["last_step"] or 0, logged_until) - step
        if ran > 0 and redone > 0:
            prev["lost_s"] = prev.get("lost_s", 0.0) + prev["steps_s"] / ran * redone

    def step_done(self, step: int) -> None:
        """At the end of step `step` (counted from 1); writes the file every WRITE_EVERY_S."""
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step
        if self.clock() - self._written >= WRITE_EVERY_S:
            self.write()

    def parts(self, now: float | None = None) -> dict[str, float]:
        """Seconds of each part of PARTS since the segment started; they add up to the wall."""
        now = self.clock() if now is None else now
        with self._lock:
            out = {"compile": self.compile_s + length(self.compile), **self.timed_s}
        out["steps"] = max(0.0, (now - self.start) - sum(out.values()))
        return out

    def row(self, now: float | None = None) -> dict:
        now = self.clock() if now is None else now
        return {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.start)),
                "first_step": self.first_step, "last_step": self.last_step,
                "resumed_from": self.resumed_from, "wall_s": now - self.start,
                **{f"{k}_s": v for k, v in self.parts(now).items()}, "lost_s": 0.0}

    def run_totals(self, now: float | None = None) -> dict:
        """Every segment's parts summed, and the run's goodput."""
        rows = [*self.earlier, self.row(now)]
        total = {k: sum(r.get(k, 0.0) for r in rows)
                 for k in ("wall_s", "lost_s", *(f"{p}_s" for p in PARTS))}
        kept = total["steps_s"] - total["lost_s"]
        return {**total, "segments": len(rows),
                "goodput": kept / total["wall_s"] if total["wall_s"] > 0 else 0.0}

    def write(self, now: float | None = None) -> None:
        """Rewrites goodput.json: every segment's row and the run's totals (process 0 only)."""
        now = self.clock() if now is None else now
        self._written = now
        if not self.write_file:
            return
        text = json.dumps({"segments": [*self.earlier, self.row(now)],
                           "run": self.run_totals(now)}, indent=1)
        if is_remote(self.path):
            self.path.write_text(text)                   # one object write: atomic
        else:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)

    def close(self) -> str:
        """Stops listening, writes the file a last time, and returns the summary line."""
        if self._listening:
            jax.monitoring.unregister_event_time_span_listener(self._on_span)
            self._listening = False
        now = self.clock()
        self.write(now)
        return summary(self.row(now), self.run_totals(now))


def summary(row: dict, run: dict) -> str:
    """One line: this segment's wall time by part, then the run's goodput."""
    wall = max(row["wall_s"], 1e-9)
    parts = ", ".join(f"{p} {row[f'{p}_s'] / wall:.0%}" for p in PARTS if row[f"{p}_s"] > 0)
    line = f"time {row['wall_s']:.1f} s: {parts}"
    if run["segments"] > 1:
        line += (f"; over {run['segments']} segments {run['wall_s']:.1f} s, "
                 f"{run['lost_s']:.1f} s of steps redone after restarts")
    return f"{line}; goodput {run['goodput']:.0%}"
