"""Block-scaled fp8 GEMM for TPU in Pallas Mosaic TPU (`pltpu`), with per-128-K scaling.

Computes `out = a @ b.T` for `a` `[M, K]` and `b` `[N, K]` in fp8 with fp32 scales: one per row
of `a` per 128 K, and one per column of the output per 128 K (a 128×128 B block scale repeated
over its 128 columns, or a per-row B scale for wgrad). `fp8.py` validates inputs and chooses
this backend.

Kernel: grid (M/bm, N/bn, K/bk), K innermost ("arbitrary"), an fp32 VMEM accumulator. Inside a
grid step the bk-wide slab is cut into bk/128 sub-blocks; each is one MXU matmul with fp32
results, multiplied by the outer product of its row and column scales, and added up — the same
promotion every 128 K as on Hopper, which on TPU costs VPU work (about 3 ops per output element per
128 K) that overlaps the MXU.

Scales are laid out so every block satisfies Mosaic's (8, 128) rule without dynamic lane
indexing: row scales as `[K/bk, Mp, bk/128]` (block `(bm, bk/128)`, the full minor dim) and
column scales as `[K/bk, bk/128, Np]`.

MXU input dtype: e4m3 is a native MXU input only on TPU7x and later (`TpuInfo.is_matmul_supported`);
v5e/v5p/v6e take bf16, into which every e4m3 value converts exactly, so the default casts in-kernel
to bf16 unless the chip says fp8 is native. Left out: megacore-aware grid order, int8 paths for
v5e/v6e, an fp8 output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BLOCK = 128


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Block sizes: bm multiple of 32 (fp8 packs 4 rows per sublane), bn and bk multiples of 128.

    mxu_dtype: dtype fed to the MXU; None picks e4m3 where the chip runs it natively, else bf16.
    """

    bm: int = 512
    bn: int = 512
    bk: int = 512
    mxu_dtype: object = None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def check_config(config: TpuConfig) -> None:
    if config.bm % 32 or config.bm <= 0:
        raise ValueError(f"TpuConfig.bm={config.bm}: must be a positive multiple of 32 (fp8 sublane packing)")
    for name in ("bn", "bk"):
        v = getattr(config, name)
        if v % BLOCK or v <= 0:
            raise ValueError(f"TpuConfig.{name}={v}: must be a positive multiple of {BLOCK}")


def default_config(m: int, n: int, k: int) -> TpuConfig:
    """Largest blocks that do not pad M, N, K by much (VMEM use stays ≈ 4 MiB at 512³)."""
    bm = min(512, _round_up(m, 32))
    bn = min((512, 384, 256, 128), key=lambda b: (_round_up(n, b), -b))  # least padding, then biggest
    kp = _round_up(k, BLOCK)
    bk = next(b for b in (512, 384, 256, 128) if kp % b == 0)
    return TpuConfig(bm=bm, bn=bn, bk=bk)


def native_mxu_dtype(dtype) -> object:
    """`dtype` if the local TPU multiplies it natively, else bf16 (also when not on a TPU)."""
    try:
        if pltpu.get_tpu_info().is_matmul_supported(dtype, dtype):
            return dtype
    except Exception:  # not on a TPU (cross-lowering, interpret mode)
        pass
    return jnp.bfloat16


def _gemm_kernel(a_ref, b_ref, as_ref, bs_ref, out_ref, acc_ref, *, subs, mxu_dtype):
    """One (bm, bn) output block, one bk slab. a `[bm, bk]`, b `[bn, bk]`, as `[bm, subs]`, bs `[subs, bn]`."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    total = None
    for j in range(subs):  # static: one MXU matmul per 128-K scale block
        a_j = a_ref[:, j * BLOCK:(j + 1) * BLOCK].astype(mxu_dtype)  # [bm, 128]
        b_j = b_ref[:, j * BLOCK:(j + 1) * BLOCK].astype(mxu_dtype)  # [bn, 128]
        part = lax.dot_general(a_j, b_j, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)  # [bm, bn]
        scale = as_ref[:, j:j + 1] * bs_ref[j:j + 1, :]  # [bm, 1] * [1, bn] -> [bm, bn]
        total = part * scale if total is None else total + part * scale
    acc_ref[...] += total

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def gemm_nt(a_q, a_scale, b_q, b_scale, *, b_scaling: str = "block", out_dtype=jnp.bfloat16,
            config: TpuConfig | None = None, interpret: bool = False):
    """`a @ b.T` with block scales on TPU. Shapes as in `fp8.fp8_gemm_nt` (validated there).

    a_q `[M, K]`, a_scale `[M, J]`, b_q `[N, K]`, b_scale `[ceil(N/128), J]` ("block") or
    `[N, J]` ("row"), J = ceil(K/128). M, N, K are zero-padded to the block sizes here.
    """
    m, k = a_q.shape
    n = b_q.shape[0]
    nj = a_scale.shape[1]
    if config is None:
        config = default_config(m, n, k)
    check_config(config)
    mxu_dtype = config.mxu_dtype or native_mxu_dtype(a_q.dtype)
    bm, bn, bk = config.bm, config.bn, config.bk
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(nj * BLOCK, bk)
    jp, subs = kp // BLOCK, bk // BLOCK

    a_q = jnp.pad(a_q, ((0, mp - m), (0, kp - k)))  # [Mp, Kp]
    b_q = jnp.pad(b_q, ((0, np_ - n), (0, kp - k)))  # [Np, Kp]
    a_scale = jnp.pad(a_scale.astype(jnp.float32), ((0, mp - m), (0, jp - nj)))  # [Mp, Jp]
    if b_scaling == "block":
        b_col = jnp.repeat(b_scale.astype(jnp.float32), BLOCK, axis=0)[:n]  # [N, J]: block -> columns
    else:
        b_col = b_scale.astype(jnp.float32)  # [N, J]
    b_col = jnp.pad(b_col, ((0, np_ - n), (0, jp - nj)))  # [Np, Jp]
    # Split J into (K/bk, subs) so each grid step reads whole minor dims (Mosaic's block rule).
    a_scale = jnp.einsum("MIS->IMS", a_scale.reshape(mp, kp // bk, subs))  # [K/bk, Mp, subs]
    b_col = jnp.einsum("NIS->ISN", b_col.reshape(np_, kp // bk, subs))  # [K/bk, subs, Np]

    kernel = lambda *refs: _gemm_kernel(*refs, subs=subs, mxu_dtype=mxu_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
            pl.BlockSpec((None, bm, subs), lambda i, j, kk: (kk, i, 0)),
            pl.BlockSpec((None, subs, bn), lambda i, j, kk: (kk, 0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="fp8_gemm_nt",                 # how compiled programs name the kernel's calls
    )(a_q, b_q, a_scale, b_col)  # [Mp, Np]
    return out[:m, :n]
