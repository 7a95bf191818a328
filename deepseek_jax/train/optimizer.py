"""AdamW with warmup + cosine (or DeepSeek's step schedule), global-norm clipping and a decay mask.

Defaults follow V3 §4.2: β = (0.9, 0.95), weight decay 0.1, clipping at 1.0. Weight decay skips
RMSNorm scales; the routing bias is not a parameter at all, so the optimizer never sees it.

Left out: bf16 optimizer moments (V3 keeps AdamW moments in bf16; here they follow the fp32
parameters), and the ZeRO-style sharding of optimizer state, which comes from the mesh rules.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax
import jax.numpy as jnp
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           kind: str = "cosine", final_fraction: float = 0.1, *,
                           fraction=None, constant_until: float = 0.0,
                           cosine_until: float = 1.0, tail=()):
    """Linear warmup to `peak`, then cosine to `final_fraction·peak` ("cosine"), or DeepSeek's
    step schedule ("step": ×0.316 at 80% and again at 90% of training, V2/V3 reports), or
    V3's pretraining schedule ("deepseek_v3", `deepseek_v3_learning_rate`): `peak`
    until the fraction `constant_until` of the run's tokens, a cosine to final_fraction·peak by
    `cosine_until`, then the (fraction, lr) points of `tail`. `fraction` maps a step to the
    share of the run's tokens seen (`schedules.Progress.fraction`; default step/total_steps)."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
            end_value=peak * final_fraction)
    if kind == "step":
        warm = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
        steps = optax.piecewise_constant_schedule(
            peak, {int(0.8 * total_steps) - warmup_steps: 0.316,
                   int(0.9 * total_steps) - warmup_steps: 0.316})
        return optax.join_schedules([warm, steps], [max(warmup_steps, 1)])
    if kind == "deepseek_v3":
        return deepseek_v3_learning_rate(
            peak, warmup_steps, fraction or (lambda step: step / max(total_steps, 1)),
            constant_until=constant_until, cosine_until=cosine_until,
            cosine_to=peak * final_fraction, tail=tail)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
                                     optax.constant_schedule(peak)], [max(warmup_steps, 1)])
    raise ValueError(f"unknown schedule {kind!r}; use 'cosine', 'step', 'deepseek_v3' or "
                     "'constant'")


def deepseek_v3_learning_rate(peak: float, warmup_steps: int, fraction: Callable, *,
                              constant_until: float, cosine_until: float, cosine_to: float,
                              tail: Sequence[Sequence[float]] = ()):
    """V3's learning rate: linear warm-up from 0 over `warmup_steps` steps, `peak` until the
    fraction `constant_until` of the run, a cosine to `cosine_to` by `cosine_until`, then the
    (fraction, lr) points of `tail` (each holds from its fraction on)."""
    if not 0 <= constant_until < cosine_until <= 1:
        raise ValueError(f"need 0 ≤ constant_until ({constant_until}) < cosine_until "
                         f"({cosine_until}) ≤ 1")
    tail = [(float(f), float(v)) for f, v in tail]

    def lr(step):
        f = fraction(step)
        t = jnp.clip((f - constant_until) / (cosine_until - constant_until), 0.0, 1.0)
        value = cosine_to + (peak - cosine_to) * 0.5 * (1 + jnp.cos(math.pi * t))
        value = jnp.where(f < constant_until, peak, value)
        warm = peak * jnp.asarray(step, jnp.float32) / max(warmup_steps, 1)
        value = jnp.where(jnp.asarray(step) < warmup_steps, warm, value)
        for at, v in tail:
            value = jnp.where(f >= at, v, value)
        return jnp.asarray(value, jnp.float32)
    return lr


def decay_mask(params) -> dict:
    """True for parameters that get weight decay: everything but RMSNorm scales."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: k[-1] != "scale" for k in flat})


def make_optimizer(learning_rate, *, b1: float = 0.9, b2: float = 0.95,
                   weight_decay: float = 0.1, clip_norm: float = 1.0, eps: float = 1e-8):
    """optax chain: clip by global norm → AdamW with the decay mask."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                    mask=decay_mask),
    )
