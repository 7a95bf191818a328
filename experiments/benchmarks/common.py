"""What the GPU benchmark scripts share: results written row by row, timing, import hygiene.

`Results` keeps one JSON file per script up to date after every row, so a script killed by its
time limit (h200.sh gives each part one) leaves every row it finished. `median_seconds` is the
timing rule of every table: warm-up calls, then the median of timed calls, host-timed around
`block_until_ready`. `check_imports` fails a run that pulled in a package the GPU host lacks.

No ml_collections / grain / tfds / tensorboardX imports here or in the scripts: the GPU host does
not have them.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time
import traceback

# Packages the benchmark host does not have (see BENCHMARKS.md, "GPU (H200)").
MISSING_ON_GPU_HOST = ("ml_collections", "grain", "tensorflow_datasets", "tensorboardX")


class Results:
    """One JSON object {"meta": {...}, SECTION: [row, ...], "errors": [...]} rewritten per row.

    With `merge=True` an existing file is read first and extended (several processes, one file).
    """

    def __init__(self, path: str | None, meta: dict | None = None, merge: bool = False):
        self.path = pathlib.Path(path) if path else None
        self.data: dict = {"meta": {}, "errors": []}
        if merge and self.path is not None and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError:
                pass                    # a file cut short by a kill: start over
        self.data.setdefault("errors", [])
        self.data.setdefault("meta", {}).update(meta or {})
        self.save()

    def add(self, section: str, row) -> None:
        self.data.setdefault(section, []).append(row)
        self.save()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def error(self, where: str, exc: BaseException) -> str:
        """Records an exception (first line and the tail of the traceback); returns a short text."""
        text = "".join(traceback.format_exception_only(exc)).strip()
        self.data["errors"].append({"where": where, "error": text[:2000],
                                    "traceback": traceback.format_exc()[-3000:]})
        self.save()
        short = text.splitlines()[0] if text else type(exc).__name__
        print(f"  ! {where}: {short[:300]}", flush=True)
        return short[:300]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)          # never a half-written file


def median_seconds(fn, *args, warmup: int = 3, iters: int = 10):
    """(median seconds per call, last output) of `fn(*args)`, after `warmup` calls."""
    import jax
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def device_meta() -> dict:
    import jax
    d = jax.devices()[0]
    meta = {"device": d.device_kind, "platform": d.platform, "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        stats = d.memory_stats() or {}
        if "bytes_limit" in stats:
            meta["memory_gb"] = stats["bytes_limit"] / 1e9
    except Exception:  # noqa: BLE001 - CPU devices may not report memory
        pass
    return meta


def device_memory_bytes() -> int | None:
    import jax
    try:
        return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001
        return None


def check_imports() -> None:
    """Raises if a package the GPU host lacks was imported (the smoke run catches it on CPU)."""
    banned = [m for m in MISSING_ON_GPU_HOST if m in sys.modules]
    if banned:
        raise SystemExit(f"imported {banned}: the GPU host does not have them")
