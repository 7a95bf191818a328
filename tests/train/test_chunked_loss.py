"""The loss on hidden states and head (train/losses.py `head_*`, model/head.py) against the loss on
whole logits: equal values and gradients, for lengths the chunk divides and does not, with
padding and document boundaries (zero weights), for the main head and MTP depths, through the
tiny model's train step and under a sharded preset; and the compiled train step holds no fp32
[B, T, V] array, where the logits form does.

Tolerances, from tests/numerics.py: two orders of an n-term fp32 sum differ by at most
2·γ(n)·Σ|terms|. The chunked path runs, per position, the operations of the whole-logits path
on the same numbers; what may differ is the blocking of three sums:
  - each logit, a D-term dot: |Δlogit| ≤ δ = 2·γ(D)·max Σ_d|h_d·w_dv|. A position's −log p
    moves by ≤ 2δ (its gradient in the logits has 1-norm ≤ 2), and p moves by ≤ 2δ in 1-norm.
  - the head gradient, Σ over the N = B·T positions of h_i ⊗ g_i, g_i = w_i·(p_i − y_i)/Σw:
    |ΔG| ≤ 2·γ(N)·Σ_i|h_i|⊗|g_i| + Σ_i |h_i|·w_i·2δ/Σw, entrywise.
  - the hidden gradient, Σ over V of head_dv·g_iv: |Δdh_i| ≤ 2·γ(V)·|head|·|g_i| +
    max_v|head_dv|·w_i·2δ/Σw, entrywise.
The chunked backward (`head_nll`) also forms p as exp(logit − lse) from the forward's log-sum-exp
rather than by dividing by a sum: lse, a V-term sum and a log, is off by ≤ γ(V) + 2u·|lse|, which
moves p by as much relatively, so by that much in 1-norm: the 2δ above becomes
2δ + γ(V) + 2u·max|lse| in both gradients (u = 2⁻²⁴).
The loss is a weighted mean of positive terms (κ = 1): |ΔL| ≤ 2δ + 2·γ(N)·L.
Through the whole model the head's differences are carried back by the network's backward pass,
which no entrywise bound follows; there each gradient leaf is compared in norm at 2·γ(n)·κ with
n = N + V + D (the three sums above) and κ ≤ 20, as in tests/model and tests/parallel.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel as par
from deepseek_jax.model.head import head_logits
from deepseek_jax.tools import hlo
from deepseek_jax.train import losses, sharded
from deepseek_jax.train.step import init_train_state, loss_and_grads, train_step
from numerics import U32, assert_leaves_close_in_norm, gradient_rtol, record_gradient

B, T, D, V, K = 3, 11, 32, 88, 2


def _gamma2(n):
    return gradient_rtol(n, 1.0)                # 2·γ(n)


def _case():
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (B, T, D))
    mtp_hidden = jax.random.normal(k[1], (K, B, T, D))
    head = 0.3 * jax.random.normal(k[2], (D, V))
    tokens = jax.random.randint(k[3], (B, T), 0, V)
    valid = np.ones((B, T), np.float32)
    valid[1, 7:] = 0                            # padding after 7 tokens
    valid[2, 4] = 0                             # a second document starts at position 4
    return hidden, mtp_hidden, head, tokens, jnp.asarray(valid)


def _bounds(hidden, head, targets, weights):
    """(loss, head-gradient, hidden-gradient) bounds of the module docstring for one head."""
    logits = head_logits(hidden, head, jnp.float32)                           # [B, T, V]
    delta = _gamma2(D) * float(jnp.max(jnp.abs(hidden) @ jnp.abs(head)))
    w = weights / jnp.sum(weights)                                            # [B, T]
    g = (jax.nn.softmax(logits) - jax.nn.one_hot(targets, V)) * w[..., None]  # [B, T, V]
    loss = float(losses.cross_entropy(logits, targets, weights)[0] / jnp.sum(weights))
    b_loss = 2 * delta + _gamma2(B * T) * loss
    lse = float(jnp.max(jnp.abs(jax.nn.logsumexp(logits, axis=-1))))
    dp = 2 * delta + _gamma2(V) / 2 + 2 * U32 * lse          # p's 1-norm move (docstring)
    b_head = (_gamma2(B * T) * jnp.einsum("BTD,BTV->DV", jnp.abs(hidden), jnp.abs(g))
              + jnp.einsum("BTD,BT->D", jnp.abs(hidden), w)[:, None] * dp)
    b_hidden = (_gamma2(V) * jnp.einsum("DV,BTV->BTD", jnp.abs(head), jnp.abs(g))
                + jnp.max(jnp.abs(head), 1) * w[..., None] * dp)
    return b_loss, b_head, b_hidden


def _assert_within(got, want, bound, what):
    excess = np.abs(np.asarray(got) - np.asarray(want)) - np.asarray(bound)
    assert np.all(excess <= 0), f"{what}: exceeds its bound by up to {excess.max():.3g}"


def _both_forms(hidden, head, targets, weights, dtype, chunk):
    """(loss, (hidden gradient, head gradient)) of the mean cross entropy on whole logits, and
    the same through `head_cross_entropy` in chunks."""
    def plain(h, w):
        total, count = losses.cross_entropy(head_logits(h, w, dtype), targets, weights)
        return total / count

    def chunked(h, w):
        total, count = losses.head_cross_entropy(h, w, targets, weights, dtype=dtype,
                                                 chunk=chunk)
        return total / count

    return [jax.jit(jax.value_and_grad(f, (0, 1)))(hidden, head) for f in (plain, chunked)]


@pytest.mark.parametrize("chunk", [1, 4, 11, 16])
def test_cross_entropy_and_gradients_equal_the_logits_form(chunk):
    hidden, _, head, tokens, valid = _case()
    targets, weights = losses.shifted_targets(tokens, valid, 1)
    (l0, (gh0, gw0)), (l1, (gh1, gw1)) = _both_forms(hidden, head, targets, weights,
                                                     jnp.float32, chunk)
    b_loss, b_head, b_hidden = _bounds(hidden, head, targets, weights)
    _assert_within(l1, l0, b_loss, "loss")
    _assert_within(gw1, gw0, b_head, "head gradient")
    _assert_within(gh1, gh0, b_hidden, "hidden gradient")
    # Zero weights (the last position, padding, the document boundary) get no gradient at all.
    np.testing.assert_array_equal(np.asarray(gh1)[np.asarray(weights) == 0], 0.0)


def test_total_loss_with_mtp_depths_equals_the_logits_form():
    """K = 2 depths against t_{i+2}, t_{i+3}; a chunk of 4 leaves a last chunk of 3."""
    hidden, mtp_hidden, head, tokens, valid = _case()
    lam, alpha = 0.3, 1e-4

    def plain(h, m, w):
        logits = head_logits(h, w, jnp.float32)
        mtp_logits = jnp.stack([head_logits(x, w, jnp.float32) for x in m])
        return losses.total_loss(logits, mtp_logits, None, tokens, valid, mtp_weight=lam,
                                 balance_alpha=alpha)

    def chunked(h, m, w):
        return losses.head_total_loss(h, m, w, None, tokens, valid, mtp_weight=lam,
                                      balance_alpha=alpha, dtype=jnp.float32, chunk=4)

    def grad(f):
        return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(hidden, mtp_hidden, head)

    (l0, p0), (gh0, gm0, gw0) = grad(plain)
    (l1, p1), (gh1, gm1, gw1) = grad(chunked)
    assert set(p1) == {"lm_loss", "mtp_loss", "balance_loss"}
    depths = [(hidden, 1, 1.0)] + [(mtp_hidden[k], k + 2, lam / K) for k in range(K)]
    bounds = [(scale, _bounds(h, head, *losses.shifted_targets(tokens, valid, k)))
              for h, k, scale in depths]
    lm_b = bounds[0][1]
    _assert_within(p1["lm_loss"], p0["lm_loss"], lm_b[0], "lm_loss")
    _assert_within(gh1, gh0, lm_b[2], "main hidden gradient")
    mtp_b = sum(b[0] for _, b in bounds[1:]) / K
    _assert_within(p1["mtp_loss"], p0["mtp_loss"], mtp_b, "mtp_loss")
    for k in range(K):
        _assert_within(gm1[k], gm0[k], bounds[k + 1][1][2], f"depth {k + 1} hidden gradient")
    # The head gradient sums the three heads' (weights 1, λ/K, λ/K): their bounds add, plus
    # the rounding of that 3-term sum.
    b_head = sum(s * b[1] for s, b in bounds) + _gamma2(3) * jnp.abs(gw0)
    _assert_within(gw1, gw0, b_head, "head gradient")
    _assert_within(l1, l0, lm_b[0] + lam * mtp_b + _gamma2(3) * abs(float(l0)), "total")


@pytest.mark.parametrize("tied", [False, True])
def test_train_step_gradients_equal_the_logits_form(tiny, tied):
    """loss_and_grads of the tiny model (MoE, MTP): loss_chunk = 5 over T = 16 (three chunks and
    one of 1) against loss_chunk = 0 (whole logits), with padding and a packed boundary; with
    tied embeddings the head is embed.T and its gradient joins the embedding's."""
    tiny = tiny.replace(tie_embeddings=tied)
    Bm, Tm = 4, 16
    tokens = jax.random.randint(jax.random.key(1), (Bm, Tm), 0, tiny.vocab_size)
    valid = np.ones((Bm, Tm), np.float32)
    valid[0, 12:] = 0
    valid[3, 6] = 0
    batch = {"tokens": tokens, "valid": jnp.asarray(valid), "token_mask": jnp.asarray(valid) > 0}
    state = init_train_state(jax.random.key(0), tiny, optax.sgd(0.1))

    def run(c):
        return jax.jit(lambda p, r, b: loss_and_grads(p, r, b, c))(state.params, state.routing,
                                                                    batch)

    l0, parts0, stats0, g0 = run(tiny.replace(loss_chunk=0))
    l1, parts1, stats1, g1 = run(tiny.replace(loss_chunk=5))
    assert ("lm_head" in g1) != tied
    n = Bm * Tm + tiny.vocab_size + tiny.d_model
    for name in ("lm_loss", "mtp_loss", "balance_loss"):
        np.testing.assert_allclose(parts1[name], parts0[name], rtol=gradient_rtol(n, 1.0))
    np.testing.assert_allclose(l1, l0, rtol=gradient_rtol(n, 1.0))
    jax.tree.map(np.testing.assert_array_equal, stats1, stats0)   # the forward is the same
    assert_leaves_close_in_norm(g1, g0, gradient_rtol(n, 20.0))


