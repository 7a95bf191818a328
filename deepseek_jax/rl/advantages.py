"""Group-relative advantages (DeepSeekMath §4.1.2, outcome supervision).

For a prompt's G completions with rewards r_1..r_G:  A_i = (r_i − mean(r)) / (s + ε), the same
value for every token of completion i, where s is

  "group"  the standard deviation within the group (the paper)
  "batch"  the standard deviation over the whole batch (a steadier scale)
  "none"   1 — no division (Dr. GRPO: the std term weights questions by difficulty)

Population standard deviation (ddof = 0; the paper does not say which). A group whose rewards
are all equal gets advantage exactly 0 (its numerator is 0), whatever the scaling.
"""

from __future__ import annotations

import jax.numpy as jnp

SCALINGS = ("group", "batch", "none")


def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-6):
    """rewards [P·G] (each prompt's G completions contiguous) → advantages [P·G] float32."""
    if scale not in SCALINGS:
        raise ValueError(f"advantage scale {scale!r}: use one of {SCALINGS}")
    r = jnp.asarray(rewards, jnp.float32)
    if r.shape[0] % group_size:
        raise ValueError(f"{r.shape[0]} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)                                      # [P, G]
    # A group of equal rewards gets exactly 0. Computed, its mean can differ from the rewards by
    # rounding (eight rewards of 0.1 in fp32), leaving every member the same tiny advantage, which
    # the group std (itself rounding-sized) would blow up to ~±0.01: a uniform push on all of a
    # prompt's samples that Adam's normalization turns into full-size steps.
    same = jnp.all(g == g[:, :1], axis=1, keepdims=True)              # [P, 1]
    centered = jnp.where(same, 0.0, g - g.mean(axis=1, keepdims=True))  # [P, G]
    if scale != "none":
        s = g.std(axis=1, keepdims=True) if scale == "group" else r.std()
        # Where s = 0 the numerator is 0 too: keep the 0 instead of 0/0 when eps = 0.
        centered = jnp.where(s > 0, centered / (s + eps), 0.0)
    return centered.reshape(-1)                                        # [P·G]


def zero_variance_fraction(rewards, group_size: int):
    """Share of groups whose rewards are all equal (they carry no learning signal)."""
    g = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
    return jnp.mean(jnp.all(g == g[:, :1], axis=1).astype(jnp.float32))
