"""Tests for `deepseek_jax.model.moe`: gate math, balancing statistics, dispatch parity, module.

Sizes are tiny and everything runs in fp32 on CPU. Hand-computed cases use scores that are
exact in the comments; an independent per-token NumPy gate (`_np_gate`, a plain Python loop
written from spec §3) checks the vectorised gate on random inputs.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.model import dispatch, moe, routing

# fp32 tolerance for values that go through exp/log (logit -> sigmoid round trip, softmax):
# a few ulps of numbers of order 1 (fp32 ulp at 1.0 is 1.2e-7).
_GATE_TOL = 1e-6
# Dense vs ragged dispatch in fp32 on CPU: both compute the same products, only the summation
# order differs (dense sums over all E experts with exact zeros, ragged sums over X slots and
# scatters). Values are O(1) sums of at most D·F = 64 terms, so the difference is a few
# ulps × terms; 1e-5 absolute/relative is well above that and far below any real bug (O(1e-1)).
_DISPATCH_TOL = 1e-5


# Jitted once per config: eager op-by-op dispatch is slower than compiling these tiny graphs.
_gate = jax.jit(routing.gate, static_argnums=2)


def _randn(seed, shape):
    """Standard-normal fp32 test data from NumPy (jax.random compiles a kernel per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _config(**overrides):
    """The tiny config in fp32 with MoE fields overridden (E=8, G=4, keep 2, X=2 by default)."""
    return get_config("tiny", **overrides)


def _logit(p):
    """Inverse sigmoid, so that the gate's sigmoid gives back chosen scores."""
    p = np.asarray(p, np.float64)
    return np.log(p / (1.0 - p)).astype(np.float32)


def _np_gate(logits, bias, c, fill=-np.inf):
    """Per-token reference gate written from spec §3 with Python loops.

    `fill` is the value given to experts of dropped groups: -inf (DeepSeek) or 0.0 (HF).
    """
    logits = np.asarray(logits, np.float64)
    E, X, G = c.n_routed_experts, c.n_experts_per_token, c.n_expert_groups
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, E)
    all_w, all_i = [], []
    for row in flat:
        if c.score_func == "sigmoid":
            s = 1.0 / (1.0 + np.exp(-row))
        else:
            s = np.exp(row - row.max())
            s = s / s.sum()
        sel = s + (np.asarray(bias, np.float64) if bias is not None else 0.0)
        if G > 1:
            per = E // G
            group_scores = []
            for g in range(G):
                members = sorted(sel[g * per:(g + 1) * per], reverse=True)
                group_scores.append(sum(members[:2]) if c.group_score == "top2_sum"
                                    else members[0])
            kept = sorted(range(G), key=lambda g: -group_scores[g])[:c.n_limited_groups]
            sel = np.array([sel[e] if e // per in kept else fill for e in range(E)])
        chosen = sorted(range(E), key=lambda e: -sel[e])[:X]
        w = np.array([s[e] for e in chosen])
        if c.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        all_w.append(w * c.routed_scaling_factor)
        all_i.append(chosen)
    return (np.array(all_w).reshape(*lead, X), np.array(all_i).reshape(*lead, X))


# ---------------------------------------------------------------------------------------------
# gate
# ---------------------------------------------------------------------------------------------

def test_gate_v3_hand_computed():
    # E=8 in G=4 groups of 2 (g0={0,1}, g1={2,3}, g2={4,5}, g3={6,7}); keep 2 groups; X=2;
    # sigmoid; renormalise; ×2.5.
    c = _config(routed_scaling_factor=2.5)
    s = np.array([0.9, 0.1, 0.6, 0.5, 0.3, 0.2, 0.8, 0.7])
    b = np.array([-0.6, -0.1, -0.1, -0.1, -0.1, -0.1, -0.2, -0.25], np.float32)
    # biased s+b = [0.3, 0.0, 0.5, 0.4, 0.2, 0.1, 0.6, 0.45]
    # group scores (sum of top-2): g0 0.3, g1 0.9, g2 0.3, g3 1.05 -> keep g3 and g1
    # top-2 of {e2 0.5, e3 0.4, e6 0.6, e7 0.45} -> e6, e2 (without bias: e0 0.9 and e6 0.8)
    # weights from UNBIASED scores: 0.8/1.4·2.5 = 1.4285714, 0.6/1.4·2.5 = 1.0714286
    weights, idx, scores = _gate(jnp.asarray(_logit(s)), jnp.asarray(b), c)
    np.testing.assert_array_equal(np.asarray(idx), [6, 2])
    assert idx.dtype == jnp.int32
    assert weights.dtype == jnp.float32 and scores.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(weights), [0.8 / 1.4 * 2.5, 0.6 / 1.4 * 2.5],
                               rtol=_GATE_TOL)
    np.testing.assert_allclose(np.asarray(scores), s, rtol=_GATE_TOL)


def test_gate_masks_dropped_groups_with_minus_inf_not_zero():
    # All biased scores are negative. A 0.0 fill of the dropped groups (HF) would then let
    # dropped experts beat every kept one; the -inf fill (DeepSeek) cannot.
    c = _config(routed_scaling_factor=2.5)
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.15, 0.25, 0.35, 0.02])
    b = np.full((8,), -0.5, np.float32)
    # biased = [-0.4, -0.3, -0.2, -0.1, -0.35, -0.25, -0.15, -0.48]
    # group top-2 sums: g0 -0.7, g1 -0.3, g2 -0.6, g3 -0.63 -> keep g1 and g2
    # top-2 over kept {e2 -0.2, e3 -0.1, e4 -0.35, e5 -0.25} -> e3, e2
    # weights: 0.4/0.7·2.5 = 1.4285714, 0.3/0.7·2.5 = 1.0714286
    weights, idx, _ = _gate(jnp.asarray(_logit(s)), jnp.asarray(b), c)
    np.testing.assert_array_equal(np.asarray(idx), [3, 2])
    np.testing.assert_allclose(np.asarray(weights), [0.4 / 0.7 * 2.5, 0.3 / 0.7 * 2.5],
                               rtol=_GATE_TOL)
    # The same input with a 0.0 fill picks experts of the dropped groups g0 and g3.
    _, idx_zero_fill = _np_gate(_logit(s), b, c, fill=0.0)
    assert all(e // 2 in (0, 3) for e in idx_zero_fill)
    # And the -inf reference agrees with the gate.
    _, idx_ref = _np_gate(_logit(s), b, c)
    np.testing.assert_array_equal(np.asarray(idx), idx_ref)


def test_gate_bias_changes_selection_not_weights():
    c = _config(n_expert_groups=1, n_limited_groups=1, routed_scaling_factor=1.0)
    logits = _randn(0, (64, 8))
    bias = 0.5 * _randn(1, (8,))
    w_b, idx_b, scores = _gate(logits, bias, c)
    _, idx_0, _ = _gate(logits, jnp.zeros((8,)), c)
    # Selection follows the biased scores ...
    expected_idx = np.argsort(-(np.asarray(scores) + np.asarray(bias)), axis=-1, kind="stable")
    np.testing.assert_array_equal(np.sort(np.asarray(idx_b), -1),
                                  np.sort(expected_idx[:, :2], -1))
    assert (np.sort(np.asarray(idx_b), -1) != np.sort(np.asarray(idx_0), -1)).any()
    # ... while the weights are the renormalised UNBIASED scores of whatever was selected.
    picked = np.take_along_axis(np.asarray(scores), np.asarray(idx_b), -1)
    np.testing.assert_allclose(np.asarray(w_b), picked / picked.sum(-1, keepdims=True),
                               rtol=_GATE_TOL)
    np.testing.assert_allclose(np.asarray(w_b).sum(-1), 1.0, rtol=_GATE_TOL)


@pytest.mark.parametrize("overrides", [
    dict(),                                                       # V3, groups
    dict(n_expert_groups=1, n_limited_groups=1),                  # V3 without groups
    dict(n_expert_groups=4, n_limited_groups=4),                  # groups, none dropped
])
def test_gate_v3_matches_loop_reference(overrides):
    c = _config(**overrides)
    logits = 2.0 * _randn(2, (3, 5, 8))
    bias = 0.3 * _randn(3, (8,)) - 0.3     # mostly negative
    weights, idx, _ = _gate(logits, bias, c)
    w_ref, i_ref = _np_gate(logits, bias, c)
    assert weights.shape == (3, 5, 2) and idx.shape == (3, 5, 2)
    np.testing.assert_array_equal(np.asarray(idx), i_ref)
    np.testing.assert_allclose(np.asarray(weights), w_ref, rtol=_GATE_TOL, atol=_GATE_TOL)


def test_gate_v2_hand_computed():
    # V2: softmax over E, group score = max, keep 2 of 4 groups, no renormalisation, ×16.
    c = _config(score_func="softmax", routing_bias=False, group_score="max",
                norm_topk_prob=False, routed_scaling_factor=16.0)
    # Softmax of log(p) is p when p sums to one.
    p = np.array([0.05, 0.30, 0.10, 0.10, 0.12, 0.13, 0.15, 0.05])   # sums to 1
    # group max: g0 0.30, g1 0.10, g2 0.13, g3 0.15 -> keep g0 and g3
    # (a top-2-sum rule would give g0 0.35, g1 0.20, g2 0.25, g3 0.20: g0 and g2 instead)
    # top-2 of {e0 .05, e1 .30, e6 .15, e7 .05} -> e1, e6; weights 16·0.30 = 4.8, 16·0.15 = 2.4
    weights, idx, scores = _gate(jnp.log(jnp.asarray(p, jnp.float32)), None, c)
    np.testing.assert_array_equal(np.asarray(idx), [1, 6])
    np.testing.assert_allclose(np.asarray(weights), [4.8, 2.4], rtol=_GATE_TOL)
    np.testing.assert_allclose(np.asarray(scores).sum(), 1.0, rtol=_GATE_TOL)
    # Random inputs against the loop reference.
    logits = 2.0 * _randn(4, (4, 6, 8))
    weights, idx, _ = _gate(logits, None, c)
    w_ref, i_ref = _np_gate(logits, None, c)
    np.testing.assert_array_equal(np.asarray(idx), i_ref)
    np.testing.assert_allclose(np.asarray(weights), w_ref, rtol=_GATE_TOL, atol=_GATE_TOL)


def test_gate_gradient_flows_only_through_selected_scores():
    c = _config(norm_topk_prob=False)          # renormalised weights sum to a constant
    logits = _randn(5, (4, 8))
    bias = jnp.zeros((8,))
    coeffs = jnp.array([1.0, 0.5])             # distinguishes the two slots
    g = jax.jit(jax.grad(lambda l: (routing.gate(l, bias, c)[0] * coeffs).sum()))(logits)
    _, idx, scores = _gate(logits, bias, c)
    # d/dlogit of scale·sigmoid = scale·s(1−s), only at the chosen experts.
    expected = np.zeros((4, 8))
    s = np.asarray(scores)
    for t in range(4):
        for k, e in enumerate(np.asarray(idx)[t]):
            expected[t, e] = float(coeffs[k]) * c.routed_scaling_factor * s[t, e] * (1 - s[t, e])
    np.testing.assert_allclose(np.asarray(g), expected, rtol=_GATE_TOL, atol=_GATE_TOL)


# ---------------------------------------------------------------------------------------------
# balancing statistics and the bias update
# ---------------------------------------------------------------------------------------------

def test_expert_load_counts():
    idx = jnp.array([[[0, 3], [3, 1]],
                     [[3, 0], [2, 3]]], jnp.int32)             # [B=2, T=2, X=2]
    load = routing.expert_load(idx, 5)
    assert load.dtype == jnp.float32 and load.shape == (5,)
    np.testing.assert_array_equal(np.asarray(load), [2, 1, 1, 4, 0])
    np.testing.assert_array_equal(np.asarray(jax.jit(routing.expert_load, static_argnums=1)(idx, 5)),
                                  [2, 1, 1, 4, 0])


def _np_balance_loss(scores, idx, E):
    """Spec §3.1 eqs. 17–20, one sequence at a time, averaged over the batch."""
    scores, idx = np.asarray(scores, np.float64), np.asarray(idx)
    B, T, X = idx.shape
    losses = []
    for b in range(B):
        f = np.zeros(E)
        for t in range(T):
            for e in idx[b, t]:
                f[e] += E / (X * T)
        s_norm = scores[b] / scores[b].sum(-1, keepdims=True)
        P = s_norm.mean(0)
        losses.append((f * P).sum())
    return np.mean(losses)


def test_sequence_balance_loss_matches_numpy():
    c = _config()
    logits = _randn(6, (3, 7, 8))
    _, idx, scores = _gate(logits, jnp.zeros((8,)), c)
    loss = jax.jit(routing.sequence_balance_loss, static_argnums=2)(scores, idx, 8)
    assert loss.shape == ()
    # fp32 sums of 7·8 numbers of order 1/8 against a float64 loop: a few ulps.
    np.testing.assert_allclose(float(loss), _np_balance_loss(scores, idx, 8), rtol=1e-6)


def test_sequence_balance_loss_uniform_is_one():
    # E=4, X=2, T=2: token 0 picks {0, 1}, token 1 picks {2, 3}, so every expert is chosen once:
    # f_i = E/(X·T)·1 = 4/4 = 1. Equal scores give s'_i = 1/E, so P_i = 1/4 and
    # L = Σ_i f_i P_i = 4 · 1 · 1/4 = 1. (In general Σ_i f_i = E, so uniform P gives 1.)
    idx = jnp.array([[[0, 1], [2, 3]]], jnp.int32)            # [B=1, T=2, X=2]
    scores = jnp.full((1, 2, 4), 0.7)
    np.testing.assert_allclose(float(routing.sequence_balance_loss(scores, idx, 4)), 1.0,
                               rtol=1e-6)                      # fp32 rounding of 1/4 sums
    # Full collapse onto experts {0, 1} with all probability on them: f = [2, 2, 0, 0],
    # P = [1/2, 1/2, 0, 0], L = 2 = E/X, the largest value the loss can take.
    idx = jnp.array([[[0, 1], [0, 1]]], jnp.int32)
    scores = jnp.array([[[0.5, 0.5, 0.0, 0.0]] * 2])
    np.testing.assert_allclose(float(routing.sequence_balance_loss(scores, idx, 4)), 2.0,
                               rtol=1e-6)


def test_update_routing_bias_direction():
    rate = 0.001
    bias = jnp.array([0.1, -0.2, 0.0, 0.05], jnp.float32)
    load = jnp.array([4.0, 1.0, 1.0, 2.0])                     # mean 2
    new = routing.update_routing_bias(bias, load, rate)
    # overloaded -> down by exactly rate, underloaded -> up, at the mean -> unchanged;
    # "exactly" in fp32: the same single rounding of b ± rate as NumPy fp32 arithmetic gives.
    step = np.array([-1, 1, 1, 0], np.float32)
    np.testing.assert_array_equal(np.asarray(new),
                                  np.asarray(bias) + np.float32(rate) * step)
    assert new.dtype == jnp.float32


def test_update_routing_bias_stacked_and_pytree():
    rate = 0.01
    bias = {"moe_layers": jnp.zeros((2, 3)), "mtp": jnp.zeros((3,))}
    load = {"moe_layers": jnp.array([[6.0, 0.0, 0.0], [1.0, 1.0, 4.0]]),
            "mtp": jnp.array([1.0, 2.0, 3.0])}
    new = routing.update_routing_bias(bias, load, rate)
    # each [L, E] row is compared with its own mean over E: row 0 mean 2, row 1 mean 2
    np.testing.assert_allclose(np.asarray(new["moe_layers"]),
                               [[-rate, rate, rate], [rate, rate, -rate]], atol=1e-9)
    np.testing.assert_allclose(np.asarray(new["mtp"]), [rate, 0.0, -rate], atol=1e-9)


# ---------------------------------------------------------------------------------------------
# dispatch: dense reference vs sort + ragged_dot
# ---------------------------------------------------------------------------------------------

_D, _F, _E = 8, 4, 8


def _expert_weights(seed):
    return (0.5 * _randn(seed, (_E, _D, _F)),                   # w_gate [E, D, F]
            0.5 * _randn(seed + 100, (_E, _D, _F)),             # w_up   [E, D, F]
            0.5 * _randn(seed + 200, (_E, _F, _D)))             # w_down [E, F, D]


def _skewed_routing(n_tokens):
    """Expert 3 takes nearly every token; experts 1, 2 and 7 get none."""
    slot0 = np.full((n_tokens,), 3)
    slot0[::5] = 6                                              # a few go to expert 6
    slot1 = np.where(np.arange(n_tokens) % 3 == 0, 0, 5)
    slot1[slot0 == 6] = 4                                       # expert 4 only with expert 6
    return jnp.asarray(np.stack([slot0, slot1], -1), jnp.int32)  # [M, X=2]


def _routing_cases():
    n = 20
    w = jnp.asarray(np.random.default_rng(7).dirichlet([1.0, 1.0], n) * 2.5,
                    jnp.float32)
    c = _config()
    gw, gi, _ = _gate(_randn(8, (n, 8)), jnp.zeros((8,)), c)
    return {"skewed": (w, _skewed_routing(n)), "gate": (gw, gi)}


@pytest.mark.parametrize("case", ["skewed", "gate"])
def test_dispatch_values_and_grads_match(case):
    weights, idx = _routing_cases()[case]
    n = idx.shape[0]
    if case == "skewed":
        load = np.asarray(routing.expert_load(idx, _E))
        assert load[1] == load[2] == load[7] == 0 and load.max() > n / 2
    x = _randn(9, (n, _D))
    w_gate, w_up, w_down = _expert_weights(10)
    cot = _randn(11, (n, _D))       # a generic output cotangent

    def loss(fn, x, weights, w_gate, w_up, w_down, idx, cot):
        y = fn(x, weights, idx, w_gate, w_up, w_down, jnp.float32)   # [M, D]
        return jnp.sum(y * cot), y

    # idx and cot are arguments, not closed-over constants: XLA would otherwise constant-fold
    # the sort and the ragged matmuls at compile time, which is slow.
    args = (x, weights, w_gate, w_up, w_down, idx, cot)
    grad = lambda fn: jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=range(5),
                                       has_aux=True))(*args)
    g_dense, y_dense = grad(dispatch.dense_dispatch)
    g_ragged, y_ragged = grad(dispatch.ragged_dispatch)
    assert y_ragged.shape == (n, _D) and y_ragged.dtype == jnp.float32
    assert np.isfinite(np.asarray(y_ragged)).all()
    np.testing.assert_allclose(np.asarray(y_ragged), np.asarray(y_dense),
                               rtol=_DISPATCH_TOL, atol=_DISPATCH_TOL)
    for name, a, b in zip(["x", "weights", "w_gate", "w_up", "w_down"], g_ragged, g_dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=_DISPATCH_TOL,
                                   atol=_DISPATCH_TOL, err_msg=f"grad w.r.t. {name}")
    if case == "skewed":       # experts without tokens get exactly zero gradient on both paths
        for g in (g_ragged[2], g_ragged[3], g_ragged[4]):
            np.testing.assert_array_equal(np.asarray(g)[[1, 2, 7]], 0.0)


