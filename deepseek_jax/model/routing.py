"""Routing: where each token's slots go, the statistics of that choice, and the layout of the
routed experts on the mesh.

  gate                   router scores → (combine weights, expert ids, scores). Sigmoid (V3) or
                         softmax (V2) scores in fp32; the routing bias enters the *selection* only;
                         group-limited routing (keep `n_limited_groups` of G groups, ranked by
                         the sum of their top-2 biased scores (V3) or their max (V2)), dropped
                         groups masked with −inf; weights are the unbiased scores of the selected
                         experts, optionally renormalised, times `routed_scaling_factor`.
  expert_load            (token, slot) assignments per expert, for the bias update.
  sequence_balance_loss  V3's complementary sequence-wise balance loss (eqs. 17–20) without α.
  update_routing_bias    b ← b + γ·sign(mean load − load), on arrays or pytrees of them.
  capacity_keep          optional token dropping: pairs past an expert's per-sequence capacity.
  EPLayout, layout_from_context
                         the mesh axes the routed experts, their width and the batch lie on, read
                         from the active mesh and logical rules (`parallel.sharding_context`).
  local_routing, local_load
                         the gate, balance loss, capacity and loads per device on its own
                         sequences (and its own positions of them under context parallelism),
                         inside a shard_map (the compiler would gather the [B, T, E] scores over
                         the whole batch for the top-k).

`dispatch.py` moves the tokens to the chosen experts; `moe.py` is the layer.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import MeshError, ModelConfig
from deepseek_jax.parallel.rules import axis_names


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


# --- statistics and balancing ---------------------------------------------------------------

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
    sums = sequence_balance_sums(scores, idx, n_experts, token_mask)
    return balance_from_sums(*sums, n_experts, idx.shape[-1])


def sequence_balance_sums(scores: jax.Array, idx: jax.Array, n_experts: int,
                          token_mask: jax.Array | None = None):
    """The sums over T behind `sequence_balance_terms`, for any slice of the sequences'
    positions: (expert counts [B, E], normalised scores summed [B, E], tokens that count [B]).
    Sums of slices add up to the whole sequences' sums."""
    B, T, X = idx.shape
    m = (jnp.ones((B, T), jnp.float32) if token_mask is None
         else token_mask.astype(jnp.float32))                              # [B, T]
    counts = jax.vmap(lambda i, w: expert_load(i, n_experts, w))(idx, m)   # [B, E]
    scores = scores.astype(jnp.float32)
    s = scores / scores.sum(-1, keepdims=True)                             # [B, T, E]
    return counts, jnp.einsum("BTE,BT->BE", s, m), m.sum(-1)               # [B, E] ×2, [B]


def balance_from_sums(counts, score_sums, n, n_experts: int, top_k: int):
    """(Σ_i f_i·P_i [B], has a token that counts [B]) from `sequence_balance_sums`."""
    f = counts * (n_experts / top_k) / jnp.maximum(n, 1.0)[:, None]        # [B, E]
    p = score_sums / jnp.maximum(n, 1.0)[:, None]                          # [B, E]
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
      rate: γ, the run's bias update speed (`train.schedules.StepSettings.bias_update_rate`).

    Returns:
      the new bias, same structure, shapes and dtypes as `bias`.
    """
    def one(b, l):
        l = l.astype(jnp.float32)
        step = jnp.sign(l.mean(-1, keepdims=True) - l)                     # [..., E]
        return (b + rate * step).astype(b.dtype)
    return jax.tree.map(one, bias, load)


# --- capacity (optional dropping) ----------------------------------------------------------------

def capacity_keep(idx: jax.Array, n_experts: int, capacity_factor: float,
                  order=None) -> jax.Array:
    """Which (token, slot) pairs fit their expert's per-sequence capacity.

    capacity = ceil(capacity_factor · T · X / E) pairs per expert per sequence; pairs are admitted
    in (token, slot) order, so the latest tokens of a sequence are the ones dropped.

    Args:
      idx: expert ids [B, T, X].
      order: optional `zigzag.Zigzag` that T is stored in; pairs are still admitted in natural
        order.
    Returns:
      bool [B, T, X].
    """
    if order is not None:
        return order.stored(capacity_keep(order.natural(idx), n_experts, capacity_factor))
    B, T, X = idx.shape
    cap = math.ceil(capacity_factor * T * X / n_experts)
    onehot = jax.nn.one_hot(idx.reshape(B, T * X), n_experts, dtype=jnp.int32)  # [B, T·X, E]
    rank = jnp.cumsum(onehot, axis=1) - onehot                              # earlier pairs, same e
    rank = jnp.einsum("BME,BME->BM", rank, onehot)                          # [B, T·X]
    return (rank < cap).reshape(B, T, X)


# --- layout on the mesh -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EPLayout:
    """Where the MoE's arrays live on the mesh (mesh axis names)."""
    expert_axes: tuple[str, ...]      # E of the expert weights; the all-to-all axis
    batch_axes: tuple[str, ...]       # B of tokens, weights, ids
    mlp_axes: tuple[str, ...]         # F of the expert weights (tensor parallelism inside experts)
    n_shards: int                     # P = product of the expert axes' sizes
    length_axes: tuple[str, ...] = () # T of tokens in the dispatch (context parallelism)

    @property
    def token_axes(self) -> tuple[str, ...]:
        """Every axis that splits the dispatch's tokens: the batch's, then the sequence's."""
        return self.batch_axes + self.length_axes


