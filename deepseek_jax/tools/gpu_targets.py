"""Compile-only GPU devices on a host without GPUs: what the planner and gpu_compile.py compile for.

  devices = compile_only_devices("h100", n_gpus=16)      # 2 nodes × 8, compile-only
  with answer_as(devices[0]):
      compiled = jax.jit(f).trace(*args).lower().compile()

XLA compiles a GPU program without the GPU when it is given the device's description (SM
count, shared memory, L2, memory size, cuDNN and CUDA versions, in XLA's GpuTargetConfigProto
text format): `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...,
topology="1xNODESxGPUS")` then returns devices that can be compiled for but not run on, one
process per node, as the TPU topologies do for TPU slices.

Needs the CUDA plugin of the installed jax on the path (`make venv` installs it in
.venv/cuda-plugin, from requirements-gpu-compile.txt; no GPU, and no CUDA libraries unless ptxas
is wanted: its `[with-cuda]` extra) and `JAX_PLATFORMS=cpu`, which keeps JAX from
starting a GPU backend and with it the plugin's checks of the local CUDA libraries, which need a
GPU (`python -m deepseek_jax.tools.plan` sets it).

Three queries in JAX's own code ask the local GPU while tracing, and there is none: cuDNN
attention's version and compute-capability checks (`jax._src.cudnn.fused_attention_stablehlo`)
and the SM count by which the Mosaic GPU wgrad kernel (`transposed_ragged_dot_mgpu`) sizes its
grid. `answer_as(device)` answers them as the target would, for the length of a trace. The
project's own kernels read the target device themselves (`kernels.platform.target_device`).

Described here: Hopper (H100 SXM, H200). Other GPUs are planned with the analytic model only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math

import jax

from deepseek_jax.tools.hardware import CHIPS

# Memory size and bandwidth are the hardware table's (`hardware.py`: nvidia-smi's size on the
# machines lent to this project, the data sheets' bandwidth); the rest from those machines
# (PyTorch: 132 SMs, 50 and 60 MB of L2) and NVIDIA's data sheets (1.98 GHz boost; 227 KiB of
# shared memory per block when opted in, 228 KiB per SM; 64 K registers). cuDNN 9.10 and CUDA
# 13.0 stand for the device's libraries (cuDNN ≥ 9.10 is what MLA's head widths need).
_HOPPER = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{name}"
"""
CUDNN_VERSION = 91000
_HOPPERS = {"h100": (50 * 2**20, "NVIDIA H100 80GB HBM3"), "h200": (60 * 2**20, "NVIDIA H200")}
MEMORY = {gpu: int(CHIPS[gpu].hbm_bytes) for gpu in _HOPPERS}          # bytes
TARGET_CONFIGS = {
    gpu: _HOPPER.format(bandwidth=int(CHIPS[gpu].hbm_bw), l2=l2, memory=MEMORY[gpu], name=name)
    for gpu, (l2, name) in _HOPPERS.items()}
INSTALL = ("put JAX's CUDA plugin on the path (`make venv` installs it in .venv/cuda-plugin: "
           "PYTHONPATH=.venv/cuda-plugin; or pip install jax-cuda13-plugin==" + jax.__version__
           + " jax-cuda13-pjrt==" + jax.__version__ + ", no GPU needed) and run with "
           "JAX_PLATFORMS=cpu")


class NoCompileOnlyGpu(RuntimeError):
    """No compile-only GPU devices here; the message says what to install."""


def has_cuda_plugin() -> bool:
    """Whether a JAX CUDA plugin is installed (it is what compiles for GPUs, with or without one)."""
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None
                   for v in (13, 12))
    except ModuleNotFoundError:         # no jax_plugins namespace at all
        return False


def compile_only_devices(gpu: str, n_gpus: int, gpus_per_node: int = 8) -> list:
    """`n_gpus` compile-only devices of kind `gpu` ("h100", "h200"), `gpus_per_node` to a node
    (one process each; fewer GPUs than a node make one node of that many)."""
    if gpu not in TARGET_CONFIGS:
        raise NoCompileOnlyGpu(f"no compile-only description of {gpu!r}; described: "
                               f"{', '.join(TARGET_CONFIGS)}")
    per_node = min(gpus_per_node, n_gpus)
    if n_gpus % per_node:
        raise NoCompileOnlyGpu(f"{n_gpus} GPUs do not fill nodes of {gpus_per_node}")
    from jax.experimental import topologies
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=TARGET_CONFIGS[gpu],
            topology=f"1x{math.ceil(n_gpus / per_node)}x{per_node}")
    except Exception as e:  # noqa: BLE001 - no plugin, or one that cannot compile without GPUs
        raise NoCompileOnlyGpu(
            f"no compile-only CUDA devices ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}): {INSTALL}") from e
    return list(topology.devices)


@contextlib.contextmanager
def answer_as(device):
    """JAX's three local-GPU queries answered as `device` would (see the module docstring)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd
    capability = tuple(int(v) for v in str(device.compute_capability).split("."))
    version = lambda c: tuple(int(v) for v in c.split("."))  # noqa: E731

    class _Jax:                     # trd's view of `jax`: devices() is the target
        def devices(self, *args):
            return [device]

        def __getattr__(self, name):
            return getattr(jax, name)

    saved = (cudnn.check_cudnn_version, cudnn.check_compute_capability,
             cudnn.is_cuda_compute_capability_equal, trd.jax)
    cudnn.check_cudnn_version = lambda: CUDNN_VERSION
    cudnn.check_compute_capability = lambda c: capability >= version(c)
    cudnn.is_cuda_compute_capability_equal = lambda c: capability == version(c)
    trd.jax = _Jax()
    try:
        yield
    finally:
        (cudnn.check_cudnn_version, cudnn.check_compute_capability,
         cudnn.is_cuda_compute_capability_equal, trd.jax) = saved


def answering_for(devices):
    """`answer_as(devices[0])` when they are GPUs, else a context that does nothing."""
    first = devices[0] if len(devices) else None
    if first is not None and getattr(first, "platform", "") in ("gpu", "cuda"):
        return answer_as(first)
    return contextlib.nullcontext()
