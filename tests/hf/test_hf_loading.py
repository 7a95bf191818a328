"""Loading mechanics: sharded files, fp8 blocks, sharded-on-mesh loading, and the error messages."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_jax import parallel
from deepseek_jax.hf import (HFCheckpointError, MTPWeightsMissing, load_hf_checkpoint,
                                     reader)
from deepseek_jax.hf.fp8_blocks import dequantize_blocks, read_box
from deepseek_jax.hf.safetensors_io import (SafetensorsFolder, save_file,
                                                    write_sharded)
from deepseek_jax.kernels.fp8 import quantize_weight
from deepseek_jax.train import sharded
from hf_helpers import fixture, flat, make_folder, tensors

E4M3 = ml_dtypes.float8_e4m3fn


@pytest.fixture(scope="module")
def v3_flat():
    """The v3 fixture loaded from its single file (the reference for the other layouts)."""
    return flat(load_hf_checkpoint(fixture("v3"))[1])


# --- files ---------------------------------------------------------------------------------------

def test_sharded_files_with_index_load_like_one_file(tmp_path, v3_flat):
    folder = make_folder(str(tmp_path), "v3", tensors_={})
    os.remove(os.path.join(folder, "model.safetensors"))
    files = write_sharded(tensors(fixture("v3")), folder, n_shards=3)
    assert len(files) == 3 and os.path.exists(os.path.join(folder,
                                                           "model.safetensors.index.json"))
    _, variables = load_hf_checkpoint(folder)
    got = flat(variables)
    assert got.keys() == v3_flat.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], v3_flat[k], err_msg=k)


def test_reader_agrees_with_the_safetensors_package():
    st = pytest.importorskip("safetensors.numpy")
    ours = SafetensorsFolder(fixture("v3"))
    theirs = st.load_file(os.path.join(fixture("v3"), "model.safetensors"))
    assert sorted(theirs) == ours.names()
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours.tensor(name), value, err_msg=name)


def test_writer_round_trips_bf16_and_fp8(tmp_path):
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16),
         "b": np.array([[0.5, -448.0]], E4M3), "c": np.arange(3, dtype=np.int64)}
    save_file(t, str(tmp_path / "x.safetensors"))
    folder = SafetensorsFolder(str(tmp_path / "x.safetensors"))
    assert [folder.dtype_name(n) for n in ("a", "b", "c")] == ["BF16", "F8_E4M3", "I64"]
    for name, value in t.items():
        np.testing.assert_array_equal(folder.tensor(name), value)


# --- fp8 -----------------------------------------------------------------------------------------

def test_fp8_block_dequantization_by_hand(tmp_path):
    """A [130, 260] e4m3 weight with 128×128 blocks: 2×3 scale grid, partial edge blocks."""
    rng = np.random.default_rng(0)
    q = rng.choice(np.array([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0, 448.0]), (130, 260)).astype(E4M3)
    s_inv = np.array([[0.5, 2.0, 4.0], [0.25, 8.0, 1.0]], np.float32)
    want = np.zeros((130, 260), np.float32)
    for i in range(130):
        for j in range(260):
            want[i, j] = float(q[i, j]) * s_inv[i // 128, j // 128]
    assert want[129, 259] == float(q[129, 259]) * 1.0 and want[127, 128] == float(q[127, 128]) * 2
    np.testing.assert_array_equal(dequantize_blocks(q, s_inv, 128), want)
    save_file({"w.weight": q, "w.weight_scale_inv": s_inv}, str(tmp_path / "w.safetensors"))
    folder = SafetensorsFolder(str(tmp_path / "w.safetensors"))
    for rows, cols in [(slice(0, 130), slice(0, 260)), (slice(120, 130), slice(250, 260)),
                       (slice(127, 129), slice(0, 257)), (slice(5, 6), slice(255, 256))]:
        np.testing.assert_array_equal(read_box(folder, "w.weight", rows, cols, 128),
                                      want[rows, cols])


def _quantize(w: np.ndarray, block: int):
    """DeepSeek's block quantizer in NumPy: scale = max(amax, 1e-4)/448 per block, q = w/scale."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale = np.zeros((nr, nc), np.float32)
    q = np.zeros(w.shape, E4M3)
    for i in range(nr):
        for j in range(nc):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            scale[i, j] = max(np.abs(w[rows, cols]).max(), 1e-4) / 448.0
            q[rows, cols] = (w[rows, cols] / scale[i, j]).astype(E4M3)
    return q, scale


