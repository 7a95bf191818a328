"""The logical-axis rule table, the strategy presets, and the context that applies them.

Parameters and activations carry logical axis names (`deepseek_jax.model.layers`); the table
below maps each name to mesh axes. Read it top to bottom: for each dimension of an array, the
first rule naming it whose mesh axes are still free in that array wins (Flax's resolution); a
name with no winning rule stays unsharded. So `w_gate [L, E, D, F]` takes E→expert first, then
F→tensor, then D→fsdp (expert is taken, so the embed row naming it is passed over), while
`w_dq [L, D, Q]` takes D→(fsdp, expert).

ZeRO across expert ranks: the weights outside the routed experts (attention, dense and shared
FFNs, embeddings, norms), their gradients and their AdamW moments are split over the expert
axis as well as fsdp, as DeepSeek's ZeRO-1 data parallelism splits them over its data-parallel
ranks (which are also its expert ranks); without it, every expert rank would hold a full fsdp
shard of them.

  logical     mesh axes                              arrays
  act_batch   dcn_data, data, stage, fsdp, expert    B of every activation and batch array
  act_length  context                                T of every activation and batch array
  act_stage   stage                                  S of the pipeline's per-stage activations
  act_heads   tensor                                 N of attention outputs
  act_vocab   tensor                                 V of logits
  stage_layers  stage                                L of a pipelined stack's weights
  expert      expert                                 E of routed experts, router, routing bias
  heads       tensor                                 N of MLA projections
  mlp         tensor                                 F of dense, shared and routed FFNs
  vocab       tensor                                 V of embedding and output head
  embed       fsdp, context, expert                  D of every weight without an E dimension
  q_lora      fsdp, context, expert                  Q where D is absent (w_uq, w_qr, q_norm)
  kv_lora     fsdp, context, expert                  C where D is absent (w_uk, w_uv, kv_norm)
  embed       fsdp, context                          D of routed-expert weights (E has expert)
  q_lora, kv_lora  fsdp, context                     (the same fallback)
  (never)     act_embed, layers, head_dim, mtp_in, adapter (the LoRA rank r)

A preset picks which mesh axes the table may use and a default mesh shape; the rules a run
uses are the table with every other axis, and every axis of size 1, struck out
(`logical_axis_rules`). A preset refuses a mesh whose other axes are larger than 1, so
`--config.mesh.fsdp=2` under preset "dp" is an error rather than a silent change of strategy.

Expert parallelism shards E of the expert weights by this table; the MoE layer then runs its
dispatch explicitly (`model/dispatch.py`: `shard_map` with all-to-all over the expert axis,
read from these rules through `expert.layout_from_context`); the table does not change. With the
batch split and E not split, the same module dispatches each device's own tokens locally.

Context parallelism (presets fsdp_cp, and fsdp_ep_cp with expert parallelism) splits T of the
activations and of the batch over `context`; its ranks hold the weights as fsdp ranks do (ZeRO
over them too), since every rank runs every weight on its own tokens. Attention then needs every
key (`model/attention.py`); the MoE dispatch sends each rank's own positions to the experts.

Pipeline parallelism (presets fsdp_pp, fsdp_ep_pp) splits the layer axis of the stacks the model
pipelines (named "stage_layers" instead of "layers" when `ModelConfig.pipelined` says so) over
`stage`; every other weight is replicated over it. Outside the pipeline the stage ranks split the
batch as data ranks do (so each process still reads rows of its own); inside it, `stage` indexes
the stages and is struck from the other rules (`model/pipeline.py`).

Left out: ZeRO over stage ranks for the weights outside the pipeline; context with tensor
parallelism (attention refuses heads split under context parallelism).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Mapping

import flax.linen as nn
import jax
from jax.sharding import Mesh

from deepseek_jax.parallel.mesh import ICI_AXES, MeshError, make_mesh

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

BATCH_AXES = ("dcn_data", "data", "stage", "fsdp", "expert")
WEIGHT_AXES = ("fsdp", "context", "expert")      # ZeRO: the ranks that split "embed"

LOGICAL_AXIS_RULES: Rules = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("act_length", "context"),
    ("act_stage", "stage"),
    # parameters, in order of precedence
    ("stage_layers", "stage"),
    ("expert", "expert"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    # ZeRO over expert ranks too: a weight without an E dimension is split over fsdp × expert;
    # an expert weight, whose E already takes `expert`, falls through to the fsdp-only rows.
    ("embed", WEIGHT_AXES),
    ("q_lora", WEIGHT_AXES),
    ("kv_lora", WEIGHT_AXES),
    ("embed", ("fsdp", "context")),
    ("q_lora", ("fsdp", "context")),
    ("kv_lora", ("fsdp", "context")),
    # never sharded (listed so that every name the model uses appears once)
    ("act_embed", None),
    ("layers", None),
    ("head_dim", None),
    ("mtp_in", None),
    ("adapter", None),
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A parallelism strategy: the mesh axes it uses and its default mesh shape.

    Attributes:
      name: the name presets are chosen by.
      axes: ICI mesh axes the rules may use (dcn_data is always allowed).
      fill: the axis that takes the remaining devices (-1) in the default mesh.
      sizes: target sizes of the other axes in the default mesh (reduced to divide the devices).
    """
    name: str
    axes: tuple[str, ...]
    fill: str
    sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)


