"""Writing sharded safetensors one tensor at a time, with every header known up front.

  writer = ShardedWriter(folder, specs, max_shard_bytes)   # specs: [(name, dtype, shape)]
  for name, array in ...:                                  # in the order of `specs`
      writer.write(name, array)
  writer.close()                                           # model.safetensors.index.json

The export knows every tensor's name, dtype and shape before it reads any value (the plan and
the config say them), so the split into files `model-0000i-of-0000N.safetensors` is decided
first: tensors go to the current file in order until the next one would take it past
`max_shard_bytes` (a larger tensor gets a file of its own), as `save_pretrained` splits. Each
file's header (names, dtypes, shapes, byte offsets) is then written when the file is opened,
and each tensor's bytes are appended as it arrives and dropped: the writer never holds more
than the tensor being written.

A tensor that arrives out of order, or with another dtype or shape than its spec, is an error
(before anything of it is written). The index's `total_size` is the tensor bytes, as
`save_pretrained` writes it.

Left out: big-endian hosts (`safetensors_io` refuses them for reading too).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Sequence

import numpy as np

from deepseek_jax.hf.safetensors_io import DTYPES, INDEX_FILE

_NAMES = {v: k for k, v in DTYPES.items()}


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def split(specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
          max_shard_bytes: int) -> list[list[int]]:
    """Indices of `specs` per file, in order, each file at most max_shard_bytes (or one tensor)."""
    files: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(specs):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += nbytes
    return files


def _header(specs) -> bytes:
    header, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)                 # keep the data 8-byte aligned


class ShardedWriter:
    """Writes `specs` [(name, dtype, shape)] in order into sharded safetensors under `folder`."""

    def __init__(self, folder: str, specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                 max_shard_bytes: int):
        for name, dtype, _ in specs:
            if np.dtype(dtype) not in _NAMES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors name")
        self.folder = folder
        self.specs = [(n, np.dtype(d), tuple(s)) for n, d, s in specs]
        self.files = split(self.specs, max_shard_bytes)
        self.file_of = {self.specs[i][0]: shard_name(f, len(self.files))
                        for f, idx in enumerate(self.files) for i in idx}
        self._next = 0
        self._handle = None

    def write(self, name: str, array: np.ndarray) -> None:
        """Appends the next tensor (it must be specs[k] for the k-th call)."""
        if self._next >= len(self.specs):
            raise ValueError(f"tensor {name!r}: every planned tensor is already written")
        want, dtype, shape = self.specs[self._next]
        array = np.asarray(array)
        if name != want or array.dtype != dtype or array.shape != shape:
            raise ValueError(f"expected tensor {want!r} {dtype} {list(shape)} next, got "
                             f"{name!r} {array.dtype} {list(array.shape)}")
        if self._handle is None:
            self._open()
        self._handle.write(np.ascontiguousarray(array).tobytes())
        self._next += 1
        if self._next == self._end:
            self._handle.close()
            self._handle = None

    def _open(self) -> None:
        idx = next(f for f in self.files if f[0] == self._next)
        self._end = idx[-1] + 1
        raw = _header([self.specs[i] for i in idx])
        path = os.path.join(self.folder, self.file_of[self.specs[self._next][0]])
        self._handle = open(path, "wb")
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)

    def close(self) -> list[str]:
        """Writes the index once every tensor is in; returns the file names."""
        if self._next != len(self.specs):
            raise ValueError(f"only {self._next} of {len(self.specs)} tensors were written; "
                             f"next: {self.specs[self._next][0]!r}")
        total = sum(math.prod(s) * d.itemsize for _, d, s in self.specs)
        with open(os.path.join(self.folder, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": self.file_of}, f,
                      indent=1)
        return [shard_name(i, len(self.files)) for i in range(len(self.files))]
