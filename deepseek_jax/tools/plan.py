"""Sharding planner: does this model fit on that pod with this strategy, and which is fastest?

  python -m deepseek_jax.tools.plan --model=v3-671b --target=tpu-v5p-1024 \\
      --batch=512 --seq=4096 --strategies=all --out=plan_v3

For each strategy it compiles the real sharded train step (ahead of time for TPU topologies,
with libtpu and no TPU; for H100/H200 nodes with JAX's CUDA plugin and no GPU; on fake CPU
devices for cpu-N) and reports per chip: memory (parameters,
optimizer state, activations and temporaries, total against HBM), FLOPs, collectives by type
with their bytes (parsed from the compiled HLO), and a step-time estimate from the hardware
table (compute against communication, MFU), with the largest buffers and what is live at the
memory peak. Strategies are ranked (fitting ones first, then by
estimated step time), printed as a table and written to OUT/plan.md, plan.csv and plan.png.

  --model        a name from `deepseek_jax.config` (tiny, small, v2-lite, moonlight, v3-671b)
                 or the path of a Hugging Face config.json
  --target       tpu-v5p-1024, tpu-v5e-256, tpu-v6e-64, tpu7x-256, 2xtpu-v5p-512, gpu-h100-64,
                 cpu-8, ... (`targets.py`); on TPU7x, whose chips are two JAX devices each,
                 every per-chip figure is per device
  --microbatches the step accumulates the batch over this many micro-batches
  --strategies   all | a comma list of presets (fsdp, fsdp_ep, ...), presets with axis sizes
                 (fsdp_ep:expert=8), or bare mesh shapes (data=2:fsdp=4, preset inferred).
                 `all` enumerates valid meshes, scores them with the analytic model
                 (`cost_model.py`) and compiles the best --top_k.
  --remat, --dtype, --param_dtype   model numerics (defaults: full remat, bf16 compute for
                 models of a billion parameters or more, the config's values otherwise);
                 --remat takes any `model.remat_policy`, e.g. custom:layer_input=offload
                 (the row's note then says how many bytes per chip go to host memory), and
                 may be repeated: every strategy is then planned under each policy
  --set FIELD=VALUE  any other ModelConfig field (repeatable), e.g. --set=moe_capacity_factor=1.25
  --analytic_only  no compiles (GPU targets are analytic where JAX's CUDA plugin is missing,
                 and for GPUs other than H100/H200: `gpu_targets.py`)
  --isolate      compile each strategy in a child process (default for TPU and GPU), which also
                 measures its peak host memory

`all` includes context parallelism (fsdp_cp, fsdp_ep_cp) only when the batch has fewer sequences
than a slice has devices, the case where sequences must be split; name it to compare otherwise.

Pipeline strategies (fsdp_pp, fsdp_ep_pp, or stage=N in a mesh shape) run the model with
pipeline_stages = the mesh's stage size and the config's pipeline_microbatches (default twice
the stages; --set=pipeline_microbatches=J); `all` enumerates the stage sizes that divide a
layer stack.

Left out: searching for the largest batch or micro-batch count that fits (pass them explicitly
and compare runs).
"""

from __future__ import annotations

import os
import sys

# Before JAX starts: the planner only compiles, so it runs on the CPU backend (TPU topologies
# come from libtpu's compile-only API, which needs no TPU, GPU ones from the CUDA plugin, which
# needs no GPU and skips its checks of a local CUDA install only then); it must not take the TPU lock another
# process on this host may hold (libtpu's ALLOW_MULTIPLE_LIBTPU_LOAD); and for cpu-N the fake
# device count must be set.
if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    _target_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--target=")), "")
    _n = _target_arg.split("-", 1)[1] if _target_arg.startswith("cpu-") else ""
    if _n.isdigit() and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                                      ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={_n}").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from deepseek_jax import parallel  # noqa: E402
from deepseek_jax.config import ConfigError, ModelConfig, get_config  # noqa: E402
from deepseek_jax.parallel.mesh import (ICI_AXES, MESH_AXES, split_dimensions,  # noqa: E402
                                        torus_layout)
