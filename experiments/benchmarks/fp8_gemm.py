"""Benchmark: DeepSeek-style block-scaled fp8 GEMM (1×128 activations, 128×128 weights) on a GPU.

Prints one table over V3's GEMM shapes (DeepGEMM's table, spec §5.3: M in {64, 128, 4096} ×
(N, K) in {(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)})
and 8192³, with TFLOP/s of

  ours      deepseek_jax.kernels.fp8, backend "mosaic_gpu" (Pallas Mosaic GPU, promotion every 128 K)
  bf16      XLA's bf16 dot (bf16 out) on the unquantized inputs
  xla_ref   the plain-JAX reference fp8 path (backend "reference": fp8 dot per 128-K block, scale, add)
  cublas    torch._scaled_mm with 1×128 / 128×128 fp32 block scales (cuBLASLt; 1229 TFLOP/s at 8192³
            on the project's H200), when torch with CUDA is importable

plus ratios to cuBLAS and a correctness column: DeepGEMM's 1 − 2Σxy/Σ(x²+y²) of ours (and of cuBLAS)
against the reference on the same quantized inputs (~1e-6 expected: bf16 output rounding).
Median of 10 timed runs after 3 warm-ups on random normal data. Timing: CUPTI device time of every
kernel the call launches (padding copies included) when available, else host time around
block_until_ready (the column header says which). Every cell is computed in its own try/except,
and errors are listed under the table.

  python experiments/benchmarks/fp8_gemm.py            # GPU: the full table (a few minutes)
  python experiments/benchmarks/fp8_gemm.py --smoke    # CPU: tiny shapes, kernel in interpret mode
  python experiments/benchmarks/fp8_gemm.py --sweep    # GPU: also time every tiling, report the best

In experiments/benchmarks/h200.sh this is part 2 (75 s, after the hardware tests of part 1 have
compared the compiled kernels with the reference): the rows come 8192³ first, then M = 4096, 128,
64, and the JSON file is rewritten after every row, so a time limit loses only the tail.

No ml_collections / grain / tfds imports: the GPU host does not have them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import parallel
from deepseek_jax.kernels import fp8, fp8_gpu  # noqa: E402
from experiments.benchmarks.common import Results, check_imports, device_meta  # noqa: E402

V3_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
# Most telling first (a part cut short by its time limit loses the tail): 8192³, the
# compute-bound M = 4096 rows, then the memory-bound small-M rows.
GPU_SHAPES = [(8192, 8192, 8192)] + [(m, n, k) for m in (4096, 128, 64) for n, k in V3_NK]
SMOKE_SHAPES = [(64, 256, 384), (100, 200, 300)]
WARMUP, ITERS = 3, 10


SAMPLE_ROWS = 2048


def sample_rows(a):
    """At most SAMPLE_ROWS evenly spaced rows, taken on the device before the copy to the host:
    the whole product is checked by the hardware tests (part 1 of h200.sh); here the difference
    guards the timed cells, and float64 sums over 100M+ entries would cost seconds a row."""
    return a[::max(1, a.shape[0] // SAMPLE_ROWS)]


def calc_diff(x, y) -> float:
    """DeepGEMM's 1 − 2Σxy/Σ(x²+y²), in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(1.0 - 2.0 * (x * y).sum() / (x * x + y * y).sum())


class Timer:
    """Median seconds of ITERS calls after WARMUP; CUPTI device time if it works, else host time."""

    def __init__(self, mode: str):
        self.mode = mode  # "cupti" | "host"

    def __call__(self, fn, *args):
        for _ in range(WARMUP):
            out = jax.block_until_ready(fn(*args))
        if self.mode == "cupti":
            try:
                from jax.experimental.mosaic.gpu import profiler
                _, ms = profiler.measure(fn, iterations=ITERS)(*args)
                if ms:
                    return statistics.median(ms) / 1e3, out
            except Exception as e:  # noqa: BLE001 - fall back, say so once
                print(f"# CUPTI timing unavailable ({type(e).__name__}: {e}); using host time", flush=True)
            self.mode = "host"
        times = []
        for _ in range(ITERS):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out


