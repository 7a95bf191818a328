"""LoRA adapters (Hu et al., 2021): a frozen projection W plus a trained low-rank update.

    W' = W + (alpha / r) · A·B        A [*lead, *in, r]  (normal, std 1/√fan_in)
                                      B [*lead, r, *out] (zeros: W' = W at the start)

Not to be confused with DeepSeek's `q_lora_rank` / `kv_lora_rank`, which are the model's own
low-rank compression of queries and keys/values: those are ordinary trained weights here.

`ModelConfig.adapter_rank` r > 0 switches them on, on the projections named by
`adapter_targets` (groups in `config.ADAPTER_GROUPS`: "attention" = the eight MLA projections,
"mlp" = the dense FFNs and shared experts, "experts" = the routed experts, one adapter pair per
expert; or one weight, "attention.w_o"). `*lead` is the scan's layer axis and, for routed
experts, the expert axis: each layer and each expert gets its own pair. A is split like W's
input axes and B like its output axes (the rank axis, logical name "adapter", never).

How it runs. A projection that goes through `layers.einsum` (all eight MLA projections but
W_UK and W_UV, the FFNs and shared experts) adds the adapters beside the frozen GEMM:

    y = x·W + s·(x·A)·B           (`declare` gives the pair, `low_rank` the second term)

W is a constant there, so the backward pass forms neither W's gradient nor its reduction: A's
and B's are contractions over the tokens, dA = s·xᵀ·(dy·Bᵀ) and dB = s·(x·A)ᵀ·dy, and the
gradient GEMMs of the frozen weights are left out. The adapter term runs in the compute dtype,
not fp8. W_UK and W_UV (used inside the attention cores and the absorbed decode) and the routed
experts (used by the expert dispatch) are adapted by `adapt`, which forms W' = W + s·A·B where
the module declares W, so every path that reads those weights sees W'; their gradient reaches
A and B through dW'. `merge` folds every pair into its weight (the plain model).

Precision: A and B are fp32; W' is formed in fp32 and cast to the compute dtype where it is
used, as a full fine-tuning's fp32 master weight is (under bf16 compute an update s·A·B then
shows once it moves W' by a bf16 rounding step, as accumulated full fine-tuning updates do).
The frozen weights may be stored in bf16 (`param_dtype`, the fine-tuning configs'
`adapter.frozen_dtype`): half their memory, the adapters still fp32.

Training with adapters (`train.step`, `rl.step`): `split` parts the parameters into the
adapters (differentiated, in the optimizer) and the rest (frozen); the train state holds both,
and a checkpoint by default the adapters alone (`train/checkpoint.py`: the frozen weights are
read back from the starting run). `merge` folds the adapters into their weights, which gives
the plain model (`checkpoint.load_trained` reads a run trained with adapters that way).

Left out: dropout on the adapter input (PEFT's `lora_dropout`); adapters on the embedding,
the output head, the router and MTP's `eh_proj`; quantized frozen weights (QLoRA).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig

SUFFIXES = ("_lora_a", "_lora_b")
_LETTERS = "abcdefghijklmnopq"


def targeted(config: ModelConfig, group: str, name: str) -> bool:
    """Whether the projection `name` of `group` ("attention", "mlp", "experts") gets adapters."""
    return config.adapter_rank > 0 and (group in config.adapter_targets
                                        or f"{group}.{name}" in config.adapter_targets)


def scale(config: ModelConfig) -> float:
    """s = alpha / r, the factor on A·B."""
    return config.adapter_alpha / config.adapter_rank


def update(a: jax.Array, b: jax.Array, lead: int) -> jax.Array:
    """A·B over the rank axis: a [*lead, *in, r], b [*lead, r, *out] → [*lead, *in, *out], in
    fp32 at full precision (TPUs and GPUs otherwise multiply fp32 in bf16 or tf32 passes)."""
    n_in, n_out = a.ndim - lead - 1, b.ndim - lead - 1
    L, I = _LETTERS[:lead], _LETTERS[lead:lead + n_in]
    O = _LETTERS[lead + n_in:lead + n_in + n_out]
    return jnp.einsum(f"{L}{I}r,{L}r{O}->{L}{I}{O}", a.astype(jnp.float32),
                      b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


class Pair(NamedTuple):
    """One weight's adapters: a [*in, r], b [r, *out] (fp32) and the factor s = alpha / r."""
    a: jax.Array
    b: jax.Array
    scale: float


def declare(module: nn.Module, name: str, shape, axes, config: ModelConfig, group: str,
            n_in: int = 1) -> Pair | None:
    """Declares `{name}_lora_a` and `{name}_lora_b` in `module` for the weight `name` of
    `shape` and logical `axes` when the config targets it (else None). `n_in`: how many of the
    weight's axes (after the expert axis of a routed expert) are its inputs, the axes the
    projection contracts; the rest are outputs."""
    if not targeted(config, group, name):
        return None
    lead = 1 if group == "experts" else 0
    r, axes, shape = config.adapter_rank, tuple(axes), tuple(shape)
    ins, outs = shape[lead:lead + n_in], shape[lead + n_in:]
    a_init = nn.initializers.normal(stddev=math.prod(ins) ** -0.5)
    a = module.param(f"{name}_lora_a",
                     nn.with_logical_partitioning(a_init, (*axes[:lead + n_in], "adapter")),
                     (*shape[:lead], *ins, r), jnp.float32)
    b = module.param(f"{name}_lora_b",
                     nn.with_logical_partitioning(nn.initializers.zeros,
                                                  (*axes[:lead], "adapter", *axes[lead + n_in:])),
                     (*shape[:lead], r, *outs), jnp.float32)
    return Pair(a, b, scale(config))


