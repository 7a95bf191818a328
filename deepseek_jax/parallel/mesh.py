"""The device mesh: axis names, sizes from a config, multi-slice layout, multi-process start-up.

One mesh serves training, rollouts and evaluation. Its axes, outermost (slowest link) first:

  dcn_data   data parallelism across slices or hosts joined by the data-centre network (DCN);
             1 on a single slice. DCN is the slow link, so only the cheapest traffic (one
             gradient all-reduce per step) crosses it.
  data       data parallelism inside a slice: parameters replicated, batch split.
  stage      pipeline parallelism: each device holds the layers of one stage of the stacks
             the model pipelines (`model/pipeline.py`); only activations, one micro-batch
             at a time, cross it.
  fsdp       fully sharded data parallelism: batch split, parameters and optimizer state split
             along "embed" (ZeRO-3), gathered layer by layer under jit.
  context    context parallelism: the sequence split into contiguous chunks (activations'
             T); weights split along "embed" as under fsdp. Attention gathers the keys'
             latents (MLA's c_kv and k_rope, 576 values a token in V3) over it.
  expert     expert parallelism: routed experts split across devices; these devices also split
             the batch (DeepSeek / MaxText practice: expert ranks are data ranks).
  tensor     tensor parallelism: heads, FFN width and vocabulary split; the most communication,
             so it is innermost (neighbouring devices).

Sizes come from a mapping (`ml_collections.ConfigDict` or dict) with any of those fields; a
missing field is 1 and one of the ICI axes may be -1 to take the remaining devices.
`dcn_data` = -1 means "one per slice found". Axis types are `AxisType.Auto`: the compiler
(Shardy) propagates shardings from the rules in `rules.py`; no explicit-mode annotations.

Layout on a TPU torus: `mesh_utils` maps each mesh axis, innermost (tensor) first, onto whole
torus dimensions where the sizes allow it. Where they do not (fsdp=128 × expert=4 on an 8x8x8
v5p slice: no product of whole dimensions is 4 once 128 is placed), it splits a torus dimension
between two mesh axes (`allow_split_physical_axes`); every axis then still has its devices, but a
split dimension gives each of its axes a line without the torus's wrap-around link, not a ring.
`torus_layout(mesh)` says which torus dimensions each axis spans and which are split, read from
the devices' coordinates; the planner reports it per strategy.

Multi-slice: with dcn_data > 1 the mesh comes from `mesh_utils.create_hybrid_device_mesh`,
slices told apart by `device.slice_index` (TPU) or by process (GPU hosts, one process per host).
GPU hosts running one process per GPU (SLURM) have more processes than hosts: dcn_data = the
number of hosts, a divisor of the process count, groups consecutive process ids into hosts
(`_hosts_of_processes`). When every device sits in one slice and one process (CPU tests, one
GPU host), dcn_data > 1 is emulated by splitting the device list into contiguous groups;
nothing crosses a real DCN then.

Left out: DCN axes other than data (e.g. FSDP or pipeline stages across slices), hosts found by
anything but consecutive process ids (a SLURM distribution other than block).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from deepseek_jax.config import MeshError

MESH_AXES = ("dcn_data", "data", "stage", "fsdp", "context", "expert", "tensor")
ICI_AXES = MESH_AXES[1:]          # inside one slice


def _divisors(n: int) -> str:
    return ",".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _as_dict(mesh_config: Mapping[str, Any] | Any) -> dict[str, int]:
    """Plain {axis: size} from a dict or ConfigDict; unknown fields are errors."""
    items = dict(mesh_config.items()) if hasattr(mesh_config, "items") else dict(mesh_config)
    unknown = sorted(set(items) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axis {unknown[0]!r}; mesh axes are {', '.join(MESH_AXES)}")
    sizes = {a: int(items.get(a, 1)) for a in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise MeshError(f"mesh {axis}={size}: use a positive size, or -1 to take the rest")
    return sizes


def slice_count(devices: Sequence[Any]) -> int:
    """DCN granules among `devices`: TPU slices, else processes (what dcn_data = -1 means)."""
    return _slices(devices)[0]


def _slices(devices: Sequence[Any]) -> tuple[int, bool]:
    """(number of DCN granules among `devices`, whether they are told apart by slice_index)."""
    if all(hasattr(d, "slice_index") for d in devices):
        return len({d.slice_index for d in devices}), True
    return len({d.process_index for d in devices}), False


def resolve_mesh_shape(mesh_config: Mapping[str, Any], n_devices: int,
                       n_slices: int = 1) -> dict[str, int]:
    """Fills in -1 and checks that the axis sizes use exactly `n_devices` devices.

    Args:
      mesh_config: {axis: size} for axes in MESH_AXES (missing = 1; one ICI axis may be -1;
        dcn_data = -1 means `n_slices`).
      n_devices: devices the mesh must cover.
      n_slices: DCN granules found among the devices (only used for dcn_data = -1).

    Returns:
      {axis: size} for every axis in MESH_AXES, product = n_devices.

    Raises:
      MeshError: naming the axis to change and the sizes that would work.
    """
    sizes = _as_dict(mesh_config)
    if sizes["dcn_data"] == -1:
        sizes["dcn_data"] = n_slices
    fill = [a for a in ICI_AXES if sizes[a] == -1]
    if len(fill) > 1:
        raise MeshError(f"mesh has -1 on {' and '.join(fill)}; only one axis may be -1 "
                        "(it takes the devices the others leave)")
    fixed = {a: s for a, s in sizes.items() if s != -1}
    for axis, size in fixed.items():
        if n_devices % size:
            raise MeshError(f"mesh {axis}={size} does not divide {n_devices} devices; "
                            f"use one of {_divisors(n_devices)}")
    product = math.prod(fixed.values())
    written = " × ".join(f"{a}={s}" for a, s in fixed.items() if s != 1) or "all axes 1"
    if fill:
        if n_devices % product:
            raise MeshError(f"mesh {written} = {product} does not divide {n_devices} devices; "
                            f"make the product one of {_divisors(n_devices)}")
        sizes[fill[0]] = n_devices // product
    elif product != n_devices:
        raise MeshError(f"mesh {written} uses {product} devices but {n_devices} are given; "
                        f"make the product {n_devices}, or set one axis to -1 to take the rest")
    return sizes


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[Any] | None = None, *,
              allow_split_physical_axes: bool = True) -> Mesh:
    """The device mesh with axes MESH_AXES (all `AxisType.Auto`), sizes from `mesh_config`.

    Args:
      mesh_config: {axis: size}; see `resolve_mesh_shape`.
      devices: devices to use (default: all of `jax.devices()`).
      allow_split_physical_axes: on a TPU torus, let one torus dimension be shared by two mesh
        axes when the sizes cannot be laid on whole dimensions (see the module docstring).
        Meshes that fit whole dimensions are laid out the same either way. False raises
        `MeshError` for the others instead.

    Returns:
      a `jax.sharding.Mesh` of shape (dcn_data, data, stage, fsdp, context, expert, tensor).
    """
    devices = list(jax.devices() if devices is None else devices)
    n_slices, by_slice_index = _slices(devices)
    sizes = resolve_mesh_shape(mesh_config, len(devices), n_slices)
    ici = tuple(sizes[a] for a in ICI_AXES)
    dcn = sizes["dcn_data"]
    split = allow_split_physical_axes
    try:
        if dcn == 1 and (n_slices == 1 or not by_slice_index):
            # One slice (several GPU hosts without DCN axes count as one: NCCL spans them).
            # mesh_utils picks a topology-aware device order on TPU.
            grid = mesh_utils.create_device_mesh(ici, devices,
                                                 allow_split_physical_axes=split)[None]
        elif dcn == n_slices:
            grid = mesh_utils.create_hybrid_device_mesh(
                (1, *ici), (dcn,) + (1,) * len(ici), devices, process_is_granule=not by_slice_index,
                allow_split_physical_axes=split)
        elif n_slices == 1:
            # One slice, one process: stand in for slices with contiguous groups of devices.
            grid = np.asarray(devices, dtype=object).reshape(dcn, *ici)
        elif not by_slice_index and dcn > 1 and n_slices % dcn == 0:
            grid = _hosts_of_processes(devices, dcn, ici, n_slices // dcn)
        else:
            kind = "slices" if by_slice_index else "processes"
            fix = f"set dcn_data={n_slices} (or -1)" + (
                "" if by_slice_index else ", or a number of hosts that divides it")
            raise MeshError(f"mesh dcn_data={dcn} but the devices span {n_slices} {kind}; {fix}")
    except NotImplementedError as e:        # mesh_utils: no layout on whole torus dimensions
        written = ", ".join(f"{a}={n}" for a, n in zip(ICI_AXES, ici) if n > 1)
        raise MeshError(f"mesh {written} cannot be laid on whole dimensions of this TPU torus; "
                        "pass allow_split_physical_axes=True, or choose sizes that are "
                        f"products of its dimensions ({e})") from None
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _hosts_of_processes(devices, dcn: int, ici: tuple[int, ...], per_host: int) -> np.ndarray:
    """The grid [dcn, *ici] when each of dcn hosts runs `per_host` processes (one per GPU, as
    SLURM starts them): host h is processes h·per_host … (h+1)·per_host − 1, consecutive ids on
    one node as SLURM's default (block) distribution assigns them; each host's devices fill
    the ICI axes in (process, device id) order, the NVLink domain NCCL sees."""
    by_host = [sorted((d for d in devices if d.process_index // per_host == h),
                      key=lambda d: (d.process_index, d.id)) for h in range(dcn)]
    return np.stack([np.asarray(host, dtype=object).reshape(ici) for host in by_host])


def torus_layout(mesh: Mesh) -> dict[str, dict[int, int]] | None:
    """{mesh axis: {torus dimension: extent along it}} read from the devices' coordinates, or
    None when the devices have none (CPU, GPU). The extent counts distinct coordinates, so a TPU
    with several devices per chip (TensorCores sharing `coords`) shows a size-2 axis over one
    chip as spanning no dimension; size-1 axes are left out."""
    grid = mesh.devices
    first = grid.flat[0]
    if getattr(first, "coords", None) is None:
        return None
    out = {}
    for i, axis in enumerate(mesh.axis_names):
        if grid.shape[i] == 1:
            continue
        line = grid[tuple(slice(None) if j == i else 0 for j in range(grid.ndim))]
        coords = np.array([d.coords for d in line])           # [n, torus dims]
        out[axis] = {d: len(set(coords[:, d])) for d in range(coords.shape[1])
                     if len(set(coords[:, d])) > 1}
    return out


def split_dimensions(layout: Mapping[str, Mapping[int, int]],
                     torus_shape: Sequence[int]) -> dict[int, tuple[str, ...]]:
    """{torus dimension: the mesh axes sharing it} for each dimension that no single axis spans
    whole, from `torus_layout`; empty when every axis lies on whole dimensions."""
    out = {}
    for d, size in enumerate(torus_shape):
        users = tuple(a for a, dims in layout.items() if d in dims)
        if size > 1 and any(layout[a][d] < size for a in users):
            out[d] = users
    return out


# --- multi-process start-up ------------------------------------------------------------------

def _int_env(environ: Mapping[str, str], *names: str) -> int:
    for name in names:
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def on_cloud_tpu_vm() -> bool:
    """Whether this machine is a Cloud TPU VM: TPU chips on its PCI bus (read from /sys, no
    backend started) and libtpu installed. There no environment variable names the workers;
    `jax.distributed.initialize()` reads them from the metadata server (JAX's GceTpuCluster)."""
    import importlib.util
    from jax._src import hardware_utils
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return chips > 0 and importlib.util.find_spec("libtpu") is not None


def skip_absent_tpu() -> bool:
    """On a machine with neither TPU chips nor an NVIDIA GPU, and no platform chosen
    (JAX_PLATFORMS unset), selects JAX's CPU platform only; returns whether it did.

    libtpu comes with the development requirements (it compiles for TPU topologies on any
    host), and wherever it is installed JAX tries a TPU backend at start-up. On a CPU machine
    that attempt fails after libtpu has logged errors about missing TPU metadata, and it holds
    a lock file that a second process then trips on. Call it before any backend starts; later
    it changes nothing. GPU machines are left as they are.
    """
    import importlib.util
    from jax._src import hardware_utils
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return False
    if importlib.util.find_spec("libtpu") is None or hardware_utils.has_visible_nvidia_gpu():
        return False
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return False
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def multi_process_launch(environ: Mapping[str, str] | None = None,
                         tpu_vm: bool | None = None) -> str | None:
    """Names the launcher when the environment says this is (or may be) one of several processes.

    Signals (any one): JAX_COORDINATOR_ADDRESS (explicit set-up, e.g. plain `ssh`/K8s launches;
    JAX_NUM_PROCESSES and JAX_PROCESS_ID then say how many and which); a multi-host TPU slice
    (TPU_WORKER_HOSTNAMES lists more than one host, as GKE sets it) or multi-slice
    (MEGASCALE_NUM_SLICES > 1); SLURM with more than one task (SLURM_NTASKS); Open MPI with more
    than one rank (OMPI_COMM_WORLD_SIZE); a Cloud TPU VM ("tpu-vm": `on_cloud_tpu_vm`, or
    `tpu_vm`; its workers are known only to the metadata server, so a one-host VM initializes
    too, as a 1-process run). Returns None for a single process (a laptop, one CPU, one GPU
    host).
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "tpu"
    if _int_env(env, "MEGASCALE_NUM_SLICES") > 1:
        return "tpu"
    if _int_env(env, "SLURM_NTASKS", "SLURM_NPROCS") > 1:
        return "slurm"
    if _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "mpi"
    if on_cloud_tpu_vm() if tpu_vm is None else tpu_vm:
        return "tpu-vm"
    return None


def maybe_initialize_distributed(enabled: bool | None = None) -> bool:
    """Calls `jax.distributed.initialize()` when the run spans several processes.

    Call it first thing in an entrypoint, before any other JAX call (it also keeps a CPU
    machine from starting libtpu: `skip_absent_tpu`).

    Args:
      enabled: True forces initialization, False skips it, None (default) decides from the
        environment (`multi_process_launch`).

    Returns:
      True if this call initialized the distributed runtime; False otherwise (one process, or
      already initialized, or a TPU machine found only by its chips whose metadata names no
      workers, as on Colab's TPU runtimes: JAX then finds no cluster, and the run is one
      process).
    """
    skip_absent_tpu()
    if jax.distributed.is_initialized():
        return False
    launcher = multi_process_launch() if enabled is None else ("forced" if enabled else None)
    if launcher is None:
        return False
    kwargs = {}
    if launcher == "explicit":
        # JAX reads the coordinator address itself; process count and id it cannot guess.
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, OSError):   # before anything starts: no cluster, or no metadata server
        if launcher != "tpu-vm":
            raise
        return False
    return True