def torch_blockwise(x_q, x_s, w_q, w_s, api: str = "_scaled_mm"):
    """cuBLASLt blockwise fp8 through torch with DeepSeek's scales: a callable, or raises.

    api "_scaled_mm": `torch._scaled_mm`, which infers the recipe from the scale shapes
    (scale_a [M, K/128] → 1×128, scale_b [K/128, N/128] → 128×128); api "scaled_mm":
    `torch.nn.functional.scaled_mm` (torch ≥ 2.10) with the recipes named. Both want mat_b
    column-major ([K, N] as a transposed view of [N, K]) and the 1×128 scales outer-dim-major
    ([M, K/128] with stride (1, M)); the 128×128 scales are w_scale [N/128, K/128] seen
    transposed. Scales multiply (dequantize), as ours do.
    """
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device")

    def to_torch(a):
        if a.dtype == jnp.float8_e4m3fn:
            u8 = np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8))
            return torch.from_numpy(u8).cuda().view(torch.float8_e4m3fn)
        return torch.from_numpy(np.asarray(a, np.float32)).cuda()

    a = to_torch(x_q)  # [M, K] row-major
    b = to_torch(w_q).t()  # [K, N] column-major, as cuBLASLt wants
    scale_a = to_torch(x_s).t().contiguous().t()  # [M, K/128], M fastest
    scale_b = to_torch(w_s).t()  # [K/128, N/128]

    if api == "_scaled_mm":
        def run():
            return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
    else:
        from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

        def run():
            return scaled_mm(a, b, scale_a=scale_a, scale_recipe_a=ScalingType.BlockWise1x128,
                             scale_b=scale_b, scale_recipe_b=ScalingType.BlockWise128x128,
                             swizzle_a=SwizzleType.NO_SWIZZLE, swizzle_b=SwizzleType.NO_SWIZZLE,
                             output_dtype=torch.bfloat16)
    return run


def time_torch(run) -> tuple[float, np.ndarray]:
    import torch

    for _ in range(WARMUP):
        out = run()
    torch.cuda.synchronize()
    times = []
    for _ in range(ITERS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), sample_rows(out).float().cpu().numpy()


@dataclasses.dataclass
class Row:
    m: int
    n: int
    k: int
    ours: float | None = None
    config: str = ""
    bf16: float | None = None
    xla_ref: float | None = None
    cublas: float | None = None
    diff_ours: float | None = None
    diff_cublas: float | None = None
    cublas_api: str = ""
    errors: dict = dataclasses.field(default_factory=dict)


