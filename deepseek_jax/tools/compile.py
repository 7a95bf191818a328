"""Compile the real sharded train step for one strategy, without running it, and measure it.

  result = compile_strategy(config, strategy, devices, batch=512, seq=4096)

The step is `sharded.make_sharded_train_step` (the one `experiments/pretrain.py` runs), lowered
with `jax.ShapeDtypeStruct` arguments that carry their shardings, so nothing is allocated: the
671B model's state exists only as shapes. `devices` are compile-only TPU or GPU devices from
`jax.experimental.topologies` (ahead of time, from a CPU host; `gpu_targets.py`) or fake CPU
devices.

Measured per chip:
  params, optimizer, routing   from the argument shardings (exact shard shapes)
  arguments, output, alias, temp, generated code, peak   `Compiled.memory_analysis()`
  total                        the TPU compiler's peak; on GPU and CPU targets arguments +
                               output − alias + temp (XLA:CPU's reported peak omits temporaries;
                               XLA:GPU's counts values by live range, but a GPU step holds each
                               temporary allocation whole, collective memory included)
  gpu_collective               the part of temp in XLA:GPU's collective memory (the ragged
                               all-to-all's buffers under expert parallelism), a separate
                               allocation (`buffers.gpu_collective_memory`)
  xla_flops                    `Compiled.cost_analysis()["flops"]` — counts the body of a
                               scanned layer loop once, so it undercounts a scanned model;
                               the planner reports FLOPs from the config instead
  collectives                  `hlo.collective_stats(Compiled.as_text())`
  buffers                      the largest buffers of the compiler's buffer assignment, with
                               the ops that make them (`buffers.py`; the compile runs with
                               XLA's dump switched on to get it)
  peak_buffers, peak_live      the largest values live together at the memory peak, and the
                               sum of all of them (the dump's live ranges; [] and 0 without)

When the program does not fit, the TPU compiler stops with RESOURCE_EXHAUSTED; the result then
holds the temporaries (or total) the message reports and `fits=False`, and no HLO.

The batch holds every key the data pipeline feeds the step (tokens, segment_ids, positions,
valid), so packed-sequence masking is part of the compiled program. The optimizer is the
pretraining AdamW chain with a constant learning rate (the schedule changes no shapes).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.tools import buffers, gpu_targets, hlo
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import init_train_state
from deepseek_jax.train import sharded

_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_OOM_TEMP = re.compile(r"HLO temporaries \(([\d.]+)\s*([KMGT]?)i?B?\)")
_OOM_USED = re.compile(r"Used ([\d.]+)\s*([KMGT]?)i?B? of ([\d.]+)\s*([KMGT]?)i?B? hbm")
_OOM_AVAIL = re.compile(r"available HBM \(([\d.]+)\s*([KMGT]?)i?B?\)")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A preset and its mesh axis sizes (every axis of MESH_AXES, product = device count)."""
    preset: str
    sizes: tuple[tuple[str, int], ...]

    @classmethod
    def make(cls, preset: str, sizes: dict[str, int]) -> "Strategy":
        return cls(preset, tuple((a, int(sizes.get(a, 1))) for a in parallel.MESH_AXES))

    @property
    def mesh(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def label(self) -> str:
        axes = ",".join(f"{a}={n}" for a, n in self.sizes if n > 1) or "1 device"
        return f"{self.preset}({axes})"


def abstract_train_inputs(config: ModelConfig, mesh, rules, batch: int, seq: int,
                          microbatches: int = 1):
    """(state, batch, step) with ShapeDtypeStruct leaves that carry their shardings."""
    tx = make_optimizer(1e-4)
    step = sharded.make_sharded_train_step(config, tx, mesh, rules, microbatches=microbatches)
    shapes = jax.eval_shape(lambda k: init_train_state(k, config, tx), jax.random.key(0))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         shapes, step.shardings)
    bs = parallel.batch_sharding(mesh, rules)
    ints = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=bs)
    data = {"tokens": ints, "segment_ids": ints, "positions": ints,
            "valid": jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=bs)}
    return state, data, step


def shard_bytes(tree) -> float:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return float(total)


def _parse_size(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit or "B"]


