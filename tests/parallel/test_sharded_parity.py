"""The key check: the same 3-step run of the tiny model under every preset on 8 fake devices
matches the run on a 1-device mesh, and the state really is laid out as the preset says. Under
the pipeline presets the model runs its MoE stack as 2 pipeline stages (`model/pipeline.py`)
against the unpipelined reference: the same sums over the same tokens, in another order.

The run uses SGD with momentum, not AdamW, and compares gradients: sharding changes only the order
of fp32 reductions, whose effect on a gradient is bounded (tests/numerics.py), and under SGD two
runs' parameters differ by lr times their gradients' difference. After an AdamW step no tolerance
below 2·lr is derivable (an entry with a near-zero gradient moves by lr·g/(|g| + ε)), so Adam's own
arithmetic, elementwise and the same under every layout, is left to the optimizer tests; its
state's layout is checked here through the momentum buffer, laid out like the parameters.

Tolerances, from 2·γ(n)·κ (tests/numerics.py), B·T = 128 tokens:
  - losses: means of positive per-token terms (κ = 1) over 128 tokens and the V = 64 logits of
    each softmax: 2·γ(192) ≈ 2.3e-5 relative. The parameters of steps 2 and 3 differ by
    lr·(gradient rounding), which moves a loss only at second order.
  - gradients, each leaf in norm: κ ≤ 2.9 measured over the 8 rows' separate gradients, taken as
    κ ≤ 20 to allow cancellation inside a row: 2·γ(128)·20 ≈ 3e-4. Observed ≤ 1e-6.
  - parameters after 3 steps: ‖Δp‖ ≤ lr·Σ_k c_k·rtol·‖g_k‖, with c_k the weight momentum gives
    step k's gradient by step 3 (1 + β + β², 1 + β, 1).
  - routing bias: the update moves each entry by ±γ from integer expert loads, so it agrees to
    float rounding (atol 1e-7) unless a token's X-th and (X+1)-th expert scores lie within the
    scores' rounding (~3e-8) of each other under one layout and not the other. With SGD the two
    runs' router weights differ by lr·(gradient rounding) ≈ 1e-10, so that is the only way; for
    the 128 tokens × 2 MoE layers, scores ~0.5 ± 0.03 and 8 experts, the chance is about 1e-3
    per preset, and the failure would show as one layer's bias off by γ.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel as par
from deepseek_jax.train.step import init_train_state
from deepseek_jax.train import sharded
from numerics import assert_leaves_close_in_norm, gradient_rtol, record_gradient

STEPS, LR, MOMENTUM, TOKENS = 3, 0.5, 0.9, 8 * 16
LOSS_RTOL = gradient_rtol(TOKENS + 64, 1.0)
GRAD_RTOL = gradient_rtol(TOKENS, 20.0)
W_GATE = {"dp": P(None, None, None, None), "fsdp": P(None, None, "fsdp", None),
          "fsdp_tp": P(None, None, "fsdp", "tensor"), "fsdp_ep": P(None, "expert", "fsdp", None),
          "dp_ep_tp": P(None, "expert", None, "tensor"),
          "fsdp_cp": P(None, None, ("fsdp", "context"), None),
          "fsdp_ep_cp": P(None, "expert", ("fsdp", "context"), None),
          # pipelines: the MoE stack's layer axis split into the 2 stages
          "fsdp_pp": P("stage", None, "fsdp", None),
          "fsdp_ep_pp": P("stage", "expert", "fsdp", None)}


@pytest.fixture(scope="module")
def setup(tiny):
    tx = optax.chain(record_gradient(), optax.sgd(LR, momentum=MOMENTUM))
    host_state = jax.device_get(init_train_state(jax.random.key(0), tiny, tx))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, tiny.vocab_size))
    return tx, host_state, {"tokens": tokens}


def _run(config, tx, state, batch, preset, devices):
    mesh = par.make_mesh(par.default_mesh_config(preset, len(devices)), devices)
    rules = par.logical_axis_rules(preset, mesh)
    step = sharded.make_sharded_train_step(config, tx, mesh, rules)
    if isinstance(state.step, np.ndarray):                 # host copy: place it
        state = jax.device_put(state, step.shardings)
    losses, grads, routing = [], [], []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        grads.append(jax.device_get(state.opt_state[0]))
        routing.append(jax.device_get(state.routing))
    return np.array(losses), grads, routing, state, step


@pytest.fixture(scope="module")
def reference(tiny, setup):
    tx, host_state, batch = setup
    losses, grads, routing, state, _ = _run(tiny, tx, host_state, batch, "dp",
                                            jax.devices()[:1])
    return losses, grads, routing, jax.device_get(state)


@pytest.mark.parametrize("preset", list(W_GATE))
def test_same_run_under_every_preset(tiny, setup, reference, preset):
    tx, host_state, batch = setup
    ref_losses, ref_grads, ref_routing, ref_state = reference
    if preset == "fsdp_ep":
        # Born sharded: init_sharded_state gives the same values as the unsharded init.
        mesh = par.make_mesh(par.default_mesh_config(preset, 8))
        state = sharded.init_sharded_state(jax.random.key(0), tiny, tx, mesh,
                                       par.logical_axis_rules(preset, mesh))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                     state, host_state)
    else:
        state = host_state
    config = tiny
    if "pp" in preset:      # 2 stages of the MoE stack; 2 micro-batches of 4 rows, 1 per rank
        config = tiny.replace(pipeline_stages=2, pipeline_microbatches=2)
    losses, grads, routing, state, step = _run(config, tx, state, batch, preset, jax.devices())

    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    assert losses[-1] < losses[0]
    worst = 0.0
    for k in range(STEPS):
        worst = max(worst, assert_leaves_close_in_norm(grads[k], ref_grads[k], GRAD_RTOL,
                                                       f"step {k + 1} grad "))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
                     routing[k], ref_routing[k])
    got = jax.device_get(state)
    # Step k's gradient enters the step-3 parameters with weight c_k = Σ_{j<STEPS-k} β^j.
    weights = [sum(MOMENTUM ** j for j in range(STEPS - k)) for k in range(STEPS)]
    for (path, a), b, *gs in zip(jax.tree_util.tree_leaves_with_path(got.params),
                                 jax.tree.leaves(ref_state.params),
                                 *[jax.tree.leaves(g) for g in ref_grads]):
        bound = LR * GRAD_RTOL * sum(c * np.linalg.norm(g) for c, g in zip(weights, gs))
        diff = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        # (+ 1 ulp of the parameters per step: SGD's p − lr·u rounds)
        assert diff <= bound + STEPS * np.linalg.norm(b) * 2 ** -23, (
            jax.tree_util.keystr(path), diff, bound)
    assert int(got.step) == STEPS
    print(f"{preset}: largest relative gradient difference {worst:.2g}, losses "
          f"{np.abs(losses / ref_losses - 1).max():.2g}")

    # The layout is the preset's, not silently replicated.
    assert jax.tree.map(lambda a: a.sharding.spec, state) == \
        jax.tree.map(lambda s: s.spec, step.shardings)
    w_gate = state.params["moe_layers"]["layers"]["moe"]["w_gate"]
    assert w_gate.sharding.spec == W_GATE[preset]
    assert len(w_gate.sharding.device_set) == 8
    shard = w_gate.addressable_shards[0].data.shape
    if preset == "dp":
        assert shard == w_gate.shape
    else:
        assert np.prod(shard) < np.prod(w_gate.shape)