def bench_shape(m, n, k, *, ours_backend, timer, sweep, use_torch, errors) -> Row:
    row = Row(m, n, k)
    tflops = lambda t: 2.0 * m * n * k / t / 1e12

    def cell(name, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failing cell must not stop the table
            errors.append((f"{m}x{n}x{k} {name}", f"{type(e).__name__}: {e}", traceback.format_exc()))
            row.errors[name] = f"e{len(errors)}"
            return None

    def setup():
        kx, kw = jax.random.split(jax.random.key(m * 7 + n * 13 + k))
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)  # [M, K]
        w = jax.random.normal(kw, (n, k), jnp.bfloat16)  # [N, K]
        # jitted: eager quantization would dispatch (and compile) op by op for every shape
        return (x, w, *jax.jit(fp8.quantize_activation)(x), *jax.jit(fp8.quantize_weight)(w))

    data = cell("setup", setup)
    if data is None:
        return row
    x, w, x_q, x_s, w_q, w_s = data

    ref_fn = jax.jit(lambda *a: fp8.fp8_matmul(*a, backend="reference"))
    ref = cell("xla_ref", lambda: timer(ref_fn, x_q, x_s, w_q, w_s))
    ref_out = None
    if ref is not None:
        row.xla_ref, ref_out = tflops(ref[0]), np.asarray(sample_rows(ref[1]), np.float32)

    bf16_fn = jax.jit(lambda a, b: jnp.einsum("MK,NK->MN", a, b, preferred_element_type=jnp.bfloat16))
    t = cell("bf16", lambda: timer(bf16_fn, x, w))
    row.bf16 = tflops(t[0]) if t else None

    configs = [None]
    if sweep:
        configs += [fp8_gpu.GpuConfig(tile_n=tn, wg_dim=wd, stages=s)
                    for tn in (128, 64) for wd in ("m", "n") for s in (3, 4, 5)]
    best = None
    for cfg in configs:
        if cfg is not None:
            try:
                fp8_gpu.check_config(cfg, "block", jnp.bfloat16)
            except ValueError:
                continue  # does not fit in SMEM
        ours_fn = jax.jit(lambda *a, cfg=cfg: fp8.fp8_matmul(*a, backend=ours_backend, config=cfg))
        name = "ours" if cfg is None else f"ours[{cfg.tile_n}{cfg.wg_dim}{cfg.stages}]"
        t = cell(name, lambda: timer(ours_fn, x_q, x_s, w_q, w_s))
        if t is not None and (best is None or t[0] < best[0]):
            shown = cfg or fp8_gpu.default_config(m, n)
            best = (t[0], np.asarray(sample_rows(t[1]), np.float32),
                    f"{shown.tile_n}{shown.wg_dim}{shown.stages}")
    if best is not None:
        row.ours, row.config = tflops(best[0]), best[2]
        if ref_out is not None:
            row.diff_ours = calc_diff(best[1], ref_out)

    if use_torch:
        # The v1 API first; if it fails or gives a different product (diff > 1e-3 against the
        # reference: a misread scale layout), the v2 API with the recipes named.
        for api in ("_scaled_mm", "scaled_mm"):
            t = cell(f"cublas[{api}]", lambda: time_torch(torch_blockwise(x_q, x_s, w_q, w_s, api)))
            if t is None:
                continue
            diff = calc_diff(t[1], ref_out) if ref_out is not None else None
            row.cublas, row.diff_cublas, row.cublas_api = tflops(t[0]), diff, api
            if diff is None or diff < 1e-3:
                break
    return row


def fmt(v, spec=".0f", err=None):
    if v is None:
        return err or "-"
    if spec == ".0f" and abs(v) < 10:
        spec = ".2g"  # CPU smoke numbers
    return format(v, spec)


