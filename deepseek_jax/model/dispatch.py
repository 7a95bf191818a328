"""The MoE dispatch: the routed experts' computation for the chosen (token, slot) pairs.

  dense_dispatch         reference: every expert on every token, combined with a [.., E] weight
                         matrix that is zero for unselected experts.
  ragged_dispatch        (token, slot) pairs sorted by expert, three grouped GEMMs
                         (`kernels.grouped_gemm.gmm`, backend from `config.moe_backend`: "auto" =
                         ragged_dot on CPU, megablox on TPU, Mosaic GPU on Hopper), weighted and
                         summed back per token. Same values and gradients as the dense path.
  expert_parallel_moe    on a mesh (layout from `routing.layout_from_context`): with an expert
                         axis, expert parallelism (below); without one, each device dispatches
                         its own tokens locally (`_local_moe`).

Expert parallelism: routed experts split over a mesh axis, tokens exchanged with all-to-all.

    y, load = expert_parallel_moe(x, weights, idx, w_gate, w_up, w_down, layout=..., ...)

Runs inside `jax.shard_map` over the whole mesh. Each device holds B/n_batch sequences (split over
the batch axes, which include the expert axis; under context parallelism, a T/n_context chunk of
each, since every step here is per token) and E/P experts (P = size of the expert axis,
experts placed contiguously: device p owns experts [p·E/P, (p+1)·E/P)). Per device:

  1. sort    its M = b·T·X (token, slot) pairs by expert id; since experts are contiguous per
             device this also groups them by destination device d. c[d] = pairs for device d.
  2. plan    dropless with a BOUNDED buffer: each round moves at most W rows from every source to
             every destination, W = ceil(moe_ep_buffer_factor · M / P) (rounded up to 8), so the
             receive buffer is P·W = buffer_factor·M rows whatever the routing. Rounds needed:
             R = ceil(max over the expert group of c[d] / W) (a `pmax`, so every device of the
             group runs the same number of exchanges). Pair i of destination d, at position j
             in d's run, travels in round j // W to slot (source·W + j mod W) of d's buffer.
  3. round   exchange rows and their local expert ids → on the destination, sort the P·W rows by
             local expert (padding rows last, in no group) → three grouped GEMMs
             (`kernels.grouped_gemm.gmm`, SwiGLU) → `psum` over the tensor axes when the expert
             width F is split there → unsort → exchange back into the source's pair order.
  4. combine each token sums its X outputs with the gate weights, on its own device.

Round 0 is an ordinary differentiable function (its residuals kept as for any layer). Rounds 1…R−1,
the overflow, run in a `while_loop` inside a `custom_vjp` whose backward replays each round under
`jax.vjp` (rematerialized): the loop only runs when routing is skewed past the buffer, and memory
stays at one round's buffers whatever R is. The worst case handled is every pair of every source
going to one device: R = ceil(M / W) = ceil(P / buffer_factor) rounds, no token dropped, the same
memory as a balanced step, and R times the exchange latency.

Transports (`moe_ep_transport`): "all_to_all" sends a dense [P, W, D] block per round (padding
included; runs everywhere, including CPU). "ragged_all_to_all" sends only the real rows
(`jax.lax.ragged_all_to_all`, GPU and TPU; XLA:CPU has no lowering). `ragged_all_to_all_emulated`
has the same signature and semantics built from `all_to_all` and gathers, so the ragged offset
arithmetic is tested on CPU; "ragged_all_to_all_emulated" selects it. "auto": ragged on gpu/tpu,
all_to_all on cpu.

Token dropping (optional, `moe_capacity_factor` > 0): `capacity_keep` marks pairs beyond an
expert's per-sequence capacity; the MoE module zeroes their weights on every path and, here, they
are not sent at all. Sequences are never split across devices, so the same pairs are dropped
with and without EP.

Node-limited routing: the gate keeps `n_limited_groups` of G expert groups per token, and groups
are contiguous runs of experts, so when P is a multiple of G (each group spans P/G devices, a
"node") or G a multiple of P (each device holds whole groups), every token's experts lie on at
most `node_limit(config, P)` devices — DeepSeek-V3's "at most 4 nodes" with G = 8 nodes.

Expert loads for the balancing update are `psum`med over the batch axes: global counts.

No expert axis (dp, fsdp, fsdp_tp: E whole on every device, batch split): `layout_from_context`
returns a layout with no expert axes and `expert_parallel_moe` runs `_local_moe` instead — a
shard_map in which each device sorts its own pairs and runs `ragged_dispatch` with the full
expert weights; F split over the tensor axes is summed with a `psum`; no all-to-all, no rounds.
Both paths cast the expert weights to the compute dtype before the shard_map (the grouped GEMMs
multiply in that dtype anyway), so FSDP moves bf16, not fp32. The weights enter the shard_map as
stored (D split over the FSDP axes) and each grouped GEMM gathers its weight itself
(`gmm(..., gather=)`), once in the forward and once in the backward, keeping only the shard in
between; their gradients leave as reduce-scatters, never as full-size all-reduces. With fp8 and
whole 128-blocks per D shard, the gathered values are the e4m3 blocks and their scales. Each
overflow round gathers again, so every device holding another D shard runs as many rounds as
its expert group (`n_rounds` is agreed over both).

Shared experts: the MoE module computes them outside this function; nothing links them to the
exchange, so the compiler's scheduler is free to overlap the two (XLA's latency-hiding scheduler
on TPU and GPU runs collectives asynchronously); nothing here forces an order.

Named activations for rematerialization (`config.REMAT_NAMES`): `expert_rows` (the sorted rows
the grouped GEMMs read: under EP, those received, so a policy that saves them does not redo the
forward exchange in the backward), `expert_hidden` (gate and up projections) and `expert_out`
(what the combine reads: under EP, after the return exchange). The FSDP-chunked experts and the
overflow rounds run under their own custom VJPs and name nothing: they recompute their GEMMs in
the backward whatever the policy.

Left out, and why:
  - Sending a token once per destination device (DeepEP's dedup) instead of once per (token,
    expert) pair: with 256 experts on 64 devices a token's 8 experts share a device rarely (~1.1
    pairs per touched device), so it saves little at V3's shape.
  - fp8 dispatch (V3 quantizes the dispatched activations): rows travel in the compute dtype.
  - Hierarchical (intra-node then inter-node) exchange: one flat all-to-all over the expert axis.
  - Overlapping rounds with each other; CPU measurements of speed (nothing here was run on a GPU
    or TPU: the ragged transport is lowered for TPU ahead of time, not executed).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import MOE_EP_TRANSPORTS, MeshError, ModelConfig
from deepseek_jax.kernels.platform import active_platform
from deepseek_jax.kernels.fp8_linear import all_gather_dim, fp8_dot, psum_scatter_dim
from deepseek_jax.kernels.grouped_gemm import gmm, resolve_backend
from deepseek_jax.model.layers import cast_layer_weight, einsum
from deepseek_jax.model.routing import EPLayout

TRANSPORTS = MOE_EP_TRANSPORTS                      # see the module docstring


# --- single device (or left to the compiler) ------------------------------------------------------

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
        gate_, up = checkpoint_name((gate_, up), "expert_hidden")
        out = einsum("...EF,EFD->...ED", nn.silu(gate_) * up, w_down, dtype)  # [..., E, D]
    out = checkpoint_name(out, "expert_out")                               # [..., E, D]
    return einsum("...ED,...E->...D", out, combine, dtype)                 # [..., D]


def ragged_dispatch(x: jax.Array, weights: jax.Array, idx: jax.Array, w_gate: jax.Array,
                    w_up: jax.Array, w_down: jax.Array, dtype, fp8: bool = False,
                    backend: str = "auto", gathers=(None, None, None),
                    expert_chunks: int = 1) -> jax.Array:
    """Routed experts, sorted path: each (token, slot) pair runs through its one expert.

    The M = B·T·X pairs are sorted by expert id (stable), so each expert's rows are contiguous,
    and a grouped GEMM (`gmm` with `backend`) multiplies each run of rows by its expert's weights
    with group sizes = per-expert counts. Empty experts (size 0) and any imbalance are fine;
    nothing is dropped. Outputs are unsorted and summed over the X slots with the combine weights.

    Same arguments, result and gradients as `dense_dispatch` (plus `backend`, a name from
    `grouped_gemm.CONFIG_BACKENDS`). With fp8=True the three grouped GEMMs become `fp8_ragged_dot` (emulated fp8 grouped GEMMs, see the module docstring);
    the result then matches `dense_dispatch(..., fp8=True)` in the forward pass up to fp32
    rounding, and its gradients up to the different wgrad tiling (tiles per expert here).
    `gathers`: inside a shard_map, the `gmm` gather of each weight (`_weights_in`).
    `expert_chunks`: with gathers, gather and run the experts that many at a time
    (`_chunked_experts`; with fp8 the chunks are gathered as stored and quantized after);
    otherwise ignored.
    """
    D, E, X = x.shape[-1], w_gate.shape[0], idx.shape[-1]
    flat_idx = idx.reshape(-1)                                             # [M]
    order = jnp.argsort(flat_idx, stable=True)                             # [M] pair ids by expert
    sizes = jnp.bincount(flat_idx, length=E).astype(jnp.int32)             # [E]
    tokens = x.reshape(-1, D).astype(dtype)                                # [B·T, D]
    rows = checkpoint_name(tokens[order // X], "expert_rows")              # [M, D] sorted pairs
    if expert_chunks > 1 and gathers[0] is not None:
        out = _chunked_experts(rows, sizes, w_gate, w_up, w_down, gathers, expert_chunks,
                               backend, dtype, fp8)                        # [M, D]
    else:
        grouped = lambda h, w, g: gmm(h, w, sizes, backend=backend, out_dtype=dtype, fp8=fp8,
                                      gather=g)
        gate_ = grouped(rows, w_gate, gathers[0])                          # [M, F]
        up = grouped(rows, w_up, gathers[1])                               # [M, F]
        gate_, up = checkpoint_name((gate_, up), "expert_hidden")
        out = grouped(nn.silu(gate_) * up, w_down, gathers[2])             # [M, D]
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)  # [M, D] pair order
    unsorted = checkpoint_name(unsorted.reshape(*idx.shape, D), "expert_out")  # [..., X, D]
    return einsum("...XD,...X->...D", unsorted, weights, dtype)            # [..., D]


# --- FSDP: experts gathered a chunk at a time -------------------------------------------------------

CHUNK_BYTES = 1 << 30       # auto: the most bytes of one projection's experts gathered at once


def expert_chunks(config: ModelConfig) -> int:
    """`config.moe_expert_chunks`, or for 0 (auto) the fewest chunks (a divisor of E) whose
    gathered weights of one projection fit CHUNK_BYTES: 8 for V3 (256 experts, 7 GiB in bf16
    whole, 0.9 GiB a chunk), 1 for V2-Lite (0.4 GiB). The gathered weights are in the compute
    dtype, or with fp8 as stored (the chunks gather the master weights and quantize them
    after): 16 for V3 in fp8."""
    E = config.n_routed_experts
    if config.moe_expert_chunks or not E:
        return config.moe_expert_chunks or 1
    dtype = config.param_dtype if config.fp8 else config.dtype
    whole = E * config.d_model * config.moe_d_ff * jnp.dtype(dtype).itemsize
    return next((k for k in range(1, E + 1) if E % k == 0 and whole / k <= CHUNK_BYTES), E)


def _expert_chunk(rows, sizes, w_gate, w_up, w_down, c, n_chunks: int, backend, dtype,
                  fp8: bool = False):
    """Chunk c's E/n_chunks experts (whole weights) on their rows; [M, D], zero elsewhere.

    The chunk's rows are contiguous in `rows` (sorted by expert), from `start` on. Rolled to the
    front they are the grouped GEMMs' first rows; the rows after them (zeroed) belong to no group
    and give zeros, so rolling the result back puts the chunk's outputs in place and zeros
    elsewhere.
    """
    E = sizes.shape[0]
    Ec = E // n_chunks
    start = jnp.sum(jnp.where(jnp.arange(E) < c * Ec, sizes, 0))           # rows before chunk
    sizes_c = jax.lax.dynamic_slice_in_dim(sizes, c * Ec, Ec)              # [Ec]
    lhs = jnp.roll(rows, -start, axis=0)                                    # [M, D] chunk first
    # The other chunks' rows, now after this chunk's, are zeroed: the GEMMs give them zeros
    # anyway, but fp8 quantizes rows past the last group with that group's tiles, and their
    # values would set its scales.
    lhs = jnp.where((jnp.arange(lhs.shape[0]) < jnp.sum(sizes_c))[:, None], lhs, 0)
    mm = lambda h, w: gmm(h, w, sizes_c, backend=backend, out_dtype=dtype, fp8=fp8)
    h = nn.silu(mm(lhs, w_gate)) * mm(lhs, w_up)                            # [M, F]
    return jnp.roll(mm(h, w_down), start, axis=0)                           # [M, D]


def _chunked_experts(rows, sizes, w_gate, w_up, w_down, gathers, n_chunks: int, backend, dtype,
                     fp8: bool = False):
    """The three grouped GEMMs over all experts, with the weights (this device's shards,
    `gathers` from `_weights_in`) gathered n_chunks times a chunk of E/n_chunks experts.

    Under FSDP without expert parallelism each device runs every expert, and gathering a whole
    [E, D, F] matrix at once is V3's largest buffer (256 experts: 7 GiB per projection in bf16;
    the backward holds a gathered copy and a full-size gradient too). Here a loop gathers one
    chunk's weights, runs that chunk's rows and moves on; the backward loop gathers each chunk
    again, differentiates it and reduce-scatters that chunk's weight gradients. Nothing but the
    inputs is kept between the two: one chunk's weights and intermediates are live at a time, at
    the cost of one extra gather of every chunk when the layer is not rematerialized. Rows outside
    a chunk pass through its GEMMs as zero rows: with the TPU's megablox kernel they cost no
    FLOPs, with ragged_dot (CPU) a full pass each. With fp8 a chunk's weights are gathered as
    stored (the fp32 masters) and quantized whole by the fp8 grouped GEMMs.
    """
    Ec = sizes.shape[0] // n_chunks

    def gathered(ws, c):                   # chunk c of each weight, whole: [Ec, D, F] / [Ec, F, D]
        return tuple(all_gather_dim(jax.lax.dynamic_slice_in_dim(w, c * Ec, Ec), tuple(a), d)
                     for w, (a, d) in zip(ws, gathers))

    def chunk(rows, sizes, c, full):
        return _expert_chunk(rows, sizes, *full, c, n_chunks, backend, dtype, fp8)  # [M, D]

    @jax.custom_vjp
    def run(rows, sizes, *ws):
        return jax.lax.fori_loop(0, n_chunks, lambda c, acc: acc + chunk(rows, sizes, c,
                                                                         gathered(ws, c)),
                                 jnp.zeros(rows.shape, dtype))              # [M, D]

    def fwd(rows, sizes, *ws):
        return run(rows, sizes, *ws), (rows, sizes, ws)

    def bwd(res, g):
        rows, sizes, ws = res

        def body(c, acc):
            d_rows, d_ws = acc
            _, pull = jax.vjp(lambda r, *full: chunk(r, sizes, c, full), rows, *gathered(ws, c))
            dr, *d_full = pull(g.astype(dtype))
            d_ws = tuple(jax.lax.dynamic_update_slice_in_dim(
                acc_w, psum_scatter_dim(dw, tuple(a), d).astype(acc_w.dtype), c * Ec, 0)
                for acc_w, dw, (a, d) in zip(d_ws, d_full, gathers))       # chunk c's shard
            return d_rows + dr.astype(d_rows.dtype), d_ws
        zeros = (jnp.zeros_like(rows), tuple(jnp.zeros_like(w) for w in ws))
        d_rows, d_ws = jax.lax.fori_loop(0, n_chunks, body, zeros)
        return d_rows, None, *d_ws

    run.defvjp(fwd, bwd)
    return run(rows, sizes, w_gate, w_up, w_down)


# --- expert parallelism ---------------------------------------------------------------------------

def resolve_transport(transport: str) -> str:
    if transport not in TRANSPORTS:
        raise ValueError(f"moe_ep_transport={transport!r}: use one of {TRANSPORTS}")
    if transport != "auto":
        return transport
    return "all_to_all" if active_platform() == "cpu" else "ragged_all_to_all"


def node_limit(config: ModelConfig, n_shards: int) -> int | None:
    """Most devices one token's experts can lie on under group-limited routing, or None when
    expert groups do not line up with device boundaries (then only X bounds it)."""
    G, kept, X = config.n_expert_groups, config.n_limited_groups, config.n_experts_per_token
    if G <= 1:
        return min(X, n_shards)
    if n_shards % G == 0:
        return min(X, kept * (n_shards // G))
    if G % n_shards == 0:
        return min(X, kept, n_shards)
    return None


def chunk_rows(n_pairs: int, n_shards: int, buffer_factor: float) -> int:
    """W: rows one source may send one destination per round (a multiple of 8, at least 8)."""
    c = math.ceil(buffer_factor * n_pairs / n_shards)
    return max(8, -(-c // 8) * 8)


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name, max_chunk: int):
    """`jax.lax.ragged_all_to_all` from `all_to_all` and gathers, for platforms without it.

    Same arguments and result; `max_chunk` (static) bounds every send size. Moves P·max_chunk rows
    per device (the padding the real collective avoids).
    """
    j = jnp.arange(max_chunk)                                               # [W]
    src = input_offsets[:, None] + j                                        # [P, W]
    src = jnp.where(j < send_sizes[:, None], src, operand.shape[0])         # out of range → 0
    chunks = operand.at[src].get(mode="fill", fill_value=0)                 # [P, W, ...]
    chunks = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)       # [P, W, ...] by source
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [P] by source
    dst = offsets[:, None] + j                                              # [P, W]
    dst = jnp.where(j < recv_sizes[:, None], dst, output.shape[0])          # out of range → drop
    return output.at[dst].set(chunks, mode="drop")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static sizes and the per-device integer arrays every round reads."""
    n_shards: int            # P
    chunk: int               # W
    n_local: int             # E/P
    axis: tuple[str, ...]    # expert mesh axes
    mlp_axes: tuple[str, ...]
    transport: str
    backend: str
    fp8: bool
    dtype: object
    gathers: tuple = (None, None, None)   # `gmm` gathers of w_gate, w_up, w_down (`_weights_in`)


