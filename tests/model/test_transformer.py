"""The whole model on the tiny config: return structure, causality, MTP alignment, and the
equivalence of scanned/unrolled stacks, remat, attention paths and dispatch paths."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.model import Transformer, init_variables
from numerics import assert_leaves_close_in_norm, gradient_rtol

B, T = 2, 12


@pytest.fixture(scope="module")
def setup():
    c = get_config("tiny")
    v = flax.core.meta.unbox(init_variables(jax.random.key(0), c))
    # Larger weights make attention and routing decisive, so mistakes show up as big differences.
    v["params"] = jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p, v["params"])
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, c.vocab_size)
    apply = jax.jit(lambda v, t: Transformer(c).apply(v, t))
    return c, v, tokens, apply


def test_return_structure(setup):
    c, v, tokens, apply = setup
    logits, mtp = apply(v, tokens)
    assert logits.shape == (B, T, c.vocab_size) and logits.dtype == jnp.float32
    assert mtp.shape == (c.mtp_depth, B, T, c.vocab_size)
    c0 = c.replace(mtp_depth=0)
    v0 = init_variables(jax.random.key(0), c0)
    assert "mtp" not in v0["params"]
    logits0, mtp0 = jax.jit(Transformer(c0).apply)(v0, tokens)
    assert mtp0 is None and logits0.shape == (B, T, c.vocab_size)


def test_routing_bias_is_state_not_param(setup):
    c, v, *_ = setup
    assert set(v) == {"params", "routing"}
    flat = flax.traverse_util.flatten_dict(v["params"])
    assert not any("bias" in k for k in flat)
    assert v["routing"]["moe_layers"]["layers"]["moe"]["bias"].shape == (c.n_moe_layers,
                                                                         c.n_routed_experts)


def test_causality_main_and_mtp(setup):
    """Changing token j leaves main logits before j unchanged; MTP depth 1 reads t_{i+1} at i,
    so its logits before j − 1 are unchanged and at j − 1 they change."""
    c, v, tokens, apply = setup
    j = 7
    other = tokens.at[:, j].set((tokens[:, j] + 5) % c.vocab_size)
    (l1, m1), (l2, m2) = apply(v, tokens), apply(v, other)
    np.testing.assert_array_equal(np.asarray(l1[:, :j]), np.asarray(l2[:, :j]))
    assert not np.allclose(l1[:, j], l2[:, j])
    np.testing.assert_array_equal(np.asarray(m1[:, :, : j - 1]), np.asarray(m2[:, :, : j - 1]))
    assert not np.allclose(m1[:, :, j - 1], m2[:, :, j - 1])


def _unstack(tree, prefix_len):
    """Scanned params {stack: {"layers": leaves [L, ...]}} → {stack: {"layer_i": leaves [...]}}."""
    out = {}
    for name, sub in tree.items():
        if isinstance(sub, dict) and "layers" in sub:
            L = jax.tree.leaves(sub["layers"])[0].shape[0]
            out[name] = {f"layer_{i}": jax.tree.map(lambda a: a[i], sub["layers"]) for i in range(L)}
        else:
            out[name] = sub
    return out


def test_scanned_equals_unrolled(setup):
    c, v, tokens, apply = setup
    cu = c.replace(scan_layers=False)
    vu = {"params": _unstack(v["params"], 0), "routing": _unstack(v["routing"], 0)}
    ref = init_variables(jax.random.key(0), cu)
    assert jax.tree.structure(flax.core.meta.unbox(ref["params"])) == jax.tree.structure(vu["params"])
    a, b = apply(v, tokens), jax.jit(Transformer(cu).apply)(vu, tokens)
    # Same ops in a loop vs a scan: identical up to fp32 reassociation.
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=1e-5, atol=1e-5)


def _loss_and_grad(cfg, v, tokens):
    def loss(params):
        logits, mtp = Transformer(cfg).apply({**v, "params": params}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + jnp.mean(mtp ** 2)
    return jax.jit(jax.value_and_grad(loss))(v["params"])


@pytest.fixture(scope="module")
def default_grad(setup):
    c, v, tokens, _ = setup
    return _loss_and_grad(c, v, tokens)


@pytest.mark.parametrize("changes", [dict(attention_impl="absorbed"), dict(moe_impl="dense"),
                                     dict(remat_policy="full"),
                                     dict(remat_policy="dots_with_no_batch_dims_saveable"),
                                     dict(remat_policy="minimal"),
                                     dict(remat_policy="save_attention"),
                                     dict(remat_policy="custom:layer_input=offload,"
                                                       "expert_rows=save")])
def test_equivalent_implementations(setup, default_grad, changes):
    """Outputs and parameter gradients agree with the default path. The paths compute the same
    sums in other orders or groupings (absorbed attention reassociates the key projection, the
    dense MoE sums over all experts, remat recomputes), so each gradient leaf is compared in
    norm at 2·γ(n)·κ (tests/numerics.py): n = B·T = 24 positions, κ ≤ 20, and a further ×D =
    32 for the reassociated contractions inside each position: ≈ 1.8e-3 against an observed
    ~1e-6. Entrywise, a near-zero gradient entry carries the absolute rounding of its terms,
    which the ×3 weights make large, so no entrywise tolerance follows from the math."""
    c, v, tokens, _ = setup
    l1, g1 = default_grad
    l2, g2 = _loss_and_grad(c.replace(**changes), v, tokens)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert_leaves_close_in_norm(g2, g1, gradient_rtol(B * T * c.d_model, 20.0))


def test_packed_segments_do_not_interact(setup):
    c, v, tokens, apply = setup
    a, b = tokens[0, :5], tokens[1, :7]
    packed = jnp.concatenate([a, b])[None]                               # [1, 12]
    seg = jnp.array([[1] * 5 + [2] * 7])
    pos = jnp.array([list(range(5)) + list(range(7))])
    got, _ = jax.jit(Transformer(c).apply)(v, packed, positions=pos, segment_ids=seg)
    alone, _ = apply(v, b[None])
    # Identical math over different padding of the same rows: fp32 rounding only.
    np.testing.assert_allclose(np.asarray(got[0, 5:]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


def test_mtp_backward_fence_changes_no_value(setup, default_grad, monkeypatch):
    """MTP depths run under a custom_vjp whose backward only orders the work (`mtp.py`,
    `_params_grad_first`): with the moe_stats sown as the train step collects them, the loss,
    the statistics and every gradient equal plain autodiff through the same layer. Same ops,
    possibly fused differently: compared as the paths above."""
    from deepseek_jax.model import mtp
    c, v, tokens, _ = setup

    def run():
        def loss(params):
            (logits, out), state = Transformer(c).apply({**v, "params": params}, tokens,
                                                        mutable=["moe_stats"])
            return (jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + jnp.mean(out ** 2),
                    state["moe_stats"])
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    (l1, stats1), g1 = run()
    monkeypatch.setattr(mtp, "_params_grad_first", mtp._layer)
    (l2, stats2), g2 = run()
    assert "mtp" in g1 and jax.tree.structure(g1) == jax.tree.structure(g2)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    np.testing.assert_allclose(float(l1), float(default_grad[0]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert_leaves_close_in_norm(g2, g1, gradient_rtol(B * T * c.d_model, 20.0))


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from _equations(inner)


def test_mtp_backward_ties_its_parameter_gradients_to_its_input_gradient(setup):
    """The fence of `mtp._params_grad_first` in the differentiated program: one optimization
    barrier takes every MTP parameter's gradient together with the gradients of the depth's two
    inputs (the trunk's hidden state and the next tokens' embeddings, both [B, T, D]), so the
    trunk's backward cannot start before the depth's weight gradients exist. (Whether a
    compiler would otherwise defer them depends on sizes: the 671B step on 512 chips did,
    BENCHMARKS.md; small models do not, so the structure is what is tested.)"""
    c, v, tokens, _ = setup

    def loss(params):
        logits, out = Transformer(c).apply({**v, "params": params}, tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3]) + jnp.mean(out ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(v["params"]).jaxpr
    mtp_shapes = sorted(tuple(p.shape) for p in jax.tree.leaves(v["params"]["mtp"]))
    hidden = (B, T, c.d_model)
    fences = [sorted(tuple(x.aval.shape) for x in eqn.invars) for eqn in _equations(jaxpr)
              if eqn.primitive.name == "optimization_barrier"]
    assert sorted(mtp_shapes + [hidden, hidden]) in fences, fences
