"""RoPE/YaRN against formulas written out with NumPy (spec §2.4)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.model.rope import apply_rope, inverse_frequencies, rope_angles, yarn_ramp_bounds


def test_v3_ramp_bounds():
    assert yarn_ramp_bounds(get_config("v3-671b")) == (10, 23)   # spec §2.4 / §9.4


def test_v3_frequencies_against_formula():
    c = get_config("v3-671b")
    f = inverse_frequencies(c)
    base = 10000.0 ** (-np.arange(32) * 2 / 64)
    # Pairs 0..10 keep their frequency, pairs >= 23 are divided by 40, linear ramp between.
    np.testing.assert_allclose(f[:11], base[:11], rtol=1e-12)
    np.testing.assert_allclose(f[23:], base[23:] / 40, rtol=1e-12)
    i = 16
    t = (i - 10) / 13
    np.testing.assert_allclose(f[i], base[i] / 40 * t + base[i] * (1 - t), rtol=1e-12)


def test_plain_rope_frequencies():
    c = get_config("moonlight")    # no YaRN, θ = 50000
    np.testing.assert_allclose(inverse_frequencies(c), 50000.0 ** (-np.arange(32) / 32),
                               rtol=1e-12)


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rope_against_complex_rotation(interleaved):
    c = get_config("tiny")
    rng = np.random.default_rng(0)
    R = c.qk_rope_head_dim
    x = rng.standard_normal((2, 5, 3, R)).astype(np.float32)
    pos = np.array([[0, 1, 2, 7, 40], [3, 3, 9, 11, 63]])
    cos, sin = rope_angles(jnp.asarray(pos), c)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleaved))
    ang = pos[..., None, None] * inverse_frequencies(c)            # [B, T, 1, R/2]
    if interleaved:
        z = x[..., 0::2] + 1j * x[..., 1::2]
    else:
        z = x[..., : R // 2] + 1j * x[..., R // 2:]
    z = z * np.exp(1j * ang)
    want = np.empty_like(x)
    if interleaved:
        want[..., 0::2], want[..., 1::2] = z.real, z.imag
    else:
        want[..., : R // 2], want[..., R // 2:] = z.real, z.imag
    # fp32 trig of angles up to ~60 rad: ~1e-5 absolute error.
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_scores_depend_only_on_relative_position():
    c = get_config("tiny")
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 1, c.qk_rope_head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, c.qk_rope_head_dim)), jnp.float32)

    def score(m, n):
        cq, sq = rope_angles(jnp.array([[m]]), c)
        ck, sk = rope_angles(jnp.array([[n]]), c)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)


def test_v3_mscale():
    # √t = 0.1·ln 40 + 1 (spec §2.3): mscale² · 192^-0.5 = 0.1352338.
    m = 0.1 * math.log(40) + 1
    assert get_config("v3-671b").softmax_scale == pytest.approx(m * m / math.sqrt(192), rel=1e-12)
