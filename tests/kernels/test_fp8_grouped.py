"""The Hopper fp8 grouped GEMM (`gmm(..., fp8=True)` on the mosaic_gpu backends).

References: the aligned layout by hand; the kernel against the portable fp8 emulation
(`fp8_linear.fp8_ragged_dot`, itself tested against float64 in test_fp8_linear.py), which
quantizes the same operands into the same tiles and blocks; and float64 products of the
unquantized inputs.

Tolerances, from the numerics:
  * forward and dgrad: both sides sum the same e4m3 products × the same fp32 scales, one 128-K
    block at a time; only fp32 summation order differs (~1e-7 relative), so DeepGEMM's
    `calc_diff` must be below 1e-9 — a wrong group or scale block gives O(1).
  * wgrad: the kernel multiplies the fp8 values after rounding them to bf16 (2⁻⁹ relative,
    ≈ 0.11 % rms per operand, ≈ 0.16 % per product); the output's rms error relative to its size
    is then ≈ 0.16 %, calc_diff ≈ 0.0016² / 2 ≈ 1.3e-6: we allow 1e-5.
  * against float64 of the unquantized inputs: e4m3 rounding, ≈ 3.7 % rms per product, gives
    calc_diff ≈ 7e-4 (test_fp8_linear.py); we allow 2e-3.
On hardware (the `hardware` test) Hopper's fp8 wgmma keeps ~14 bits inside a 128-K block (V3
§3.3.2), ~1e-4 relative per block: calc_diff against the emulation is then ~1e-8; we allow 1e-6.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.kernels import grouped_gemm as gg
from deepseek_jax.kernels.fp8_linear import fp8_ragged_dot

SIZES = np.array([50, 0, 30, 6], np.int32)      # an empty group; 10 trailing rows in no group
M, K, N = 96, 200, 136                          # K, N not multiples of 128: padded blocks


def calc_diff(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return 1.0 - 2.0 * (x * y).sum() / (x * x + y * y).sum()


def test_aligned_layout_by_hand():
    pos, tile_group, ma = gg.aligned_layout(jnp.asarray(SIZES), M)
    assert ma == 128 + 4 * 128
    expected = np.concatenate([np.arange(50), 128 + np.arange(30), 256 + np.arange(6),
                               np.full(10, ma)])
    np.testing.assert_array_equal(np.asarray(pos), expected)
    # Tiles start at rows 0, 128, 256, 384, …: groups 0, 2 (group 1 is empty), 3, then padding.
    np.testing.assert_array_equal(np.asarray(tile_group), [0, 2, 3, 3, 3])


def _data(m=M, k=K, n=N, sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((len(sizes), k, n)) / np.sqrt(k), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    return x, w, dy, jnp.asarray(sizes)


def _value_and_grads(fn, x, w, dy, sizes):
    def loss(x, w):
        y = fn(x, w, sizes)
        return jnp.sum(y * dy), y
    (dx, dw), y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return np.asarray(y), np.asarray(dx), np.asarray(dw)


def _exact(x, w, dy, sizes):
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for g, s in enumerate(np.asarray(sizes)):
        r = slice(start, start + s)
        y[r], dx[r], dw[g] = x[r] @ w[g], dy[r] @ w[g].T, x[r].T @ dy[r]
        start += s
    return y, dx, dw


def _check(backend, bound_fwd, bound_wgrad, data):
    x, w, dy, sizes = data
    ours = _value_and_grads(
        lambda x, w, s: gg.gmm(x, w, s, backend=backend, fp8=True, out_dtype=jnp.float32),
        x, w, dy, sizes)
    emul = _value_and_grads(
        lambda x, w, s: fp8_ragged_dot(x, w, s, out_dtype=jnp.float32), x, w, dy, sizes)
    exact = _exact(x, w, dy, sizes)
    used = int(np.asarray(sizes).sum())
    for name, got, ref, ex, bound in zip(("y", "dx", "dw"), ours, emul, exact,
                                         (bound_fwd, bound_fwd, bound_wgrad)):
        assert got.shape == ex.shape, name
        assert calc_diff(got, ref) < bound, (name, calc_diff(got, ref))
        assert calc_diff(got, ex) < 2e-3, (name, calc_diff(got, ex))
    # Rows in no group: exact zeros out and back; the empty group's weight gets no gradient.
    np.testing.assert_array_equal(ours[0][used:], 0.0)
    np.testing.assert_array_equal(ours[1][used:], 0.0)
    np.testing.assert_array_equal(ours[2][np.asarray(sizes) == 0], 0.0)


def test_interpret_matches_emulation_and_float64(hopper_sm_count):
    _check("mosaic_gpu_interpret", 1e-9, 1e-5, _data())


def test_fp8_on_gpu_never_takes_the_dense_masked_path():
    # The portable emulation runs lax.ragged_dot; only on a GPU is that densified, so the error
    # is raised there. Here (CPU) ragged_dot + fp8 runs the emulation.
    x, w, _, sizes = _data()
    if jax.default_backend() == "gpu":
        with pytest.raises(ValueError, match="dense masked GEMM"):
            gg.gmm(x, w, sizes, backend="ragged_dot", fp8=True)
    else:
        got = gg.gmm(x, w, sizes, backend="ragged_dot", fp8=True, out_dtype=jnp.float32)
        ref = fp8_ragged_dot(x, w, sizes, out_dtype=jnp.float32)
        np.testing.assert_array_equal(np.asarray(got)[:86], np.asarray(ref)[:86])


def test_lowers_for_cuda_at_v3_expert_shapes(hopper_sm_count):
    # One device's share of V3's routed experts (8 of 256, 7168 → 2048 → 7168): forward, dgrad
    # and wgrad lower through Mosaic GPU with fp8 operands (wgmma K-major checks, shared memory).
    m, d, f, g = 4096, 7168, 2048, 8
    args = (jax.ShapeDtypeStruct((m, d), jnp.bfloat16), jax.ShapeDtypeStruct((g, d, f), jnp.float32),
            jax.ShapeDtypeStruct((g,), jnp.int32))

    def f_and_grads(x, w, s):
        fn = lambda x, w: jnp.sum(gg.gmm(x, w, s, backend="mosaic_gpu", fp8=True)
                                  .astype(jnp.float32))
        return jax.grad(fn, argnums=(0, 1))(x, w)
    text = jax.jit(f_and_grads).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 3
    assert "f8E4M3FN" in text


@pytest.mark.skipif(gg.default_backend(fp8=True) != "mosaic_gpu", reason="needs a Hopper GPU "
                    "(run: JAX_PLATFORMS=cuda python -m pytest tests/kernels -k hardware)")
@pytest.mark.parametrize("shape", [(96, 200, 136, (50, 0, 30, 6)),
                                   (4096, 2048, 1408, (1000, 24, 0, 3000, 72)),
                                   (8192, 7168, 2048, (1024,) * 8)])
def test_hardware_fp8_grouped_matches_emulation(shape):
    m, k, n, sizes = shape
    _check("mosaic_gpu", 1e-6, 1e-5, _data(m, k, n, np.asarray(sizes, np.int32), seed=m))
