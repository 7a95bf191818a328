"""Grouped matrix multiplication for routed experts: one API, several backends, one reference.

    gmm(lhs [M, K], rhs [G, K, N], group_sizes [G], backend=...) -> [M, N]

Rows are sorted by group: group g owns the next group_sizes[g] rows of `lhs` and multiplies them
by rhs[g]. Rows past sum(group_sizes) come out as exact zeros on every backend (the expert-
parallel receive buffers rely on it: their padding rows are never part of a group). Groups may be
empty and arbitrarily uneven. Gradients flow to `lhs` and `rhs` (none to the integer sizes).

Backends (`BACKENDS`; "auto" picks by platform with `default_backend`):

  ragged_dot      `jax.lax.ragged_dot`. Native on TPU; the portable path for CPU. On GPU XLA
                  rewrites it into a dense masked dot (11 TFLOP/s on an H200 where a dense GEMM
                  runs 548), so "auto" avoids it there on Hopper.
  mosaic_gpu      Hopper (sm90) Pallas Mosaic GPU kernels that ship with JAX
                  (`jax.experimental.pallas.ops.gpu`): `ragged_dot_mgpu.ragged_dot` for the forward
                  pass and dgrad (the same kernel reading rhs K-major, `transpose_rhs=True`), and
                  `transposed_ragged_dot_mgpu.transposed_ragged_dot` for wgrad, joined by a
                  `custom_vjp` here (the kernels have no autodiff). Both operands run in the compute
                  dtype (bf16); the kernels accumulate in fp32 and store in that dtype. K and N are
                  zero-padded to the block sizes, which changes no value.
  megablox        the TPU Pallas grouped GEMM (`jax.experimental.pallas.ops.tpu.megablox.ops.gmm`,
                  its own custom_vjp with gmm/tgmm backward); bf16/fp32 only. M, K and N are
                  zero-padded to the (128, 128, 128) tiles.
  reference       plain JAX: each row gathers its group's matrix. Memory M·K·N; tests only.

Interpret mode (CPU tests of the kernels): "mosaic_gpu_interpret" runs the Mosaic GPU kernels in
JAX's GPU interpreter and "megablox_interpret" runs megablox with `interpret=True`; same maths,
no accelerator, slow (seconds for 256×128×128). Cross-lowering (`.lower(lowering_platforms=...)`)
of "mosaic_gpu" for cuda and "megablox" for tpu also works from a CPU host.

fp8: `fp8=True` runs `kernels.fp8_linear.fp8_ragged_dot`, the EMULATED block-scaled fp8 grouped
GEMM (DeepSeek's numerics on dequantized values, fp32 speed) whatever the backend.

Left out, and why:
  - An fp8 Mosaic GPU grouped kernel (DeepGEMM's "m-grouped contiguous" GEMM): the shipped
    `ragged_dot_mgpu` has no scale operands and stores its output in the input dtype, so it cannot
    run DeepSeek's 1×128 / 128×128 recipe; writing that kernel is a piece of its own, and no GPU
    was available to tune or check it.
  - Tuned tile sizes: `MOSAIC_GPU_TILING` is a reasonable Hopper default (128×128 output tiles,
    64-deep K steps, 4 stages: 160 KiB of the 227 KiB shared memory) that has not been tuned on
    an H200 (experiments/benchmarks/moe.py sweeps a few). Megablox uses (128, 128, 128).
  - `group_offset` (computing only a slice of the groups): expert parallelism here passes each
    device only its local experts' weights, so no backend needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from unittest import mock

import jax
import jax.numpy as jnp

BACKENDS = ("ragged_dot", "mosaic_gpu", "megablox", "reference", "mosaic_gpu_interpret",
            "megablox_interpret")
CONFIG_BACKENDS = ("auto",) + BACKENDS


@dataclasses.dataclass(frozen=True)
class MosaicGpuTiling:
    """Block sizes of the Mosaic GPU kernels (see `ragged_dot_mgpu.ragged_dot`)."""
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 1


MOSAIC_GPU_TILING = MosaicGpuTiling()
MEGABLOX_TILING = (128, 128, 128)
_HOPPER_SMS = 132          # what ragged_dot_mgpu assumes; the wgrad kernel asks the device


def default_backend(platform: str | None = None) -> str:
    """The backend "auto" means on `platform` (default: JAX's default backend).

    cpu → ragged_dot; tpu → megablox; gpu → mosaic_gpu on Hopper (compute capability 9.x),
    ragged_dot elsewhere (the Hopper kernels use wgmma, which other GPUs lack).
    """
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "megablox"
    if platform in ("gpu", "cuda"):
        cc = str(getattr(jax.devices()[0], "compute_capability", ""))
        return "mosaic_gpu" if cc.startswith("9") else "ragged_dot"
    return "ragged_dot"


def resolve_backend(backend: str) -> str:
    if backend not in CONFIG_BACKENDS:
        raise ValueError(f"grouped GEMM backend {backend!r}: use one of {CONFIG_BACKENDS}")
    return default_backend() if backend == "auto" else backend


def _row_mask(group_sizes, m):
    """[M, 1] bool: True for rows that belong to a group."""
    return (jnp.arange(m) < jnp.sum(group_sizes))[:, None]


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def _pad_to(a, axis, size):
    if a.shape[axis] == size:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pad)


@jax.custom_vjp
def _zero_grad_outside_groups(lhs, group_sizes):
    """Identity whose gradient is zero on rows in no group (kernels leave those rows of dlhs
    unwritten: NaN in interpret mode, stale memory on hardware)."""
    return lhs


def _zgo_fwd(lhs, group_sizes):
    return lhs, group_sizes


def _zgo_bwd(group_sizes, g):
    return jnp.where(_row_mask(group_sizes, g.shape[0]), g, 0), None


_zero_grad_outside_groups.defvjp(_zgo_fwd, _zgo_bwd)


# --- reference ---------------------------------------------------------------------------------

def gmm_reference(lhs, rhs, group_sizes, out_dtype):
    """Each row times its own group's matrix, gathered explicitly (no ragged primitive)."""
    m = lhs.shape[0]
    ends = jnp.cumsum(group_sizes)                                          # [G]
    group = jnp.searchsorted(ends, jnp.arange(m), side="right")            # [M]
    w = rhs[jnp.minimum(group, rhs.shape[0] - 1)]                           # [M, K, N]
    out = jnp.einsum("MK,MKN->MN", lhs.astype(jnp.float32), w.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)                   # [M, N]
    return jnp.where(_row_mask(group_sizes, m), out, 0).astype(out_dtype)


# --- Mosaic GPU (Hopper) -------------------------------------------------------------------------

@contextlib.contextmanager
def _mosaic_gpu_mode(interpret: bool):
    """GPU interpreter on for interpret mode; and a device that reports an SM count.

    `transposed_ragged_dot` reads `jax.devices()[0].core_count` while tracing, which CPU devices
    (interpret mode, or cross-lowering for cuda from a CPU host) lack; they see an H100/H200's 132.
    """
    with contextlib.ExitStack() as stack:
        if interpret:
            from jax._src.pallas.mosaic_gpu.interpret.params import (InterpretGPUParams,
                                                                     force_gpu_interpret_mode)
            stack.enter_context(force_gpu_interpret_mode(InterpretGPUParams()))
        if not hasattr(jax.devices()[0], "core_count"):
            fake = type("HopperLike", (), {"core_count": _HOPPER_SMS})()
            from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd
            stack.enter_context(mock.patch.object(trd, "jax", _JaxWithDevices(fake)))
        yield


class _JaxWithDevices:
    """The `jax` module as seen by one kernel file, with `devices()` answering a fake device."""

    def __init__(self, device):
        self._device = device

    def devices(self, *args):
        return [self._device]

    def __getattr__(self, name):
        return getattr(jax, name)


def _mgpu_forward(lhs, rhs, group_sizes, transpose_rhs, t):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(
        lhs, rhs, group_sizes=group_sizes, block_m=t.block_m, block_n=t.block_n,
        block_k=t.block_k, max_concurrent_steps=t.max_concurrent_steps,
        grid_block_n=t.grid_block_n, transpose_rhs=transpose_rhs)


def _mgpu_wgrad(x, dy, group_sizes, t):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd
    return trd.transposed_ragged_dot(
        x, dy, group_sizes=group_sizes, block_m=t.block_m, block_n=t.block_n,
        block_k=t.block_k, max_concurrent_steps=t.max_concurrent_steps,
        grid_block_n=t.grid_block_n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _mgpu_gmm(lhs, rhs, group_sizes, interpret, tiling):
    with _mosaic_gpu_mode(interpret):
        return _mgpu_forward(lhs, rhs, group_sizes, False, tiling)         # [M, N]


def _mgpu_gmm_fwd(lhs, rhs, group_sizes, interpret, tiling):
    return _mgpu_gmm(lhs, rhs, group_sizes, interpret, tiling), (lhs, rhs, group_sizes)


def _mgpu_gmm_bwd(interpret, tiling, res, dy):
    lhs, rhs, group_sizes = res
    dy = dy.astype(lhs.dtype)
    with _mosaic_gpu_mode(interpret):
        # dgrad: dy [M, N] · rhs[g]ᵀ — rhs [G, K, N] read as the K-major operand of a [.., K] output.
        dlhs = _mgpu_forward(dy, rhs, group_sizes, True, tiling)           # [M, K]
        # wgrad: Σ_{rows of g} lhsᵀ dy, tokens as the ragged contracting axis.
        drhs = _mgpu_wgrad(lhs, dy, group_sizes, tiling)                    # [G, K, N]
    # Rows outside every group: the forward never wrote them, so they get no gradient.
    dlhs = jnp.where(_row_mask(group_sizes, lhs.shape[0]), dlhs, 0)
    return dlhs, drhs.astype(rhs.dtype), None


_mgpu_gmm.defvjp(_mgpu_gmm_fwd, _mgpu_gmm_bwd)


def _gmm_mosaic_gpu(lhs, rhs, group_sizes, out_dtype, interpret, tiling):
    m, k = lhs.shape
    n = rhs.shape[2]
    # dgrad contracts over N and wgrad tiles K by block_m and N by block_n: pad both to every block.
    kp = _round_up(k, math.lcm(tiling.block_k, tiling.block_m))
    np_ = _round_up(n, math.lcm(tiling.block_k, tiling.block_n))
    dtype = lhs.dtype
    lhs_p = _pad_to(lhs, 1, kp)                                            # [M, Kp]
    rhs_p = _pad_to(_pad_to(rhs.astype(dtype), 1, kp), 2, np_)             # [G, Kp, Np]
    out = _mgpu_gmm(lhs_p, rhs_p, group_sizes, interpret, tiling)           # [M, Np]
    out = jnp.where(_row_mask(group_sizes, m), out[:, :n], 0)               # unwritten rows → 0
    return out.astype(out_dtype)


# --- megablox (TPU) ------------------------------------------------------------------------------

def _gmm_megablox(lhs, rhs, group_sizes, out_dtype, interpret, tiling):
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
    m, k = lhs.shape
    n = rhs.shape[2]
    tm, tk, tn = tiling
    tm = min(tm, _round_up(m, 8))        # small problems: one short row tile, not 128 rows
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = _zero_grad_outside_groups(_pad_to(_pad_to(lhs, 0, mp), 1, kp), group_sizes)
    rhs_p = _pad_to(_pad_to(rhs.astype(lhs.dtype), 1, kp), 2, np_)         # [G, Kp, Np]
    out = megablox.gmm(lhs_p, rhs_p, group_sizes.astype(jnp.int32), jnp.float32,
                       (tm, tk, tn), None, None, False, interpret)          # [Mp, Np]
    out = jnp.where(_row_mask(group_sizes, m), out[:m, :n], 0)
    return out.astype(out_dtype)


# --- entry point ---------------------------------------------------------------------------------

def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = "auto",
        out_dtype=None, fp8: bool = False, tiling=None) -> jax.Array:
    """Grouped matmul: rows of group g (contiguous, in order) times rhs[g].

    Args:
      lhs: [M, K] in the compute dtype, sorted by group.
      rhs: [G, K, N] (e.g. fp32 master weights; cast to lhs.dtype for the product).
      group_sizes: int [G]; sum ≤ M. Rows past the sum give zeros.
      backend: a name from `CONFIG_BACKENDS` ("auto" → `default_backend()`).
      out_dtype: result dtype (default lhs.dtype).
      fp8: emulated fp8 grouped GEMM (`fp8_ragged_dot`) instead of the backend.
      tiling: backend tile sizes (`MosaicGpuTiling` or megablox's (tm, tk, tn)); None = defaults.

    Returns:
      [M, N] in out_dtype; differentiable in lhs and rhs.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1] \
            or group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"gmm: need lhs [M, K], rhs [G, K, N], group_sizes [G]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    out_dtype = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    if fp8:
        from deepseek_jax.kernels.fp8_linear import fp8_ragged_dot
        out = fp8_ragged_dot(lhs, rhs, group_sizes, out_dtype=out_dtype)
        return jnp.where(_row_mask(group_sizes, lhs.shape[0]), out, 0)
    backend = resolve_backend(backend)
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes).astype(out_dtype)
    if backend == "reference":
        return gmm_reference(lhs, rhs, group_sizes, out_dtype)
    if backend.startswith("mosaic_gpu"):
        return _gmm_mosaic_gpu(lhs, rhs, group_sizes, out_dtype, backend.endswith("interpret"),
                               tiling or MOSAIC_GPU_TILING)
    return _gmm_megablox(lhs, rhs, group_sizes, out_dtype, backend.endswith("interpret"),
                         tiling or MEGABLOX_TILING)
