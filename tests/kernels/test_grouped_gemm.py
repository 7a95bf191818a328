"""Tests for `deepseek_jax.kernels.grouped_gemm`: every backend against a per-group NumPy loop.

The reference is independent of every backend: NumPy float64, one `x[rows of g] @ w[g]` per
group. Backends run forward and backward on groups that include an empty one, one much larger than
the rest, and rows past sum(group_sizes) (which must come out, and get gradients, as zeros).

Tolerances. fp32 backends (ragged_dot, reference, megablox interpret): sums of K = 128 products of
O(1) numbers, accumulated in fp32 in a backend-specific order: ~1e-5 relative; we allow 1e-4 of
the output scale. The Mosaic GPU kernels take the compute dtype (bf16) operands and store bf16:
bf16 rounding of inputs (2⁻⁹ relative) and output (2⁻⁹) gives ~0.5 % of the output scale; we
allow 2 % of the scale (max over all entries), far below a wrong group (O(100 %)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import config as config_mod
from deepseek_jax.kernels import fp8
from deepseek_jax.kernels import grouped_gemm as gg
from deepseek_jax.model import dispatch

M, K, N, G = 96, 128, 128, 4
SIZES = np.array([50, 0, 30, 6], np.int32)      # sum 86 < M: 10 trailing rows in no group


def _data(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((G, K, N)) / np.sqrt(K)).astype(np.float32)
    dy = rng.standard_normal((M, N)).astype(np.float32)
    return x, w, dy


def _np_reference(x, w, dy, sizes):
    """(y, dx, dw) by a loop over groups in float64."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    y, dx, dw = np.zeros((M, N)), np.zeros((M, K)), np.zeros((G, K, N))
    start = 0
    for g, s in enumerate(sizes):
        rows = slice(start, start + s)
        y[rows] = x[rows] @ w[g]
        dx[rows] = dy[rows] @ w[g].T
        dw[g] = x[rows].T @ dy[rows]
        start += s
    return y, dx, dw


def _run(backend, dtype):
    x, w, dy = _data()
    xs = jnp.asarray(x, dtype)

    def f(x, w, sizes, dy):
        y = gg.gmm(x, w, sizes, backend=backend, out_dtype=jnp.float32)
        return jnp.sum(y * dy), y
    (dx, dw), y = jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(
        xs, jnp.asarray(w), jnp.asarray(SIZES), jnp.asarray(dy))
    return x, w, dy, y, dx, dw


def _check(backend, dtype, rel):
    x, w, dy, y, dx, dw = _run(backend, dtype)
    if dtype == jnp.bfloat16:      # the reference sees the same rounded inputs
        x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    ry, rdx, rdw = _np_reference(x, w, dy, SIZES)
    for name, got, ref in (("y", y, ry), ("dx", dx, rdx), ("dw", dw, rdw)):
        got = np.asarray(got, np.float64)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, atol=rel * scale, rtol=0, err_msg=name)
    # Rows in no group: exact zeros out, exact zeros back; the empty group's weight: zero grad.
    np.testing.assert_array_equal(np.asarray(y)[SIZES.sum():], 0.0)
    np.testing.assert_array_equal(np.asarray(dx)[SIZES.sum():], 0.0)
    np.testing.assert_array_equal(np.asarray(dw)[1], 0.0)


@pytest.mark.parametrize("backend", ["ragged_dot", "tiled", "reference", "megablox_interpret"])
def test_fp32_backends_match_loop(backend):
    _check(backend, jnp.float32, 1e-4)


def test_tiled_bf16_matches_loop():
    # bf16 rows (the reference sees them rounded too) and weights cast to bf16 inside (2⁻⁹
    # relative each, not seen by the reference), fp32 accumulation: errors of order 2⁻⁹ of the
    # largest value; 2e-2 is the bound the Mosaic bf16 kernels below are held to.
    _check("tiled", jnp.bfloat16, 2e-2)


def test_megablox_bf16_matches_loop():
    # bf16 rows; the kernel writes bf16 tiles from its fp32 accumulator (no [M, N] fp32 array):
    # the same bound as the tiled bf16 path above.
    _check("megablox_interpret", jnp.bfloat16, 2e-2)


def test_mosaic_gpu_interpret_matches_loop(hopper_sm_count):
    # GPU interpreter (no GPU): the shipped Hopper kernels, bf16 in, fp32 accumulate, bf16 out.
    _check("mosaic_gpu_interpret", jnp.bfloat16, 2e-2)