# --- the compiled step holds no fp32 [B, T, V] array ------------------------------------------

def _fp32_logit_shapes(hlo: str, b: int, t: int, v: int) -> set:
    """f32 array shapes in HLO text that are [B, T, V] in any order (size-1 axes ignored, e.g.
    [K=1, B, T, V]) or the flattened [B·T, V]; b, t, v distinct from every other model size."""
    found = set()
    for m in re.finditer(r"f32\[([\d,]+)\]", hlo):
        dims = tuple(int(x) for x in m.group(1).split(","))
        core = sorted(x for x in dims if x != 1)
        if core in (sorted([b, t, v]), sorted([b * t, v])):
            found.add(dims)
    return found


@pytest.mark.parametrize("chunk", [4, 0])
def test_compiled_train_step_holds_no_fp32_logits(tiny, chunk):
    """B = 3, T = 11, V = 88: no other size of the tiny model (D 32, F 64, 16, heads 4, …) or
    product of two of them is 3, 11, 33 or 88, so a match is the logits. With loss_chunk = 4
    the optimized HLO has none; with 0 (whole logits) it has them, so the check can fail."""
    c = tiny.replace(vocab_size=88, loss_chunk=chunk)
    tx = optax.adamw(1e-3)
    state = jax.eval_shape(lambda: init_train_state(jax.random.key(0), c, tx))
    batch = {"tokens": jax.ShapeDtypeStruct((3, 11), jnp.int32)}
    hlo = jax.jit(lambda s, b: train_step(s, b, config=c, tx=tx)).lower(
        state, batch).compile().as_text()
    found = _fp32_logit_shapes(hlo, 3, 11, 88)
    if chunk:
        assert not found, f"fp32 logits-shaped arrays in the chunked step: {found}"
        assert "f32[3,4,88]" in hlo            # the chunk's logits are there instead
    else:
        assert (3, 11, 88) in found, found


