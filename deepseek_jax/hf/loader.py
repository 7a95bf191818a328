"""`load_hf_checkpoint`: a Hugging Face DeepSeek-V2/V3 folder → (ModelConfig, variables).

  config, variables = load_hf_checkpoint("DeepSeek-V2-Lite")
  logits, mtp_logits = Transformer(config).apply(variables, tokens)

What it returns:

  config     `ModelConfig.from_hf(config.json)` with `param_dtype` = the storage dtype asked for
             and `mtp_depth` lowered to the MTP modules whose weights are present.
  variables  {"params": ..., "routing": ...} in our layout (scanned stacks `.../layers/...` with
             a leading L axis when config.scan_layers, `layer_{i}` otherwise); "routing" (the V3
             selection bias, fp32) only for `noaux_tc` routing. With keep_fp8=True also
             "fp8": see below.

Missing MTP weights: transformers' `save_pretrained` drops the MTP module while config.json
still declares `num_nextn_predict_layers` = 1. Then the main model is loaded with
`mtp_depth = 0` and a `MTPWeightsMissing` warning (a UserWarning, printed once by default;
also logged at INFO) says so. A module present only
in part is an error naming the missing tensor, as is any other missing tensor.

fp8 (DeepSeek-V3's released weights): every F8_E4M3 tensor is dequantized with its
`weight_scale_inv` (a multiplier per 128×128 block) into `param_dtype`. With keep_fp8=True the
stored fp8 values are returned as well, under variables["fp8"], one entry per HF linear weight
stored in fp8, stacked like our parameters and keyed by our module path plus the HF projection
name, e.g.

  fp8/moe_layers/layers/attn/q_b_proj          w_q [L, N(H+R), Q]   scale [L, ⌈N(H+R)/b⌉, ⌈Q/b⌉]
  fp8/moe_layers/layers/moe/experts/gate_proj  w_q [L, E, F, D]     scale [L, E, ⌈F/b⌉, ⌈D/b⌉]
  fp8/moe_layers/layers/moe/shared/down_proj   w_q [L, D, F]        scale [L, ⌈D/b⌉, ⌈F/b⌉]
  fp8/mtp/layer_0/block/attn/kv_b_proj         (MTP and unscanned layers: no L axis)

(each a dict {"w_q": e4m3, "scale": fp32}; b = weight_block_size, 128 for DeepSeek-V3)

i.e. the K-major [out, in] weight and [⌈out/128⌉, ⌈in/128⌉] scales that
`kernels.fp8.quantize_weight` produces and the fp8 GEMMs take. The model itself does not read
them: its fp8 path quantizes the masters on the fly, on the checkpoint's own block grid
(q_b_proj as the one [N(H+R), Q] matrix it is stored as, see `model.mla.query_up_weight`;
kv_a_proj_with_mqa split at 512, a multiple of 128). With fp32 masters, re-quantizing a
dequantized block gives the stored e4m3 codes back and its scale to within fp32 rounding
(tests/hf/test_fp8_requantize.py); bf16 masters round the dequantized values first, so
codes may differ there. kv_b_proj is the exception: the model keeps W_UK / W_UV in the compute
dtype (model/mla.py). The kept values are for fp8 serving kernels; Transformer.apply ignores
the extra collection. keep_fp8 reads every fp8 tensor whole (no `mesh`).

Sharded loading: pass `mesh` and `rules` (deepseek_jax.parallel) and every leaf is built
directly with its NamedSharding, one shard at a time (`reader.device_leaf`), so no host ever
holds a whole leaf. Without them, leaves are NumPy-gathered and put on the default device.

Hub ids: `load_hf_checkpoint("deepseek-ai/DeepSeek-V3", revision=..., token=...)` downloads
the files the import reads into the hub's cache first (`hub.py`).

Left out: reading tokenizer files (see deepseek_jax.data.encoding; they are downloaded with a
hub id), `trust_remote_code` variants
beyond deepseek_v2/deepseek_v3, and the fused expert tensors that exist only inside
transformers' memory.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from deepseek_jax.hf import mapping
from deepseek_jax.hf.fp8_blocks import is_fp8, scale_name
from deepseek_jax.hf.hf_config import (HFCheckpointError, config_from_hf, read_hf_json,
                                               weight_block_size)
from deepseek_jax.hf.hub import checkpoint_folder
from deepseek_jax.hf.reader import (DEFAULT_CHUNK_BYTES, check_folder, device_leaf,
                                            read_leaf)
from deepseek_jax.hf.safetensors_io import SafetensorsError, SafetensorsFolder
from deepseek_jax.config import ModelConfig
from deepseek_jax.train import sharded

log = logging.getLogger(__name__)


class MTPWeightsMissing(UserWarning):
    """config.json declares MTP modules whose weights the checkpoint does not hold."""


@dataclasses.dataclass
class Prepared:
    """A checked checkpoint folder and the plan to read it."""
    path: str
    hf: dict
    config: ModelConfig
    folder: SafetensorsFolder
    block: int
    leaves: list[mapping.Leaf]
    raw: list[mapping.RawLeaf]


def _dtype(dtype) -> Any:
    return jnp.dtype(dtype).type


def resolve_mtp(config: ModelConfig, folder: SafetensorsFolder) -> ModelConfig:
    """`config` with mtp_depth = the leading MTP modules that have any tensor in `folder`."""
    names = folder.names()
    present = 0
    for k in range(config.mtp_depth):
        prefix = mapping.mtp_prefix(config, k)
        if not any(n.startswith(prefix) for n in names):
            break
        present += 1
    if present < config.mtp_depth:
        msg = (f"config.json declares {config.mtp_depth} MTP module(s) but the weights of "
               f"module {present + 1} (model.layers.{config.n_layers + present}.*) are not in "
               f"the checkpoint; loading the main model with mtp_depth={present}. (transformers'"
               " save_pretrained does not save MTP weights.)")
        log.info(msg)
        warnings.warn(msg, MTPWeightsMissing, stacklevel=4)   # the load/convert caller
        config = config.replace(mtp_depth=present)
    return config


def prepare(path: str, *, dtype=None, overrides: Mapping[str, Any] | None = None) -> Prepared:
    """Reads config.json and the safetensors headers, fixes the MTP depth, checks every tensor."""
    hf = read_hf_json(path)
    overrides = dict(overrides or {})
    if dtype is not None:
        overrides["param_dtype"] = _dtype(dtype)
    config = config_from_hf(hf, **overrides)
    try:
        folder = SafetensorsFolder(path)
    except SafetensorsError as e:
        raise HFCheckpointError(str(e)) from None
    block = weight_block_size(hf) or 128
    config = resolve_mtp(config, folder)
    leaves, raw = mapping.plan(config)
    check_folder(folder, leaves, path, block)
    return Prepared(path, hf, config, folder, block, leaves, raw)


def leaf_dtype(p: Prepared, leaf: mapping.Leaf):
    """Routing bias stays fp32 (as the model creates it); parameters take param_dtype."""
    return np.float32 if leaf.collection == "routing" else np.dtype(p.config.param_dtype)


def set_path(tree: dict, keys: tuple[str, ...], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def leaf_sharding(shardings: Mapping, leaf):
    """The sharding of `leaf` in a {"params": ..., "routing": ...} tree of shardings."""
    sharding = shardings[leaf.collection]
    for k in leaf.path:
        sharding = sharding[k]
    return sharding


def unused_tensors(p: Prepared) -> list[str]:
    """Tensors of the folder that the plan does not read and that are not expected extras."""
    used = set()
    for leaf in p.leaves:
        for name in leaf.names.flat:
            used.add(name)
            used.add(scale_name(name))
    return [n for n in p.folder.names() if n not in used and not mapping.ignored(n, p.config)]


def _warn_unused(p: Prepared) -> None:
    extra = unused_tensors(p)
    if extra:
        msg = (f"{len(extra)} tensor(s) in {p.path} are not used by the model, e.g. "
               f"{', '.join(extra[:5])}")
        log.info(msg)
        warnings.warn(msg, stacklevel=3)


def _fp8_tree(p: Prepared) -> dict:
    """variables["fp8"]: stored e4m3 weights and scales, stacked like our parameters."""
    tree: dict = {}
    for r in p.raw:
        first = r.names.flat[0]
        if first not in p.folder or not is_fp8(p.folder, first):
            continue
        mixed = [n for n in r.names.flat if not is_fp8(p.folder, n)]
        if mixed:
            raise HFCheckpointError(f"keep_fp8: {first} is fp8 but {mixed[0]} of the same stack "
                                    "is not; load without keep_fp8")
        w_q = np.empty(r.names.shape + tuple(r.hf_shape), p.folder.tensor(first).dtype)
        scales = [np.asarray(p.folder.tensor(scale_name(n))) for n in r.names.flat]
        scale = np.stack(scales).reshape(r.names.shape + scales[0].shape)
        for pos in np.ndindex(r.names.shape):
            w_q[pos] = p.folder.tensor(r.names[pos])
        set_path(tree, r.path, {"w_q": jnp.asarray(w_q), "scale": jnp.asarray(scale)})
    return tree


def load_hf_checkpoint(path: str, *, dtype=None, keep_fp8: bool = False, mesh=None, rules=None,
                       overrides: Mapping[str, Any] | None = None,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES, revision: str | None = None,
                       token: str | bool | None = None,
                       cache_dir: str | None = None) -> tuple[ModelConfig, dict]:
    """Loads a Hugging Face DeepSeek-V2/V3 checkpoint folder (or hub id) into our layout.

    Args:
      path: folder with config.json and model.safetensors, or shards plus
        model.safetensors.index.json; or a hub id such as "deepseek-ai/DeepSeek-V3", downloaded
        (config, index, shards, tokenizer files only; resumable) into the hub's cache
        (`hf.hub`).
      dtype: storage dtype of the parameters (sets config.param_dtype); default: the config's
        (float32). fp8 weights are dequantized in fp32 and then cast.
      keep_fp8: also return the stored fp8 weights and scales as variables["fp8"] (see the
        module docstring).
      mesh, rules: build every leaf sharded for this mesh (`deepseek_jax.parallel`), shard by
        shard; both or neither.
      overrides: ModelConfig fields to set after the HF mapping (e.g. {"dtype": jnp.float32,
        "scan_layers": False}); the layout follows them.
      chunk_bytes: host-memory budget of one read when loading sharded.
      revision, token, cache_dir: for a hub id: branch/tag/commit, access token (gated or
        private repos), cache folder (default: the hub's).

    Returns:
      (config, variables) such that `Transformer(config).apply(variables, tokens)` runs.

    Raises:
      HFCheckpointError: missing config.json, unsupported model_type, a missing or misshapen
        tensor (named), unreadable files, a hub id that cannot be reached.
    """
    if (mesh is None) != (rules is None):
        raise ValueError("pass both mesh and rules (deepseek_jax.parallel.mesh_and_rules), "
                         "or neither")
    if keep_fp8 and mesh is not None:
        raise ValueError("keep_fp8 reads whole tensors; load without mesh/rules to keep fp8")
    path = checkpoint_folder(path, revision=revision, token=token, cache_dir=cache_dir)
    p = prepare(path, dtype=dtype, overrides=overrides)
    shardings = None
    if mesh is not None:
        sharded.validate(p.config, mesh, rules)
        shardings = sharded.param_shardings(p.config, mesh, rules)
    variables: dict = {}
    for leaf in p.leaves:
        dt = leaf_dtype(p, leaf)
        if shardings is None:
            value = jnp.asarray(read_leaf(p.folder, leaf, dtype=dt, block=p.block))
        else:
            value = device_leaf(p.folder, leaf, dtype=dt, block=p.block,
                                sharding=leaf_sharding(shardings, leaf), chunk_bytes=chunk_bytes)
        set_path(variables, (leaf.collection, *leaf.path), value)
    if keep_fp8:
        variables["fp8"] = _fp8_tree(p)
    _warn_unused(p)
    return p.config, variables
