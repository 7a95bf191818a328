"""The end of h200.sh: one short table of every part's outcome and the issue's goals, from $OUT.

Reads the JSON files the parts wrote (whatever exists: a part cut by its time limit leaves the
rows it finished) and the part lines of log.txt, and prints each goal with the measured value and
"met" / "MISSED" / "not measured". Writes nothing. Plain Python, no JAX: it runs in a second.

  python experiments/benchmarks/h200_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import pathlib
import re
import sys


def _load(out: pathlib.Path, name: str) -> dict:
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return {}


def _verdict(value, goal, higher_is_better=True) -> str:
    if value is None:
        return "not measured"
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else "MISSED"


def goals(out: pathlib.Path) -> list[tuple[str, str, str]]:
    rows = []
    g = _load(out, "fp8_gemm.json").get("rows", [])
    big = next((r for r in g if (r["m"], r["n"], r["k"]) == (8192, 8192, 8192)), None)
    ratio = lambda a, b: a / b if a and b else None
    if big:
        r_cb, r_bf = ratio(big.get("ours"), big.get("cublas")), ratio(big.get("ours"), big.get("bf16"))
        rows.append(("fp8 GEMM 8192³ ours / cuBLAS blockwise ≥ 1",
                     f"{big.get('ours') or 0:.0f} / {big.get('cublas') or 0:.0f} TFLOP/s"
                     + (f" = {r_cb:.2f}" if r_cb else ""), _verdict(r_cb, 1.0)))
        rows.append(("fp8 GEMM 8192³ ours / XLA bf16 ≥ 1.5",
                     f"{r_bf:.2f}" if r_bf else "-", _verdict(r_bf, 1.5)))
    else:
        rows.append(("fp8 GEMM 8192³", "-", "not measured"))
    bad = [f"{r['m']}x{r['n']}x{r['k']}" for r in g
           if r.get("diff_ours") is not None and r["diff_ours"] > 1e-3]
    if g:
        rows.append(("fp8 GEMM calc_diff ours vs reference ≤ 1e-3, every shape",
                     f"{len(g)} shapes, bad: {bad or 'none'}", "MISSED" if bad else "met"))

    m = _load(out, "moe.json")
    main = (m.get("meta", {}).get("backends") or ["mosaic_gpu"])[-1]   # ragged_dot on CPU
    for shape in ("v2-lite", "v3"):
        gg = m.get(f"{shape} grouped GEMM", [])
        mosaic = next((r for r in gg if r.get("what") == f"gmm {main}"), {})
        rows.append((f"grouped GEMM {shape} ≥ 85 % of dense",
                     f"{100 * mosaic['of_dense']:.0f} %" if "of_dense" in mosaic else
                     mosaic.get("error", "-")[:60], _verdict(mosaic.get("of_dense"), 0.85)))
        layer = m.get(f"{shape} layer", [])
        for fp8 in ("", " fp8"):
            name = f"MoE layer {main}{fp8}"
            lm = next((r for r in layer if r.get("what") in (name, f"{name} fwd+bwd")), {})
            rows.append((f"MoE layer{fp8} {shape} fwd+bwd ≤ 1.3× dense SwiGLU (bf16)",
                         f"{lm['x_dense']:.2f}×" if "x_dense" in lm else lm.get("error", "-")[:60],
                         _verdict(lm.get("x_dense"), 1.3, higher_is_better=False)))

    t = _load(out, "train.json")
    by = {r.get("variant"): r for r in t.get("rows", []) if "tokens_per_s" in r}
    bf = by.get("bf16", {})
    mfu = bf.get("mfu_vs_bf16_peak")
    rows.append(("train step MFU bf16 ≥ 45 %",
                 f"{100 * mfu:.1f} % ({bf['tokens_per_s']:,.0f} tok/s)" if mfu else "-",
                 _verdict(mfu, 0.45)))
    r8 = ratio(by.get("fp8", {}).get("tokens_per_s"), bf.get("tokens_per_s"))
    rows.append(("train step fp8 / bf16 tokens/s ≥ 1.3", f"{r8:.2f}" if r8 else "-",
                 _verdict(r8, 1.3)))

    d = _load(out, "decode.json")
    point = [p for p in d.get("decode", []) + d.get("decode_check", [])
             if p["latent"]["batch"] == 128 and p["latent"]["context"] == 32768]
    measured = [p for p in point if p.get("ratio")]
    if measured:
        p = measured[0]
        rows.append(("decode latent / expanded ≥ 5× at batch 128, 32k",
                     f"{p['ratio']:.1f}× ({p.get('model', 'main model')})", _verdict(p["ratio"], 5)))
    elif point:
        rows.append(("decode latent / expanded ≥ 5× at batch 128, 32k",
                     f"expanded: {point[0]['expanded'].get('error')}", "not measured"))
    else:
        rows.append(("decode latent / expanded ≥ 5× at batch 128, 32k", "-", "not measured"))
    spec = d.get("speculative_round", [])
    if spec:
        rows.append(("MTP speculative speed-up at α = 0.85 (implied)",
                     ", ".join(f"B{r['batch']}: {r['speedup_at_0.85']:.2f}×" for r in spec), "-"))
    return rows


def main(out_dir: str) -> None:
    out = pathlib.Path(out_dir)
    log = (out / "log.txt").read_text(errors="replace") if (out / "log.txt").exists() else ""
    print("\n==== summary ====")
    for line in re.findall(r"^== part .*(?:rc=|skipped).*$", log, flags=re.M):
        print(line)
    c = _load(out, "correctness.json").get("summary", {})
    if c:
        print(f"correctness: ran {c.get('ran')} (passed {c.get('passed')}, failed "
              f"{c.get('failed')}), skipped {c.get('skipped')}, errors {c.get('errors')}"
              f"{'' if c.get('finished') else ', DID NOT FINISH'}")
    else:
        print("correctness: no results")
    width = 56
    for what, value, verdict in goals(out):
        print(f"  {what:<{width}} {value:<40} {verdict}")
    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    print(f"files in OUT ({len(files)}): {', '.join(files)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmark_results")
