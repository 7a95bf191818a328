"""Grouped matrix multiplication for routed experts: one API, several backends, one reference.

    gmm(lhs [M, K], rhs [G, K, N], group_sizes [G], backend=...) -> [M, N]

Rows are sorted by group: group g owns the next group_sizes[g] rows of `lhs` and multiplies them
by rhs[g]. Rows past sum(group_sizes) come out as exact zeros on every backend (the expert-
parallel receive buffers rely on it: their padding rows are never part of a group). Groups may be
empty and arbitrarily uneven. Gradients flow to `lhs` and `rhs` (none to the integer sizes).

Backends (`BACKENDS`; "auto" picks by platform and operand dtype with `default_backend`):

  ragged_dot      `jax.lax.ragged_dot`. Native on TPU. On GPU XLA rewrites it into a dense
                  masked dot (11 TFLOP/s on an H200 where a dense GEMM runs 548), so "auto"
                  avoids it there on Hopper for 16-bit and fp8 operands; an fp32 model on a GPU
                  still gets it (wgmma takes no fp32 operands), which suits the small fp32
                  models and nothing large. XLA's CPU backend also runs it densely.
  tiled           plain JAX, "auto" on CPU: the rows in `aligned_layout` with `TILED_ROWS`-row
                  tiles (each group's rows on tiles of their own), each tile multiplied by its
                  group's matrix in one batched einsum over tiles. (M + G·TILED_ROWS)·K·N
                  multiply-adds where a densified ragged_dot does G·M·K·N, at the price of a
                  gathered weight per tile ([M/TILED_ROWS + G, K, N]: a CPU-sized path, not for
                  large models). Autodiff gives the backward (the weight gather becomes a
                  scatter-add over tiles).
  mosaic_gpu      Hopper (sm90) Pallas Mosaic GPU kernels that ship with JAX
                  (`jax.experimental.pallas.ops.gpu`): `ragged_dot_mgpu.ragged_dot` for the forward
                  pass and dgrad (the same kernel reading rhs K-major, `transpose_rhs=True`), and
                  `transposed_ragged_dot_mgpu.transposed_ragged_dot` for wgrad, joined by a
                  `custom_vjp` here (the kernels have no autodiff). Both operands run in the compute
                  dtype, which must be 16-bit (bf16/f16; fp32 is refused with the fix named);
                  the kernels accumulate in fp32 and store in that dtype. K and N are
                  zero-padded to the block sizes, which changes no value.
  megablox        the TPU Pallas grouped GEMM (`jax.experimental.pallas.ops.tpu.megablox.ops.gmm`,
                  its own custom_vjp with gmm/tgmm backward); bf16/fp32 only. M, K and N are
                  zero-padded to the (128, 128, 128) tiles.
  reference       plain JAX: each row gathers its group's matrix. Memory M·K·N; tests only.

Interpret mode (CPU tests of the kernels): "mosaic_gpu_interpret" runs the Mosaic GPU kernels in
JAX's GPU interpreter and "megablox_interpret" runs megablox with `interpret=True`; same maths,
no accelerator, slow (seconds for 256×128×128). Cross-lowering (`.lower(lowering_platforms=...)`)
of "mosaic_gpu" for cuda and "megablox" for tpu also works from a CPU host.

fp8 (`fp8=True`), DeepSeek's recipe on the expert GEMMs:
  mosaic_gpu      the block-scaled fp8 GEMM of `fp8_gpu.py` run grouped: rows are laid out as
                  DeepGEMM's "m-grouped contiguous" layout (`aligned_layout`: each expert's rows
                  start on a 128-row tile of their own, at most 128·G padding rows), and each
                  row tile reads its expert's weight blocks through a tile → group table.
                  Forward: rows in 1×128 tiles along K, weights in 128×128 blocks; dgrad: dy in
                  1×128 tiles along N, the same blocks read the other way. Wgrad: x and dy in
                  128-token tiles that restart at each expert's first row (as V3 quantizes
                  them), multiplied by the bf16 Mosaic wgrad kernel (`transposed_ragged_dot`)
                  after rounding the fp8 values to bf16 (2⁻⁹ relative): a k-grouped fp8 kernel
                  (the token axis as a per-group contraction of dynamic length) is not written.
  other backends  `kernels.fp8_linear.fp8_ragged_dot`, the EMULATED fp8 grouped GEMM (the same
                  numerics on dequantized values, at fp32 speed) over `lax.ragged_dot`. On a GPU
                  XLA densifies that, so there it is refused with a clear error instead.

Left out, and why:
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

import jax
import jax.numpy as jnp

from deepseek_jax.config import MOE_BACKENDS
from deepseek_jax.kernels import fp8, fp8_gpu
from deepseek_jax.kernels.platform import active_platform, target_device
from deepseek_jax.kernels.fp8_linear import (all_gather_dim, fp8_ragged_dot, psum_scatter_dim, group_tiles, normalize_grad,
                                             quantize_token_tiles)

CONFIG_BACKENDS = MOE_BACKENDS                      # "auto" and every backend below
BACKENDS = tuple(b for b in CONFIG_BACKENDS if b != "auto")


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
TILED_ROWS = 64          # rows per tile of the "tiled" backend


def _is_hopper(compute_capability: str | None = None) -> bool:
    cc = compute_capability or getattr(target_device(), "compute_capability", "")
    return str(cc).startswith("9")


def _is_16_bit(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def default_backend(platform: str | None = None, dtype=jnp.bfloat16, fp8: bool = False,
                    compute_capability: str | None = None) -> str:
    """The backend "auto" means on `platform` (default: `kernels.platform.active_platform`, the
    active mesh's devices, else JAX's default backend) for `dtype` rows.

    cpu → tiled; tpu → megablox; gpu → mosaic_gpu on Hopper (compute capability 9.x) when
    the operands are 16-bit or fp8=True (the fp8 kernel quantizes whatever it gets), else
    ragged_dot (the Hopper kernels use wgmma, which other GPUs lack and which takes no fp32).
    compute_capability: the GPU's (e.g. "9.0"); None asks the first device.
    """
    platform = platform or active_platform()
    if platform == "tpu":
        return "megablox"
    if platform in ("gpu", "cuda"):
        hopper = _is_hopper(compute_capability)
        return "mosaic_gpu" if hopper and (fp8 or _is_16_bit(dtype)) else "ragged_dot"
    return "tiled"


def resolve_backend(backend: str, dtype=jnp.bfloat16, fp8: bool = False) -> str:
    """`backend` checked against the operands (`dtype` rows, fp8 or not); "auto" → `default_backend`."""
    if backend not in CONFIG_BACKENDS:
        raise ValueError(f"grouped GEMM backend {backend!r}: use one of {CONFIG_BACKENDS}")
    if backend == "auto":
        return default_backend(dtype=dtype, fp8=fp8)
    if backend.startswith("mosaic_gpu") and not fp8 and not _is_16_bit(dtype):
        raise ValueError(
            f"moe_backend={backend!r} multiplies 16-bit operands only (Hopper's wgmma transposes "
            f"no fp32), got {jnp.dtype(dtype).name} rows: set the model's dtype to bfloat16, or "
            "moe_backend='ragged_dot' (or 'auto') for an fp32 model")
    return backend


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
    """Pallas' GPU interpreter on for interpret mode (CPU tests); nothing otherwise."""
    with contextlib.ExitStack() as stack:
        if interpret:
            from jax._src.pallas.mosaic_gpu.interpret.params import (InterpretGPUParams,
                                                                     force_gpu_interpret_mode)
            stack.enter_context(force_gpu_interpret_mode(InterpretGPUParams()))
        yield