PRESETS = {p.name: p for p in (
    # Pure data parallelism: every array replicated, batch split.
    Preset("dp", axes=("data",), fill="data"),
    # ZeRO-3: weights and optimizer state split along embed; batch over data and fsdp.
    Preset("fsdp", axes=("data", "fsdp"), fill="fsdp"),
    # FSDP plus tensor parallelism over heads, FFN width and vocabulary.
    Preset("fsdp_tp", axes=("data", "fsdp", "tensor"), fill="fsdp", sizes={"tensor": 4}),
    # FSDP plus expert parallelism; expert ranks also split the batch.
    Preset("fsdp_ep", axes=("data", "fsdp", "expert"), fill="fsdp", sizes={"expert": 4}),
    # Experts split over expert, heads/FFN/vocab over tensor; the other weights over expert
    # ranks (ZeRO across them), not replicated.
    Preset("dp_ep_tp", axes=("data", "expert", "tensor"), fill="data",
           sizes={"expert": 2, "tensor": 2}),
    # FSDP plus context parallelism: the sequence split over context ranks, which also hold
    # the weights as fsdp ranks do. For sequences longer than a device's activations allow.
    Preset("fsdp_cp", axes=("data", "fsdp", "context"), fill="fsdp", sizes={"context": 4}),
    # Context and expert parallelism together: long sequences through a model whose experts
    # do not fit one device (DeepSeek-V3 at long context).
    Preset("fsdp_ep_cp", axes=("data", "fsdp", "expert", "context"), fill="fsdp",
           sizes={"expert": 2, "context": 2}),
    # FSDP plus pipeline parallelism: the pipelined stacks' layers split into stages
    # (`model/pipeline.py`; the trainers set the model's pipeline_stages to the stage size).
    Preset("fsdp_pp", axes=("data", "stage", "fsdp"), fill="fsdp", sizes={"stage": 2}),
    # Pipeline stages whose MoE layers are also split over expert ranks.
    Preset("fsdp_ep_pp", axes=("data", "stage", "fsdp", "expert"), fill="fsdp",
           sizes={"stage": 2, "expert": 2}),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise MeshError(f"unknown parallelism preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def default_mesh_config(preset: str, n_devices: int) -> dict[str, int]:
    """The preset's mesh for `n_devices` (one slice): fixed axes shrunk to divide the devices.

    E.g. fsdp_tp on 8 devices → {"fsdp": -1, "tensor": 4} (fsdp = 2); on 2 devices tensor = 2.
    """
    p = get_preset(preset)
    config, left = {p.fill: -1}, n_devices
    for axis, target in p.sizes.items():
        config[axis] = math.gcd(target, left)
        left //= config[axis]
    return config


def mesh_and_rules(preset: str, mesh_config: Mapping[str, int] | None = None,
                   devices=None) -> tuple[Mesh, Rules]:
    """(mesh, rules) for a preset: its default mesh unless `mesh_config` is given."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = make_mesh(mesh_config or default_mesh_config(preset, len(devices)), devices)
    return mesh, logical_axis_rules(preset, mesh)


def run_mesh_config(mesh_cfg, n_devices: int, n_slices: int = 1) -> dict[str, int]:
    """A run config's `mesh` section (preset + axis sizes, 0 = unset) → mesh sizes. With every
    ICI axis 0 the ICI axes take the preset's default shape for the devices of one DCN group
    (n_devices / dcn_data, dcn_data 0 meaning 1 and -1 the `n_slices` found), so a launcher
    that only sets dcn_data keeps the preset. Otherwise unset axes are 1, except the preset's
    fill axis, which takes the rest when no ICI axis is -1 (`preset=fsdp_cp, context=4` on 8
    devices: fsdp 2), as the planner's strategies read."""
    axes = ("dcn_data",) + ICI_AXES
    sizes = {a: int(mesh_cfg.get(a, 0)) for a in axes}     # configs older than an axis lack it
    if all(sizes[a] == 0 for a in ICI_AXES):
        dcn = {0: 1, -1: n_slices}.get(sizes["dcn_data"], sizes["dcn_data"])
        per_group = n_devices // dcn if dcn > 0 and n_devices % dcn == 0 else n_devices
        return {**default_mesh_config(mesh_cfg["preset"], per_group), "dcn_data": dcn}
    fill = get_preset(mesh_cfg["preset"]).fill
    if sizes[fill] == 0 and all(sizes[a] != -1 for a in ICI_AXES):
        sizes[fill] = -1
    return {a: (1 if v == 0 else v) for a, v in sizes.items()}


def axis_names(entry) -> tuple[str, ...]:
    """A rule's or PartitionSpec's mesh-axis entry (None, a name, or names) as a tuple of names."""
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _keep(mesh_axes, allowed: set[str]):
    """Mesh axes of one rule with the disallowed ones struck out; None when none is left."""
    axes = axis_names(mesh_axes)
    axes = tuple(a for a in axes if a in allowed)
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def logical_axis_rules(preset: str, mesh: Mesh, table: Rules = LOGICAL_AXIS_RULES) -> Rules:
    """The rules a run uses: `table` restricted to the preset's axes of size > 1 on `mesh`.

    Raises:
      MeshError: when the mesh has an axis larger than 1 that the preset does not use.
    """
    p = get_preset(preset)
    unused = [a for a in ICI_AXES if a not in p.axes and mesh.shape.get(a, 1) > 1]
    if unused:
        a = unused[0]
        users = [q.name for q in PRESETS.values() if a in q.axes]
        raise MeshError(f"preset {preset!r} does not use mesh axis {a}={mesh.shape[a]}; set "
                        f"mesh.{a}=1 or choose a preset that uses it ({', '.join(users)})")
    allowed = {a for a in ("dcn_data", *p.axes) if mesh.shape.get(a, 1) > 1}
    rules = []
    for name, axes in table:
        kept = _keep(axes, allowed)
        # A rule whose axes were all struck out is dropped (so a later fallback can still apply);
        # an explicit None rule stays.
        if kept is not None or axes is None:
            rules.append((name, kept))
    return tuple(rules)


def mesh_axes_of(logical: tuple[str | None, ...], rules: Rules) -> jax.sharding.PartitionSpec:
    """The PartitionSpec that `rules` give an array with these logical axis names."""
    return nn.logical_to_mesh_axes(logical, list(rules))


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over under `rules` (() = replicated)."""
    return axis_names(mesh_axes_of(("act_batch",), rules)[0])


def expert_axes(rules: Rules) -> tuple[str, ...]:
    """Mesh axes the routed-expert dimension E is split over (the all-to-all path's axis)."""
    return axis_names(mesh_axes_of(("expert",), rules)[0])


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Mesh and rules in scope, so that `nn.with_logical_constraint` in the model takes effect.

    Flax applies an activation constraint only when rules are set and a mesh is in context
    (`jax.set_mesh`); both are read while tracing, so trace (first call, `.lower`) inside this.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield



class InContext:
    """`fn` (a jitted function) traced and run with `mesh` and `rules` in scope: every call and
    `lower` enters `sharding_context`. A jitted function traces at its first call, not where
    `jax.jit` was written, so a program made inside the context but called outside it would
    trace without the rules: no activation constraints, and no `shard_map` around the Mosaic
    kernels, the MoE dispatch or context-parallel attention. Other attributes are `fn`'s."""

    def __init__(self, fn, mesh: Mesh, rules: Rules):
        self.fn, self.mesh, self.rules = fn, mesh, rules

    def __call__(self, *args, **kwargs):
        with sharding_context(self.mesh, self.rules):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with sharding_context(self.mesh, self.rules):
            return self.fn.lower(*args, **kwargs)

    def __getattr__(self, attr: str):
        return getattr(self.fn, attr)