from deepseek_jax.parallel.rules import PRESETS  # noqa: E402
from deepseek_jax.tools import cost_model, hlo, report  # noqa: E402
from deepseek_jax.tools.compile import Strategy  # noqa: E402
from deepseek_jax.tools.hlo import Collective, CollectiveStats  # noqa: E402
from deepseek_jax.train.run import scheduled  # noqa: E402
from deepseek_jax.tools.targets import Target, TargetError, parse_target  # noqa: E402
from deepseek_jax.train import workdir as run_dir  # noqa: E402

GiB = 2 ** 30


class PlanError(ValueError):
    """A planner request that cannot be served; the message says what to change."""


# --- model ------------------------------------------------------------------------------------

def load_model(model, remat: str | None = None, dtype: str | None = None,
               param_dtype: str | None = None, overrides: dict | None = None) -> ModelConfig:
    """A config by name, HF config.json path or ModelConfig, with the planner's numerics applied:
    models of a billion parameters or more default to full remat and bf16 compute (as the
    pretraining configs run them); `overrides` sets any other ModelConfig field."""
    if isinstance(model, ModelConfig):
        config = model
    elif model.endswith(".json") or os.path.isdir(model):
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        with open(path) as f:
            config = ModelConfig.from_hf(json.load(f))
    else:
        config = get_config(model)
    from deepseek_jax.model.params import count_params
    big = count_params(config)["total"] >= 1e9
    changes = {"remat_policy": remat or ("full" if big else config.remat_policy)}
    if dtype or big:
        changes["dtype"] = jnp.dtype(dtype or "bfloat16").type
    if param_dtype:
        changes["param_dtype"] = jnp.dtype(param_dtype).type
    for field, value in (overrides or {}).items():
        if not hasattr(config, field):
            raise PlanError(f"--set {field}=...: ModelConfig has no field {field!r}")
        current = getattr(config, field)
        if isinstance(current, bool):
            value = str(value).lower() in ("1", "true", "yes")
        elif isinstance(current, (int, float, str)):
            value = type(current)(value)
        elif isinstance(current, tuple):                  # e.g. adapter_targets=attention,mlp
            value = tuple(v for v in str(value).split(",") if v)
        else:
            value = jnp.dtype(value).type
        changes[field] = value
    return config.replace(**changes)


def _model_label(model) -> str:
    return model if isinstance(model, str) else "custom config"


# --- strategies -------------------------------------------------------------------------------

def _resolve(preset: str, given: dict[str, int], target: Target) -> Strategy:
    p = parallel.get_preset(preset)
    if given:
        cfg = {p.fill: -1, **given} if p.fill not in given else dict(given)
    else:
        cfg = parallel.default_mesh_config(preset, target.devices_per_slice)
    cfg.setdefault("dcn_data", target.n_slices)
    sizes = parallel.resolve_mesh_shape(cfg, target.n_devices, target.n_slices)
    return Strategy.make(preset, sizes)


def _infer_preset(given: dict[str, int]) -> str:
    used = {a for a, n in given.items() if n > 1 and a in ICI_AXES}
    fits = [p for p in PRESETS.values() if used <= set(p.axes)]
    if not fits:
        raise PlanError(f"no preset uses the mesh axes {sorted(used)}; presets: "
                        + ", ".join(f"{p.name} {p.axes}" for p in PRESETS.values()))
    return min(fits, key=lambda p: len(p.axes)).name


def parse_strategies(spec: str, target: Target) -> list[Strategy]:
    """'fsdp,fsdp_ep:expert=8,data=2:fsdp=4' → Strategies (see the module docstring)."""
    out = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        parts = token.split(":")
        preset = parts[0] if "=" not in parts[0] else None
        given = {}
        for part in parts[1 if preset else 0:]:
            axis, _, value = part.partition("=")
            if axis not in MESH_AXES or not value.lstrip("-").isdigit():
                raise PlanError(f"strategy {token!r}: {part!r} is not AXIS=SIZE with AXIS one of "
                                f"{', '.join(MESH_AXES)}")
            given[axis] = int(value)
        out.append(_resolve(preset or _infer_preset(given), given, target))
    return out


