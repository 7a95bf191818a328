"""Does dropless EP64 of DeepSeek-V3 (671B) fit on a v5p-1024? An ahead-of-time compile check.

    python experiments/benchmarks/moe_ep_memory.py [--layers 4,5] [--json out.json]

Compiles the real sharded train step (`sharded.make_sharded_train_step`, AdamW, the fsdp_ep preset
with fsdp=8 × expert=64 on the 512 chips of v5p-1024, global batch 512 = 1 sequence of 4096
tokens per chip) for compile-only TPU devices from `jax.experimental.topologies` (needs libtpu,
no TPU), and reads the compiler's per-chip memory (or its out-of-memory report).

To stay cheap on a small host it compiles the model with fewer layers (3 dense layers kept, a few
MoE layers, the MTP module) and extrapolates linearly in the number of MoE layers to V3's 58:
with scanned layers, parameters, optimizer state and saved layer inputs grow by the same amount
per layer, while the temporaries of one layer's forward and backward (the all-to-all buffers
among them) are reused by every layer. Two compiles (`--layers 4,5`) measure the per-layer slope;
one (`--layers 4`) takes it from the state's shard shapes (parameters, moments, fp32 gradients,
one saved layer input). On a shared 2-core host one compile takes about 17 minutes.

The EP exchange is the bounded one (`model/dispatch.py`): a receive buffer of
moe_ep_buffer_factor × the balanced load per round, overflow rounds for skewed routing; it never
sizes a buffer for every token landing on one chip (MaxText's dropless EP64 does, and that
needs 99.9 GiB of temporaries on this topology against 95.7 GiB of HBM).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

# Compile-only TPU devices on a CPU host: JAX itself runs on the CPU; libtpu may be loaded by
# other processes on the same host (its lock file would otherwise make this one wait).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deepseek_jax import parallel  # noqa: E402
from deepseek_jax.config import get_config  # noqa: E402
from deepseek_jax.tools import buffers  # noqa: E402
from deepseek_jax.tools.compile import abstract_train_inputs  # noqa: E402

GIB = 2 ** 30
V5P_HBM = 95.74 * GIB


def compile_memory(n_layers: int, batch: int, seq: int, remat: str, buffer_factor: float,
                   transport: str, backend: str) -> dict:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:8x8x8")
    devices = list(topo.devices)
    config = get_config("v3-671b", n_layers=n_layers, remat_policy=remat,
                        moe_ep_buffer_factor=buffer_factor, moe_ep_transport=transport,
                        moe_backend=backend)
    mesh = parallel.make_mesh({"fsdp": 8, "expert": 64}, devices)
    rules = parallel.logical_axis_rules("fsdp_ep", mesh)
    state, data, step = abstract_train_inputs(config, mesh, rules, batch, seq)
    t0 = time.perf_counter()
    lowered = step.lower(state, data)
    out = {"n_layers": n_layers, "n_moe_layers": config.n_moe_layers}
    # Per-chip bytes of one scanned MoE layer's parameters and AdamW moments (exact shard shapes),
    # for the one-compile extrapolation.
    def shard(leaf):
        return math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    stack = lambda tree: sum(shard(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
                             if "moe_layers" in jax.tree_util.keystr(p))
    out["moe_layer_params"] = stack(state.params) / config.n_moe_layers
    out["moe_layer_state"] = (stack(state.params) + stack(state.opt_state)) / config.n_moe_layers
    try:
        compiled = lowered.compile()
    except Exception as e:          # noqa: BLE001 — an OOM report is a result
        out.update(fits=False, error=str(e).splitlines()[0][:400],
                   compile_s=time.perf_counter() - t0)
        return out
    m = compiled.memory_analysis()
    out.update(fits=True, compile_s=time.perf_counter() - t0,
               arguments=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
    out["total"] = buffers.allocated_bytes(m)
    text = compiled.as_text()
    out["ragged_all_to_all_ops"] = text.count("ragged-all-to-all")
    out["all_to_all_ops"] = text.count(" all-to-all(")
    return out


def main():
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,5",
                    help="n_layers values (3 are dense): two give a measured per-layer slope, "
                         "one a slope from shapes")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--buffer_factor", type=float, default=2.0)
    ap.add_argument("--transport", default="ragged_all_to_all")
    ap.add_argument("--backend", default="megablox")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    results = []
    for n in (int(v) for v in args.layers.split(",")):
        r = compile_memory(n, args.batch, args.seq, args.remat, args.buffer_factor,
                           args.transport, args.backend)
        results.append(r)
        show = {k: (f"{v / GIB:.2f} GiB" if k in ("arguments", "output", "alias", "temp", "total")
                    else v) for k, v in r.items()}
        print(json.dumps(show), flush=True)
    summary = {"results": results}
    if len(results) == 2 and all(r["fits"] for r in results):
        a, b = results
        per_layer = {k: (b[k] - a[k]) / (b["n_moe_layers"] - a["n_moe_layers"])
                     for k in ("arguments", "temp", "total")}
        full = {k: a[k] + per_layer[k] * (58 - a["n_moe_layers"]) for k in per_layer}
        summary.update(per_moe_layer=per_layer, v3_671b_extrapolated=full,
                       fits_v5p=full["total"] < V5P_HBM)
        print(f"per MoE layer: total {per_layer['total'] / GIB:.2f} GiB "
              f"(arguments {per_layer['arguments'] / GIB:.2f}, temp {per_layer['temp'] / GIB:.2f})")
        print(f"v3-671b (58 MoE layers) extrapolated: total {full['total'] / GIB:.1f} GiB, "
              f"temp {full['temp'] / GIB:.1f} GiB, arguments {full['arguments'] / GIB:.1f} GiB "
              f"of {V5P_HBM / GIB:.1f} GiB HBM → {'fits' if summary['fits_v5p'] else 'DOES NOT FIT'}")
    if len(results) == 1 and results[0]["fits"]:
        # One compile: the per-layer slope from shapes — state (params + moments, arguments),
        # fp32 gradients of the stacked parameters (temporaries), and with remat "full" one saved
        # [b, T, D] bf16 layer input per chip.
        (a,) = results
        saved = args.batch // 512 * args.seq * get_config("v3-671b").d_model * 2
        per_layer = {"arguments": a["moe_layer_state"], "temp": a["moe_layer_params"] + saved}
        per_layer["total"] = per_layer["arguments"] + per_layer["temp"]
        full = {k: a[k] + per_layer[k] * (58 - a["n_moe_layers"]) for k in per_layer}
        summary.update(per_moe_layer_from_shapes=per_layer, v3_671b_extrapolated=full,
                       fits_v5p=full["total"] < V5P_HBM)
        print(f"per MoE layer (from shapes): {per_layer['total'] / GIB:.2f} GiB; v3-671b "
              f"extrapolated: total {full['total'] / GIB:.1f} GiB (temp {full['temp'] / GIB:.1f}, "
              f"arguments {full['arguments'] / GIB:.1f}) of {V5P_HBM / GIB:.1f} GiB → "
              f"{'fits' if summary['fits_v5p'] else 'DOES NOT FIT'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=float)


if __name__ == "__main__":
    main()
