"""The `config.json` of a Hugging Face DeepSeek-V2/V3 checkpoint folder, read into a ModelConfig.

Two spellings of the same config exist and both are accepted:

  * the hub's (DeepSeek-V3, V2-Lite, Moonlight as published): `rope_theta` and `rope_scaling`
    at the top level;
  * `transformers` ≥ 5 `save_pretrained`: one `rope_parameters` dict holding `rope_theta`,
    `rope_type` and the YaRN fields.

`normalize_hf_config` rewrites the second into the first; `ModelConfig.from_hf` (config.py)
then does the mapping and rejects what the model does not implement.

fp8: `quantization_config` = {quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]} is
the only quantization understood; others are refused with the name of the method.

Left out: `trust_remote_code` configs with `model_type` other than deepseek_v2/deepseek_v3
(e.g. `kimi_k2`), which would need their own check of what differs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from deepseek_jax.config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


class HFCheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


def read_hf_json(path: str) -> dict:
    """The raw config.json dict of a checkpoint folder (errors name the missing file)."""
    fn = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise HFCheckpointError(f"{path} is not a directory; pass the checkpoint folder "
                                "(the one holding config.json and the .safetensors files)")
    if not os.path.exists(fn):
        raise HFCheckpointError(f"no {CONFIG_FILE} in {path}: a Hugging Face checkpoint folder "
                                "needs config.json next to its .safetensors files")
    with open(fn) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise HFCheckpointError(f"{fn} is not valid JSON: {e}") from None


def normalize_hf_config(hf: Mapping[str, Any]) -> dict:
    """Hub-style config dict (rope_theta + rope_scaling) from either spelling."""
    hf = dict(hf)
    rp = hf.pop("rope_parameters", None)
    if rp and "rope_theta" not in hf:
        rp = dict(rp)
        hf["rope_theta"] = rp.pop("rope_theta", 10000.0)
        kind = rp.pop("rope_type", rp.pop("type", "default"))
        if kind not in (None, "default") and not hf.get("rope_scaling"):
            hf["rope_scaling"] = {"type": kind, **rp}
    return hf


def weight_block_size(hf: Mapping[str, Any]) -> int | None:
    """Block size of fp8 weights (128 for DeepSeek-V3), or None when not quantized."""
    q = hf.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise HFCheckpointError(f"quantization_config.quant_method={method!r} is not supported; "
                                "only DeepSeek's block fp8 ('fp8') is")
    rows, cols = q.get("weight_block_size", [128, 128])
    if rows != cols:
        raise HFCheckpointError(f"weight_block_size={[rows, cols]}: only square blocks are "
                                "supported")
    return int(rows)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """ModelConfig from a (raw) config.json dict; `overrides` replace fields after mapping."""
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise HFCheckpointError(f"config.json has model_type={mt!r}; only {MODEL_TYPES} "
                                "checkpoints can be imported")
    try:
        return ModelConfig.from_hf(normalize_hf_config(hf), **overrides)
    except ConfigError as e:
        raise HFCheckpointError(f"config.json: {e}") from None


def read_hf_config(path: str, **overrides) -> ModelConfig:
    """The ModelConfig that config.json declares (MTP depth as declared, before weights are seen).

    `load_hf_checkpoint` may lower `mtp_depth` when the MTP weights are absent; use its config.
    """
    return config_from_hf(read_hf_json(path), **overrides)
