"""h200.sh's large programs compiled for an H100 or an H200 on a CPU host: memory and kernels
known before any device time is spent.

  PYTHONPATH=.venv/cuda-plugin JAX_PLATFORMS=cpu python experiments/benchmarks/gpu_compile.py
  ... --target h200 --only train --train-batch 8,16        # one GPU, one part, other batches

Each program below is lowered and compiled for one compile-only device of the GPU named
(`deepseek_jax.tools.gpu_targets`: XLA's GPU compiler given the device's description instead
of the device), and one row printed per program:

  compile s      lowering + XLA's compile on this host (the GPU host's 16 cores compile faster)
  args, temp     XLA's memory analysis: arguments, and temporaries at the peak
  need           args + temp + outputs not aliased to donated arguments, in GB
  limit          the device's memory × the fraction the benchmark gives its allocator
                 (`XLA_PYTHON_CLIENT_MEM_FRACTION`: train 0.92, decode 0.95, the rest JAX's 0.75)
  fits           need ≤ limit, and XLA did not have to rematerialize to get there (a warning
                 XLA prints when a program does not fit its device; then the run would differ)
  kernels        custom calls in the program: mosaic_gpu (our Pallas kernels), cudnn (fused
                 attention), cublas (library GEMMs), and XLA's own Triton GEMM fusions
  --ptxas        under each row, every Mosaic GPU kernel as ptxas assembled it for sm_90a:
                 registers per thread, bytes spilled to local memory, shared memory
  --peak N       under each row, the memory the values live at the program's memory peak
                 occupy, by kind (arguments, temporaries, outputs), and the N largest of them
                 that are not arguments (`deepseek_jax.tools.buffers`, from XLA's buffer
                 assignment and live ranges): what to shrink for a larger batch

The programs: the V2-Lite-width train step (bf16, fp8) at the batch `train_step.py` picks for
the device, the MoE layer forward+backward of `moe.py` at its V3-like shape (bf16 and fp8 on the
Mosaic grouped GEMM, and its dense SwiGLU), and `decode.py`'s decode steps at batch 128 × 32k
(V3 widths on the latent cache; V2-Lite widths on both caches), and the 8192³ GEMMs of
`fp8_gemm.py` (XLA bf16, the fp8 reference XLA runs, and "auto", our Mosaic GPU kernel).

Needs, beside this repository's environment, the CUDA plugin of the installed jax on the path
(`make venv` puts it in .venv/cuda-plugin, from requirements-gpu-compile.txt; `--ptxas` needs
its `[with-cuda]` extra, about 4 GB more) and `JAX_PLATFORMS=cpu` (`gpu_targets` says why, and
how JAX's own local-GPU queries are answered).

The Mosaic GPU kernels are compiled here as on the device: to PTX for sm_90a, and by ptxas to
machine code where ptxas is installed (`--ptxas`). What this cannot tell: run time; numerics;
and the sort XLA uses for the MoE's routing (without a device XLA has no CUB scratch sizes and
compiles its fallback sort; on the device it takes CUB's).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax.tools import buffers, gpu_targets  # noqa: E402

GB = 1e9

MEMORY = gpu_targets.MEMORY
DEFAULT_FRACTION = 0.75          # JAX's allocator, where a script does not set its own


def target_device(target: str):
    """One compile-only GPU device of kind `target` ("h100", "h200")."""
    try:
        return gpu_targets.compile_only_devices(target, 1)[0]
    except gpu_targets.NoCompileOnlyGpu as e:
        raise SystemExit(str(e)) from e


def kernels(hlo: str) -> str:
    """The kernels of a compiled program XLA did not write itself, counted by family: our Pallas
    (Mosaic GPU) calls, cuDNN attention, cuBLAS GEMMs, and XLA's Triton GEMM fusions."""
    targets = re.findall(r'custom_call_target="([^"]+)"', hlo)
    count = lambda prefix: sum(1 for t in targets if t.startswith(prefix))  # noqa: E731
    parts = [f"{name} {n}" for name, n in (
        ("mosaic_gpu", count("mosaic_gpu")), ("cudnn", count("__cudnn")),
        ("cublas", count("__cublas")),
        ("triton_gemm", len(re.findall(r'"kind":"__triton\w*gemm\w*"', hlo)))) if n]
    return ", ".join(parts) or "none"


class _Stderr:
    """Collects what XLA writes to file descriptor 2 (its C++ log) while a compile runs."""

    def __enter__(self):
        import tempfile
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()


