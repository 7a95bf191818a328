"""Planner targets: a name such as `tpu-v5p-1024` → chip, chip count, slices, topology, devices.

  tpu-v5p-1024     one v5p slice, accelerator type v5p-1024: 1024 TensorCores = 512 chips, 8x8x8
  tpu-v5e-256      one v5e slice of 256 chips (16x16); `tpu-v5litepod-256` is the same
  tpu-v6e-64       one v6e slice of 64 chips (8x8)
  tpu7x-256        one TPU7x (Ironwood) slice, accelerator type tpu7x-256: 256 TensorCores =
                   128 chips, 4x4x8; each TensorCore is a JAX device, so 256 devices
  tpu-v5p-8x8x16   an explicit slice topology
  2xtpu-v5p-512    two v5p-512 slices (256 chips each) joined by DCN
  gpu-h100-64      64 H100s, 8 per node (compiled where JAX's CUDA plugin is installed)
  cpu-8            8 fake CPU devices on this host

The suffix of a TPU name follows the Cloud TPU accelerator types: TensorCores for v5p (two per
chip), chips for v5e and v6e. Slice topologies for a chip count follow the Cloud TPU tables
(powers of two, the smallest dimension doubled first): v5p 4 → 2x2x1, 512 → 8x8x8,
1024 → 8x8x16; v5e/v6e 8 → 2x4, 256 → 16x16.

Devices: TPU targets get compile-only devices from `jax.experimental.topologies` (needs libtpu;
no TPU needed), with the slice's wraparound links (`Target.wrap`: tori from 4x4x4 v5p and TPU7x
slices up, open meshes below; v5e/v6e rings only along a whole-pod side of 16); cpu-N uses the
process's CPU devices, so the entrypoint must set `--xla_force_host_platform_device_count=N`
before JAX starts (`plan.py` does). H100 and H200 targets get compile-only GPU devices, a
process per node of 8, where JAX's CUDA plugin is installed (`gpu_targets.py`: no GPU needed);
without the plugin, and for other GPUs, they are planned with the analytic model alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from deepseek_jax.tools.hardware import Chip, get_chip

_NAME = re.compile(r"^(?:(\d+)x)?(tpu|gpu|cpu)(?:-(.+))?$")
_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v7x": "tpu7x", "7x": "tpu7x",
                "ironwood": "tpu7x"}


class TargetError(ValueError):
    """A target name that cannot be planned for; the message says what to write instead."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    n_chips: int                        # all chips, every slice
    n_slices: int = 1
    slice_shape: tuple[int, ...] = ()   # TPU torus of one slice, e.g. (8, 8, 8)
    compile_on: str | None = None       # "tpu", "gpu" (compile-only), "cpu" (fake devices), None
    chip_key: str = ""                  # the hardware table's name of the chip, e.g. "h100"

    @property
    def chips_per_slice(self) -> int:
        return self.n_chips // self.n_slices

    @property
    def n_devices(self) -> int:
        """JAX devices, every slice: the planner's unit (a chip, or a TPU7x TensorCore)."""
        return self.n_chips * self.chip.devices_per_chip

    @property
    def devices_per_slice(self) -> int:
        return self.n_devices // self.n_slices

    @property
    def topology_name(self) -> str:
        """`jax.experimental.topologies` name of one slice, e.g. 'v5p:8x8x8'."""
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.slice_shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Which dimensions of one slice close into rings (wraparound links), as the Cloud TPU
        slices are built: a 3-D slice (v5p, TPU7x) is a torus in every dimension when each
        dimension is a multiple of 4 (whole 4x4x4 cubes joined by optical switches), else an
        open mesh; a 2-D slice (v5e, v6e) wraps a dimension only where it spans the whole pod
        (16). The compiler picks its collectives by the network it is told, so compile-only
        devices must have the same links as the slice (without them libtpu writes every weight
        gather over a 512-chip v5p slice as an all-reduce)."""
        shape = self.slice_shape
        if self.chip.ici_dims == 3:
            whole = all(d % 4 == 0 for d in shape)
            return (whole, whole, whole)
        return tuple(d == 16 for d in shape) + (False,) * (3 - len(shape))

    def _links(self) -> str:
        rings = [d for d, w in zip(self.slice_shape, self.wrap) if w]
        if len(rings) == len(self.slice_shape):
            return "torus"
        return "mesh" + (f" (ring along {'x'.join(map(str, rings))})" if rings else "")

    def describe(self) -> str:
        if self.chip.kind == "tpu":
            slices = f"{self.n_slices} slices of " if self.n_slices > 1 else ""
            devices = (f", {self.n_devices} devices" if self.n_devices != self.n_chips else "")
            return (f"{self.name}: {slices}{self.chip.name} {self.topology_name.split(':')[1]} "
                    f"{self._links()} ({self.n_chips} chips{devices})")
        if self.chip.kind == "gpu":
            nodes = math.ceil(self.n_chips / self.chip.gpus_per_node)
            return f"{self.name}: {self.n_chips} × {self.chip.name} ({nodes} nodes)"
        return f"{self.name}: {self.n_chips} fake CPU devices"

    def devices(self) -> list:
        """The devices to compile for (compile-only for TPU and GPU); raises `TargetError` for a
        target without them."""
        import jax
        if self.compile_on == "gpu":
            from deepseek_jax.tools import gpu_targets
            try:
                return gpu_targets.compile_only_devices(self.chip_key, self.n_chips,
                                                        self.chip.gpus_per_node)
            except gpu_targets.NoCompileOnlyGpu as e:
                raise TargetError(f"compiling for {self.name}: {e}; or pass --analytic_only") \
                    from None
        if self.compile_on == "tpu":
            from jax.experimental import topologies
            kwargs = {"num_slices": self.n_slices} if self.n_slices > 1 else {}
            try:
                topo = topologies.get_topology_desc(platform="tpu", wrap=self.wrap,
                                                    topology_name=self.topology_name, **kwargs)
            except RuntimeError as e:
                if "not installed" in str(e):
                    raise TargetError(f"compiling for {self.name} needs libtpu: pip install "
                                      f"'jax[tpu]' (no TPU is needed), or pass --analytic_only")
                raise
            return list(topo.devices)
        if self.compile_on == "cpu":
            devices = jax.devices("cpu")
            if len(devices) < self.n_chips:
                raise TargetError(
                    f"{self.name} needs {self.n_chips} CPU devices but JAX has {len(devices)}; "
                    f"set XLA_FLAGS=--xla_force_host_platform_device_count={self.n_chips} before "
                    "JAX starts (python -m deepseek_jax.tools.plan does this itself)")
            return devices[:self.n_chips]
        raise TargetError(f"{self.name}: no compile-only devices here (JAX's CUDA plugin is "
                          "not installed, or the GPU is not described in gpu_targets.py); "
                          "this target is planned with the analytic model only")


def slice_shape(n_chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU slice topology for a power-of-two chip count (smallest dimension doubled first)."""
    if n_chips < 1 or n_chips & (n_chips - 1):
        raise TargetError(f"{n_chips} chips is not a power of two; give the topology instead, "
                          "e.g. tpu-v5p-4x4x12")
    shape = [1] * dims
    while math.prod(shape) < n_chips:
        i = shape.index(min(shape))
        shape[i] *= 2
    ones = [d for d in shape if d == 1]
    return tuple(sorted(d for d in shape if d > 1)) + tuple(ones)