# --- sharded --------------------------------------------------------------------------------

def test_sharded_chunked_step_equals_single_device_logits_form(tiny):
    """fsdp_tp on 8 devices (batch over fsdp = 2, V over tensor = 4) with loss_chunk = 5, against
    one device with whole logits: one step's loss and gradient (kept by `record_gradient`).
    Both reorderings (sharding and chunking) are of the sums listed in the module docstring."""
    tx = optax.chain(record_gradient(), optax.sgd(0.1))
    host = jax.device_get(init_train_state(jax.random.key(0), tiny, tx))
    batch = {"tokens": np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0,
                                                     tiny.vocab_size))}

    def one_step(config, preset, devices):
        mesh = par.make_mesh(par.default_mesh_config(preset, len(devices)), devices)
        step = sharded.make_sharded_train_step(config, tx, mesh,
                                               par.logical_axis_rules(preset, mesh))
        state, metrics = step(jax.device_put(host, step.shardings), batch)
        return jax.device_get(metrics), jax.device_get(state.opt_state[0])

    m0, g0 = one_step(tiny.replace(loss_chunk=0), "dp", jax.devices()[:1])
    m1, g1 = one_step(tiny.replace(loss_chunk=5), "fsdp_tp", jax.devices())
    n = 8 * 16 + tiny.vocab_size + tiny.d_model
    for name in ("loss", "lm_loss", "mtp_loss"):
        np.testing.assert_allclose(m1[name], m0[name], rtol=gradient_rtol(n, 1.0))
    assert_leaves_close_in_norm(g1, g0, gradient_rtol(n, 20.0))


# --- head_nll's backward: bf16 dlogits, one head gather per pass, no whole head gradient -----

