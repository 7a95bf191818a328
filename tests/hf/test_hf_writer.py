"""The streaming safetensors writer: files split by size, read back by the reference package."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from deepseek_jax.hf.safetensors_io import INDEX_FILE, SafetensorsFolder
from deepseek_jax.hf.writer import ShardedWriter, split


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a": rng.standard_normal((3, 5)).astype(np.float32),                  # 60 B
        "b": rng.standard_normal((7,)).astype(ml_dtypes.bfloat16),            # 14 B
        "c": rng.standard_normal((4, 4)).astype(ml_dtypes.float8_e4m3fn),     # 16 B
        "d": rng.standard_normal((10, 10)).astype(np.float32),                # 400 B
        "e": np.arange(6, dtype=np.int64),                                    # 48 B
    }


def test_files_fill_in_order_and_read_back(tmp_path):
    tensors = _tensors()
    specs = [(n, t.dtype, t.shape) for n, t in tensors.items()]
    assert split(specs, 100) == [[0, 1, 2], [3], [4]]       # d is larger than a file: alone
    writer = ShardedWriter(str(tmp_path), specs, 100)
    for name, t in tensors.items():
        writer.write(name, t)
    files = writer.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with open(tmp_path / INDEX_FILE) as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert index["weight_map"]["d"] == files[1]
    folder = SafetensorsFolder(str(tmp_path))
    for name, t in tensors.items():
        assert folder.tensor(name).dtype == t.dtype
        np.testing.assert_array_equal(folder.tensor(name), t)
    st = pytest.importorskip("safetensors.numpy")         # the reference reader (no fp8)
    np.testing.assert_array_equal(st.load_file(str(tmp_path / files[1]))["d"], tensors["d"])
    np.testing.assert_array_equal(st.load_file(str(tmp_path / files[2]))["e"], tensors["e"])


def test_out_of_order_or_misshapen_tensors_are_refused(tmp_path):
    tensors = _tensors()
    specs = [(n, t.dtype, t.shape) for n, t in tensors.items()]
    writer = ShardedWriter(str(tmp_path), specs, 1 << 20)
    with pytest.raises(ValueError, match="expected tensor 'a' float32 \\[3, 5\\] next, got 'b'"):
        writer.write("b", tensors["b"])
    with pytest.raises(ValueError, match="got 'a' float64"):
        writer.write("a", tensors["a"].astype(np.float64))
    assert not os.listdir(tmp_path)                       # nothing written yet
    writer.write("a", tensors["a"])
    with pytest.raises(ValueError, match="only 1 of 5 tensors were written; next: 'b'"):
        writer.close()
    with pytest.raises(ValueError, match="no safetensors name"):
        ShardedWriter(str(tmp_path), [("x", np.dtype(np.uint32), (2,))], 10)
