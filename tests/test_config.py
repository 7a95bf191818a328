import dataclasses

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.config import ConfigError, ModelConfig, get_config, variant_names

# HF config.json of deepseek-ai/DeepSeek-V3 (fields as listed in the spec, §1.1).
HF_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "attention_bias": False,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}
# DeepSeek-V2-Lite (spec §1.2).
HF_V2_LITE = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2,
    "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "bos_token_id": 100000, "eos_token_id": 100001,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}


def _arch(c: ModelConfig) -> dict:
    """Architecture fields only (init std and dtypes may differ)."""
    skip = {"init_std", "dtype", "param_dtype"}
    return {k: v for k, v in dataclasses.asdict(c).items() if k not in skip}


def test_named_variants_build():
    assert {"tiny", "small", "v2-lite", "moonlight", "v3-671b"} <= set(variant_names())
    for name in variant_names():
        get_config(name)


def test_from_hf_v3_matches_named_variant():
    assert _arch(ModelConfig.from_hf(HF_V3)) == _arch(get_config("v3-671b"))


def test_from_hf_v2_lite_matches_named_variant():
    assert _arch(ModelConfig.from_hf(HF_V2_LITE)) == _arch(get_config("v2-lite"))


@pytest.mark.parametrize("name, scale", [("v3-671b", 0.1352338), ("v2-lite", 0.1147214),
                                         ("moonlight", 0.0721688)])
def test_softmax_scale(name, scale):
    # Spec §2.3: YaRN mscale² folded into 1/sqrt(192); 7 digits as stated there.
    assert get_config(name).softmax_scale == pytest.approx(scale, abs=5e-8)


def test_kv_cache_values():
    assert get_config("v3-671b").kv_cache_values_per_token == 576


@pytest.mark.parametrize("changes, words", [
    (dict(n_expert_groups=3), "not divisible by n_expert_groups"),
    (dict(n_limited_groups=9), "n_limited_groups"),
    (dict(qk_rope_head_dim=63), "must be even"),
    (dict(n_experts_per_token=300), "n_experts_per_token"),
    (dict(n_limited_groups=1, n_experts_per_token=40), "raise n_limited_groups"),
    (dict(score_func="relu"), "score_func"),
    (dict(moe_impl="magic"), "moe_impl"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(score_func="softmax"), "routing_bias=False"),
    (dict(n_dense_layers=99), "n_dense_layers"),
])
def test_invalid_combinations_say_what_to_change(changes, words):
    with pytest.raises(ConfigError, match=words):
        get_config("v3-671b", **changes)


@pytest.mark.parametrize("changes, words", [
    (dict(model_type="llama"), "model_type"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(num_key_value_heads=8), "num_key_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_from_hf_rejects_unsupported(changes, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_hf({**HF_V3, **changes})


def test_unknown_variant():
    with pytest.raises(ConfigError, match="use one of"):
        get_config("v4")


def test_dtype_override_gives_fp32_model():
    """The contract parity checks rely on: replacing `dtype` gives a model whose whole program
    runs in fp32 (its jaxpr holds no bf16 value), where the bf16 config's does."""
    from deepseek_jax.model import Transformer, init_variables

    def program(c):
        v = jax.eval_shape(lambda k: init_variables(k, c), jax.random.key(0))
        return str(jax.make_jaxpr(
            lambda v: Transformer(c).apply(v, jnp.zeros((1, 8), jnp.int32)))(v))

    bf16 = get_config("tiny", dtype=jnp.bfloat16)
    fp32 = dataclasses.replace(bf16, dtype=jnp.float32)
    assert fp32.param_dtype == jnp.float32
    assert "bf16" in program(bf16) and "bf16" not in program(fp32)


def test_dict_round_trip():
    for name in variant_names():
        c = get_config(name)
        d = c.to_dict()
        assert isinstance(d["dtype"], str) and isinstance(d["param_dtype"], str)
        assert ModelConfig.from_dict(d) == c


def test_from_hf_init_std_is_the_papers_not_initializer_range():
    # DeepSeek-V3's config.json carries transformers' default initializer_range 0.02; the paper
    # (§4.2) initializes with std 0.006, and from_hf follows the paper (config.py docstring).
    assert HF_V3["initializer_range"] == 0.02
    assert ModelConfig.from_hf(HF_V3).init_std == 0.006
    assert ModelConfig.from_hf(HF_V3).init_std == get_config("v3-671b").init_std
    assert ModelConfig.from_hf(HF_V3, init_std=0.02).init_std == 0.02
