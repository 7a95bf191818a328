"""GRPO's log-probs with the head applied in chunks of positions (`rl.step.target_logprobs`,
`config.loss_chunk`) equal those of whole logits, and so does their policy gradient.

Tolerances (tests/numerics.py, 2·γ(n)·κ): per position the chunked path computes the same
log-softmax of the same logits, whose D-term dot products may be blocked differently: a log-prob
and an entropy (both Lipschitz ≤ 2 in each logit's max-norm, logits of size O(1) in the tiny
model) move by ≤ 2·2·γ(D)·κ relative, κ ≤ 20; the parameter gradient is compared in norm with
n = B·T + V + D (positions, the V-term hidden gradient, the D-term logits), κ ≤ 20, as in
tests/train/test_chunked_loss.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import init_variables
from deepseek_jax.rl.step import target_logprobs
from numerics import assert_leaves_close_in_norm, gradient_rtol

B, T, TEMPERATURE = 4, 10, 0.7


def test_chunked_logprobs_and_gradient_equal_whole_logits(tiny):
    v = init_variables(jax.random.key(0), tiny)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, tiny.vocab_size)
    weights = jax.random.normal(jax.random.key(2), (B, T))      # stands in for ρ·A per token

    def run(chunk):
        c = tiny.replace(loss_chunk=chunk)

        def objective(params):
            logp, entropy, _ = target_logprobs(params, v["routing"], tokens, c, TEMPERATURE)
            return jnp.sum(logp * weights), (logp, entropy)

        return jax.jit(jax.value_and_grad(objective, has_aux=True))(v["params"])

    (_, (logp0, ent0)), g0 = run(0)
    (_, (logp1, ent1)), g1 = run(3)                             # chunks 3, 3, 3 and 1
    rtol = 2 * gradient_rtol(tiny.d_model, 20.0)
    np.testing.assert_allclose(logp1, logp0, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(ent1, ent0, rtol=rtol, atol=rtol)
    assert_leaves_close_in_norm(
        g1, g0, gradient_rtol(B * T + tiny.vocab_size + tiny.d_model, 20.0))
