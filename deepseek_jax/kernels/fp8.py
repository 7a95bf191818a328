"""DeepSeek-V3's fp8 recipe: block quantizers and block-scaled GEMMs (reference, Mosaic GPU, Mosaic TPU).

Recipe (V3 report §3.3; DeepGEMM; spec §5):
  * e4m3 (`jnp.float8_e4m3fn`, largest finite 448) for every GEMM input, fp32 scales.
  * activations: one scale per 1×128 tile along the contraction axis (per token per 128 channels);
    weights: one scale per 128×128 block, stored K-major `[N, K]` (DeepSeek's checkpoint layout,
    and the layout fp8 wgmma needs). scale = max(amax, 1e-4) / 448, q = x / scale; with
    `scale_fmt="ue8m0"` (V3.1) the scale is rounded up to a power of two. Blocks that run past a
    non-multiple shape are zero-padded when their amax is taken.
  * GEMM `a @ b.T` with fp32 accumulation promoted every 128 K: each 128-K block's fp32 partial
    product is multiplied by its row scale × B scale and added to an fp32 sum.
  * the three products of a linear layer y = x Wᵀ: forward `fp8_matmul(x, W)`, dgrad
    `dx = dy W` = `fp8_dgrad(dy, Wᵀ)` with dy in 1×128 tiles along N and the 128×128 blocks of Wᵀ
    (the same blocks, transposed: `transpose_quantized_weight`, or quantize the Flax `[K, N]`
    kernel directly), and wgrad `dW = dyᵀ x` = `fp8_wgrad(dyᵀ, xᵀ)` with 1×128 tiles along the
    tokens on both sides (`quantize_activation(..., transpose=True)`).

Kernel alphabet (einsum strings and shape comments here, in fp8_gpu.py and fp8_tpu.py): M rows of
the output (tokens in forward/dgrad), N output columns, K contraction, J = ceil(K/128) scale
blocks along K, L = 128 lanes of one block, NB = ceil(N/128) weight-scale blocks along N.

Backends (`backend=` of every GEMM below):
  "reference"            plain JAX: a loop over the J blocks, fp8 dot → fp32, scale, add. Runs
                         anywhere; it defines the numerics the kernels are tested against.
  "mosaic_gpu"           Pallas Mosaic GPU kernel for Hopper (fp8_gpu.py): TMA + warp-specialized
                         pipeline, fp8 wgmma into fp32, promotion every 128 K. Hopper only.
  "mosaic_tpu"           Pallas TPU kernel (fp8_tpu.py): blocked matmul, fp32 VMEM accumulator,
                         per-128-K scaling; e4m3 on the MXU where native (TPU7x), else bf16.
  "pallas_interpret"     the Mosaic GPU kernel in Pallas' GPU interpret mode (CPU, for tests);
                         same as "mosaic_gpu_interpret".
  "mosaic_tpu_interpret" the TPU kernel in Pallas interpret mode (CPU, for tests).
  "auto"                 Hopper GPU → mosaic_gpu, TPU → mosaic_tpu, anything else → reference.

Shapes: M, N and K need not be multiples of anything: the kernels zero-pad to their tiles (a
copy of the operands when padding is needed; V3's shapes other than N = 2112 need none).

Verified from CPU (tests/kernels/test_fp8.py): quantizers against NumPy float64, every backend
against NumPy float64 on random data, the kernels in interpret mode against the same promoted sum.
What can be checked without an accelerator, in JAX 0.11.2:
  * cuda: `jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",))` lowers the Mosaic GPU
    kernel at V3's shapes; this runs Mosaic's layout inference, its wgmma operand checks (fp8
    transposes are refused there) and its shared-memory check (227 KiB when no device is
    present). Compiling to a cubin is not possible from CPU: `.compile()` fails with "No FFI
    handler registered for mosaic_gpu_v2 on a platform Host", and
    `jax.experimental.topologies.get_topology_desc(platform="cuda", ...)` raises "topology not
    implemented for cuda". So register pressure, PTX and run-time behaviour need a GPU.
  * tpu: `.lower(lowering_platforms=("tpu",))` works with plain jax; with libtpu installed
    (`pip install "jax[tpu]==0.11.2"`, libtpu 0.0.48.1) the kernel also compiles ahead of time
    for a topology (`topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")`,
    "v6e:2x2", "TPU7x:2x2x1"), which checks VMEM, tiling and dtype support.
Pass an explicit backend when cross-lowering: "auto" looks at the machine doing the tracing.
Not yet run on a GPU or TPU.

Left out, and why: an fp8 output / fused quantize-epilogue (DeepSeek keeps GEMM outputs in
BF16/FP32), e5m2 gradients (V3 uses e4m3 everywhere), DeepSeek's E5M6 cache format, grouped (MoE)
GEMMs (a separate kernel file), a `custom_vjp` linear layer wiring the three products together
(belongs with the model layer that uses it), and split-K for tiny M on GPU (see fp8_gpu.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from deepseek_jax.config import FP8_BACKENDS
from deepseek_jax.kernels import fp8_gpu, fp8_tpu
from deepseek_jax.kernels.platform import active_platform, target_device

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # DeepSeek's clamp: an all-zero tile gets scale 1e-4 / 448, not 0
BLOCK = 128  # the only block size the GEMMs take (quantizers accept others)
FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)
SCALE_FMTS = (None, "ue8m0")
BACKENDS = FP8_BACKENDS  # "auto" and the backends in the module docstring


# ---------------------------------------------------------------------------------------------
# Quantizers


def _check_quant_args(name: str, x, block: int, scale_fmt) -> None:
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"{name}: block must be a positive int, got {block!r}")
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"{name}: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")


def _scale_from_amax(amax, scale_fmt):
    """fp32 scale = max(amax, 1e-4) / 448, optionally rounded up to a power of two (ue8m0)."""
    scale = jnp.maximum(amax, AMAX_FLOOR) / E4M3_MAX
    if scale_fmt == "ue8m0":
        mant, expo = jnp.frexp(scale)  # scale = mant · 2^expo, mant in [0.5, 1): exact
        scale = jnp.ldexp(jnp.ones_like(scale), jnp.where(mant == 0.5, expo - 1, expo))
    return scale


def _to_e4m3(x):
    # |x / scale| <= 448 by construction; the clip only guards against a last-ulp overshoot.
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


@functools.partial(jax.jit, static_argnames=("block", "scale_fmt", "transpose"))
def quantize_activation(x, *, block: int = BLOCK, scale_fmt: str | None = None,
                        transpose: bool = False):
    """1×`block` tiles along the last axis → (x_q e4m3 `[..., K]`, x_scale fp32 `[..., ceil(K/block)]`).

    transpose=True takes a 2-D `x` `[M, K]` and quantizes `xᵀ` along the tokens instead:
    x_q `[K, M]`, x_scale `[K, ceil(M/block)]` — the layout wgrad needs (`fp8_wgrad`).
    """
    _check_quant_args("quantize_activation", x, block, scale_fmt)
    if transpose:
        if x.ndim != 2:
            raise ValueError(f"quantize_activation(transpose=True) needs a 2-D [M, K] array, got {x.shape}")
        x = jnp.einsum("MK->KM", x)  # [K, M]
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"quantize_activation: need a non-empty last axis, got shape {x.shape}")
    *lead, k = x.shape
    nj = -(-k // block)
    xp = jnp.pad(x.astype(jnp.float32), [(0, 0)] * len(lead) + [(0, nj * block - k)])  # [..., J·L]
    xb = xp.reshape(*lead, nj, block)  # [..., J, L]
    scale = _scale_from_amax(jnp.max(jnp.abs(xb), axis=-1), scale_fmt)  # [..., J]
    x_q = _to_e4m3(xb / scale[..., None])  # [..., J, L]
    return x_q.reshape(*lead, nj * block)[..., :k], scale  # [..., K], [..., J]


@functools.partial(jax.jit, static_argnames=("block", "scale_fmt"))
def quantize_weight(w, *, block: int = BLOCK, scale_fmt: str | None = None):
    """`block`×`block` blocks of a K-major weight `[N, K]` → (w_q e4m3 `[N, K]`, w_scale `[NB, J]`).

    NB = ceil(N/block), J = ceil(K/block); partial edge blocks are zero-padded for their amax.
    For a Flax kernel `[K, N]` use `quantize_flax_weight`.
    """
    _check_quant_args("quantize_weight", w, block, scale_fmt)
    if w.ndim != 2 or 0 in w.shape:
        raise ValueError(f"quantize_weight: expected a non-empty 2-D [N, K] weight, got shape {w.shape}")
    n, k = w.shape
    nb, nj = -(-n // block), -(-k // block)
    wp = jnp.pad(w.astype(jnp.float32), ((0, nb * block - n), (0, nj * block - k)))  # [NB·L, J·L]
    wb = wp.reshape(nb, block, nj, block)  # [NB, L, J, L]
    scale = _scale_from_amax(jnp.max(jnp.abs(wb), axis=(1, 3)), scale_fmt)  # [NB, J]
    w_q = _to_e4m3(wb / scale[:, None, :, None])  # [NB, L, J, L]
    return w_q.reshape(nb * block, nj * block)[:n, :k], scale  # [N, K], [NB, J]


def quantize_flax_weight(kernel, *, block: int = BLOCK, scale_fmt: str | None = None):
    """Flax `nn.Dense` kernel `[K, N]` (in, out) → K-major (w_q `[N, K]`, w_scale `[NB, J]`).

    Quantizing `kernel` itself with `quantize_weight` gives instead the `[K, N]` operand of dgrad
    (`fp8_dgrad`); both have the same 128×128 blocks, transposed.
    """
    if kernel.ndim != 2:
        raise ValueError(f"quantize_flax_weight: expected a 2-D [K, N] kernel, got shape {kernel.shape}")
    return quantize_weight(jnp.einsum("KN->NK", kernel), block=block, scale_fmt=scale_fmt)


def transpose_quantized_weight(w_q, w_scale):
    """(w_q `[N, K]`, w_scale `[NB, J]`) → (`[K, N]`, `[J, NB]`): Wᵀ for dgrad, exactly (blocks are square)."""
    return jnp.einsum("NK->KN", w_q), jnp.einsum("BJ->JB", w_scale)


def _expand(scale, size: int, axis: int, block: int):
    return lax.slice_in_dim(jnp.repeat(scale, block, axis=axis), 0, size, axis=axis)


def dequantize_activation(x_q, x_scale, *, block: int = BLOCK, dtype=jnp.float32):
    """Inverse of `quantize_activation`: x_q `[..., K]` · x_scale `[..., J]` → `[..., K]` in `dtype`."""
    k = x_q.shape[-1]
    if x_scale.shape != (*x_q.shape[:-1], -(-k // block)):
        raise ValueError(f"dequantize_activation: x_scale {x_scale.shape} does not match x_q {x_q.shape} "
                         f"with block={block} (expected {(*x_q.shape[:-1], -(-k // block))})")
    return (x_q.astype(jnp.float32) * _expand(x_scale, k, -1, block)).astype(dtype)


def dequantize_weight(w_q, w_scale, *, block: int = BLOCK, dtype=jnp.float32):
    """Inverse of `quantize_weight`: w_q `[N, K]` · w_scale `[NB, J]` → `[N, K]` in `dtype`."""
    n, k = w_q.shape
    if w_scale.shape != (-(-n // block), -(-k // block)):
        raise ValueError(f"dequantize_weight: w_scale {w_scale.shape} does not match w_q {w_q.shape} "
                         f"with block={block} (expected {(-(-n // block), -(-k // block))})")
    s = _expand(_expand(w_scale, n, 0, block), k, 1, block)  # [N, K]
    return (w_q.astype(jnp.float32) * s).astype(dtype)


# ---------------------------------------------------------------------------------------------
# GEMMs


def _check_gemm(name, a_q, a_scale, b_q, b_scale, b_scaling, names):
    """Validates `a @ b.T` operands; `names` = (a, a_scale, b, b_scale) as the caller calls them."""
    an, asn, bn, bsn = names
    for arr, nm in ((a_q, an), (b_q, bn)):
        if arr.ndim != 2:
            raise ValueError(f"{name}: {nm} must be 2-D, got shape {arr.shape}")
        if arr.dtype not in FP8_DTYPES:
            raise TypeError(f"{name}: {nm} has dtype {arr.dtype}; quantize it first (quantize_activation / "
                            "quantize_weight give float8_e4m3fn)")
    m, k = a_q.shape
    n, k2 = b_q.shape
    if k != k2:
        raise ValueError(f"{name}: {an} {a_q.shape} and {bn} {b_q.shape} must share the contraction "
                         f"(last) axis; got {k} and {k2}. Weights are stored K-major [N, K]: for a Flax "
                         "[K, N] kernel use quantize_flax_weight")
    nj = -(-k // BLOCK)
    if a_scale.shape != (m, nj):
        raise ValueError(f"{name}: {asn} must have shape (M, ceil(K/{BLOCK})) = {(m, nj)}, got "
                         f"{a_scale.shape} (1×{BLOCK} tiles along K)")
    want = (-(-n // BLOCK), nj) if b_scaling == "block" else (n, nj)
    kind = f"{BLOCK}×{BLOCK} blocks" if b_scaling == "block" else f"1×{BLOCK} tiles along K"
    if b_scale.shape != want:
        raise ValueError(f"{name}: {bsn} must have shape {want} ({kind}), got {b_scale.shape}")
    for s, nm in ((a_scale, asn), (b_scale, bsn)):
        if not jnp.issubdtype(s.dtype, jnp.floating):
            raise TypeError(f"{name}: {nm} must be floating point (fp32), got {s.dtype}")


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    platform = active_platform()
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1 and set(mesh.manual_axes) != set(mesh.axis_names):
        # XLA cannot partition a Mosaic call: the Pallas GEMMs run only where every mesh axis
        # is manual (the fp8 linear layers' shard_map over the batch axes and the axes of size
        # 1, which is the whole mesh under dp and fsdp). With an axis left to the compiler
        # (tensor parallelism), or outside any shard_map, "auto" takes the XLA reference GEMM
        # (the same math).
        return "reference"
    if platform == "tpu":
        return "mosaic_tpu"
    if platform == "gpu":
        cc = getattr(target_device(), "compute_capability", "")
        return "mosaic_gpu" if str(cc).startswith("9") else "reference"  # wgmma is Hopper-only
    return "reference"


def _gemm_nt_reference(a_q, a_scale, b_q, b_scale, *, b_scaling, out_dtype):
    """Plain JAX: for each 128-K block j, fp8 dot → fp32 partial, × scales, + fp32 sum."""
    m, k = a_q.shape
    n = b_q.shape[0]
    nj = a_scale.shape[1]
    a = jnp.pad(a_q, ((0, 0), (0, nj * BLOCK - k))).reshape(m, nj, BLOCK)  # [M, J, L]
    b = jnp.pad(b_q, ((0, 0), (0, nj * BLOCK - k))).reshape(n, nj, BLOCK)  # [N, J, L]
    a_scale = a_scale.astype(jnp.float32)  # [M, J]
    if b_scaling == "block":
        b_col = _expand(b_scale.astype(jnp.float32), n, 0, BLOCK)  # [N, J]
    else:
        b_col = b_scale.astype(jnp.float32)  # [N, J]

    def add_block(j, acc):
        a_j = lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)  # [M, L]
        b_j = lax.dynamic_index_in_dim(b, j, axis=1, keepdims=False)  # [N, L]
        part = jnp.einsum("ML,NL->MN", a_j, b_j, preferred_element_type=jnp.float32)  # [M, N]
        scale = jnp.einsum("M,N->MN", a_scale[:, j], b_col[:, j])  # [M, N]
        return acc + part * scale

    acc = lax.fori_loop(0, nj, add_block, jnp.zeros((m, n), jnp.float32))  # [M, N]
    return acc.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("b_scaling", "out_dtype", "backend", "config"))
def fp8_gemm_nt(a_q, a_scale, b_q, b_scale, *, b_scaling: str = "block", out_dtype=jnp.bfloat16,
                backend: str = "auto", config=None):
    """`a @ b.T` → `[M, N]` in `out_dtype`, fp32 accumulation promoted every 128 K.

    a_q `[M, K]` fp8 with a_scale `[M, J]` (1×128 tiles); b_q `[N, K]` fp8 with b_scale
    `[NB, J]` (b_scaling="block", 128×128) or `[N, J]` (b_scaling="row", 1×128 tiles).
    config: an `fp8_gpu.GpuConfig` / `fp8_tpu.TpuConfig` to override the kernel's tiling.
    The general form of `fp8_matmul`, `fp8_dgrad` and `fp8_wgrad`.
    """
    if b_scaling not in ("block", "row"):
        raise ValueError(f"fp8_gemm_nt: b_scaling must be 'block' or 'row', got {b_scaling!r}")
    _check_gemm("fp8_gemm_nt", a_q, a_scale, b_q, b_scale, b_scaling, ("a_q", "a_scale", "b_q", "b_scale"))
    return _dispatch(a_q, a_scale, b_q, b_scale, b_scaling, out_dtype, backend, config)


def _dispatch(a_q, a_scale, b_q, b_scale, b_scaling, out_dtype, backend, config):
    backend = _resolve_backend(backend)
    if backend == "reference":
        return _gemm_nt_reference(a_q, a_scale, b_q, b_scale, b_scaling=b_scaling, out_dtype=out_dtype)
    if backend in ("mosaic_gpu", "pallas_interpret", "mosaic_gpu_interpret"):
        if config is not None and not isinstance(config, fp8_gpu.GpuConfig):
            raise TypeError(f"backend {backend!r} takes an fp8_gpu.GpuConfig, got {type(config).__name__}")
        return fp8_gpu.gemm_nt(a_q, a_scale, b_q, b_scale, b_scaling=b_scaling, out_dtype=out_dtype,
                               config=config, interpret=backend != "mosaic_gpu")
    if config is not None and not isinstance(config, fp8_tpu.TpuConfig):
        raise TypeError(f"backend {backend!r} takes an fp8_tpu.TpuConfig, got {type(config).__name__}")
    return fp8_tpu.gemm_nt(a_q, a_scale, b_q, b_scale, b_scaling=b_scaling, out_dtype=out_dtype,
                           config=config, interpret=backend == "mosaic_tpu_interpret")


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config"))
def fp8_matmul(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16, backend: str = "auto", config=None):
    """Forward `x @ w.T`: x_q `[..., K]` with x_scale `[..., J]`, w_q `[N, K]` with w_scale `[NB, J]` → `[..., N]`."""
    if x_q.ndim < 2:
        raise ValueError(f"fp8_matmul: x_q must be [..., M, K] (at least 2-D), got shape {x_q.shape}")
    lead = x_q.shape[:-1]
    if x_scale.shape[:-1] != lead:
        raise ValueError(f"fp8_matmul: x_scale {x_scale.shape} must share the leading axes of x_q {x_q.shape}")
    x2 = x_q.reshape(-1, x_q.shape[-1])  # [M, K]
    s2 = x_scale.reshape(-1, x_scale.shape[-1])  # [M, J]
    _check_gemm("fp8_matmul", x2, s2, w_q, w_scale, "block", ("x_q", "x_scale", "w_q", "w_scale"))
    y = _dispatch(x2, s2, w_q, w_scale, "block", out_dtype, backend, config)  # [M, N]
    return y.reshape(*lead, w_q.shape[0])


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config"))
def fp8_dgrad(dy_q, dy_scale, w_t_q, w_t_scale, *, out_dtype=jnp.bfloat16, backend: str = "auto", config=None):
    """Dgrad `dx = dy @ W` = `dy @ (Wᵀ).T`: dy_q `[M, N]` with dy_scale `[M, ceil(N/128)]`,
    w_t_q `[K, N]` = Wᵀ with w_t_scale `[ceil(K/128), ceil(N/128)]` → dx `[M, K]`.

    Wᵀ: `transpose_quantized_weight(w_q, w_scale)`, or `quantize_weight` of the Flax `[K, N]` kernel.
    """
    _check_gemm("fp8_dgrad", dy_q, dy_scale, w_t_q, w_t_scale, "block", ("dy_q", "dy_scale", "w_t_q", "w_t_scale"))
    return _dispatch(dy_q, dy_scale, w_t_q, w_t_scale, "block", out_dtype, backend, config)


@functools.partial(jax.jit, static_argnames=("out_dtype", "backend", "config"))
def fp8_wgrad(dy_t_q, dy_t_scale, x_t_q, x_t_scale, *, out_dtype=jnp.float32, backend: str = "auto", config=None):
    """Wgrad `dW = dyᵀ @ x` → `[N, K]` (K-major, like W), contracting over the M tokens.

    dy_t_q `[N, M]` with dy_t_scale `[N, ceil(M/128)]` and x_t_q `[K, M]` with x_t_scale
    `[K, ceil(M/128)]`: both quantized in 1×128 tiles along the tokens
    (`quantize_activation(dy, transpose=True)`, same for x). fp32 output by default (weight
    gradients are kept in fp32 in the recipe).
    """
    _check_gemm("fp8_wgrad", dy_t_q, dy_t_scale, x_t_q, x_t_scale, "row",
                ("dy_t_q", "dy_t_scale", "x_t_q", "x_t_scale"))
    return _dispatch(dy_t_q, dy_t_scale, x_t_q, x_t_scale, "row", out_dtype, backend, config)


def fp8_matmul_reference(x_q, x_scale, w_q, w_scale, *, out_dtype=jnp.bfloat16):
    """Plain-JAX reference of `fp8_matmul` (same signature, no backend)."""
    return fp8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, backend="reference")


def fp8_dgrad_reference(dy_q, dy_scale, w_t_q, w_t_scale, *, out_dtype=jnp.bfloat16):
    """Plain-JAX reference of `fp8_dgrad`."""
    return fp8_dgrad(dy_q, dy_scale, w_t_q, w_t_scale, out_dtype=out_dtype, backend="reference")


def fp8_wgrad_reference(dy_t_q, dy_t_scale, x_t_q, x_t_scale, *, out_dtype=jnp.float32):
    """Plain-JAX reference of `fp8_wgrad`."""
    return fp8_wgrad(dy_t_q, dy_t_scale, x_t_q, x_t_scale, out_dtype=out_dtype, backend="reference")
