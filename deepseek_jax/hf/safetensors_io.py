"""Lazy reading (and small-scale writing) of safetensors files, fp8 included, without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the raw
C-order little-endian bytes. `SafetensorsFolder` parses the headers of every file of a Hugging
Face checkpoint folder (one `*.safetensors` file, or shards listed by
`model.safetensors.index.json`) and maps each file with `np.memmap`, so `tensor(name)` returns a
NumPy view that costs nothing until it is sliced: `folder.tensor(name)[rows, cols]` reads only
the pages holding those elements (page-cache memory the OS can reclaim, not process memory).

Why not the `safetensors` package: its NumPy and Flax back ends (0.8.0) cannot read the F8_E4M3
tensors that DeepSeek-V3's weights are stored in ("module 'numpy' has no attribute
'float8_e4m3fn'"); `ml_dtypes` (a JAX dependency) has the dtype, and the format is simple
enough to read directly. The tests cross-check this reader against `safetensors` when it is
installed.

`save_file` writes a file (tests and fixtures); `write_sharded` splits tensors over several
files plus an index, as `save_pretrained` does for large models.

Left out: big-endian hosts (every safetensors file is little-endian; we refuse rather than
byte-swap), and the unsigned 16/32/64-bit and complex dtypes (no DeepSeek checkpoint uses them).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
FP8_NAMES = ("F8_E4M3", "F8_E5M2")


class SafetensorsError(ValueError):
    """A file or folder that cannot be read as a safetensors checkpoint; the message says why."""


def _read_header(path: str) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset where tensor data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype "
                                   f"{info['dtype']}; supported: {', '.join(DTYPES)}")
        begin, end = info["data_offsets"]
        want = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
        if end - begin != want or start + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} has data_offsets {begin}..{end}, "
                                   f"which do not hold shape {info['shape']} {info['dtype']} "
                                   f"inside the file")
    return header, start


class SafetensorsFolder:
    """Every tensor of a checkpoint folder, by name, as lazy NumPy views.

    Args:
      path: a folder with `model.safetensors.index.json` (its weight_map names the shard of each
        tensor) or with one or more `*.safetensors` files (all read), or one `.safetensors` file.
    """

    def __init__(self, path: str):
        if sys.byteorder != "little":
            raise SafetensorsError("safetensors files are little-endian; this host is not")
        self.path = path
        if os.path.isfile(path):
            files = [path]
        elif os.path.exists(os.path.join(path, INDEX_FILE)):
            with open(os.path.join(path, INDEX_FILE)) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = [os.path.join(path, fn) for fn in sorted(set(weight_map.values()))]
            for fn in files:
                if not os.path.exists(fn):
                    raise SafetensorsError(f"{INDEX_FILE} in {path} lists {os.path.basename(fn)},"
                                           " which is not in the folder")
        else:
            files = sorted(os.path.join(path, fn) for fn in os.listdir(path)
                           if fn.endswith(".safetensors"))
        if not files:
            raise SafetensorsError(f"no .safetensors files in {path}")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for fn in files:
            header, start = _read_header(fn)
            for name, info in header.items():
                if name in self._where:
                    raise SafetensorsError(f"tensor {name!r} is in both "
                                           f"{os.path.basename(self._where[name][0])} and "
                                           f"{os.path.basename(fn)}")
                self._where[name] = (fn, info, start)
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype string ("BF16", "F8_E4M3", ...)."""
        return self._info(name)[1]["dtype"]

    def file_of(self, name: str) -> str:
        return self._info(name)[0]

    def _info(self, name: str):
        if name not in self._where:
            raise KeyError(name)
        return self._where[name]

    def tensor(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (nothing is read until it is indexed)."""
        fn, info, start = self._info(name)
        if fn not in self._maps:
            self._maps[fn] = np.memmap(fn, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        raw = self._maps[fn][start + begin:start + end]
        return raw.view(dtype).reshape(info["shape"])


# --- writing (tests, fixtures) ----------------------------------------------------------------

def _header_for(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None):
    header, offset = {}, 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if np.dtype(dt) not in _NAMES:
            raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": _NAMES[np.dtype(dt)], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                      # keep the data 8-byte aligned
    return raw


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (NumPy arrays, ml_dtypes bf16/fp8 included) as one safetensors file."""
    raw = _header_for(tensors, metadata or {"format": "pt"})
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).tobytes())


def write_sharded(tensors: Mapping[str, np.ndarray], folder: str, n_shards: int,
                  order: Iterable[str] | None = None) -> list[str]:
    """Splits `tensors` over `n_shards` files `model-0000i-of-0000n.safetensors` with an index.

    Tensors go to shards in `order` (default: sorted names), in contiguous runs of roughly equal
    counts, as `save_pretrained` does by size. Returns the file names.
    """
    names = list(order) if order is not None else sorted(tensors)
    runs = np.array_split(np.arange(len(names)), n_shards)
    files, weight_map = [], {}
    for i, run in enumerate(runs):
        fn = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {names[j]: tensors[names[j]] for j in run}
        save_file(part, os.path.join(folder, fn))
        files.append(fn)
        weight_map.update({name: fn for name in part})
    total = int(sum(np.asarray(t).nbytes for t in tensors.values()))
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return files
