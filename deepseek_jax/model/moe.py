"""DeepSeekMoE: shared + fine-grained routed experts, the V3 gate, aux-loss-free balancing.

What is in:

  gate                   router scores → (combine weights, expert ids, scores). Sigmoid (V3) or
                         softmax (V2) scores in fp32; the routing bias enters the *selection* only;
                         group-limited routing (keep `n_limited_groups` of G groups, ranked by
                         the sum of their top-2 biased scores (V3) or their max (V2)), dropped
                         groups masked with −inf; weights are the unbiased scores of the selected
                         experts, optionally renormalised, times `routed_scaling_factor`.
  expert_load            (token, slot) assignments per expert, for the bias update.
  sequence_balance_loss  V3's complementary sequence-wise balance loss (eqs. 17–20) without α.
  update_routing_bias    b ← b + γ·sign(mean load − load), on arrays or pytrees of them.
  dense_dispatch         reference expert computation: every expert on every token, combined with
                         a [.., E] weight matrix that is zero for unselected experts.
  ragged_dispatch        (token, slot) pairs sorted by expert, three grouped GEMMs
                         (`kernels.grouped_gemm.gmm`, backend from `config.moe_backend`: "auto" =
                         ragged_dot on CPU, megablox on TPU, Mosaic GPU on Hopper), weighted and
                         summed back per token. Same values and gradients as the dense path.
  MoE                    the Flax module: router, stacked experts, shared experts, statistics.

Sharded meshes (`moe_impl="ragged"`, mesh and rules from `parallel.sharding_context`): when the
rules split E over a mesh axis of size > 1 the module calls `parallel.expert.expert_parallel_moe`
(shard_map + all-to-all, dropless with a bounded buffer). When E stays whole but the batch is
split (dp, fsdp, fsdp_tp: `expert.layout_from_context` gives a layout without expert axes), the
same function dispatches locally: each device sorts only its own tokens and runs them through the
full expert weights inside a shard_map, with no exchange. Left to the compiler, the global sort of
`ragged_dispatch` would gather routing scores and ids over the whole batch and all-reduce the
routed token copies (280 GiB of temporaries per chip for V3 on 512 chips). `moe_impl="dense"`
stays the compiler-partitioned reference. Nothing else changes: same parameters, same statistics
(loads are global counts either way).

Token dropping (`moe_capacity_factor` > 0, default 0 = dropless as in V3): pairs past their
expert's per-sequence capacity (`parallel.expert.capacity_keep`) get weight zero on every path
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
`kernels/grouped_gemm.py` for what each runs. The router, the gate arithmetic and the combine stay in fp32 / `dtype`, as in V3; the
shared experts are an `MLP`, which follows `config.fp8` too.

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
with `update_routing_bias`). `moe_stats` receives, through `sow` (tuples, one entry per call), the
expert `load` [E], the `balance_loss` scalar and, with a capacity factor, the `dropped` count; nothing is sown during `init`, so the variables
returned by `init` hold only `params` and `routing`. Apply with `mutable=["moe_stats"]` to read
them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.fp8_linear import fp8_dot
from deepseek_jax.kernels.grouped_gemm import gmm
from deepseek_jax.model.layers import MLP, einsum, param


# --- gate --------------------------------------------------------------------------------------

def gate(logits: jax.Array, bias: jax.Array | None,
         config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chooses X experts per token and their combine weights (spec §3; V3 eqs. 13–16).

    Args:
      logits: router logits [..., E], computed in fp32.
      bias: selection bias [E] (the aux-loss-free balancing state), or None.
      config: uses n_experts_per_token, n_expert_groups, n_limited_groups, score_func,
        group_score, norm_topk_prob and routed_scaling_factor.

    Returns:
      weights [..., X] fp32: unbiased scores of the chosen experts, renormalised if
        `norm_topk_prob`, times `routed_scaling_factor`.
      idx [..., X] int32: chosen experts, in decreasing order of biased score (ties go to the
        lower expert id, as `lax.top_k` breaks them).
      scores [..., E] fp32: the unbiased affinities (for the balance loss).
    """
    c = config
    E, X, G = logits.shape[-1], c.n_experts_per_token, c.n_expert_groups
    logits = logits.astype(jnp.float32)
    if c.score_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)                                    # [..., E]
    else:
        scores = jax.nn.softmax(logits, axis=-1)                           # [..., E]
    # The bias decides which experts are chosen, never how much they weigh.
    biased = scores if bias is None else scores + bias.astype(jnp.float32)  # [..., E]

    if G > 1:
        grouped = biased.reshape(*biased.shape[:-1], G, E // G)            # [..., G, E/G]
        if c.group_score == "top2_sum":
            group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)           # [..., G]
        else:
            group_scores = grouped.max(-1)                                 # [..., G]
        kept = jax.lax.top_k(group_scores, c.n_limited_groups)[1]          # [..., n_limited]
        keep = jax.nn.one_hot(kept, G, dtype=jnp.bool_).any(-2)           # [..., G]
        # −inf, not 0: biased scores can be negative, and a 0 would then outrank every kept
        # expert (HF's router has that bug; DeepSeek's reference uses −inf).
        grouped = jnp.where(keep[..., None], grouped, -jnp.inf)           # [..., G, E/G]
        biased = grouped.reshape(*biased.shape)                            # [..., E]

    idx = jax.lax.top_k(biased, X)[1].astype(jnp.int32)                    # [..., X]
    weights = jnp.take_along_axis(scores, idx, axis=-1)                    # [..., X]
    if c.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * c.routed_scaling_factor, idx, scores


