"""The platform a trace is compiled for: "cpu", "gpu" or "tpu".

The devices of the active mesh (`jax.set_mesh`, as `parallel.sharding_context` sets it) when
there is one, else JAX's default backend. Every "auto" choice of a kernel or transport reads it,
so that a compile for other devices than the host's (the planner's ahead-of-time compiles for
TPU topologies from a CPU host, the lowering tests) picks the target's kernels, not the host's.
"""

from __future__ import annotations

import jax


def active_platform() -> str:
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    name = device.platform if device is not None else jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name
