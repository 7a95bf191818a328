"""Analytic cost of one train step per chip: memory, FLOPs, collective bytes, step time, MFU.

  est = estimate(config, mesh_sizes, preset, batch, seq, target)   # no devices, no compile
  est.memory_total, est.comm_bytes, est.step_time, est.mfu

The model follows the scaling book's chapters on sharding and training (collectives are
bandwidth-bound, an all-reduce costs two all-gathers, an all-to-all a quarter of one on a
TPU torus) applied to this project's parameters and mesh rules.

Memory per chip
  parameters, optimizer  exact: every leaf of the train state divided by the mesh axes its
                         logical names map to under the preset's rules (AdamW: two moments
                         in the parameter dtype).
  gradients              one more parameter-sized copy in the parameter dtype (a temporary).
                         With LoRA adapters: moments for the adapters only, and gradients
                         (and their reductions) for the adapters and the weights they adapt.
  activations            with remat ("full"): one [B, T, D] layer input per layer saved for the
                         backward pass plus one layer's working set recomputed; without remat,
                         every layer's working set; with a policy over named activations
                         (a preset or "custom:"), the layer input (unless offloaded) and the
                         named activations it saves (`named_activations`), per layer, plus
                         one layer's working set. A layer's working set is the attention
                         scores (with the einsum backend fp32 scores, probabilities and their
                         gradient, [B, N, T, T]; with a fused backend — what "auto" picks on
                         TPU and GPU — one [B, N, T, 256] block of them and the fp32 softmax
                         statistics), the MoE's routed copies of the tokens (X per token, in
                         and out, with the expert hidden widths) and the projections' outputs;
                         the loss adds the fp32 logits and their gradient of one chunk of
                         `loss_chunk` positions (in the backward pass, a vocabulary slice of
                         the same size) and the head gathered once in the compute dtype, or
                         the logits of every position and head when loss_chunk = 0.
  Rough by nature (±30% against the compiler on the configs checked in tests); the compiled
  numbers are authoritative wherever a compile is possible.

Collectives per chip and step, as in the HLO parser (`hlo.py`: bytes = the whole array moved)
  fsdp       all-gather of every fsdp-sharded weight in the compute dtype, in the forward pass
             and again in the backward pass (what the compilers do under remat; without remat
             the TPU compiler may keep the forward's gathered weights, one gather); the routed
             experts, which the MoE's grouped GEMMs gather themselves and again in their
             backward: a third time under remat when gathered a chunk at a time (a loop of
             collectives is never dead code, so the recomputed forward keeps its gathers); with
             an expert axis, or experts gathered whole, the gathers sit in no loop and the
             recomputed forward and the backward share one (two passes); reduce-scatter of each
             gradient in the compute dtype (the weights are cast before use, so their gradients
             are reduced before the cast back), fp32 for fp8 models (the wgrad GEMMs' output).
             The embedding table (untied, its vocabulary unsplit) is looked up on its own
             D-slices (`layers.lookup`): no gather or reduce-scatter of it, an all-to-all of
             the [B, T, D] rows per lookup (main model and each MTP depth) forward and backward.
  data, dcn  all-reduce of each gradient over the batch axes it is replicated on.
  tensor     Megatron: an all-reduce of the [B, T, D] output of attention and of the FFN per
             layer in the forward pass, two more in the backward pass (and again when remat
             recomputes the forward).
  expert     an ideal all-to-all dispatch: tokens to their experts and back, B·T·X·D each way,
             forward, backward (and recompute, unless the remat policy keeps expert_rows and
             expert_out).

Time: a collective over a mesh axis of size n moves bytes·(n−1)/n at the axis bandwidth
(`axis_bandwidth`); all-reduce counts twice, all-to-all ¼ on a TPU torus. Weight gathers and
gradient reductions overlap with compute; tensor- and expert-parallel traffic sits on the
critical path. step = max(compute, overlapped comm) + exposed comm; compute = hardware FLOPs
(model FLOPs, plus what the backward pass recomputes in the rematerialized blocks:
`recomputed_flops_per_token`) at peak.
MFU = model FLOPs per chip / (step time × peak).

Pipeline (stage > 1, `model/pipeline.py`): the stage ranks split the batch outside the pipeline
as data ranks do; inside, a chip runs 1/P of the pipelined layers on its stage group's batch (P
times its own) over J + P − 1 ticks of J micro-batches, so their compute, activations and tensor-
and expert-parallel traffic scale by (J + P − 1)/J; the pipelined weights are gathered and their
gradients reduced at every tick; each tick permutes one micro-batch's [b, T, D] to the next
stage, forward and backward, and the pipeline's entry and exit gather and split the batch over
the stage ranks (permutes too), all on the critical path.

Left out: HBM-bandwidth-bound time (weight reads at small batch), latency, load imbalance
between experts, and the compiler's own scheduling; the ranking is a relative guide, the compile
is what says whether a strategy fits.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from deepseek_jax.config import REMAT_NAMES, ModelConfig, remat_names
from deepseek_jax.kernels.attention import BLOCK as ATTENTION_BLOCK
from deepseek_jax.model.attention import resolve_backend as resolve_attention
from deepseek_jax.model import adapters
from deepseek_jax.model.dispatch import expert_chunks
from deepseek_jax.parallel.mesh import MESH_AXES
from deepseek_jax.parallel.rules import (Rules, axis_names, batch_axes, logical_axis_rules,
                                         mesh_axes_of)
from deepseek_jax.train.sharded import abstract_variables
from deepseek_jax.tools.targets import Target
from deepseek_jax.train.flops import flops_per_token, stack_flops_per_token

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                    "collective-permute")


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)




def _bytes(dtype) -> int:
    return jnp.dtype(dtype).itemsize


# --- bandwidth of a mesh axis ------------------------------------------------------------------

def axis_dims(sizes: dict[str, int], target: Target) -> dict[str, list[int]]:
    """Which device-mesh dimensions each ICI axis spans, inner axes (tensor) placed first.

    The dimensions are the torus's, preceded on chips of several devices (TPU7x) by the chip's
    own (its devices, index -1 here). jax.make_mesh lays the innermost mesh axis along
    neighbouring devices; an axis of size n takes factors of the remaining dimensions until it
    has n devices.
    """
    left = list(target.slice_shape) or [target.n_chips]
    index = list(range(len(left)))
    if target.chip.devices_per_chip > 1:
        left, index = [target.chip.devices_per_chip] + left, [-1] + index
    out = {}
    for axis in reversed(MESH_AXES[1:]):
        need, touched = sizes.get(axis, 1), []
        for i, d in enumerate(left):
            if need == 1:
                break
            g = math.gcd(need, d)
            if g > 1:
                left[i] //= g
                need //= g
                touched.append(index[i])
        out[axis] = touched
    return out


def axis_bandwidth(axes: tuple[str, ...], sizes: dict[str, int], target: Target) -> float:
    """One-way bytes/s per device for a collective over `axes` (the slowest link decides)."""
    chip = target.chip
    if "dcn_data" in axes and sizes.get("dcn_data", 1) > 1:
        return chip.dcn_bw
    if chip.kind == "gpu":
        # Inner axes fill a node first; a group that reaches past the node runs at the NIC rate.
        live = [a for a in axes if sizes.get(a, 1) > 1]
        if not live:
            return chip.nvlink_bw
        first = min(MESH_AXES.index(a) for a in live)
        span = math.prod(sizes.get(a, 1) for a in MESH_AXES[max(first, 1):])
        return chip.nvlink_bw if span <= chip.gpus_per_node else chip.node_bw
    dims = axis_dims(sizes, target)
    spanned = [d for a in axes if sizes.get(a, 1) > 1 for d in dims[a]]
    torus = sum(1 for d in spanned if d >= 0)
    if not torus and spanned:                 # only between the devices of one chip
        return chip.die_bw
    # Bidirectional rings, one per torus dimension spanned; a chip's devices share its links.
    return 2 * chip.ici_link_bw * max(torus, 1) / chip.devices_per_chip


def collective_time(kind: str, nbytes: float, group: int, bandwidth: float, chip_kind: str) -> float:
    """Seconds for one collective moving `nbytes` (whole array) among `group` chips."""
    if group <= 1 or nbytes == 0:
        return 0.0
    t = nbytes * (group - 1) / group / bandwidth
    if kind == "collective-permute":          # each chip sends its whole shard to one other
        t = nbytes / bandwidth
    elif kind == "all-reduce":
        t *= 2
    elif kind in ("all-to-all", "ragged-all-to-all") and chip_kind == "tpu":
        t /= 4
    return t


# --- the estimate ------------------------------------------------------------------------------

@dataclasses.dataclass
class Estimate:
    params: float                 # bytes per chip
    optimizer: float
    gradients: float
    activations: float
    model_flops: float            # per chip per step (useful FLOPs, for MFU)
    hardware_flops: float         # per chip per step, remat recompute included
    comm_bytes: dict[str, float]  # kind → bytes per chip per step
    comm_time: dict[str, float]   # kind → seconds
    exposed_time: float           # critical-path communication (tensor, expert)
    overlap_time: float           # communication that can hide under compute
    compute_time: float
    peak_flops: float

    @property
    def memory_total(self) -> float:
        return self.params + self.optimizer + self.gradients + self.activations

    @property
    def comm_time_total(self) -> float:
        return self.exposed_time + self.overlap_time

    @property
    def step_time(self) -> float:
        return max(self.compute_time, self.overlap_time) + self.exposed_time

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_time * self.peak_flops) if self.step_time else 0.0


@functools.lru_cache(maxsize=64)
def _flops_per_token(config: ModelConfig, seq: int) -> float:
    return flops_per_token(config, seq)          # counts parameters with an eval_shape: cached


def pipeline_ticks(config: ModelConfig) -> int:
    """Ticks of the pipeline schedule, J + P − 1 (`model/pipeline.py`); 1 without one."""
    P = config.pipeline_stages
    return config.n_microbatches + P - 1 if P > 1 else 1


def pipelined_stacks(config: ModelConfig) -> list[str]:
    """The main model's stacks the config runs as a pipeline (none without one)."""
    return [name for name, n in config.layer_stacks.items() if config.pipelined(n)]


