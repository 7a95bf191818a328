"""Will this run fit? The planner's verdict for one pretraining run config, before a pod runs it.

  v = verdict(run_config, target="tpu-v5p-1024")           # ahead of time, from any host
  v = verdict(run_config, devices=jax.devices())            # on the pod itself (the preflight)
  v["fits"], v["total"], v["limit"], v["detail"]

The run config (`deepseek_jax/configs/pretrain.py`, with the same overrides the trainer gets)
says everything the step's memory depends on: the model and its numerics (remat, dtypes, fp8),
the preset and mesh sizes, the global batch, the sequence length and the gradient-accumulation
micro-batches. From them this compiles the exact train step the trainer runs
(`tools.compile.compile_strategy`, shapes only, nothing allocated) and compares the compiler's
per-chip total with the chip's memory:

  target    compile-only devices of a named TPU slice or H100/H200 nodes (`tools.targets`;
            GPUs where JAX's CUDA plugin is on the path), limit = the chip's HBM from the
            planner's chip table; a target without compile-only devices here gets the
            analytic estimate (`tools.cost_model`), said so in `detail`
  devices   this machine's devices (the pod, in the launchers' `doctor`), limit = the
            device's own `memory_stats()["bytes_limit"]` where the runtime reports one (TPU,
            GPU); CPU reports none, and the row then only gives the total

`analytic=True` skips the compile (seconds instead of minutes for a 671B step; the analytic
model has been within ~25 % of the compiler here, see BENCHMARKS.md, so a refusal from it is a
warning rather than proof).

Left out: the evaluation step and the data pipeline's host memory; checkpoint restore peaks.
"""

from __future__ import annotations

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.train.run import scheduled

GiB = 2.0 ** 30


def run_shape(run_config) -> tuple[ModelConfig, int, int, int]:
    """(model config, global batch, sequence length, micro-batches) of a pretraining run
    config, as its trainer reads them."""
    from deepseek_jax.configs.pretrain import to_model_config
    return (to_model_config(run_config.model), int(run_config.data.global_batch),
            int(run_config.data.seq_len), int(run_config.train.get("microbatches", 1)))


def run_strategy(mesh_section, n_devices: int, n_slices: int = 1):
    """The `tools.compile.Strategy` the trainer builds from a run config's `mesh` section on
    `n_devices` (`parallel.run_mesh_config`: all sizes 0 = the preset's default mesh)."""
    from deepseek_jax.tools.compile import Strategy
    sizes = parallel.run_mesh_config(mesh_section, n_devices, n_slices)
    return Strategy.make(mesh_section.preset,
                         parallel.resolve_mesh_shape(sizes, n_devices, n_slices))


def verdict(run_config, *, target: str | None = None, devices=None,
            analytic: bool = False) -> dict:
    """{"fits": bool | None (None: no limit known), "total", "limit" (bytes per chip),
    "strategy", "source", "detail"} for `run_config` on `target` or on `devices`.

    Raises `parallel.MeshError` when the mesh or batch cannot be laid out on them (the message
    names the field to change) and `tools.targets.TargetError` for a bad target name."""
    from deepseek_jax.tools import cost_model
    from deepseek_jax.tools.compile import compile_strategy
    from deepseek_jax.tools.targets import parse_target
    if (target is None) == (devices is None):
        raise ValueError("give a target name or the devices, not both")
    config, batch, seq, micro = run_shape(run_config)
    tgt = parse_target(target) if target else None
    if tgt is not None:
        n, slices, limit = tgt.n_devices, tgt.n_slices, tgt.chip.hbm_bytes
    else:
        n = len(devices)
        slices = len({getattr(d, "slice_index", 0) for d in devices})
        stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
        limit = float((stats or {}).get("bytes_limit", 0)) or None
    strategy = run_strategy(run_config.mesh, n, slices)
    config = scheduled(config, strategy.mesh, run_config.mesh)     # as the trainer sets it
    on_target_devices = (tgt.devices() if tgt is not None and tgt.compile_on in ("tpu", "gpu")
                         else None)
    if analytic or (tgt is not None and on_target_devices is None):
        if tgt is None:
            raise ValueError("the analytic estimate needs a target (its chip's bandwidths)")
        est = cost_model.estimate(config, strategy.mesh, strategy.preset, batch, seq, tgt)
        total, source = est.memory_total, "analytic"
    else:
        result = compile_strategy(config, strategy, on_target_devices or devices, batch, seq,
                                  microbatches=micro)
        total, source = result["total"], "compiled"
        if not result["fits"]:                   # the compiler's own out-of-memory verdict
            return _result(False, total, limit, strategy, source, batch, seq, micro)
    fits = None if limit is None else total <= limit
    return _result(fits, total, limit, strategy, source, batch, seq, micro)


def _result(fits, total, limit, strategy, source, batch, seq, micro) -> dict:
    where = f"of {limit / GiB:.2f} GiB" if limit else "(no memory limit reported here)"
    verdict_word = {True: "fits", False: "DOES NOT FIT", None: "needs"}[fits]
    detail = (f"{strategy.label}, batch {batch} × {seq}"
              + (f" in {micro} micro-batches" if micro > 1 else "")
              + f": {verdict_word} {total / GiB:.2f} GiB per chip {where} ({source})")
    if fits is False:
        detail += ("; lower data.global_batch, raise train.microbatches, use remat "
                   "(model.remat_policy=full, or custom:layer_input=offload to move the "
                   "layer inputs to host memory) or another mesh (python -m "
                   "deepseek_jax.tools.plan lists what fits)")
    return {"fits": fits, "total": total, "limit": limit, "strategy": strategy.label,
            "source": source, "detail": detail}
