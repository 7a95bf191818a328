"""Groups of samples per prompt (`generate_groups`): shared prefill and continuous batching give
the tokens of `generate` on the repeated prompts with the same row keys.

Tolerances: tokens must match exactly (the test model's choices are decisive, and a sampled draw
is a function of its key and its logits, which agree to fp32 rounding). Log-probs may differ by
the fp32 rounding of matmuls over batches of other sizes (a prefill of P rows instead of P·G, a
decode step over M slots instead of P·G rows): a few ulps of logits of magnitude ~10, so we
allow 1e-5; against the trainer's full forward (a different summation order, as in
test_generate) 1e-4.
"""

import jax
import numpy as np
import pytest

from deepseek_jax import parallel as par
from deepseek_jax.sampling import generate, generate_groups, group_keys
from deepseek_jax.sampling import batching

from sampling_helpers import PROMPTS, aligned_variables, decisive_variables, tiny, trainer_logprobs

G, N = 4, 10
ROWS = len(PROMPTS) * G
REPEATED = [p for p in PROMPTS for _ in range(G)]
BUDGETS = np.random.default_rng(0).integers(1, N + 1, size=ROWS)   # mixed lengths


def reference(temperature, rng, **kw):
    """`generate` on each prompt repeated G times, with the group keys: today's path."""
    return generate(decisive_variables(), tiny(), REPEATED, max_new_tokens=N,
                    temperature=temperature, rng=group_keys(rng, len(PROMPTS), G), **kw)


def assert_same(got, ref, atol=1e-5):
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(ref.lengths))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=atol)
    np.testing.assert_array_equal(np.asarray(got.prompt_lengths),
                                  np.asarray(ref.prompt_lengths))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_equals_repeated_prefill(temperature):
    rng = jax.random.key(1)
    ref = reference(temperature, rng, top_p=0.9, row_max_new_tokens=BUDGETS)
    got = generate_groups(decisive_variables(), tiny(), PROMPTS, G, max_new_tokens=N,
                          temperature=temperature, top_p=0.9, rng=rng, schedule="static",
                          row_max_new_tokens=BUDGETS)
    assert_same(got, ref)
    assert int(got.steps) == int(ref.steps) == BUDGETS.max() - 1
    if temperature:       # samples of one prompt differ: each row has its own key
        assert len({tuple(np.asarray(got.tokens[b])) for b in range(G)}) > 1
    for b in (0, 5, ROWS - 1):       # and against the trainer's computation
        n = int(got.lengths[b])
        want, _ = trainer_logprobs(decisive_variables(), REPEATED[b],
                                   np.asarray(got.tokens[b, :n]), temperature or 1.0)
        np.testing.assert_allclose(np.asarray(got.logprobs[b, :n]), want, atol=1e-4)


@pytest.mark.parametrize("temperature,slots", [(0.0, 1), (1.0, 4), (1.0, ROWS)])
def test_continuous_equals_static(temperature, slots):
    rng = jax.random.key(2)
    ref = reference(temperature, rng, row_max_new_tokens=BUDGETS)
    kw = dict(max_new_tokens=N, temperature=temperature, rng=rng, row_max_new_tokens=BUDGETS)
    # Drain phases down to one slot (`min_phase_slots=1`: 4, 2, 1 and 12, 6, 3), so that the
    # moves between phases run at these sizes too (by default none is narrower than 8).
    got = generate_groups(decisive_variables(), tiny(), PROMPTS, G, schedule="continuous",
                          slots=slots, min_phase_slots=1, **kw)
    assert_same(got, ref)
    # One slot serves rows back to back: a step per token after each row's first (drawn at
    # the refill), and an idle step for a row that ends at its first token (budget 1).
    if slots == 1:
        assert int(got.steps) == int((BUDGETS - 1).sum() + (BUDGETS == 1).sum())
    if slots == ROWS:     # every row starts at once: the static schedule's steps
        assert int(got.steps) == int(ref.steps)


def test_drain_phases_halve_while_the_rows_fit_the_shards():
    assert batching.phase_widths(64) == [64, 32, 16, 8]  # MIN_PHASE_SLOTS = 8
    assert batching.phase_widths(64, floor=1) == [64, 32, 16, 8, 4, 2, 1]
    assert batching.phase_widths(12, floor=1) == [12, 6, 3]
    assert batching.phase_widths(12) == [12]
    assert batching.phase_widths(24, 8) == [24]          # 12 rows would not split over 8
    assert batching.phase_widths(32, 8, floor=1) == [32, 16, 8]
    assert batching.phase_widths(32, 8, floor=16) == [32, 16]


def test_eos_ends_a_row_and_pads_it():
    v, c = decisive_variables(), tiny()
    free = generate_groups(v, c, PROMPTS, G, max_new_tokens=N, slots=3)
    eos = int(free.tokens[G, 2])                       # prompt 1's third greedy token
    got = generate_groups(v, c, PROMPTS, G, max_new_tokens=N, slots=3, eos_id=eos, pad_id=-1)
    ref = reference(0.0, jax.random.key(0), eos_id=eos, pad_id=-1)
    assert_same(got, ref)
    for b in range(G, 2 * G):                          # greedy: all G samples stop there
        assert int(got.lengths[b]) <= 3 and int(got.tokens[b, got.lengths[b] - 1]) == eos
        assert np.all(np.asarray(got.tokens[b, got.lengths[b]:]) == -1)
        assert np.all(np.asarray(got.logprobs[b, got.lengths[b]:]) == 0.0)
    ends = np.asarray(got.tokens)[np.arange(ROWS), np.asarray(got.lengths) - 1]
    assert np.all((np.asarray(got.lengths) == N) | (ends == eos))