def test_dense_dispatch_matches_per_token_loop():
    # The dense path itself against Σ_k w_k · SwiGLU_{idx_k}(x), one token at a time.
    weights, idx = _routing_cases()["skewed"]
    x = _randn(12, (idx.shape[0], _D))
    w_gate, w_up, w_down = _expert_weights(13)
    y = dispatch.dense_dispatch(x, weights, idx, w_gate, w_up, w_down, jnp.float32)
    silu = lambda v: v / (1.0 + np.exp(-v))
    xs, ws, ids = np.asarray(x, np.float64), np.asarray(weights), np.asarray(idx)
    wg, wu, wd = (np.asarray(a, np.float64) for a in (w_gate, w_up, w_down))
    ref = np.zeros_like(xs)
    for m in range(xs.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[m, k]
            ref[m] += ws[m, k] * ((silu(xs[m] @ wg[e]) * (xs[m] @ wu[e])) @ wd[e])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=_DISPATCH_TOL, atol=_DISPATCH_TOL)


def test_ragged_dispatch_all_tokens_on_one_expert():
    # Extreme load: every (token, slot) pair on expert 5 (X=1), seven experts empty.
    n = 6
    idx = jnp.full((n, 1), 5, jnp.int32)
    weights = jnp.linspace(0.5, 1.5, n)[:, None]
    x = _randn(14, (n, _D))
    w = _expert_weights(15)
    y_r = jax.jit(dispatch.ragged_dispatch, static_argnums=6)(x, weights, idx, *w, jnp.float32)
    y_d = jax.jit(dispatch.dense_dispatch, static_argnums=6)(x, weights, idx, *w, jnp.float32)
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y_d), rtol=_DISPATCH_TOL,
                               atol=_DISPATCH_TOL)