def _round(plan: _Plan, ints: dict, rows, w_gate, w_up, w_down, r):
    """Round r: rows [M, D] sorted by expert → their expert outputs [M, D] (zeros outside round r)."""
    Pn, W, El = plan.n_shards, plan.chunk, plan.n_local
    M, D = rows.shape
    me = jax.lax.axis_index(plan.axis)
    send, recv = ints["send"], ints["recv"]                                 # [P] pair counts
    start = ints["start"]                                                   # [P] run start per dest
    local_e = ints["local_e"]                                               # [M] (El = none)
    lo = r * W
    send_r = jnp.clip(send - lo, 0, W)                                      # [P] rows sent now
    recv_r = jnp.clip(recv - lo, 0, W)                                      # [P] rows received

    if plan.transport == "all_to_all":
        j = jnp.arange(W)
        src = jnp.where(j < send_r[:, None], start[:, None] + lo + j, M)   # [P, W]
        buf = rows.at[src].get(mode="fill", fill_value=0)                   # [P, W, D]
        ids = local_e.at[src].get(mode="fill", fill_value=El)               # [P, W]
        buf = jax.lax.all_to_all(buf, plan.axis, 0, 0, tiled=True).reshape(Pn * W, D)
        ids = jax.lax.all_to_all(ids, plan.axis, 0, 0, tiled=True).reshape(Pn * W)
    else:
        a2a = (functools.partial(ragged_all_to_all_emulated, max_chunk=W)
               if plan.transport.endswith("emulated") else jax.lax.ragged_all_to_all)
        offsets = (start + lo).astype(jnp.int32)
        mine = jnp.full((Pn,), me * W, jnp.int32)                           # my slot at every dest
        buf = a2a(rows, jnp.zeros((Pn * W, D), rows.dtype), offsets, send_r, mine, recv_r,
                  axis_name=plan.axis)                                      # [P·W, D]
        ids = a2a(local_e, jnp.full((Pn * W,), El, local_e.dtype), offsets, send_r, mine,
                  recv_r, axis_name=plan.axis)                              # [P·W]

    # Destination: group received rows by local expert; padding (id El) sorts last, in no group.
    order = jnp.argsort(ids, stable=True)                                   # [P·W]
    sizes = jax.ops.segment_sum(jnp.ones_like(ids), ids, num_segments=El)   # [El]
    h = checkpoint_name(buf[order], "expert_rows")                          # [P·W, D]
    mm = lambda a, w, g: gmm(a, w, sizes, backend=plan.backend, out_dtype=plan.dtype,
                             fp8=plan.fp8, gather=g)
    gate_ = mm(h, w_gate, plan.gathers[0])                                  # [P·W, F]
    up = mm(h, w_up, plan.gathers[1])                                       # [P·W, F]
    gate_, up = checkpoint_name((gate_, up), "expert_hidden")
    out = mm(nn.silu(gate_) * up, w_down, plan.gathers[2])                  # [P·W, D]
    if plan.mlp_axes:                                                       # F split: partial sums
        out = jax.lax.psum(out, plan.mlp_axes)
    out = jnp.zeros_like(out).at[order].set(out, unique_indices=True)       # [P·W, D] slot order

    if plan.transport == "all_to_all":
        back = jax.lax.all_to_all(out.reshape(Pn, W, D), plan.axis, 0, 0, tiled=True)  # [P, W, D]
        dest, pos = ints["dest"], ints["pos"]                               # [M]
        here = (pos >= lo) & (pos < lo + W)
        flat = jnp.where(here, dest * W + pos - lo, Pn * W)                 # [M]
        return back.reshape(Pn * W, D).at[flat].get(mode="fill", fill_value=0)  # [M, D]
    # Back to each source's sorted order: at its run start for me, shifted by the round.
    src_start = jax.lax.all_to_all(start, plan.axis, 0, 0, tiled=True)     # [P] by source
    slots = (jnp.arange(Pn) * W).astype(jnp.int32)
    return a2a(out, jnp.zeros((M, D), out.dtype), slots, recv_r,
               (src_start + lo).astype(jnp.int32), send_r, axis_name=plan.axis)