def test_max_length_and_budgets():
    got = generate_groups(decisive_variables(), tiny(), PROMPTS, G, max_new_tokens=N, slots=4,
                          row_max_new_tokens=BUDGETS)
    np.testing.assert_array_equal(np.asarray(got.lengths), BUDGETS)   # no EOS: every budget
    full = generate_groups(decisive_variables(), tiny(), PROMPTS, G, max_new_tokens=N, slots=4)
    np.testing.assert_array_equal(np.asarray(full.lengths), np.full(ROWS, N))


def test_cache_full_and_bad_settings_are_clear_errors():
    v, c = decisive_variables(), tiny()
    run = lambda **kw: generate_groups(v, c, PROMPTS, G, **{"max_new_tokens": N, **kw})
    with pytest.raises(ValueError, match=r"cache is too short: max_len=12 .* needs 18"):
        run(max_len=12)                                # longest prompt 8 + N = 18 slots
    with pytest.raises(ValueError, match="exceeds config.max_seq_len"):
        run(max_new_tokens=c.max_seq_len)
    with pytest.raises(ValueError, match=r"slots=13 must lie in \[1, P·G = 12\]"):
        run(slots=13)
    with pytest.raises(ValueError, match="schedule='paged'"):
        run(schedule="paged")
    with pytest.raises(ValueError, match="static schedule only"):
        run(speculative=True)
    with pytest.raises(ValueError, match=r"row_max_new_tokens\[0\] = 0"):
        run(row_max_new_tokens=np.zeros(ROWS, np.int64))
    with pytest.raises(ValueError, match="temperature=1.0 samples; pass rng"):
        run(temperature=1.0)


def test_one_compile_serves_every_setting():
    v, c = decisive_variables(), tiny()
    kw = dict(max_new_tokens=N, slots=5, rng=jax.random.key(0))
    generate_groups(v, c, PROMPTS, G, **kw)
    generate_groups(v, c, PROMPTS[::-1], G, temperature=0.5, top_k=7, eos_id=3,
                    row_max_new_tokens=BUDGETS, **kw)
    s = batching.Settings(max_new_tokens=N, speculative=False, cache_len=8 + N,
                          cache_kind="latent")
    run = batching.compiled(c, s, "continuous", G, 5, 1, batching.MIN_PHASE_SLOTS)
    assert run._cache_size() == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_shared_prefill_equals_repeated(temperature):
    v, c, rng = aligned_variables(), tiny(), jax.random.key(4)
    ref = generate(v, c, REPEATED, max_new_tokens=N, temperature=temperature, speculative=True,
                   rng=group_keys(rng, len(PROMPTS), G), row_max_new_tokens=BUDGETS)
    got = generate_groups(v, c, PROMPTS, G, max_new_tokens=N, temperature=temperature, rng=rng,
                          schedule="static", speculative=True, row_max_new_tokens=BUDGETS)
    assert_same(got, ref)
    np.testing.assert_array_equal(np.asarray(got.accepted), np.asarray(ref.accepted))
    assert int(np.sum(np.asarray(got.accepted))) > 0
    if not temperature:   # greedy speculative = greedy plain
        plain = generate_groups(v, c, PROMPTS, G, max_new_tokens=N, schedule="static",
                                row_max_new_tokens=BUDGETS)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(plain.tokens))


def test_continuous_on_the_dp_mesh_equals_unsharded():
    assert len(jax.devices()) == 8
    mesh, rules = par.mesh_and_rules("dp")
    v, c, rng = decisive_variables(), tiny(), jax.random.key(5)
    kw = dict(max_new_tokens=N, temperature=1.0, rng=rng, row_max_new_tokens=BUDGETS)
    got = generate_groups(v, c, PROMPTS, G, slots=8, mesh=mesh, rules=rules, **kw)
    assert_same(got, generate_groups(v, c, PROMPTS, G, slots=8, **kw))
    with pytest.raises(ValueError, match="slots = 4 rows decoded at once must divide by the 8"):
        generate_groups(v, c, PROMPTS, G, slots=4, mesh=mesh, rules=rules, **kw)


def test_continuous_on_the_expert_parallel_mesh_equals_unsharded():
    """fsdp_ep (fsdp 2 × expert 4): the shared prefill's few prompts do not fill the 8 batch
    shards that the MoE's expert-parallel exchange needs, so it runs on padding rows and keeps
    the real ones (before, it failed in the routing's shard_map)."""
    mesh, rules = par.mesh_and_rules("fsdp_ep")
    assert len(PROMPTS) % 8
    v, c, rng = decisive_variables(), tiny(), jax.random.key(7)
    kw = dict(max_new_tokens=N, temperature=1.0, rng=rng, row_max_new_tokens=BUDGETS)
    got = generate_groups(v, c, PROMPTS, G, slots=8, mesh=mesh, rules=rules, **kw)
    assert_same(got, generate_groups(v, c, PROMPTS, G, slots=8, **kw))


def test_static_on_the_fsdp_mesh_equals_unsharded():
    mesh, rules = par.mesh_and_rules("fsdp")
    v, c = decisive_variables(), tiny()
    kw = dict(max_new_tokens=N, schedule="static", temperature=1.0, rng=jax.random.key(6))
    got = generate_groups(v, c, PROMPTS, 8, mesh=mesh, rules=rules, **kw)     # 24 rows
    assert_same(got, generate_groups(v, c, PROMPTS, 8, **kw))
