"""The converter: HF folder → sharded Orbax checkpoint → restored onto meshes, same logits."""

import json
import os
from unittest import mock

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import parallel
from deepseek_jax.hf import (MTPWeightsMissing, convert_to_orbax, load_hf_checkpoint,
                                     restore_converted)
from deepseek_jax.hf import convert as convert_module
from deepseek_jax.hf.convert import main, train_state_from_converted
from deepseek_jax.train import checkpoint as train_ckpt
from deepseek_jax.train import sharded
from hf_helpers import ATOL, FP32, RTOL, fixture, flat, forward, reference


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """v3 converted on an fsdp=8 mesh in float32, small read chunks, three or more partial saves."""
    out = str(tmp_path_factory.mktemp("v3_orbax"))
    with mock.patch.object(convert_module, "_save_group",
                           wraps=convert_module._save_group) as save:
        config = convert_to_orbax(fixture("v3"), out, preset="fsdp",
                                  mesh_config={"fsdp": 8}, dtype=jnp.float32,
                                  chunk_bytes=2048, group_bytes=100 * 1024)
    assert save.call_count >= 3                       # ~330 KB in groups of ≤ 100 KB
    return out, config


def test_converted_checkpoint_layout(converted):
    out, config = converted
    assert os.path.isdir(os.path.join(out, "checkpoints", "0", "state"))
    with open(os.path.join(out, "model_config.json")) as f:
        fields = json.load(f)
    assert fields["param_dtype"] == "float32" and fields["mtp_depth"] == 1
    assert os.path.exists(os.path.join(out, "hf_config.json"))


def test_restores_onto_meshes_with_the_values_of_a_direct_load(converted):
    out, _ = converted
    _, direct = load_hf_checkpoint(fixture("v3"))
    direct = flat(direct)
    for preset, sizes in (("fsdp", {"fsdp": 8}), ("fsdp_tp", {"fsdp": 2, "tensor": 4})):
        mesh, rules = parallel.mesh_and_rules(preset, sizes)
        config, variables = restore_converted(out, mesh, rules)
        want = sharded.param_shardings(config, mesh, rules)
        w_up = variables["params"]["moe_layers"]["layers"]["moe"]["w_up"]     # [L, E, D, F]
        assert w_up.sharding.is_equivalent_to(
            want["params"]["moe_layers"]["layers"]["moe"]["w_up"], w_up.ndim)
        assert w_up.addressable_shards[0].data.shape == (
            (2, 8, 4, 16) if preset == "fsdp" else (2, 8, 16, 4))
        got = flat(variables)
        assert got.keys() == direct.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], direct[k], err_msg=k)
    _, trained = train_ckpt.load_trained(out)      # what GRPO starts a policy from
    np.testing.assert_array_equal(trained["routing"]["moe_layers"]["layers"]["moe"]["bias"],
                                  direct["routing/moe_layers/layers/moe/bias"])


def test_a_training_run_can_start_from_it(converted):
    out, config = converted
    mesh, rules = parallel.mesh_and_rules("fsdp", {"fsdp": 8})
    tx = optax.adamw(1e-3)
    state = train_state_from_converted(out, config, tx, mesh, rules)
    assert int(state.step) == 0
    mu = state.opt_state[0].mu["embed"]
    assert mu.shape == (64, 32) and not np.any(np.asarray(mu))
    assert mu.sharding.is_equivalent_to(state.params["embed"].sharding, 2)
    with pytest.raises(ValueError, match="different parameter shapes"):
        train_state_from_converted(out, config.replace(d_ff=64), tx, mesh, rules)


def test_command_line_conversion_restores_onto_the_mesh_with_the_same_logits(tmp_path):
    out = str(tmp_path / "moon")
    with pytest.warns(MTPWeightsMissing):              # declared, not saved by transformers
        main(["--hf", fixture("moonlight"), "--out", out, "--preset", "fsdp", "--mesh",
              "fsdp=8", "--dtype", "float32"])
    mesh, rules = parallel.mesh_and_rules("fsdp", {"fsdp": 8})
    config, variables = restore_converted(out, mesh, rules)
    assert config.mtp_depth == 0 and variables["params"]["embed"].dtype == jnp.float32
    assert len(variables["params"]["lm_head"].addressable_shards) == 8
    ref = reference("moonlight")
    tokens = jnp.asarray(np.tile(ref["tokens"], (4, 1)))     # batch 8: splits over fsdp=8
    with parallel.sharding_context(mesh, rules):
        logits, _ = forward(config.replace(**FP32))(variables, tokens)
    np.testing.assert_allclose(logits[:2], ref["logits"], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(logits[6:], ref["logits"], atol=ATOL, rtol=RTOL)
    with pytest.raises(FileExistsError, match="new --out"):
        convert_to_orbax(fixture("moonlight"), out, preset="fsdp", mesh_config={"fsdp": 8})


def test_bfloat16_conversion_keeps_the_routing_bias_in_float32(tmp_path):
    with pytest.warns(MTPWeightsMissing):
        config = convert_to_orbax(fixture("moonlight"), str(tmp_path), mesh_config={"fsdp": 8})
    assert config.param_dtype == jnp.bfloat16
    _, variables = restore_converted(str(tmp_path))
    assert variables["params"]["embed"].dtype == jnp.bfloat16
    assert variables["routing"]["moe_layers"]["layers"]["moe"]["bias"].dtype == jnp.float32


def test_mesh_that_cannot_hold_the_model_is_refused_before_reading(tmp_path):
    with pytest.raises(parallel.MeshError, match="n_heads=4 is not divisible by tensor=8"):
        convert_to_orbax(fixture("v3"), str(tmp_path), preset="fsdp_tp",
                         mesh_config={"tensor": 8})
