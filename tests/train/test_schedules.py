"""DeepSeek-V3's pretraining schedules (§4.2) as fractions of the run (`train.schedules`), in
the v3-671b run config, and the batch ramp's empty micro-batch slots in the train step.

The V3 numbers are checked against token counts computed here, independently of the schedule
code: a step's tokens are its micro-batches × 768 sequences × 4096 tokens. The schedule points
are fractions of the run, and the run's whole-step length is 14.8T tokens to within one step,
so a point such as "10T tokens" is read as 10/14.8 of the run's actual tokens.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import get_config as get_model_config
from deepseek_jax.configs.pretrain import get_config
from deepseek_jax.train import schedules
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import init_train_state, train_step

TOKENS = 14.8e12
PER_MICROBATCH = 768 * 4096


@pytest.fixture(scope="module")
def v3():
    config = get_config("v3-671b")
    plan = schedules.from_run_config(config)
    ks = np.array([plan.progress.microbatches(s) for s in range(config.train.steps)])
    tokens_before = np.concatenate([[0], np.cumsum(ks)]) * float(PER_MICROBATCH)   # [S + 1]
    return config, plan, ks, tokens_before


def _first_step_at(tokens_before, tokens):
    """The first step whose tokens-before reach `tokens` of V3's 14.8T, as a share of the run."""
    return int(np.searchsorted(tokens_before, tokens / TOKENS * tokens_before[-1], side="left"))


def test_v3_run_is_14_8t_tokens_with_the_batch_ramp(v3):
    config, plan, ks, tokens_before = v3
    assert config.model.rope_factor == 1.0                   # plain RoPE while pretraining
    assert (plan.slots, plan.microbatch_rows) == (20, 768) and plan.ramp
    assert ks[0] * 768 == 3072 and ks[-1] * 768 == 15360
    assert np.all(np.diff(ks) >= 0) and set(ks) == set(range(4, 21))
    # Whole run: 14.8T tokens up to the rounding of the step counts (< 0.01 %).
    assert tokens_before[-1] == pytest.approx(TOKENS, rel=1e-4)
    # The ramp ends at 469B tokens: each stage's step count is rounded by at most half a step
    # of ≤ 20 micro-batches, 16 stages → ≤ 160 micro-batches ≈ 5e8 tokens.
    ramp_end = tokens_before[int(np.argmax(ks == 20))]
    assert abs(ramp_end / tokens_before[-1] * TOKENS - 469e9) < 6e8
    # Linear in tokens: the batch halfway through the ramp is halfway between 3072 and 15360.
    mid = _first_step_at(tokens_before, 469e9 / 2)
    assert abs(ks[mid] * 768 - (3072 + 15360) / 2) <= 768


def test_v3_mtp_weight_and_bias_speed_schedules(v3):
    config, plan, ks, tokens_before = v3
    lam, gamma = plan.train.mtp_weight, plan.train.bias_update_rate
    at = lambda fn, s: float(jax.jit(fn)(jnp.int32(s)))
    switch = _first_step_at(tokens_before, 10e12)            # first step after 10T tokens
    assert at(lam, 0) == pytest.approx(0.3) and at(lam, switch - 1) == pytest.approx(0.3)
    assert at(lam, switch) == pytest.approx(0.1)
    assert at(lam, config.train.steps - 1) == pytest.approx(0.1)
    stop = _first_step_at(tokens_before, 14.3e12)            # the last 500B tokens
    assert at(gamma, 0) == pytest.approx(0.001) and at(gamma, stop - 1) == pytest.approx(0.001)
    assert at(gamma, stop) == 0.0 and at(gamma, config.train.steps - 1) == 0.0
    assert TOKENS - tokens_before[stop] == pytest.approx(500e9, rel=1e-3)


def _v3_lr_by_hand(step, tokens):
    """V3 §4.2 written from the text: 2K warm-up steps, 2.2e-4 until 10T, cosine to 2.2e-5 over
    4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B (`tokens` in V3's 14.8T)."""
    if step < 2000:
        return 2.2e-4 * step / 2000
    if tokens < 10e12:
        return 2.2e-4
    if tokens < 14.3e12:
        t = (tokens - 10e12) / 4.3e12
        return 2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5 * (1 + math.cos(math.pi * t))
    return 2.2e-5 if tokens < 14.3e12 + 333e9 else 7.3e-6


