"""LoRA adapters (model/adapters.py): where they go, what they compute, merging, config checks."""

import flax
import flax.traverse_util as tu
import jax
import numpy as np
import pytest

from deepseek_jax.config import ConfigError
from deepseek_jax.model import Transformer, adapters, init_variables
from tests.numerics import U32

ALL = ("attention", "mlp", "experts")


@pytest.fixture(scope="module")
def lora(tiny):
    return tiny.replace(adapter_rank=4, adapter_alpha=8.0, adapter_targets=ALL)


@pytest.fixture(scope="module")
def lora_params(lora):
    """The adapter model's parameters with B drawn too (at init B = 0, which would hide A)."""
    params = flax.core.meta.unbox(init_variables(jax.random.key(0), lora))["params"]
    flat = tu.flatten_dict(params)
    keys = jax.random.split(jax.random.key(1), len(flat))
    return tu.unflatten_dict({
        k: 0.05 * jax.random.normal(key, v.shape, v.dtype) if str(k[-1]).endswith("_lora_b")
        else v for key, (k, v) in zip(keys, flat.items())})


def _tokens(config, B=2, T=16):
    return jax.random.randint(jax.random.key(2), (B, T), 0, config.vocab_size)


def test_adapters_sit_beside_every_targeted_weight(tiny, lora, lora_params):
    """One (A, B) pair per targeted weight, in its module, with the shapes the docstring gives;
    nothing else gains or loses a parameter."""
    plain = tu.flatten_dict(flax.core.meta.unbox(init_variables(jax.random.key(0),
                                                                tiny))["params"])
    flat = tu.flatten_dict(lora_params)
    trained, frozen = (tu.flatten_dict(t) for t in adapters.split(lora_params, lora))
    assert set(frozen) == set(plain)
    assert {k: v.shape for k, v in frozen.items()} == {k: v.shape for k, v in plain.items()}
    pairs = {(*k[:-1], str(k[-1])[:-len("_lora_a")]) for k in trained if k[-1].endswith("_a")}
    assert len(trained) == 2 * len(pairs)
    # Attention: 8 projections (w_dq as well, tiny has q compression) in each of the 3 layers
    # and the MTP block; FFN: 3 in the dense layer, the shared experts and the routed experts.
    attn = [p for p in pairs if "attn" in p]
    assert {p[-1] for p in attn} == {"w_dq", "w_uq", "w_qr", "w_dkv", "w_kr", "w_uk", "w_uv",
                                     "w_o"}
    r = lora.adapter_rank
    w_o = ("moe_layers", "layers", "attn", "w_o")                 # [L, N, U, D]: 2 inputs
    L, N, U, D = flat[w_o].shape
    assert flat[(*w_o[:-1], "w_o_lora_a")].shape == (L, N, U, r)
    assert flat[(*w_o[:-1], "w_o_lora_b")].shape == (L, r, D)
    gate = ("moe_layers", "layers", "moe", "w_gate")               # [L, E, D, F]: per expert
    L, E, D, F = flat[gate].shape
    assert flat[(*gate[:-1], "w_gate_lora_a")].shape == (L, E, D, r)
    assert flat[(*gate[:-1], "w_gate_lora_b")].shape == (L, E, r, F)
    # "attention" alone: no FFN adapters; one weight by name: that one only.
    only = adapters.split(flax.core.meta.unbox(init_variables(
        jax.random.key(0), lora.replace(adapter_targets=("attention.w_o",))))["params"],
        lora)[0]
    assert {k[-1] for k in tu.flatten_dict(only)} == {"w_o_lora_a", "w_o_lora_b"}


