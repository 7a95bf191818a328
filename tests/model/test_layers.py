"""Tests for `deepseek_jax.model.layers.cast_layer_weight`: the integer-rounded f32 → bf16 cast
must give the bits `astype` gives, and the same gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model.layers import cast_layer_weight


def _specials() -> np.ndarray:
    """Values where rounding to nearest even is decided: ties below and above an even and an odd
    bf16 mantissa, the largest finite f32 (rounds to inf), subnormals, signed zeros, infinities."""
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,      # exact halves
                     0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x7F7F7FFF,      # either side; max
                     0x00000001, 0x00008000, 0x00018000, 0x807FFFFF,      # subnormals
                     0x00000000, 0x80000000, 0x7F800000, 0xFF800000],     # zeros, infinities
                    np.uint32)
    return ties.view(np.float32)


def test_integer_rounding_gives_the_bits_astype_gives():
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(20000) * np.exp2(rng.integers(-140, 120, 20000))
    x = jnp.asarray(np.concatenate([spread.astype(np.float32), _specials()]))
    got = np.asarray(jax.jit(cast_layer_weight, static_argnums=1)(x, jnp.bfloat16))
    want = np.asarray(x.astype(jnp.bfloat16))
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_nan_stays_nan_and_other_casts_are_plain():
    nans = np.array([0x7FC00000, 0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)
    assert np.isnan(np.asarray(cast_layer_weight(jnp.asarray(nans), jnp.bfloat16),
                               np.float32)).all()
    x = jnp.linspace(-3, 3, 7, dtype=jnp.float32)
    for dtype in (jnp.float32, jnp.float16):
        np.testing.assert_array_equal(cast_layer_weight(x, dtype), x.astype(dtype))
    np.testing.assert_array_equal(cast_layer_weight(x.astype(jnp.bfloat16), jnp.bfloat16),
                                  x.astype(jnp.bfloat16))


def test_gradient_is_the_cotangent_in_f32():
    x = jnp.linspace(-2, 2, 12, dtype=jnp.float32).reshape(3, 4)
    w = jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7

    def loss(cast):
        return lambda x: jnp.sum(cast(x).astype(jnp.float32) ** 2 * w)
    got = jax.grad(loss(lambda x: cast_layer_weight(x, jnp.bfloat16)))(x)
    want = jax.grad(loss(lambda x: x.astype(jnp.bfloat16)))(x)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