def test_all_rows_in_one_group_and_padding_of_odd_shapes():
    # Very uneven (every row in the last group) with K, N not multiples of any tile: the
    # padded megablox path and ragged_dot agree with the reference gather.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((20, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 24, 40)), jnp.float32)
    sizes = jnp.asarray([0, 0, 20], jnp.int32)
    ref = np.asarray(x, np.float64) @ np.asarray(w[2], np.float64)
    for backend in ("ragged_dot", "tiled", "reference", "megablox_interpret"):
        got = jax.jit(lambda x, w, s: gg.gmm(x, w, s, backend=backend))(x, w, sizes)
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=backend)


def test_auto_backend_by_platform():
    assert gg.default_backend("cpu") == "tiled"
    assert gg.default_backend("tpu") == "megablox"
    assert gg.resolve_backend("auto") == "tiled"            # tests run on CPU
    with pytest.raises(ValueError, match="use one of"):
        gg.resolve_backend("cutlass")


def test_gpu_backend_follows_the_dtype():
    # wgmma takes 16-bit operands (or fp8): an fp32 model on Hopper must not reach the Mosaic
    # kernels, and fp8 experts always go to the Hopper fp8 kernel there.
    hopper = dict(platform="cuda", compute_capability="9.0")
    assert gg.default_backend(dtype=jnp.bfloat16, **hopper) == "mosaic_gpu"
    assert gg.default_backend(dtype=jnp.float32, **hopper) == "ragged_dot"
    assert gg.default_backend(dtype=jnp.float32, fp8=True, **hopper) == "mosaic_gpu"
    assert gg.default_backend("cuda", jnp.bfloat16, compute_capability="8.0") == "ragged_dot"
    with pytest.raises(ValueError, match="16-bit operands only.*ragged_dot"):
        gg.resolve_backend("mosaic_gpu", jnp.float32)
    assert gg.resolve_backend("mosaic_gpu", jnp.float32, fp8=True) == "mosaic_gpu"


def test_config_lists_match_modules():
    # The modules take their lists from config.py: a name a config accepts is one they take.
    assert gg.CONFIG_BACKENDS is config_mod.MOE_BACKENDS and "auto" not in gg.BACKENDS
    assert fp8.BACKENDS is config_mod.FP8_BACKENDS
    with pytest.raises(config_mod.ConfigError, match="fp8_backend"):
        config_mod.get_config("tiny", fp8_backend="cublas")
    assert dispatch.TRANSPORTS is config_mod.MOE_EP_TRANSPORTS
    with pytest.raises(config_mod.ConfigError, match="moe_backend"):
        config_mod.get_config("tiny", moe_backend="cutlass")
    with pytest.raises(config_mod.ConfigError, match="moe_capacity_factor"):
        config_mod.get_config("tiny", moe_capacity_factor=-1.0)


def _lower(backend, platform):
    m, k, n, g = 256, 256, 512, 4
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((g, k, n), jnp.float32),
            jax.ShapeDtypeStruct((g,), jnp.int32))

    def f(x, w, s):
        y = gg.gmm(x, w, s, backend=backend, out_dtype=jnp.float32)
        return jax.grad(lambda x, w: jnp.sum(gg.gmm(x, w, s, backend=backend)
                                             .astype(jnp.float32)), argnums=(0, 1))(x, w), y
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_mosaic_gpu_lowers_for_cuda(hopper_sm_count):
    # Forward, dgrad and wgrad kernels lower through Mosaic GPU (layouts, dtypes, block shapes).
    text = _lower("mosaic_gpu", "cuda")
    assert text.count("mosaic_gpu") >= 3


def test_megablox_lowers_for_tpu():
    text = _lower("megablox", "tpu")
    assert text.count("tpu_custom_call") >= 3


@pytest.mark.skipif(gg.default_backend() != "mosaic_gpu", reason="needs a Hopper GPU")
def test_hardware_mosaic_gpu_matches_loop():
    # The compiled kernels on a real H100/H200 (run by experiments/benchmarks/run_all.sh).
    _check("mosaic_gpu", jnp.bfloat16, 2e-2)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
def test_hardware_megablox_matches_loop():
    _check("megablox", jnp.float32, 1e-4)