# ---------------------------------------------------------------------------------------------
# the MoE module
# ---------------------------------------------------------------------------------------------

_B, _T = 2, 5


@pytest.fixture(scope="module")
def tiny():
    """(config, x, variables) for the tiny model; `moe_impl` does not change the variables."""
    c = _config(moe_impl="dense")
    x = _randn(1, (_B, _T, c.d_model))
    return c, x, jax.jit(moe.MoE(c).init)(jax.random.key(0), x)


def test_module_params_and_collections(tiny):
    c, x, variables = tiny
    D, E, F = c.d_model, c.n_routed_experts, c.moe_d_ff
    y, state = jax.jit(lambda v, x: moe.MoE(c).apply(v, x, mutable=["moe_stats"]))(variables, x)
    assert y.shape == (_B, _T, D) and y.dtype == c.dtype
    params = nn.unbox(variables["params"])
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {"router": (D, E), "w_gate": (E, D, F), "w_up": (E, D, F),
                      "w_down": (E, F, D),
                      "shared": {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}}
    axes = jax.tree.map(lambda p: p.names, variables["params"],
                        is_leaf=lambda p: isinstance(p, nn.Partitioned))
    assert axes["router"] == ("embed", "expert")
    assert axes["w_gate"] == axes["w_up"] == ("expert", "embed", "mlp")
    assert axes["w_down"] == ("expert", "mlp", "embed")
    # The routing bias is state, not a parameter, and starts at zero.
    np.testing.assert_array_equal(np.asarray(variables["routing"]["bias"]), np.zeros(E))
    assert variables["routing"]["bias"].dtype == jnp.float32
    # Statistics are not written at init (a re-applied init output would double them) ...
    assert "moe_stats" not in variables
    # ... and are sown (as 1-tuples) by apply.
    (load,) = state["moe_stats"]["load"]
    (bal,) = state["moe_stats"]["balance_loss"]
    assert load.shape == (E,) and float(load.sum()) == _B * _T * c.n_experts_per_token
    assert bal.shape == () and np.isfinite(float(bal))


