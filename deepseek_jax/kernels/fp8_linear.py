"""fp8 linear layers for training: DeepSeek-V3's three GEMMs (Fprop, Dgrad, Wgrad) under one `custom_vjp`.

What is in:

  fp8_dot         y = x @ w for x `[..., K]` and a Flax kernel w `[K, N]` (the fp32 master
                  weight). Forward: x in 1×128 tiles along K, w in 128×128 blocks emitted K-major
                  `[N, K]` (`quantize_flax_weight`), `fp8_matmul`. Backward (V3 §3.3, Fig. 6):
                    dgrad  dx = dy @ wᵀ   dy in 1×128 tiles along N, the same 128×128 blocks of w
                                          transposed (`transpose_quantized_weight`), `fp8_dgrad`;
                    wgrad  dw = xᵀ @ dy   dy and x both in 1×128 tiles along the tokens,
                                          `fp8_wgrad`, fp32 output.
                  Residuals are fp8 tensors and their fp32 scales only, as V3 caches activations
                  in fp8: xᵀ already quantized along the tokens (the operand wgrad reads; it is
                  quantized from the full-precision x in the forward pass, as a fused
                  quantize-both-layouts kernel would) and the quantized weight. The
                  full-precision x is not kept. The incoming gradient is first scaled by an
                  exact power of two (`normalize_grad`) so that the quantizer's 1e-4 amax
                  floor cannot flatten small gradients.
  fp8_einsum      a projection written as an einsum (`"BTQ,QNH->BTNH"`, `"...F,FD->...D"`): the
                  weight's contracted axes are flattened into K and its output axes into N around
                  `fp8_dot`, so the 128×128 blocks run over the flattened `[K, N]` matrix (as
                  in DeepSeek's 2-D checkpoint matrices, whose head axes are flattened too).
  fp8_ragged_dot  the routed-expert GEMM (`jax.lax.ragged_dot` over rows sorted by expert) with
                  fp8 numerics, by EMULATION: rows are quantized in 1×128 tiles along K, each
                  expert's weight in 128×128 blocks, and `ragged_dot` runs on the dequantized
                  values with fp32 accumulation (HIGHEST precision, so no accelerator drops to
                  bf16 passes). Every product is the product of the e4m3 codes times their scales,
                  so this is the numerics of a block-scaled fp8 grouped GEMM up to fp32 rounding
                  and summation order; it is not faster than bf16 (it is slower: fp32 GEMMs plus
                  the quantize/dequantize passes). Backward as in `fp8_dot`: dgrad with dy in
                  1×128 tiles along N and the same weight blocks; wgrad with 1×128 tiles along
                  the tokens that restart at every expert's first row (DeepGEMM's "contiguous"
                  layout aligns each expert's segment to 128 rows, so no tile mixes two
                  experts). On Hopper `grouped_gemm.gmm(..., fp8=True)` runs the fp8 kernel
                  instead; this emulation is its reference and the path on other platforms.

Numbers to expect: e4m3 keeps 3 mantissa bits, so one rounding is off by at most 2⁻⁴ relative and
by about 2.6 % rms over a binade; a product of two quantized operands is off by ≈ √2 · 2.6 ≈ 3.7 %
rms per term. On random data the errors of the K terms are independent, so the output's error
relative to its typical size is the same ≈ 3.7 % rms (it neither grows nor shrinks with K), i.e.
DeepGEMM's `1 − 2Σxy/Σ(x²+y²)` ≈ 0.037²/2 ≈ 7e-4 (tests/kernels/test_fp8_linear.py measures it).

Left out, and why: DeepSeek's E5M6 cache for the input of the linear after attention and its
power-of-two re-tiling (e4m3 1×128 here, like every other input); the fp8 all-to-all dispatch
(expert parallelism lives in `deepseek_jax.parallel`); fusing the gate and up projections into
one GEMM (their blocks would straddle the two halves when F is not a multiple of 128); delayed
scaling (V3 uses online amax, as here).

Sharded (`token_axes` of `fp8_dot` / `fp8_einsum`, `gather` of `fp8_ragged_dot`): the reference
GEMMs loop over 128-blocks with `fori_loop`, and a loop that indexes a sharded axis makes the SPMD
partitioner gather the whole operand again in every iteration (tens of times bf16's all-gather
bytes per step under FSDP; BENCHMARKS.md, 2026-12-04). So every collective is placed outside the
loops by hand:
  * dense: the weight is quantized where it is stored (each shard's own 128×128 blocks), and the
    GEMMs run inside a `shard_map` over the batch axes (`token_axes`; the other mesh axes stay with
    the compiler), which gathers the fp8 weight and its scales once at its entry; the residual is
    that gathered fp8 weight, so the backward's dgrad gathers nothing (a bf16 layer keeps its
    gathered bf16 weight the same way; under remat both are gathered again when the layer is
    recomputed). Wgrad runs over each device's own tokens
    (its 1×128 token tiles are the device's, as on each of DeepSeek's GPUs); the partial weight
    gradients leave the shard_map on a leading axis split over the batch axes, and their sum is
    left to the compiler, which reduces into the weight's own sharding.
  * routed experts (inside the MoE's shard_map): `gather=(axes, dim)` names the axis of w that is
    split; the shard is quantized, e4m3 values and scales are all-gathered once, and the gradient
    leaves as a reduce-scatter (`psum_scatter`).
  Requirement: a shard holds whole 128-blocks along the split axis (its size a multiple of 128),
  so the shards' blocks are the whole weight's blocks and the numerics do not depend on the mesh.
  Otherwise `fp8_ragged_dot` refuses (its callers then gather the master weight first), and for a
  dense weight the compiler reshards the master weight before quantizing (correct, more bytes).
  Not yet handled: axes the compiler still partitions inside the shard_map (`tensor`): a weight
  whose contraction axis is split there (row-parallel projections under fsdp_tp and dp_ep_tp)
  is left to the compiler, inside the block loop.
  Not yet run on any accelerator: on CPU "auto" resolves to the plain-JAX reference GEMMs, and
  TPU programs were only compiled ahead of time.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.layout import Layout
from jax.sharding import PartitionSpec as P

from deepseek_jax.kernels import fp8
from deepseek_jax.kernels.platform import target_device

BLOCK = fp8.BLOCK


# ---------------------------------------------------------------------------------------------
# Dense projections


def normalize_grad(dy):
    """(dy · 2⁻ᵉ, 2ᵉ) with e chosen so that max|dy · 2⁻ᵉ| lies in [0.5, 1).

    The quantizers floor every tile's amax at 1e-4 (DeepSeek's clamp, sized for activations);
    gradients of a loss averaged over many tokens can sit far below it, where the floor would
    push them into e4m3's subnormals or to zero. A power-of-two factor is exact, and it commutes
    with the quantizer (amax, scale and codes all scale by 2⁻ᵉ), so when the floor is not hit
    the products are bit-for-bit those of the unnormalized gradient; multiply them by 2ᵉ.
    """
    amax = jnp.max(jnp.abs(dy)).astype(jnp.float32)
    _, e = jnp.frexp(amax)                                                  # amax = m · 2^e
    e = jnp.clip(jnp.where(jnp.isfinite(amax), e, 0), -100, 100)          # 2^±100 fits bf16/fp32
    one = jnp.ones((), jnp.float32)
    return dy * jnp.ldexp(one, -e).astype(dy.dtype), jnp.ldexp(one, e)


def _over_tokens(fn, token_axes: tuple[str, ...], in_specs, out_specs):
    """`fn` inside a shard_map over the mesh axes `token_axes` and the axes of size 1 (manual
    there, every other axis left to the compiler), or `fn` itself when there are none. The mesh
    is the one in context. With no axis left to the compiler (dp, fsdp) the Pallas fp8 GEMMs
    can run inside (`fp8._resolve_backend`)."""
    if not token_axes:
        return fn
    mesh = jax.sharding.get_abstract_mesh()
    size_one = {a for a, n in mesh.shape.items() if n == 1 and a not in mesh.manual_axes}
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs,
                         axis_names=set(token_axes) | size_one, check_vma=False)


def _axes_size(axes: tuple[str, ...]) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _fp8_dot(x, w, out_dtype, backend, x_dtype, w_dtype, token_axes):
    """x `[M, K]`, w `[K, N]` → `[M, N]` (the differentiable core of `fp8_dot`)."""
    return _fp8_dot_fwd(x, w, out_dtype, backend, x_dtype, w_dtype, token_axes)[0]


def _fp8_dot_fwd(x, w, out_dtype, backend, x_dtype, w_dtype, token_axes=()):
    # The weight is quantized where it lives (each shard's own 128×128 blocks), so under FSDP
    # what crosses devices is the fp8 weight and its scales, gathered once at the shard_map's
    # entry, never inside the GEMMs' loops over 128-blocks. The residual is that gathered fp8
    # weight (half the bytes of the bf16 copy a bf16 layer keeps for its backward), so the
    # backward gathers nothing; under remat it lives from the layer's recomputation to its
    # backward, as a bf16 layer's gathered weight does.
    w_q, w_s = fp8.quantize_flax_weight(w)                                  # [N, K], [NB, J]

    def local(x, w_q, w_s):                                                 # this device's rows
        x_q, x_s = fp8.quantize_activation(x)                               # [m, K], [m, J]
        y = fp8.fp8_matmul(x_q, x_s, w_q, w_s, out_dtype=out_dtype, backend=backend)  # [m, N]
        # For wgrad: xᵀ in 1×128 tiles along the tokens, quantized now from the full-precision x.
        x_t_q, x_t_s = fp8.quantize_activation(x, transpose=True)          # [K, m], [K, ⌈m/128⌉]
        return y, x_t_q, x_t_s, w_q, w_s

    rows, cols = P(token_axes or None, None), P(None, token_axes or None)
    y, x_t_q, x_t_s, w_q, w_s = _over_tokens(local, token_axes, (rows, P(), P()),
                                             (rows, cols, cols, P(), P()))(x, w_q, w_s)
    return y, (x_t_q, x_t_s, w_q, w_s)


def _fp8_dot_bwd(out_dtype, backend, x_dtype, w_dtype, token_axes, res, dy):
    x_t_q, x_t_s, w_q, w_s = res
    dy, unscale = normalize_grad(dy)                                       # exact, see above

    def local(dy, x_t_q, x_t_s, w_q, w_s):
        # dgrad: dx = dy @ wᵀ with dy in 1×128 tiles along N and wᵀ's blocks (the same blocks).
        dy_q, dy_s = fp8.quantize_activation(dy)                            # [m, N], [m, NB]
        w_t_q, w_t_s = fp8.transpose_quantized_weight(w_q, w_s)             # [K, N], [J, NB]
        dx = fp8.fp8_dgrad(dy_q, dy_s, w_t_q, w_t_s, out_dtype=x_dtype, backend=backend)  # [m, K]
        # wgrad: dwᵀ = dyᵀ @ x over this device's tokens, 1×128 tiles along them on both sides.
        dy_t_q, dy_t_s = fp8.quantize_activation(dy, transpose=True)       # [N, m], [N, ⌈m/128⌉]
        dw_t = fp8.fp8_wgrad(dy_t_q, dy_t_s, x_t_q, x_t_s, out_dtype=jnp.float32,
                             backend=backend)                               # [N, K] partial
        return dx, dw_t[None]                                               # [m, K], [1, N, K]

    rows, cols = P(token_axes or None, None), P(None, token_axes or None)
    dx, dw_parts = _over_tokens(local, token_axes, (rows, cols, cols, P(), P()),
                                (rows, P(token_axes or None, None, None)))(
        dy, x_t_q, x_t_s, w_q, w_s)
    # Σ over the token shards (a sharded axis): the compiler reduces it straight into w's
    # sharding, a reduce-scatter under FSDP.
    dw_t = jnp.sum(dw_parts, axis=0)                                        # [N, K]
    dx = dx * unscale.astype(x_dtype)                                       # [M, K]
    return dx, jnp.einsum("NK->KN", dw_t * unscale).astype(w_dtype)         # [M, K], [K, N]


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def fp8_dot(x: jax.Array, w: jax.Array, *, out_dtype=None, backend: str = "auto",
            token_axes: tuple[str, ...] = ()) -> jax.Array:
    """`x @ w` with DeepSeek's fp8 recipe in the forward and both backward GEMMs.

    Args:
      x: activations `[..., K]` (any float dtype; quantized in 1×128 tiles along K).
      w: Flax kernel `[K, N]`, the master weight (fp32 in training; quantized per 128×128 block
        on every call, online, as V3 does).
      out_dtype: dtype of the result (default x.dtype); the GEMM accumulates in fp32.
      backend: the GEMM backend of `deepseek_jax.kernels.fp8` ("auto": Hopper → Mosaic GPU,
        TPU → Mosaic TPU, otherwise the plain-JAX reference).
      token_axes: mesh axes (of the mesh in context, not already manual) that x's rows are split
        over, leading axis first-major (a batch split over them); () = no mesh. With axes, the
        GEMMs run per device inside a `shard_map` over them (see "Sharded" in the module
        docstring): w quantized shard by shard and gathered once in fp8, wgrad over each
        device's own tokens, its partial sums reduced into w's sharding.

    Returns:
      `[..., N]` in `out_dtype`. Gradients: dx in x.dtype, dw in w.dtype, both from fp8 GEMMs.
    """
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_dot: need x [..., K] and a Flax kernel w [K, N] with the same K; "
                         f"got x {x.shape} and w {w.shape}")
    for name, a in (("x", x), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"fp8_dot: {name} must be floating point, got {a.dtype}")
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    lead, (k, n) = x.shape[:-1], w.shape
    x2 = x.reshape(math.prod(lead), k)                                      # [M, K]
    y = _fp8_dot(x2, w, out_dtype, backend, jnp.dtype(x.dtype), jnp.dtype(w.dtype),
                 tuple(token_axes))                                         # [M, N]
    return y.reshape(*lead, n)                                              # [..., N]


def _parse_projection(eqn: str):
    """"xs,ws->out" → (ellipsis, batch axes, contracted axes, free axes, xs, ws, out)."""
    try:
        lhs, out = eqn.replace(" ", "").split("->")
        xs, ws = lhs.split(",")
    except ValueError:
        raise ValueError(f"fp8_einsum: expected 'x_axes,w_axes->out_axes', got {eqn!r}") from None
    ell = xs.startswith("...")
    if ell != out.startswith("...") or "." in ws or "." in xs[3 if ell else 0:] \
            or "." in out[3 if ell else 0:]:
        raise ValueError(f"fp8_einsum {eqn!r}: '...' may only lead the activation and the output")
    xa, oa = (xs[3:], out[3:]) if ell else (xs, out)
    for part in (xa, ws, oa):
        if len(set(part)) != len(part):
            raise ValueError(f"fp8_einsum {eqn!r}: repeated axis in {part!r}")
    contracted = "".join(a for a in ws if a in xa)
    free = "".join(a for a in ws if a not in xa)
    batch = "".join(a for a in xa if a not in ws)
    if any(a in oa for a in contracted):
        raise ValueError(f"fp8_einsum {eqn!r}: axes {[a for a in contracted if a in oa]} are in "
                         "the activation, the weight and the output (a batched weight); vmap "
                         "fp8_dot over them instead")
    if not contracted:
        raise ValueError(f"fp8_einsum {eqn!r}: the weight shares no axis with the activation")
    if sorted(oa) != sorted(batch + free):
        raise ValueError(f"fp8_einsum {eqn!r}: the output must hold exactly the activation's "
                         f"uncontracted axes {batch!r} and the weight's output axes {free!r}")
    return ell, batch, contracted, free, xs, ws, out


def fp8_einsum(eqn: str, x: jax.Array, w: jax.Array, *, out_dtype=None,
               backend: str = "auto", token_axes: tuple[str, ...] = ()) -> jax.Array:
    """A projection `jnp.einsum(eqn, x, w)` through `fp8_dot`.

    The weight's axes that also appear in x are contracted (flattened, in the weight's order, into
    K); its other axes are the output features (flattened into N). E.g. `"BTNU,NUD->BTD"`: K = N·U,
    N_out = D; `"BTQ,QNH->BTNH"`: K = Q, N_out = N·H. An optional leading `...` on x and the output
    stands for batch axes. Axes shared by x, w and the output (batched weights) are rejected.
    `token_axes`: as in `fp8_dot` (x's leading axis must be the one split over them).
    """
    ell, batch, contracted, free, xs, ws, out = _parse_projection(eqn)
    pre = "..." if ell else ""
    xp = jnp.einsum(f"{xs}->{pre}{batch}{contracted}", x)                  # [..., batch, contracted]
    wp = jnp.einsum(f"{ws}->{contracted}{free}", w)                         # [contracted, free]
    lead = xp.shape[:xp.ndim - len(contracted)]
    free_shape = wp.shape[len(contracted):]
    k = math.prod(wp.shape[:len(contracted)])
    y = fp8_dot(xp.reshape(*lead, k), wp.reshape(k, math.prod(free_shape)),
                out_dtype=out_dtype, backend=backend, token_axes=token_axes)  # [..., batch, K→N]
    y = y.reshape(*lead, *free_shape)                                       # [..., batch, free]
    return jnp.einsum(f"{pre}{batch}{free}->{out}", y)


# ---------------------------------------------------------------------------------------------
# Routed experts: emulated fp8 grouped GEMM


def group_tiles(group_sizes: jax.Array, m: int) -> tuple[jax.Array, int]:
    """Tile id of each of the m sorted rows: 128-row tiles along the rows that restart at every
    group's first row. Returns (tile ids int32 `[M]`, non-decreasing; an upper bound on the
    number of tiles, static). Rows past sum(group_sizes) join the last group's tiles."""
    e = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)                                   # [E]
    ends = jnp.cumsum(sizes)                                                # [E]
    starts = ends - sizes                                                   # [E]
    tiles = -(-sizes // BLOCK)                                              # [E]
    first = jnp.cumsum(tiles) - tiles                                       # [E]
    rows = jnp.arange(m, dtype=jnp.int32)                                   # [M]
    grp = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), e - 1)   # [M]
    return first[grp] + (rows - starts[grp]) // BLOCK, -(-m // BLOCK) + e + 1


