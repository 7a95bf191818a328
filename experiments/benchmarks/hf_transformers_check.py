"""transformers loads a model exported by `deepseek_jax.hf.export`, and its logits match ours.

Run by hand, outside the test suite (torch and transformers are heavy):

  python experiments/benchmarks/hf_transformers_check.py --hf_python=HFENV/bin/python \
      [--workdir=DIR] [--json=OUT.json]

HFENV is a separate environment with torch, transformers, accelerate (transformers' fp8
loading needs it), safetensors and numpy (e.g. `python3.11 -m venv HFENV &&
HFENV/bin/pip install torch transformers accelerate safetensors numpy`).

Two interpreters. This one (the project's) makes tiny runs — random parameters drawn with a
fan-in-sized init_std, a random N(0, 1) selection bias, saved as a training run saves its
checkpoints — and exports them (CASES):

  v3_fp32  the `tiny` config (q compression, sigmoid routing with the selection bias, 4 groups
           of 2 kept, YaRN with mscale ≠ mscale_all_dim, interleaved RoPE, one MTP module),
           float32 → DeepseekV3ForCausalLM;
  v3_fp8   the same run with --fp8 (block-fp8 e4m3 linear weights), through transformers'
           fine-grained fp8 loader (which dequantizes when there is no GPU);
  v2_fp32  softmax routing without the bias, plain top-k, no renormalization, no MTP → exported
           as deepseek_v2 → DeepseekV2ForCausalLM;

loads each export with `load_hf_checkpoint` and computes our float32 logits. It then runs this
file under --hf_python with --compare for each folder, which loads it with
`AutoModelForCausalLM.from_pretrained` (eager attention and experts), runs the same tokens in
float32 and float64 and reports:

  max |Δlogit| ours (fp32) vs transformers fp32, and vs transformers fp64;
  the keys transformers did not load (the MTP module: DeepseekV3ForCausalLM has no MTP head);

and how far the fp8 export's logits are from the float32 export's (the quantization itself).

Exits non-zero when a max |Δlogit| against fp64 exceeds 1e-4 (float32 rounding through three
layers on logits of size ~1; the parity tests' tolerance, tests/hf/hf_helpers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

TOLERANCE = 1e-4
B, T = 2, 12


def compare(folder: str, ours_npz: str) -> dict:
    """Runs under --hf_python: transformers' logits for the saved tokens against ours."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(2)
    saved = np.load(ours_npz)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager", output_loading_info=True)
    model.eval()
    tokens = torch.from_numpy(saved["tokens"].astype(np.int64))
    with torch.no_grad():
        fp32 = model(tokens).logits.numpy()
        fp64 = model.double()(tokens).logits.numpy()
    ours = saved["logits"]
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "class": type(model).__name__,
            "max_abs_logit": float(np.abs(fp64).max()),
            "max_abs_diff_vs_fp32": float(np.abs(ours - fp32).max()),
            "max_abs_diff_vs_fp64": float(np.abs(ours - fp64).max()),
            "unexpected_keys": sorted(info["unexpected_keys"]),
            "missing_keys": sorted(info["missing_keys"])}


CASES = {   # name: (ModelConfig overrides of `tiny`, fp8 export)
    "v3_fp32": ({}, False),
    "v3_fp8": ({}, True),
    # softmax routing without the bias, plain top-k, no renormalization, no MTP: deepseek_v2
    "v2_fp32": (dict(score_func="softmax", routing_bias=False, group_score="max",
                     n_expert_groups=1, n_limited_groups=1, norm_topk_prob=False,
                     routed_scaling_factor=1.5, mtp_depth=0), False),
}


def ours(workdir: str) -> dict[str, tuple[str, str]]:
    """Makes and exports the tiny runs; {case: (HF folder, npz of tokens and our logits)}."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "hf"))
    from test_hf_export import make_run              # a run as training saves it
    from deepseek_jax.config import get_config
    from deepseek_jax.hf import export_run, load_hf_checkpoint
    from deepseek_jax.model import Transformer
    out = {}
    for case, (overrides, fp8) in CASES.items():
        config = get_config("tiny", init_std=32 ** -0.5, **overrides)   # fan-in: logits ~ 1
        run = os.path.join(workdir, "run_" + case.split("_")[0])
        if not os.path.exists(run):
            make_run(run, config, steps=(1,))
        tokens = np.asarray(jax.random.randint(jax.random.key(7), (B, T), 0, config.vocab_size))
        folder = os.path.join(workdir, f"hf_{case}")
        export_run(run, folder, fp8=fp8, overwrite=True, mesh_config={"fsdp": 1},
                   devices=jax.devices()[:1])
        loaded, variables = load_hf_checkpoint(folder)
        model = Transformer(loaded.replace(dtype=jnp.float32))
        logits, _ = jax.jit(model.apply)(variables, tokens)
        npz = os.path.join(workdir, f"ours_{case}.npz")
        np.savez(npz, tokens=tokens.astype(np.int32), logits=np.asarray(logits, np.float32))
        out[case] = (folder, npz)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf_python", help="python of an environment with torch + transformers")
    ap.add_argument("--workdir", default="", help="where the run and export go (default: tmp)")
    ap.add_argument("--json", default="", help="write the result here too")
    ap.add_argument("--compare", nargs=2, metavar=("HF_DIR", "OURS_NPZ"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        print(json.dumps(compare(*args.compare)))
        return
    if not args.hf_python:
        sys.exit("--hf_python=PATH is needed: the python of an environment with transformers")
    workdir = args.workdir or tempfile.mkdtemp(prefix="hf_check_")
    result, files = {}, ours(workdir)
    for kind, (folder, npz) in files.items():
        done = subprocess.run([args.hf_python, __file__, "--compare", folder, npz],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the transformers side failed ({kind}):\n{done.stderr[-4000:]}")
        result[kind] = {"export": folder, **json.loads(done.stdout.strip().splitlines()[-1])}
    import numpy as np
    logits = {k: np.load(npz)["logits"] for k, (_, npz) in files.items()}
    result["v3_fp8_vs_fp32_export_max_abs_diff"] = float(np.abs(logits["v3_fp8"] -
                                                                logits["v3_fp32"]).max())
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    worst = max(result[k]["max_abs_diff_vs_fp64"] for k in CASES)
    if worst > TOLERANCE:
        sys.exit(f"max |Δlogit| {worst:.2e} > {TOLERANCE}")



if __name__ == "__main__":
    main()