def test_v3_learning_rate_schedule(v3):
    config, plan, ks, tokens_before = v3
    lr = jax.jit(plan.learning_rate)
    S = config.train.steps
    probes = [0, 1, 1000, 1999, 2000, 2001, S // 3,
              _first_step_at(tokens_before, 10e12) - 1, _first_step_at(tokens_before, 10e12),
              _first_step_at(tokens_before, 12.15e12), _first_step_at(tokens_before, 14.3e12) - 1,
              _first_step_at(tokens_before, 14.3e12), _first_step_at(tokens_before, 14.633e12),
              S - 1]
    for s in probes:
        want = _v3_lr_by_hand(s, tokens_before[s] / tokens_before[-1] * TOKENS)
        # fp32 fractions of a 2.4e5-step run: the cosine argument is off by ≤ ~1e-7 of the
        # run, which moves the lr by ≤ 2e-4·π/2·1e-7/0.29 ≈ 1e-10; 1e-9 absolute covers it.
        assert float(lr(jnp.int32(s))) == pytest.approx(want, rel=1e-5, abs=1e-9), s
    # Halfway through the cosine: the mean of the two ends.
    mid = _first_step_at(tokens_before, 12.15e12)
    assert float(lr(jnp.int32(mid))) == pytest.approx((2.2e-4 + 2.2e-5) / 2, rel=1e-3)


def test_other_runs_keep_constant_weights():
    plan = schedules.from_run_config(get_config("small"))
    # small: V3's λ and α, and the small runs' faster γ, as constants
    assert not plan.ramp and plan.train.scheduled == ()
    assert plan.train == schedules.StepSettings(mtp_weight=0.3, balance_alpha=1e-4,
                                                bias_update_rate=0.01)
    assert plan.progress.microbatches(0) == 1


def test_progress_without_ramp_is_linear():
    p = schedules.make_progress(100, 4)
    assert float(p.fraction(25)) == pytest.approx(0.25) and p.microbatches(99) == 4
    with pytest.raises(ValueError, match="more than"):
        schedules.make_progress(10, 20, 1, 0.9)


# --- one compiled step for every batch size ----------------------------------------------------

def _tiny_batch(seed, rows=2, length=16):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(2, 60, (rows, length)).astype(np.int32)}


def test_empty_slots_are_skipped_and_the_step_compiles_once():
    config = get_model_config("tiny")
    tx = make_optimizer(1e-3)
    state = init_train_state(jax.random.key(0), config, tx)
    step = jax.jit(functools.partial(train_step, config=config, tx=tx, microbatches=3))
    parts = [_tiny_batch(i) for i in range(3)]
    plain1 = jax.jit(functools.partial(train_step, config=config, tx=tx))
    plain2 = jax.jit(functools.partial(train_step, config=config, tx=tx, microbatches=2))
    for k in (1, 2, 3):
        batch = {key: jnp.asarray(v)
                 for key, v in schedules.assemble_microbatches(parts[:k], 3).items()}
        _, got = step(state, batch)
        if k == 1:      # the same as a plain step on the one micro-batch
            _, want = plain1(state, {"tokens": jnp.asarray(parts[0]["tokens"])})
        elif k == 2:    # the same as accumulating the two filled micro-batches
            rows = schedules.assemble_microbatches(parts[:2], 2)
            _, want = plain2(state, {"tokens": jnp.asarray(rows["tokens"])})
        else:
            want = got
        # Same micro-batch computations in fp32, summed in another order: rounding only.
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{k} {key}")
    assert step._cache_size() == 1


def test_scheduled_mtp_weight_and_bias_speed_reach_the_step():
    config = get_model_config("tiny")
    tx = make_optimizer(1e-3)
    state = init_train_state(jax.random.key(0), config, tx)
    fraction = lambda s: jnp.asarray(s, jnp.float32) / 10
    sched = schedules.StepSettings(
        mtp_weight=schedules.piecewise_constant(((0, 0.3), (0.5, 0.1)), fraction),
        bias_update_rate=schedules.piecewise_constant(((0, 0.001), (0.5, 0.0)), fraction))
    batch = {"tokens": jnp.asarray(_tiny_batch(0)["tokens"])}
    for step_no, lam, gamma in ((4, 0.3, 0.001), (5, 0.1, 0.0)):
        s = state.replace(step=jnp.int32(step_no))
        new, m = train_step(s, batch, config=config, tx=tx, settings=sched)
        assert float(m["mtp_weight"]) == pytest.approx(lam)
        assert float(m["bias_update_rate"]) == pytest.approx(gamma)
        total = m["lm_loss"] + lam * m["mtp_loss"] + sched.balance_alpha * m["balance_loss"]
        np.testing.assert_allclose(m["loss"], total, rtol=1e-6)
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)),
                                             new.routing, s.routing))
        # Each bias moves by exactly γ (or by 0 at an expert sitting at the mean load).
        assert max(float(x) for x in moved) == pytest.approx(gamma)
