"""The train step's routed experts and projection weights are cast to the compute dtype one
layer at a time, inside the scanned loops, in the optimized HLO of an ahead-of-time TPU compile
(libtpu's compile-only devices, no TPU needed): no compute-dtype copy of a whole layer stack
(`layers.cast_layer_weight`; with a plain cast this step has bf16 copies of each stack, e.g.
`bf16[3, 2, 128, 256]` for an expert projection). Found in the 671B step on 512 chips
(BENCHMARKS.md), where XLA's bf16 propagation made them; reproduced here on a model that
compiles in seconds, with the same structure: scanned MoE layers with expert parallelism and
FSDP, full remat, bf16 compute, fp32 weights.

And the routed experts' fp32 stacks are read by the layer loop as stored: the FSDP gathers run
in the order libtpu lays each shard out (`fp8_linear.stored_order`), so no relaid-out copy of a
whole stack is made before the loop (V3 on 512 v5p chips had one of `w_down`, 1.59 GiB).
"""

import re

import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu")

_ENTRY_PARAM = re.compile(r"= f32\[([\d,]+)\]\S* parameter\(\d+\).*?op_name=\"state\.params"
                          r"\[\\'moe_layers\\'\]\[\\'layers\\'\]([^\"]*)\"")

# Stacks cast only through `layers.cast_layer_weight`: the routed experts (in the dispatch) and
# the plain projections (`layers.einsum`). With a plain cast each has a bf16 copy here.
CAST_PER_LAYER = {"['moe']['w_gate']", "['moe']['w_up']", "['moe']['w_down']",
                  "['moe']['shared']['w_gate']", "['moe']['shared']['w_up']",
                  "['moe']['shared']['w_down']", "['attn']['w_o']", "['attn']['w_dq']",
                  "['attn']['w_dkv']", "['attn']['w_kr']"}


@pytest.fixture(scope="module")
def step_hlo():
    """The optimized HLO of the train step, and the shapes of its MoE layer stacks by name."""
    from deepseek_jax.config import get_config
    from deepseek_jax.tools.compile import Strategy, compile_strategy
    from deepseek_jax.tools.targets import parse_target
    # Three scanned MoE layers: no other axis here has 3 (fsdp 2, expert 4, 2 experts per
    # device), so a stack's shape names only the stack; with two layers a gathered expert
    # shard, [fsdp, experts, F, D/fsdp], has w_down's stack shape. D = 224: each FSDP shard
    # holds 112 rows of D, less than libtpu's 128 lanes, as V3's 7168 over 64 chips does, so
    # the `w_down` shard [E, F, D/fsdp] is stored F-minor.
    c = get_config("tiny", vocab_size=512, d_model=224, n_layers=4, n_dense_layers=1,
                   n_routed_experts=8, n_experts_per_token=2, moe_d_ff=256, mtp_depth=0,
                   remat_policy="full", dtype=jnp.bfloat16)
    hlo = compile_strategy(c, Strategy.make("fsdp_ep", {"fsdp": 2, "expert": 4}),
                           parse_target("tpu-v5p-16").devices(), 8, 128, keep_hlo=True)["hlo"]
    stacks = {name.replace("\\'", "'"): dims for dims, name in _ENTRY_PARAM.findall(hlo)}
    return hlo, stacks


def test_weights_are_cast_one_layer_at_a_time(step_hlo):
    hlo, stacks = step_hlo
    assert CAST_PER_LAYER <= set(stacks), sorted(stacks)
    for name in CAST_PER_LAYER:
        dims = stacks[name]
        assert int(dims.split(",")[0]) == 3                     # the scanned MoE layers
        assert f"bf16[{dims}]" not in hlo, f"{name}: a bf16 copy of the whole stack"


def test_expert_stacks_are_not_relaid_out_before_the_loop(step_hlo):
    # Before: `f32[3,2,256,112]{2,3,0,1} copy(...)` of w_down (stored {2,3,1,0}: F minor), made
    # for its gather along D, the minor axis of the logical shape.
    hlo, stacks = step_hlo
    for name in ("['moe']['w_gate']", "['moe']['w_up']", "['moe']['w_down']"):
        dims = stacks[name]
        copies = re.findall(rf"= f32\[{dims}\]\{{[^}}]*\}} copy\(", hlo)
        assert not copies, f"{name}: {copies}"