@pytest.mark.parametrize("moe_impl", ["dense", "ragged"])
def test_module_v2_without_bias_or_shared_experts_bf16(moe_impl):
    # Structure and dtypes only: traced with eval_shape, nothing is compiled.
    c = _config(score_func="softmax", routing_bias=False, group_score="max",
                norm_topk_prob=False, n_shared_experts=0, dtype=jnp.bfloat16, moe_impl=moe_impl)
    x = jax.ShapeDtypeStruct((_B, _T, c.d_model), jnp.bfloat16)
    model = moe.MoE(c)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(variables) == {"params"} and "shared" not in variables["params"]
    y, state = jax.eval_shape(lambda v, x: model.apply(v, x, mutable=["moe_stats"]),
                              variables, x)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert state["moe_stats"]["load"][0].shape == (c.n_routed_experts,)


def test_module_dense_and_ragged_agree(tiny):
    c_dense, x, variables = tiny
    c_ragged = c_dense.replace(moe_impl="ragged")
    # A nonzero bias, so that the bias path is exercised too.
    variables = {**variables,
                 "routing": {"bias": 0.01 * jnp.arange(8, dtype=jnp.float32) - 0.04}}

    def run(c):
        def loss(params, x):
            y = moe.MoE(c).apply({**variables, "params": params}, x)
            return jnp.sum(y * jnp.cos(y)), y
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)

    (gp_d, gx_d), y_d = run(c_dense)
    (gp_r, gx_r), y_r = run(c_ragged)
    np.testing.assert_allclose(np.asarray(y_r), np.asarray(y_d), rtol=_DISPATCH_TOL,
                               atol=_DISPATCH_TOL)
    np.testing.assert_allclose(np.asarray(gx_r), np.asarray(gx_d), rtol=_DISPATCH_TOL,
                               atol=_DISPATCH_TOL)
    for a, b in zip(jax.tree.leaves(nn.unbox(gp_r)), jax.tree.leaves(nn.unbox(gp_d))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=_DISPATCH_TOL,
                                   atol=_DISPATCH_TOL)
    # The router learns through the combine weights.
    assert np.abs(np.asarray(nn.unbox(gp_r)["router"])).max() > 0


