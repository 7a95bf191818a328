"""The rule table and presets on the tiny model: which mesh axes named parameters get under each
preset, the shardings of a whole TrainState and a batch, the checks made before compiling, and
that the model's activation constraints reach the lowered program."""

import flax
import ml_collections
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel as par
from deepseek_jax.config import get_config
from deepseek_jax.model import Transformer
from deepseek_jax.train.sharded import abstract_variables
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import init_train_state
from deepseek_jax.train import sharded

MOE = ("moe_layers", "layers", "moe")
ATTN = ("moe_layers", "layers", "attn")

# preset → {param path: expected mesh PartitionSpec} on 8 devices with the preset's default mesh.
EXPECTED = {
    "dp": {MOE + ("w_gate",): P(None, None, None, None), ("embed",): P(None, None)},
    "fsdp": {MOE + ("w_gate",): P(None, None, "fsdp", None), ("embed",): P(None, "fsdp"),
             ATTN + ("w_uk",): P(None, "fsdp", None, None), ("lm_head",): P("fsdp", None)},
    "fsdp_tp": {MOE + ("w_gate",): P(None, None, "fsdp", "tensor"),
                MOE + ("w_down",): P(None, None, "tensor", "fsdp"),
                ("embed",): P("tensor", "fsdp"), ("lm_head",): P("fsdp", "tensor"),
                ATTN + ("w_o",): P(None, "tensor", None, "fsdp")},
    # Under expert parallelism the weights without an E dimension are split over the expert
    # ranks too (ZeRO across them); the routed experts' D stays on fsdp alone.
    "fsdp_ep": {MOE + ("w_gate",): P(None, "expert", "fsdp", None),
                MOE + ("router",): P(None, "fsdp", "expert"),
                ("embed",): P(None, ("fsdp", "expert")),
                ATTN + ("w_dq",): P(None, ("fsdp", "expert"), None),
                ATTN + ("w_uk",): P(None, ("fsdp", "expert"), None, None)},
    "dp_ep_tp": {MOE + ("w_gate",): P(None, "expert", None, "tensor"),
                 MOE + ("shared", "w_up"): P(None, "expert", "tensor"),
                 ("embed",): P("tensor", "expert"), ATTN + ("w_dq",): P(None, "expert", None)},
    # Context ranks hold the weights as fsdp ranks do (ZeRO over them as well).
    "fsdp_cp": {MOE + ("w_gate",): P(None, None, ("fsdp", "context"), None),
                ("embed",): P(None, ("fsdp", "context")),
                ATTN + ("w_uk",): P(None, ("fsdp", "context"), None, None)},
    # With expert ranks too: the experts split over them, the other weights over all three.
    "fsdp_ep_cp": {MOE + ("w_gate",): P(None, "expert", ("fsdp", "context"), None),
                   ("embed",): P(None, ("fsdp", "context", "expert")),
                   ATTN + ("w_uk",): P(None, ("fsdp", "context", "expert"), None, None)},
}
BATCH = {"dp": "data", "fsdp": "fsdp", "fsdp_tp": "fsdp", "fsdp_ep": ("fsdp", "expert"),
         "dp_ep_tp": ("data", "expert"), "fsdp_cp": "fsdp", "fsdp_ep_cp": ("fsdp", "expert")}
LENGTH = {"fsdp_cp": "context", "fsdp_ep_cp": "context"}   # whole under the others


def _setup(preset, mesh_config=None):
    mesh = par.make_mesh(mesh_config or par.default_mesh_config(preset, 8))
    return mesh, par.logical_axis_rules(preset, mesh)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_default_meshes():
    assert par.default_mesh_config("fsdp_tp", 8) == {"fsdp": -1, "tensor": 4}
    assert par.default_mesh_config("fsdp_tp", 2) == {"fsdp": -1, "tensor": 2}
    assert par.default_mesh_config("dp_ep_tp", 1) == {"data": -1, "expert": 1, "tensor": 1}
    shapes = {p: dict(_setup(p)[0].shape) for p in par.PRESETS}
    assert shapes["fsdp_ep"] == {"dcn_data": 1, "data": 1, "stage": 1, "fsdp": 2, "context": 1,
                                 "expert": 4, "tensor": 1}
    assert shapes["dp_ep_tp"] == {"dcn_data": 1, "data": 2, "stage": 1, "fsdp": 1, "context": 1, "expert": 2,
                                  "tensor": 2}
    assert shapes["fsdp_cp"] == {"dcn_data": 1, "data": 1, "stage": 1, "fsdp": 2, "context": 4, "expert": 1,
                                 "tensor": 1}
    assert shapes["fsdp_ep_cp"] == {"dcn_data": 1, "data": 1, "stage": 1, "fsdp": 2, "context": 2,
                                    "expert": 2, "tensor": 1}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_param_specs_per_preset(tiny, preset):
    mesh, rules = _setup(preset)
    shardings = sharded.param_shardings(tiny, mesh, rules)
    for path, spec in EXPECTED[preset].items():
        assert _get(shardings["params"], path).spec == spec, (preset, path)
    bias = _get(shardings["routing"], MOE + ("bias",)).spec
    assert bias == (P(None, "expert") if "ep" in preset else P(None, None))
    assert par.batch_sharding(mesh, rules).spec == P(BATCH[preset], LENGTH.get(preset))


def test_state_shardings_mirror_params(tiny):
    mesh, rules = _setup("fsdp_ep")
    tx = make_optimizer(1e-3)
    s = sharded.state_shardings(tiny, mesh, rules, tx)
    assert s.step.spec == P()
    adam = s.opt_state[1][0]                  # clip → (adamw: scale_by_adam, mask, lr)
    assert adam.count.spec == P()
    for tree in (adam.mu, adam.nu):
        assert jax.tree.map(lambda a: a.spec, tree) == jax.tree.map(lambda a: a.spec, s.params)


