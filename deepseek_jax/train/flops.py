"""Training FLOPs per token from the config, and peak FLOP/s per device, for MFU.

  FLOPs/token = 6 · P_matmul  +  3 · Σ_attention-layers N·(H + R + U)·T

* P_matmul: the parameters a token multiplies by — the active parameters (routed experts
  counted X/E) minus the embedding table (a lookup, not a matmul), plus the MTP modules (each
  depth runs one more block and the head). 6 = 2 (multiply-add) × 3 (forward + two backward
  products).
* Attention: per layer and token, scores cost 2·N·(H+R)·S and the weighted sum 2·N·U·S over S
  keys; causal attention averages S = T/2 keys, so the forward pass costs N·(H+R+U)·T and
  training three times that. The expanded path is counted (the absorbed path costs more FLOPs
  and less memory; it is for decoding).
* LoRA adapters (`config.adapter_rank`): a frozen weight forms no weight gradient, so it costs
  4 per parameter (forward, input gradient), not 6. An adapter beside its projection costs 6
  per parameter of A and B (x·A, then ·B: forward and both gradients). A weight adapted as
  W' = W + s·A·B (W_UK, W_UV, the routed experts) still forms its whole gradient dW' and costs
  6; forming W' and A's and B's gradients from dW' happen once per step, not per token, and
  are left out.
* Left out: norms, softmax, RoPE, the router's top-k (all O(D) per token), rematerialization
  (MFU counts useful FLOPs only, as in PaLM's definition).

Peak numbers are dense bf16 per chip from vendor data sheets; unknown devices (CPU) give None and
MFU is then not reported.
"""

from __future__ import annotations

import jax
import numpy as np

from deepseek_jax.config import ModelConfig

# Dense bf16 FLOP/s per JAX device, keyed by substrings of `jax.Device.device_kind` (lower case;
# the first key found in a device's kind wins, so "tpu v5 lite" precedes "tpu v5"). A device is a
# chip everywhere but on TPU7x, whose two TensorCores are two devices. The one peak table: MFU
# reads it here and the planner's chip table (tools/hardware.py) takes its peaks from it.
PEAK_BF16_FLOPS = {
    "tpu v4": 275e12,        # cloud.google.com/tpu/docs/v4
    "tpu v5 lite": 197e12,   # v5e: cloud.google.com/tpu/docs/v5e; scaling book chip table
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,       # cloud.google.com/tpu/docs/v5p ("Peak compute per chip (bf16) 459
    "tpu v5": 459e12,        # TFLOPs"); scaling book, "How to Think About TPUs" (4.59e14)
    "tpu v6 lite": 918e12,   # v6e: cloud.google.com/tpu/docs/v6e ("... (bf16) 918 TFLOPs")
    "tpu v6e": 918e12,
    "tpu7x": 2307e12 / 2,    # Ironwood: 2,307 TFLOPs per chip (cloud.google.com/tpu/docs/tpu7x),
                             # two TensorCores per chip, each its own JAX device
    "h100": 989e12,          # NVIDIA H100 data sheet, dense (1,979 with sparsity)
    "h200": 989e12,          # NVIDIA H200 data sheet, dense
    "h800": 989e12,          # H100's compute with less NVLink bandwidth
    "a100": 312e12,          # NVIDIA A100 data sheet, dense
    "b200": 2250e12,         # NVIDIA B200 (DGX B200) data sheet, dense
}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    from deepseek_jax.model.params import count_params
    n = count_params(config)
    p_matmul = n["active"] - n["embedding"] + n["mtp"] * _mtp_active_fraction(config, n)
    attn = (config.n_layers + config.mtp_depth) * _attention_per_layer(config, seq_len)
    return 6.0 * p_matmul - _adapter_savings(config) + attn


def stack_flops_per_token(config: ModelConfig, seq_len: int, stack: str) -> float:
    """The part of `flops_per_token` one scanned stack of the main model takes ("dense_layers"
    or "moe_layers"; 0 for a stack the model lacks), adapters aside: 6 per active parameter of
    its layers plus their attention. The planner's cost model weighs a pipelined stack by it."""
    import flax

    from deepseek_jax.model.params import is_routed_expert
    from deepseek_jax.train.sharded import abstract_variables      # cached: the planner's too
    params = flax.core.meta.unbox(abstract_variables(config)["params"]).get(stack)
    if params is None:
        return 0.0
    share = config.n_experts_per_token / max(config.n_routed_experts, 1)
    leaves = flax.traverse_util.flatten_dict(params)
    active = sum(float(np.prod(leaf.shape)) * (share if is_routed_expert(path) else 1.0)
                 for path, leaf in leaves.items())
    return 6.0 * active + config.layer_stacks[stack] * _attention_per_layer(config, seq_len)


def _attention_per_layer(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token of one layer's causal attention core (module docstring)."""
    c = config
    return 3 * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq_len


def _adapter_savings(config: ModelConfig) -> float:
    """What LoRA adapters take off 6·P_matmul per token (module docstring), leaf by leaf, P
    counting every parameter leaf (adapters included) as `count_params` does: 2 per parameter
    of a frozen weight that forms no gradient, and the whole 6 of the A and B of a weight
    adapted as W' (used once per step, not per token). Adapters beside their projections cost
    the 6 they are counted at."""
    if not config.adapter_rank:
        return 0.0
    import flax

    from deepseek_jax.model import adapters
    from deepseek_jax.model.params import is_routed_expert
    from deepseek_jax.train.sharded import abstract_variables      # cached: the planner's too
    shapes = abstract_variables(config)
    flat = flax.traverse_util.flatten_dict(flax.core.meta.unbox(shapes["params"]))
    share = config.n_experts_per_token / max(config.n_routed_experts, 1)
    saved = 0.0
    for path, leaf in flat.items():
        n = float(np.prod(leaf.shape))
        if adapters.is_adapter(path):
            name = str(path[-1])
            if adapters.merged_in_model((*path[:-1], name[:-len(adapters.SUFFIXES[0])])):
                saved += 6.0 * n                 # counted (unscaled) at 6; costs ~0 a token
            continue
        if path == ("embed",):
            continue                             # a lookup, not in P_matmul
        adapted = (*path[:-1], str(path[-1]) + adapters.SUFFIXES[0]) in flat
        if adapted and adapters.merged_in_model(path):
            continue                             # dW' is formed: 6 per parameter, as counted
        saved += 2.0 * n * (share if is_routed_expert(path) else 1.0)
    return saved


def _mtp_active_fraction(config: ModelConfig, n: dict) -> float:
    """The MTP block's routed experts are also sparse: scale its count to its active share."""
    if not n["mtp"] or not config.n_routed_experts:
        return 1.0
    D, F, E, X = config.d_model, config.moe_d_ff, config.n_routed_experts, config.n_experts_per_token
    routed = config.mtp_depth * 3 * D * F * E
    return (n["mtp"] - routed * (1 - X / E)) / n["mtp"]


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in kind:
            return value
    return None