def _powers_of_two(limit: int) -> list[int]:
    return [2 ** k for k in range(1, int(math.log2(max(limit, 1))) + 1)]


def config_for(config: ModelConfig, strategy: Strategy) -> ModelConfig:
    """The model as `strategy` runs it, set as the trainers set it (`train.run.scheduled`):
    pipeline_stages from its mesh (whatever the config asked), the config's micro-batches.
    Raises MeshError (a ConfigError) when no stack splits that way."""
    return scheduled(config.replace(pipeline_stages=1), strategy.mesh, {})


def shard_problem(config: ModelConfig, strategy: Strategy, batch: int) -> str | None:
    """Why the strategy cannot shard the model or batch evenly (None if it can); no devices."""
    sizes = strategy.mesh
    rules = cost_model.rules_for(strategy.preset, sizes)
    k = math.prod(sizes[a] for a in parallel.batch_axes(rules))
    if batch % k:
        return f"batch {batch} does not split over {k} batch shards"
    try:
        config = config_for(config, strategy)
    except ConfigError as e:
        return str(e)
    inner = k // config.pipeline_stages           # the batch shards of one stage group
    if config.pipeline_stages > 1 and batch % (config.n_microbatches * inner):
        return (f"batch {batch} does not split into pipeline_microbatches="
                f"{config.n_microbatches} of {inner} batch shards each "
                "(--set=pipeline_microbatches)")
    for name, size in (("heads", config.n_heads), ("expert", config.n_routed_experts or 1),
                       ("mlp", math.gcd(config.d_ff, config.moe_d_ff or config.d_ff)),
                       ("vocab", config.vocab_size), ("embed", config.d_model),
                       ("q_lora", config.q_lora_rank or config.d_model),
                       ("kv_lora", config.kv_lora_rank)):
        spec = parallel.rules.mesh_axes_of((name,), rules)[0]
        axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
        n = math.prod(sizes[a] for a in axes)
        if size % n:
            return f"{name} size {size} does not split over {'×'.join(axes)}={n}"
    return None


def enumerate_strategies(config: ModelConfig, target: Target, batch: int,
                         seq: int | None = None) -> list[Strategy]:
    """Every preset with power-of-two sizes on its non-fill axes that shards evenly (data=1 in
    the presets that fill fsdp: data parallelism inside a slice only adds replicas). Context
    parallelism only when the batch has fewer sequences than a slice has devices (given `seq`):
    then the sequences must be split too, with context sizes that cut `seq` into whole zigzag
    chunks (2 × context). Otherwise it is planned when named."""
    n = target.devices_per_slice
    options = {"tensor": [1] + [t for t in _powers_of_two(min(n, 16)) if config.n_heads % t == 0],
               "expert": [1] + [e for e in _powers_of_two(min(n, config.n_routed_experts or 1))
                                if config.n_routed_experts % e == 0]}
    if seq and batch < n:
        options["context"] = [1] + [c for c in _powers_of_two(n) if seq % (2 * c) == 0]
    options["stage"] = [1] + [s for s in _powers_of_two(min(n, 16))
                              if any(m % s == 0 for m in config.layer_stacks.values())]
    seen, out = set(), []
    for p in PRESETS.values():
        free = [a for a in p.axes if a != p.fill and a in options]
        combos = [{}]
        for axis in free:
            combos = [{**c, axis: v} for c in combos for v in options[axis]]
        for combo in combos:
            if n % math.prod(combo.values() or [1]):
                continue
            try:
                s = _resolve(p.name, {**combo, p.fill: -1}, target)
            except parallel.MeshError:
                continue
            if s in seen:
                continue
            # Keep a strategy under the smallest preset that expresses it.
            used = {a for a, v in s.mesh.items() if v > 1 and a in ICI_AXES}
            if _infer_preset({a: 2 for a in used}) != p.name:
                continue
            if shard_problem(config, s, batch):
                continue
            seen.add(s)
            out.append(s)
    return out