# --- balancing -----------------------------------------------------------------------------------

def expert_load(idx: jax.Array, n_experts: int,
                token_mask: jax.Array | None = None) -> jax.Array:
    """Number of (token, slot) assignments per expert over every leading axis.

    Args:
      idx: expert ids [..., X] from `gate`.
      n_experts: E.
      token_mask: optional [...] (idx's shape without X), true for the tokens that count;
        padding is left out of the loads (None: every token counts).

    Returns:
      [E] fp32 counts. Applied to a global (sharded) batch array under jit, these are counts over
      the global batch, which is what the bias update wants.
    """
    weights = None
    if token_mask is not None:
        weights = jnp.broadcast_to(token_mask[..., None], idx.shape).reshape(-1)
        weights = weights.astype(jnp.float32)                              # [M]
    return jnp.bincount(idx.reshape(-1), weights=weights,
                        length=n_experts).astype(jnp.float32)              # [E]


def sequence_balance_terms(scores: jax.Array, idx: jax.Array, n_experts: int,
                           token_mask: jax.Array | None = None):
    """Per-sequence Σ_i f_i·P_i [B] and whether each sequence has a token that counts [B].

    T in f_i and P_i is the number of tokens that count in that sequence (padding is no part
    of a sequence); a sequence of padding only has no loss and is left out of the mean.
    """
    B, T, X = idx.shape
    m = (jnp.ones((B, T), jnp.float32) if token_mask is None
         else token_mask.astype(jnp.float32))                              # [B, T]
    n = m.sum(-1)                                                          # [B]
    counts = jax.vmap(lambda i, w: expert_load(i, n_experts, w))(idx, m)   # [B, E]
    f = counts * (n_experts / X) / jnp.maximum(n, 1.0)[:, None]            # [B, E]
    scores = scores.astype(jnp.float32)
    s = scores / scores.sum(-1, keepdims=True)                             # [B, T, E]
    p = jnp.einsum("BTE,BT->BE", s, m) / jnp.maximum(n, 1.0)[:, None]      # [B, E]
    return jnp.einsum("BE,BE->B", f, p), n > 0