def pipelined_share(config: ModelConfig) -> float:
    """The fraction of the main model's layers that run in the pipeline (0 without one)."""
    return sum(config.layer_stacks[s] for s in pipelined_stacks(config)) / config.n_layers


def rules_for(preset: str, sizes: dict[str, int]) -> Rules:
    return logical_axis_rules(preset, abstract_mesh(sizes))


def state_bytes(config: ModelConfig, sizes: dict[str, int], rules: Rules) -> dict[str, float]:
    """Per-chip bytes of parameters, AdamW moments and gradients, and the collective bytes of
    the weights: {"params", "optimizer", "gradients", "gather", "scatter", "allreduce"} (gather
    in the compute dtype, scatter/all-reduce of gradients in the parameter dtype, per step)."""
    variables = abstract_variables(config)
    with_paths = jax.tree_util.tree_leaves_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    keys = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in with_paths]
    # With LoRA adapters only they are trained (optimizer moments, gradients). A weight they
    # adapt through W' = W + s·A·B (`adapters.MERGED`) still forms its whole gradient dW',
    # reduced like any weight's; one used as x·W + s·(x·A)·B, or frozen, forms none.
    adapted = {(*k[:-1], k[-1][:-len("_lora_a")]) for k in keys if k[-1].endswith("_lora_a")}
    adapted = {k for k in adapted if adapters.merged_in_model(k)}
    b_axes = [a for a in ("dcn_data", "data", "stage", "fsdp", "context", "expert")
              if sizes.get(a, 1) > 1]
    out = dict(params=0.0, optimizer=0.0, gradients=0.0, gather=0.0, scatter=0.0, allreduce=0.0,
               allreduce_dcn=0.0, table_axes=())
    compute_b = _bytes(config.dtype)
    expert_axes = set(axis_names(mesh_axes_of(("expert",), rules)[0]))
    ep = any(sizes.get(a, 1) > 1 for a in expert_axes)
    looped = not ep and expert_chunks(config) > 1          # gathered a chunk at a time
    expert_passes = 3 if config.remat_policy != "none" and looped else 2
    for key, (_, leaf) in zip(keys, with_paths):
        trained = not config.adapter_rank or adapters.is_adapter(key)
        reduced = trained or key in adapted
        names = tuple(leaf.names)
        value = leaf.value
        spec = mesh_axes_of(names, rules)
        used = [a for entry in spec for a in axis_names(entry)]
        shard = math.prod(sizes.get(a, 1) for a in used)
        n = math.prod(value.shape)
        pb = _bytes(value.dtype)
        local = n / shard
        out["params"] += local * pb
        out["optimizer"] += 2 * local * pb if trained else 0.0
        out["gradients"] += local * pb if reduced else 0.0
        # Gathered over the batch-like axes it is split on: fsdp, and expert too for the
        # non-expert weights that ZeRO shards across expert ranks; an expert weight's own
        # expert axis holds different experts and is never gathered.
        own = expert_axes if "expert" in names else set()
        f = math.prod(sizes.get(a, 1) for a in used
                      if a in ("fsdp", "context", "expert") and a not in own)
        # A pipelined stack's weights are gathered (and their gradients reduced) again at every
        # tick of the schedule: each tick runs the stage's layers on one micro-batch.
        ticks = pipeline_ticks(config) if "stage_layers" in names else 1
        grad_b = pb if config.fp8 else min(pb, compute_b)
        if f > 1 and names == ("vocab", "embed") and not config.tie_embeddings and all(
                sizes.get(a, 1) == 1 for a in axis_names(spec[0])):
            # The embedding lookup on the table's own D-slices (`layers.lookup`): no gather, no
            # whole-table gradient; its rows' all-to-alls are counted in `estimate`.
            out["table_axes"] = tuple(a for a in used if sizes.get(a, 1) > 1)
        elif f > 1:
            # Forward and backward gathers of the full-over-fsdp array (see the module
            # docstring for the experts' third), gradient reduce-scatter.
            passes = expert_passes if "expert" in names else 2
            out["gather"] += ticks * passes * local * f * compute_b
            out["scatter"] += ticks * local * f * grad_b if reduced else 0.0
        replicated = [a for a in b_axes if a not in used]
        ici = [a for a in replicated if a != "dcn_data"]
        if ici and reduced:
            out["allreduce"] += local * grad_b
        if "dcn_data" in replicated and reduced:
            out["allreduce_dcn"] += local * grad_b
    return out