def layout_note(strategy: Strategy, devices, target: Target) -> str:
    """What the strategy's mesh looks like on the target's torus, when a mesh axis shares a
    torus dimension with another ('' when every axis lies on whole dimensions, or the devices
    have no coordinates). Builds the mesh the compile will use; raises `MeshError` if it
    cannot be built."""
    mesh = parallel.make_mesh(strategy.mesh, devices)
    layout = torus_layout(mesh)
    if not layout:
        return ""
    parts = []
    for d, axes in split_dimensions(layout, target.slice_shape).items():
        shares = " × ".join(f"{a} {layout[a][d]}" for a in axes)
        parts.append(f"torus dim {'xyz'[d] if d < 3 else d} ({target.slice_shape[d]}) split "
                     f"as {shares}")
    if not parts:
        return ""
    return ("; ".join(parts) + ": those axes run on lines without the wrap-around link "
            "(mesh_utils allow_split_physical_axes)")


def _tpu_devices(target: Target) -> list | None:
    """The target's compile-only TPU devices, or None (not a TPU target, or no libtpu)."""
    if target.compile_on != "tpu":
        return None
    try:
        return target.devices()
    except TargetError:
        return None


# --- one row of the table ---------------------------------------------------------------------

def _stats_to_json(stats: CollectiveStats) -> dict:
    return {"collectives": [dataclasses.asdict(c) for c in stats.collectives],
            "unknown_loops": stats.unknown_loops}


def _stats_from_json(d: dict) -> CollectiveStats:
    return CollectiveStats([Collective(**c) for c in d["collectives"]], d["unknown_loops"])


def compile_in_process(config: ModelConfig, strategy: Strategy, target: Target, batch: int,
                       seq: int, microbatches: int = 1) -> dict:
    """One compile in this process; a compiler error becomes {"fits": None, "error": ...}."""
    from deepseek_jax.tools.compile import compile_strategy
    try:
        result = compile_strategy(config, strategy, target.devices(), batch, seq,
                                  microbatches=microbatches)
    except (parallel.MeshError, TargetError):
        raise
    except Exception as e:          # noqa: BLE001 — a failed compile is a row, not a crash
        first = (str(e).strip().splitlines() or [""])[0]
        return {"fits": None, "error": f"{type(e).__name__}: {first[:300]}"}
    if "collectives" in result:
        result["collectives"] = _stats_to_json(result["collectives"])
    return result


def compile_isolated(args_json: dict, timeout_s: float = 900.0) -> dict:
    """Runs one compile in a child process; adds its wall time and peak host RSS. A compile that
    outlives `timeout_s` is stopped and reported as such."""
    cmd = [sys.executable, "-m", "deepseek_jax.tools.plan", "--worker", json.dumps(args_json),
           f"--target={args_json['target']}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda: chunks["out"].append(proc.stdout.read())),
               threading.Thread(target=lambda: chunks["err"].append(proc.stderr.read()))]
    timer = threading.Timer(timeout_s, proc.kill)
    for t in (*readers, timer):
        t.start()
    # os.wait4 gives this child's own peak RSS (getrusage(RUSAGE_CHILDREN) is a max over all).
    _, status, usage = os.wait4(proc.pid, 0)
    timed_out = not timer.is_alive()
    timer.cancel()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = "".join(chunks["out"]), "".join(chunks["err"])
    wall = time.perf_counter() - t0
    rss = usage.ru_maxrss * 1024.0            # Linux reports KiB
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if timed_out:
        return {"fits": None, "error": f"compile did not finish in {timeout_s:.0f} s "
                f"(--compile_timeout)", "process_s": wall, "host_rss": rss,
                "compile_s": wall}
    if proc.returncode or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-3:])
        return {"fits": None, "error": f"compile failed (exit {proc.returncode}): {tail}",
                "process_s": wall, "host_rss": rss}
    result = json.loads(lines[-1])
    result.update(process_s=wall, host_rss=rss)
    return result