def _mgpu_forward(lhs, rhs, group_sizes, transpose_rhs, t):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(
        lhs, rhs, group_sizes=group_sizes, block_m=t.block_m, block_n=t.block_n,
        block_k=t.block_k, max_concurrent_steps=t.max_concurrent_steps,
        grid_block_n=t.grid_block_n, transpose_rhs=transpose_rhs)


def _mgpu_wgrad(x, dy, group_sizes, t):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd
    if not hasattr(trd.jax.devices()[0], "core_count"):
        raise ValueError(
            "the Mosaic GPU wgrad kernel (transposed_ragged_dot) sizes its grid by the GPU's SM "
            f"count while tracing, and this host's first device {trd.jax.devices()[0]} reports "
            "none: differentiate the mosaic_gpu backend on a Hopper GPU")
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


# --- fp8 on Hopper: block-scaled grouped GEMM ---------------------------------------------------

def aligned_layout(group_sizes, m: int, tile: int = fp8_gpu.BLOCK):
    """DeepGEMM's contiguous layout: every group's rows start on a `tile`-row tile of their own.

    Returns (pos int32 `[M]`: the aligned row of each sorted row, `ma` for rows in no group;
    tile_group int32 `[Ma/tile]`: the group of each tile; ma: the static row count,
    round_up(M, tile) + tile·G, which bounds Σ round_up(size_g, tile)).
    """
    g = group_sizes.shape[0]
    ma = _round_up(m, tile) + tile * g
    sizes = group_sizes.astype(jnp.int32)                                   # [G]
    ends = jnp.cumsum(sizes)                                                # [G]
    padded = -(-sizes // tile) * tile                                       # [G]
    a_ends = jnp.cumsum(padded)                                             # [G]
    rows = jnp.arange(m, dtype=jnp.int32)                                   # [M]
    grp = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), g - 1)   # [M]
    pos = a_ends[grp] - padded[grp] + rows - (ends[grp] - sizes[grp])       # [M]
    pos = jnp.where(rows < ends[-1], pos, ma)
    tile_rows = jnp.arange(ma // tile, dtype=jnp.int32) * tile
    tile_group = jnp.minimum(jnp.searchsorted(a_ends, tile_rows, side="right"), g - 1)
    return pos, tile_group.astype(jnp.int32), ma


def _gmm_tiled(lhs, rhs, group_sizes, out_dtype, tile: int = TILED_ROWS):
    """The "tiled" backend: lhs [M, K] in the aligned layout, [Ma/tile] tiles × their group's
    rhs [K, N], then back to the sorted rows ([M, N]; rows in no group are zeros)."""
    m, k = lhs.shape
    pos, tile_group, ma = aligned_layout(group_sizes, m, tile)
    aligned = jnp.zeros((ma, k), lhs.dtype).at[pos].set(lhs, mode="drop")  # [Ma, K]
    tiles = aligned.reshape(ma // tile, tile, k)                            # [Ma/tile, tile, K]
    w = rhs.astype(lhs.dtype)[tile_group]                                   # [Ma/tile, K, N]
    out = jnp.einsum("nmk,nkf->nmf", tiles, w,
                     preferred_element_type=jnp.float32).reshape(ma, -1)    # [Ma, N]
    return out.at[pos].get(mode="fill", fill_value=0).astype(out_dtype)    # [M, N]


def _fp8_grouped_nt(rows, b_q, b_s, group_sizes, out_dtype, interpret):
    """rows `[M, K]` (sorted) · b[g]ᵀ for b_q `[G, N, K]` fp8 with 128×128 scales `[G, NB, J]`:
    rows quantized in 1×128 tiles along K, in the aligned layout; `[M, N]` in out_dtype."""
    m = rows.shape[0]
    pos, tile_group, ma = aligned_layout(group_sizes, m)
    aligned = jnp.zeros((ma, rows.shape[1]), rows.dtype).at[pos].set(rows, mode="drop")  # [Ma, K]
    a_q, a_s = fp8.quantize_activation(aligned)                             # [Ma, K], [Ma, J]
    out = fp8_gpu.grouped_gemm_nt(a_q, a_s, b_q, b_s, tile_group, out_dtype=out_dtype,
                                  interpret=interpret)                      # [Ma, N]
    return out.at[pos].get(mode="fill", fill_value=0)                       # [M, N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fp8_hopper_gmm(rows, w, group_sizes, out_dtype, x_dtype, w_dtype, interpret):
    return _fp8_hopper_gmm_fwd(rows, w, group_sizes, out_dtype, x_dtype, w_dtype, interpret)[0]


def _fp8_hopper_gmm_fwd(rows, w, group_sizes, out_dtype, x_dtype, w_dtype, interpret):
    w_q, w_s = jax.vmap(fp8.quantize_weight)(w)                             # [G, K, N], [G, KB, NB]
    y = _fp8_grouped_nt(rows, jnp.einsum("GKN->GNK", w_q), jnp.einsum("GBC->GCB", w_s),
                        group_sizes, out_dtype, interpret)                  # [M, N]
    tiles, n_tiles = group_tiles(group_sizes, rows.shape[0])                # [M]
    x_t_q, x_t_s = quantize_token_tiles(rows, tiles, n_tiles)               # [M, K], [tiles, K]
    return y, (x_t_q, x_t_s, w_q, w_s, group_sizes)


def _fp8_hopper_gmm_bwd(out_dtype, x_dtype, w_dtype, interpret, res, dy):
    x_t_q, x_t_s, w_q, w_s, group_sizes = res
    m, n = dy.shape
    k = x_t_q.shape[1]
    dy, unscale = normalize_grad(dy)                                        # exact
    # dgrad: dy in 1×128 tiles along N times each group's blocks read as [K rows, N contraction].
    dx = _fp8_grouped_nt(dy, w_q, w_s, group_sizes, jnp.float32, interpret)  # [M, K]
    # wgrad: 128-token tiles per group on both sides, as fp8 values; the product runs in bf16
    # on the Mosaic transposed grouped GEMM (see the module docstring).
    tiles, n_tiles = group_tiles(group_sizes, m)                            # [M]
    dy_t_q, dy_t_s = quantize_token_tiles(dy, tiles, n_tiles)               # [M, N], [tiles, N]
    x_t = (x_t_q.astype(jnp.float32) * x_t_s[tiles]).astype(jnp.bfloat16)  # [M, K]
    dy_t = (dy_t_q.astype(jnp.float32) * dy_t_s[tiles]).astype(jnp.bfloat16)  # [M, N]
    t = MOSAIC_GPU_TILING
    kp = _round_up(k, math.lcm(t.block_k, t.block_m))
    np_ = _round_up(n, math.lcm(t.block_k, t.block_n))
    with _mosaic_gpu_mode(interpret):
        dw = _mgpu_wgrad(_pad_to(x_t, 1, kp), _pad_to(dy_t, 1, np_), group_sizes, t)  # [G, Kp, Np]
    dw = dw[:, :k, :n].astype(jnp.float32)
    dx = jnp.where(_row_mask(group_sizes, m), dx, 0)
    return (dx * unscale).astype(x_dtype), (dw * unscale).astype(w_dtype), None


_fp8_hopper_gmm.defvjp(_fp8_hopper_gmm_fwd, _fp8_hopper_gmm_bwd)


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
    # The kernel accumulates in an fp32 scratch and casts each tile once when storing it, so
    # asking for `out_dtype` gives the same values as an fp32 result cast afterwards, without
    # the [M, N] fp32 array (and its fp32 cotangent in the backward pass).
    out = megablox.gmm(lhs_p, rhs_p, group_sizes.astype(jnp.int32), jnp.dtype(out_dtype),
                       (tm, tk, tn), None, None, False, interpret)          # [Mp, Np]
    return jnp.where(_row_mask(group_sizes, m), out[:m, :n], 0)


# --- a weight split over devices, gathered for the product ------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gathered_gmm(lhs, rhs, group_sizes, gather, kw):
    """`gmm(lhs, all_gather(rhs), ...)` that keeps only the local shard of rhs for the backward
    (which gathers it again, as FSDP does) and reduce-scatters rhs's gradient."""
    return gmm(lhs, all_gather_dim(rhs, *gather), group_sizes, **dict(kw))


def _gathered_gmm_fwd(lhs, rhs, group_sizes, gather, kw):
    return _gathered_gmm(lhs, rhs, group_sizes, gather, kw), (lhs, rhs, group_sizes)


def _gathered_gmm_bwd(gather, kw, res, g):
    lhs, rhs, group_sizes = res
    # The product's forward value is unused here, so the compiler drops it: only the two
    # transposed GEMMs run.
    _, pull = jax.vjp(lambda a, b: gmm(a, b, group_sizes, **dict(kw)), lhs,
                      all_gather_dim(rhs, *gather))
    d_lhs, d_rhs = pull(g)
    return d_lhs, psum_scatter_dim(d_rhs, *gather), None


_gathered_gmm.defvjp(_gathered_gmm_fwd, _gathered_gmm_bwd)


# --- entry point ---------------------------------------------------------------------------------

def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, backend: str = "auto",
        out_dtype=None, fp8: bool = False, tiling=None,
        gather: tuple[tuple[str, ...], int] | None = None) -> jax.Array:
    """Grouped matmul: rows of group g (contiguous, in order) times rhs[g].

    Args:
      lhs: [M, K] in the compute dtype, sorted by group.
      rhs: [G, K, N] (e.g. fp32 master weights; cast to lhs.dtype for the product).
      group_sizes: int [G]; sum ≤ M. Rows past the sum give zeros.
      backend: a name from `CONFIG_BACKENDS` ("auto" → `default_backend()`).
      out_dtype: result dtype (default lhs.dtype).
      fp8: emulated fp8 grouped GEMM (`fp8_ragged_dot`) instead of the backend.
      tiling: backend tile sizes (`MosaicGpuTiling` or megablox's (tm, tk, tn)); None = defaults.
      gather: inside a `shard_map`, `(mesh axes, dim)` when rhs is this device's shard along
        dim 1 or 2 over those axes. The fp8 emulation gathers it quantized (`fp8_ragged_dot`);
        every other path all-gathers rhs as it is. Either way the forward and the backward
        gather it once each (only the shard is kept in between) and rhs's gradient leaves as
        a reduce-scatter.

    Returns:
      [M, N] in out_dtype; differentiable in lhs and rhs.
    """
    split_k = gather is not None and gather[1] == 1                       # rhs holds part of K
    if lhs.ndim != 2 or rhs.ndim != 3 or (lhs.shape[1] != rhs.shape[1] and not split_k) \
            or group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"gmm: need lhs [M, K], rhs [G, K, N], group_sizes [G]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    out_dtype = jnp.dtype(lhs.dtype if out_dtype is None else out_dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    backend = resolve_backend(backend, lhs.dtype, fp8)
    emulated_fp8 = fp8 and not backend.startswith("mosaic_gpu")
    if gather is not None and not (emulated_fp8 and rhs.shape[gather[1]] % fp8_gpu.BLOCK == 0):
        return _gathered_gmm(lhs, rhs, group_sizes, (tuple(gather[0]), gather[1]),
                             dict(backend=backend, out_dtype=out_dtype, fp8=fp8, tiling=tiling))
    if lhs.shape[1] != rhs.shape[1] and not (split_k and gather is not None):
        raise ValueError(f"gmm: lhs {lhs.shape} and the gathered rhs {rhs.shape} differ in K")
    if fp8:
        if backend.startswith("mosaic_gpu"):
            return _fp8_hopper_gmm(lhs, rhs, group_sizes, out_dtype, jnp.dtype(lhs.dtype),
                                   jnp.dtype(rhs.dtype), backend.endswith("interpret"))
        if backend in ("ragged_dot", "tiled") and active_platform() == "gpu":
            raise ValueError(
                "fp8 routed experts on a GPU need the Hopper fp8 grouped GEMM "
                "(moe_backend='mosaic_gpu' or 'auto' on an sm90 GPU): the portable emulation runs "
                "lax.ragged_dot, which XLA's GPU backend turns into a dense masked GEMM with "
                "G times the FLOPs and memory. Use moe_impl='dense' or fp8=False on this GPU")
        out = fp8_ragged_dot(lhs, rhs, group_sizes, out_dtype=out_dtype, gather=gather)
        return jnp.where(_row_mask(group_sizes, lhs.shape[0]), out, 0)
    if backend == "ragged_dot":
        return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes).astype(out_dtype)
    if backend == "tiled":
        return _gmm_tiled(lhs, rhs, group_sizes, out_dtype)
    if backend == "reference":
        return gmm_reference(lhs, rhs, group_sizes, out_dtype)
    if backend.startswith("mosaic_gpu"):
        return _gmm_mosaic_gpu(lhs, rhs, group_sizes, out_dtype, backend.endswith("interpret"),
                               tiling or MOSAIC_GPU_TILING)
    return _gmm_megablox(lhs, rhs, group_sizes, out_dtype, backend.endswith("interpret"),
                         tiling or MEGABLOX_TILING)
