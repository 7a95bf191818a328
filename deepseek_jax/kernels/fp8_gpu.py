"""Block-scaled fp8 GEMM for Hopper GPUs in Pallas Mosaic GPU (`plgpu`), with per-128-K promotion.

Computes `out = a @ b.T` for `a` `[M, K]` and `b` `[N, K]` in fp8 (e4m3 or e5m2), both K-major
(PTX allows transposed wgmma operands only for 16-bit types, so fp8 needs K contiguous on both
sides). Scales are fp32, one per 128 K for every row of `a` (1×128 tiles) and either one per
128×128 block of `b` (`b_scaling="block"`, forward and dgrad) or one per row of `b` per 128 K
(`b_scaling="row"`, wgrad). `fp8.py` validates inputs and chooses this backend; this file holds
the kernel and its tiling rules only.

Structure (one CTA per SM, persistent over output tiles):

  * three warpgroups: one producer issues TMA copies of the A tile `[2·64, 128]` (or `[64, 128]`),
    the B tile and the scale rows into a ring of `stages` SMEM slots
    (`plgpu.emit_pipeline_warp_specialized`); two consumers each own a 64-row × `tile_n` slice of
    the CTA tile, split along M (`wg_dim="m"`) or along N (`wg_dim="n"`).
  * per 128-K step a consumer issues one fp8 wgmma into a fresh fp32 accumulator, reads it back
    (waiting for the tensor core), multiplies by `a_scale[rows] · b_scale` and adds it to a
    register-resident fp32 sum. This is DeepSeek's "promotion to CUDA cores every N_C = 128". The
    other consumer's wgmma runs while one promotes; that is the only overlap.
  * epilogue: fp32 sum → `out_dtype` → SMEM → TMA store, overlapped with the next tile's loads.

Grouped (`grouped_gemm_nt`, the routed experts' forward and dgrad): the same kernel with one
more input, the group of each CTA row tile. Rows come in DeepGEMM's contiguous layout (every
group starts on a 128-row tile), b stacks the groups' matrices `[G·Np, Kp]`, and a tile of group
g reads rows g·Np + … of b and scale blocks g·NB + …. Padding tiles are computed and dropped.

Left out (first GPU session should measure before adding): split-K for small M (with M ≤ 128 a
7168-wide N gives only 28–56 CTAs for 132 SMs), tiles wider than 128 columns per warpgroup
(needs two B-scale columns per tile), TMA multicast across a cluster, wgmma/promotion software
pipelining inside one warpgroup, an FP8 output, scales stored pre-transposed by the quantizer
(the `[M, J]` → `[J, M]` transpose is a small extra XLA op per call).

Status: nothing here has run on a GPU yet. It lowers for `cuda` from CPU, which runs Mosaic's
layout inference, wgmma operand checks and shared-memory check (tests/kernels/test_fp8.py), and
it matches the reference in GPU interpret mode. The interpreter's race detector
(`InterpretGPUParams(detect_races=True)`) reports races between the consumers' plain SMEM reads of
the scale rows and the producer's refill of the same slot; it reports the same for a ten-line
stock `emit_pipeline_warp_specialized` loop that only sums its SMEM block, whereas the pipeline's
producer does wait on the consumed barrier before each refill, so we take it for a false
positive of the interpreter (wgmma operand reads are not tracked at all).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from deepseek_jax.kernels.platform import target_device

BLOCK = 128  # scale block along K; one pipeline step covers exactly one block
WG_ROWS = 64  # rows of one wgmma (M of the instruction, per warpgroup)
SMEM_LIMIT = 232448  # bytes of shared memory per CTA on H100/H200 (opt-in maximum)
DEFAULT_NUM_SMS = 132  # H100 SXM / H200


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tiling of the Mosaic GPU kernel.

    tile_n: columns per consumer warpgroup, 64 or 128 (a tile must lie inside one 128-wide B
      scale block). wg_dim: "m" puts the two consumers on top of each other (CTA tile
      128 × tile_n), "n" side by side (CTA tile 64 × 2·tile_n: no padding of M ≤ 64).
    stages: SMEM ring depth of the TMA pipeline. grid_tile_width: width of the snake order
      over output tiles (L2 reuse). num_sms: CTAs to launch; None asks the device (132 if none).
    """

    tile_n: int = 128
    wg_dim: str = "m"
    stages: int = 4
    grid_tile_width: int = 4
    num_sms: int | None = None

    @property
    def cta_m(self) -> int:
        return WG_ROWS * (2 if self.wg_dim == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.tile_n * (2 if self.wg_dim == "n" else 1)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def smem_bytes(config: GpuConfig, b_scaling: str, out_dtype) -> int:
    """Shared memory the kernel asks for (ring of stages + output staging), barriers excluded."""
    return config.stages * _stage_bytes(config, b_scaling) + _out_bytes(config, out_dtype)


def _stage_bytes(config: GpuConfig, b_scaling: str) -> int:
    per_stage = config.cta_m * BLOCK + config.cta_n * BLOCK + 4 * config.cta_m  # A, B (1 B/elem), A scales
    return per_stage + (4 * config.cta_n if b_scaling == "row" else 0)


def _out_bytes(config: GpuConfig, out_dtype) -> int:
    return 2 * WG_ROWS * config.tile_n * jnp.dtype(out_dtype).itemsize  # one slot per consumer


def max_stages(config: GpuConfig, b_scaling: str, out_dtype) -> int:
    """Deepest pipeline that fits in shared memory.

    2 KiB are kept for what Mosaic adds (barriers, alignment): 100–1100 bytes when lowered.
    """
    return (SMEM_LIMIT - 2048 - _out_bytes(config, out_dtype)) // _stage_bytes(config, b_scaling)


def check_config(config: GpuConfig, b_scaling: str, out_dtype) -> None:
    """Raises ValueError with the field to change when a config cannot work."""
    if config.tile_n not in (64, 128):
        raise ValueError(
            f"GpuConfig.tile_n={config.tile_n}: must be 64 or 128 (a consumer's tile must lie in one "
            "128-wide B scale block, and 128 columns keep accumulator + sum at 128 registers)"
        )
    if config.wg_dim not in ("m", "n"):
        raise ValueError(f"GpuConfig.wg_dim={config.wg_dim!r}: use 'm' or 'n'")
    if config.stages < 2:
        raise ValueError(f"GpuConfig.stages={config.stages}: need at least 2 for a pipeline")
    if config.stages > max_stages(config, b_scaling, out_dtype):
        raise ValueError(
            f"{config} needs {smem_bytes(config, b_scaling, out_dtype)} bytes of shared memory "
            f"(b_scaling={b_scaling!r}, out {jnp.dtype(out_dtype).name}), more than the {SMEM_LIMIT} an "
            f"H100/H200 CTA can have; use stages <= {max_stages(config, b_scaling, out_dtype)} or tile_n=64"
        )


def num_sms() -> int:
    """SMs of the GPU compiled for (`platform.target_device`: the active mesh's, else the default
    device), or 132 (H100/H200) when that is no GPU (cross-lowering on CPU)."""
    device = target_device()
    sms = getattr(device, "core_count", None) if device.platform in ("gpu", "cuda") else None
    return int(sms) if sms else DEFAULT_NUM_SMS


def default_config(m: int, n: int, b_scaling: str = "block", out_dtype=jnp.bfloat16,
                   sms: int = DEFAULT_NUM_SMS) -> GpuConfig:
    """Picks the tiling that fills the most SMs with the least padding, preferring big tiles.

    Score: (useful area / padded area) × (last-wave fill) × (0.85 for 64-wide tiles, which halve
    the arithmetic intensity); then the deepest pipeline up to 4 stages that fits in SMEM. A
    heuristic, to be replaced by measurements on the H200 (experiments/benchmarks/fp8_gemm.py).
    """
    best, best_score = None, -1.0
    for wg_dim, tile_n in (("m", 128), ("n", 128), ("m", 64), ("n", 64)):
        cfg = GpuConfig(tile_n=tile_n, wg_dim=wg_dim)
        mp, np_ = _round_up(m, cfg.cta_m), _round_up(n, cfg.cta_n)
        tiles = (mp // cfg.cta_m) * (np_ // cfg.cta_n)
        waves = -(-tiles // sms)
        score = (m * n) / (mp * np_) * tiles / (waves * sms) * (1.0 if tile_n == 128 else 0.85)
        if score > best_score + 1e-9:
            best, best_score = cfg, score
    return dataclasses.replace(best, stages=min(4, max_stages(best, b_scaling, out_dtype)))


def _gemm_kernel(*refs, out_smem, config, b_scaling, k_steps, m_tiles, n_tiles, grouped=False):
    """Kernel body. a `[Mp, Kp]`, as `[J, Mp]`, b `[Np, Kp]`, bs `[NB, J]` (block) or `[J, Np]` (row).

    grouped=True (block scaling only): a leading int32 ref `[m_tiles]` names the group of each
    CTA row tile; b is `[G·Np, Kp]` and bs `[G·NB, J]` (every group's matrix padded to Np rows),
    and a row tile of group g reads rows g·Np + … of b and its scale blocks g·NB + ….
    """
    if grouped:
        grp_gmem, a_gmem, as_gmem, b_gmem, bs_gmem, out_gmem = refs
    else:
        a_gmem, as_gmem, b_gmem, bs_gmem, out_gmem = refs
    n_rows = n_tiles * config.cta_n  # Np: rows of one group's b
    tile_m, tile_n = WG_ROWS, config.tile_n
    cta_m, cta_n = config.cta_m, config.cta_n
    out_dtype = out_gmem.dtype
    # 128 fp8 elements = 128 bytes per row: the widest swizzle, which wgmma reads conflict-free.
    in_transforms = (plgpu.TilingTransform((8, BLOCK)), plgpu.SwizzleTransform(128))
    scale_specs = [plgpu.BlockSpec((1, cta_m), lambda k: (k, 0))]
    if b_scaling == "row":
        scale_specs.append(plgpu.BlockSpec((1, cta_n), lambda k: (k, 0)))

    def get_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, BLOCK), lambda k: (0, k), transforms=in_transforms),
                plgpu.BlockSpec((cta_n, BLOCK), lambda k: (0, k), transforms=in_transforms),
                *scale_specs,
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=config.stages,
            compute_context=compute_context,
        )

    def tile_args(m_sl, b_sl):
        args = [a_gmem.at[m_sl, :], b_gmem.at[b_sl, :], as_gmem.at[:, m_sl]]
        if b_scaling == "row":
            args.append(bs_gmem.at[:, b_sl])
        return args

    ignore = lambda *_, **__: None  # the allocations do not depend on the bodies
    dummy = tile_args(pl.ds(0, cta_m), pl.ds(0, cta_n))

    @functools.partial(
        pl.run_scoped,
        allocs=get_pipeline(ignore, ignore).get_allocations(*dummy),
        collective_axes="wg",
    )
    def _scope(allocs):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile_loop(info):
            (lin,) = info.index
            mi, ni = plgpu.planar_snake(lin, (m_tiles, n_tiles), 1, config.grid_tile_width)
            m_sl = pl.ds(mi * cta_m, cta_m)
            n_sl = pl.ds(ni * cta_n, cta_n)
            g = grp_gmem[mi] if grouped else 0  # this row tile's group (its matrix in b)
            b_sl = pl.ds(g * n_rows + ni * cta_n, cta_n)
            if config.wg_dim == "m":
                wg_m, wg_n = pl.ds(wg * tile_m, tile_m), pl.ds(0, tile_n)
                col0 = ni * cta_n
            else:
                wg_m, wg_n = pl.ds(0, tile_m), pl.ds(wg * tile_n, tile_n)
                col0 = ni * cta_n + wg * tile_n
            n_block = g * (n_rows // BLOCK) + col0 // BLOCK  # B scale block of these columns

            def compute_context(run_pipeline):
                total = run_pipeline(jnp.zeros((tile_m, tile_n), jnp.float32))  # [64, tile_n]
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous tile's store read out_smem
                out_smem.at[wg][...] = total.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[m_sl, n_sl].at[wg_m, wg_n])

            def step(idx, a_smem, b_smem, as_smem, *rest):
                *bs_smem, total = rest
                (k,) = idx

                def mma(acc_ref):
                    plgpu.wgmma(acc_ref, a_smem.at[wg_m], b_smem.at[wg_n].T)  # async, fp32 acc
                    a_s = as_smem[0, wg_m]  # [64] scales of this warpgroup's rows
                    if b_scaling == "row":
                        b_s = bs_smem[0][0, wg_n]  # [tile_n]
                        scale = (lax.broadcast_in_dim(a_s, (tile_m, tile_n), [0])
                                 * lax.broadcast_in_dim(b_s, (tile_m, tile_n), [1]))
                    else:
                        scale = lax.broadcast_in_dim(a_s * bs_gmem[n_block, k], (tile_m, tile_n), [0])
                    return acc_ref[...], scale  # reading the accumulator waits for the wgmma

                part, scale = pl.run_scoped(mma, plgpu.ACC((tile_m, tile_n), jnp.float32))
                return total + part * scale  # promotion: fp32 FMA on the CUDA cores

            get_pipeline(step, compute_context)(*tile_args(m_sl, b_sl), allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def gemm_nt(a_q, a_scale, b_q, b_scale, *, b_scaling: str = "block", out_dtype=jnp.bfloat16,
            config: GpuConfig | None = None, interpret=False):
    """`a @ b.T` with block scales on Hopper. Shapes as in `fp8.fp8_gemm_nt` (validated there).

    a_q `[M, K]`, a_scale `[M, J]`, b_q `[N, K]`, b_scale `[ceil(N/128), J]` ("block") or
    `[N, J]` ("row"), J = ceil(K/128). M, N and K are zero-padded to the tile sizes here.
    interpret=True (or a `plgpu.InterpretGPUParams`, e.g. with detect_races=True) runs the same
    kernel in Pallas' GPU interpret mode on CPU.
    """
    m, k = a_q.shape
    n = b_q.shape[0]
    nj = a_scale.shape[1]
    sms = (2 if interpret else num_sms()) if config is None or config.num_sms is None else config.num_sms
    if config is None:
        config = default_config(m, n, b_scaling, out_dtype, sms)
    check_config(config, b_scaling, out_dtype)
    mp, np_, kp = _round_up(m, config.cta_m), _round_up(n, config.cta_n), nj * BLOCK

    a_q = jnp.pad(a_q, ((0, mp - m), (0, kp - k)))  # [Mp, Kp]
    b_q = jnp.pad(b_q, ((0, np_ - n), (0, kp - k)))  # [Np, Kp]
    a_scale_t = jnp.pad(jnp.einsum("MJ->JM", a_scale.astype(jnp.float32)), ((0, 0), (0, mp - m)))  # [J, Mp]
    if b_scaling == "row":
        b_scale = jnp.pad(jnp.einsum("NJ->JN", b_scale.astype(jnp.float32)), ((0, 0), (0, np_ - n)))  # [J, Np]
    else:
        nb = -(-np_ // BLOCK)
        b_scale = jnp.pad(b_scale.astype(jnp.float32), ((0, nb - b_scale.shape[0]), (0, 0)))  # [NB, J]

    out = _launch(a_q, a_scale_t, b_q, b_scale, config=config, b_scaling=b_scaling,
                  out_dtype=out_dtype, n_cols=np_, sms=sms, interpret=interpret)  # [Mp, Np]
    return out[:m, :n]


def _launch(*operands, config, b_scaling, out_dtype, n_cols, sms, interpret, grouped=False):
    """Builds and calls the kernel on padded operands (`[group table,] a, a scales, b, b scales`)."""
    a_q, a_scale_t = operands[-4], operands[-3]
    mp, nj = a_q.shape[0], a_scale_t.shape[0]
    m_tiles, n_tiles = mp // config.cta_m, n_cols // config.cta_n
    out_swizzle = plgpu.find_swizzle(config.tile_n * jnp.dtype(out_dtype).itemsize * 8, "output")
    out_transforms = (
        plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
        plgpu.SwizzleTransform(out_swizzle),
    )
    kernel = functools.partial(
        _gemm_kernel, config=config, b_scaling=b_scaling, k_steps=nj, m_tiles=m_tiles,
        n_tiles=n_tiles, grouped=grouped,
    )
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((mp, n_cols), out_dtype),
        grid=(min(sms, m_tiles * n_tiles),),
        grid_names=("sm",),
        num_threads=3,  # two consumer warpgroups + the TMA producer
        thread_name="wg",
        scratch_types=dict(
            out_smem=plgpu.SMEM((2, WG_ROWS, config.tile_n), out_dtype, transforms=out_transforms)
        ),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": interpret if isinstance(interpret, plgpu.InterpretGPUParams)
            else plgpu.InterpretGPUParams()} if interpret else {}),
    )
    return call(*operands)