def build_row(config: ModelConfig, strategy: Strategy, target: Target, batch: int, seq: int,
              compiled: dict | None, microbatches: int = 1) -> dict:
    """Analytic estimate merged with the compile's measurements into one table row."""
    est = cost_model.estimate(config, strategy.mesh, strategy.preset, batch, seq, target,
                              microbatches)
    hbm = target.chip.hbm_bytes
    row = {"strategy": strategy.label, "preset": strategy.preset, "mesh": strategy.mesh,
           "source": "analytic", "params": est.params, "optimizer": est.optimizer,
           "act_temp": est.gradients + est.activations, "total": est.memory_total,
           "analytic_total": est.memory_total, "hbm": hbm,
           "fits": est.memory_total <= hbm, "model_tflops": est.model_flops / 1e12,
           "xla_tflops": float("nan"), "comm": dict(est.comm_bytes),
           "analytic_comm": dict(est.comm_bytes), "compute_s": est.compute_time,
           "comm_s": est.comm_time_total, "step_s": est.step_time, "mfu": est.mfu,
           "compile_s": float("nan"), "host_rss": float("nan"), "note": ""}
    if target.compile_on is None:
        row["note"] = "analytic only (no compile-only devices for this target here)"
    if not compiled:
        return row
    row["compile_s"] = compiled.get("compile_s", float("nan")) + compiled.get("lower_s", 0.0)
    row["host_rss"] = compiled.get("host_rss", float("nan"))
    if compiled.get("fits") is None:
        # Nothing was measured: the row keeps the analytic numbers for reference, says that the
        # compile failed, and ranks after every row that compiled or was only estimated.
        row.update(source="compile failed", fits=None, mfu=float("nan"),
                   note="compile failed, analytic numbers shown: "
                        + compiled.get("error", "no error message"))
        return row
    row["source"] = f"compiled ({target.compile_on})"
    fixed = compiled["params"] + compiled["optimizer"] + compiled.get("routing", 0.0)
    row.update(params=compiled["params"], optimizer=compiled["optimizer"],
               total=compiled["total"], act_temp=compiled["total"] - fixed)
    row["fits"] = bool(compiled["fits"]) and compiled["total"] <= hbm
    if not compiled["fits"]:
        row["note"] = ("compiler: out of HBM (" + compiled.get("error", "")[-120:]
                       + "); collectives and times are analytic")
        return row
    row["buffers"] = compiled.get("buffers", [])
    row["peak_buffers"] = compiled.get("peak_buffers", [])
    row["peak_live"] = compiled.get("peak_live", 0)
    row["host_temp"] = compiled.get("host_temp", 0.0)
    row["xla_tflops"] = compiled.get("xla_flops", float("nan")) / 1e12
    stats = _stats_from_json(compiled["collectives"])
    # A balanced step: the loops of unknown trip count (the expert-parallel overflow rounds,
    # which run only when routing overflows the receive buffer) are left out.
    row["comm"] = {k: float(v) for k, v in stats.bytes_by_role(skip_unknown_loops=True).items()}
    ran = [c for c in stats.collectives if not c.in_unknown_loop]
    overlap, exposed, _ = cost_model.hlo_comm_time(ran, strategy.mesh, target)
    row["comm_s"] = overlap + exposed
    row["step_s"] = max(est.compute_time, overlap) + exposed
    row["mfu"] = est.model_flops / (row["step_s"] * est.peak_flops) if row["step_s"] else 0.0
    notes = [comm_mismatch(row["comm"], row["analytic_comm"])]
    if compiled.get("gpu_collective"):
        notes.append(f"total includes {compiled['gpu_collective'] / GiB:.2f} GiB of XLA:GPU "
                     "collective memory (the all-to-all buffers)")
    if row["host_temp"]:
        notes.append(f"{row['host_temp'] / GiB:.2f} GiB of activations offloaded to host "
                     "memory per chip (not in total)")
    if stats.unknown_loops:
        notes.append(f"{len(stats.unknown_loops)} loop(s) with unknown trip count (overflow "
                     "rounds) left out of the collectives: a balanced step")
    row["note"] = "; ".join(n for n in notes if n)
    return row


_COMM_GROUPS = (("all-gather", ("all-gather",)),
                ("gradient reductions (RS + AR)", ("reduce-scatter", "all-reduce")),
                ("all-to-all", ("all-to-all", "ragged-all-to-all")),
                ("other permutes", ("collective-permute",)))