def _overflow_rounds(plan, ints, n_rounds, rows, w_gate, w_up, w_down):
    def body(carry):
        r, acc = carry
        return r + 1, acc + _round(plan, ints, rows, w_gate, w_up, w_down, r)
    init = (jnp.int32(1), jnp.zeros(rows.shape, plan.dtype))
    return jax.lax.while_loop(lambda c: c[0] < n_rounds, body, init)[1]


def _overflow(plan: _Plan, ints, n_rounds, rows, w_gate, w_up, w_down):
    """Σ over rounds 1…n_rounds−1 of `_round`, in a loop that only runs when needed; its
    backward replays each round under `jax.vjp` (nothing per round is kept)."""

    @jax.custom_vjp
    def run(ints, n_rounds, rows, w_gate, w_up, w_down):
        return _overflow_rounds(plan, ints, n_rounds, rows, w_gate, w_up, w_down)

    def fwd(ints, n_rounds, rows, w_gate, w_up, w_down):
        out = _overflow_rounds(plan, ints, n_rounds, rows, w_gate, w_up, w_down)
        return out, (ints, n_rounds, rows, w_gate, w_up, w_down)

    def bwd(res, g):
        ints, n_rounds, *ws = res
        g = g.astype(plan.dtype)

        def body(carry):
            r, acc = carry
            _, pull = jax.vjp(lambda *a: _round(plan, ints, *a, r), *ws)
            # The barrier keeps each round's reduce-scatter (inside `gmm`'s backward) in the
            # loop. Without it XLA moves the reductions of an accumulated loop value after the
            # loop: the carries become whole gathered-size gradients and their reductions
            # full-size all-reduces, run every step even when the loop runs no round.
            grads = jax.lax.optimization_barrier(tuple(pull(g)))
            return r + 1, jax.tree.map(jnp.add, acc, grads)
        zeros = tuple(jnp.zeros_like(w) for w in ws)
        _, grads = jax.lax.while_loop(lambda c: c[0] < n_rounds, body, (jnp.int32(1), zeros))
        return (None, None, *grads)

    run.defvjp(fwd, bwd)
    return run(ints, n_rounds, rows, w_gate, w_up, w_down)


