"""One GRPO update on one device and sharded (data-parallel over 2 devices, and the v3 recipe's
fsdp_ep preset over 8): the same loss and the same gradient, up to fp32 summation order.

The gradient is read from the optimizer state (`numerics.record_gradient` chained before the
optimizer), so the compiled step is the real `grpo_step` under the run's shardings. Parameters
after an AdamW update are not compared: see `tests/numerics.py` for why no tolerance below 2·lr
is derivable for them.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import parallel
from deepseek_jax.model import init_variables
from deepseek_jax.rl.step import grpo_step, target_logprobs
from deepseek_jax.train.step import TrainState
from deepseek_jax.train import sharded
from numerics import assert_leaves_close_in_norm, gradient_rtol, record_gradient

ROWS, LENGTH, PROMPT = 16, 24, 6
STEP = dict(temperature=1.0, eps_low=0.2, eps_high=0.2, beta=0.04,
            aggregation="seq_mean_token_mean", max_len=LENGTH - PROMPT)


def _inputs(tiny):
    params = flax.core.meta.unbox(init_variables(jax.random.key(0), tiny))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, tiny.vocab_size, (ROWS, LENGTH)).astype(np.int32)
    mask = np.zeros((ROWS, LENGTH), np.float32)
    for i, n in enumerate(rng.integers(3, LENGTH - PROMPT, ROWS)):   # ragged completions
        mask[i, PROMPT - 1: PROMPT - 1 + n] = 1.0
        tokens[i, PROMPT + n:] = 0                                     # right padding
    logp = np.asarray(jax.jit(lambda p, t: target_logprobs(p["params"], p["routing"], t, tiny,
                                                           1.0)[0])(params, tokens))
    # Old log-probs shifted by ±0.5 or 0.05: ratios e^±0.5 clip, e^0.05 does not, each far from
    # the clip edges (0.8, 1.2) compared with rounding, so no clip decision depends on the device
    # count. The reference is 0.1 away, so the KL term has a gradient too.
    shift = rng.choice([-0.5, 0.05, 0.5], (ROWS, LENGTH)).astype(np.float32)
    batch = {"tokens": tokens, "mask": mask,
             # Advantages of one sign do not cancel across rows (GRPO's group-centred ones
             # would): the gradient is a well-conditioned sum whose rounding can be bounded.
             "advantages": rng.uniform(0.5, 1.5, ROWS).astype(np.float32),
             "old_logp": logp + shift, "ref_logp": logp - 0.1}
    return params, batch


@pytest.fixture(scope="module")
def inputs(tiny):
    return _inputs(tiny)


def _step(config, params, batch, preset, devices):
    mesh = parallel.make_mesh(parallel.default_mesh_config(preset, len(devices)), devices)
    rules = parallel.logical_axis_rules(preset, mesh)
    tx = optax.chain(record_gradient(), optax.adamw(1e-3))
    shardings = sharded.state_shardings(config, mesh, rules, tx)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params["params"],
                       opt_state=tx.init(params["params"]), routing=params["routing"])
    state = jax.device_put(state, shardings)
    rows = parallel.batch_sharding(mesh, rules)
    batch = {k: jax.device_put(v, rows if v.ndim == 2 else
                               jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                                   *rows.spec[:1])))
             for k, v in batch.items()}
    with parallel.sharding_context(mesh, rules):
        update = jax.jit(functools.partial(grpo_step, config=config, tx=tx, **STEP),
                         in_shardings=(shardings, None), out_shardings=(shardings, None))
        new, metrics = update(state, batch)
    return jax.device_get(new.opt_state[0]), jax.device_get(metrics)


@pytest.fixture(scope="module")
def one_device(tiny, inputs):
    return _step(tiny, *inputs, "dp", jax.devices()[:1])


@pytest.mark.parametrize("preset, n", [("dp", 2), ("fsdp_ep", 8)])
def test_sharded_update_has_the_one_device_gradient(tiny, inputs, one_device, preset, n):
    grads_one, m_one = one_device
    grads, m = _step(tiny, *inputs, preset, jax.devices()[:n])
    assert bool(m["finite"]) and bool(m_one["finite"])
    # Every term of the loss is a positive-weight sum of per-token values, so the loss, the KL
    # and the entropy are sums with κ ≈ 1 over B·T = 384 positions (plus the V = 64 terms inside
    # each log-softmax): 2·γ(448) ≈ 5.3e-5 relative at worst.
    rtol = gradient_rtol(ROWS * LENGTH + tiny.vocab_size, 1.0)
    for key in ("loss", "kl", "entropy", "ratio_mean"):
        np.testing.assert_allclose(m[key], m_one[key], rtol=rtol, err_msg=key)
    for key in ("clip_low_frac", "clip_high_frac"):
        assert m[key] == m_one[key], key            # no ratio is near a clip edge
    assert m_one["clip_high_frac"] > 0              # (clip_low needs a negative advantage)
    # The gradient of each parameter is a sum over the B·T = 384 positions, in an order that
    # changes with the device count. Its condition number ‖Σ|g_i|‖/‖Σ g_i‖, measured over the 16
    # rows' separate gradients, is at most 3.4 for every leaf with these inputs; allowing
    # cancellation inside a row as well, κ ≤ 20 gives 2·γ(384)·20 ≈ 9e-4. Observed: ≤ 1e-6. A
    # missing all-reduce or a per-device mean would be off by 50-100 %.
    worst = assert_leaves_close_in_norm(grads, grads_one, gradient_rtol(ROWS * LENGTH, 20.0),
                                        f"{preset}: ")
    print(f"{preset}: largest relative gradient difference {worst:.2g}")
