"""The platform and device a trace is compiled for.

  active_platform()   "cpu", "gpu" or "tpu"
  target_device()     the first device compiled for (a jax Device, real or compile-only)

The devices of the active mesh (`jax.set_mesh`, as `parallel.sharding_context` sets it) when
there is one, else JAX's default backend. Every "auto" choice of a kernel or transport reads it,
so that a compile for other devices than the host's (the planner's ahead-of-time compiles for
TPU topologies from a CPU host, a GPU program compiled on a CPU host for an H100 or H200
topology, the lowering tests) picks the target's kernels, not the host's.
"""

from __future__ import annotations

import jax
from jax._src import mesh as mesh_lib


def active_platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    name = device.platform if device is not None else jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


def target_device():
    """The active concrete mesh's first device, else `jax.devices()[0]`.

    What the GPU kernels read their compute capability and SM count from. Inside `jax.jit` the
    concrete mesh set by `jax.set_mesh` has no public getter in JAX 0.11 (`jax.sharding.get_mesh`
    refuses to run under a trace, and the abstract mesh's device has no compute capability), so
    this reads JAX's private one, and falls back to the default device where it is missing.
    """
    getter = getattr(mesh_lib, "get_concrete_mesh", None)
    mesh = getter() if getter is not None else None
    if mesh is not None and not mesh.empty:
        return mesh.devices.flat[0]
    return jax.devices()[0]