# --- no expert axis: local dispatch ---------------------------------------------------------------

def _embed_axes(layout: EPLayout, d_model: int) -> tuple[str, ...]:
    """Mesh axes (size > 1) that D of the routed-expert weights is split over by the rules in
    context (FSDP: `fsdp`), which the grouped GEMMs gather inside the shard_map; () when D is
    whole (or not evenly split): the weights then enter the shard_map whole along D (gathered on
    the way in, their gradients all-reduced). With fp8, shards of whole 128-blocks are gathered
    quantized; smaller ones (V3 on fsdp = 256: 28 rows of D) are gathered as stored and
    quantized after (`gmm`), still inside, chunk by chunk."""
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return ()
    spec = nn.logical_to_mesh_axes(("expert", "embed", "mlp"), rules)
    axes = spec[1] if len(spec) > 1 else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1 and a not in layout.expert_axes
                 and a not in layout.mlp_axes)
    n = math.prod(mesh.shape[a] for a in axes)
    return axes if axes and d_model % n == 0 else ()


def _weights_in(w_gate, w_up, w_down, embed_axes):
    """Inside the shard_map: the routed weights arrive split along D over `embed_axes`, as they
    are stored. Returns (w_gate, w_up, w_down, gathers): the shards and the `gmm` gathers that
    bring each whole for its product (in fp8 when quantized with whole 128-blocks per shard),
    once in the forward and once in the backward (FSDP keeps only the shard in between); a
    weight's gradient leaves as a reduce-scatter over `embed_axes`, never a full-size
    all-reduce."""
    if not embed_axes:
        return w_gate, w_up, w_down, (None, None, None)
    return w_gate, w_up, w_down, ((embed_axes, 1), (embed_axes, 1), (embed_axes, 2))