def _quantize_folder(dst, block):
    """The v3 fixture with every decoder-layer linear weight stored as DeepSeek block fp8."""
    out, originals = {}, {}
    for name, w in tensors(fixture("v3")).items():
        linear = (name.startswith("model.layers.") and name.endswith("proj.weight")
                  and w.ndim == 2)
        if not linear:
            out[name] = w
            continue
        out[name], out[name + "_scale_inv"] = _quantize(w, block)
        originals[name] = w
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [block, block]}
    make_folder(dst, "v3", tensors_=out, config_changes={"quantization_config": qc})
    return out, originals


def test_fp8_checkpoint_is_dequantized_and_fp8_can_be_kept(tmp_path):
    """Block 16 so that the per-head row splits and the 24/48/80-wide weights cross blocks."""
    stored, originals = _quantize_folder(str(tmp_path), block=16)
    config, variables = load_hf_checkpoint(str(tmp_path), keep_fp8=True, dtype="bfloat16")
    assert config.param_dtype == jnp.bfloat16
    name = "model.layers.2.self_attn.q_b_proj.weight"
    deq = dequantize_blocks(stored[name], stored[name + "_scale_inv"], 16)     # [N(H+R), Q]
    deq = deq.reshape(4, 16, 24)                                              # [N, H+R, Q]
    attn = variables["params"]["moe_layers"]["layers"]["attn"]
    assert attn["w_uq"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(attn["w_uq"][1],
                                  deq[:, :8].transpose(2, 0, 1).astype(jnp.bfloat16))
    np.testing.assert_array_equal(attn["w_qr"][1],
                                  deq[:, 8:].transpose(2, 0, 1).astype(jnp.bfloat16))
    # fp8 error only: the dequantized weights are within e4m3's relative step of the originals.
    assert np.abs(deq.reshape(64, 24) - originals[name]).max() < 0.07 * np.abs(
        originals[name]).max()

    kept = variables["fp8"]["moe_layers"]["layers"]["attn"]["q_b_proj"]
    assert kept["w_q"].dtype == jnp.float8_e4m3fn and kept["w_q"].shape == (2, 64, 24)
    assert kept["scale"].shape == (2, 4, 2)
    np.testing.assert_array_equal(np.asarray(kept["w_q"][1]).view(np.uint8),
                                  stored[name].view(np.uint8))
    # The kernels' quantizer, run on the dequantized weight, gives the kept values and scales.
    q, s = quantize_weight(jnp.asarray(dequantize_blocks(stored[name],
                                                         stored[name + "_scale_inv"], 16)),
                           block=16)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8),
                                  np.asarray(kept["w_q"][1]).view(np.uint8))
    np.testing.assert_allclose(s, kept["scale"][1], rtol=1e-6)
    experts = variables["fp8"]["moe_layers"]["layers"]["moe"]["experts"]["down_proj"]
    assert experts["w_q"].shape == (2, 8, 32, 16) and experts["scale"].shape == (2, 8, 2, 1)
    assert "eh_proj" in variables["fp8"]["mtp"]["layer_0"]
    assert "embed" not in variables["fp8"] and "router" not in str(
        jax.tree_util.tree_structure(variables["fp8"]))


# --- sharded loading -----------------------------------------------------------------------------

def test_chunks_split_along_leading_axes_within_budget():
    index = (slice(0, 2), slice(0, 8), slice(4, 8), slice(0, 16))          # fp32: 4096 bytes
    assert reader._chunks(index, 4, 4096) == [(index, (0, 0, 0, 0))]
    assert reader._chunks(index, 4, 2048) == [
        ((slice(0, 1),) + index[1:], (0, 0, 0, 0)), ((slice(1, 2),) + index[1:], (1, 0, 0, 0))]
    small = reader._chunks(index, 4, 128)                                  # one [1, 1, 2, 16]
    assert len(small) == 2 * 8 * 2 and small[3] == (
        (slice(0, 1), slice(1, 2), slice(6, 8), slice(0, 16)), (0, 1, 2, 0))


