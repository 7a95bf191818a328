"""The train step's routed experts are cast to the compute dtype one layer at a time, inside
the scanned loops, in the optimized HLO of an ahead-of-time TPU compile (libtpu's compile-only
devices, no TPU needed): no compute-dtype copy of a whole layer stack
(`layers.cast_layer_weight`; with a plain cast this step has `bf16[2, 2, 128, 256]` copies of
each stack). Found in the 671B step on 512 chips (BENCHMARKS.md), where XLA's bf16 propagation
made them; reproduced here on a model that compiles in seconds, with the same structure:
scanned MoE layers with expert parallelism and FSDP, full remat, bf16 compute, fp32 weights.
"""

import re

import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu")

_ENTRY_PARAM = re.compile(r"= f32\[([\d,]+)\]\S* parameter\(\d+\).*?op_name=\"state\.params"
                          r"\[\\'moe_layers\\'\].*?\[\\'(w_gate|w_up|w_down)\\'\]")


def test_expert_weights_are_cast_one_layer_at_a_time():
    from deepseek_jax.config import get_config
    from deepseek_jax.tools.compile import Strategy, compile_strategy
    from deepseek_jax.tools.targets import parse_target
    c = get_config("tiny", vocab_size=512, d_model=256, n_layers=3, n_dense_layers=1,
                   n_routed_experts=8, n_experts_per_token=2, moe_d_ff=256, mtp_depth=0,
                   remat_policy="full", dtype=jnp.bfloat16)
    hlo = compile_strategy(c, Strategy.make("fsdp_ep", {"fsdp": 2, "expert": 4}),
                           parse_target("tpu-v5p-16").devices(), 8, 128, keep_hlo=True)["hlo"]
    stacks = {name: dims for dims, name in _ENTRY_PARAM.findall(hlo)}
    assert set(stacks) == {"w_gate", "w_up", "w_down"}, stacks
    for name, dims in stacks.items():
        assert int(dims.split(",")[0]) == 2                     # the two scanned MoE layers
        assert f"bf16[{dims}]" not in hlo, f"{name}: a bf16 copy of the whole stack"