def _local_moe(x, weights, idx, w_gate, w_up, w_down, *, layout: EPLayout, dtype, backend, fp8,
               keep, expert_chunks: int = 1):
    """`expert_parallel_moe` with E whole on every device: no exchange.

    Each device sorts only its own b = B/n_batch sequences' pairs and runs them through the full
    expert weights (`moe.ragged_dispatch`); the weights enter the shard_map split along F over
    `layout.mlp_axes`, and along D over the FSDP axes (`_embed_axes`), gathered inside by
    the grouped GEMMs (see the module docstring); the partial outputs of a split F are summed
    (`psum`). Without
    this, the compiler partitions the single-device sort of all B·T·X pairs by gathering routing
    scores and ids over the whole batch and all-reducing [B·T·X, D] token copies.
    """
    E = w_gate.shape[0]
    b_spec = P(layout.batch_axes or None, layout.length_axes or None, None)
    mlp = (layout.mlp_axes if len(layout.mlp_axes) > 1 else layout.mlp_axes[0]) \
        if layout.mlp_axes else None
    embed_axes = _embed_axes(layout, x.shape[-1])
    emb = embed_axes or None

    def body(x, weights, idx, w_gate, w_up, w_down, *keep):
        load = jax.ops.segment_sum(jnp.ones((idx.size,), jnp.float32), idx.reshape(-1),
                                   num_segments=E)                          # [E] local choices
        if keep:                                                            # dropped: weight 0
            weights = jnp.where(keep[0], weights, 0)
        *ws, gathers = _weights_in(w_gate, w_up, w_down, embed_axes)
        y = ragged_dispatch(x, weights, idx, *ws, dtype, fp8, backend=backend,
                            gathers=gathers, expert_chunks=expert_chunks)   # [b, T, D]
        if layout.mlp_axes:                                                 # F split: partials
            y = jax.lax.psum(y, layout.mlp_axes)
        if layout.token_axes:
            load = jax.lax.psum(load, layout.token_axes)                    # global counts
        return y.astype(dtype), load, jnp.int32(0)

    w_spec = P(None, emb, mlp)
    extra = () if keep is None else (keep,)
    fn = jax.shard_map(body, in_specs=(b_spec, b_spec, b_spec, w_spec, w_spec, P(None, mlp, emb))
                       + (b_spec,) * len(extra), out_specs=(b_spec, P(), P()), check_vma=False)
    return fn(x, weights, idx, w_gate, w_up, w_down, *extra)


