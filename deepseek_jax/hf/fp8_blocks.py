"""DeepSeek-V3's fp8 checkpoint format: e4m3 weights with one fp32 multiplier per 128×128 block.

Each quantized linear weight `W` [out, in] (HF layout: rows = outputs) is stored as
`<name>` in F8_E4M3 plus `<name>_scale_inv` in fp32 of shape [ceil(out/b), ceil(in/b)], b = 128
(`quantization_config.weight_block_size` in config.json). Despite its name the scale is a
*multiplier*:  W[i, j] = q[i, j] · scale_inv[i // b, j // b]. Edge blocks of a dimension that
is not a multiple of b are partial (DeepSeek zero-pads them when computing the scale); their
scale simply covers the rows/columns that exist.

This is the layout `deepseek_jax.kernels.fp8.quantize_weight` produces for a K-major weight
[N, K]: (q [N, K], scale [ceil(N/128), ceil(K/128)]), so a kept fp8 tensor can go straight to
the fp8 GEMMs.

`read_box` reads any rectangle of a stored tensor, dequantizing it when it is fp8; only the
rectangle and its scale blocks are read.
"""

from __future__ import annotations

import numpy as np

from deepseek_jax.hf.safetensors_io import FP8_NAMES, SafetensorsFolder

SCALE_SUFFIX = "_scale_inv"


def scale_name(name: str) -> str:
    """`model.layers.0.self_attn.q_a_proj.weight` → `...q_a_proj.weight_scale_inv`."""
    return name + SCALE_SUFFIX


def expected_scale_shape(shape: tuple[int, ...], block: int) -> tuple[int, int]:
    rows, cols = shape
    return -(-rows // block), -(-cols // block)


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block: int = 128,
                      row0: int = 0, col0: int = 0) -> np.ndarray:
    """fp32 q · scale_inv[block] for a rectangle q that starts at (row0, col0) of the full weight.

    Args:
      q: fp8 (or any float) values [r, c] of rows row0 … row0+r−1, columns col0 … col0+c−1.
      scale_inv: the scale blocks that cover them: rows row0//b … (row0+r−1)//b, same for
        columns (for a whole weight: the whole scale tensor with row0 = col0 = 0).
      block: b.
    """
    r, c = q.shape
    s = np.asarray(scale_inv, np.float32)
    dr = row0 % block
    col_block = (np.arange(c) + col0 % block) // block                   # [c] column of s
    out = np.empty((r, c), np.float32)
    for bi in range(s.shape[0]):                 # one band of rows per block row: no full-size
        lo, hi = max(bi * block - dr, 0), min((bi + 1) * block - dr, r)   # scale copy
        if lo < hi:
            out[lo:hi] = q[lo:hi].astype(np.float32) * s[bi, col_block]
    return out


def is_fp8(folder: SafetensorsFolder, name: str) -> bool:
    return folder.dtype_name(name) in FP8_NAMES


def read_box(folder: SafetensorsFolder, name: str, rows: slice, cols: slice | None,
             block: int) -> np.ndarray:
    """tensor[rows, cols] (or tensor[rows] for 1-D), dequantized to fp32 when stored as fp8.

    Non-fp8 tensors come back in their stored dtype (bf16 stays bf16: no fp32 copy of a whole
    shard is made just to be cast down again).
    """
    t = folder.tensor(name)
    if t.ndim == 1:
        return np.asarray(t[rows])
    box = t[rows, cols]
    if not is_fp8(folder, name):
        return np.asarray(box)
    s = folder.tensor(scale_name(name))
    r0, c0 = rows.start or 0, cols.start or 0
    r1, c1 = r0 + box.shape[0], c0 + box.shape[1]
    if box.size == 0:
        return np.zeros(box.shape, np.float32)
    blocks = s[r0 // block:(r1 - 1) // block + 1, c0 // block:(c1 - 1) // block + 1]
    return dequantize_blocks(np.asarray(box), np.asarray(blocks), block, r0, c0)