def layout_from_context(config: ModelConfig, batch_size: int | None = None) -> EPLayout | None:
    """The layout the active mesh and logical rules give the routed experts.

    E split over axes of size > 1: the expert-parallel layout (n_shards = P). E whole but the
    batch (or the expert width F) split: a layout with no expert axes (n_shards = 1), for which
    `expert_parallel_moe` dispatches each device's own tokens locally. None when nothing is split
    (no mesh, one device, all axes of size 1), or when E is whole and `batch_size` does not
    divide over the batch axes: the single-device `moe.ragged_dispatch` then runs, partitioned by
    the compiler.

    Reads the mesh set by `jax.set_mesh` and the rules set by `nn.logical_axis_rules` (both set by
    `parallel.sharding_context`). Raises MeshError when E does not divide over the expert axes.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return None
    spec = lambda name: axis_names(nn.logical_to_mesh_axes((name,), rules)[0])
    expert = tuple(a for a in spec("expert") if mesh.shape.get(a, 1) > 1)
    batch = tuple(a for a in spec("act_batch") if mesh.shape.get(a, 1) > 1)
    mlp = tuple(a for a in spec("mlp") if mesh.shape.get(a, 1) > 1 and a not in expert)
    length = tuple(a for a in spec("act_length") if mesh.shape.get(a, 1) > 1)
    if not expert:
        # Local dispatch: every device sorts its own tokens (its sequences, or under context
        # parallelism its chunk of them); a batch that does not split (a lone prompt while
        # sampling) stays with the compiler.
        n_batch = math.prod(mesh.shape[a] for a in batch)
        if not (batch or mlp or length) or (batch_size is not None and batch_size % n_batch):
            return None
        return EPLayout((), batch, mlp, 1, length)
    n = math.prod(mesh.shape[a] for a in expert)
    E = config.n_routed_experts
    if E % n:
        ok = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and E % d == 0)
        raise MeshError(f"expert parallelism: n_routed_experts={E} is not divisible by the "
                        f"expert mesh axis {'×'.join(expert)}={n}; use an expert axis size that "
                        f"divides {E} (here one of {ok}) or change n_routed_experts")
    return EPLayout(expert, batch, mlp, n, length)


# --- routing on each device's own sequences ----------------------------------------------------------

def local_routing(logits: jax.Array, bias: jax.Array | None, config: ModelConfig,
                  layout: EPLayout, token_mask: jax.Array | None = None, order=None):
    """`moe.gate`, `moe.sequence_balance_loss` and `capacity_keep` inside a shard_map over the
    batch axes: all three are per token or per sequence, so each device computes them for its own
    sequences. (Partitioned by the compiler, the top-k of the gate gathered the [B, T, E] scores
    over the whole batch.)

    Under context parallelism (`layout.length_axes`) each device routes its own positions too:
    the gate is per token, and the balance loss's sums over a sequence are summed over its
    ranks outside the shard_map (a [B, E] reduction), so the [B, T, E] logits never cross
    devices. Capacity dropping ranks pairs along whole sequences, so with a capacity factor the
    sequence stays whole here and the compiler gathers the logits over the context ranks.

    Args:
      logits: router logits [B, T, E] fp32. bias: [E] or None. layout: `layout_from_context`.
      token_mask: optional [B, T], true for real tokens (padding is left out of the loss).
      order: optional zigzag order of T, for the capacity ranks (`capacity_keep`).
    Returns:
      (weights [B, T, X], idx [B, T, X], balance loss scalar (mean over the B sequences that
       hold a real token), keep [B, T, X] bool when `config.moe_capacity_factor` > 0, else None).
    """
    E, X, cf = logits.shape[-1], config.n_experts_per_token, config.moe_capacity_factor
    batch = layout.batch_axes or None
    length = (layout.length_axes or None) if cf == 0 else None       # positions split here
    t_spec = P(batch, length)
    if token_mask is None:
        token_mask = jnp.ones(logits.shape[:2], jnp.bool_)                 # [B, T]

    def body(logits, token_mask, *bias):
        weights, idx, scores = gate(logits, bias[0] if bias else None, config)  # [b, t, X] ×2
        sums = sequence_balance_sums(scores, idx, E, token_mask)            # [b, E] ×2, [b]
        keep = (capacity_keep(idx, E, cf, order),) if cf > 0 else ()        # [b, T, X]
        return (weights, idx, *(x[:, None] for x in sums)) + keep           # sums: [b, 1, ·]

    extra = () if bias is None else (bias,)
    out = jax.shard_map(body, in_specs=(t_spec, t_spec) + (P(),) * len(extra),
                        out_specs=(t_spec,) * (5 + (cf > 0)),
                        check_vma=False)(logits, token_mask, *extra)
    # Each rank's sums over its positions added up per sequence, then the mean over the
    # sequences, outside (the compiler reduces the [B, ranks, ·] arrays across devices).
    per_seq, has = balance_from_sums(*(x.sum(axis=1) for x in out[2:5]), E, X)  # [B] ×2
    balance = jnp.sum(jnp.where(has, per_seq, 0.0)) / jnp.maximum(jnp.sum(has), 1)
    return out[0], out[1], balance, (out[5] if cf > 0 else None)


def local_load(idx: jax.Array, token_mask: jax.Array, n_experts: int,
               layout: EPLayout) -> jax.Array:
    """`moe.expert_load` of the real tokens (`token_mask` [B, T]) of idx [B, T, X]: each device
    counts its own sequences' choices (its own positions of them under context parallelism),
    then the counts are summed over those axes."""
    t_spec = P(layout.batch_axes or None, layout.length_axes or None)
    axes = layout.token_axes

    def body(idx, token_mask):
        load = expert_load(idx, n_experts, token_mask)                      # [E] local
        return jax.lax.psum(load, axes) if axes else load

    return jax.shard_map(body, in_specs=(t_spec, t_spec), out_specs=P(),
                         check_vma=False)(idx, token_mask)