def compile_row(name, fn, args, device, limit: float, peak: int = 0) -> dict:
    """Lowers and compiles fn(*args) for `device`; the row of the table (or its error). `limit`:
    the bytes the benchmark's allocator would hold on the device; `peak`: list that many values
    live at the memory peak."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          args)
    mesh = jax.sharding.Mesh(np.array([device]), ("device",))
    row = {"program": name, "limit_gb": limit / GB}
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh), gpu_targets.answering_for([device]), _Stderr() as log:
            lowered = fn.trace(*placed).lower()
            if peak:
                compiled, assignment, live = buffers.compile_with_assignment(lowered)
            else:
                compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - one failing program must not stop the table
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else \
            type(e).__name__
        return row
    m = compiled.memory_analysis()
    need = buffers.allocated_bytes(m)
    remat = "by rematerialization" in log.text
    row.update(compile_s=time.perf_counter() - t0, args_gb=m.argument_size_in_bytes / GB,
               temp_gb=m.temp_size_in_bytes / GB, need_gb=need / GB, remat=remat,
               fits=need <= row["limit_gb"] * GB and not remat,
               kernels=kernels(compiled.as_text()))
    if peak:
        at_peak, occupied = buffers.peak_buffers(live, assignment, compiled.as_text(), n=None)
        by_kind = collections.defaultdict(float)
        for b in at_peak:
            by_kind[b.kind] += b.bytes / GB
        row.update(peak_gb=occupied / GB, peak_gb_by_kind=dict(by_kind))
        # The arguments (parameters, optimizer state, batch) are known from the program's
        # inputs; what the compiler made is the rest.
        made = [b for b in at_peak if b.kind != "parameter"][:peak]
        row["at_peak"] = [dataclasses.asdict(b) for b in made]
    return row


def train_programs(memory, args):
    from experiments.benchmarks import train_step as bench
    limit = float(bench.MEM_FRACTION) * memory
    batches = tuple(int(b) for b in args.train_batch.split(",") if b)
    remat = "" if args.remat == "none" else f", remat {args.remat}"
    for variant in ("bf16", "fp8"):
        for batch in batches or (bench.default_batch(limit),):
            config = bench.model_config(variant, bench.LAYERS, bench.SEQ, smoke=False,
                                        remat=args.remat)
            init, step = bench.train_program(config)
            state = jax.eval_shape(init, jax.random.key(0))
            data = {"tokens": jax.ShapeDtypeStruct((batch, bench.SEQ), jnp.int32)}
            yield (f"train step {variant}, batch {batch} x {bench.SEQ}{remat}", step,
                   (state, data), limit)


def moe_programs(memory, args):
    from experiments.benchmarks import moe
    moe_loss, dense_loss, moe_args, dense_args, _ = moe.layer_problem(moe.SHAPES["v3"])
    limit = DEFAULT_FRACTION * memory
    yield ("MoE layer V3-like: dense SwiGLU fwd+bwd",
           jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2, 3))), dense_args, limit)
    for fp8 in (False, True):
        fn = jax.jit(jax.grad(lambda *a, fp8=fp8: moe_loss(*a, "mosaic_gpu", fp8),
                              argnums=(0, 1, 2, 3, 4)))
        yield (f"MoE layer V3-like: mosaic_gpu{' fp8' if fp8 else ''} fwd+bwd", fn, moe_args,
               limit)


def decode_programs(memory, args):
    from deepseek_jax.model import init_variables
    from experiments.benchmarks import decode
    limit = float(decode.MEM_FRACTION) * memory
    for label, config, kinds in (("V3 widths", decode.v3_attention_config(1), ("latent",)),
                                 ("V2-Lite widths", decode.mid_config(1), ("latent", "expanded"))):
        variables = jax.eval_shape(lambda c=config: init_variables(jax.random.key(0), c))
        for kind in kinds:
            step, cache = decode.decode_program(config, 128, 32768, kind)
            yield (f"decode {label}, {kind} cache, 128 x 32k", step, (variables, cache), limit)


def gemm_programs(memory, args):
    from deepseek_jax.kernels import fp8
    m = n = k = 8192
    bf16 = jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k), jnp.bfloat16)
    quantized = (*jax.eval_shape(fp8.quantize_activation, bf16[0]),
                 *jax.eval_shape(fp8.quantize_weight, bf16[1]))
    limit = DEFAULT_FRACTION * memory
    yield ("GEMM 8192³ XLA bf16", jax.jit(lambda a, b: jnp.einsum(
        "MK,NK->MN", a, b, preferred_element_type=jnp.bfloat16)), bf16, limit)
    for backend in ("reference", "auto"):
        yield (f"fp8 GEMM 8192³ {backend}", jax.jit(
            lambda *a, b=backend: fp8.fp8_matmul(*a, backend=b)), quantized, limit)


PARTS = {"train": train_programs, "moe": moe_programs, "decode": decode_programs,
         "gemm": gemm_programs}


class MosaicReports:
    """What ptxas made of each Mosaic GPU kernel compiled while this is open: JAX's Mosaic GPU
    compiler runs ptxas itself when it finds one (the CUDA plugin's `[with-cuda]` extra brings
    it) and, with MOSAIC_GPU_DUMP_TO / _PTXAS / _RESOURCES set, writes its report and the
    kernel's shared memory to a folder. `new()` reads the kernels compiled since the last call
    and deletes their other dumps (the MLIR pass log alone is tens of MB a kernel)."""

    def __init__(self):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="mosaic_gpu_")
        os.environ.update(MOSAIC_GPU_DUMP_TO=self.dir, MOSAIC_GPU_DUMP_PTXAS="1",
                          MOSAIC_GPU_DUMP_RESOURCES="1")

    def new(self) -> list[dict]:
        out = []
        for path in sorted(pathlib.Path(self.dir).glob("*.ptxas")):
            stem = path.with_suffix("")
            report = path.read_text()
            ptx = stem.with_suffix(".ptx")
            files = re.findall(r'\.file\s+\d+\s+"([^"]+)"', ptx.read_text()) if ptx.exists() else []
            resources = stem.with_suffix(".resources.txt")
            smem = re.search(r"smem_scratch_bytes=(\d+)",
                             resources.read_text() if resources.exists() else "")
            regs = re.search(r"Used (\d+) registers", report)
            spill = re.search(r"(\d+) bytes spill stores", report)
            out.append({"kernel": stem.name, "source": pathlib.Path(files[0]).name if files else "",
                        "registers": int(regs.group(1)) if regs else None,
                        "spill_bytes": int(spill.group(1)) if spill else None,
                        "smem_bytes": int(smem.group(1)) if smem else None})
            for f in pathlib.Path(self.dir).glob(stem.name + ".*"):
                f.unlink()
        return out


def print_row(r: dict) -> None:
    if "error" in r:
        print(f"  {r['program']:<52} ERROR {r['error']}", flush=True)
        return
    fits = "yes" if r["fits"] else ("NO (XLA rematerialized)" if r["remat"] else "NO")
    print(f"  {r['program']:<52} {r['compile_s']:>6.0f} {r['args_gb']:>6.1f} {r['temp_gb']:>6.1f}"
          f" {r['need_gb']:>6.1f} {r['limit_gb']:>6.1f}  {fits:<4} {r['kernels']}", flush=True)
    if "at_peak" in r:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["peak_gb_by_kind"].items(),
                                                            key=lambda kv: -kv[1]))
        print(f"      live at the peak: {r['peak_gb']:.1f} GB ({kinds}); largest not arguments:",
              flush=True)
        for b in r["at_peak"]:
            op = b["op"].rsplit("/", 2)
            print(f"        {b['bytes'] / GB:6.2f} GB {b['shape']:<28} {b['kind']:<9} "
                  f"{'/'.join(op[-2:]) if b['op'] else b['name']}", flush=True)
    for k in r.get("mosaic", []):
        print(f"      {k['kernel']:<14} {k['source']:<32} {k['registers']} registers, "
              f"{k['spill_bytes']} B spilled, {(k['smem_bytes'] or 0) / 1024:.0f} KiB smem",
              flush=True)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="h100,h200", help="h100, h200 or both (comma-separated)")
    p.add_argument("--only", default=",".join(PARTS), help=f"parts: {','.join(PARTS)}")
    p.add_argument("--train-batch", default="",
                   help="train step batches to compile (default: the one train_step.py picks)")
    p.add_argument("--remat", default="none",
                   help="the train step's model.remat_policy, e.g. save_attention")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--ptxas", action="store_true",
                   help="list ptxas's registers, spills and shared memory of every Mosaic GPU "
                        "kernel (needs ptxas: the plugin's [with-cuda] extra)")
    p.add_argument("--peak", type=int, default=0, metavar="N",
                   help="list the N largest values live at each program's memory peak")
    args = p.parse_args(argv)
    reports = MosaicReports() if args.ptxas else None
    from experiments.benchmarks.common import Results
    results = Results(args.json or None, {"jax": jax.__version__, "host": "compile only"})
    rows = []
    for target in args.target.split(","):
        device = target_device(target)
        print(f"\n{device.device_kind} ({MEMORY[target] / GB:.1f} GB, compile-only)")
        print(f"  {'program':<52} {'comp s':>6} {'args':>6} {'temp':>6} {'need':>6} "
              f"{'limit':>6}  fits kernels")
        for part in args.only.split(","):
            for name, fn, fn_args, limit in PARTS[part](MEMORY[target], args):
                row = {"target": target, **compile_row(name, fn, fn_args, device, limit,
                                                          args.peak)}
                if reports is not None:
                    row["mosaic"] = reports.new()
                    if "mosaic_gpu" in row.get("kernels", "") and not row["mosaic"]:
                        row["mosaic_note"] = "no ptxas report: ptxas not found (install the " \
                                             "plugin with its [with-cuda] extra)"
                        print(f"      {row['mosaic_note']}")
                results.add("rows", row)
                print_row(row)
                rows.append(row)
    return rows


if __name__ == "__main__":
    main()
