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

Export writes the inverse: `to_hf_config(config)` is the hub spelling of a ModelConfig
(deepseek_v3 for sigmoid routing with the selection bias, or dense; deepseek_v2 for softmax
routing), such that `config_from_hf(to_hf_config(c), **not_in_hf(c)) == c`. `not_in_hf` lists
the fields config.json does not carry: numerics and implementation choices (dtype, moe_impl,
scan_layers, …), init_std (see config.py), and fields that change nothing for that config (the
YaRN fields when YaRN is off; the MoE fields of a model without routed experts, whose
first_k_dense_replace is written as num_hidden_layers so that transformers builds no MoE).

Left out: `trust_remote_code` configs with `model_type` other than deepseek_v2/deepseek_v3
(e.g. `kimi_k2`), which would need their own check of what differs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

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


# --- export -------------------------------------------------------------------------------------

# ModelConfig fields that config.json does not carry (numerics, implementation, init).
RUN_ONLY_FIELDS = ("loss_chunk", "init_std", "dtype", "param_dtype", "moe_impl", "moe_backend",
                   "moe_capacity_factor", "moe_ep_buffer_factor", "moe_ep_transport",
                   "attention_impl", "attention_backend", "scan_layers", "remat_policy", "fp8",
                   "fp8_backend")
YARN_FIELDS = ("rope_original_max_len", "rope_beta_fast", "rope_beta_slow", "rope_mscale",
               "rope_mscale_all_dim")
MOE_FIELDS = ("n_dense_layers", "n_shared_experts", "n_experts_per_token", "moe_d_ff",
              "n_expert_groups", "n_limited_groups", "routed_scaling_factor", "score_func",
              "norm_topk_prob", "routing_bias", "group_score")


def not_in_hf(c: ModelConfig) -> dict[str, Any]:
    """The fields of `c` that `to_hf_config(c)` does not write (see the module docstring)."""
    names = RUN_ONLY_FIELDS + (() if c.uses_yarn else YARN_FIELDS)
    names += () if c.n_routed_experts else MOE_FIELDS
    return {k: getattr(c, k) for k in names}


def _routing(c: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(model_type, the routing fields) of config.json, or an error for routing HF has not."""
    if not c.n_routed_experts:
        return "deepseek_v3", {"first_k_dense_replace": c.n_layers}
    fields = {"first_k_dense_replace": c.n_dense_layers, "scoring_func": c.score_func,
              "n_group": c.n_expert_groups, "topk_group": c.n_limited_groups}
    if c.routing_bias and c.group_score == "top2_sum":
        return "deepseek_v3", {**fields, "topk_method": "noaux_tc"}
    if not c.routing_bias and c.score_func == "softmax":
        if c.n_expert_groups == 1:
            return "deepseek_v2", {**fields, "topk_method": "greedy"}
        if c.group_score == "max":
            return "deepseek_v2", {**fields, "topk_method": "group_limited_greedy"}
    raise HFCheckpointError(
        f"routing score_func={c.score_func!r}, routing_bias={c.routing_bias}, group_score="
        f"{c.group_score!r}, n_expert_groups={c.n_expert_groups} has no Hugging Face DeepSeek "
        "form: V3 is sigmoid + bias + top2_sum groups, V2 softmax without bias (greedy, or "
        "group_score='max' groups)")


def _rope(c: ModelConfig) -> dict[str, Any]:
    if not c.uses_yarn:
        return {"rope_scaling": None}
    return {"rope_scaling": {
        "type": "yarn", "factor": c.rope_factor,
        "original_max_position_embeddings": c.rope_original_max_len,
        "beta_fast": c.rope_beta_fast, "beta_slow": c.rope_beta_slow, "mscale": c.rope_mscale,
        "mscale_all_dim": c.rope_mscale_all_dim}}


def to_hf_config(c: ModelConfig, *, torch_dtype: Any = None,
                 fp8_block: int | None = None) -> dict[str, Any]:
    """config.json (hub spelling) for `c`; with fp8_block, DeepSeek-V3's quantization_config."""
    model_type, routing = _routing(c)
    if model_type == "deepseek_v2" and not c.rope_interleaved:
        raise HFCheckpointError("rope_interleaved=False: DeepseekV2 always rotates interleaved "
                                "pairs, so a V2 (softmax-routed) export needs rope_interleaved")
    arch = "DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    hf = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
        "moe_intermediate_size": c.moe_d_ff, "num_hidden_layers": c.n_layers,
        "num_nextn_predict_layers": c.mtp_depth, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_heads, "n_shared_experts": c.n_shared_experts,
        "n_routed_experts": c.n_routed_experts, "num_experts_per_tok": c.n_experts_per_token,
        "routed_scaling_factor": c.routed_scaling_factor, "norm_topk_prob": c.norm_topk_prob,
        "moe_layer_freq": 1, **routing,
        "q_lora_rank": c.q_lora_rank or None, "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_nope_head_dim, "qk_rope_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim, "hidden_act": "silu", "attention_bias": False,
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, **_rope(c), "rope_interleave": c.rope_interleaved,
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.init_std,
        "bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "use_cache": True,
        "torch_dtype": jnp.dtype(torch_dtype or c.param_dtype).name,
    }
    if fp8_block:
        hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                     "quant_method": "fp8",
                                     "weight_block_size": [fp8_block, fp8_block]}
    return hf
