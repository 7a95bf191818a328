"""MoE at speed: grouped GEMM backends and the MoE layer against dense equivalents; EP traffic.

GPU (one H200; part 3 of experiments/benchmarks/h200.sh, ~80 s):

    python experiments/benchmarks/moe.py [--json out.json] [--quick]
    python experiments/benchmarks/moe.py --smoke       # CPU: tiny shapes through the same code

  1. grouped GEMM: `gmm` forward at an expert projection's shape (rows sorted over E experts,
     routing drawn from a random gate) per backend, TFLOP/s against one dense GEMM of the same
     rows and sizes. Goal: grouped ≥ 85 % of dense. Also the fp8 grouped GEMM (`fp8=True`:
     rows and weights quantized inside the call, as the layer does) of the main backend.
  2. MoE layer forward+backward (router, gate, sort, three grouped GEMMs, combine; no shared
     expert) per backend, and with fp8 experts, against a dense bf16 SwiGLU whose width is X·F,
     i.e. the same active FLOPs. Goal: MoE ≤ 1.3× the dense time.
  Shapes: V2-Lite-like (D 2048, F 1408, E 64, X 6) and V3-like (D 7168, F 2048, E 256, X 8;
  one device holds all 256 experts here, as a single GPU would under no EP). bf16 weights and
  activations, random normal data, median of 10 after 3 warm-ups, host-timed after
  `block_until_ready`. The JSON file is rewritten after every row.
  3. `jax.lax.ragged_dot` only at a capped shape (V2-Lite widths, 1,024 tokens): XLA:GPU turns it
     into a dense dot over a masked [E, M, K] operand (E× the FLOPs; ~240 GB at the V3 shape), so
     it never runs at the full shapes on a GPU.

CPU (8 fake devices; `--cpu_ep`): bytes moved by the expert-parallel all-to-all in one forward+
backward, read from the compiled HLO, against the analytic count of the bounded-buffer exchange:
per round a [P, C, D] block for each of dispatch and return in the forward and their transposes
in the backward, plus the [P, C] int32 expert ids (the dense transport never sends the counts).
Also the ideal (ragged_all_to_all) payload: the real rows only, 4·M·D elements.

Nothing here ran on a GPU when it was written; BENCHMARKS.md says which numbers were measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

_CPU_EP = "--cpu_ep" in sys.argv
if _CPU_EP:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import parallel  # noqa: E402
from deepseek_jax.config import get_config  # noqa: E402
from deepseek_jax.kernels import grouped_gemm as gg  # noqa: E402
from deepseek_jax.model import dispatch, routing  # noqa: E402
from deepseek_jax.model.layers import swiglu  # noqa: E402

SHAPES = {
    "v2-lite": dict(D=2048, F=1408, E=64, X=6, tokens=16384),
    "v3": dict(D=7168, F=2048, E=256, X=8, tokens=8192),
}
# ragged_dot on a GPU densifies (above): only this capped shape, [E, M, K] bf16 = 1.6 GB.
RAGGED_DOT_GPU_SHAPE = dict(D=2048, F=1408, E=64, X=6, tokens=1024)
SMOKE_SHAPES = {
    "v2-lite": dict(D=128, F=64, E=8, X=2, tokens=64),
    "v3": dict(D=256, F=128, E=16, X=4, tokens=64),
}
REPS, WARMUP = 10, 3


def _time(fn, *args, reps=None, warmup=None):
    reps = REPS if reps is None else reps
    warmup = WARMUP if warmup is None else warmup
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _routing(key, tokens, E, X):
    """Expert ids from a random sigmoid gate (roughly balanced, as trained routing is)."""
    logits = jax.random.normal(key, (tokens, E), jnp.float32)
    return jax.lax.top_k(logits, X)[1].astype(jnp.int32)                   # [tokens, X]


def grouped_gemm_rows(shape, backends, tilings=(), fp8_rows=True):
    """Yields one dict per row: the dense GEMM first, then each backend / tiling."""
    D, F, E, X, tokens = (shape[k] for k in ("D", "F", "E", "X", "tokens"))
    k = jax.random.split(jax.random.key(0), 3)
    idx = _routing(k[0], tokens, E, X)
    sizes = jnp.bincount(idx.reshape(-1), length=E).astype(jnp.int32)
    M = tokens * X
    rows = jax.random.normal(k[1], (M, D), jnp.bfloat16)
    w = (jax.random.normal(k[2], (E, D, F), jnp.float32) / np.sqrt(D)).astype(jnp.bfloat16)
    w_dense = w[0]
    flops = 2 * M * D * F
    dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)
                    .astype(jnp.bfloat16))
    t_dense = _time(dense, rows, w_dense)
    yield {"what": "dense GEMM", "M": M, "ms": t_dense * 1e3, "tflops": flops / t_dense / 1e12}
    configs = [(b, None, False) for b in backends] + [("mosaic_gpu", t, False) for t in tilings]
    if fp8_rows and backends:   # the fp8 grouped GEMM, quantizing rows and weights per call
        configs.append((backends[-1], None, True))   # Mosaic GPU on Hopper; emulated on CPU
    for backend, tiling, fp8 in configs:
        fn = jax.jit(lambda a, b, s: gg.gmm(a, b, s, backend=backend, tiling=tiling, fp8=fp8))
        what = f"gmm {backend}{' fp8 (incl. quantize)' if fp8 else ''} {_tiling_name(tiling)}".strip()
        try:
            t = _time(fn, rows, w, sizes)
        except Exception as e:     # noqa: BLE001 — report and go on (e.g. shared-memory overflow)
            yield {"what": what, "error": _short(e)}
            continue
        yield {"what": what, "M": M, "ms": t * 1e3, "tflops": flops / t / 1e12,
               "of_dense": t_dense / t}


def _tiling_name(t) -> str:
    if t is None:
        return ""
    return (f"[{t.block_m}x{t.block_n}x{t.block_k} stages {t.max_concurrent_steps} "
            f"grid_n {t.grid_block_n}]")


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    return text.splitlines()[0][:400] if text else type(e).__name__


def layer_problem(shape):
    """The layer rows' programs: (moe_loss(x, router, wg, wu, wdn, backend, fp8), dense_loss(x,
    a, b, d), moe argument shapes, dense argument shapes, FLOPs of one fwd+bwd). Shapes only, so
    that `gpu_compile.py` compiles the same functions without allocating their weights."""
    D, F, E, X, tokens = (shape[k] for k in ("D", "F", "E", "X", "tokens"))
    c = get_config("tiny", d_model=D, moe_d_ff=F, n_routed_experts=E, n_experts_per_token=X,
                   n_expert_groups=1, n_limited_groups=1, dtype=jnp.bfloat16,
                   param_dtype=jnp.bfloat16)

    def moe_loss(x, router, wg, wu, wdn, backend, fp8=False):
        logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), router)
        weights, idx, _ = routing.gate(logits, None, c)
        y = dispatch.ragged_dispatch(x, weights, idx, wg, wu, wdn, jnp.bfloat16, fp8=fp8,
                                     backend=backend)
        return jnp.sum(y.astype(jnp.float32))

    def dense_loss(x, a, b, d):
        return jnp.sum(swiglu(x, a, b, d, jnp.bfloat16).astype(jnp.float32))

    bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
    moe_args = (bf16(1, tokens, D), jax.ShapeDtypeStruct((D, E), jnp.float32),
                bf16(E, D, F), bf16(E, D, F), bf16(E, F, D))
    dense_args = (bf16(1, tokens, D), bf16(D, X * F), bf16(D, X * F), bf16(X * F, D))
    flops = 3 * 2 * tokens * D * X * F * 3                  # 3 GEMMs, fwd + 2 bwd
    return moe_loss, dense_loss, moe_args, dense_args, flops


def layer_rows(shape, backends):
    """Yields one dict per row: the dense SwiGLU of the same active FLOPs, then each backend."""
    moe_loss, dense_loss, moe_args, dense_args, flops = layer_problem(shape)
    k = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(k[0], moe_args[0].shape, jnp.bfloat16)
    router = jax.random.normal(k[1], moe_args[1].shape, jnp.float32) * 0.02
    w = [(jax.random.normal(k[i], a.shape, jnp.float32) / np.sqrt(a.shape[1])).astype(jnp.bfloat16)
         for i, a in zip((2, 3, 4), moe_args[2:])]
    wd = [jax.random.normal(k[5], a.shape, jnp.bfloat16) / np.sqrt(a.shape[0])
          for a in dense_args[1:]]

    dense = jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2, 3)))
    t_dense = _time(dense, x, *wd)
    yield {"what": "dense SwiGLU (width X·F) fwd+bwd", "ms": t_dense * 1e3,
           "tflops": flops / t_dense / 1e12}
    runs = [(b, False) for b in backends] + [(b, True) for b in backends[-1:]]
    for backend, fp8 in runs:
        fn = jax.jit(jax.grad(lambda *a: moe_loss(*a, backend, fp8), argnums=(0, 1, 2, 3, 4)))
        name = f"MoE layer {backend}{' fp8' if fp8 else ''}"
        try:
            t = _time(fn, x, router, *w)
        except Exception as e:     # noqa: BLE001
            yield {"what": name, "error": _short(e)}
            continue
        yield {"what": f"{name} fwd+bwd", "ms": t * 1e3,
               "tflops": flops / t / 1e12, "x_dense": t / t_dense}


# --- CPU: EP all-to-all bytes ---------------------------------------------------------------

_A2A = re.compile(r"=\s*(\(?[^=]*?\)?)\s+all-to-all\(")
_TYPE = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "u32": 4, "pred": 1, "s8": 1}


def _hlo_computations(text):
    """{name: body text} of an HLO module's computations."""
    comps, name, lines = {}, None, []
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name, lines = ("ENTRY" if line.startswith("ENTRY") else m.group(1)), []
        elif line.startswith("}") and name:
            comps[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return comps


def _a2a_bytes(body):
    total, ops = 0, 0
    for m in _A2A.finditer(body):
        ops += 1
        for dtype, dims in _TYPE.findall(m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += n * _BYTES[dtype]
    return total, ops


def ep_bytes(batch=16, seq=64, D=256, F=64, E=16, X=4, fsdp=2, expert=4, buffer_factor=2.0):
    from deepseek_jax import parallel as par
    jax.config.update("jax_disable_most_optimizations", True)
    mesh, rules = par.mesh_and_rules("fsdp_ep", {"fsdp": fsdp, "expert": expert})
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (batch, seq, D), jnp.float32)
    idx = _routing(k[1], batch * seq, E, X).reshape(batch, seq, X)
    weights = jax.random.uniform(k[2], (batch, seq, X))
    ws = [jax.random.normal(k[i], s) * 0.1 for i, s in ((3, (E, D, F)), (4, (E, D, F)),
                                                         (5, (E, F, D)))]
    with par.sharding_context(mesh, rules):
        layout = routing.layout_from_context(get_config("tiny", n_routed_experts=E,
                                                   n_experts_per_token=X))
        f = lambda x, w, *ws: jnp.sum(dispatch.expert_parallel_moe(
            x, w, idx, *ws, layout=layout, dtype=jnp.float32, transport="all_to_all",
            buffer_factor=buffer_factor)[0])
        text = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4))).lower(x, weights, *ws) \
            .compile().as_text()
    comps = _hlo_computations(text)
    loop_bodies = set(re.findall(r"body=%?([\w.\-]+)", text))
    outside = sum(_a2a_bytes(b)[0] for n, b in comps.items() if n not in loop_bodies)
    ops_outside = sum(_a2a_bytes(b)[1] for n, b in comps.items() if n not in loop_bodies)
    per_loop_round = sum(_a2a_bytes(b)[0] for n, b in comps.items() if n in loop_bodies)
    P = expert
    M = batch // (fsdp * expert) * seq * X
    C = dispatch.chunk_rows(M, P, buffer_factor)
    block, ids = P * C * D * 4, P * C * 4                   # one [P, C, D] f32 block, [P, C] int32
    analytic = 4 * block + ids          # round 0: dispatch, return, their two transposes; ids
    # An overflow round: forward loop body (dispatch, return, ids) and backward loop body
    # (the replayed dispatch and ids — the replayed return is dead code — and the 2 transposes).
    analytic_overflow = (2 * block + ids) + (3 * block + ids)
    ideal = 4 * M * D * 4
    return {"P": P, "M_pairs_per_device": M, "C": C, "hlo_bytes_round0": outside,
            "hlo_all_to_all_ops_round0": ops_outside, "analytic_bytes_round0": analytic,
            "hlo_bytes_per_overflow_round_fwd_and_bwd_bodies": per_loop_round,
            "analytic_bytes_per_overflow_round": analytic_overflow,
            "ideal_ragged_payload_bytes": ideal, "padding_overhead": analytic / ideal}