class _ScanBody(nn.Module):
    """One MoE layer as an nn.scan body: (carry, xs) -> (carry, ys)."""
    config: object

    @nn.compact
    def __call__(self, x, _):
        return x + moe.MoE(self.config, name="moe")(x), None


def test_module_under_scan():
    c = _config()
    E = c.n_routed_experts
    stack = nn.scan(_ScanBody, variable_axes={"params": 0, "routing": 0, "moe_stats": 0},
                    split_rngs={"params": True}, length=2,
                    metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
    x = _randn(4, (_B, _T, c.d_model))
    variables = jax.jit(lambda k: stack.init(k, x, None))(jax.random.key(0))
    assert variables["routing"]["moe"]["bias"].shape == (2, E)
    assert nn.unbox(variables["params"])["moe"]["w_gate"].shape == (2, E, c.d_model, c.moe_d_ff)
    (y, _), state = jax.jit(lambda v: stack.apply(v, x, None, mutable=["moe_stats"]))(variables)
    assert y.shape == x.shape
    (load,) = state["moe_stats"]["moe"]["load"]
    (bal,) = state["moe_stats"]["moe"]["balance_loss"]
    assert load.shape == (2, E) and bal.shape == (2,)
    np.testing.assert_array_equal(np.asarray(load.sum(-1)), [_B * _T * 2] * 2)
    # The stacked bias and stacked load feed the update directly.
    gamma = 0.001
    new_bias = routing.update_routing_bias(variables["routing"]["moe"]["bias"], load, gamma)
    assert new_bias.shape == (2, E)
    np.testing.assert_allclose(np.abs(np.asarray(new_bias)),
                               np.where(np.asarray(load) == np.asarray(load).mean(-1,
                                        keepdims=True), 0.0, gamma), atol=1e-9)