# --- the entry point on a mesh ----------------------------------------------------------------------

def expert_parallel_moe(x: jax.Array, weights: jax.Array, idx: jax.Array, w_gate: jax.Array,
                        w_up: jax.Array, w_down: jax.Array, *, layout: EPLayout, dtype,
                        backend: str = "auto", transport: str = "auto",
                        buffer_factor: float = 2.0, fp8: bool = False,
                        keep: jax.Array | None = None, expert_chunks: int = 1):
    """Routed experts with expert parallelism (see the module docstring).

    Args:
      x: tokens [B, T, D] (global arrays under jit; B split over `layout.batch_axes`, T over
        `layout.length_axes`).
      weights: combine weights [B, T, X]; idx: expert ids [B, T, X] (from `moe.gate`).
      w_gate, w_up: [E, D, F]; w_down: [E, F, D]. E is split over `layout.expert_axes`, F over
        `layout.mlp_axes`; D is gathered (FSDP weights are all-gathered on the way in).
      layout: from `layout_from_context`.
      dtype: compute dtype. backend: grouped GEMM backend. transport: one of TRANSPORTS.
      buffer_factor: per-round receive buffer in units of the balanced load (P·W ≈ factor·M).
      fp8: emulated fp8 grouped GEMMs.
      keep: optional bool [B, T, X] from `capacity_keep`; pairs with False are not sent.
      expert_chunks: without an expert axis, gather the FSDP-split experts this many at a time
        (`_chunked_experts`); ignored with an expert axis.

    Returns:
      (y [B, T, D] in dtype, load [E] fp32 global (token, slot) choices per expert (dropped
      pairs included, as `moe.expert_load` counts them), and the number of exchange rounds run
      (int32 scalar, a diagnostic; the maximum over expert groups)).
    """
    E = w_gate.shape[0]
    Pn = layout.n_shards
    batch = layout.batch_axes or None
    b_spec = P(batch, layout.length_axes or None, None)
    mlp = (layout.mlp_axes if len(layout.mlp_axes) > 1 else layout.mlp_axes[0]) \
        if layout.mlp_axes else None
    n_batch = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in layout.batch_axes)
    if x.shape[0] % n_batch:
        raise MeshError(f"expert parallelism: batch {x.shape[0]} is not divisible by the batch "
                        f"axes {'×'.join(layout.batch_axes)}={n_batch}; use a multiple of "
                        f"{n_batch} sequences")
    if not fp8 and resolve_backend(backend) != "reference":
        # The grouped GEMMs multiply in `dtype` anyway (they cast the weights to the rows' dtype),
        # so casting first changes no value and halves the bytes FSDP gathers for a bf16 model.
        # (fp8 quantizes the stored weights; the reference backend multiplies them in fp32.)
        # On this layer's slice only (`cast_layer_weight` says why a plain cast is not).
        w_gate, w_up, w_down = (cast_layer_weight(w, dtype) for w in (w_gate, w_up, w_down))
    if not layout.expert_axes:
        return _local_moe(x, weights, idx, w_gate, w_up, w_down, layout=layout, dtype=dtype,
                          backend=backend, fp8=fp8, keep=keep, expert_chunks=expert_chunks)
    ex = layout.expert_axes if len(layout.expert_axes) > 1 else layout.expert_axes[0]
    # Pairs per device: its sequences, and under context parallelism its positions of them.
    n_length = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in layout.length_axes)
    M = (x.shape[0] // n_batch) * (x.shape[1] // n_length) * idx.shape[2]
    embed_axes = _embed_axes(layout, x.shape[-1])
    emb = embed_axes or None
    plan = _Plan(n_shards=Pn, chunk=chunk_rows(M, Pn, buffer_factor), n_local=E // Pn,
                 axis=layout.expert_axes, mlp_axes=layout.mlp_axes,
                 transport=resolve_transport(transport), backend=backend, fp8=fp8, dtype=dtype)

    def body(x, weights, idx, w_gate, w_up, w_down, *keep):
        *ws, gathers = _weights_in(w_gate, w_up, w_down, embed_axes)
        w_gate, w_up, w_down = ws
        plan_ = dataclasses.replace(plan, gathers=gathers)
        b, T, D = x.shape
        X = idx.shape[-1]
        El, W = plan.n_local, plan.chunk
        routed = jax.ops.segment_sum(jnp.ones((idx.size,), jnp.int32), idx.reshape(-1),
                                     num_segments=E)                       # [E] choices
        if keep:                                                            # dropped: id E, unsent
            idx = jnp.where(keep[0], idx, E)
        flat = idx.reshape(-1)                                              # [M]
        order = jnp.argsort(flat, stable=True)                              # [M] by expert
        sorted_e = flat[order]                                              # [M] (E = dropped)
        counts = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=E)  # [E] kept
        send = counts.reshape(Pn, El).sum(-1).astype(jnp.int32)             # [P]
        start = (jnp.cumsum(send) - send).astype(jnp.int32)                 # [P]
        dest = jnp.minimum(sorted_e // El, Pn - 1)                          # [M]
        valid = sorted_e < E
        pos = jnp.where(valid, jnp.arange(flat.shape[0]) - start[dest], -W - 1)  # [M]
        ints = dict(send=send, start=start, dest=dest, pos=pos,
                    recv=jax.lax.all_to_all(send, plan.axis, 0, 0, tiled=True),
                    local_e=jnp.where(valid, sorted_e % El, El).astype(jnp.int32))
        # Every device that meets this one in a collective inside the rounds runs as many: the
        # expert group (exchanges) and, when the weights are gathered per round, the devices
        # holding the other D shards (a loop whose trip counts differ across a collective's
        # participants deadlocks).
        n_rounds = -(-jax.lax.pmax(jnp.max(send), plan.axis + embed_axes) // W)
        n_rounds = jnp.maximum(n_rounds, 1).astype(jnp.int32)

        rows = x.reshape(-1, D).astype(dtype)[order // X]                   # [M, D] sorted pairs
        out = _round(plan_, ints, rows, w_gate, w_up, w_down, 0)            # [M, D]
        out = out + _overflow(plan_, ints, n_rounds, rows, w_gate, w_up, w_down)
        pairs = jnp.zeros_like(out).at[order].set(out, unique_indices=True)  # [M, D] pair order
        pairs = checkpoint_name(pairs.reshape(b, T, X, D), "expert_out")    # [b, T, X, D]
        y = jnp.einsum("BTXD,BTX->BTD", pairs, weights.astype(dtype))       # [b, T, D]
        load = routed.astype(jnp.float32)
        if layout.token_axes:
            load = jax.lax.psum(load, layout.token_axes)                    # global counts
            n_rounds = jax.lax.pmax(n_rounds, layout.token_axes)            # report the worst
        return y.astype(dtype), load, n_rounds

    w_spec = P(ex, emb, mlp)
    extra = () if keep is None else (keep,)
    fn = jax.shard_map(body, in_specs=(b_spec, b_spec, b_spec, w_spec, w_spec, P(ex, mlp, emb))
                       + (b_spec,) * len(extra), out_specs=(b_spec, P(), P()), check_vma=False)
    return fn(x, weights, idx, w_gate, w_up, w_down, *extra)