def test_fresh_adapters_leave_the_model_unchanged(tiny, lora, tiny_variables):
    """B starts at zero, so W' = W + 0 = W: the same logits as the plain model, bit for bit."""
    base = flax.core.meta.unbox(tiny_variables)
    fresh = flax.core.meta.unbox(init_variables(jax.random.key(5), lora))
    trained, _ = adapters.split(fresh["params"], lora)
    params = adapters.combine(trained, base["params"])
    tokens = _tokens(tiny)
    want = Transformer(tiny).apply(base, tokens)
    got = Transformer(lora).apply({**base, "params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    # And `disabled` (GRPO's reference) turns trained adapters off exactly.
    assert all(not np.any(np.asarray(v)) for k, v in
               tu.flatten_dict(adapters.disabled(params, lora)).items() if k[-1].endswith("_b"))


def test_merge_matches_an_independent_reference(lora, lora_params):
    """`merge` gives W + (alpha/r)·A·B, checked per weight against numpy in float64. A sum of r
    products in fp32 is off by at most γ(r)·Σ|a·b| (Higham §3.1), and the addition to W by
    one rounding of the result."""
    merged = tu.flatten_dict(adapters.merge(lora_params, lora))
    flat = tu.flatten_dict(lora_params)
    s, r = lora.adapter_alpha / lora.adapter_rank, lora.adapter_rank
    gamma = r * U32 / (1 - r * U32)
    checked = 0
    for key, a in flat.items():
        if not key[-1].endswith("_lora_a"):
            continue
        w_key = (*key[:-1], key[-1][:-len("_lora_a")])
        w = np.asarray(flat[w_key], np.float64)
        a64 = np.asarray(a, np.float64)
        b64 = np.asarray(flat[(*key[:-1], w_key[-1] + "_lora_b")], np.float64)
        lead = a64.ndim + b64.ndim - 2 - w.ndim
        a2 = a64.reshape(*a64.shape[:lead], -1, r)                           # [*lead, in, r]
        b2 = b64.reshape(*b64.shape[:lead], r, -1)                           # [*lead, r, out]
        prod = (a2 @ b2).reshape(w.shape)
        bound = gamma * s * (np.abs(a2) @ np.abs(b2)).reshape(w.shape) + U32 * np.abs(w + s * prod)
        assert np.all(np.abs(np.asarray(merged[w_key], np.float64) - (w + s * prod)) <= bound)
        checked += 1
    assert checked == len([k for k in flat if k[-1].endswith("_lora_a")]) > 20
    assert not any(adapters.is_adapter(k) for k in merged)


def test_the_plain_model_on_merged_weights_is_the_adapter_model(lora, lora_params):
    """The adapter model (x·W + s·(x·A)·B in each projection, W' = W + s·A·B inside the
    attention cores and experts) and the plain model on `merge`'s weights: the same products
    summed in another order, a few fp32 roundings apart per projection (relative ~1e-7 for
    these well-conditioned random inputs). Some 12 projections in series over 3 layers and the
    MTP block give ~3e-6 relative on the logits; 1e-5 bounds it."""
    tokens = _tokens(lora)
    routing = flax.core.meta.unbox(init_variables(jax.random.key(0), lora)).get("routing", {})
    variables = lambda p: {"params": p, **({"routing": routing} if routing else {})}
    got = Transformer(lora).apply(variables(lora_params), tokens)[0]
    want = Transformer(adapters.plain(lora)).apply(
        variables(adapters.merge(lora_params, lora)), tokens)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # The adapters matter: the base alone gives other logits.
    base = Transformer(adapters.plain(lora)).apply(
        variables(adapters.split(lora_params, lora)[1]), tokens)[0]
    assert np.max(np.abs(np.asarray(base) - np.asarray(got))) > 1e-3


def test_adapter_shardings_follow_their_weight():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    P = jax.sharding.PartitionSpec
    w = jax.sharding.NamedSharding(mesh, P("tensor", None, "fsdp"))      # w_o [N, U, D]
    a = adapters.adapter_sharding(w, (4, 8, 2), (2, 32), 3, "a")
    b = adapters.adapter_sharding(w, (4, 8, 2), (2, 32), 3, "b")
    assert a.spec == P("tensor", None, None) and b.spec == P(None, "fsdp")
    w = jax.sharding.NamedSharding(mesh, P(None, "tensor", "fsdp", None))  # [L, E, D, F]
    a = adapters.adapter_sharding(w, (3, 8, 32, 2), (3, 8, 2, 16), 4, "a")
    b = adapters.adapter_sharding(w, (3, 8, 32, 2), (3, 8, 2, 16), 4, "b")
    assert a.spec == P(None, "tensor", "fsdp", None) and b.spec == P(None, "tensor", None, None)


def test_bad_adapter_settings_are_refused(tiny):
    with pytest.raises(ConfigError, match="not adapter targets"):
        tiny.replace(adapter_rank=4, adapter_targets=("attn",))
    with pytest.raises(ConfigError, match="adapter_rank=-1"):
        tiny.replace(adapter_rank=-1)
    with pytest.raises(ConfigError, match="needs adapter_targets"):
        tiny.replace(adapter_rank=4, adapter_targets=())
    with pytest.raises(ConfigError, match="adapter_alpha"):
        tiny.replace(adapter_rank=4, adapter_alpha=0.0)


@pytest.mark.parametrize("cache_kind", ["latent", "expanded"])
def test_decoding_with_adapters_is_decoding_the_merged_model(lora, lora_params, cache_kind):
    """KV-cached generation of the adapter model (the low-rank term in each cached step, W' in
    the cache's attention) gives the plain model's tokens on the merged weights; log-probs to
    the rounding of the two orders of the same products (1e-5, as for the logits above)."""
    from deepseek_jax.sampling import generate
    routing = flax.core.meta.unbox(init_variables(jax.random.key(0), lora)).get("routing", {})
    prompt = _tokens(lora, B=2, T=5)
    kw = dict(max_new_tokens=6, cache_kind=cache_kind)
    got = generate({"params": lora_params, "routing": routing}, lora, prompt, **kw)
    want = generate({"params": adapters.merge(lora_params, lora), "routing": routing},
                    adapters.plain(lora), prompt, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs),
                               rtol=1e-5, atol=1e-5)
