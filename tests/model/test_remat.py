"""Rematerialization over named activations: what each policy keeps for the backward pass, the
spec's errors, and the planner's FLOP and memory accounting of it. (That the gradients do not
depend on the policy is checked with the other equivalent paths in test_transformer.py.)"""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.config import ConfigError, get_config, remat_names
from deepseek_jax.model import attention
from deepseek_jax.model.blocks import Block, remat_policy
from deepseek_jax.tools import cost_model

ATTENTION = {"q_latent", "query", "kv_latent", "key_value", "context", "attn_out"}
# What the backward pass of a block reads, by name: every projection output but the FFN's last
# (mlp_out: the residual add's backward needs no value; the next norm reads x + out, recomputed
# from the layer input and attn_out or, at the block's end, not needed at all). The MoE block's
# shared experts are an MLP (mlp_hidden); its routed experts add expert_*.
DENSE_READ = ATTENTION | {"mlp_hidden"}
MOE_READ = DENSE_READ | {"expert_rows", "expert_hidden", "expert_out"}


def _saved(moe: bool, policy: str, backend: str = "einsum") -> tuple[set[str], list[str], str]:
    """(names saved, residuals that are neither named, arguments nor constants, the jaxpr of
    the block's gradient) for one tiny block under `policy`, attention by `backend`."""
    c = get_config("tiny", attention_backend=backend)
    x = jax.random.normal(jax.random.key(0), (2, 8, c.d_model))              # [B, T, D]
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))                           # [B, T]
    probe = jax.random.normal(jax.random.key(2), x.shape)                   # [B, T, D]
    block = Block(c, moe)
    variables = block.init(jax.random.key(1), x, pos, attention.SelfMask())

    def loss(params, x):                # linear in the output: its backward reads no value
        (y, _), _ = block.apply({**variables, "params": params}, x, pos, attention.SelfMask(),
                                mutable=["moe_stats"])
        return jnp.sum(y * probe)

    f = jax.checkpoint(loss, policy=remat_policy(policy))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, variables["params"], x)
    lines = out.getvalue().splitlines()
    names = {m.group(1) for line in lines if (m := re.search(r"named '(\w+)'", line))}
    other = [line for line in lines if not re.search(r"named '|from the argument|from a "
                                                     r"constant|device_put", line)]
    jaxpr = str(jax.make_jaxpr(jax.grad(f))(variables["params"], x))
    return names, other, jaxpr


@pytest.mark.parametrize("moe, backend", [(False, "einsum"), (True, "einsum"),
                                         (True, "blockwise")])
@pytest.mark.parametrize("policy, keeps", [
    ("minimal", lambda read: read),
    ("save_attention", lambda read: ATTENTION),
    ("custom:context=save,expert_out=save", lambda read: {"context", "expert_out"} & read),
    ("full", lambda read: set()),
])
def test_each_policy_saves_the_named_activations_it_lists_and_nothing_else(moe, backend, policy,
                                                                           keeps):
    """With the einsum core and with a fused one (blockwise: its own custom VJP, whose
    residuals, like the softmax statistics, are recomputed with the rest)."""
    names, other, _ = _saved(moe, policy, backend)
    assert names == keeps(MOE_READ if moe else DENSE_READ)
    assert other == []                # no unnamed intermediate (norms, RoPE, SiLU, softmax)


def test_offloaded_layer_input_goes_to_host_memory_and_back():
    """The block's input, offloaded: the forward pass moves it to pinned host memory and the
    backward pass brings it back to the device (on CPU both are the same memory, but the
    transfers are in the program, as on TPU and GPU; the TPU compile is in test_plan.py)."""
    names, other, jaxpr = _saved(True, "custom:layer_input=offload,expert_rows=save")
    assert names == {"expert_rows"} and other == []
    on_host = "f32<host>[2,8,32]"           # a [B, T, D] value in host memory
    assert on_host in jaxpr
    _, _, kept = _saved(True, "custom:expert_rows=save")
    assert on_host not in kept


