"""Training with LoRA adapters: only the adapters learn, their gradients follow the chain rule
through W' = W + s·A·B, and a sharded step matches the one-device step."""

import flax
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import parallel as par
from deepseek_jax.model import adapters, init_variables
from deepseek_jax.train import sharded
from deepseek_jax.train.step import init_train_state, loss_and_grads, train_step
from numerics import assert_leaves_close_in_norm, gradient_rtol, record_gradient

B, T = 8, 16


@pytest.fixture(scope="module")
def lora(tiny):
    return tiny.replace(adapter_rank=4, adapter_alpha=8.0,
                        adapter_targets=("attention", "mlp", "experts"))


@pytest.fixture(scope="module")
def batch(tiny):
    return {"tokens": jax.random.randint(jax.random.key(1), (B, T), 0, tiny.vocab_size)}


def _with_b(params):
    """B drawn (it starts at 0, where dA = 0 and the chain rule below would check nothing)."""
    flat = tu.flatten_dict(params)
    keys = jax.random.split(jax.random.key(3), len(flat))
    return tu.unflatten_dict({
        k: 0.05 * jax.random.normal(key, v.shape, v.dtype) if k[-1].endswith("_lora_b") else v
        for key, (k, v) in zip(keys, flat.items())})


def test_adapter_gradients_follow_the_chain_rule(lora, batch):
    """dA = s·dW'·Bᵀ and dB = s·Aᵀ·dW', with dW' the plain model's gradient at the merged
    weights, evaluated in float64. The adapter model takes A's and B's gradients as sums over
    the B·T tokens (x·A·B beside each projection) or through dW' (W_UK, W_UV, the experts); the
    reference contracts dW', itself a sum over the tokens, over W's other side (≤ ~100 terms):
    two fp32 sums in other orders, gradient_rtol(B·T, κ) + gradient_rtol(100, κ) with κ ≤ 20
    for gradients of random-input losses, as in the sharded-parity tests."""
    variables = flax.core.meta.unbox(init_variables(jax.random.key(0), lora))
    params, routing = _with_b(variables["params"]), variables.get("routing", {})
    _, _, _, grads = loss_and_grads(params, routing, batch, lora)
    plain = adapters.plain(lora)
    _, _, _, d_merged = loss_and_grads(adapters.merge(params, lora), routing, batch, plain)

    got, flat, dw = tu.flatten_dict(grads), tu.flatten_dict(params), tu.flatten_dict(d_merged)
    assert set(got) == {k for k in flat if adapters.is_adapter(k)}        # adapters only
    s, r = lora.adapter_alpha / lora.adapter_rank, lora.adapter_rank
    want = {}
    for key in got:
        if not key[-1].endswith("_lora_a"):
            continue
        base = key[-1][:-len("_lora_a")]
        w_key, b_key = (*key[:-1], base), (*key[:-1], base + "_lora_b")
        a = np.asarray(flat[key], np.float64)
        b = np.asarray(flat[b_key], np.float64)
        g = np.asarray(dw[w_key], np.float64)                              # [*lead, *in, *out]
        lead = a.ndim + b.ndim - 2 - g.ndim
        a2, b2 = a.reshape(*a.shape[:lead], -1, r), b.reshape(*b.shape[:lead], r, -1)
        g2 = g.reshape(*g.shape[:lead], a2.shape[-2], b2.shape[-1])          # [*lead, in, out]
        want[key] = (s * g2 @ np.swapaxes(b2, -1, -2)).reshape(a.shape)
        want[b_key] = (s * np.swapaxes(a2, -1, -2) @ g2).reshape(b.shape)
    worst = assert_leaves_close_in_norm(tu.unflatten_dict(got), tu.unflatten_dict(want),
                                        gradient_rtol(100, 20.0) + gradient_rtol(B * T, 20.0))
    print(f"largest relative difference from the chain rule: {worst:.2g}")


def test_a_step_moves_the_adapters_only(lora, batch):
    tx = optax.adamw(1e-2, weight_decay=0.1)
    state = init_train_state(jax.random.key(0), lora, tx, batch=1, length=T)
    trained, frozen = adapters.split(state.params, lora)
    # The optimizer holds moments for the adapters alone.
    n_trained = sum(x.size for x in jax.tree.leaves(trained))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert n_opt == 2 * n_trained
    assert n_trained < sum(x.size for x in jax.tree.leaves(frozen))
    new, metrics = jax.jit(lambda s, b: train_step(s, b, config=lora, tx=tx))(state, batch)
    new_trained, new_frozen = adapters.split(new.params, lora)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 new_frozen, frozen)
    moved = [np.any(np.asarray(a) != np.asarray(b)) for a, b in
             zip(jax.tree.leaves(new_trained), jax.tree.leaves(trained))]
    assert all(moved)            # B from its gradient; A from weight decay (dA = 0 at B = 0)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


