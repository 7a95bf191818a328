"""Preflight for a pod, run on every host before training (the launchers' `doctor`), and the
planner's verdict on a run before a pod is allocated:

    python -m experiments.doctor --workdir=DIR [--devices=N] [--distributed=true|false] \
        [--config=experiments/configs/pretrain.py:NAME [--config.FIELD=VALUE ...]]
    python -m experiments.doctor --target=tpu-v5p-1024 \
        --config=experiments/configs/pretrain.py:NAME [--config.FIELD=VALUE ...] [--analytic]

Prints one table per process and exits 0 when every check passes, 1 otherwise:

  versions     Python, jax, jaxlib, libtpu (if installed), orbax-checkpoint, flax
  distributed  `jax.distributed` started as the trainers start it (`parallel.
               maybe_initialize_distributed`): the coordinator was reached, and how many
               processes joined; the preemption service is on (multi-process preemption)
  devices      platform, devices here and in all, slices (`device.slice_index`, as the mesh
               tells slices apart); with --devices=N, the total must be N
  collective   one all-reduce over every device of every process gives the device count
  workdir      DIR (shared run storage) can be created and written, and a directory renamed
               there (how Orbax commits a checkpoint; gcsfuse needs --rename-dir-limit)
  fit          with --config: the run's train step (the same model, mesh, batch, sequence and
               micro-batches the trainer builds from that config and its overrides), compiled
               ahead of time for these devices; it fails when the compiler's per-chip total
               exceeds the device's memory (`deepseek_jax.tools.fit`)

With --target (no pod needed: compile-only TPU devices from libtpu, on any host) only
`versions` and `fit` run, for the named slice; the launchers run this before they create a pod
and refuse a run that does not fit. --analytic uses the planner's analytic estimate instead of
compiling (seconds instead of minutes for a 671B step; approximate).

Left out: network tuning (sysctls, NUMA), stale processes holding the TPU, free disk space.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from absl import app, flags
from ml_collections import config_flags

def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _versions_row() -> tuple:
    return ("versions", True, f"python {platform.python_version()} jax {_version('jax')} "
            f"jaxlib {_version('jaxlib')} libtpu {_version('libtpu')} "
            f"orbax {_version('orbax-checkpoint')} flax {_version('flax')}")


def fit_row(run_config, target: str | None = None, analytic: bool = False) -> tuple:
    """("fit", ok, detail) for `run_config` on `target` or on this machine's devices."""
    import jax
    from deepseek_jax import parallel
    from deepseek_jax.tools import fit
    from deepseek_jax.tools.targets import TargetError
    try:
        v = fit.verdict(run_config, target=target, analytic=analytic,
                        devices=None if target else jax.devices())
    except (parallel.MeshError, TargetError, ValueError) as e:
        return ("fit", False, f"{type(e).__name__}: {e}")
    return ("fit", v["fits"] is not False, v["detail"])


def checks(workdir: str, devices: int = 0, distributed: bool | None = None) -> list[tuple]:
    """[(check, ok, detail)] in the order of the module docstring. Starts JAX (and
    jax.distributed when asked or detected), so call it at most once per process."""
    import jax
    import numpy as np

    from deepseek_jax import parallel
    from deepseek_jax.train import workdir as run_dir

    rows = [_versions_row()]
    launcher = parallel.multi_process_launch() if distributed is None else distributed
    try:
        started = parallel.maybe_initialize_distributed(distributed)
    except Exception as e:            # noqa: BLE001 — reported, not raised: the table is the point
        return rows + [("distributed", False, f"jax.distributed.initialize() failed "
                        f"({launcher or 'forced'}): {e}")]
    preemption = bool(jax.config.jax_enable_preemption_service)
    rows.append(("distributed", jax.process_count() == 1 or preemption,
                 f"{'started' if started else 'not started'} ({launcher or 'one process'}); "
                 f"process {jax.process_index()} of {jax.process_count()}; preemption service "
                 f"{'on' if preemption else 'OFF: set jax_enable_preemption_service'}"))
    n = jax.device_count()
    slices = len({getattr(d, "slice_index", 0) for d in jax.devices()})
    rows.append(("devices", not devices or n == devices,
                 f"{jax.devices()[0].platform}: {jax.local_device_count()} here, {n} in all, "
                 f"{slices} slice(s)" + (f"; expected {devices}" if devices else "")))
    try:
        from jax.experimental import multihost_utils
        total = int(np.sum(multihost_utils.process_allgather(
            np.int32(jax.local_device_count()))))
        rows.append(("collective", total == n, f"all-gather over processes: {total} devices"))
    except Exception as e:            # noqa: BLE001
        rows.append(("collective", False, f"failed: {e}"))
    try:
        path = run_dir.prepare(workdir, flag="--workdir")
        rows.append(("workdir", True, f"{path}: writable, directory rename works"))
    except run_dir.WorkdirError as e:
        rows.append(("workdir", False, str(e)))
    return rows


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if FLAGS.target:
        if FLAGS.config is None:
            sys.exit("error: --target needs the run's --config=experiments/configs/pretrain.py:NAME")
        # Compile-only TPU devices: no TPU backend here, and libtpu may be loaded elsewhere.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        import jax
        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", "cpu")
        rows = [_versions_row(), fit_row(FLAGS.config, FLAGS.target, FLAGS.analytic)]
    else:
        if not FLAGS.workdir:
            sys.exit("error: give --workdir=RUN_DIR (the preflight on a pod), or --target=SLICE "
                     "with --config (the fit check before creating one)")
        distributed = {"auto": None, "true": True, "false": False}[FLAGS.distributed]
        rows = checks(FLAGS.workdir, FLAGS.devices, distributed)
        if FLAGS.config is not None:
            rows.append(fit_row(FLAGS.config))
    import jax
    width = max(len(r[0]) for r in rows)
    for name, ok, detail in rows:
        print(f"[process {jax.process_index()}] {name:<{width}}  "
              f"{'ok  ' if ok else 'FAIL'}  {detail}", flush=True)
    sys.exit(0 if all(ok for _, ok, _ in rows) else 1)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "Run directory to check (created if missing).")
    config_flags.DEFINE_config_file("config", None, "The run's config file (adds the fit "
                                    "check).", lock_config=True)
    flags.DEFINE_string("target", "", "Check only the fit, for this slice (e.g. tpu-v5p-1024, "
                        "2xtpu-v5p-512), ahead of time; no pod needed.")
    flags.DEFINE_bool("analytic", False, "With --target: the analytic estimate, no compile.")
    flags.DEFINE_integer("devices", 0, "Devices expected over all processes (0: do not check).")
    flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                      "Start jax.distributed: auto = as the trainers decide.")
    app.run(main)