def named_activations(config: ModelConfig, moe: bool, tp: int = 1) -> dict[str, tuple]:
    """{name: (elements per token, forward FLOPs per token)} of one layer's named activations
    (`config.REMAT_NAMES`), dense-FFN or MoE, with heads and FFN widths split `tp` ways: what a
    policy keeps by saving the name, or recomputes without it. Keys and values are counted as
    the fused backends hold them (keys H + R wide per head); the attention core's FLOPs are
    under "context" (they are recomputed under every named policy: its residuals live inside
    the kernels), and expert_rows cost no FLOPs (a gather; under EP an exchange)."""
    c = config
    D, Q, C = c.d_model, c.q_lora_rank, c.kv_lora_rank
    N, H, R, U = c.n_heads / tp, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    out = {"layer_input": (D, 0.0),
           "q_latent": (Q, 2.0 * D * Q),
           "kv_latent": (C + R, 2.0 * D * (C + R)),
           "query": (N * (H + R), 2.0 * (Q or D) * N * (H + R)),
           "key_value": (N * (H + R + U), 2.0 * C * N * (H + U)),
           "context": (N * U, 0.0),                       # the core: below, for every policy
           "attn_out": (D, 2.0 * N * U * D)}
    F = (c.n_shared_experts * c.moe_d_ff if moe else c.d_ff) / tp
    out.update(mlp_hidden=(2 * F, 4.0 * D * F), mlp_out=(D, 2.0 * F * D))
    if moe:
        X, Fe = c.n_experts_per_token, c.moe_d_ff / tp
        out.update(expert_rows=(X * D, 0.0), expert_hidden=(2 * X * Fe, 4.0 * X * D * Fe),
                   expert_out=(X * D, 2.0 * X * Fe * D))
    assert set(out) <= set(REMAT_NAMES)
    return out


