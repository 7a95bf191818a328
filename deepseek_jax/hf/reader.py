"""Reading planned leaves out of a checkpoint folder: whole, as any shard, or straight onto devices.

  read_leaf(folder, leaf, index, dtype, block)    NumPy array of leaf[index] (index: tuple of
                                                  slices over the leaf's shape; None = all)
  device_leaf(folder, leaf, dtype, block, sharding, chunk_bytes)
                                                  a sharded jax.Array built shard by shard

`read_leaf` reads, for each tensor the slice touches (one per stacked layer/expert), only the
rectangle of rows and columns the slice needs (its bounding box in the HF matrix), dequantizes
it if it is fp8, and gathers our layout out of it with one NumPy fancy index.

`device_leaf` is `jax.make_array_from_callback` done in a way that bounds host memory:
`make_array_from_callback` keeps every addressable shard on the host until all are read; here
each distinct shard is read, put on its device(s) and dropped before the next one, and a shard
larger than `chunk_bytes` is read in pieces along its leading axes and written into a device
buffer in place (`dynamic_update_slice` with the buffer donated), each transfer finished before
the next piece is read. Host memory is then about 6 × `chunk_bytes` at most (the box, its fp32
dequantization when fp8, the gathered piece, the cast), whatever the leaf's size. Devices
holding the same index (replicated axes) share one read.

`check_folder` verifies, before anything is read, that every tensor the plan needs exists with
the expected shape (and its fp8 scale with the expected block grid), and names what is wrong.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from deepseek_jax.hf.fp8_blocks import (expected_scale_shape, is_fp8, read_box,
                                                scale_name)
from deepseek_jax.hf.hf_config import HFCheckpointError
from deepseek_jax.hf.mapping import Layout, Leaf
from deepseek_jax.hf.safetensors_io import SafetensorsFolder

DEFAULT_CHUNK_BYTES = 512 * 2**20


def _normalize(index, shape) -> tuple[slice, ...]:
    """Concrete step-1 slices for every axis."""
    index = tuple(index) if index is not None else ()
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"only step-1 slices are supported, got {s}")
        out.append(slice(start, stop))
    return tuple(out)


def _read_piece(folder: SafetensorsFolder, name: str, layout: Layout, index: tuple[slice, ...],
                block: int) -> np.ndarray:
    """layout-shaped `index` of our array that lives in HF tensor `name`."""
    if any(s.stop <= s.start for s in index):
        return np.zeros([max(s.stop - s.start, 0) for s in index], np.float32)
    bounds = {"row": [layout.row0, layout.row0], "col": [layout.col0, layout.col0]}
    for (side, stride), s in zip(layout.axes, index):
        bounds[side][0] += s.start * stride
        bounds[side][1] += (s.stop - 1) * stride
    (r_lo, r_hi), (c_lo, c_hi) = bounds["row"], bounds["col"]
    two_d = len(layout.hf_shape) == 2
    box = read_box(folder, name, slice(r_lo, r_hi + 1), slice(c_lo, c_hi + 1) if two_d else None,
                   block)
    nd = len(index)
    rows = np.zeros([1] * nd, np.int64)
    cols = np.zeros([1] * nd, np.int64)
    for axis, ((side, stride), s) in enumerate(zip(layout.axes, index)):
        shape = [1] * nd
        shape[axis] = -1
        offsets = (np.arange(s.start, s.stop) * stride).reshape(shape)
        if side == "row":
            rows = rows + offsets
        else:
            cols = cols + offsets
    rows -= r_lo - layout.row0
    cols -= c_lo - layout.col0
    return box[rows, cols] if two_d else box[rows]


def read_leaf(folder: SafetensorsFolder, leaf: Leaf, index=None, *, dtype,
              block: int = 128) -> np.ndarray:
    """leaf[index] as a NumPy array of `dtype` (index: slices over leaf.shape; None = whole)."""
    index = _normalize(index, leaf.shape)
    n_stack = leaf.names.ndim
    names = np.asarray(leaf.names[index[:n_stack]], dtype=object)
    out = np.empty([s.stop - s.start for s in index], np.dtype(dtype))
    for pos in np.ndindex(names.shape):
        out[pos] = _read_piece(folder, names[pos], leaf.layout, index[n_stack:], block)
    return out


# --- onto devices -------------------------------------------------------------------------------

def _chunks(index: tuple[slice, ...], itemsize: int, budget: int):
    """Sub-slices of `index` of at most ~budget bytes, with their offsets inside it."""
    sizes = [s.stop - s.start for s in index]
    n = len(sizes)
    if n == 0 or math.prod(sizes) * itemsize <= budget:
        return [(index, (0,) * n)]
    k = next((a for a in range(n) if math.prod(sizes[a + 1:]) * itemsize <= budget), n - 1)
    per = max(1, budget // max(math.prod(sizes[k + 1:]) * itemsize, 1))
    out = []
    for outer in itertools.product(*[range(sizes[a]) for a in range(k)]):
        for start in range(0, sizes[k], per):
            stop = min(start + per, sizes[k])
            sub = [slice(index[a].start + o, index[a].start + o + 1) for a, o in enumerate(outer)]
            sub += [slice(index[k].start + start, index[k].start + stop), *index[k + 1:]]
            out.append((tuple(sub), (*outer, start) + (0,) * (n - k - 1)))
    return out


@functools.lru_cache(maxsize=64)
def _zeros_fn(shape, dtype, device):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=SingleDeviceSharding(device))


@functools.partial(jax.jit, donate_argnums=0)
def _update(buf, piece, starts):
    return jax.lax.dynamic_update_slice(buf, piece, starts)


def _put_shard(folder, leaf, index, devices, dtype, block, chunk_bytes) -> list[jax.Array]:
    chunks = _chunks(index, np.dtype(dtype).itemsize, chunk_bytes)
    if len(chunks) == 1:
        host = read_leaf(folder, leaf, index, dtype=dtype, block=block)
        return jax.block_until_ready([jax.device_put(host, d) for d in devices])
    shape = tuple(s.stop - s.start for s in index)
    bufs = [_zeros_fn(shape, np.dtype(dtype), d)() for d in devices]
    for sub, offset in chunks:
        host = read_leaf(folder, leaf, sub, dtype=dtype, block=block)
        starts = tuple(np.int32(o) for o in offset)
        bufs = [_update(b, jax.device_put(host, d), starts) for b, d in zip(bufs, devices)]
        jax.block_until_ready(bufs)                    # the host piece can go now
        del host
    return bufs


def device_leaf(folder: SafetensorsFolder, leaf: Leaf, *, dtype, block: int,
                sharding: jax.sharding.Sharding,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> jax.Array:
    """The leaf as a jax.Array with `sharding`, read one addressable shard (or chunk) at a time."""
    shape = leaf.shape
    index_map = sharding.addressable_devices_indices_map(shape)
    groups: dict[tuple, tuple[tuple[slice, ...], list]] = {}
    for device, index in index_map.items():
        index = _normalize(index, shape)
        key = tuple((s.start, s.stop) for s in index)
        groups.setdefault(key, (index, []))[1].append(device)
    placed = {}
    for index, devices in groups.values():
        placed.update(zip(devices, _put_shard(folder, leaf, index, devices, dtype, block,
                                              chunk_bytes)))
    return jax.make_array_from_single_device_arrays(shape, sharding,
                                                    [placed[d] for d in index_map])


# --- checks before reading ----------------------------------------------------------------------

def check_folder(folder: SafetensorsFolder, leaves: list[Leaf], path: str, block: int) -> None:
    """Raises HFCheckpointError naming missing tensors, wrong shapes or missing fp8 scales."""
    missing, problems = {}, []
    for leaf in leaves:
        for name in leaf.names.flat:
            if name not in folder:
                missing.setdefault(name, leaf.key)
                continue
            shape = folder.shape(name)
            if shape != tuple(leaf.layout.hf_shape):
                problems.append(f"tensor {name!r} has shape {list(shape)}, expected "
                                f"{list(leaf.layout.hf_shape)} from config.json (for {leaf.key})")
            elif is_fp8(folder, name):
                s = scale_name(name)
                want = expected_scale_shape(shape, block)
                if s not in folder:
                    missing.setdefault(s, f"fp8 tensor {name}")
                elif folder.shape(s) != want:
                    problems.append(f"tensor {s!r} has shape {list(folder.shape(s))}, expected "
                                    f"{list(want)} ({block}×{block} blocks of {list(shape)})")
    if missing:
        (name, what), *rest = missing.items()
        more = f"; {len(rest)} more missing, e.g. {rest[0][0]!r}" if rest else ""
        raise HFCheckpointError(f"checkpoint {path} has no tensor {name!r} (needed for {what})"
                                f"{more}")
    if problems:
        raise HFCheckpointError(f"checkpoint {path} does not match its config.json:\n  - "
                                + "\n  - ".join(dict.fromkeys(problems)))