def sequence_balance_loss(scores: jax.Array, idx: jax.Array, n_experts: int,
                          token_mask: jax.Array | None = None) -> jax.Array:
    """V3's sequence-wise balance loss Σ_i f_i·P_i (eqs. 17–20), averaged over sequences, no α.

    f_i = E/(X·T) · #{t : i chosen for token t} and P_i = mean_t s'_{i,t}, with s' the scores
    normalised over E per token. For f we count the experts *actually selected* (the biased
    top-X from `gate`); the paper's eq. 18 writes the unbiased top-K, which is ambiguous once
    a bias steers routing (spec §10), and the loss is meant to balance the real routing.
    The value is 1 for perfectly uniform routing (Σ_i f_i = E and P_i = 1/E) and at most E/X.

    Padding (`token_mask` false) is left out: f and P average over each sequence's real
    tokens only, so a right-padded row weighs like the same row unpadded, and sequences with
    no real token are left out of the mean (`sequence_balance_terms`).

    Args:
      scores: unbiased affinities [B, T, E] from `gate`.
      idx: selected experts [B, T, X] from `gate`.
      n_experts: E.
      token_mask: optional [B, T], true for real tokens (None: all of them).

    Returns:
      scalar fp32 loss; gradients flow through the scores only (f is a count).
    """
    per_seq, has = sequence_balance_terms(scores, idx, n_experts, token_mask)  # [B] ×2
    return jnp.sum(jnp.where(has, per_seq, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def update_routing_bias(bias, load, rate: float):
    """Aux-loss-free balancing step: b ← b + rate·sign(mean_E(load) − load).

    Overloaded experts become less likely to be chosen (bias down by exactly `rate`), underloaded
    ones more likely; experts exactly at the mean keep their bias. Call it once per training step
    with the load of the whole global batch, outside the optimizer.

    Args:
      bias: array [..., E] (e.g. [L, E] for scanned layers) or a pytree of such arrays.
      load: same structure and shapes as `bias` (e.g. from `expert_load`).
      rate: γ, `ModelConfig.bias_update_rate`.

    Returns:
      the new bias, same structure, shapes and dtypes as `bias`.
    """
    def one(b, l):
        l = l.astype(jnp.float32)
        step = jnp.sign(l.mean(-1, keepdims=True) - l)                     # [..., E]
        return (b + rate * step).astype(b.dtype)
    return jax.tree.map(one, bias, load)


# --- dispatch ------------------------------------------------------------------------------------

def dense_dispatch(x: jax.Array, weights: jax.Array, idx: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, dtype, fp8: bool = False,
                   fp8_backend: str = "auto") -> jax.Array:
    """Routed experts, reference path: every expert runs on every token (E/X times the FLOPs).

    Args:
      x: tokens [..., D] (the module passes [B, T, D]; flattened [B·T, D] works too).
      weights: combine weights [..., X] from `gate`.
      idx: expert ids [..., X] from `gate`.
      w_gate, w_up: stacked expert weights [E, D, F].
      w_down: [E, F, D].
      dtype: compute dtype.
      fp8: run the three expert projections as fp8 GEMMs (`fp8_dot` per expert, vmapped).
      fp8_backend: their GEMM backend (`kernels.fp8`).

    Returns:
      Σ_k weights_k · SwiGLU_{idx_k}(x), [..., D] in `dtype`.
    """
    E = w_gate.shape[0]
    combine = jnp.einsum("...XE,...X->...E", jax.nn.one_hot(idx, E, dtype=weights.dtype),
                         weights)                                          # [..., E]
    if fp8:
        x = x.astype(dtype)
        per_expert = lambda h, w: fp8_dot(h, w, out_dtype=dtype, backend=fp8_backend)  # [..., F|D]
        up_proj = jax.vmap(per_expert, in_axes=(None, 0), out_axes=-2)
        gate_ = up_proj(x, w_gate)                                         # [..., E, F]
        up = up_proj(x, w_up)                                              # [..., E, F]
        out = jax.vmap(per_expert, in_axes=(-2, 0), out_axes=-2)(
            nn.silu(gate_) * up, w_down)                                   # [..., E, D]
    else:
        gate_ = einsum("...D,EDF->...EF", x, w_gate, dtype)                # [..., E, F]
        up = einsum("...D,EDF->...EF", x, w_up, dtype)                     # [..., E, F]
        out = einsum("...EF,EFD->...ED", nn.silu(gate_) * up, w_down, dtype)  # [..., E, D]
    return einsum("...ED,...E->...D", out, combine, dtype)                 # [..., D]


def ragged_dispatch(x: jax.Array, weights: jax.Array, idx: jax.Array, w_gate: jax.Array,
                    w_up: jax.Array, w_down: jax.Array, dtype, fp8: bool = False,
                    backend: str = "auto") -> jax.Array:
    """Routed experts, sorted path: each (token, slot) pair runs through its one expert.

    The M = B·T·X pairs are sorted by expert id (stable), so each expert's rows are contiguous,
    and a grouped GEMM (`gmm` with `backend`) multiplies each run of rows by its expert's weights
    with group sizes = per-expert counts. Empty experts (size 0) and any imbalance are fine;
    nothing is dropped. Outputs are unsorted and summed over the X slots with the combine weights.

    Same arguments, result and gradients as `dense_dispatch` (plus `backend`, a name from
    `grouped_gemm.CONFIG_BACKENDS`). With fp8=True the three grouped GEMMs become `fp8_ragged_dot` (emulated fp8 grouped GEMMs, see the module docstring);
    the result then matches `dense_dispatch(..., fp8=True)` in the forward pass up to fp32
    rounding, and its gradients up to the different wgrad tiling (tiles per expert here).
    """
    D, E, X = x.shape[-1], w_gate.shape[0], idx.shape[-1]
    flat_idx = idx.reshape(-1)                                             # [M]
    order = jnp.argsort(flat_idx, stable=True)                             # [M] pair ids by expert
    sizes = jnp.bincount(flat_idx, length=E).astype(jnp.int32)             # [E]
    tokens = x.reshape(-1, D).astype(dtype)                                # [B·T, D]
    rows = tokens[order // X]                                              # [M, D] sorted pairs
    grouped = lambda h, w: gmm(h, w, sizes, backend=backend, out_dtype=dtype, fp8=fp8)
    gate_ = grouped(rows, w_gate)                                          # [M, F]
    up = grouped(rows, w_up)                                               # [M, F]
    out = grouped(nn.silu(gate_) * up, w_down)                             # [M, D]
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)  # [M, D] pair order
    unsorted = unsorted.reshape(*idx.shape, D)                             # [..., X, D]
    return einsum("...XD,...X->...D", unsorted, weights, dtype)            # [..., D]


# --- module --------------------------------------------------------------------------------------

class MoE(nn.Module):
    """DeepSeekMoE FFN: shared experts + top-X of E routed experts. [B, T, D] → [B, T, D].

    Parameter names are frozen (see the module docstring). Scan-safe: under `nn.scan` with
    variable_axes {"params": 0, "routing": 0, "moe_stats": 0} the bias becomes [L, E] and the
    sown load [L, E].
    """
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """x [B, T, D] → [B, T, D]. `token_mask` [B, T] (true = a real token; None = all) keeps
        padding out of the sown load and balance loss; the outputs do not depend on it."""
        c = self.config
        D, E, F = c.d_model, c.n_routed_experts, c.moe_d_ff
        router = param(self, "router", (D, E), ("embed", "expert"), c)
        w_gate = param(self, "w_gate", (E, D, F), ("expert", "embed", "mlp"), c)
        w_up = param(self, "w_up", (E, D, F), ("expert", "embed", "mlp"), c)
        w_down = param(self, "w_down", (E, F, D), ("expert", "mlp", "embed"), c)
        bias = None
        if c.routing_bias:
            bias = self.variable("routing", "bias",
                                 lambda: jnp.zeros((E,), jnp.float32)).value  # [E]

        # Router in full fp32 (HIGHEST keeps TPU/GPU from using bf16/tf32 passes); it is tiny.
        logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), router.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)              # [B, T, E]
        layout = None
        # Not at init: the routed output does not matter there, and init traces a dummy batch
        # (often one sequence) that need not split over the batch axes.
        if c.moe_impl == "ragged" and not self.is_initializing():
            # Imported here: deepseek_jax.parallel imports the model (shardings from its init).
            from deepseek_jax.parallel import expert
            layout = expert.layout_from_context(c, batch_size=x.shape[0])
        keep, stats, balance = None, {}, None
        if layout is not None:
            # Gate, balance loss and capacity per device on its own sequences (the compiler
            # would gather the scores over the batch for the top-k).
            weights, idx, balance, keep = expert.local_routing(logits, bias, c, layout,
                                                               token_mask)
        else:
            weights, idx, scores = gate(logits, bias, c)                      # [B, T, X] ×2
            if c.moe_capacity_factor > 0:
                from deepseek_jax.parallel.expert import capacity_keep
                keep = capacity_keep(idx, E, c.moe_capacity_factor)           # [B, T, X]
        if keep is not None:
            stats["dropped"] = jnp.sum(~keep).astype(jnp.float32)
        # Shared experts first: they do not depend on the routed exchange, so the scheduler may
        # run them while the all-to-all is in flight.
        shared = None
        if c.n_shared_experts > 0:
            shared = MLP(c, d_ff=c.n_shared_experts * F, name="shared")(x)    # [B, T, D]

        if layout is not None:
            y, load, _ = expert.expert_parallel_moe(
                x, weights, idx, w_gate, w_up, w_down, layout=layout, dtype=c.dtype,
                backend=c.moe_backend, transport=c.moe_ep_transport,
                buffer_factor=c.moe_ep_buffer_factor, fp8=c.fp8, keep=keep)  # [B, T, D]
            if token_mask is not None:                 # the loads of real tokens only
                load = expert.local_load(idx, token_mask, E, layout)          # [E]
        else:
            w_kept = weights if keep is None else jnp.where(keep, weights, 0)
            if c.moe_impl == "ragged":
                y = ragged_dispatch(x, w_kept, idx, w_gate, w_up, w_down, c.dtype, c.fp8,
                                    backend=c.moe_backend)                    # [B, T, D]
            else:
                y = dense_dispatch(x, w_kept, idx, w_gate, w_up, w_down, c.dtype, c.fp8,
                                   c.fp8_backend)
            load = expert_load(idx, E, token_mask)                            # [E]
        if shared is not None:
            y = y + shared                                                    # [B, T, D]

        # Statistics for the train step; skipped at init so `init` returns no stale stats (sow
        # appends, so re-applied init stats would double up).
        if not self.is_initializing():
            self.sow("moe_stats", "load", load)
            if balance is None:
                balance = sequence_balance_loss(scores, idx, E, token_mask)
            self.sow("moe_stats", "balance_loss", balance)
            for name, value in stats.items():
                self.sow("moe_stats", name, value)
        return y.astype(c.dtype)
