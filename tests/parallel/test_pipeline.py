"""Pipeline parallelism (`model/pipeline.py`): the GPipe schedule gives the unpipelined stack's
loss, gradients and MoE statistics, with and without a stage axis on the mesh, and bad settings
fail before anything compiles.

The model is tiny with 5 layers (1 dense, 4 MoE): 2 stages of 2 MoE layers each, so each stage
runs a scanned stack, not a single block. Tolerances (tests/numerics.py), B·T = 128 tokens:
  - the loss is a mean of positive per-token terms (κ = 1) over the 128 tokens and each
    softmax's V = 64 logits: 2·γ(192) relative.
  - gradients, per leaf in norm: the same sums over the same 128 tokens, split into micro-
    batches, so 2·γ(128)·κ with κ ≤ 20, as in test_sharded_parity.py (which runs the pipeline
    presets through three optimizer steps).
  - expert loads are integer counts, summed over the micro-batches: exact unless a token's
    X-th and (X+1)-th expert scores tie within rounding (test_sharded_parity.py: ~1e-3 per run);
    balance losses are means of per-sequence terms averaged over micro-batches of equal size:
    the loss's tolerance.
"""

import flax
import jax
import numpy as np
import pytest

from deepseek_jax import parallel as par
from deepseek_jax.config import ConfigError, MeshError
from deepseek_jax.model import init_variables, pipeline
from deepseek_jax.train import run, sharded
from deepseek_jax.train.step import loss_and_grads
from numerics import assert_leaves_close_in_norm, gradient_rtol

LOSS_RTOL = gradient_rtol(128 + 64, 1.0)
GRAD_RTOL = gradient_rtol(128, 20.0)


@pytest.fixture(scope="module")
def deep(tiny):
    return tiny.replace(n_layers=5)


@pytest.fixture(scope="module")
def inputs(deep):
    variables = jax.device_get(flax.core.meta.unbox(init_variables(jax.random.key(0), deep)))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, deep.vocab_size))
    # two rows half padding: the statistics must leave the padding out under the pipeline too
    mask = np.ones((8, 16), bool)
    mask[[1, 6], 8:] = False
    return variables, {"tokens": tokens, "token_mask": mask}


def _loss_and_grads(config, variables, batch, accumulate=1, preset=None, mesh_config=None):
    fn = jax.jit(lambda p, r, b: loss_and_grads(p, r, b, config, accumulate))
    if preset is None:
        return jax.device_get(fn(variables["params"], variables["routing"], batch))
    mesh, rules = par.mesh_and_rules(preset, mesh_config)
    sharded.validate(config, mesh, rules, batch["tokens"].shape[0])
    shardings = sharded.param_shardings(config, mesh, rules)
    params = jax.device_put(variables["params"], shardings["params"])
    with par.sharding_context(mesh, rules):
        return jax.device_get(fn(params, variables["routing"], batch))


@pytest.fixture(scope="module")
def reference(deep, inputs):
    return _loss_and_grads(deep, *inputs)


def _assert_same(got, want):
    (loss, parts, stats, grads), (loss0, parts0, stats0, grads0) = got, want
    np.testing.assert_allclose(loss, loss0, rtol=LOSS_RTOL)
    for k in parts0:
        np.testing.assert_allclose(parts[k], parts0[k], rtol=LOSS_RTOL, atol=1e-7, err_msg=k)
    assert jax.tree.structure(stats) == jax.tree.structure(stats0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(stats0), jax.tree.leaves(stats)):
        assert a.shape == b.shape, jax.tree_util.keystr(path)
        if "load" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(b, a, rtol=LOSS_RTOL, err_msg=jax.tree_util.keystr(path))
    assert_leaves_close_in_norm(grads, grads0, GRAD_RTOL, "grad ")


@pytest.mark.parametrize("microbatches, accumulate", [(2, 1), (4, 1), (8, 1), (2, 2)])
def test_schedule_gives_the_unpipelined_stack(deep, inputs, reference, microbatches,
                                              accumulate):
    """No mesh: the schedule alone (vmapped stages, shifts as concatenations). M = 8 has one
    row a micro-batch; (2, 2) runs the pipeline inside gradient accumulation."""
    config = deep.replace(pipeline_stages=2, pipeline_microbatches=microbatches)
    _assert_same(_loss_and_grads(config, *inputs, accumulate=accumulate), reference)


@pytest.mark.parametrize("preset, mesh_config, microbatches", [
    ("fsdp_pp", {"stage": 2, "fsdp": 4}, 2),
    ("fsdp_ep_pp", {"stage": 2, "fsdp": 2, "expert": 2}, 2),   # the MoE dispatch in each stage
    ("fsdp_pp", {"stage": 4, "fsdp": 2}, 4),                   # a chain of 4, a layer each
])
def test_stages_on_the_mesh_give_the_unpipelined_stack(deep, inputs, reference, preset,
                                                       mesh_config, microbatches):
    config = deep.replace(pipeline_stages=mesh_config["stage"],
                          pipeline_microbatches=microbatches)
    _assert_same(_loss_and_grads(config, *inputs, preset=preset, mesh_config=mesh_config),
                 reference)