def parse_oom(message: str) -> dict:
    """{"temp": bytes} or {"total": bytes}, and {"available": bytes}, from an HBM OOM message."""
    out = {}
    m = _OOM_TEMP.search(message)
    if m:
        out["temp"] = _parse_size(*m.groups())
    m = _OOM_USED.search(message)
    if m:
        out["total"] = _parse_size(m.group(1), m.group(2))
        out["available"] = _parse_size(m.group(3), m.group(4))
    m = _OOM_AVAIL.search(message)
    if m:
        out["available"] = _parse_size(*m.groups())
    return out


def compile_strategy(config: ModelConfig, strategy: Strategy, devices, batch: int, seq: int,
                     keep_hlo: bool = False, microbatches: int = 1) -> dict:
    """Compiles the train step for `strategy` on `devices`, accumulating gradients over
    `microbatches` as a run with `train.microbatches` does; a dict of measurements (see module).

    Raises `parallel.MeshError` (before compiling) when the mesh or batch cannot be sharded.
    """
    t0 = time.perf_counter()
    mesh = parallel.make_mesh(strategy.mesh, devices)
    rules = parallel.logical_axis_rules(strategy.preset, mesh)
    sharded.validate(config, mesh, rules, batch)
    state, data, step = abstract_train_inputs(config, mesh, rules, batch, seq, microbatches)
    out = {"params": shard_bytes(state.params), "optimizer": shard_bytes(state.opt_state),
           "routing": shard_bytes(state.routing), "fits": True, "error": ""}
    t1 = time.perf_counter()
    with gpu_targets.answering_for(devices):     # compile-only GPUs: JAX's local-GPU queries
        lowered = step.lower(state, data)
    t2 = time.perf_counter()
    out["lower_s"] = t2 - t1
    out["setup_s"] = t1 - t0
    try:
        compiled, assignment, live_range = buffers.compile_with_assignment(lowered)
    except Exception as e:          # noqa: BLE001 — the compiler's OOM is a result, not a failure
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        out["compile_s"] = time.perf_counter() - t2
        oom = parse_oom(msg)
        args = out["params"] + out["optimizer"] + out["routing"] + shard_bytes(data)
        out.update(fits=False, error=msg.splitlines()[0][:300], arguments=args,
                   temp=oom.get("temp", float("nan")),
                   total=oom.get("total", args + oom.get("temp", float("nan"))),
                   available=oom.get("available"))
        return out
    out["compile_s"] = time.perf_counter() - t2
    m = compiled.memory_analysis()
    out.update(arguments=float(m.argument_size_in_bytes), output=float(m.output_size_in_bytes),
               alias=float(m.alias_size_in_bytes), temp=float(m.temp_size_in_bytes),
               code=float(m.generated_code_size_in_bytes),
               host_temp=float(getattr(m, "host_temp_size_in_bytes", 0) or 0))
    peak = float(getattr(m, "peak_memory_in_bytes", 0) or 0)
    out["peak"] = peak
    # Only the TPU compiler's peak is the device's. XLA:CPU's leaves out the temporaries.
    # XLA:GPU's is a live-range count, while the step allocates each temporary allocation whole:
    # the heap and, beside it, the collective memory (V3 under EP: 6.6 GiB that the peak left
    # out, BENCHMARKS.md).
    platform = getattr(devices[0], "platform", "cpu")
    out["gpu_collective"] = float(buffers.gpu_collective_memory(assignment)
                                  if platform == "gpu" else 0)
    out["total"] = peak if (platform == "tpu" and peak) else float(buffers.allocated_bytes(m))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_flops"] = float(cost.get("flops", float("nan"))) if cost else float("nan")
    text = compiled.as_text()
    out["buffers"] = [dataclasses.asdict(b) for b in buffers.largest_buffers(assignment, text)]
    at_peak, out["peak_live"] = buffers.peak_buffers(live_range, assignment, text)
    out["peak_buffers"] = [dataclasses.asdict(b) for b in at_peak]
    stats = hlo.collective_stats(text)
    out["collectives"] = stats
    out["unknown_loops"] = stats.unknown_loops
    if keep_hlo:
        out["hlo"] = text
    return out
