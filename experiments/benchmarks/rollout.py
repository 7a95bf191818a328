"""Benchmark: GRPO rollout throughput, shared prefill and continuous batching against the path
GRPO had before (every prompt repeated G times, one static batch), measured in the same run.

Prints one table, one row per (setting, path):

  (a) small   GRPO's `small` setting as it was when the table in BENCHMARKS.md was measured:
              16 prompts × 8 samples (the run config now takes 8 × 16, the same 128 rows), 48
              new tokens, sampled at temperature 0.7, every row free to run to 48 (a random
              model rarely writes EOS, so rows end at the budget). Written out here, not read
              from the run config: the GPU host lacks ml_collections (`common.check_imports`).
  (b) tail    16 prompts × 16 samples, up to 512 new tokens, greedy, with long-tailed completion
              lengths. A model cannot be trained here to write such lengths, so each
              (prompt, sample) row gets its own budget (`row_max_new_tokens`, a row stops after
              it as if it wrote EOS there), drawn once from a log-normal with median 48 and
              σ = 1 (mean ≈ 80), rounded and clipped to [1, 512]; the longest of the 256 draws
              is set to 512, so every path has the same longest row.

  paths       repeated     `generate` on the P·G repeated prompts (the path before: G prefills
                           per prompt, every row decodes until the longest ends)
              static       `generate_groups(schedule="static")`: one prefill per prompt
              continuous   `generate_groups(schedule="continuous", slots=M)`: M rows at a time,
                           a finished row's slot refilled (M from `--slots`, as fractions of P·G)
  tokens      generated tokens (sum of the rows' lengths: the work every path must do)
  steps       decode passes after the prefill
  tok/s       tokens / median wall time of `--rounds` calls after one warm-up call (compiles)
  × before    tok/s over the repeated path's, the same setting, the same process
  same        whether the tokens equal the repeated path's (greedy: must; sampled: the same
              per-row keys, so they must too)

The model is `--model` (default `small`: D 128, 4 layers, 16 routed experts) with random
weights and `max_seq_len` raised to hold the prompt plus 512 tokens; prompts are arithmetic
problems in the compact template, byte tokenizer. `--smoke` runs the `tiny` model (vocabulary
raised to the byte tokenizer's 320) at small sizes through the same code.

  python experiments/benchmarks/rollout.py                  # both settings (CPU: minutes)
  python experiments/benchmarks/rollout.py --smoke          # seconds
  python experiments/benchmarks/rollout.py --json rollout.json

Left out: speculative rollouts (the random model's MTP drafts are rarely accepted, see
decode.py's part 3 for a trained one), sharded runs, prefill-only timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import Results, check_imports, device_meta  # noqa: E402
from deepseek_jax import parallel
from deepseek_jax.config import get_config  # noqa: E402
from deepseek_jax.data import tasks  # noqa: E402
from deepseek_jax.model import init_variables  # noqa: E402
from deepseek_jax.rl import rollout  # noqa: E402
from deepseek_jax.sampling import generate, generate_groups, group_keys  # noqa: E402


def settings(smoke: bool) -> list[dict]:
    """(a) and (b) of the docstring; --smoke shrinks them."""
    if smoke:
        return [dict(name="a: small", prompts=4, group=4, new=12, temperature=0.7, tail=False),
                dict(name="b: tail", prompts=4, group=8, new=48, temperature=0.0, tail=True)]
    return [dict(name="a: small", prompts=16, group=8, new=48, temperature=0.7, tail=False),
            dict(name="b: tail", prompts=16, group=16, new=512, temperature=0.0, tail=True)]


def tail_budgets(rows: int, longest: int, seed: int = 0) -> np.ndarray:
    """Long-tailed per-row lengths: log-normal(median 48, σ 1), in [1, longest], max = longest."""
    draws = np.random.default_rng(seed).lognormal(np.log(48.0), 1.0, rows)
    budgets = np.clip(np.rint(draws), 1, longest).astype(np.int32)
    budgets[np.argmax(budgets)] = longest
    return budgets


def timed(fn, rounds: int):
    """(median seconds of `rounds` calls after one warm-up call, the last output)."""
    out = jax.block_until_ready(fn())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_setting(st: dict, variables, config, slot_fractions, rounds: int, results: Results):
    P, G, N = st["prompts"], st["group"], st["new"]
    rng = np.random.default_rng(1)
    problems = [tasks.arithmetic_problem(rng, 2, min_digits=2) for _ in range(P)]
    distinct = rollout.encode_prompts(problems, "compact")
    repeated = [p for p in distinct for _ in range(G)]
    budgets = tail_budgets(P * G, N) if st["tail"] else None
    key = jax.random.key(0)
    common = dict(max_new_tokens=N, temperature=st["temperature"], row_max_new_tokens=budgets)
    paths = [("repeated", lambda: generate(variables, config, repeated,
                                           rng=group_keys(key, P, G), **common)),
             ("static", lambda: generate_groups(variables, config, distinct, G, rng=key,
                                                schedule="static", **common))]
    for f in slot_fractions:
        M = max(1, int(P * G * f))
        paths.append((f"continuous M={M}", lambda M=M: generate_groups(
            variables, config, distinct, G, rng=key, slots=M, **common)))
    before = ref = None
    for name, fn in paths:
        seconds, out = timed(fn, rounds)
        tokens = int(np.sum(np.asarray(out.lengths)))
        same = ref is None or bool(np.array_equal(np.asarray(out.tokens), ref))
        ref = np.asarray(out.tokens) if ref is None else ref
        before = tokens / seconds if before is None else before
        row = dict(setting=st["name"], path=name, tokens=tokens, steps=int(out.steps),
                   seconds=seconds, tok_s=tokens / seconds, ratio=tokens / seconds / before,
                   same=same)
        results.add("rows", row)
        print(f"| {row['setting']} | {name} | {tokens} | {row['steps']} | {seconds:.2f} | "
              f"{row['tok_s']:.0f} | {row['ratio']:.2f}× | {'yes' if same else 'NO'} |",
              flush=True)


def main():
    parallel.skip_absent_tpu()       # no libtpu start-up errors on a machine without TPUs
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny model at small sizes")
    parser.add_argument("--model", default="small", help="a model config name")
    parser.add_argument("--slots", default="0.25,0.5",
                        help="continuous slot counts as fractions of P·G, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="timed calls per path")
    parser.add_argument("--only", default="", help="'a' or 'b': run one setting")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    config = get_config("tiny" if args.smoke else args.model)
    # the byte tokenizer's 320 ids; room for the prompt plus 512 tokens
    config = config.replace(vocab_size=max(config.vocab_size, 320),
                            max_seq_len=max(config.max_seq_len, 32 + 512))
    variables = flax.core.meta.unbox(init_variables(jax.random.key(0), config))
    results = Results(args.json, {**device_meta(), "model": "tiny" if args.smoke else args.model,
                                  "rounds": args.rounds})
    print(f"model {'tiny' if args.smoke else args.model} on {jax.devices()[0].device_kind}, "
          f"median of {args.rounds} timed call(s) after a warm-up")
    print("| setting | path | tokens | steps | seconds | tok/s | × before | same |")
    print("|---|---|---|---|---|---|---|---|")
    for st in settings(args.smoke):
        if args.only and not st["name"].startswith(args.only):
            continue
        run_setting(st, variables, config, [float(f) for f in args.slots.split(",")],
                    args.rounds, results)
    check_imports()


if __name__ == "__main__":
    main()
