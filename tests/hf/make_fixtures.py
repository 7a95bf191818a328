"""Regenerates tests/hf/fixtures/ with Hugging Face transformers (torch, CPU, a minute).

Not part of the test suite, which needs neither torch nor transformers. Run it in a separate
environment:

  python3.11 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy   # tested: 5.24.0
  /tmp/hfvenv/bin/python tests/hf/make_fixtures.py

Three tiny random models, each a checkpoint folder (config.json + model.safetensors) plus
`reference.npz` = {tokens [B, T] int32, logits [B, T, V] float32, mtp_logits [K, B, T, V]}:

  v3         DeepseekV3ForCausalLM: q compression, sigmoid routing with random nonzero
             correction biases (some negative), 4 groups of which 2 kept, 1 dense layer then
             2 MoE layers, YaRN (mscale ≠ mscale_all_dim, so the cos/sin factor is not 1),
             rope_interleave, and one MTP module at model.layers.3 made here by hand (hub names:
             enorm, hnorm, eh_proj, shared_head.{norm,head}, embed_tokens, a MoE decoder layer).
             Its reference comes from transformers' own `MtpModel` (loaded from this file by
             `MtpModel.from_pretrained`, so HF's name mapping checks ours; transformers only
             knows `model.layers.61` as the MTP module, so the script points the class's
             `_keys_to_ignore_on_load_unexpected` at layer 3), run on the main model's last
             hidden state before the final norm with the tokens shifted left by one (0 at the
             end), at positions 0 … T−1 with a causal mask — what our MTP computes.
             config.json in the hub's spelling (rope_theta + rope_scaling), like DeepSeek-V3's.
  v2_lite    DeepseekV2ForCausalLM: no q compression (q_proj), softmax scores, greedy top-k, no
             renormalization, routed_scaling_factor 1.5, YaRN with mscale 0.707; hub spelling.
  moonlight  DeepseekV3ForCausalLM: no q compression, n_group = topk_group = 1, sigmoid + bias,
             routed_scaling_factor 2.446, rope_theta 50000, no YaRN, config.json exactly as
             transformers 5 saves it (rope_parameters) and declaring num_nextn_predict_layers=1
             with no MTP weights, as save_pretrained leaves it.

References are computed in float64 from the float32 weights that are saved, so the tests compare
our float32 forward with an exact-as-possible reference. Weights are drawn with fan-in scaling and
norm scales around 1 (HF's 0.02 init would make every logit and routing score nearly equal).

Routing is made robust: for every token of every MoE layer the chosen experts and groups must
beat the runners-up by a margin of 2e-3 (so float32 vs float64 rounding cannot flip a choice),
and filling dropped groups with 0 (older transformers, spec §10) or with −inf (DeepSeek, ours;
transformers 5.24's DeepseekV3TopkRouter does this too) must select the same experts; a seed
that fails either check is redrawn. (DeepseekV2's group_limited_greedy still fills with 0, which
is harmless there: softmax scores are positive.)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM)
from transformers.modeling_layers import MtpModel

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
B, T = 2, 10
MARGIN = 2e-3


# --- configs ----------------------------------------------------------------------------------

def v3_hub_config() -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_nextn_predict_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
        "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 16,
        "q_lora_rank": 24, "qk_rope_head_dim": 8, "v_head_dim": 12, "qk_nope_head_dim": 8,
        "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
        "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 64,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8},
        "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32",
    }


def v2_hub_config() -> dict:
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "n_shared_experts": 2, "n_routed_experts": 8,
        "routed_scaling_factor": 1.5, "kv_lora_rank": 16, "q_lora_rank": None,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "qk_nope_head_dim": 8, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2, "moe_layer_freq": 1,
        "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
        "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
        "max_position_embeddings": 64, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707},
        "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "float32",
    }


def moonlight_hf_config() -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
        n_routed_experts=8, routed_scaling_factor=2.446, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=1, topk_group=1,
        num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=64, rms_norm_eps=1e-5, num_nextn_predict_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        bos_token_id=0, eos_token_id=1)


# --- random weights -----------------------------------------------------------------------------

def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Fan-in scaled matrices, norm scales 1 ± 0.2, biases uniform in [−0.3, 0.3]."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim >= 2:
                fan_in = p.shape[-1]
                std = 1.0 if "embed_tokens" in name else fan_in ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.6 * torch.rand(b.shape, generator=gen) - 0.3)


def mtp_tensors(cfg: dict, gen: torch.Generator, embed: torch.Tensor,
                head: torch.Tensor) -> dict[str, torch.Tensor]:
    """Hub-named weights of one MTP module at model.layers.{num_hidden_layers}."""
    D, N = cfg["hidden_size"], cfg["num_attention_heads"]
    Q, C = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    H, R, U = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    E, F = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    S = cfg["n_shared_experts"] * F
    pre = f"model.layers.{cfg['num_hidden_layers']}."
    mat = lambda o, i: torch.randn(o, i, generator=gen) * i ** -0.5          # noqa: E731
    norm = lambda n: 1 + 0.2 * torch.randn(n, generator=gen)                 # noqa: E731
    t = {
        "enorm.weight": norm(D), "hnorm.weight": norm(D), "eh_proj.weight": mat(D, 2 * D),
        "shared_head.norm.weight": norm(D), "shared_head.head.weight": head.clone(),
        "embed_tokens.weight": embed.clone(),
        "input_layernorm.weight": norm(D), "post_attention_layernorm.weight": norm(D),
        "self_attn.q_a_proj.weight": mat(Q, D), "self_attn.q_a_layernorm.weight": norm(Q),
        "self_attn.q_b_proj.weight": mat(N * (H + R), Q),
        "self_attn.kv_a_proj_with_mqa.weight": mat(C + R, D),
        "self_attn.kv_a_layernorm.weight": norm(C),
        "self_attn.kv_b_proj.weight": mat(N * (H + U), C),
        "self_attn.o_proj.weight": mat(D, N * U),
        "mlp.gate.weight": mat(E, D),
        "mlp.gate.e_score_correction_bias": 0.6 * torch.rand(E, generator=gen) - 0.3,
        "mlp.shared_experts.gate_proj.weight": mat(S, D),
        "mlp.shared_experts.up_proj.weight": mat(S, D),
        "mlp.shared_experts.down_proj.weight": mat(D, S),
    }
    for e in range(E):
        t[f"mlp.experts.{e}.gate_proj.weight"] = mat(F, D)
        t[f"mlp.experts.{e}.up_proj.weight"] = mat(F, D)
        t[f"mlp.experts.{e}.down_proj.weight"] = mat(D, F)
    return {pre + k: v.float().contiguous() for k, v in t.items()}


# --- routing robustness -------------------------------------------------------------------------

class RouterProbe:
    """Records the inputs of every router (module named *.gate with a 2-D weight)."""

    def __init__(self, model):
        self.calls = []
        for name, m in model.named_modules():
            if type(m).__name__.endswith("TopkRouter"):
                m.register_forward_hook(self._record)

    def _record(self, mod, args, out) -> None:           # returns None: output unchanged
        self.calls.append((mod, args[0].detach().reshape(-1, args[0].shape[-1]).double()))


def _margin_ok(values: np.ndarray, k: int) -> bool:
    if k >= values.shape[-1]:
        return True
    s = -np.sort(-values, axis=-1)
    return bool(np.all(s[:, k - 1] - s[:, k] > MARGIN))


def routing_is_robust(probe: RouterProbe, cfg: dict) -> bool:
    """Clear margins for group and expert choices; 0-fill and −inf fill choose the same."""
    sigmoid = cfg.get("scoring_func", "sigmoid") == "sigmoid"
    G = cfg.get("n_group") or 1
    kept = cfg.get("topk_group") or 1
    X = cfg["num_experts_per_tok"]
    for mod, h in probe.calls:
        logits = (h @ mod.weight.detach().double().T).numpy()                      # [M, E]
        scores = 1 / (1 + np.exp(-logits)) if sigmoid else \
            np.exp(logits - logits.max(-1, keepdims=True))
        if not sigmoid:
            scores = scores / scores.sum(-1, keepdims=True)
        bias = getattr(mod, "e_score_correction_bias", None)
        biased = scores + (bias.detach().double().numpy() if bias is not None else 0)
        M, E = biased.shape
        if G > 1:
            grouped = biased.reshape(M, G, E // G)
            gscore = -np.sort(-grouped, -1)[..., :2].sum(-1) if sigmoid else grouped.max(-1)
            if not _margin_ok(gscore, kept):
                return False
            keep = np.zeros((M, G), bool)
            np.put_along_axis(keep, np.argsort(-gscore, -1)[:, :kept], True, -1)
            mask = np.repeat(keep, E // G, -1)
            neg_inf = np.where(mask, biased, -np.inf)
            zero = np.where(mask, biased, 0.0)
            a = np.sort(np.argsort(-neg_inf, -1)[:, :X], -1)
            b = np.sort(np.argsort(-zero, -1)[:, :X], -1)
            if not np.array_equal(a, b):
                return False
            biased = neg_inf
        if not _margin_ok(np.where(np.isfinite(biased), biased, -1e9), X):
            return False
    return True


# --- building ---------------------------------------------------------------------------------

def tokens_for(seed: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(2, vocab, (B, T), generator=g)


def forward64(model, tokens, mtp=None):
    """(logits, mtp_logits or None) in float64; MTP on the pre-norm hidden state."""
    model = model.double()
    captured = {}
    def keep_input(mod, args, out):          # returns None: the output is left alone
        captured["h"] = args[0]
    hook = model.model.norm.register_forward_hook(keep_input)
    with torch.no_grad():
        logits = model(tokens).logits
    hook.remove()
    mtp_logits = None
    if mtp is not None:
        mtp = mtp.double()
        shifted = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        positions = torch.arange(T)[None].expand(B, T)
        with torch.no_grad():
            h = mtp.forward_layer(0, captured["h"], positions, None, input_ids=shifted)
            mtp_logits = mtp._project_to_logits(h)[None]
    model.float()
    return logits, mtp_logits


def write_folder(name: str, model, config_json: dict, extra: dict | None = None) -> str:
    out = os.path.join(HERE, name)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    for fn in os.listdir(out):
        if fn not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out, fn))
    if config_json is not None:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
    if extra:
        tensors = load_file(os.path.join(out, "model.safetensors"))
        tensors.update(extra)
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out


def build(name: str, make_model, config_json: dict | None, cfg_dict: dict, with_mtp: bool):
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        model = make_model().eval()
        model.set_experts_implementation("eager")      # the default grouped_mm has no float64
        randomize(model, gen)
        tokens = tokens_for(seed, cfg_dict["vocab_size"])
        probe = RouterProbe(model)
        with torch.no_grad():
            model(tokens)
        if not routing_is_robust(probe, cfg_dict):
            continue
        extra = None
        if with_mtp:
            extra = mtp_tensors(cfg_dict, gen, model.model.embed_tokens.weight.detach(),
                                model.lm_head.weight.detach())
        out = write_folder(name, model, config_json, extra)
        # Reload through transformers' own loader (hub-spelled config, hub names).
        cls = type(model)
        if with_mtp:
            cls._keys_to_ignore_on_load_unexpected = [
                rf"model\.layers\.{cfg_dict['num_hidden_layers']}\..*"]
        loaded = cls.from_pretrained(out, attn_implementation="eager",
                                     experts_implementation="eager").eval()
        mtp = MtpModel.from_pretrained(loaded).eval() if with_mtp else None
        probe = RouterProbe(loaded)
        if mtp is not None:
            probe_mtp = RouterProbe(mtp)
        logits, mtp_logits = forward64(loaded, tokens, mtp)
        if not routing_is_robust(probe, cfg_dict) or (
                mtp is not None and not routing_is_robust(probe_mtp, cfg_dict)):
            continue
        with torch.no_grad():
            direct = model(tokens).logits
        assert torch.allclose(direct.double(), logits, atol=1e-4), "reload changed the model"
        ref = {"tokens": tokens.numpy().astype(np.int32),
               "logits": logits.float().numpy()}
        if mtp_logits is not None:
            ref["mtp_logits"] = mtp_logits.float().numpy()
        np.savez(os.path.join(out, "reference.npz"), **ref)
        for fn in os.listdir(out):
            os.chmod(os.path.join(out, fn), 0o644)
        sizes = {fn: os.path.getsize(os.path.join(out, fn)) for fn in sorted(os.listdir(out))}
        print(f"{name}: seed {seed}, files {sizes}")
        return
    sys.exit(f"{name}: no seed in 0..99 gave robust routing")


def main() -> None:
    torch.set_num_threads(2)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    v3 = v3_hub_config()
    hf_v3 = DeepseekV3Config(**{**v3, "rope_parameters": {"rope_type": "yarn",
                                                           "rope_theta": v3["rope_theta"],
                                                           **{k: v for k, v in
                                                              v3["rope_scaling"].items()
                                                              if k != "type"}}})
    build("v3", lambda: DeepseekV3ForCausalLM(hf_v3), v3, v3, with_mtp=True)
    v2 = v2_hub_config()
    hf_v2 = DeepseekV2Config(**{**v2, "rope_parameters": {"rope_type": "yarn",
                                                          "rope_theta": v2["rope_theta"],
                                                          **{k: v for k, v in
                                                             v2["rope_scaling"].items()
                                                             if k != "type"}}})
    build("v2_lite", lambda: DeepseekV2ForCausalLM(hf_v2), v2, v2, with_mtp=False)
    moon = moonlight_hf_config()
    build("moonlight", lambda: DeepseekV3ForCausalLM(moon), None, moon.to_dict(), with_mtp=False)


if __name__ == "__main__":
    main()