def adapt(module: nn.Module, name: str, w: jax.Array, axes, config: ModelConfig, group: str,
          n_in: int = 1) -> jax.Array:
    """W' = W + s·A·B in fp32 for a targeted weight `w` (declared with logical `axes`; the
    pair from `declare`), else `w`: for weights read other than by one projection."""
    pair = declare(module, name, w.shape, axes, config, group, n_in)
    if pair is None:
        return w
    return w.astype(jnp.float32) + pair.scale * update(pair.a, pair.b,
                                                       1 if group == "experts" else 0)


def low_rank(eqn: str, x: jax.Array, pair: Pair, dtype) -> jax.Array:
    """s·(x·A)·B for the projection `eqn` (as `layers.einsum` takes it: x's axes, then the
    weight's, inputs first), in the compute dtype: what the adapters add to einsum(eqn, x, W)."""
    lhs, out = eqn.split("->")
    x_axes, w_axes = lhs.split(",")
    ins = "".join(c for c in w_axes if c in x_axes)
    outs = "".join(c for c in w_axes if c not in x_axes)
    hidden = "".join(c for c in x_axes if c not in ins) + "z"                 # x's, r as z
    h = jnp.einsum(f"{x_axes},{ins}z->{hidden}", x.astype(dtype), pair.a.astype(dtype))
    y = jnp.einsum(f"{hidden},z{outs}->{out}", h, pair.b.astype(dtype))
    return (pair.scale * y).astype(dtype)


def merged_in_model(path: tuple) -> bool:
    """Whether the weight at a flattened parameter path is adapted as W' = W + s·A·B (`adapt`:
    W_UK, W_UV, the routed experts) rather than beside its projection (`declare`)."""
    name = str(path[-1])
    return name in ("w_uk", "w_uv") or (len(path) >= 2 and path[-2] == "moe"
                                        and name in ("w_gate", "w_up", "w_down"))


def is_adapter(path: tuple) -> bool:
    """Whether a flattened parameter path (a tuple of names) is an adapter's A or B."""
    return str(path[-1]).endswith(SUFFIXES)


def split(params: dict, config: ModelConfig) -> tuple[dict, dict]:
    """(trained, frozen) parameters: (adapters, everything else) when the config has adapters,
    else (params, {})."""
    if not config.adapter_rank:
        return params, {}
    flat = flax.traverse_util.flatten_dict(params)
    unflat = flax.traverse_util.unflatten_dict
    return (unflat({k: v for k, v in flat.items() if is_adapter(k)}),
            unflat({k: v for k, v in flat.items() if not is_adapter(k)}))


def combine(trained: dict, frozen: dict) -> dict:
    """The inverse of `split`."""
    if not frozen:
        return trained
    return flax.traverse_util.unflatten_dict({**flax.traverse_util.flatten_dict(frozen),
                                              **flax.traverse_util.flatten_dict(trained)})


def plain(config: ModelConfig) -> ModelConfig:
    """The config without adapters (what `merge` returns parameters for)."""
    return config.replace(adapter_rank=0)


def merge(params: dict, config: ModelConfig) -> dict:
    """The parameters of `plain(config)`: each adapted W replaced by W + s·A·B (what the
    adapter model computes with, beside the projection or as W'), the adapters dropped.
    Without adapters, `params` unchanged."""
    if not config.adapter_rank:
        return params
    flat = flax.traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for key in flat:
        if str(key[-1]).endswith(SUFFIXES[0]):
            w_key = (*key[:-1], str(key[-1])[: -len(SUFFIXES[0])])
            out[w_key] = merged_weight(flat[w_key], flat[key],
                                       flat[(*key[:-1], w_key[-1] + SUFFIXES[1])], config)
    return flax.traverse_util.unflatten_dict(out)


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, config: ModelConfig) -> jax.Array:
    """W + s·A·B for one stored weight and its adapters, any leading axes (layers, experts)."""
    lead = a.ndim + b.ndim - 2 - w.ndim         # w [*lead, *in, *out]: a and b add an r axis each
    return (w.astype(jnp.float32) + scale(config) * update(a, b, lead)).astype(w.dtype)


def disabled(params: dict, config: ModelConfig) -> dict:
    """`params` with every B zero: every adapter term is then exactly 0 (x·W + 0, W + 0), so
    the model computes the frozen base (GRPO's reference policy, no second copy of the
    weights)."""
    if not config.adapter_rank:
        return params
    return flax.traverse_util.unflatten_dict(
        {k: jnp.zeros_like(v) if str(k[-1]).endswith(SUFFIXES[1]) else v
         for k, v in flax.traverse_util.flatten_dict(params).items()})


def adapter_sharding(w: jax.sharding.NamedSharding, a_shape, b_shape, w_ndim: int, which: str):
    """A's or B's sharding (`which` "a" or "b") from its weight's: A takes W's input axes, B
    its output axes, the rank axis none (as `adapt` declares them)."""
    spec = tuple(w.spec) + (None,) * (w_ndim - len(w.spec))
    lead = len(a_shape) + len(b_shape) - 2 - w_ndim
    n_in = len(a_shape) - 1 - lead
    parts = (spec[:lead + n_in] + (None,) if which == "a"
             else spec[:lead] + (None,) + spec[lead + n_in:])
    return jax.sharding.NamedSharding(w.mesh, jax.sharding.PartitionSpec(*parts))