def recomputed_flops_per_token(config: ModelConfig, seq: int) -> float:
    """Forward FLOPs per token the backward pass recomputes under `config.remat_policy`, in the
    rematerialized blocks (the main stack's; the MTP blocks and the head are not): none without
    remat or with a policy that keeps every dot's output; otherwise each block's attention core
    and router, and the projections whose outputs the policy does not keep (under "full" and
    "nothing_saveable", all of them)."""
    policy = config.remat_policy
    if policy in ("none", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable"):
        return 0.0
    kept = remat_names(policy) or {}                   # full, nothing_saveable: keep nothing
    c = config
    core = c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * seq
    total = 0.0
    for moe, count in ((False, c.n_layers - c.n_moe_layers), (True, c.n_moe_layers)):
        named = named_activations(c, moe)
        router = 2.0 * c.d_model * c.n_routed_experts if moe else 0.0
        total += count * (core + router + sum(f for name, (_, f) in named.items()
                                              if name not in kept))
    return total


def _layer_kinds(config: ModelConfig) -> tuple[tuple[bool, int], ...]:
    """((moe, number of such blocks), ...) over the main layers and the MTP depths (whose
    block has the model's MoE FFN when it has routed experts): the layers whose inputs the
    activation count keeps."""
    moe = config.n_moe_layers + (config.mtp_depth if config.n_routed_experts else 0)
    return (False, config.n_layers + config.mtp_depth - moe), (True, moe)


def context_ranks(sizes: dict[str, int], rules: Rules) -> int:
    """How many chips split the sequence (the `act_length` rule): 1 without context parallelism."""
    return math.prod(sizes.get(a, 1) for a in axis_names(mesh_axes_of(("act_length",), rules)[0]))


def activation_bytes(config: ModelConfig, sizes: dict[str, int], rules: Rules, batch: int,
                     seq: int, platform: str = "tpu") -> float:
    """Per-chip activation memory of one step on `platform` (see the module docstring for what
    is counted)."""
    b_split = math.prod(sizes.get(a, 1) for a in batch_axes(rules))
    tp = sizes.get("tensor", 1) if ("heads", "tensor") in rules else 1
    cp = context_ranks(sizes, rules)
    Bl, T, D = batch / b_split, seq / cp, config.d_model        # T: this chip's positions
    ab = _bytes(config.dtype)
    N = config.n_heads / tp
    H, R, U = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    try:
        fused = resolve_attention(config.attention_backend, T, config.dtype, platform) != "einsum"
    except ValueError:          # a backend the platform lacks: the compile reports it
        fused = False
    keys = min(seq, ATTENTION_BLOCK) if fused or cp > 1 else seq
    scores = Bl * N * T * keys * (4 + 4 + 4)                    # scores, probs, grad (fp32)
    proj = Bl * T * (N * (2 * (H + R) + 2 * U) + 2 * D + config.kv_lora_rank
                     + config.q_lora_rank) * ab * 2
    if cp > 1:        # every key: the gathered latents and the keys and values expanded from them
        proj += Bl * (seq - T) * (N * (H + R + U) + config.kv_lora_rank + R) * ab * 2
    if config.n_routed_experts:
        X, F = config.n_experts_per_token, config.moe_d_ff / tp
        moe = Bl * T * X * (3 * D + 3 * F) * ab * 2
    else:
        moe = Bl * T * 3 * config.d_ff / tp * ab * 2
    layer = scores + proj + moe
    layers = config.n_layers + config.mtp_depth
    # Under a pipeline a chip keeps its stage's layers for its stage group's rows at every tick
    # (bubble ticks included), and the schedule's buffers: the stage's state and the outputs.
    depth = effective_layers(config) / layers
    P = config.pipeline_stages
    buffers = P * Bl * T * D * ab * (1 + 2 / config.n_microbatches) if P > 1 else 0.0
    vocab = config.vocab_size / tp
    if config.loss_chunk:
        logits = Bl * min(T, config.loss_chunk) * vocab * 4 * 3 + D * vocab * ab
    else:
        logits = Bl * T * vocab * 4 * 3 * (1 + config.mtp_depth)
    if config.remat_policy == "none":
        return depth * layers * layer + logits + buffers
    kept = remat_names(config.remat_policy) or {}
    per_token = 0.0 if kept.get("layer_input") == "offload" else layers * D   # layer inputs
    for moe, count in _layer_kinds(config):
        named = named_activations(config, moe, tp)
        per_token += count * sum(named[n][0] for n, a in kept.items()
                                 if a == "save" and n in named and n != "layer_input")
    return depth * Bl * T * per_token * ab + layer + logits + buffers


def effective_layers(config: ModelConfig) -> float:
    """Blocks (main and MTP) one chip runs per step, in units of its batch shard's pass through
    one block: all of them without a pipeline; under one, a pipelined layer counts the
    schedule's ticks over its micro-batches, (J + P − 1)/J (a stage runs 1/P of the layers on
    P times the rows, and the bubble)."""
    layers = config.n_layers + config.mtp_depth
    piped = pipelined_share(config) * config.n_layers
    return layers + piped * (pipeline_ticks(config) / config.n_microbatches - 1)


def estimate(config: ModelConfig, sizes: dict[str, int], preset: str, batch: int, seq: int,
             target: Target, microbatches: int = 1) -> Estimate:
    """The analytic per-chip cost of a train step on `target` with mesh `sizes` (see module).
    With `microbatches` = k the batch runs as k accumulated micro-batches (`train.microbatches`):
    activations are those of batch/k, and every weight gather and gradient reduction happens
    once per micro-batch."""
    sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
    rules = rules_for(preset, sizes)
    n = math.prod(sizes.values())
    state = state_bytes(config, sizes, rules)
    acts = activation_bytes(config, sizes, rules, batch // microbatches, seq, target.chip.kind)

    model_flops = _flops_per_token(config, seq) * batch * seq / n
    hardware_flops = model_flops + recomputed_flops_per_token(config, seq) * batch * seq / n
    stages = sizes["stage"]
    if stages > 1:
        # The pipelined layers run over J + P − 1 ticks of J micro-batches (the bubble).
        bubble = pipeline_ticks(config) / config.n_microbatches
        piped = sum(stack_flops_per_token(config, seq, s) for s in pipelined_stacks(config))
        per_token = _flops_per_token(config, seq) + piped * (bubble - 1)
        share = pipelined_share(config)
        recomputed = recomputed_flops_per_token(config, seq) * (1 + share * (bubble - 1))
        hardware_flops = (per_token + recomputed) * batch * seq / n
    chip = target.chip

    b_split = math.prod(sizes.get(a, 1) for a in batch_axes(rules))
    cp = context_ranks(sizes, rules)
    tokens_local = batch * seq / (b_split * cp)
    ab = _bytes(config.dtype)
    passes = 3 if config.remat_policy != "none" else 2    # forward, backward (and recompute)

    comm = {k: 0.0 for k in COLLECTIVE_KINDS}
    overlap = exposed = 0.0
    times = {k: 0.0 for k in COLLECTIVE_KINDS}

    def add(kind, nbytes, axes, critical):
        nonlocal overlap, exposed
        group = math.prod(sizes.get(a, 1) for a in axes)
        if group <= 1 or nbytes == 0:
            return
        comm[kind] += nbytes
        t = collective_time(kind, nbytes, group, axis_bandwidth(axes, sizes, target), chip.kind)
        times[kind] += t
        if critical:
            exposed += t
        else:
            overlap += t

    k = microbatches
    # ZeRO gathers run over fsdp and context, and over the expert ranks for the weights
    # without an E dimension (counted even when fsdp is 1).
    zero = ("fsdp", "context", "expert")
    add("all-gather", k * state["gather"], zero, False)
    add("reduce-scatter", k * state["scatter"], zero, False)
    if cp > 1:
        # Each layer's key latents (C + R a token) gathered over the context ranks, forward
        # and recompute; their gradients reduce-scattered back.
        layers = config.n_layers + config.mtp_depth
        latent = tokens_local * cp * (config.kv_lora_rank + config.qk_rope_head_dim) * ab
        add("all-gather", k * layers * (passes - 1) * latent, ("context",), True)
        add("reduce-scatter", k * layers * latent, ("context",), True)
    ici_rep = tuple(a for a in ("data", "stage", "expert") if sizes[a] > 1)
    add("all-reduce", k * state["allreduce"], ici_rep, False)
    add("all-reduce", k * state["allreduce_dcn"], ("dcn_data",), False)
    if sizes["tensor"] > 1:
        layers = effective_layers(config)
        add("all-reduce", 2 * layers * passes * tokens_local * config.d_model * ab, ("tensor",),
            True)
    if stages > 1:
        # Each tick hands a micro-batch's [b, T, D] (b = the stage group's rows / J) to the
        # next stage, forward and backward; the entry gathers the stage group's rows and the
        # exit splits them back, each mirrored in the backward pass (permutes of the group's
        # [B, T, D] over "stage" in the compiled programs).
        group = stages * tokens_local * config.d_model * ab
        ticks = pipeline_ticks(config)
        add("collective-permute", (2 * ticks / config.n_microbatches + 4) * group, ("stage",),
            True)
    if state["table_axes"]:
        # Embedding rows to their sequences' devices: one all-to-all of [B, T, D] per lookup
        # (the main model's and each MTP depth's) forward, one backward.
        add("all-to-all", k * 2 * (1 + config.mtp_depth) * tokens_local * config.d_model * ab,
            state["table_axes"], True)
    if sizes["expert"] > 1 and config.n_routed_experts:
        moe_layers = config.n_moe_layers + config.mtp_depth
        if "moe_layers" in pipelined_stacks(config):
            moe_layers += config.n_moe_layers * (
                pipeline_ticks(config) / config.n_microbatches - 1)
        # Keeping the rows received and the outputs returned spares the recomputed exchange.
        kept = remat_names(config.remat_policy) or {}
        exchanges = 2 if {"expert_rows", "expert_out"} <= set(kept) else passes
        add("all-to-all", 2 * moe_layers * exchanges * tokens_local * config.n_experts_per_token
            * config.d_model * ab, ("expert",), True)

    return Estimate(params=state["params"], optimizer=state["optimizer"],
                    gradients=state["gradients"], activations=acts, model_flops=model_flops,
                    hardware_flops=hardware_flops, comm_bytes=comm, comm_time=times,
                    exposed_time=exposed, overlap_time=overlap,
                    compute_time=hardware_flops / chip.peak_flops, peak_flops=chip.peak_flops)


def mesh_group_axes(group: int, sizes: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes a replica group of `group` devices most likely spans: a single axis of that
    size, else the shortest run of adjacent axes (size-1 axes skipped) whose sizes multiply to it,
    else () (unknown; callers then treat the group as a sub-torus of that many chips)."""
    live = [a for a in MESH_AXES if sizes.get(a, 1) > 1]
    for a in reversed(live):
        if sizes[a] == group:
            return (a,)
    for length in range(2, len(live) + 1):
        for i in range(len(live) - length, -1, -1):
            run = tuple(live[i:i + length])
            if math.prod(sizes[a] for a in run) == group:
                return run
    return ()


def hlo_comm_time(collectives, sizes: dict[str, int], target: Target) -> tuple[float, float, dict]:
    """(overlapped, exposed, seconds by kind) for collectives parsed from compiled HLO, with the
    same bandwidth model, by each collective's role (`hlo.Collective.role`: a windowed-einsum
    permute is timed as the share of the all-gather or reduce-scatter it carries): all-gathers,
    reduce-scatters and all-reduces not over `tensor` overlap with compute; all-reduces over
    `tensor`, all-to-alls and other permutes are on the critical path."""
    overlap = exposed = 0.0
    by_kind: dict[str, float] = {}
    for c in collectives:
        role = getattr(c, "role", "") or c.kind
        axes = mesh_group_axes(c.group_size, sizes)
        if axes:
            bw = axis_bandwidth(axes, sizes, target)
        else:       # unknown axes: a sub-torus of `group` chips inside a slice
            bw = axis_bandwidth(("tensor",), {**{a: 1 for a in MESH_AXES},
                                              "tensor": c.group_size}, target)
        t = collective_time(role, c.bytes, c.group_size, bw, target.chip.kind) * c.executions
        by_kind[role] = by_kind.get(role, 0.0) + t
        critical = (role in ("all-to-all", "ragged-all-to-all", "collective-permute")
                    or (role == "all-reduce" and "tensor" in axes))
        if critical:
            exposed += t
        else:
            overlap += t
    return overlap, exposed, by_kind