def test_preset_refuses_axes_it_does_not_use():
    mesh = par.make_mesh({"data": 4, "fsdp": 2})
    with pytest.raises(par.MeshError, match=r"preset 'dp' does not use mesh axis fsdp=2; set "
                                            r"mesh.fsdp=1 or choose a preset that uses it "
                                            r"\(fsdp, fsdp_tp, fsdp_ep, fsdp_cp, fsdp_ep_cp, fsdp_pp, fsdp_ep_pp\)"):
        par.logical_axis_rules("dp", mesh)
    with pytest.raises(par.MeshError, match="unknown parallelism preset 'zero3'"):
        par.get_preset("zero3")
    # data is allowed beside fsdp (hybrid sharding), and the batch spans both.
    rules = par.logical_axis_rules("fsdp", mesh)
    assert par.batch_axes(rules) == ("data", "fsdp")


def test_validate_heads_vocab_ffn_not_divisible():
    c = get_config("tiny", n_heads=6, vocab_size=66, d_ff=66, moe_d_ff=18, kv_lora_rank=17)
    mesh, rules = _setup("fsdp_tp")                     # fsdp=2, tensor=4
    with pytest.raises(par.MeshError) as err:
        sharded.validate(c, mesh, rules, global_batch=8)
    msg = str(err.value)
    assert "n_heads=6 is not divisible by tensor=4; use tensor in {1, 2}, or change n_heads" in msg
    assert ("vocab_size=66 is not divisible by tensor=4 and is not padded automatically; use "
            "tensor in {1, 2}, or change vocab_size (e.g. pad it to 68)") in msg
    assert "d_ff=66 is not divisible by tensor=4; use tensor in {1, 2}, or change d_ff" in msg
    assert "moe_d_ff=18 is not divisible by tensor=4" in msg
    assert "dimension 'kv_lora' of size 17 is not divisible by fsdp=2" in msg


def test_validate_experts_and_batch_not_divisible():
    c = get_config("tiny", n_routed_experts=12, n_expert_groups=4)
    mesh, rules = _setup("fsdp_ep", {"fsdp": 1, "expert": 8})
    with pytest.raises(par.MeshError) as err:
        sharded.validate(c, mesh, rules, global_batch=12)
    msg = str(err.value)
    assert ("n_routed_experts=12 is not divisible by expert=8; use expert in {1, 2, 4}, or "
            "change n_routed_experts") in msg
    assert ("global batch 12 is not divisible by the batch axes expert=8 = 8; use a global "
            "batch that is a multiple of 8") in msg


def test_activation_constraints_reach_the_program(tiny):
    """The sharded step traces inside `sharding_context`, so the block-boundary constraints
    appear in its lowered program with the preset's axes; traced outside the context they
    vanish (Flax makes them no-ops), which is why the step enters it on every call."""
    mesh, rules = par.mesh_and_rules("fsdp_ep")
    tx = make_optimizer(1e-3)
    state = jax.eval_shape(lambda r: init_train_state(r, tiny, tx), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    step = sharded.make_sharded_train_step(tiny, tx, mesh, rules)
    text = step.lower(state, {"tokens": tokens}).as_text()
    constraints = [l for l in text.splitlines() if "sharding_constraint" in l]
    assert any('[{"fsdp", "expert"}, {}, {}]' in l for l in constraints), constraints

    variables = flax.core.meta.unbox(abstract_variables(tiny))
    forward = jax.jit(lambda v, t: Transformer(tiny).apply(v, t)[0])
    assert "sharding_constraint" not in forward.lower(variables, tokens).as_text()


def test_run_mesh_config_with_only_dcn_data_keeps_the_preset_per_group():
    # Launchers add only --config.mesh.dcn_data (-1 on TPU slices, the host count on SLURM):
    # the ICI axes keep the preset's default shape over one group's devices. Before, the ICI
    # axes became 1 and no mesh of that size covered the devices.
    from deepseek_jax.parallel import resolve_mesh_shape, run_mesh_config
    section = ml_collections.ConfigDict(dict(preset="fsdp_tp", dcn_data=-1, data=0, fsdp=0,
                                             expert=0, tensor=0))
    sizes = run_mesh_config(section, 16, n_slices=2)
    assert sizes == {"dcn_data": 2, "fsdp": -1, "tensor": 4}
    assert resolve_mesh_shape(sizes, 16, 2) == {"dcn_data": 2, "data": 1, "stage": 1,
                                                "fsdp": 2, "context": 1, "expert": 1,
                                                "tensor": 4}
    section.dcn_data = 0
    assert run_mesh_config(section, 16) == {"dcn_data": 1, "fsdp": -1, "tensor": 4}
    section.dcn_data, section.fsdp = 2, 4
    assert run_mesh_config(section, 16) == {"dcn_data": 2, "data": 1, "stage": 1, "fsdp": 4, "context": 1,
                                            "expert": 1, "tensor": 1}
    # One axis given: the preset's fill axis (fsdp here) takes the rest, as in the planner.
    section.dcn_data, section.fsdp, section.tensor = 0, 0, 2
    assert run_mesh_config(section, 16) == {"dcn_data": 1, "data": 1, "stage": 1, "fsdp": -1, "context": 1,
                                            "expert": 1, "tensor": 2}
    assert resolve_mesh_shape(run_mesh_config(section, 16), 16)["fsdp"] == 8
    section.dcn_data = -1                           # a launcher's slices, with the axis given
    assert run_mesh_config(section, 16, n_slices=2)["fsdp"] == -1