def _print_row(r):
    print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in r.items()), flush=True)


def main(argv=None):
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    global REPS, WARMUP
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="", help="results, rewritten after every row")
    ap.add_argument("--quick", action="store_true", help="V2-Lite shape only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU rehearsal)")
    ap.add_argument("--cpu_ep", action="store_true", help="EP all-to-all bytes on 8 CPU devices")
    args = ap.parse_args(argv)
    from experiments.benchmarks.common import Results, check_imports, device_meta
    if args.cpu_ep:
        out = ep_bytes()
        print(json.dumps(out, indent=1))
        if args.json:
            Results(args.json).set("ep_bytes", out)
        return

    on_gpu = jax.default_backend() == "gpu"
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.smoke:
        REPS, WARMUP = 2, 1
    # Grouped GEMM backends at the full shapes: never ragged_dot on a GPU (see the docstring).
    backends = ["ragged_dot"] if not on_gpu else []
    if gg.default_backend() == "mosaic_gpu":
        backends.append("mosaic_gpu")
    if jax.default_backend() == "tpu":
        backends.append("megablox")
    # One other tiling (the wider N tile), at the V2-Lite shape only: time.
    tilings = [gg.MosaicGpuTiling(128, 256, 64, 3, 1)] if "mosaic_gpu" in backends else []
    results = Results(args.json or None, {**device_meta(), "backends": backends,
                                          "reps": REPS, "warmup": WARMUP})
    print(f"device: {jax.devices()[0].device_kind}; backends: {backends}", flush=True)
    start = time.perf_counter()
    parts = []
    for name, shape in shapes.items():
        if args.quick and name != "v2-lite":
            continue
        parts.append((f"{name} grouped GEMM", shape,
                      lambda s=shape, n=name: grouped_gemm_rows(
                          s, backends, tilings if n == "v2-lite" else ())))
        parts.append((f"{name} layer", shape, lambda s=shape: layer_rows(s, backends)))
    if on_gpu:
        parts.append(("ragged_dot capped grouped GEMM", RAGGED_DOT_GPU_SHAPE,
                      lambda: grouped_gemm_rows(RAGGED_DOT_GPU_SHAPE, ["ragged_dot"],
                                                fp8_rows=False)))
    for part, shape, rows in parts:
        print(f"\n== {part} {shape}", flush=True)
        results.set(f"{part} shape", shape)
        try:
            for r in rows():
                results.add(part, r)
                _print_row(r)
        except Exception as e:     # noqa: BLE001 — e.g. the dense baseline itself failed
            results.error(part, e)
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    check_imports()


if __name__ == "__main__":
    main()