@pytest.mark.parametrize("spec, fragment", [
    ("custom:contxt=save", "NAME one of"),
    ("custom:context=keep", "ACTION one of ('save', 'offload')"),
    ("custom:context", "NAME=ACTION"),
    ("custom:context=save,context=offload", "once per NAME"),
    ("save_everything", "custom:NAME=ACTION"),
])
def test_malformed_specs_say_what_to_write(spec, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        get_config("tiny", remat_policy=spec)


def test_presets_and_specs_read_as_name_to_action():
    assert remat_names("full") is None and remat_names("dots_saveable") is None
    assert remat_names("custom:") == {}
    assert remat_names("custom:layer_input=offload,context=save") == {
        "layer_input": "offload", "context": "save"}
    assert set(remat_names("save_attention")) == ATTENTION


def test_recomputed_flops_follow_what_the_policy_keeps():
    """Per token, by hand from the shapes, over the main stack's blocks (the rematerialized
    ones): "minimal" keeps every projection, so each block's attention core, N·(H+R+U)·T
    forward FLOPs, and each MoE block's router, 2·D·E, are recomputed; "save_attention" also
    recomputes every FFN's three projections (2·3·D·F per dense FFN, 2·3·D·F·(X + shared) per
    MoE block); "full" recomputes every projection of the block, as a spec that keeps nothing
    on the device does."""
    c = get_config("tiny")
    T = 32
    D, N, Q, C = c.d_model, c.n_heads, c.q_lora_rank, c.kv_lora_rank
    H, R, U = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    dense, moe = c.n_layers - c.n_moe_layers, c.n_moe_layers
    core = N * (H + R + U) * T
    router = 2 * D * c.n_routed_experts * moe
    ffn = 6 * D * c.d_ff * dense + 6 * D * c.moe_d_ff * (c.n_experts_per_token
                                                         + c.n_shared_experts) * moe
    attention_proj = 2 * (D * Q + Q * N * (H + R) + D * (C + R) + C * N * (H + U) + N * U * D)
    got = lambda policy: cost_model.recomputed_flops_per_token(c.replace(remat_policy=policy), T)
    assert got("none") == 0
    assert got("minimal") == c.n_layers * core + router
    assert got("save_attention") == c.n_layers * core + router + ffn
    assert got("full") == got("custom:layer_input=offload") == (
        c.n_layers * (core + attention_proj) + router + ffn)


def test_activation_memory_follows_what_the_policy_keeps():
    """Against "full" (one [B, T, D] input per block): offloading the input frees it, and
    saving the context adds N·U per token and block."""
    c = get_config("tiny")
    sizes, B, T = {"fsdp": 1}, 4, 32
    rules = cost_model.rules_for("fsdp", sizes)
    act = lambda policy: cost_model.activation_bytes(c.replace(remat_policy=policy), sizes,
                                                     rules, B, T)
    per_token = B * T * jnp.dtype(c.dtype).itemsize * (c.n_layers + c.mtp_depth)
    assert act("full") - act("custom:layer_input=offload") == pytest.approx(
        per_token * c.d_model)
    assert act("custom:context=save") - act("full") == pytest.approx(
        per_token * c.n_heads * c.v_head_dim)


def test_keeping_the_exchanged_rows_spares_the_recomputed_exchange():
    """Expert parallelism: the forward and backward exchanges (2 passes), and under remat a
    third for the recomputed forward, unless the policy keeps the rows received and the
    outputs returned (minimal does; save_attention recomputes the experts)."""
    from deepseek_jax.tools.targets import parse_target
    c = get_config("tiny")
    sizes = {"fsdp": 2, "expert": 4}

    def a2a(policy):
        est = cost_model.estimate(c.replace(remat_policy=policy), sizes, "fsdp_ep", 8, 32,
                                  parse_target("cpu-8"))
        return est.comm_bytes["all-to-all"]
    assert a2a("full") > a2a("none")
    assert a2a("minimal") == pytest.approx(a2a("none"))
    assert a2a("save_attention") == pytest.approx(a2a("full"))