def comm_mismatch(hlo_comm: dict[str, float], analytic: dict[str, float],
                  band: float = 1.2) -> str:
    """'' when the compiled collective bytes are within `band`× of the analytic model, else a
    note naming each group outside it with both numbers. Reduce-scatters and all-reduces are
    compared together: which of the two reduces a gradient is the compiler's choice (XLA:CPU
    all-reduces FSDP gradients); the model counts both as gradient traffic."""
    out = []
    for label, kinds in _COMM_GROUPS:
        h = sum(hlo_comm.get(k, 0.0) for k in kinds)
        a = sum(analytic.get(k, 0.0) for k in kinds)
        if h < 1024 and a < 1024:           # scalars (loss, metrics): not a strategy's traffic
            continue
        if not a or not 1 / band <= h / a <= band:
            ratio = f"{h / a:.2f}×" if a else "not in the model"
            out.append(f"{label} {hlo.format_bytes(h)} vs {hlo.format_bytes(a)} ({ratio})")
    if not out:
        return ""
    return f"collectives off the analytic model by more than {band}×: " + ", ".join(out)


def rank(rows: list[dict]) -> list[dict]:
    """Fitting strategies first (compiled before analytic-only), then by estimated step time;
    strategies that do not fit follow, smallest memory first; failed compiles come last."""
    def key(r):
        if r["fits"] is None:
            return (2, 0, r["total"])
        compiled = r["source"].startswith("compiled")
        return (0 if r["fits"] else 1, 0 if compiled or not r["fits"] else 1,
                r["step_s"] if r["fits"] else r["total"])
    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


# --- the command ------------------------------------------------------------------------------

def plan(model: str, target_name: str, batch: int, seq: int, strategies: str = "all",
         top_k: int = 6, analytic_only: bool = False, isolate: bool | None = None,
         remat: str | list[str] | None = None, dtype: str | None = None,
         param_dtype: str | None = None, compile_timeout: float = 900.0,
         overrides: dict | None = None, log=print,
         microbatches: int = 1) -> tuple[dict, list[dict]]:
    """Plans `strategies` for `model` (name, config.json path or ModelConfig) on `target_name`;
    returns (header, ranked rows). `remat` may list several policies: each strategy is then
    planned under each, one row per pair, labelled with its policy."""
    target = parse_target(target_name)
    policies = (list(remat) if isinstance(remat, (list, tuple)) else [remat]) or [None]
    configs = [load_model(model, r, dtype, param_dtype, overrides) for r in policies]
    if microbatches < 1 or batch % microbatches:
        raise PlanError(f"--microbatches={microbatches} must be >= 1 and divide the batch {batch}")
    rows = []
    for config in configs:
        found = _plan_config(config, model, target, target_name, batch, seq, strategies, top_k,
                             analytic_only, isolate, compile_timeout, log, microbatches)
        for row in found:
            row["remat"] = config.remat_policy
            if len(configs) > 1:
                row["strategy"] += f" remat={config.remat_policy}"
        rows += found
    config = configs[0]
    from deepseek_jax.model.params import count_params
    n = count_params(config)
    header = {"model": _model_label(model), "target": target.describe(), "batch": batch, "seq": seq,
              "params_b": n["total"] / 1e9, "mtp_b": n["mtp"] / 1e9,
              "remat": " | ".join(c.remat_policy for c in configs),
              "dtype": jnp.dtype(config.dtype).name,
              "param_dtype": jnp.dtype(config.param_dtype).name,
              "hbm_gib": target.chip.hbm_bytes / GiB, "peak_tflops": target.chip.peak_flops / 1e12,
              "unit": "device" if target.n_devices != target.n_chips else "chip",
              "microbatches": microbatches,
              "analytic_only": analytic_only or target.compile_on is None}
    return header, rank(rows)


