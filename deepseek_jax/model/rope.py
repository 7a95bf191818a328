"""Rotary position embedding with YaRN context extension, as DeepSeek-V2/V3 use it.

RoPE acts only on the decoupled RoPE part of MLA (R dims of the queries and the one shared key).
YaRN ("NTK-by-parts" interpolation plus an attention temperature):

  inv_freq_i = θ^(−2i/R),  i = 0 … R/2−1
  dims that rotate fewer than β_slow times over the original context get divided by the scale s,
  dims that rotate more than β_fast times keep their frequency, with a linear ramp between:
    corr(r) = R·ln(L_orig / (2π r)) / (2 ln θ);  low = ⌊corr(β_fast)⌋, high = ⌈corr(β_slow)⌉
    ramp_i  = clip((i − low)/(high − low), 0, 1)
    freq_i  = inv_freq_i/s · ramp_i + inv_freq_i · (1 − ramp_i)
  For V3 (R = 64, θ = 1e4, L_orig = 4096, β = 32/1, s = 40): low = 10, high = 23.

The temperature √t = 0.1·mscale_all_dim·ln s + 1 is folded into the softmax scale
(`ModelConfig.softmax_scale`: 0.1352338 for V3); HF's extra cos/sin factor
mscale(s, mscale)/mscale(s, mscale_all_dim) is applied here (it is 1 for every released model).
YaRN is applied whenever `rope_factor > 1`, as HF transformers does; DeepSeek's inference demo
applies it only when its max_seq_len exceeds the original length. DeepSeek pretrained with
plain RoPE and switched YaRN on for context extension (V3 §4.3), so the pretraining run configs
set `rope_factor = 1` and the extension phases (`deepseek_jax.configs.pretrain`, v3-671b-32k
and -128k) keep the released config's s = 40; imported weights keep their config.json's YaRN.

Pair layout: the official weights rotate consecutive pairs (x[2i], x[2i+1]) ("interleaved",
`rope_interleaved=True`); `False` rotates (x[i], x[i + R/2]) (HF `rope_interleave=False`).

Left out: dynamic NTK and the other HF rope_scaling types (no DeepSeek model uses them).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig, yarn_mscale


def _correction_dim(n_rotations: float, dim: int, theta: float, original_len: int) -> float:
    """The pair index whose wavelength fits `n_rotations` times into the original context."""
    return dim * math.log(original_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_ramp_bounds(config: ModelConfig) -> tuple[int, int]:
    """(low, high) pair indices of YaRN's linear ramp, clamped to [0, R−1]."""
    R = config.qk_rope_head_dim
    low = math.floor(_correction_dim(config.rope_beta_fast, R, config.rope_theta,
                                     config.rope_original_max_len))
    high = math.ceil(_correction_dim(config.rope_beta_slow, R, config.rope_theta,
                                     config.rope_original_max_len))
    return max(low, 0), min(high, R - 1)


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair angular frequencies [R/2] (float64 NumPy: computed once, at trace time)."""
    R = config.qk_rope_head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, R, 2, dtype=np.float64) / R)  # [R/2]
    if not config.uses_yarn:
        return inv_freq
    low, high = yarn_ramp_bounds(config)
    span = max(high - low, 1e-3)                     # DeepSeek nudges a zero span the same way
    ramp = np.clip((np.arange(R // 2) - low) / span, 0.0, 1.0)  # [R/2] 0 = keep, 1 = interpolate
    return inv_freq / config.rope_factor * ramp + inv_freq * (1.0 - ramp)


def rope_angles(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, each [B, T, R/2] float32, for int positions [B, T]."""
    inv_freq = jnp.asarray(inverse_frequencies(config), jnp.float32)           # [R/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq               # [B, T, R/2]
    factor = 1.0
    if config.uses_yarn and config.rope_mscale_all_dim:
        factor = (yarn_mscale(config.rope_factor, config.rope_mscale)
                  / yarn_mscale(config.rope_factor, config.rope_mscale_all_dim))
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool = True) -> jax.Array:
    """Rotates x [B, T, (N,) R] by angles cos/sin [B, T, R/2]; returns x's shape and dtype."""
    if x.ndim == 4:                                   # per-head input: broadcast over N
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    if interleaved:                                   # pairs (x[2i], x[2i+1])
        pairs = x32.reshape(*x.shape[:-1], half, 2)   # [..., R/2, 2]
        a, b = pairs[..., 0], pairs[..., 1]           # [..., R/2]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)  # [..., R/2, 2]
        out = out.reshape(x.shape)                    # [..., R]
    else:                                             # pairs (x[i], x[i + R/2])
        a, b = x32[..., :half], x32[..., half:]       # [..., R/2]
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)  # [..., R]
    return out.astype(x.dtype)