def print_table(rows, timer_mode, errors, device):
    head = (f"{'M':>5} {'N':>6} {'K':>6} | {'ours':>7} {'cfg':>5} | {'bf16':>7} | {'xla_ref':>7} | "
            f"{'cublas':>7} | {'ours/cb':>7} {'bf16/cb':>7} | {'diff ours':>9} {'diff cb':>9}")
    print(f"\nfp8 block-scaled GEMM, TFLOP/s ({timer_mode} time, median of {ITERS} after {WARMUP} warm-ups)"
          f" on {device}, jax {jax.__version__}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = lambda a: fmt(a / r.cublas, ".2f") if a is not None and r.cublas else "-"
        print(f"{r.m:>5} {r.n:>6} {r.k:>6} | {fmt(r.ours, '.0f', r.errors.get('ours')):>7} "
              f"{r.config:>5} | {fmt(r.bf16, '.0f', r.errors.get('bf16')):>7} | "
              f"{fmt(r.xla_ref, '.0f', r.errors.get('xla_ref')):>7} | "
              f"{fmt(r.cublas, '.0f', r.errors.get('cublas')):>7} | {ratio(r.ours):>7} {ratio(r.bf16):>7} | "
              f"{fmt(r.diff_ours, '.1e'):>9} {fmt(r.diff_cublas, '.1e'):>9}", flush=True)
    print("cfg = tile_n, warpgroup split (m|n), pipeline stages of the Mosaic GPU kernel")
    if errors:
        print("\nerrors:")
        seen = {}
        for i, (where, msg, tb) in enumerate(errors, 1):
            first = seen.setdefault(msg, i)
            if first == i:
                print(f"  e{i} {where}: {msg[:800]}")
            else:
                print(f"  e{i} {where}: same as e{first}")


def print_ratios(rows):
    """The goals side by side: ours against cuBLAS blockwise and against XLA bf16."""
    print("\nratios (same run): ours/cuBLAS-blockwise (goal ≥ 1), ours/XLA-bf16 (goal ≥ 1.5), "
          "ours/XLA-reference")
    for r in rows:
        q = lambda a, b: f"{a / b:.2f}" if a and b else "-"
        print(f"  {r.m:>5}x{r.n:>6}x{r.k:>6}: {q(r.ours, r.cublas):>6} {q(r.ours, r.bf16):>6} "
              f"{q(r.ours, r.xla_ref):>6}", flush=True)


def main(argv=None):
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU the kernel runs interpreted")
    p.add_argument("--sweep", action="store_true", help="also time every GPU tiling and keep the best")
    p.add_argument("--shapes", default="", help="comma-separated MxNxK to run instead of the table")
    p.add_argument("--timer", choices=("cupti", "host"), default="cupti")
    p.add_argument("--json", default="", help="write the rows here (rewritten after every row)")
    args = p.parse_args(argv)

    global WARMUP, ITERS
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu:
        WARMUP, ITERS = 1, 2  # interpret mode is slow; the smoke run checks plumbing, not speed
    shapes = SMOKE_SHAPES if args.smoke or not on_gpu else GPU_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if not on_gpu and not args.smoke:
        print("# no GPU: running the smoke version (--smoke)")
    ours_backend = "mosaic_gpu" if on_gpu else "pallas_interpret"
    timer = Timer(args.timer if on_gpu else "host")
    use_torch, torch_note = False, "not on a GPU"
    if on_gpu:
        try:
            import torch
            use_torch, torch_note = torch.cuda.is_available(), f"torch {torch.__version__}"
        except Exception as e:  # noqa: BLE001
            torch_note = f"torch not importable ({type(e).__name__})"
    device = jax.devices()[0].device_kind
    print(f"# {device}: {len(shapes)} shapes, ours = {ours_backend}, cuBLAS baseline: "
          f"{use_torch} ({torch_note})", flush=True)
    results = Results(args.json or None, {**device_meta(), "ours": ours_backend,
                                          "torch": torch_note, "warmup": WARMUP, "iters": ITERS})

    rows, errors = [], []
    t_start = time.time()
    for m, n, k in shapes:
        row = bench_shape(m, n, k, ours_backend=ours_backend, timer=timer, sweep=args.sweep,
                          use_torch=use_torch, errors=errors)
        rows.append(row)
        results.set("timer", timer.mode)
        results.add("rows", dataclasses.asdict(row))
        for where, msg, tb in errors[len(results.data["errors"]):]:
            results.data["errors"].append({"where": where, "error": msg[:2000], "traceback": tb[-3000:]})
        results.save()
        print(f"# {m}x{n}x{k}: ours {fmt(row.ours)} cublas {fmt(row.cublas)} bf16 {fmt(row.bf16)} "
              f"xla_ref {fmt(row.xla_ref)} TFLOP/s ({time.time() - t_start:.0f} s)", flush=True)
    print_table(rows, timer.mode, errors, device)
    print_ratios(rows)
    check_imports()
    bad = [r for r in rows if r.diff_ours is not None and r.diff_ours > 1e-3]
    if bad:
        print(f"\nFAILED correctness (diff > 1e-3) for {[(r.m, r.n, r.k) for r in bad]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
