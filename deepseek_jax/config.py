"""Model configuration: one frozen dataclass, the named variants, and the HF mapping.

`ModelConfig` holds every architectural number of the DeepSeek-V2/V3 family plus the few
numerical choices that belong to the model (compute dtype, parameter dtype, dispatch path,
scan/remat). Run settings (learning rate, paths, mesh) live in the `ml_collections` run config
of each entrypoint and never reach the layers.

Named variants (`get_config(name)`):

    tiny      tests: every feature on (q compression, YaRN, groups, shared expert, MTP) at toy sizes
    small     the CPU demo: a few million parameters, trains in seconds per step on two cores
    v2-lite   DeepSeek-V2-Lite (15.7B / 2.4B): no q compression, softmax routing, YaRN mscale 0.707
    moonlight Moonlight-16B-A3B: V2-Lite shapes with V3 routing (sigmoid + bias), no YaRN
    v3-671b   DeepSeek-V3 (671B / 37B active) with one MTP module

Numbers are from DeepSeek's released configs and reports (V3 tech report §4.2, V2 report §3.1.2
and App. B, HF `config.json` files). The model config holds only what the layers compute
with: the loss weights λ and α and the bias update speed γ are run settings
(`train.schedules.StepSettings`), so `from_hf` does not read `aux_loss_alpha`. One choice
departs from the HF files on purpose, in the named variants and in `from_hf` alike:

  - `init_std` is the V3 paper's 0.006 (§4.2: weights initialized with standard deviation
    0.006). The `initializer_range` of DeepSeek's `config.json` files (0.02) is the default of
    the `transformers` config class, written out when the weights were exported; DeepSeek's
    own inference code never reads it and nothing says the models were trained with it. So
    `from_hf` ignores `initializer_range`: it only matters for a fresh init from an HF config
    (loaded weights replace the init), and a fresh DeepSeek model should start the way the
    paper says. Pass `from_hf(hf, init_std=...)` to choose another value.

Left out: `moe_layer_freq` other than 1, biases on attention projections, activations other
than SiLU, and key/value head counts different from the query head count; DeepSeek's released
models use none of them, and `from_hf` rejects configs that ask for them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

SCORE_FUNCS = ("sigmoid", "softmax")
MOE_IMPLS = ("dense", "ragged")
# The names a config may give the kernels and the expert-parallel exchange, defined here once:
# kernels/fp8.py, kernels/grouped_gemm.py and model/dispatch.py take their lists from these.
FP8_BACKENDS = ("auto", "reference", "mosaic_gpu", "mosaic_tpu", "pallas_interpret",
                "mosaic_gpu_interpret", "mosaic_tpu_interpret")   # kernels/fp8.py
MOE_BACKENDS = ("auto", "ragged_dot", "tiled", "mosaic_gpu", "megablox", "reference",
                "mosaic_gpu_interpret", "megablox_interpret")
MOE_EP_TRANSPORTS = ("auto", "all_to_all", "ragged_all_to_all", "ragged_all_to_all_emulated")
ATTENTION_IMPLS = ("expanded", "absorbed")
# The attention core of training and prefill (model/attention.py): "auto" resolves by platform.
ATTENTION_BACKENDS = ("auto", "einsum", "blockwise", "splash", "cudnn", "splash_interpret")
# Rematerialization of each block (model/blocks.py): "none", "full" (keep only the block's input),
# a `jax.checkpoint_policies` name, a preset over the named activations below, or a spec
# "custom:NAME=ACTION,..." that saves (ACTION save) or moves to host memory (offload) the named
# activations it lists and recomputes everything else in the backward pass.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable", "everything_saveable", "minimal", "save_attention")
# The activations the model names (`jax.ad_checkpoint.checkpoint_name`), per layer:
REMAT_NAMES = {
    "layer_input": "[B, T, D] the block's input (the layer's carry under scan), kept on the "
                   "device under every policy unless offloaded",
    "q_latent": "[B, T, Q] query down-projection, before its norm",
    "kv_latent": "[B, T, C] and [B, T, R] key-value down-projections, before norm and RoPE",
    "query": "[B, T, N, H+R] query up-projection, before RoPE",
    "key_value": "[B, S, N, H] (H+R with a fused backend) and [B, S, N, U] keys and values "
                 "expanded from the latent",
    "context": "[B, T, N, U] attention output, before the output projection",
    "attn_out": "[B, T, D] output projection",
    "mlp_hidden": "[B, T, F'] gate and up projections of dense FFNs and shared experts",
    "mlp_out": "[B, T, D] their down projection",
    "expert_rows": "[M, D] token copies sorted by routed expert (after the exchange under EP)",
    "expert_hidden": "[M, F] routed experts' gate and up projections",
    "expert_out": "[M, D] routed experts' down projection, before the combine",
}
REMAT_ACTIONS = ("save", "offload")   # offload: to pinned host memory, back for the backward
_ATTENTION_NAMES = ("q_latent", "kv_latent", "query", "key_value", "context", "attn_out")
# Presets: "minimal" saves every projection output (norms, RoPE, SiLU, softmax and the attention
# core are recomputed); "save_attention" saves attention's and recomputes the FFN and experts.
REMAT_PRESETS = {
    "minimal": {name: "save" for name in REMAT_NAMES if name != "layer_input"},
    "save_attention": {name: "save" for name in _ATTENTION_NAMES},
}


def remat_names(policy: str) -> dict[str, str] | None:
    """{name: action} that `policy` keeps (a preset or a "custom:" spec); None for the other
    policies. Raises ConfigError, naming what to write, for a malformed spec."""
    if policy in REMAT_PRESETS:
        return dict(REMAT_PRESETS[policy])
    if not policy.startswith("custom:"):
        return None
    actions = {}
    for item in filter(None, policy[len("custom:"):].split(",")):
        name, _, action = item.partition("=")
        if name not in REMAT_NAMES or action not in REMAT_ACTIONS or name in actions:
            raise ConfigError(
                f"remat_policy={policy!r}: {item!r} must be NAME=ACTION, once per NAME, with NAME "
                f"one of {tuple(REMAT_NAMES)} and ACTION one of {REMAT_ACTIONS} (names left out "
                "are recomputed), e.g. custom:layer_input=offload,context=save")
        actions[name] = action
    return actions


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3 model. Letters refer to the alphabet in `deepseek_jax.model`."""

    # --- sizes ---------------------------------------------------------------------------------
    vocab_size: int = 129280            # V
    d_model: int = 7168                 # D     (HF hidden_size)
    n_layers: int = 61                  #       (HF num_hidden_layers), main model only
    n_dense_layers: int = 3             #       first layers with a dense FFN (first_k_dense_replace)
    d_ff: int = 18432                   # F     dense FFN width (intermediate_size)
    # --- MLA -----------------------------------------------------------------------------------
    n_heads: int = 128                  # N
    q_lora_rank: int = 1536             # Q     0 = no query compression (V2-Lite, Moonlight)
    kv_lora_rank: int = 512             # C
    qk_nope_head_dim: int = 128         # H
    qk_rope_head_dim: int = 64          # R
    v_head_dim: int = 128               # U
    # --- MoE -----------------------------------------------------------------------------------
    n_routed_experts: int = 256         # E     0 = every layer dense
    n_shared_experts: int = 1
    n_experts_per_token: int = 8        # X     (num_experts_per_tok)
    moe_d_ff: int = 2048                # F of one expert (moe_intermediate_size)
    n_expert_groups: int = 8            # G     (n_group)
    n_limited_groups: int = 4           #       groups kept per token (topk_group)
    routed_scaling_factor: float = 2.5
    score_func: str = "sigmoid"         # "sigmoid" (V3) or "softmax" (V2)
    norm_topk_prob: bool = True         # renormalize the selected weights to sum to one
    routing_bias: bool = True           # aux-loss-free selection bias (V3 `noaux_tc`)
    group_score: str = "top2_sum"       # "top2_sum" (V3) or "max" (V2 group_limited_greedy)
    # --- multi-token prediction (its loss weight λ is a run setting: train.schedules) ----------
    mtp_depth: int = 1                  # D_mtp  (num_nextn_predict_layers)
    loss_chunk: int = 512               # positions per row whose head logits the loss holds at
                                        # once (model/head.py); 0 = all (full [B, T, V] logits)
    # --- norms, positions ----------------------------------------------------------------------
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 163840           # max_position_embeddings
    rope_theta: float = 10000.0
    rope_interleaved: bool = True       # rotate consecutive pairs (2i, 2i+1), as the official weights
    rope_factor: float = 40.0           # YaRN scale s; 1.0 = plain RoPE
    rope_original_max_len: int = 4096   # YaRN original_max_position_embeddings
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    # --- embedding / init / tokens -------------------------------------------------------------
    tie_embeddings: bool = False
    init_std: float = 0.006             # paper §4.2; from_hf ignores initializer_range (above)
    bos_id: int = 0
    eos_id: int = 1
    # --- numerics and implementation choices ---------------------------------------------------
    dtype: Any = jnp.bfloat16           # compute (activation) dtype
    param_dtype: Any = jnp.float32      # storage dtype of parameters
    moe_impl: str = "ragged"            # "ragged" (sort + grouped GEMM) or "dense" (reference)
    moe_backend: str = "auto"           # grouped GEMM of the ragged path: auto = by platform
    moe_capacity_factor: float = 0.0    # 0 = dropless (V3); > 0 drops pairs past the capacity
    moe_ep_buffer_factor: float = 2.0   # EP receive buffer per round, in balanced loads
    moe_ep_transport: str = "auto"      # EP exchange: auto = ragged_all_to_all on GPU/TPU
    moe_expert_chunks: int = 0          # FSDP without EP: gather the experts this many at a
                                        # time; 0 = auto (chunks of at most 1 GiB gathered)
    attention_impl: str = "expanded"    # "expanded" (train, prefill) or "absorbed" (latent space)
    attention_backend: str = "auto"     # expanded training/prefill core: auto = by platform
    scan_layers: bool = True            # nn.scan over identical blocks (compile time flat in depth)
    remat_policy: str = "none"          # REMAT_POLICIES or "custom:NAME=ACTION,..."
    fp8: bool = False                   # fp8 projections (block-scaled e4m3 GEMMs)
    fp8_backend: str = "auto"           # their GEMM kernels (kernels/fp8.py): auto = by platform
    adapter_rank: int = 0               # LoRA adapters' rank r (model/adapters.py); 0 = none
    adapter_alpha: float = 16.0         # their update is (alpha / r)·A·B
    adapter_targets: tuple[str, ...] = ("attention", "mlp")   # ADAPTER_GROUPS or "group.w_name"
    pipeline_stages: int = 1            # P: stacks split into P stages over mesh axis "stage"
                                        # (model/pipeline.py); the trainers set the mesh's size
    pipeline_microbatches: int = 0      # J of the pipeline schedule; 0 = 2·P

    def __post_init__(self):
        validate(self)

    # --- derived ---------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers if self.n_routed_experts else 0

    @property
    def layer_stacks(self) -> dict[str, int]:
        """{stack name: its layers} of the main model's scanned stacks ("dense_layers", then
        "moe_layers"), the empty ones left out: the names `Transformer`'s parameters use."""
        stacks = {"dense_layers": self.n_layers - self.n_moe_layers,
                  "moe_layers": self.n_moe_layers}
        return {name: n for name, n in stacks.items() if n}

    @property
    def n_microbatches(self) -> int:
        """J, the pipeline's micro-batches per (accumulation) batch."""
        return self.pipeline_microbatches or 2 * self.pipeline_stages

    def pipelined(self, n_layers: int) -> bool:
        """Whether a stack of `n_layers` blocks runs as a pipeline: P > 1 and P divides it."""
        return self.pipeline_stages > 1 and n_layers % self.pipeline_stages == 0

    @property
    def uses_yarn(self) -> bool:
        return self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(H+R), times YaRN's mscale² when YaRN is on (HF semantics: whenever it is set)."""
        scale = self.qk_head_dim ** -0.5
        if self.uses_yarn and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def kv_cache_values_per_token(self) -> int:
        """Values an MLA cache holds per token per layer: the latent C plus the RoPE key R."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (dtypes by name): for JSON files and ml_collections configs."""
        fields = dataclasses.asdict(self)
        fields["dtype"] = jnp.dtype(self.dtype).name
        fields["param_dtype"] = jnp.dtype(self.param_dtype).name
        return fields

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
        """The inverse of `to_dict`. Loss weights and γ in the dict (model_config.json files
        written when they were model fields) are dropped: they are run settings now."""
        fields = {k: v for k, v in fields.items() if k not in _RUN_SETTINGS}
        for key in ("dtype", "param_dtype"):
            fields[key] = jnp.dtype(fields[key]).type
        if "adapter_targets" in fields:                # a JSON list
            fields["adapter_targets"] = tuple(fields["adapter_targets"])
        return cls(**fields)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Maps a Hugging Face DeepSeek-V2/V3 `config.json` dict to a ModelConfig."""
        return from_hf(hf, **overrides)


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature √t = 0.1·mscale·ln(s) + 1 (1 when s ≤ 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


# Where LoRA adapters can go (`ModelConfig.adapter_targets`): group → the weights it covers.
ADAPTER_GROUPS = {
    "attention": ("w_dq", "w_uq", "w_qr", "w_dkv", "w_kr", "w_uk", "w_uv", "w_o"),
    "mlp": ("w_gate", "w_up", "w_down"),        # dense FFNs and shared experts
    "experts": ("w_gate", "w_up", "w_down"),    # routed experts, a pair per expert
}


# Fields that say how the stacks are scheduled over devices, not what they compute: the same
# checkpoint serves any value (a run saved with 2 pipeline stages resumes with 4, or none), and a
# saved model config is read back without them (`unscheduled`).
SCHEDULE_FIELDS = ("pipeline_stages", "pipeline_microbatches")


def unscheduled(config: "ModelConfig") -> "ModelConfig":
    """`config` with the SCHEDULE_FIELDS at their defaults (no pipeline)."""
    return config.replace(**{f: ModelConfig.__dataclass_fields__[f].default
                             for f in SCHEDULE_FIELDS})


# Train-step settings (train.schedules.StepSettings) that older model_config.json files hold.
_RUN_SETTINGS = ("mtp_loss_weight", "balance_alpha", "bias_update_rate")


class ConfigError(ValueError):
    """A configuration that cannot be built; the message says what to change."""


class MeshError(ConfigError):
    """A mesh that cannot be built on these devices, or a model that cannot be sharded on it;
    the message says what to change. (Here, not in `parallel/`, so the model can raise it
    without importing the parallel package.)"""


def validate(c: ModelConfig) -> None:
    """Rejects invalid combinations with a message that names the fix."""
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    for name in ("vocab_size", "d_model", "n_layers", "d_ff", "n_heads", "kv_lora_rank",
           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        need(getattr(c, name) > 0, f"{name}={getattr(c, name)} must be positive")
    need(c.q_lora_rank >= 0, f"q_lora_rank={c.q_lora_rank} must be >= 0 (0 = no q compression)")
    need(c.adapter_rank >= 0, f"adapter_rank={c.adapter_rank} must be >= 0 (0 = no LoRA adapters)")
    need(c.adapter_alpha > 0, f"adapter_alpha={c.adapter_alpha} must be positive")
    need(isinstance(c.adapter_targets, tuple),
         f"adapter_targets must be a tuple of names, got {c.adapter_targets!r}")
    known = [*ADAPTER_GROUPS, *(f"{g}.{w}" for g, ws in ADAPTER_GROUPS.items() for w in ws)]
    unknown = [t for t in c.adapter_targets if t not in known]
    need(not unknown, f"adapter_targets {unknown} are not adapter targets: name groups "
         f"{list(ADAPTER_GROUPS)} or weights such as 'attention.w_o'")
    need(not c.adapter_rank or bool(c.adapter_targets),
         "adapter_rank > 0 needs adapter_targets: name at least one group, e.g. ('attention',)")
    need(c.qk_rope_head_dim % 2 == 0,
         f"qk_rope_head_dim={c.qk_rope_head_dim} must be even (RoPE rotates pairs)")
    need(0 <= c.n_dense_layers <= c.n_layers,
         f"n_dense_layers={c.n_dense_layers} must lie in [0, n_layers={c.n_layers}]")
    need(c.mtp_depth >= 0, f"mtp_depth={c.mtp_depth} must be >= 0")
    need(c.loss_chunk >= 0, f"loss_chunk={c.loss_chunk} must be >= 0 (positions per chunk of "
                            "the output-head loss; 0 = the whole length at once)")
    need(c.score_func in SCORE_FUNCS, f"score_func={c.score_func!r}: use one of {SCORE_FUNCS}")
    need(c.group_score in ("top2_sum", "max"),
         f"group_score={c.group_score!r}: use 'top2_sum' (V3) or 'max' (V2)")
    need(c.moe_impl in MOE_IMPLS, f"moe_impl={c.moe_impl!r}: use one of {MOE_IMPLS}")
    need(c.fp8_backend in FP8_BACKENDS,
         f"fp8_backend={c.fp8_backend!r}: use one of {FP8_BACKENDS}")
    need(c.moe_backend in MOE_BACKENDS,
         f"moe_backend={c.moe_backend!r}: use one of {MOE_BACKENDS}")
    need(c.moe_ep_transport in MOE_EP_TRANSPORTS,
         f"moe_ep_transport={c.moe_ep_transport!r}: use one of {MOE_EP_TRANSPORTS}")
    need(c.moe_capacity_factor >= 0,
         f"moe_capacity_factor={c.moe_capacity_factor} must be >= 0 (0 = drop no tokens)")
    need(c.moe_expert_chunks >= 0 and (c.moe_expert_chunks == 0 or not c.n_routed_experts
                                       or c.n_routed_experts % c.moe_expert_chunks == 0),
         f"moe_expert_chunks={c.moe_expert_chunks}: use 0 (auto) or a divisor of "
         f"n_routed_experts={c.n_routed_experts}")
    need(c.moe_ep_buffer_factor > 0,
         f"moe_ep_buffer_factor={c.moe_ep_buffer_factor} must be > 0 (2.0 holds twice the "
         "balanced load per exchange round)")
    need(c.attention_impl in ATTENTION_IMPLS,
         f"attention_impl={c.attention_impl!r}: use one of {ATTENTION_IMPLS}")
    need(c.attention_backend in ATTENTION_BACKENDS,
         f"attention_backend={c.attention_backend!r}: use one of {ATTENTION_BACKENDS}")
    need(c.remat_policy in REMAT_POLICIES or c.remat_policy.startswith("custom:"),
         f"remat_policy={c.remat_policy!r}: use one of {REMAT_POLICIES} or "
         "custom:NAME=ACTION,... (see REMAT_NAMES)")
    remat_names(c.remat_policy)
    _validate_pipeline(c, need)
    need(c.rope_factor >= 1.0, f"rope_factor={c.rope_factor} must be >= 1 (1 = plain RoPE)")
    if c.n_routed_experts:
        E, X, G = c.n_routed_experts, c.n_experts_per_token, c.n_expert_groups
        need(c.moe_d_ff > 0, f"moe_d_ff={c.moe_d_ff} must be positive when n_routed_experts > 0")
        need(1 <= X <= E, f"n_experts_per_token={X} must lie in [1, n_routed_experts={E}]")
        need(G >= 1 and E % G == 0,
             f"n_routed_experts={E} is not divisible by n_expert_groups={G}; "
             f"use a group count that divides {E}")
        need(1 <= c.n_limited_groups <= G,
             f"n_limited_groups={c.n_limited_groups} must lie in [1, n_expert_groups={G}]")
        need(X <= c.n_limited_groups * (E // G),
             f"n_experts_per_token={X} exceeds the {c.n_limited_groups} kept groups of {E // G} "
             f"experts each; raise n_limited_groups or lower n_experts_per_token")
        if c.group_score == "top2_sum" and G > 1:
            need(E // G >= 2, f"group_score='top2_sum' needs >= 2 experts per group, got {E // G}; "
                        "use fewer groups or group_score='max'")
        need(not (c.routing_bias and c.score_func == "softmax"),
             "routing_bias=True goes with score_func='sigmoid' (V3); set routing_bias=False for "
             "softmax routing (V2)")


def _validate_pipeline(c: ModelConfig, need) -> None:
    P = c.pipeline_stages
    need(P >= 1, f"pipeline_stages={P} must be >= 1 (1 = no pipeline)")
    need(c.pipeline_microbatches >= 0,
         f"pipeline_microbatches={c.pipeline_microbatches} must be >= 0 (0 = 2·pipeline_stages)")
    if P == 1:
        return
    need(c.scan_layers, "pipeline_stages > 1 needs scan_layers=True (the stages split the "
                        "scanned stacks' layer axis)")
    stacks = c.layer_stacks
    need(any(c.pipelined(n) for n in stacks.values()),
         f"pipeline_stages={P} divides no layer stack ("
         + ", ".join(f"{k} {n}" for k, n in stacks.items())
         + "); use a stage count that divides one of them: "
         + ", ".join(str(d) for d in range(2, max(stacks.values()) + 1)
                     if any(n % d == 0 for n in stacks.values())))


# --- named variants --------------------------------------------------------------------------

_V3 = dict()  # the dataclass defaults are DeepSeek-V3 (671B)

_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=64, d_model=32, n_layers=3, n_dense_layers=1, d_ff=64, n_heads=4,
        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, n_experts_per_token=2, moe_d_ff=16,
        n_expert_groups=4, n_limited_groups=2, mtp_depth=1, max_seq_len=64,
        rope_factor=4.0, rope_original_max_len=16, init_std=0.02,
        dtype=jnp.float32, param_dtype=jnp.float32),
    "small": dict(
        vocab_size=320, d_model=128, n_layers=4, n_dense_layers=1, d_ff=384, n_heads=4,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, n_experts_per_token=4,
        moe_d_ff=64, n_expert_groups=4, n_limited_groups=2, mtp_depth=1, max_seq_len=256,
        rope_factor=1.0, init_std=0.02, dtype=jnp.float32, param_dtype=jnp.float32),
    "v2-lite": dict(
        vocab_size=102400, d_model=2048, n_layers=27, n_dense_layers=1, d_ff=10944,
        n_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        n_experts_per_token=6, moe_d_ff=1408, n_expert_groups=1, n_limited_groups=1,
        routed_scaling_factor=1.0, score_func="softmax", norm_topk_prob=False,
        routing_bias=False, group_score="max", mtp_depth=0,
        max_seq_len=163840, rope_factor=40.0, rope_mscale=0.707, rope_mscale_all_dim=0.707,
        bos_id=100000, eos_id=100001),
    "moonlight": dict(
        vocab_size=163840, d_model=2048, n_layers=27, n_dense_layers=1, d_ff=11264,
        n_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        n_experts_per_token=6, moe_d_ff=1408, n_expert_groups=1, n_limited_groups=1,
        routed_scaling_factor=2.446, rms_norm_eps=1e-5, rope_theta=50000.0, rope_factor=1.0,
        max_seq_len=8192, mtp_depth=0, bos_id=163584, eos_id=163586),
    "v3-671b": _V3,
}


def get_config(name: str, **overrides) -> ModelConfig:
    """Returns a named variant, with field overrides (e.g. `dtype=jnp.float32`)."""
    if name not in _VARIANTS:
        raise ConfigError(f"unknown model {name!r}; use one of {sorted(_VARIANTS)}")
    return ModelConfig(**{**_VARIANTS[name], **overrides})


def variant_names() -> list[str]:
    return list(_VARIANTS)


# --- Hugging Face config.json --------------------------------------------------------------------

_HF_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")


def from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """Maps an HF DeepSeek-V2/V3 `config.json` dict; rejects features the model does not have."""
    mt = hf.get("model_type")
    if mt not in _HF_MODEL_TYPES:
        raise ConfigError(f"model_type={mt!r} is not supported; expected one of {_HF_MODEL_TYPES}")

    def reject(cond: bool, msg: str):
        if cond:
            raise ConfigError(msg)

    reject(hf.get("moe_layer_freq", 1) != 1, "moe_layer_freq != 1 is not supported")
    reject(bool(hf.get("attention_bias", False)), "attention_bias=True is not supported")
    reject(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r}: only silu")
    n_heads = hf["num_attention_heads"]
    reject(hf.get("num_key_value_heads", n_heads) != n_heads,
           "num_key_value_heads must equal num_attention_heads for MLA")

    topk_method = hf.get("topk_method", "noaux_tc" if mt == "deepseek_v3" else "greedy")
    scoring = hf.get("scoring_func", "sigmoid" if mt == "deepseek_v3" else "softmax")
    reject(topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"),
           f"topk_method={topk_method!r} is not supported")
    n_group = hf.get("n_group") or 1
    topk_group = hf.get("topk_group") or 1
    if topk_method == "greedy":  # plain top-k over all experts
        n_group, topk_group = 1, 1

    rs = hf.get("rope_scaling") or {}
    if rs:
        kind = rs.get("type", rs.get("rope_type"))
        reject(kind not in ("yarn", "default", None), f"rope_scaling type {kind!r}: only yarn")
    yarn = bool(rs) and rs.get("type", rs.get("rope_type")) == "yarn"

    kw = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_dense_layers=hf.get("first_k_dense_replace", 0),
        d_ff=hf["intermediate_size"], n_heads=n_heads, q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_experts_per_token=hf.get("num_experts_per_tok") or 1,
        moe_d_ff=hf.get("moe_intermediate_size") or 0,
        n_expert_groups=n_group, n_limited_groups=topk_group,
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        score_func=scoring, norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        routing_bias=topk_method == "noaux_tc",
        group_score="top2_sum" if topk_method == "noaux_tc" else "max",
        mtp_depth=hf.get("num_nextn_predict_layers", 0) or 0,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_interleaved=bool(hf.get("rope_interleave", True)),
        rope_factor=float(rs.get("factor", 1.0)) if yarn else 1.0,
        rope_original_max_len=int(rs.get("original_max_position_embeddings", 4096)),
        rope_beta_fast=float(rs.get("beta_fast", 32.0)),
        rope_beta_slow=float(rs.get("beta_slow", 1.0)),
        rope_mscale=float(rs.get("mscale", 1.0)),
        rope_mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=ModelConfig.init_std,      # the paper's 0.006, not initializer_range (above)
        bos_id=hf.get("bos_token_id") or 0,
        eos_id=hf.get("eos_token_id") or 1,
    )
    if isinstance(kw["eos_id"], (list, tuple)):
        kw["eos_id"] = kw["eos_id"][0]
    kw.update(overrides)
    return ModelConfig(**kw)