def _host_memory_bytes() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0


def parse_target(name: str) -> Target:
    """`tpu-v5p-1024`, `2xtpu-v5p-512`, `tpu-v6e-8x8`, `gpu-h100-64`, `cpu-8` → Target."""
    # TPU7x's accelerator types are written tpu7x-N (no dash after "tpu").
    m = _NAME.match(re.sub(r"^(\d+x)?tpu7x-", r"\1tpu-tpu7x-", name.strip().lower()))
    if not m or not m.group(3):
        raise TargetError(f"target {name!r}: write tpu-<chip>-<size> (tpu-v5p-1024), "
                          "<slices>xtpu-<chip>-<size> (2xtpu-v5p-512), gpu-<chip>-<count> "
                          "(gpu-h100-64) or cpu-<devices> (cpu-8)")
    n_slices = int(m.group(1) or 1)
    kind, rest = m.group(2), m.group(3)
    if kind == "cpu":
        if not rest.isdigit() or n_slices != 1:
            raise TargetError(f"target {name!r}: write cpu-<devices>, e.g. cpu-8")
        n = int(rest)
        chip = get_chip("cpu")
        host = _host_memory_bytes()
        if host:
            chip = dataclasses.replace(chip, hbm_bytes=host / n)
        return Target(name, chip, n, 1, (n,), compile_on="cpu")
    chip_name, _, size = rest.rpartition("-")
    if not chip_name or not size:
        raise TargetError(f"target {name!r}: missing the size, e.g. {kind}-{rest}-64")
    if kind == "gpu":
        try:
            chip = get_chip(chip_name)
        except ValueError as e:
            raise TargetError(str(e)) from None
        if chip.kind != "gpu" or not size.isdigit():
            raise TargetError(f"target {name!r}: write gpu-<h100|h200|a100>-<count>")
        if n_slices != 1:
            raise TargetError("GPU targets have no slices; give the total count (gpu-h100-128)")
        count = int(size)
        from deepseek_jax.tools import gpu_targets
        compiles = chip_name in gpu_targets.TARGET_CONFIGS and gpu_targets.has_cuda_plugin()
        return Target(name, chip, count, 1, (), compile_on="gpu" if compiles else None,
                      chip_key=chip_name)
    chip_name = _TPU_ALIASES.get(chip_name, chip_name)
    try:
        chip = get_chip(chip_name)
    except ValueError:
        raise TargetError(f"target {name!r}: unknown TPU {chip_name!r}; use v5p, v5e, v6e or "
                          "tpu7x") \
            from None
    if chip.kind != "tpu":
        raise TargetError(f"target {name!r}: {chip_name} is not a TPU")
    if "x" in size:
        shape = tuple(int(d) for d in size.split("x"))
        if len(shape) != chip.ici_dims:
            raise TargetError(f"target {name!r}: {chip.name} slices are {chip.ici_dims}-D")
    else:
        count = int(size)
        if count % chip.cores_per_chip:
            raise TargetError(f"target {name!r}: {chip_name}-N counts TensorCores "
                              f"({chip.cores_per_chip} per chip); N must be a multiple of "
                              f"{chip.cores_per_chip}")
        shape = slice_shape(count // chip.cores_per_chip, chip.ici_dims)
    per_slice = math.prod(shape)
    if chip.max_slice_chips and per_slice > chip.max_slice_chips:
        raise TargetError(f"target {name!r}: {per_slice} chips exceed the largest {chip.name} "
                          f"slice ({chip.max_slice_chips}); use several slices, e.g. "
                          f"{per_slice // chip.max_slice_chips}xtpu-{chip_name}-"
                          f"{chip.max_slice_chips * chip.cores_per_chip}")
    return Target(name, chip, per_slice * n_slices, n_slices, shape, compile_on="tpu")