def quantize_token_tiles(x: jax.Array, tiles: jax.Array, n_tiles: int):
    """x `[M, K]` quantized in tiles of rows (`group_tiles`) per column: the grouped form of
    `quantize_activation(x, transpose=True)`. Returns (e4m3 `[M, K]`, fp32 scales `[n_tiles, K]`)."""
    x32 = x.astype(jnp.float32)                                             # [M, K]
    amax = jax.ops.segment_max(jnp.abs(x32), tiles, num_segments=n_tiles,
                               indices_are_sorted=True)                     # [n_tiles, K]
    scale = jnp.maximum(amax, fp8.AMAX_FLOOR) / fp8.E4M3_MAX                # empty tiles: floor
    q = jnp.clip(x32 / scale[tiles], -fp8.E4M3_MAX, fp8.E4M3_MAX)          # [M, K]
    return q.astype(jnp.float8_e4m3fn), scale


def _dequantize_token_tiles(q, scale, tiles):
    return q.astype(jnp.float32) * scale[tiles]                             # [M, K]


def _quantize_expert_weights(w):
    """w `[E, K, N]` → (e4m3 `[E, K, N]`, scales `[E, J, NB]`): 128×128 blocks per expert (the same
    blocks whichever way round the matrix is stored)."""
    return jax.vmap(fp8.quantize_weight)(w)


