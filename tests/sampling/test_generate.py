"""generate(): greedy against the teacher-forced full forward, sampler log-probs against the
trainer's at T = 1 and T = 0.7, a mixed-length batch against each row alone, EOS and lengths,
seeds, top-k / top-p semantics, and the errors raised before compiling.

Log-prob tolerance: the sampler's logits come from the cached (absorbed) path, the trainer's
from the full forward; both fp32, they differ by summation order only (~1e-6 on log-probs of
order 1–5). We allow 1e-4 absolute.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.sampling import generate, sampling_logits, sampling_probs

from sampling_helpers import PROMPTS, decisive_variables, row, tiny, trainer_logprobs

N = 10
LOGP_ATOL = 1e-4


@pytest.fixture(scope="module")
def greedy():
    return generate(decisive_variables(), tiny(), PROMPTS, max_new_tokens=N)


@pytest.fixture(scope="module")
def sample():
    """One compiled sampler (top-k 20, top-p 0.95); temperature is a runtime value."""
    def run(prompts, rng, temperature=1.0):
        return generate(decisive_variables(), tiny(), prompts, max_new_tokens=N,
                        temperature=temperature, top_k=20, top_p=0.95, rng=rng)
    return run


def test_greedy_is_argmax_of_full_forward(greedy):
    v = decisive_variables()
    assert greedy.tokens.shape == (3, N) and greedy.logprobs.shape == (3, N)
    np.testing.assert_array_equal(np.asarray(greedy.lengths), [N] * 3)
    np.testing.assert_array_equal(np.asarray(greedy.prompt_lengths), [5, 3, 8])
    assert int(greedy.steps) == N - 1
    for b, prompt in enumerate(PROMPTS):
        tokens, logprobs = row(greedy, b)
        want, logits = trainer_logprobs(v, prompt, tokens)   # T = 0 reports plain softmax
        np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
        np.testing.assert_allclose(logprobs, want, atol=LOGP_ATOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs(sample, temperature):
    """log_softmax(apply(prompt + generated)[0] / T) at the generated positions, untruncated,
    although the tokens were drawn from the top-k / top-p truncated distribution."""
    out = sample(PROMPTS, jax.random.key(3), temperature)
    v = decisive_variables()
    for b, prompt in enumerate(PROMPTS):
        tokens, logprobs = row(out, b)
        assert len(tokens) == N
        want, logits = trainer_logprobs(v, prompt, tokens, temperature)
        np.testing.assert_allclose(logprobs, want, atol=LOGP_ATOL)
        kth = np.sort(logits, -1)[:, -20]
        assert np.all(logits[np.arange(N), tokens] >= kth)       # drawn from the top 20


def test_mixed_length_batch_equals_each_row_alone(sample):
    """Per-row keys: a row's tokens depend on its own prompt and key only. Each row of the
    mixed-length batch equals the same row generated among copies of itself (same width, so
    the same compiled program; tests/sampling/test_sharded.py compares batches of 8 and 3)."""
    keys = jax.random.split(jax.random.key(5), len(PROMPTS))
    batch = sample(PROMPTS, keys)
    for b, prompt in enumerate(PROMPTS):
        alone = sample([prompt] * 3, jnp.stack([keys[b]] * 3))
        for copy in range(3):
            np.testing.assert_array_equal(row(batch, b)[0], row(alone, copy)[0])
            np.testing.assert_allclose(row(batch, b)[1], row(alone, copy)[1], atol=1e-5)


def test_seeds_reproduce_and_differ(sample):
    a = sample(PROMPTS, jax.random.key(7))
    b = sample(PROMPTS, jax.random.key(7))
    c = sample(PROMPTS, jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logprobs), np.asarray(b.logprobs))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # One key: rows get fold_in(key, row), so identical prompts still differ.
    twins = sample([PROMPTS[0], PROMPTS[0], PROMPTS[1]], jax.random.key(7))
    assert not np.array_equal(np.asarray(twins.tokens[0]), np.asarray(twins.tokens[1]))


def test_eos_stops_rows_and_pads(greedy):
    ref = np.asarray(greedy.tokens)
    eos = int(ref[0, 3])
    out = generate(decisive_variables(), tiny(), PROMPTS, max_new_tokens=N, eos_id=eos,
                   pad_id=-1)
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    for b in range(3):
        hits = np.flatnonzero(ref[b] == eos)
        n = int(hits[0]) + 1 if len(hits) else N
        assert int(out.lengths[b]) == n
        np.testing.assert_array_equal(tokens[b, :n], ref[b, :n])        # EOS kept
        assert np.all(tokens[b, n:] == -1) and np.all(logprobs[b, n:] == 0)
        np.testing.assert_allclose(logprobs[b, :n], np.asarray(greedy.logprobs[b, :n]))
    assert int(out.lengths[0]) <= 4


def test_top_k_top_p_truncation():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = np.asarray(sampling_probs(logits, 1.0, top_k=3))
    np.testing.assert_allclose(p[0], [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], rtol=1e-6)
    # top-p 0.7: 0.5 + 0.2 reaches 0.7, so two tokens stay; 0.71 needs a third.
    assert np.isfinite(np.asarray(sampling_logits(logits, 1.0, top_p=0.7))).sum() == 2
    assert np.isfinite(np.asarray(sampling_logits(logits, 1.0, top_p=0.71))).sum() == 3
    # top-p after top-k works on the renormalized top-k mass: 0.5/0.85 = 0.59 < 0.6.
    assert np.isfinite(np.asarray(sampling_logits(logits, 1.0, top_k=3, top_p=0.6))).sum() == 2
    # Temperature sharpens before truncation.
    cold = np.asarray(sampling_probs(logits, 0.5))[0]
    np.testing.assert_allclose(cold, np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
                               / np.sum(np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2), rtol=1e-6)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([[0, 3], []], {}, "prompt 1 is empty"),
    ([[0, 3], [0, 64]], {}, "token id 64 at position 1, outside the vocabulary"),
    ([[0, -1]], {}, "token id -1"),
    ([], {}, "no prompts"),
    ([[0, 1, 2, 3, 4, 5]], dict(max_len=12), "cache is too short: max_len=12"),
    ([[0] * 60], {}, "exceeds config.max_seq_len=64"),
    ([[0, 3]], dict(temperature=0.5), "pass rng"),
    ([[0, 3]], dict(top_k=0, temperature=1.0, rng=0), "top_k=0"),
    ([[0, 3]], dict(eos_id=99), "eos_id=99"),
    ([[0, 3]], dict(cache_kind="paged"), "cache_kind='paged'"),
    (np.zeros((2, 4), np.int32), dict(prompt_lengths=[4, 5]), "prompt_lengths\\[1\\] = 5"),
    ([0, 1, 2], {}, "list of id sequences"),
])
def test_errors_before_compiling(prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(decisive_variables(), tiny(), prompts, max_new_tokens=8, **kwargs)


def test_speculative_needs_mtp():
    with pytest.raises(ValueError, match="mtp_depth=0"):
        generate({}, tiny().replace(mtp_depth=0), [[0, 1]], max_new_tokens=4, speculative=True)


def test_padded_array_prompts_equal_list_prompts(greedy):
    ids = np.full((3, 11), 2, np.int32)
    for b, p in enumerate(PROMPTS):
        ids[b, :len(p)] = p
    out = generate(decisive_variables(), tiny(), ids, prompt_lengths=[len(p) for p in PROMPTS],
                   max_new_tokens=N)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))
