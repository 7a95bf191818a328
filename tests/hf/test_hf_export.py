"""Export to a Hugging Face folder: import(export(run)) is the run, fp8 within e4m3's error, the
config.json maps back, converted checkpoints give back their source tensors and tokenizer."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.config import get_config, variant_names
from deepseek_jax.hf import convert_to_orbax, load_hf_checkpoint
from deepseek_jax.hf.export import ExportError, export_run, fp8_names, gather_position, main
from deepseek_jax.hf.fp8_blocks import dequantize_blocks
from deepseek_jax.hf.hf_config import (HFCheckpointError, config_from_hf, not_in_hf,
                                       read_hf_config, to_hf_config)
from deepseek_jax.hf.safetensors_io import INDEX_FILE, SafetensorsFolder
from deepseek_jax.model import adapters
from deepseek_jax.train import checkpoint as ckpt
from deepseek_jax.train.step import init_train_state
from hf_helpers import fixture, flat, tensors
from test_hf_loading import _quantize

MESH = {"fsdp": 8}


def make_run(workdir: str, config, steps=(1, 3)) -> dict:
    """A run directory as training leaves it: model_config.json and Orbax checkpoints (TrainState,
    rng, data state) at `steps`, each with other random parameters and a nonzero routing bias.
    Returns the variables of the last step."""
    ckpt.save_model_config(workdir, config)
    tx = optax.adamw(1e-3)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"), save_every=1, keep=5,
                                async_save=False)
    for step in steps:
        state = init_train_state(jax.random.key(step), config, tx)
        keys = iter(jax.random.split(jax.random.key(100 + step), 64))
        routing = jax.tree.map(lambda b: jax.random.normal(next(keys), b.shape, b.dtype),
                               state.routing)
        state = state.replace(step=jnp.int32(step), routing=routing)
        ckpt.save(manager, step, state, jax.random.key(0), {"step": step}, force=True)
    manager.wait_until_finished()
    manager.close()
    return {"params": state.params, "routing": state.routing}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("tiny_run"))
    return run, make_run(run, get_config("tiny"))


def assert_same(got, want):
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_import_of_the_export_is_the_run(tiny_run, tmp_path):
    run, want = tiny_run
    out = str(tmp_path / "hf")
    hf = export_run(run, out, mesh_config=MESH, max_shard_bytes=40_000)
    config, got = load_hf_checkpoint(out)
    assert_same(got, want)                          # the latest step (3), fp32 as stored
    tiny = get_config("tiny")
    assert config.replace(**not_in_hf(tiny)) == tiny        # numerics are not in config.json
    assert hf["model_type"] == "deepseek_v3" and hf["torch_dtype"] == "float32"
    with open(os.path.join(out, INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(os.listdir(out)) == sorted(files + ["config.json", INDEX_FILE])
    folder = SafetensorsFolder(out)
    assert folder.dtype_name("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
    mtp = "model.layers.3."                       # n_layers = 3: the MTP module, as V3 ships it
    np.testing.assert_array_equal(folder.tensor(mtp + "embed_tokens.weight"),
                                  want["params"]["embed"])
    np.testing.assert_array_equal(folder.tensor(mtp + "shared_head.head.weight"),
                                  np.asarray(want["params"]["lm_head"]).T)
    assert mtp + "eh_proj.weight" in folder and mtp + "mlp.experts.7.down_proj.weight" in folder


def test_bfloat16_unscanned_run_and_an_export_dtype(tiny_run, tmp_path):
    """bf16 storage, per-layer modules (`layer_{i}`), tied embeddings (the MTP head copy is
    the embedding) and no q compression (q_proj) round-trip too; --dtype casts."""
    config = get_config("tiny", param_dtype=jnp.bfloat16, scan_layers=False,
                        tie_embeddings=True, q_lora_rank=0)
    want = make_run(str(tmp_path / "run"), config, steps=(2,))
    export_run(str(tmp_path / "run"), str(tmp_path / "hf"), mesh_config=MESH)
    _, got = load_hf_checkpoint(str(tmp_path / "hf"), dtype=jnp.bfloat16,
                                overrides={"scan_layers": False})
    assert_same(got, want)                         # routing bias stays fp32
    folder = SafetensorsFolder(str(tmp_path / "hf"))
    assert "lm_head.weight" not in folder and "model.layers.1.self_attn.q_proj.weight" in folder
    np.testing.assert_array_equal(folder.tensor("model.layers.3.shared_head.head.weight"),
                                  want["params"]["embed"])
    run, want = tiny_run
    hf = export_run(run, str(tmp_path / "hf16"), dtype="bfloat16", mesh_config=MESH)
    assert hf["torch_dtype"] == "bfloat16"
    _, got = load_hf_checkpoint(str(tmp_path / "hf16"), dtype=jnp.bfloat16)
    cast = {"params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), want["params"]),
            "routing": want["routing"]}
    assert_same(got, cast)


@pytest.mark.parametrize("adapters_only", [False, True])
def test_a_run_trained_with_adapters_exports_merged(tmp_path, adapters_only):
    """A run whose checkpoint holds LoRA adapters exports W + s·A·B in each adapted weight's
    place: importing the export gives `adapters.merge` of the run's parameters, to the rounding
    of r = 4 products in another order (2·γ(4)·s·|A||B|) and one rounding of the sum. With
    `adapters_only` the checkpoint holds the adapters alone and W is read from the recorded
    step of the run it started from (step 1 of two)."""
    config = get_config("tiny").replace(adapter_rank=4, adapter_alpha=8.0,
                                        adapter_targets=("attention", "experts"))
    run = str(tmp_path / "run")
    ckpt.save_model_config(run, config)
    state = init_train_state(jax.random.key(0), config, optax.adamw(1e-3))
    keys = iter(jax.random.split(jax.random.key(1), 256))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype)
        if jax.tree_util.keystr(path).endswith("_lora_b']") else x, state.params)
    saved = params
    if adapters_only:
        base = str(tmp_path / "base")
        make_run(base, adapters.plain(config), steps=(1, 3))   # step 1's weights: key(1)
        frozen = init_train_state(jax.random.key(1), adapters.plain(config),
                                  optax.adamw(1e-3)).params
        saved = adapters.split(params, config)[0]
        params = adapters.combine(saved, frozen)
        ckpt.save_start(run, base, 1)
    manager = ckpt.make_manager(os.path.join(run, "checkpoints"), save_every=1, keep=1,
                                async_save=False)
    ckpt.save(manager, 1, state.replace(params=saved), jax.random.key(0), {}, force=True)
    manager.wait_until_finished()
    manager.close()
    export_run(run, str(tmp_path / "hf"), mesh_config=MESH)
    imported, got = load_hf_checkpoint(str(tmp_path / "hf"))
    assert imported.adapter_rank == 0
    want, flat_params = flat({"params": adapters.merge(params, config)}), flat({"params": params})
    got = flat({"params": got["params"]})
    assert got.keys() == want.keys()
    s, gamma = config.adapter_alpha / config.adapter_rank, 4 * 2.0 ** -24 / (1 - 4 * 2.0 ** -24)
    merged = 0
    for k in want:
        a_key = k + "_lora_a"
        if a_key not in flat_params:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
            continue
        a, b = np.abs(flat_params[a_key]), np.abs(flat_params[k + "_lora_b"])
        lead = a.ndim + b.ndim - 2 - want[k].ndim
        a2, b2 = a.reshape(*a.shape[:lead], -1, 4), b.reshape(*b.shape[:lead], 4, -1)
        bound = (2 * gamma * s * (a2 @ b2).reshape(want[k].shape)
                 + 2.0 ** -23 * np.abs(np.asarray(want[k])))
        assert np.all(np.abs(np.asarray(got[k]) - np.asarray(want[k])) <= bound), k
        merged += 1
    assert merged == 8 * 3 + 3 * 2       # attention: 2 layer stacks + MTP; experts: 1 + MTP


def test_one_position_is_gathered_from_the_shards_that_hold_it():
    """Stacked axes sharded, inner axes sharded, replicas (read once): x[pos] exactly."""
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = np.arange(4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3)
    P = jax.sharding.PartitionSpec
    for spec in (P("a", "b"), P(None, None, "b"), P("b", None, "a"), P()):
        arr = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
        for pos in ((0,), (3,), (1, 5), (2, 0), ()):
            np.testing.assert_array_equal(gather_position(arr, pos), x[pos], err_msg=str(spec))


def test_exported_config_maps_back_to_the_same_model_config():
    for name in variant_names():
        c = get_config(name)
        assert config_from_hf(to_hf_config(c), **not_in_hf(c)) == c, name
    for name in ("v3", "v2_lite", "moonlight"):
        c = read_hf_config(fixture(name))
        hf = to_hf_config(c)
        assert config_from_hf(hf, **not_in_hf(c)) == c, name
        with open(os.path.join(fixture(name), "config.json")) as f:
            assert hf["model_type"] == json.load(f)["model_type"], name
    small = get_config("small")                     # no YaRN: rope_scaling is left out
    assert to_hf_config(small)["rope_scaling"] is None
    dense = get_config("tiny", n_routed_experts=0)
    hf = to_hf_config(dense)
    assert hf["first_k_dense_replace"] == dense.n_layers   # transformers builds no MoE
    with pytest.raises(HFCheckpointError, match="no Hugging Face DeepSeek form"):
        to_hf_config(get_config("tiny", routing_bias=False))      # sigmoid without the bias


def fp8_bound(w: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """|dequant(quant(w)) − w| allowed per element. e4m3 keeps 3 mantissa bits: rounding a
    normal value to nearest errs by at most half a step, 2^-4 of its magnitude; below the
    smallest normal 2^-6 (in units of the block's scale) steps are 2^-9, error ≤ 2^-10·scale.
    The block scale maps amax to 448 exactly, so nothing saturates. Plus fp32 rounding of the
    division and product (a few ulps, 1e-6 relative covers it)."""
    s = np.repeat(np.repeat(scale, block, 0), block, 1)[:w.shape[0], :w.shape[1]]
    return np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * s) * (1 + 1e-6) + 1e-6 * np.abs(w)


def test_fp8_export_round_trips_within_e4m3_error(tiny_run, tmp_path):
    """Block 16 so that tiny weights span several blocks (the real size is 128, tested by the
    command line test). Scales match DeepSeek's NumPy quantizer (max(amax, 1e-4)/448) to one
    fp32 ulp (XLA may divide by 448 as a multiplication by its rounded reciprocal), and the codes
    are the e4m3 rounding (NumPy, ml_dtypes) of w / scale exactly."""
    run, want = tiny_run
    out = str(tmp_path / "fp8")
    hf = export_run(run, out, fp8=True, fp8_block=16, mesh_config=MESH)
    assert hf["quantization_config"]["weight_block_size"] == [16, 16]
    exact = str(tmp_path / "exact")
    export_run(run, exact, mesh_config=MESH)
    q, ref = SafetensorsFolder(out), tensors(exact)
    quantized = fp8_names(get_config("tiny"))
    assert "model.layers.3.mlp.experts.0.up_proj.weight" in quantized   # MTP's layer too
    for name, w in ref.items():
        if name not in quantized:
            assert q.dtype_name(name) == SafetensorsFolder(exact).dtype_name(name), name
            np.testing.assert_array_equal(q.tensor(name), w, err_msg=name)
            continue
        codes, scale = np.asarray(q.tensor(name)), np.asarray(q.tensor(name + "_scale_inv"))
        _, ref_scale = _quantize(w, 16)
        np.testing.assert_allclose(scale, ref_scale, rtol=2.0**-23, atol=0, err_msg=name)
        s = np.repeat(np.repeat(scale, 16, 0), 16, 1)[:w.shape[0], :w.shape[1]]
        ref_codes = (w / s).astype(codes.dtype)
        np.testing.assert_array_equal(codes.view(np.uint8), ref_codes.view(np.uint8), name)
        err = np.abs(dequantize_blocks(codes, scale, 16) - w)
        assert np.all(err <= fp8_bound(w, scale, 16)), name
    _, got = load_hf_checkpoint(out)           # and the importer reads it back
    got, want = flat(got), flat(want)
    w_o = "params/moe_layers/layers/attn/w_o"
    assert 0 < np.abs(got[w_o] - want[w_o]).max() <= 2.0**-4 * np.abs(want[w_o]).max()
    np.testing.assert_array_equal(got["params/embed"], want["params/embed"])


def test_refuses_a_non_empty_folder_unless_overwrite(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stale = out / "model-00001-of-00009.safetensors"
    stale.write_text("old")
    with pytest.raises(ExportError, match="not empty.*--overwrite"):
        export_run(run, str(out), mesh_config=MESH)
    assert not (out / "config.json").exists()          # refused before writing anything
    export_run(run, str(out), overwrite=True, mesh_config=MESH)
    assert (out / "notes.txt").read_text() == "mine" and not stale.exists()
    with pytest.raises(ExportError, match="--step=2: .* steps \\[1, 3\\]"):
        export_run(run, str(tmp_path / "other"), step=2)


def test_converted_checkpoint_exports_its_source_tensors_and_tokenizer(tmp_path):
    """HF → Orbax (convert) → HF (export) gives back every tensor the model reads, bit for bit,
    and the tokenizer files of the folder it was converted from; the command line, block 128."""
    src = tmp_path / "src"
    shutil.copytree(fixture("v3"), src)
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    convert_to_orbax(str(src), str(tmp_path / "conv"), mesh_config=MESH, dtype=jnp.float32)
    out = str(tmp_path / "hf")
    main(["--run", str(tmp_path / "conv"), "--out", out, "--mesh", "fsdp=8"])
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        assert (src / fn).read_text() == open(os.path.join(out, fn)).read()
    original, exported = tensors(str(src)), tensors(out)
    for name, w in exported.items():
        if name in original and "layers.3.embed_tokens" not in name \
                and "shared_head.head" not in name:       # the fixture's copies are its own
            np.testing.assert_array_equal(w, original[name], err_msg=name)
    assert set(original) - set(exported) == set()
    main(["--run", str(tmp_path / "conv"), "--out", out + "8", "--fp8", "--mesh", "fsdp=8"])
    folder = SafetensorsFolder(out + "8")
    name = "model.layers.1.self_attn.q_b_proj.weight"
    assert folder.dtype_name(name) == "F8_E4M3" and folder.shape(name + "_scale_inv") == (1, 1)
    with pytest.raises(SystemExit, match="not empty"):
        main(["--run", str(tmp_path / "conv"), "--out", out])


def test_tokenizer_files_and_runs_that_cannot_be_exported(tiny_run, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    run, _ = tiny_run
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat"], tokenizers.trainers.WordLevelTrainer(
        special_tokens=["<unk>"]))
    tok.save(str(tok_dir / "words.json"))            # data.tokenizer may have any name
    (tok_dir / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    out = tmp_path / "hf"
    export_run(run, str(out), tokenizer=str(tok_dir / "words.json"), mesh_config=MESH)
    again = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert again.encode("the cat sat").ids == tok.encode("the cat sat").ids
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    with pytest.raises(ExportError, match="--tokenizer=.*does not exist"):
        export_run(run, str(tmp_path / "a"), tokenizer=str(tmp_path / "none.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no tokenizer files there"):
        export_run(run, str(tmp_path / "b"), tokenizer=str(tmp_path / "empty"))
    other = tmp_path / "other"
    shutil.copytree(run, other)
    ckpt.save_model_config(str(other), get_config("tiny", d_ff=48))
    with pytest.raises(ExportError, match="w_gate has shape .* model_config.json's model"):
        export_run(str(other), str(tmp_path / "c"))
    shutil.rmtree(other / "checkpoints")
    with pytest.raises(ExportError, match="no checkpoint under"):
        export_run(str(other), str(tmp_path / "d"))
    assert not any((tmp_path / n).exists() for n in "abcd")      # nothing written
