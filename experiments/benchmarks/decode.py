"""Benchmark: decode throughput with the MLA latent cache against the expanded (MHA-style) cache,
and what MTP speculative decoding buys.

Prints one table. Part 1, one decode step (`Transformer.decode`, T = 1, cache donated) of a
model with DeepSeek-V3's attention widths (`--model v3`, the default: D 7168, N 128, Q 1536,
C 512, R 64, H = U = 128, vocab 129,280) and `--layers` dense layers (default 1; FFN 18,432; a
dense FFN keeps MoE dispatch out of an attention benchmark), one MTP module, bf16, random
weights — at batch 128, 32 and 1 and context 32k and 4k, every row of the cache filled (random
values; decode cost does not depend on them):

  cache GB      the whole cache: latent (C + R)·2 bytes = 1,152 per token per layer, expanded
                N·(H+R+U)·2 = 81,920 at V3's widths (71× more; 10,240 at V2-Lite's, 8.9×)
  tok/s         batch / median step time (host time around block_until_ready, 10 steps after
                2 warm-ups)
  latent/exp    the speed-up of the latent cache (the goal: ≥ 5× at 32k context, batch 128,
                where reading the cache dominates a step)

A row whose cache and weights would not fit in device memory is reported as "does not fit"
without being tried: at V3's widths the expanded cache of batch 128 × 32k is 344 GB per layer.
Part 1b measures that point again at V2-Lite widths (`--model v2-lite`: N 16, no q compression;
43 GB per layer), where both caches fit, so the goal's ratio is measured somewhere.

Part 2, MTP speculative decoding: the cost of one speculative round (verify T = 2 plus the MTP
draft, T = 2) against one plain step on the same model at 4k context, and the speed-up it
implies, (1 + α)·t_step / t_round, at V3's reported acceptance α = 0.85–0.90 (spec §4).
Part 3 (skipped with `--train-steps 0`, as h200.sh does to stay in its budget), measured end to
end: the `small` config trained for `--train-steps` on arithmetic lines (so that its MTP module
predicts something), then `generate` greedy with and without `speculative=True` on arithmetic
prompts: acceptance rate, tokens/s of both, and whether the outputs are identical (they must be).

Every row runs in its own try/except (an expanded cache that does not fit prints "OOM");
errors are listed under the table. `--json` rewrites its file after every row.

  python experiments/benchmarks/decode.py                 # GPU: the table (a few minutes)
  python experiments/benchmarks/decode.py --smoke         # CPU: tiny sizes through the same code
  python experiments/benchmarks/decode.py --json decode.json --train-steps 0   # h200.sh part 5

No ml_collections / grain / tfds imports: the GPU host does not have them.

Left out: prefill throughput, fused decode-attention kernels (both caches run XLA's einsums,
so the ratio is the memory traffic ratio plus what XLA makes of it), quantized caches.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
import traceback

MEM_FRACTION = "0.95"       # of the device for JAX's allocator: the 32k × 128 expanded cache
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run from anywhere

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from deepseek_jax import parallel  # noqa: E402
from deepseek_jax.config import ModelConfig, get_config  # noqa: E402
from deepseek_jax.model import Transformer, init_variables  # noqa: E402
from deepseek_jax.sampling import cache_bytes, generate, init_cache  # noqa: E402

WARMUP, ITERS = 2, 10
GB = 1e9


def mid_config(layers: int) -> ModelConfig:
    """V2-Lite widths, `layers` dense layers, one MTP module, bf16 throughout."""
    return get_config("v2-lite", n_layers=layers, n_dense_layers=layers, n_routed_experts=0,
                      mtp_depth=1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                      max_seq_len=65536)


def v3_attention_config(layers: int) -> ModelConfig:
    """V3's attention widths (D 7168, N 128, Q 1536, C 512, R 64, H = U = 128, vocab 129,280) with
    `layers` dense layers (FFN 18,432) and one MTP module, bf16: the caches have V3's sizes per
    layer (latent 1,152 bytes per token, expanded 81,920: 71× more)."""
    return get_config("v3-671b", n_layers=layers, n_dense_layers=layers, n_routed_experts=0,
                      mtp_depth=1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                      max_seq_len=65536)


def smoke_config() -> ModelConfig:
    return get_config("tiny", n_routed_experts=0, n_dense_layers=2, n_layers=2,
                      max_seq_len=1024, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


def median_time(fn, state):
    """Median seconds per call of state = fn(state) over ITERS calls after WARMUP."""
    for _ in range(WARMUP):
        state = jax.block_until_ready(fn(state))
    times = []
    for _ in range(ITERS):
        t0 = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), state


def filled_cache(config: ModelConfig, batch: int, length: int, kind: str, mtp: bool = False):
    """A cache with every slot holding random values, built on device without a float32 copy:
    a random block of up to 256 slots is tiled along S."""
    def fill(key):
        cache = jax.eval_shape(lambda: init_cache(config, batch, length, kind=kind, mtp=mtp))
        leaves, tree = jax.tree.flatten(cache)
        out = []
        for i, a in enumerate(leaves):
            chunk = min(length, 256)
            shape = a.shape[:-2] + (chunk, a.shape[-1])               # S is the axis before last
            block = jax.random.normal(jax.random.fold_in(key, i), shape, a.dtype)
            reps = (1,) * (a.ndim - 2) + (-(-length // chunk), 1)
            out.append(jnp.tile(block, reps)[..., :length, :])
        return jax.tree.unflatten(tree, out)
    return jax.jit(fill)(jax.random.key(1))


def decode_program(config, batch: int, context: int, kind: str):
    """(step(variables, cache) → cache, the cache's shapes): one plain decode step at position
    context − 1 (also compiled without a GPU by `gpu_compile.py`)."""
    step_config = config.replace(attention_impl="absorbed") if kind == "latent" else config
    model = Transformer(step_config)
    abstract = jax.eval_shape(lambda: init_cache(config, batch, context, kind=kind))
    tokens = jnp.zeros((batch, 1), jnp.int32)
    positions = jnp.full((batch, 1), context - 1, jnp.int32)
    step = jax.jit(lambda v, cache: model.apply(v, tokens, positions, cache,
                                                method="decode")[2], donate_argnums=1)
    return step, abstract


def decode_row(config, variables, batch: int, context: int, kind: str) -> dict:
    """One plain decode step at position context − 1 with every earlier slot filled."""
    step, abstract = decode_program(config, batch, context, kind)
    row = {"kind": kind, "batch": batch, "context": context,
           "cache_gb": cache_bytes(abstract) / GB}
    cache = filled_cache(config, batch, context, kind)
    seconds, cache = median_time(lambda c: step(variables, c), cache)
    del cache
    row.update(step_ms=seconds * 1e3, tok_s=batch / seconds)
    return row


def speculative_round_row(config, variables, batch: int, context: int) -> dict:
    """t(plain step) against t(verify T = 2 + MTP draft T = 2), latent cache."""
    model = Transformer(config.replace(attention_impl="absorbed"))
    one = jnp.full((batch, 1), context - 2, jnp.int32)
    two = one + jnp.arange(2, dtype=jnp.int32)
    tokens = jnp.zeros((batch, 2), jnp.int32)

    def plain(v, cache):
        return model.apply(v, tokens[:, :1], one, cache, method="decode")[2]

    def spec(v, cache):
        _, hidden, cache = model.apply(v, tokens, two, cache, method="decode")
        return model.apply(v, hidden, tokens, two, cache, jnp.zeros((batch, 1), jnp.int32),
                           method="draft")[1]

    out = {"batch": batch, "context": context}
    for name, fn in (("step", plain), ("round", spec)):
        jitted = jax.jit(fn, donate_argnums=1)
        cache = filled_cache(config, batch, context, "latent", mtp=True)
        seconds, cache = median_time(lambda c: jitted(variables, c), cache)
        del cache
        out[f"{name}_ms"] = seconds * 1e3
    for alpha in (0.85, 0.90):
        out[f"speedup_at_{alpha}"] = (1 + alpha) * out["step_ms"] / out["round_ms"]
    return out


def trained_small(steps: int, smoke: bool):
    """The `small` config (MTP depth 1) trained on arithmetic lines: (config, variables)."""
    from deepseek_jax.data.synthetic import arithmetic_batch
    from deepseek_jax.train.optimizer import make_optimizer
    from deepseek_jax.train.step import init_train_state, model_variables, train_step

    config = get_config("small", n_layers=2, max_seq_len=512) if smoke else get_config("small")
    tx = make_optimizer(3e-3)
    state = init_train_state(jax.random.key(0), config, tx)
    step = jax.jit(lambda s, b: train_step(s, b, config=config, tx=tx), donate_argnums=0)
    batch, length = (8, 64) if smoke else (16, 64)
    for i in range(steps):
        state, metrics = step(state, {"tokens": jnp.asarray(arithmetic_batch(i, batch, length))})
    loss = float(metrics["loss"]) if steps else float("nan")
    return config, model_variables(state.params, state.routing), loss


def speculative_end_to_end(steps: int, smoke: bool, batch: int, new_tokens: int) -> dict:
    from deepseek_jax.data import tokenizer

    config, variables, loss = trained_small(steps, smoke)
    rng = np.random.default_rng(0)
    prompts = [tokenizer.encode(f"{rng.integers(0, 1000)}+{rng.integers(0, 1000)}=", bos=True)
               for _ in range(batch)]
    out = {"train_steps": steps, "train_loss": loss, "batch": batch, "new_tokens": new_tokens}
    results = {}
    for name, spec in (("plain", False), ("speculative", True)):
        run = lambda: generate(variables, config, prompts, max_new_tokens=new_tokens,
                               speculative=spec)
        jax.block_until_ready(run())                                   # compile
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = jax.block_until_ready(run())
            times.append(time.perf_counter() - t0)
        results[name] = res
        out[f"{name}_tok_s"] = float(np.sum(np.asarray(res.lengths))) / statistics.median(times)
        out[f"{name}_passes"] = int(res.steps)
    out["acceptance"] = results["speculative"].acceptance_rate
    out["speedup"] = out["speculative_tok_s"] / out["plain_tok_s"]
    out["identical"] = bool(np.array_equal(np.asarray(results["plain"].tokens),
                                           np.asarray(results["speculative"].tokens)))
    return out


def _fmt(x, spec=".1f"):
    return "-" if x is None else (x if isinstance(x, str) else format(x, spec))


def _error(e: Exception) -> str:
    return "".join(traceback.format_exception_only(e)).strip()[:400]


def _decode_pair(config, variables, batch, context, errors, memory=None) -> dict:
    pair = {}
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables))
    for kind in ("latent", "expanded"):
        abstract = jax.eval_shape(lambda: init_cache(config, batch, context, kind=kind))
        need = cache_bytes(abstract) + param_bytes
        if memory and need > 0.92 * memory:          # would not fit: say so without trying
            pair[kind] = {"kind": kind, "batch": batch, "context": context,
                          "cache_gb": cache_bytes(abstract) / GB,
                          "error": f"does not fit ({need / GB:.0f} GB > {memory / GB:.0f} GB)"}
            continue
        try:
            pair[kind] = decode_row(config, variables, batch, context, kind)
        except Exception as e:  # noqa: BLE001 - one row's failure must not stop the table
            oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
            pair[kind] = {"kind": kind, "batch": batch, "context": context,
                          "cache_gb": cache_bytes(abstract) / GB,
                          "error": "OOM" if oom else type(e).__name__}
            errors.append(f"{kind} B={batch} S={context}: {_error(e)}")
    ratio = None
    if "tok_s" in pair["latent"] and "tok_s" in pair["expanded"]:
        ratio = pair["latent"]["tok_s"] / pair["expanded"]["tok_s"]
    return {"latent": pair["latent"], "expanded": pair["expanded"], "ratio": ratio}


def _print_pair(r):
    lat, exp = r["latent"], r["expanded"]
    cells = []
    for x, width in ((lat, 9), (exp, 11)):
        cells.append(f"{_fmt(x['cache_gb'], '.2f'):>{width}} "
                     f"{_fmt(x.get('step_ms', x.get('error')), '.2f'):>8} "
                     f"{_fmt(x.get('tok_s'), '.0f'):>10}")
    print(f"{lat['context']:>8} {lat['batch']:>6} | {cells[0]} | {cells[1]} | "
          f"{_fmt(r['ratio'], '.2f'):>10}", flush=True)


def main(argv=None):
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--model", choices=("v3", "v2-lite"), default="v3",
                        help="attention widths of the decode model (default V3's)")
    parser.add_argument("--layers", type=int, default=1, help="dense layers of the decode model")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="part 3's training steps (0 = skip part 3)")
    parser.add_argument("--json", type=str, default=None,
                        help="also write the rows here (rewritten after each row)")
    args = parser.parse_args(argv)

    from experiments.benchmarks.common import Results, check_imports, device_memory_bytes
    from experiments.benchmarks.common import device_meta
    if args.smoke:
        config, batches, contexts, spec_batches = smoke_config(), (4, 1), (128, 64), (1, 4)
        check = (smoke_config(), 4, 128)
        train_steps, e2e_batch, e2e_tokens = args.train_steps, 4, 8
        train_steps = 5 if train_steps is None else train_steps
    else:
        make = v3_attention_config if args.model == "v3" else mid_config
        # The goal's point (batch 128, 32k) first: a part cut short loses the least telling rows.
        config, batches, contexts, spec_batches = (make(args.layers), (128, 32, 1),
                                                   (32768, 4096), (32, 1))
        # Where V3's expanded cache cannot fit (batch 128 × 32k = 344 GB a layer), the same
        # point at V2-Lite widths (43 GB a layer) still gives the ratio.
        check = (mid_config(1), 128, 32768) if args.model == "v3" else None
        train_steps, e2e_batch, e2e_tokens = args.train_steps, 16, 64
        train_steps = 300 if train_steps is None else train_steps
    start = time.perf_counter()
    memory = device_memory_bytes()
    print(f"devices: {jax.devices()}  jax {jax.__version__}  memory "
          f"{'-' if memory is None else f'{memory / GB:.0f} GB'}")
    describe = lambda c: (f"D={c.d_model} N={c.n_heads} Q={c.q_lora_rank} C={c.kv_lora_rank} "
                          f"R={c.qk_rope_head_dim} H={c.qk_nope_head_dim} U={c.v_head_dim} "
                          f"layers={c.n_layers} V={c.vocab_size} {jnp.dtype(c.dtype).name}")
    print(f"model: {describe(config)}", flush=True)
    results = Results(args.json, {**device_meta(), "model": describe(config)})
    results.data.update({"decode": [], "speculative_round": [], "speculative_e2e": None})
    errors = []

    def save_errors():
        results.data["errors"] = [{"error": e} for e in errors]
        results.save()

    variables = flax.core.meta.unbox(init_variables(jax.random.key(0), config))
    header = (f"{'context':>8} {'batch':>6} | {'latent GB':>9} {'ms':>8} {'tok/s':>10} | "
              f"{'expanded GB':>11} {'ms':>8} {'tok/s':>10} | {'latent/exp':>10}")
    grid = [(context, batch) for context in contexts for batch in batches]
    first, rest = grid[:2], grid[2:]      # the two largest batches at the longest context

    def decode_rows(points):
        for context, batch in points:
            results.add("decode", _decode_pair(config, variables, batch, context, errors, memory))
            save_errors()
            _print_pair(results.data["decode"][-1])

    # Rows print (and save) as they finish, so a run cut short still shows what it measured; the
    # order puts the goal's point, its V2-Lite check and the speculative rounds before the rest.
    print("\nPart 1: one decode step (T = 1), latent (absorbed MLA) vs expanded cache")
    print(header, flush=True)
    decode_rows(first)

    if check is not None:
        c2, batch, context = check
        print(f"\nPart 1b: the goal's point at {describe(c2)}", flush=True)
        try:
            v2 = flax.core.meta.unbox(init_variables(jax.random.key(0), c2))
            pair = _decode_pair(c2, v2, batch, context, errors, memory)
            pair["model"] = describe(c2)
            results.add("decode_check", pair)
            _print_pair(pair)
            del v2
        except Exception as e:  # noqa: BLE001
            errors.append(f"check pair: {_error(e)}")
        save_errors()

    print(f"\nPart 2: speculative round (verify T=2 + MTP draft T=2) vs plain step, latent, "
          f"context {contexts[-1]}")
    print(f"{'batch':>6} {'step ms':>8} {'round ms':>9} {'speed-up @0.85':>15} {'@0.90':>7}",
          flush=True)
    for batch in spec_batches:
        try:
            r = speculative_round_row(config, variables, batch, contexts[-1])
            results.add("speculative_round", r)
            print(f"{r['batch']:>6} {r['step_ms']:>8.2f} {r['round_ms']:>9.2f} "
                  f"{r['speedup_at_0.85']:>15.2f} {r['speedup_at_0.9']:>7.2f}", flush=True)
        except Exception as e:  # noqa: BLE001
            errors.append(f"speculative round B={batch}: {_error(e)}")
            save_errors()

    print("\nPart 1, the other rows")
    print(header, flush=True)
    decode_rows(rest)
    variables = None      # frees the model's device arrays before part 3

    if train_steps:
        try:
            e2e = speculative_end_to_end(train_steps, args.smoke, e2e_batch, e2e_tokens)
            results.set("speculative_e2e", e2e)
            print(f"\nPart 3: `small` trained {e2e['train_steps']} steps (loss "
                  f"{e2e['train_loss']:.3f}), greedy, batch {e2e['batch']}, {e2e['new_tokens']} "
                  f"new tokens")
            print(f"  acceptance {e2e['acceptance']:.3f}   plain {e2e['plain_tok_s']:.0f} tok/s "
                  f"({e2e['plain_passes']} passes)   speculative {e2e['speculative_tok_s']:.0f} "
                  f"tok/s ({e2e['speculative_passes']} passes)   speed-up {e2e['speedup']:.2f}   "
                  f"identical outputs: {e2e['identical']}", flush=True)
        except Exception as e:  # noqa: BLE001
            errors.append(f"speculative end to end: {_error(e)}")
        save_errors()

    if errors:
        print("\nErrors:")
        for e in errors:
            print("  " + e)
    print(f"\n({time.perf_counter() - start:.0f} s in all)")
    check_imports()
    return results.data


if __name__ == "__main__":
    main()
