"""Train step on the tiny model: loss falls on a repeated batch, the routing bias stays out of
the optimizer and moves against the load, and the loss parts are the ones documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.model import Transformer
from deepseek_jax.train import losses
from deepseek_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from deepseek_jax.train.schedules import StepSettings
from deepseek_jax.train.step import init_train_state, loss_and_grads, routing_loads, train_step
from numerics import assert_leaves_close_in_norm, gradient_rtol


SETTINGS = StepSettings(bias_update_rate=0.001)


@pytest.fixture(scope="module")
def run():
    c = get_config("tiny")
    tx = make_optimizer(3e-3)
    state0 = init_train_state(jax.random.key(0), c, tx)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, c.vocab_size)
    step = jax.jit(lambda s, b: train_step(s, b, config=c, tx=tx, settings=SETTINGS))
    history, states, state = [], [], state0
    for _ in range(8):
        state, m = step(state, {"tokens": tokens})
        history.append(jax.device_get(m))
        states.append(state)
    return c, state0, state, history, tokens, states[0]


def test_loss_falls_on_repeated_batch(run):
    history = run[3]
    losses_ = [m["lm_loss"] for m in history]
    assert losses_[-1] < losses_[0] - 0.5, losses_
    assert all(np.isfinite(m["loss"]) for m in history)


def test_bias_not_in_optimizer_state(run):
    c, state0, state, *_ = run
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
    assert paths and not any("bias" in p for p in paths)
    assert not any("bias" in jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_leaves_with_path(state.params))


def test_bias_moves_by_gamma_per_step(run):
    """Each step moves every bias by exactly ±γ (or 0 at the mean load): after 8 steps each bias
    is a multiple of γ with |b| ≤ 8γ, and the biases are not all zero."""
    c, state0, state, *_ = run
    b = state.routing["moe_layers"]["layers"]["moe"]["bias"]
    k = np.asarray(b) / SETTINGS.bias_update_rate
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert np.max(np.abs(k)) <= 8 + 1e-3 and np.any(k != 0)


def test_bias_update_direction_from_loads(run):
    """One step from fresh state: overloaded experts go down, underloaded go up."""
    c, state0, _, _, tokens, new = run
    variables = {"params": state0.params, "routing": state0.routing}
    _, aux = jax.jit(lambda v, t: Transformer(c).apply(v, t, mutable=["moe_stats"]))(
        variables, tokens)
    loads = routing_loads(aux["moe_stats"], state0.routing)
    for load, b in zip(jax.tree.leaves(loads), jax.tree.leaves(new.routing)):
        mean = load.mean(-1, keepdims=True)
        expect = SETTINGS.bias_update_rate * np.sign(mean - load)
        np.testing.assert_allclose(np.asarray(b), np.asarray(expect), atol=1e-7)


def test_weight_decay_mask():
    params = {"attn_norm": {"scale": 1}, "attn": {"w_dq": 1}, "embed": 1}
    assert decay_mask(params) == {"attn_norm": {"scale": False}, "attn": {"w_dq": True},
                                  "embed": True}


def test_mtp_targets():
    """Depth-k MTP logits at position i are scored against t_{i+k+1}; the main logits against
    t_{i+1}; positions whose target is past the end carry no weight."""
    tokens = jnp.array([[10, 11, 12, 13, 14]])
    valid = jnp.ones_like(tokens)
    t1, w1 = losses.shifted_targets(tokens, valid, 1)
    t2, w2 = losses.shifted_targets(tokens, valid, 2)
    np.testing.assert_array_equal(t1, [[11, 12, 13, 14, 0]])
    np.testing.assert_array_equal(w1, [[1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(t2, [[12, 13, 14, 0, 0]])
    np.testing.assert_array_equal(w2, [[1, 1, 1, 0, 0]])
    # One-hot logits that put all mass on t_{i+2} give zero MTP loss for depth 1.
    V = 16
    perfect = jax.nn.one_hot(t2, V) * 100.0
    assert float(losses.mtp_loss(perfect[None], tokens, valid)) < 1e-3
    assert float(losses.lm_loss(perfect, tokens, valid)) > 10


def test_schedule_shapes():
    s = learning_rate_schedule(1.0, 10, 100)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
    assert float(s(100)) == pytest.approx(0.1, rel=1e-3)
    st = learning_rate_schedule(1.0, 10, 100, kind="step")
    assert float(st(50)) == pytest.approx(1.0)
    assert float(st(85)) == pytest.approx(0.316)
    assert float(st(95)) == pytest.approx(0.316 ** 2)


def test_gradient_accumulation_matches_full_batch(run):
    """Two strided micro-batches of 2 rows give the same update as one batch of 4 (all targets
    valid, so the mean of micro-batch means is the batch mean; fp32 sums in another order)."""
    c, state0, _, _, tokens, first = run
    tx = make_optimizer(3e-3)
    acc, m = jax.jit(lambda s, b: train_step(s, b, config=c, tx=tx, microbatches=2))(
        state0, {"tokens": tokens})
    # Parameters after one Adam step are not compared: m/(√v + ε) turns fp32 reordering noise
    # in a ~1e-9 gradient into a visible fraction of lr (tests/numerics.py). The gradients are
    # compared instead. The loss is a mean of positive per-token terms over B·T = 64 tokens and
    # V = 64 logits each: 2·γ(128) ≈ 1.5e-5. Each gradient leaf, in norm: a sum over the 64
    # tokens with κ ≤ 20 (as in tests/parallel/test_sharded_parity.py): 2·γ(64)·20 ≈ 1.5e-4.
    loss_rtol = gradient_rtol(4 * 16 + c.vocab_size, 1.0)
    assert float(m["loss"]) == pytest.approx(float(run[3][0]["loss"]), rel=loss_rtol)
    g1 = jax.jit(lambda p: loss_and_grads(p, state0.routing, {"tokens": tokens}, c, 1))(
        state0.params)
    g2 = jax.jit(lambda p: loss_and_grads(p, state0.routing, {"tokens": tokens}, c, 2))(
        state0.params)
    np.testing.assert_allclose(float(g1[0]), float(g2[0]), rtol=loss_rtol)
    assert_leaves_close_in_norm(g2[3], g1[3], gradient_rtol(4 * 16, 20.0))
    # Routing from the same parameters: only a top-k tie within forward rounding could differ.
    for a, b in zip(jax.tree.leaves(acc.routing), jax.tree.leaves(first.routing)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
