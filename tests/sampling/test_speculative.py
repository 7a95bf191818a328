"""MTP speculative decoding: the acceptance rule on a hand-made p/q (exactly and by sampling),
greedy speculative output identical to plain greedy, and speculative sampling's log-probs equal
to the trainer's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.sampling import generate, residual_distribution, speculative_accept

from sampling_helpers import PROMPTS, aligned_variables, row, tiny, trainer_logprobs

N = 12
P = np.array([0.1, 0.2, 0.3, 0.4])     # target
Q = np.array([0.4, 0.3, 0.2, 0.1])     # draft


def test_acceptance_rule_exactly():
    """Σ_d q(d)·[min(1, p(d)/q(d))·δ_d + (1 − min(1, p(d)/q(d)))·residual] = p."""
    residual = np.asarray(residual_distribution(jnp.asarray(P), jnp.asarray(Q)))
    np.testing.assert_allclose(residual, [0, 0, 0.1 / 0.4, 0.3 / 0.4], rtol=1e-6)
    accept = np.minimum(1.0, P / Q)
    out = sum(Q[d] * (accept[d] * np.eye(4)[d] + (1 - accept[d]) * residual) for d in range(4))
    np.testing.assert_allclose(out, P, rtol=1e-6)
    # p = q: the residual is never used; it falls back to p rather than 0/0.
    np.testing.assert_allclose(np.asarray(residual_distribution(jnp.asarray(P), jnp.asarray(P))), P)


def test_acceptance_rule_by_sampling():
    """200,000 draws: accepted-or-resampled tokens follow p. Each frequency has standard error
    ≤ sqrt(0.25/2e5) = 0.0011; we allow 0.005 (4.5σ). Acceptance rate Σ min(p, q) = 0.6."""
    n = 200_000
    k_draft, k_rule = jax.random.split(jax.random.key(0))
    p = jnp.broadcast_to(jnp.asarray(P, jnp.float32), (n, 4))
    q = jnp.broadcast_to(jnp.asarray(Q, jnp.float32), (n, 4))
    drafts = jax.random.categorical(k_draft, jnp.log(q)).astype(jnp.int32)
    tokens, accepted = jax.jit(speculative_accept)(p, q, drafts, jax.random.split(k_rule, n))
    freq = np.bincount(np.asarray(tokens), minlength=4) / n
    np.testing.assert_allclose(freq, P, atol=0.005)
    assert abs(float(np.mean(np.asarray(accepted))) - 0.6) < 0.005
    # Accepted tokens are the drafts; where p ≥ q a draft is always accepted.
    t, a, d = np.asarray(tokens), np.asarray(accepted), np.asarray(drafts)
    assert np.all(t[a] == d[a]) and np.all(a[d >= 2])


@pytest.fixture(scope="module")
def greedy_pair():
    v, c = aligned_variables(), tiny()
    plain = generate(v, c, PROMPTS, max_new_tokens=N)
    spec = generate(v, c, PROMPTS, max_new_tokens=N, speculative=True)
    return plain, spec


def test_speculative_greedy_equals_greedy(greedy_pair):
    plain, spec = greedy_pair
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(plain.lengths))
    np.testing.assert_allclose(np.asarray(spec.logprobs), np.asarray(plain.logprobs), atol=1e-5)
    # Both the accept and the reject path ran, and accepted drafts saved passes.
    assert 0.2 < spec.acceptance_rate < 1.0
    assert int(spec.steps) < int(plain.steps) == N - 1
    assert np.all(np.asarray(spec.accepted) <= np.asarray(spec.drafted))


def test_speculative_greedy_stops_at_eos_like_greedy(greedy_pair):
    plain, _ = greedy_pair
    eos = int(np.asarray(plain.tokens)[2, 5])
    v, c = aligned_variables(), tiny()
    a = generate(v, c, PROMPTS, max_new_tokens=N, eos_id=eos)
    b = generate(v, c, PROMPTS, max_new_tokens=N, eos_id=eos, speculative=True)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
    assert int(b.lengths[2]) <= 6


def test_speculative_sampling_logprobs_and_seeds():
    v, c = aligned_variables(), tiny()
    run = lambda key: generate(v, c, PROMPTS, max_new_tokens=N, temperature=0.7, top_k=20,
                               rng=key, speculative=True)
    out, again = run(jax.random.key(11)), run(jax.random.key(11))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(again.tokens))
    assert int(np.sum(np.asarray(out.drafted))) > 0
    for b, prompt in enumerate(PROMPTS):
        tokens, logprobs = row(out, b)
        assert len(tokens) == N
        want, logits = trainer_logprobs(v, prompt, tokens, 0.7)
        np.testing.assert_allclose(logprobs, want, atol=1e-4)
        kth = np.sort(logits, -1)[:, -20]
        assert np.all(logits[np.arange(N), tokens] >= kth)