def grouped_gemm_nt(a_q, a_scale, b_q, b_scale, tile_group, *, out_dtype=jnp.bfloat16,
                    config: GpuConfig | None = None, interpret=False):
    """Grouped `a @ b[g].T` with block scales: the m-grouped contiguous layout (DeepGEMM's name).

    a_q `[Ma, K]` with a_scale `[Ma, J]` (1×128 tiles); rows come in 128-row tiles, each wholly
    of one group, `tile_group` int32 `[Ma/128]` naming it (padding tiles name any valid group
    and give rows the caller drops). b_q `[G, N, K]` with 128×128 block scales
    b_scale `[G, ceil(N/128), J]`. Returns `[Ma, N]`. N is padded per group to a multiple of
    the CTA tile and of 128, K to J·128; Ma must be a multiple of 128.
    """
    ma, k = a_q.shape
    g, n, _ = b_q.shape
    nj = a_scale.shape[1]
    if ma % BLOCK or tile_group.shape != (ma // BLOCK,):
        raise ValueError(f"grouped_gemm_nt: rows {ma} must be a multiple of {BLOCK} with one group "
                         f"per {BLOCK}-row tile (tile_group {tile_group.shape})")
    sms = (2 if interpret else num_sms()) if config is None or config.num_sms is None else config.num_sms
    if config is None:
        config = default_config(ma, n, "block", out_dtype, sms)
    check_config(config, "block", out_dtype)
    np_, kp = _round_up(n, max(config.cta_n, BLOCK)), nj * BLOCK
    nb = np_ // BLOCK
    b_q = jnp.pad(b_q, ((0, 0), (0, np_ - n), (0, kp - k))).reshape(g * np_, kp)   # [G·Np, Kp]
    b_scale = jnp.pad(b_scale.astype(jnp.float32),
                      ((0, 0), (0, nb - b_scale.shape[1]), (0, 0))).reshape(g * nb, nj)  # [G·NB, J]
    a_q = jnp.pad(a_q, ((0, 0), (0, kp - k)))                                        # [Ma, Kp]
    a_scale_t = jnp.einsum("MJ->JM", a_scale.astype(jnp.float32))                    # [J, Ma]
    per_cta = jnp.repeat(tile_group.astype(jnp.int32), BLOCK // config.cta_m)       # [Ma/cta_m]
    out = _launch(per_cta, a_q, a_scale_t, b_q, b_scale, config=config, b_scaling="block",
                  out_dtype=out_dtype, n_cols=np_, sms=sms, interpret=interpret, grouped=True)
    return out[:, :n]                                                                 # [Ma, N]
