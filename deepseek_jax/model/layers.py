"""Shared building blocks: parameter declaration with logical axes, RMSNorm, SwiGLU FFN, projections.

Every parameter is declared through `param`, which attaches logical axis names
(`nn.with_logical_partitioning`); `deepseek_jax.parallel` maps those names onto a device mesh.
The names used here (frozen: checkpoints and the rule table depend on them):

  "vocab" V   "embed" D   "heads" N   "head_dim" H/R/U   "q_lora" Q   "kv_lora" C
  "mlp" F     "expert" E  "layers" (added by nn.scan over stacked blocks)

Activations are constrained at block boundaries with `constrain`, a no-op outside a mesh.

Projections go through `einsum(eqn, x, w, dtype, fp8=False)`. With `fp8=True` (the model passes
`config.fp8`) the product runs through DeepSeek-V3's fp8 recipe instead of a `config.dtype` GEMM:
x in 1×128 e4m3 tiles, the fp32 master weight in 128×128 blocks, fp32 accumulation, and the two
backward GEMMs in fp8 as well (`deepseek_jax.kernels.fp8_linear.fp8_einsum`). With `fp8=False`
nothing changes. What stays in higher precision whatever `fp8` says (V3 §3.3): the embedding, the
output head, the MoE router, the norms and the attention core (scores, softmax, W_UK / W_UV).

Left out: biases (no DeepSeek projection has one), LayerNorm, activations other than SiLU.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.fp8_linear import fp8_einsum
from deepseek_jax.model import adapters
from deepseek_jax.parallel.rules import axis_names

# Logical names of activation axes (parameters use the names in the docstring above).
BATCH, LENGTH, EMBED, HEADS, VOCAB = ("act_batch", "act_length", "act_embed", "act_heads",
                                      "act_vocab")


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str],
          config: ModelConfig, init: str = "normal") -> jax.Array:
    """Declares a parameter with logical axes; `init` is "normal" (std = config.init_std) or "ones"."""
    if init == "normal":
        fn = nn.initializers.normal(stddev=config.init_std)
    elif init == "ones":
        fn = nn.initializers.ones
    elif init == "zeros":
        fn = nn.initializers.zeros
    else:
        raise ValueError(f"unknown init {init!r}")
    return module.param(name, nn.with_logical_partitioning(fn, tuple(axes)), tuple(shape),
                        config.param_dtype)


@jax.custom_vjp
def _round_to_bf16(w: jax.Array) -> jax.Array:
    """f32 → bf16, round to nearest even, in integer arithmetic on the bit patterns (NaN stays
    NaN: its payload is set to the quiet NaN's)."""
    bits = jax.lax.bitcast_convert_type(w, jnp.uint32)
    rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16
    rounded = jnp.where(jnp.isnan(w), jnp.uint32(0x7FC0), rounded)
    return jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


_round_to_bf16.defvjp(lambda w: (_round_to_bf16(w), None),
                      lambda _, g: (g.astype(jnp.float32),))


def cast_layer_weight(w: jax.Array, dtype) -> jax.Array:
    """`w.astype(dtype)` for one layer's slice of a scanned weight stack, kept inside the loop
    (every projection, `einsum`, and the routed experts cast their weights with it).

    XLA's bf16 propagation sees a loop-carried f32 stack whose every use is a cast to bf16 and
    turns the whole stack into bf16 before the loop: one copy of every layer's weights held
    from the first forward layer to the last backward one (through optimization barriers too).
    For V3's routed experts that is 2.4 GiB per chip on 512 chips; without FSDP, half the
    parameters' bytes again for every scanned weight. Rounding f32 to bf16 on the integer bit
    patterns gives the same values (round to nearest even) and is no float cast the pass can
    move. Other dtype pairs are a plain cast. The gradient is the cotangent cast back
    to f32, as for `astype`."""
    if w.dtype == jnp.float32 and jnp.dtype(dtype) == jnp.bfloat16:
        return _round_to_bf16(w)
    return w.astype(dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation; does nothing without mesh rules."""
    return nn.with_logical_constraint(x, tuple(axes))


def split_axes(logical: str) -> tuple[str, ...]:
    """Mesh axes the rules in context give the logical name `logical`, keeping those of size > 1
    that the compiler still partitions (not manual); () without a mesh or rules."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return ()
    manual = set(mesh.manual_axes)
    return tuple(a for a in axis_names(nn.logical_to_mesh_axes((logical,), rules)[0])
                 if mesh.shape.get(a, 1) > 1 and a not in manual)


def split_size(axes: Sequence[str]) -> int:
    """Devices the mesh in context splits over `axes` together."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes)


def token_axes(batch_size: int) -> tuple[str, ...]:
    """Mesh axes the batch is split over (the `act_batch` rule, `split_axes`), read from the
    mesh and rules in context; () when there are none or when `batch_size` does not divide
    over them."""
    axes = split_axes(BATCH)
    return axes if axes and batch_size % split_size(axes) == 0 else ()


def lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of the embedding table [V, D] for token ids [B, ...], in the compute dtype.

    On a mesh whose rules split D over axes that also split the batch or the sequence (the
    `embed` and `act_batch` rules share fsdp, expert under fsdp_ep; `embed` and `act_length`
    share context under fsdp_cp), each device gathers its group's ids over those axes (ints:
    B·T·4 bytes), looks them up in its own D-slice of the table, and an
    all-to-all over the same axes hands every device its own sequences' whole rows. The table is
    never gathered, and its gradient is a scatter-add into the local [V, D/n] slice. Left to the
    compiler, the lookup gathers the whole table and reduces a whole-table fp32 gradient (V3:
    129,280 × 7,168, 3.45 GiB per chip). Elsewhere (no mesh, the vocabulary split over tensor, a
    batch that does not divide over the axes) it is `jnp.take`, partitioned by the compiler.
    """
    batch, d_axes = token_axes(tokens.shape[0]), split_axes("embed")
    length = split_axes(LENGTH) if tokens.ndim > 1 else ()
    if (not (batch or length) or not d_axes or split_axes("vocab")
            or not set(d_axes) <= {*batch, *length} or table.shape[1] % split_size(d_axes)):
        return jnp.take(table, tokens, axis=0).astype(dtype)

    def per_device(rows, ids):                     # rows [V, D/n], ids [b, t, ...]
        ids = jax.lax.all_gather(ids, d_axes, axis=0, tiled=True)               # [n·b, t, ...]
        x = jnp.take(rows, ids, axis=0).astype(dtype)                           # [n·b, t, ..., D/n]
        return jax.lax.all_to_all(x, d_axes, 0, x.ndim - 1, tiled=True)        # [b, t, ..., D]

    spec = P(batch or None, length or None)
    return jax.shard_map(per_device, in_specs=(P(None, d_axes), spec), out_specs=spec,
                         check_vma=False)(table, tokens)


def einsum(eqn: str, x: jax.Array, w: jax.Array, dtype, fp8: bool = False,
           fp8_backend: str = "auto", adapter: adapters.Pair | None = None) -> jax.Array:
    """A projection: both operands in the compute dtype, result in the compute dtype.

    adapter: the weight's LoRA pair, if it has one: s·(x·A)·B is added (`adapters.low_rank`),
    and w, frozen, gets no gradient GEMM.

    fp8=True: x (cast to `dtype`) and the weight as stored (the fp32 master, not cast) go through
    the fp8 GEMMs of `fp8_einsum`; the weight's contracted axes form K and its other axes N, so
    `eqn` must be a projection (no axis shared by x, w and the result). Result in `dtype`.
    fp8_backend: the GEMM backend of `kernels.fp8` ("auto" picks by the tracing host's platform;
    name one to lower for another platform).
    On a mesh (x's leading axis the batch) the fp8 GEMMs run per device over the batch axes
    (`token_axes`): each weight shard is quantized where it lives and gathered once, in fp8.
    Under context parallelism (x [B, T, ...] with T split too) x is viewed as [n, B, T/n, ...],
    the context chunk first, so that its rows, flattened, are split over (context, batch axes)
    in that order, each device's own rows: nothing moves to make the view.
    """
    y = _projection(eqn, x, w, dtype, fp8, fp8_backend)
    return y if adapter is None else y + adapters.low_rank(eqn, x, adapter, dtype)


def _projection(eqn: str, x: jax.Array, w: jax.Array, dtype, fp8: bool,
                fp8_backend: str) -> jax.Array:
    """`einsum` without adapters."""
    if not fp8:
        return jnp.einsum(eqn, x.astype(dtype), cast_layer_weight(w, dtype))
    axes = token_axes(x.shape[0]) if x.ndim > 1 else ()
    ctx = split_axes(LENGTH) if x.ndim > 2 else ()
    if not ctx or x.shape[1] % split_size(ctx):
        return fp8_einsum(eqn, x.astype(dtype), w, out_dtype=dtype, backend=fp8_backend,
                          token_axes=axes)
    n, (B, T) = split_size(ctx), x.shape[:2]
    chunks = jnp.moveaxis(x.reshape(B, n, T // n, *x.shape[2:]), 1, 0)        # [n, B, T/n, ...]
    lead = eqn if eqn.startswith("...") else "..." + eqn.replace("->", "->...")  # n leads
    y = fp8_einsum(lead, chunks.astype(dtype), w, out_dtype=dtype, backend=fp8_backend,
                   token_axes=ctx + axes)                                   # [n, B, T/n, ...]
    return jnp.moveaxis(y, 0, 1).reshape(B, T, *y.shape[3:])                  # [B, T, ...]


class RMSNorm(nn.Module):
    """x / rms(x) · scale over the last axis, computed in fp32 (as DeepSeek and HF do)."""
    config: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", (x.shape[-1],), (self.axis_name,), self.config, init="ones")
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                  + self.config.rms_norm_eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.config.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
           dtype, fp8: bool = False, fp8_backend: str = "auto",
           pairs: tuple = (None, None, None)) -> jax.Array:
    """SwiGLU FFN: w_down(silu(x·w_gate) ⊙ x·w_up). x [..., D]; w_gate, w_up [D, F]; w_down [F, D].

    fp8=True runs the three projections as fp8 GEMMs (`einsum`); the SiLU and the product stay
    in `dtype`. `pairs`: the three weights' LoRA adapters (`adapters.Pair`, None without)."""
    gate = einsum("...D,DF->...F", x, w_gate, dtype, fp8, fp8_backend, pairs[0])  # [..., F]
    up = einsum("...D,DF->...F", x, w_up, dtype, fp8, fp8_backend, pairs[1])      # [..., F]
    gate, up = checkpoint_name((gate, up), "mlp_hidden")
    out = einsum("...F,FD->...D", nn.silu(gate) * up, w_down, dtype, fp8, fp8_backend,
                 pairs[2])                                                 # [..., D]
    return checkpoint_name(out, "mlp_out")


class MLP(nn.Module):
    """Dense SwiGLU FFN (dense layers, and the shared experts with width n_shared·moe_d_ff).

    Parameter names (frozen): w_gate [D, F] (HF gate_proj), w_up [D, F] (up_proj),
    w_down [F, D] (down_proj). `config.fp8` switches the three projections to fp8 GEMMs.
    """
    config: ModelConfig
    d_ff: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, D, F = self.config, self.config.d_model, self.d_ff
        def weight(name, shape, axes):               # and its LoRA pair, if targeted
            return (param(self, name, shape, axes, c),
                    adapters.declare(self, name, shape, axes, c, "mlp"))

        (w_gate, a_gate), (w_up, a_up), (w_down, a_down) = (
            weight("w_gate", (D, F), ("embed", "mlp")), weight("w_up", (D, F), ("embed", "mlp")),
            weight("w_down", (F, D), ("mlp", "embed")))
        return swiglu(x, w_gate, w_up, w_down, c.dtype, c.fp8, c.fp8_backend,
                      (a_gate, a_up, a_down))                                 # [B, T, D]