@pytest.mark.parametrize("preset", ["fsdp_ep"])
def test_sharded_adapter_step_matches_one_device(lora, batch, preset):
    """Two SGD steps under a preset on 8 devices against 1 device: the same adapter gradients
    (to the sharded-parity tests' tolerance), frozen weights untouched, and A/B sharded like
    their weight's inputs/outputs."""
    tx = optax.chain(record_gradient(), optax.sgd(0.5))
    host = jax.device_get(init_train_state(jax.random.key(0), lora, tx, batch=1, length=T))
    host = jax.device_get(host.replace(params=_with_b(host.params)))     # host copies: donated
    host_batch = jax.device_get(batch)
    runs = {}
    for name, devices in (("one", jax.devices()[:1]), (preset, jax.devices())):
        p = "dp" if name == "one" else preset
        mesh = par.make_mesh(par.default_mesh_config(p, len(devices)), devices)
        step = sharded.make_sharded_train_step(lora, tx, mesh, par.logical_axis_rules(p, mesh))
        state = jax.device_put(host, step.shardings)
        grads = []
        for _ in range(2):
            state, _ = step(state, host_batch)
            grads.append(jax.device_get(state.opt_state[0]))
        runs[name] = (grads, state)
    for k in range(2):
        assert_leaves_close_in_norm(runs[preset][0][k], runs["one"][0][k],
                                    gradient_rtol(B * T, 20.0), f"step {k + 1} ")
    state = runs[preset][1]
    frozen = adapters.split(jax.device_get(state.params), lora)[1]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), frozen,
                 adapters.split(host.params, lora)[1])
    attn = state.params["moe_layers"]["layers"]["attn"]
    w, a, b = attn["w_o"], attn["w_o_lora_a"], attn["w_o_lora_b"]       # [L, N, U, D]
    assert tuple(a.sharding.spec)[:3] == tuple(w.sharding.spec)[:3]
    assert tuple(b.sharding.spec)[2:] == tuple(w.sharding.spec)[3:]


def test_rollouts_sample_the_merged_model(lora):
    """GRPO's sampler runs the plain model on W + s·A·B merged once (`policy.sampled_model`),
    laid out like the frozen weights; its tokens' log-probs are the adapter model's (the
    trainer's) to fp32 rounding of two programs (the gap GRPO logs, bounded there by 1e-4)."""
    from deepseek_jax.rl import policy
    from deepseek_jax.rl.step import target_logprobs
    from deepseek_jax.sampling import generate
    mesh = par.make_mesh(par.default_mesh_config("fsdp", 8))
    rules = par.logical_axis_rules("fsdp", mesh)
    shardings = sharded.state_shardings(lora, mesh, rules, optax.sgd(0.1))
    variables = flax.core.meta.unbox(init_variables(jax.random.key(0), lora))
    params = jax.device_put(_with_b(variables["params"]), shardings.params)
    config, weights = policy.sampled_model(lora, shardings)
    assert config == adapters.plain(lora)
    merged = weights(params)
    jax.tree.map(lambda a, s: assert_same_sharding(a, s), merged,
                 adapters.split(shardings.params, lora)[1])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 merged, jax.jit(lambda p: adapters.merge(p, lora))(params))
    routing = variables.get("routing", {})
    prompt = jax.random.randint(jax.random.key(4), (2, 6), 0, lora.vocab_size)
    out = generate({"params": merged, "routing": routing}, config, prompt, max_new_tokens=6,
                   rng=jax.random.key(5), temperature=1.0)
    tokens = jnp.concatenate([prompt, jnp.asarray(out.tokens)], axis=1)         # [2, 12]
    # Position i scores token i + 1: the generated tokens are scored at positions 5..10.
    want = np.asarray(target_logprobs(jax.device_get(params), routing, tokens, lora,
                                      1.0)[0])[:, 5:-1]
    gap = np.max(np.abs(np.asarray(out.logprobs) - want))
    assert gap < 1e-4, gap
    # The adapters matter here: the frozen base alone gives other log-probs.
    base = np.asarray(target_logprobs(adapters.split(jax.device_get(params), lora)[1],
                                      routing, tokens, config, 1.0)[0])[:, 5:-1]
    assert np.max(np.abs(base - want)) > 1e-3


def assert_same_sharding(a, s):
    assert a.sharding.spec == s.spec, (a.sharding.spec, s.spec)
