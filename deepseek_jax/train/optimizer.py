"""AdamW with warmup + cosine (or DeepSeek's step schedule), global-norm clipping and a decay mask.

Defaults follow V3 §4.2: β = (0.9, 0.95), weight decay 0.1, clipping at 1.0. Weight decay skips
RMSNorm scales; the routing bias is not a parameter at all, so the optimizer never sees it.

Left out: bf16 optimizer moments (V3 keeps AdamW moments in bf16; here they follow the fp32
parameters), and the ZeRO-style sharding of optimizer state, which comes from the mesh rules.
"""

from __future__ import annotations

import flax
import jax
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           kind: str = "cosine", final_fraction: float = 0.1):
    """Linear warmup to `peak`, then cosine to `final_fraction·peak` ("cosine"), or DeepSeek's
    step schedule ("step": ×0.316 at 80% and again at 90% of training, V2/V3 reports)."""
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
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
                                     optax.constant_schedule(peak)], [max(warmup_steps, 1)])
    raise ValueError(f"unknown schedule {kind!r}; use 'cosine', 'step' or 'constant'")


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