def _rows_fp8(x):
    """x `[M, K]` → its 1×128-tile fp8 value, dequantized to fp32 `[M, K]`."""
    return fp8.dequantize_activation(*fp8.quantize_activation(x))


def _ragged(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST,
                              preferred_element_type=jnp.float32)


def stored_order(shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """The axes of an array of this shape and dtype from major to minor, as the target device
    (`platform.target_device`) lays it out by default.

    Row-major on CPU and GPU. libtpu moves a last dimension that does not fill its 128 lanes away
    from the minor position: V3's `w_down` shard under FSDP over 64 chips, f32[32, 2048, 112]
    (E, F, D/64), is stored F-minor, (0, 2, 1). Row-major where the device cannot say."""
    device = target_device()
    try:
        pjrt = device.client.get_default_layout(jnp.dtype(dtype), tuple(shape), device)
    except (AttributeError, jax.errors.JaxRuntimeError):
        return tuple(range(len(shape)))
    return tuple(Layout.from_pjrt_layout(pjrt).major_to_minor)


def _in_stored_order(collective, x, shard_shape, dim):
    """`collective(x', dim')` on x's axes put in the stored order of the local shard (a free
    relabeling of its layout), then put back. In x's logical order the collective can want
    another layout than the stored one, and the compiler then relays out the whole stacked
    parameter before the layer loop (BENCHMARKS.md); in the stored order the only transposes are
    of one layer's gathered weight or full-size gradient, inside the loop."""
    order = stored_order(shard_shape, x.dtype)
    if order == tuple(range(x.ndim)):
        return collective(x, dim)
    y = collective(jnp.transpose(x, order), order.index(dim))
    return jnp.transpose(y, tuple(order.index(a) for a in range(x.ndim)))


def all_gather_dim(x, axes: tuple[str, ...], dim: int):
    """`jax.lax.all_gather(x, axes, axis=dim, tiled=True)`, written so that its transpose
    (autodiff) is a reduce-scatter over a leading axis whose result is in x's own order (see
    `psum_scatter_dim`). The shards are gathered as a new leading axis [n, *x.shape], which is
    then moved next to `dim` and merged with it; all of it in the axes' stored order
    (`_in_stored_order`)."""
    return _in_stored_order(functools.partial(_gather_leading, axes=axes), x, x.shape, dim)


def _gather_leading(x, dim: int, axes: tuple[str, ...]):
    if dim == 0:
        return jax.lax.all_gather(x, axes, axis=0, tiled=True)
    y = jnp.moveaxis(jax.lax.all_gather(x, axes, axis=0), 0, dim)          # [.., n, X/n, ..]
    return y.reshape(x.shape[:dim] + (-1,) + x.shape[dim + 1:])             # [.., X, ..]


def psum_scatter_dim(x, axes: tuple[str, ...], dim: int):
    """`jax.lax.psum_scatter(x, axes, scatter_dimension=dim, tiled=True)`, run over a leading
    axis: x's `dim` is split as (n shards, X/n) and the shard index moved to the front, so the
    collective sends contiguous chunks and returns this device's shard already in x's order;
    all of it in the shard's stored order (`_in_stored_order`).

    Two compilers need this form. libtpu 0.0.48 ran a scatter along an inner axis as an
    all-reduce of the whole array and a slice. XLA:GPU ran a scatter of the leading axis of a
    transposed copy (`moveaxis(x, dim, 0)`) and left its result in that transposed layout; a
    layer scan's stacked weight gradient then kept it, and one relayout at the end of the
    backward loop held a second copy of every stacked expert gradient (BENCHMARKS.md)."""
    n = jax.lax.axis_size(axes)
    shard = x.shape[:dim] + (x.shape[dim] // n,) + x.shape[dim + 1:]
    return _in_stored_order(functools.partial(_scatter_leading, axes=axes), x, shard, dim)


def _scatter_leading(x, dim: int, axes: tuple[str, ...]):
    if dim == 0:
        return jax.lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True)
    n = jax.lax.axis_size(axes)
    y = x.reshape(x.shape[:dim] + (n, x.shape[dim] // n) + x.shape[dim + 1:])
    y = jnp.moveaxis(y, dim, 0)                                             # [n, .., X/n, ..]
    return jax.lax.psum_scatter(y, axes, scatter_dimension=0)               # [.., X/n, ..]


def _gather_blocks(w_q, w_s, gather):
    """The local shard's (e4m3 `[E, K, N]`, scales `[E, J, NB]`) → the whole weight's, gathered
    along `gather = (axes, dim)` (dim 1 or 2: K or N); unchanged when `gather` is None. Exact:
    with shards of whole 128-blocks the blocks of the shards are the blocks of the whole."""
    if gather is None:
        return w_q, w_s
    axes, dim = gather
    return all_gather_dim(w_q, axes, dim), all_gather_dim(w_s, axes, dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fp8_ragged_dot(rows, w, group_sizes, out_dtype, x_dtype, w_dtype, gather):
    return _fp8_ragged_dot_fwd(rows, w, group_sizes, out_dtype, x_dtype, w_dtype, gather)[0]


def _fp8_ragged_dot_fwd(rows, w, group_sizes, out_dtype, x_dtype, w_dtype, gather=None):
    # Gathered (when sharded) as e4m3 values and scales; the residual is the local shard, which
    # the backward gathers again.
    w_q, w_s = _quantize_expert_weights(w)                                  # [E, K, N], [E, J, NB]
    w_dq = jax.vmap(fp8.dequantize_weight)(*_gather_blocks(w_q, w_s, gather))  # [E, K, N] fp32
    y = _ragged(_rows_fp8(rows), w_dq, group_sizes).astype(out_dtype)      # [M, N]
    tiles, n_tiles = group_tiles(group_sizes, rows.shape[0])                # [M]
    x_t_q, x_t_s = quantize_token_tiles(rows, tiles, n_tiles)               # [M, K], [tiles, K]
    return y, (x_t_q, x_t_s, w_q, w_s, group_sizes)


def _fp8_ragged_dot_bwd(out_dtype, x_dtype, w_dtype, gather, res, dy):
    x_t_q, x_t_s, w_q, w_s, group_sizes = res
    m = dy.shape[0]
    dy, unscale = normalize_grad(dy)                                       # exact
    w_dq = jax.vmap(fp8.dequantize_weight)(*_gather_blocks(w_q, w_s, gather))  # [E, K, N]
    # dgrad: dy in 1×128 tiles along N, each expert's blocks transposed.
    dx = _ragged(_rows_fp8(dy), jnp.einsum("EKN->ENK", w_dq), group_sizes)  # [M, K]
    # wgrad: dy and x in 128-row tiles per expert along the tokens; dw_e = Σ_{rows of e} xᵀ dy.
    tiles, n_tiles = group_tiles(group_sizes, m)                            # [M]
    dy_t = _dequantize_token_tiles(*quantize_token_tiles(dy, tiles, n_tiles), tiles)  # [M, N]
    x_t = _dequantize_token_tiles(x_t_q, x_t_s, tiles)                      # [M, K]
    _, pull = jax.vjp(lambda v: _ragged(x_t, v, group_sizes), w_dq)         # linear in v
    (dw,) = pull(dy_t)                                                      # [E, K, N]
    if gather is not None:                 # the transpose of the gather: sum, keep my shard
        dw = psum_scatter_dim(dw, gather[0], gather[1])
    return (dx * unscale).astype(x_dtype), (dw * unscale).astype(w_dtype), None


_fp8_ragged_dot.defvjp(_fp8_ragged_dot_fwd, _fp8_ragged_dot_bwd)


def fp8_ragged_dot(rows: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   out_dtype=None, gather: tuple[tuple[str, ...], int] | None = None) -> jax.Array:
    """`jax.lax.ragged_dot(rows, w, group_sizes)` with emulated fp8 numerics (see the module docstring).

    Args:
      rows: `[M, K]`, sorted by group (expert); group g owns the next group_sizes[g] rows.
      w: stacked Flax kernels `[E, K, N]` (fp32 masters).
      group_sizes: int `[E]`.
      out_dtype: dtype of the result (default rows.dtype).
      gather: inside a `shard_map`, `(mesh axes, dim)` when w is only this device's shard of the
        weight along dim 1 (K) or 2 (N), split over those (manual) axes: the shard is quantized
        in its own 128×128 blocks, and the e4m3 values and scales are all-gathered (once in the
        forward, once in the backward); w's gradient is the reduce-scatter (`psum_scatter`) of the whole
        weight's. The shard's size along dim must be a multiple of 128 (blocks may not straddle
        shards); gather the master weight yourself otherwise.

    Returns:
      `[M, N]`; gradients for rows (rows.dtype) and w (w.dtype), none for group_sizes.
    """
    split_k = gather is not None and gather[1] == 1                       # w holds part of K
    if rows.ndim != 2 or w.ndim != 3 or (rows.shape[1] != w.shape[1] and not split_k) \
            or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"fp8_ragged_dot: need rows [M, K], w [E, K, N] and group_sizes [E]; got "
                         f"{rows.shape}, {w.shape} and {group_sizes.shape}")
    if gather is not None:
        axes, dim = tuple(gather[0]), int(gather[1])
        if dim not in (1, 2) or w.shape[dim] % BLOCK:
            raise ValueError(f"fp8_ragged_dot: gather={gather!r} needs dim 1 or 2 with a shard "
                             f"size that is a multiple of {BLOCK}; w's shard is {w.shape}")
        gather = (axes, dim)
    out_dtype = jnp.dtype(rows.dtype if out_dtype is None else out_dtype)
    return _fp8_ragged_dot(rows, w, group_sizes, out_dtype, jnp.dtype(rows.dtype),
                           jnp.dtype(w.dtype), gather)