def test_shift_is_a_permute_over_stage(deep, inputs):
    """The compiled step hands activations between stages with collective permutes, and no
    device gathers the other stage's layers: its parameter shards are half the MoE stack."""
    config = deep.replace(pipeline_stages=2, pipeline_microbatches=2)
    mesh, rules = par.mesh_and_rules("fsdp_pp", {"stage": 2, "fsdp": 4})
    shardings = sharded.param_shardings(config, mesh, rules)
    w = shardings["params"]["moe_layers"]["layers"]["moe"]["w_gate"]
    assert w.spec[0] == "stage"
    assert w.shard_shape((4, 8, 32, 16))[0] == 2                   # layers of one stage
    variables, batch = inputs
    fn = jax.jit(lambda p, r, b: loss_and_grads(p, r, b, config)[3])
    with par.sharding_context(mesh, rules):
        text = fn.lower(jax.device_put(variables["params"], shardings["params"]),
                        variables["routing"], batch).compile().as_text()
    assert "collective-permute" in text


def test_bad_settings_name_the_fix(deep, tiny, inputs):
    with pytest.raises(ConfigError, match="divides no layer stack .*use a stage count"):
        tiny.replace(pipeline_stages=3)                       # dense 1, MoE 2
    with pytest.raises(ConfigError, match="scan_layers=True"):
        deep.replace(pipeline_stages=2, scan_layers=False)
    mesh, rules = par.mesh_and_rules("fsdp_pp", {"stage": 2, "fsdp": 4})
    with pytest.raises(MeshError, match="set model.pipeline_stages=2"):
        sharded.validate(deep, mesh, rules, 8)
    mesh1, rules1 = par.mesh_and_rules("fsdp", {"fsdp": 8})
    with pytest.raises(MeshError, match="set mesh.stage=2 with a pipeline preset"):
        sharded.validate(deep.replace(pipeline_stages=2), mesh1, rules1, 8)
    # The trainers take the stage count from the mesh (`run.scheduled`).
    section = {"pipeline_microbatches": 4}
    assert run.scheduled(deep, mesh, section).pipeline_stages == 2
    assert run.scheduled(deep, mesh, section).pipeline_microbatches == 4
    assert run.scheduled(deep, mesh, {}).n_microbatches == 4            # 2 × stages
    with pytest.raises(MeshError, match="mesh.stage=4: pipeline_stages=4 divides no layer stack"):
        run.scheduled(tiny, par.make_mesh({"stage": 4, "fsdp": 2}), {})
    with pytest.raises(MeshError, match="model.pipeline_stages=2 but mesh.stage=1"):
        run.scheduled(deep.replace(pipeline_stages=2), mesh1, {})
    # 8 rows in 4 micro-batches of 2 cannot split over fsdp=4: said while tracing, before XLA
    config = deep.replace(pipeline_stages=2, pipeline_microbatches=4)
    variables, batch = inputs
    with pytest.raises(ValueError, match="pipeline_microbatches=4.*fsdp = 4.*divides 2"):
        with par.sharding_context(mesh, rules):
            jax.eval_shape(lambda p: loss_and_grads(p, variables["routing"], batch, config),
                           variables["params"])


def test_rows_round_trip():
    x = np.arange(24).reshape(12, 2)
    split = pipeline.split_rows(x, 3)                          # [3, 4, 2]
    np.testing.assert_array_equal(split[1], x[1::3])
    np.testing.assert_array_equal(pipeline.merge_rows(split), x)


def test_ragged_expert_exchange_inside_the_stages_lowers(deep, inputs):
    """On TPU and GPU the expert exchange is `ragged_all_to_all`, which JAX cannot batch with
    unbatched offsets (what vmapping the stages would need): each stage runs in a shard_map
    manual over "stage" instead. Lowered for TPU from this host: the exchange is in the step,
    unbatched, beside the stage permutes."""
    config = deep.replace(pipeline_stages=2, pipeline_microbatches=2,
                          moe_ep_transport="ragged_all_to_all")
    mesh, rules = par.mesh_and_rules("fsdp_ep_pp", {"stage": 2, "fsdp": 2, "expert": 2})
    variables, batch = inputs
    fn = jax.jit(lambda p, r, b: loss_and_grads(p, r, b, config)[3])
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    with par.sharding_context(mesh, rules):
        text = fn.trace(shapes["params"], shapes["routing"], batch).lower(
            lowering_platforms=("tpu",)).as_text()
    assert "ragged_all_to_all" in text and "collective_permute" in text