def _plan_config(config, model, target, target_name, batch, seq, strategies, top_k,
                 analytic_only, isolate, compile_timeout, log, microbatches) -> list[dict]:
    """The rows of `plan` for one model config (one remat policy), unranked."""
    if strategies.strip() == "all":
        candidates = enumerate_strategies(config, target, batch // microbatches, seq)
        if not candidates:
            raise PlanError(f"no strategy shards {model} with batch {batch} on {target.name}; "
                            "try a batch that is a multiple of the chip count")
        scored = rank([build_row(config_for(config, s), s, target, batch, seq, None,
                                 microbatches) for s in candidates])
        by_label = {s.label: s for s in candidates}
        chosen = [by_label[r["strategy"]] for r in scored[:top_k]]
        log(f"{len(candidates)} valid meshes; compiling the analytic top {len(chosen)}")
    else:
        chosen = parse_strategies(strategies, target)
        for s in chosen:
            problem = shard_problem(config, s, batch // microbatches)
            if problem:
                raise PlanError(f"strategy {s.label}: {problem}")
        candidates = chosen
    compile_it = not analytic_only and target.compile_on is not None
    if isolate is None:
        isolate = target.compile_on in ("tpu", "gpu")
    devices = _tpu_devices(target)
    rows = []
    for s in candidates:
        layout = layout_note(s, devices, target) if devices else ""
        compiled = None
        config_s = config_for(config, s)
        if compile_it and s in chosen:
            log(f"compiling {s.label} for {target.name} ...")
            if isolate:
                compiled = compile_isolated({"config": config_s.to_dict(), "target": target_name,
                                             "batch": batch, "seq": seq, "preset": s.preset,
                                             "mesh": s.mesh, "microbatches": microbatches},
                                            compile_timeout)
            else:
                t0 = time.perf_counter()
                compiled = compile_in_process(config_s, s, target, batch, seq, microbatches)
                compiled["process_s"] = time.perf_counter() - t0
        row = build_row(config_s, s, target, batch, seq, compiled, microbatches)
        row["note"] = "; ".join(n for n in (layout, row["note"]) if n)
        rows.append(row)
    return rows


def _worker(request: str) -> None:
    """Child-process entry of --isolate: compile one strategy, print its result as JSON."""
    r = json.loads(request)
    config = ModelConfig.from_dict(r["config"])
    target = parse_target(r["target"])
    strategy = Strategy.make(r["preset"], r["mesh"])
    result = compile_in_process(config, strategy, target, r["batch"], r["seq"],
                                r.get("microbatches", 1))
    print(json.dumps(result, default=float), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepseek_jax.tools.plan",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="v3-671b")
    ap.add_argument("--target", default="tpu-v5p-1024")
    ap.add_argument("--batch", type=int, default=None,
                    help="global batch (default 1 per device: per chip, or per TPU7x TensorCore)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--microbatches", type=int, default=1,
                    help="accumulate the batch over this many micro-batches "
                         "(the run config's train.microbatches)")
    ap.add_argument("--strategies", default="all")
    ap.add_argument("--top_k", type=int, default=6)
    ap.add_argument("--remat", action="append", default=None,
                    help="model.remat_policy; repeat to compare policies (one row each)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--param_dtype", default=None)
    ap.add_argument("--analytic_only", action="store_true")
    ap.add_argument("--isolate", dest="isolate", action="store_true", default=None)
    ap.add_argument("--no_isolate", dest="isolate", action="store_false")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a ModelConfig field, e.g. --set=moe_capacity_factor=1.25")
    ap.add_argument("--compile_timeout", type=float, default=900.0,
                    help="seconds one isolated compile may take")
    ap.add_argument("--out", default="", help="folder for plan.md, plan.csv, plan.png")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    try:
        # Resolved and checked once, at start-up: a bad --out fails now, not after the compiles.
        out_dir = run_dir.resolve(args.out)
        if out_dir:
            run_dir.check_writable(out_dir, "--out")
        overrides = dict(item.split("=", 1) for item in args.set)
        batch = args.batch or parse_target(args.target).n_devices
        header, rows = plan(args.model, args.target, batch, args.seq, args.strategies,
                            args.top_k, args.analytic_only, args.isolate, args.remat, args.dtype,
                            args.param_dtype, args.compile_timeout, overrides,
                            log=lambda m: print(m, file=sys.stderr, flush=True),
                            microbatches=args.microbatches)
    except (PlanError, TargetError, ConfigError, parallel.MeshError, run_dir.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text_table(header, rows))
    if out_dir:
        paths = report.write_all(header, rows, out_dir)
        print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