def test_loading_onto_a_mesh_builds_sharded_arrays_chunk_by_chunk(v3_flat, monkeypatch):
    updates = []
    real_update = reader._update
    monkeypatch.setattr(reader, "_update", lambda *a: updates.append(1) or real_update(*a))
    mesh, rules = parallel.mesh_and_rules("fsdp", {"fsdp": 8})
    config, variables = load_hf_checkpoint(fixture("v3"), mesh=mesh, rules=rules,
                                           chunk_bytes=2048)
    assert updates                                     # big shards went in as pieces
    want = sharded.param_shardings(config, mesh, rules)
    w_gate = variables["params"]["moe_layers"]["layers"]["moe"]["w_gate"]   # [2, 8, 32, 16]
    assert w_gate.sharding.is_equivalent_to(
        want["params"]["moe_layers"]["layers"]["moe"]["w_gate"], w_gate.ndim)
    assert w_gate.addressable_shards[0].data.shape == (2, 8, 4, 16)
    got = flat(variables)
    for k in got:
        np.testing.assert_array_equal(got[k], v3_flat[k], err_msg=k)


# --- MTP -----------------------------------------------------------------------------------------

def test_v3_without_mtp_tensors_loads_the_main_model(tmp_path):
    kept = {k: v for k, v in tensors(fixture("v3")).items()
            if not k.startswith("model.layers.3.")}
    folder = make_folder(str(tmp_path), "v3", tensors_=kept)
    with pytest.warns(MTPWeightsMissing, match="mtp_depth=0"):
        config, variables = load_hf_checkpoint(folder)
    assert config.mtp_depth == 0 and "mtp" not in variables["params"]
    assert "mtp" not in variables["routing"]


def test_partial_mtp_module_is_an_error_naming_the_tensor(tmp_path):
    t = tensors(fixture("v3"))
    del t["model.layers.3.eh_proj.weight"]
    folder = make_folder(str(tmp_path), "v3", tensors_=t)
    with pytest.raises(HFCheckpointError, match=r"'model\.layers\.3\.eh_proj\.weight'.*mtp"):
        load_hf_checkpoint(folder)


# --- errors --------------------------------------------------------------------------------------

def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HFCheckpointError, match="no config.json"):
        load_hf_checkpoint(str(tmp_path))
    with pytest.raises(HFCheckpointError, match="not a directory"):
        load_hf_checkpoint(str(tmp_path / "model.safetensors"))


def test_unsupported_model_type(tmp_path):
    folder = make_folder(str(tmp_path), "v3", config_changes={"model_type": "llama"})
    with pytest.raises(HFCheckpointError, match="model_type='llama'"):
        load_hf_checkpoint(folder)


def test_unsupported_quantization(tmp_path):
    folder = make_folder(str(tmp_path), "v3",
                         config_changes={"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(HFCheckpointError, match="quant_method='gptq'"):
        load_hf_checkpoint(folder)


def test_missing_tensor_is_named(tmp_path):
    t = tensors(fixture("v3"))
    del t["model.layers.1.mlp.experts.5.up_proj.weight"]
    folder = make_folder(str(tmp_path), "v3", tensors_=t)
    with pytest.raises(HFCheckpointError,
                       match=r"no tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight' "
                             r"\(needed for params/moe_layers/layers/moe/w_up\)"):
        load_hf_checkpoint(folder)


def test_misshapen_tensor_and_missing_fp8_scale(tmp_path):
    t = tensors(fixture("v3"))
    t["model.layers.0.self_attn.kv_b_proj.weight"] = np.zeros((80, 15), np.float32)
    folder = make_folder(str(tmp_path / "a"), "v3", tensors_=t)
    with pytest.raises(HFCheckpointError, match=r"kv_b_proj\.weight' has shape \[80, 15\], "
                                                r"expected \[80, 16\]"):
        load_hf_checkpoint(folder)
    t = tensors(fixture("v3"))
    t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"].astype(E4M3)
    folder = make_folder(str(tmp_path / "b"), "v3", tensors_=t)
    with pytest.raises(HFCheckpointError, match=r"up_proj\.weight_scale_inv"):
        load_hf_checkpoint(folder)


def test_no_safetensors_files(tmp_path):
    make_folder(str(tmp_path), "v3")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="no .safetensors files"):
        load_hf_checkpoint(str(tmp_path))


def test_unused_tensors_are_reported(tmp_path):
    t = tensors(fixture("v3"))
    t["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    folder = make_folder(str(tmp_path), "v3", tensors_=t)
    with pytest.warns(UserWarning, match="extra_proj"):
        load_hf_checkpoint(folder)


def test_index_listing_a_missing_shard(tmp_path):
    folder = make_folder(str(tmp_path), "v3")
    os.remove(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(HFCheckpointError, match="model-00001-of-00002.safetensors"):
        load_hf_checkpoint(folder)
