"""DeepSeekMoE: shared + fine-grained routed experts, the V3 gate, aux-loss-free balancing.

The layer (`MoE`): router, stacked routed experts, shared experts, statistics. It chooses the
experts with `routing.py` (gate, loads, balance loss, capacity, the mesh layout) and runs them
with `dispatch.py` (dense reference, ragged grouped GEMMs, local per-device and expert-parallel
dispatch).

Sharded meshes (`moe_impl="ragged"`, mesh and rules from `parallel.sharding_context`): when the
rules split E over a mesh axis of size > 1 the module calls `dispatch.expert_parallel_moe`
(shard_map + all-to-all, dropless with a bounded buffer). When E stays whole but the batch is
split (dp, fsdp, fsdp_tp: `routing.layout_from_context` gives a layout without expert axes), the
same function dispatches locally: each device sorts only its own tokens and runs them through the
full expert weights inside a shard_map, with no exchange. Left to the compiler, the global sort of
`ragged_dispatch` would gather routing scores and ids over the whole batch and all-reduce the
routed token copies (280 GiB of temporaries per chip for V3 on 512 chips). `moe_impl="dense"`
stays the compiler-partitioned reference. Nothing else changes: same parameters, same statistics
(loads are global counts either way).

Token dropping (`moe_capacity_factor` > 0, default 0 = dropless as in V3): pairs past their
expert's per-sequence capacity (`routing.capacity_keep`) get weight zero on every path
(and are not sent under EP); their number is sown as `moe_stats/dropped`.

fp8 (`config.fp8`; both dispatch functions take `fp8=`): the expert projections run with
DeepSeek's fp8 numerics. The dense path vmaps `kernels.fp8_linear.fp8_dot` (real block-scaled
fp8 GEMMs: Fprop, Dgrad, Wgrad) over the experts (`config.fp8_backend` names their kernels).
The ragged path calls `gmm(..., fp8=True)`: on Hopper (`moe_backend` "auto" or "mosaic_gpu") a
block-scaled fp8 grouped GEMM in DeepGEMM's contiguous layout; elsewhere
`kernels.fp8_linear.fp8_ragged_dot`, an EMULATION with the same numerics: the sorted rows are
quantized in 1×128 tiles, every expert's weight in 128×128 blocks, and `ragged_dot` runs on the
dequantized values with fp32 accumulation (at fp32 speed); its backward quantizes the same way
(wgrad tiles along the tokens restart at each expert's first row). See
`kernels/grouped_gemm.py` for what each runs. The router, the gate arithmetic and the combine
stay in fp32 / `dtype`, as in V3; the shared experts are an `MLP`, which follows `config.fp8`
too.

Left out, and why:

  - Dropping by score (V2 dropped the lowest-affinity pairs): capacity drops the latest pairs
    of a sequence, which needs no extra sort; the default drops nothing.
  - V2's device- and communication-balance losses (α2, α3) and its batch-level expert loss: V3
    replaced them with the bias update plus the sequence-wise loss kept here.

Frozen parameter and variable names (checkpoints and the HF import depend on them):

  params/router       [D, E]     ("embed", "expert")        HF mlp.gate.weight, transposed
  params/w_gate       [E, D, F]  ("expert", "embed", "mlp") HF mlp.experts.{e}.gate_proj.weight,
                                                            transposed and stacked over e
  params/w_up         [E, D, F]  ("expert", "embed", "mlp") HF mlp.experts.{e}.up_proj.weight,
                                                            transposed and stacked over e
  params/w_down       [E, F, D]  ("expert", "mlp", "embed") HF mlp.experts.{e}.down_proj.weight,
                                                            transposed and stacked over e
  params/shared/...   `layers.MLP` of width n_shared_experts·moe_d_ff: HF mlp.shared_experts.*
  routing/bias        [E] fp32, only when `routing_bias`     HF mlp.gate.e_score_correction_bias

Collections: `routing` holds the bias (state, never seen by the optimizer; updated after each step
with `routing.update_routing_bias`). `moe_stats` receives, through `sow` (tuples, one entry per call), the
expert `load` [E], the `balance_loss` scalar and, with a capacity factor, the `dropped` count; nothing is sown during `init`, so the variables
returned by `init` hold only `params` and `routing`. Apply with `mutable=["moe_stats"]` to read
them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import adapters, dispatch, layers, routing
from deepseek_jax.model.layers import MLP, param


def combine_microbatch_stats(stats, count):
    """The sown statistics of `count` equal micro-batches, summed leaf by leaf, as one batch's:
    the counts (expert `load`, `dropped` pairs) stay sums; the others (the balance losses,
    means over sequences) are divided by `count`."""
    is_count = lambda path: any(k in jax.tree_util.keystr(path) for k in ("load", "dropped"))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if is_count(path) else x / count, stats)


class MoE(nn.Module):
    """DeepSeekMoE FFN: shared experts + top-X of E routed experts. [B, T, D] → [B, T, D].

    Parameter names are frozen (see the module docstring). Scan-safe: under `nn.scan` with
    variable_axes {"params": 0, "routing": 0, "moe_stats": 0} the bias becomes [L, E] and the
    sown load [L, E].
    """
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None,
                 order=None) -> jax.Array:
        """x [B, T, D] → [B, T, D]. `token_mask` [B, T] (true = a real token; None = all) keeps
        padding out of the sown load and balance loss; the outputs do not depend on it. `order`:
        the zigzag order T is stored in, if any (only capacity dropping reads it)."""
        c = self.config
        D, E, F = c.d_model, c.n_routed_experts, c.moe_d_ff
        router = param(self, "router", (D, E), ("embed", "expert"), c)

        def weight(name, shape, axes):               # declared, LoRA-adapted if targeted
            return adapters.adapt(self, name, param(self, name, shape, axes, c), axes, c,
                                  "experts")

        w_gate = weight("w_gate", (E, D, F), ("expert", "embed", "mlp"))
        w_up = weight("w_up", (E, D, F), ("expert", "embed", "mlp"))
        w_down = weight("w_down", (E, F, D), ("expert", "mlp", "embed"))
        bias = None
        if c.routing_bias:
            bias = self.variable("routing", "bias",
                                 lambda: jnp.zeros((E,), jnp.float32)).value  # [E]

        # Router in full fp32 (HIGHEST keeps TPU/GPU from using bf16/tf32 passes); it is tiny.
        logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), router.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)              # [B, T, E]
        # Computed where x lies: under context parallelism each rank routes its own positions
        # (`routing.local_routing`); with a capacity factor, which needs whole sequences, it is
        # the logits (E a token) that travel, not x (D a token).
        logits = layers.constrain(logits, (layers.BATCH, layers.LENGTH, None))
        layout = None
        # Not at init: the routed output does not matter there, and init traces a dummy batch
        # (often one sequence) that need not split over the batch axes.
        if c.moe_impl == "ragged" and not self.is_initializing():
            layout = routing.layout_from_context(c, batch_size=x.shape[0])
        keep, stats, balance = None, {}, None
        if layout is not None:
            # Gate, balance loss and capacity per device on its own sequences (the compiler
            # would gather the scores over the batch for the top-k).
            weights, idx, balance, keep = routing.local_routing(logits, bias, c, layout,
                                                                token_mask, order)
        else:
            weights, idx, scores = routing.gate(logits, bias, c)              # [B, T, X] ×2
            if c.moe_capacity_factor > 0:
                keep = routing.capacity_keep(idx, E, c.moe_capacity_factor,
                                             order)                           # [B, T, X]
        if keep is not None:
            stats["dropped"] = jnp.sum(~keep).astype(jnp.float32)
        # Shared experts first: they do not depend on the routed exchange, so the scheduler may
        # run them while the all-to-all is in flight.
        shared = None
        if c.n_shared_experts > 0:
            shared = MLP(c, d_ff=c.n_shared_experts * F, name="shared")(x)    # [B, T, D]

        if layout is not None:
            y, load, _ = dispatch.expert_parallel_moe(
                x, weights, idx, w_gate, w_up, w_down, layout=layout, dtype=c.dtype,
                backend=c.moe_backend, transport=c.moe_ep_transport,
                buffer_factor=c.moe_ep_buffer_factor, fp8=c.fp8, keep=keep,
                expert_chunks=dispatch.expert_chunks(c))                       # [B, T, D]
            if token_mask is not None:                 # the loads of real tokens only
                load = routing.local_load(idx, token_mask, E, layout)         # [E]
        else:
            w_kept = weights if keep is None else jnp.where(keep, weights, 0)
            if c.moe_impl == "ragged":
                y = dispatch.ragged_dispatch(x, w_kept, idx, w_gate, w_up, w_down, c.dtype,
                                             c.fp8, backend=c.moe_backend)    # [B, T, D]
            else:
                y = dispatch.dense_dispatch(x, w_kept, idx, w_gate, w_up, w_down, c.dtype,
                                            c.fp8, c.fp8_backend)             # [B, T, D]
            load = routing.expert_load(idx, E, token_mask)                    # [E]
        if shared is not None:
            y = y + shared                                                    # [B, T, D]

        # Statistics for the train step; skipped at init so `init` returns no stale stats (sow
        # appends, so re-applied init stats would double up).
        if not self.is_initializing():
            self.sow("moe_stats", "load", load)
            if balance is None:
                balance = routing.sequence_balance_loss(scores, idx, E, token_mask)
            self.sow("moe_stats", "balance_loss", balance)
            for name, value in stats.items():
                self.sow("moe_stats", name, value)
        return y.astype(c.dtype)
