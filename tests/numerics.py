"""Helpers for comparing fp32 results computed in different reduction orders (another device
count, another sharding), with tolerances that follow from rounding rather than from a run.

Why gradients and not parameters after AdamW. On its first step AdamW moves each entry by
lr·g/(|g| + ε): an entry whose gradient is near rounding level (|g| ≲ ε = 1e-8) moves by an amount
that depends on that rounding, up to 2·lr when rounding flips the sign of g. So no tolerance below
2·lr per step is derivable for parameters after Adam steps on two machines. The gradient itself is
a sum whose reordering error is bounded (below), so equality tests compare gradients, or run plain
SGD, where the parameter difference is lr times the gradient difference.

The bound used. Summing n fp32 terms t_k in two different orders gives results that differ by at
most 2·γ(n)·Σ|t_k|, with γ(n) = n·u/(1 − n·u) and u = 2⁻²⁴ (Higham, Accuracy and Stability of
Numerical Algorithms, §4.2). Relative to the sum, that is 2·γ(n)·κ with κ = Σ|t_k| / |Σ t_k| the
sum's condition number; for a whole parameter leaf compared in the Euclidean norm, κ is
‖Σ_k|t_k|‖ / ‖Σ_k t_k‖ taken entrywise. `gradient_rtol(n, kappa)` returns that worst case; tests
feed inputs whose κ is small and stated (e.g. advantages that do not cancel across rows, where
GRPO's group-centred ones cancel by design and make κ large).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

U32 = 2.0 ** -24          # unit roundoff of float32


def gradient_rtol(n: int, kappa: float) -> float:
    """Worst-case relative difference of one fp32 sum of n terms with condition number κ,
    computed in two orders (see the module docstring)."""
    gamma = n * U32 / (1 - n * U32)
    return 2 * gamma * kappa


def record_gradient() -> optax.GradientTransformation:
    """An optax transformation that keeps the gradient it was given as its state and passes it on
    unchanged: chained before an optimizer, `opt_state[0]` after a step is that step's gradient,
    sharded like the parameters. Not a mock: the train step runs as it always does."""
    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        del state, params
        return updates, updates

    return optax.GradientTransformation(init, update)


def assert_leaves_close_in_norm(got, want, rtol: float, what: str = "") -> float:
    """Every leaf: ‖got − want‖₂ ≤ rtol·‖want‖₂ (a leaf that is exactly 0 must stay exactly 0).
    Returns the largest relative difference seen, for reporting."""
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert a.shape == b.shape, name
        ref = np.linalg.norm(a)
        if ref == 0:
            np.testing.assert_array_equal(b, a, err_msg=name)
            continue
        rel = np.linalg.norm(b - a) / ref
        assert rel <= rtol, f"{name}: relative difference {rel:.3g} > {rtol:.3g}"
        worst = max(worst, rel)
    return worst