def test_bf16_head_nll_gradients_within_bf16_rounding():
    """dtype bf16: the backward rounds each slice's dlogits to bf16 (|Δ| ≤ 2⁻⁹·|dlogit|) before
    its two matmuls, where differentiating whole logits keeps them fp32; both paths then round
    the gradients to bf16 (hidden) or through the bf16 head (head): two neighbouring values may
    land one bf16 ulp apart, ≤ 2⁻⁷·|value|. Added to the fp32 bounds of the module docstring."""
    hidden, _, head, tokens, valid = _case()
    hidden = hidden.astype(jnp.bfloat16)
    targets, weights = losses.shifted_targets(tokens, valid, 1)
    (l0, (gh0, gw0)), (l1, (gh1, gw1)) = _both_forms(hidden, head, targets, weights,
                                                     jnp.bfloat16, 4)
    h32 = hidden.astype(jnp.float32)
    w32 = head.astype(jnp.bfloat16).astype(jnp.float32)
    b_loss, b_head, b_hidden = _bounds(h32, w32, targets, weights)
    g = ((jax.nn.softmax(head_logits(h32, w32, jnp.float32)) - jax.nn.one_hot(targets, V))
         * (weights / jnp.sum(weights))[..., None])                              # [B, T, V]
    b_head = b_head + 2 ** -9 * jnp.einsum("BTD,BTV->DV", jnp.abs(h32), jnp.abs(g)) \
        + 2 ** -7 * jnp.abs(gw0)
    b_hidden = b_hidden + 2 ** -9 * jnp.einsum("DV,BTV->BTD", jnp.abs(w32), jnp.abs(g)) \
        + 2 ** -7 * jnp.abs(gh0.astype(jnp.float32))
    _assert_within(l1, l0, b_loss, "loss")
    _assert_within(gw1, gw0, b_head, "head gradient")
    _assert_within(gh1.astype(jnp.float32), gh0.astype(jnp.float32), b_hidden, "hidden gradient")


def test_fsdp_head_gathered_once_per_pass_and_its_gradient_reduced_by_slices():
    """fsdp = 8, head [D, V] split along D, bf16 compute, two heads (main + one MTP depth), three
    chunks (so n_v = 3 vocabulary slices): the compiled gradient gathers the head at most once
    per pass (whole-logits chunks regathered it per chunk, per head, and in each recomputation:
    12 times), every reduction across devices is of one slice's head gradient (the per-chunk
    path accumulated a whole [D, V] fp32 gradient and reduced that), and the result equals the
    one-device gradient. Tolerance: the sharded sums reorder the same terms (2·γ(n)·κ, κ ≤ 20 as
    above), each device's partial slice gradient is rounded to bf16 before the reduction
    (2⁻⁹·κ), and the final bf16 rounding may differ by one ulp (2⁻⁷)."""
    Bs, Ts, Ds = 8, 12, 64
    k = jax.random.split(jax.random.key(3), 4)
    hiddens = [jax.random.normal(k[i], (Bs, Ts, Ds)).astype(jnp.bfloat16) for i in range(2)]
    head = 0.3 * jax.random.normal(k[2], (Ds, V))
    targets = [jax.random.randint(k[3], (Bs, Ts), 0, V)] * 2

    def loss(hs, w):
        nll = losses._head_nlls(hs, w, targets, jnp.bfloat16, 4)
        return sum(jnp.mean(x) for x in nll)

    grad = jax.jit(jax.grad(loss, (0, 1)))
    want = grad(hiddens, head)
    mesh, rules = par.mesh_and_rules("fsdp", {"fsdp": 8})
    with par.sharding_context(mesh, rules):
        hs = [jax.device_put(h, jax.sharding.NamedSharding(mesh, P("fsdp"))) for h in hiddens]
        w = jax.device_put(head, jax.sharding.NamedSharding(mesh, P("fsdp")))
        compiled = grad.lower(hs, w).compile()
        got = compiled(hs, w)
    found = hlo.collective_stats(compiled.as_text()).collectives
    whole = (Ds * V * 2, Ds * V * 4)     # bf16, or fp32 where a backend widens bf16 collectives
    gathers = sum(c.executions for c in found if c.kind == "all-gather" and c.result_bytes in whole)
    assert 1 <= gathers <= 2, found
    width = -(-V // 3)                   # ids per vocabulary slice
    reductions = [c for c in found if c.role in ("all-reduce", "reduce-scatter")]
    assert reductions and max(c.bytes for c in reductions) <= Ds * width * 4, reductions
    n = Bs * Ts + V + Ds
    rtol = 20 * (gradient_rtol(n, 1.0) + 2 ** -9) + 2 ** -7
    assert_leaves_close_in_norm(jax.device_get(got), want, rtol)
