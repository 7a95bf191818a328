"""The GPU device script (experiments/benchmarks/h200.sh) and its helpers, checked on CPU.

The whole script runs on CPU with `--smoke` in a few minutes (too long for the suite); here the
parts that decide whether one 8-minute GPU run is well spent: the time budget and the files it may
leave under $OUT, the pytest plugin that must fail loudly when no hardware test ran, the summary
reading whatever partial results a time limit left, the benchmark modules importing nothing the
GPU host lacks, and one fp8 GEMM table row end to end at a tiny shape.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "experiments" / "benchmarks"
sys.path.insert(0, str(ROOT))

from experiments.benchmarks import h200_summary, pytest_results  # noqa: E402
from experiments.benchmarks.common import Results  # noqa: E402


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **extra}
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_device_budget_fits_one_call():
    """GPU budgets sum to ≤ 450 s, the hard stop leaves room in 480 s, and ≤ 8 files reach $OUT."""
    text = (BENCH / "h200.sh").read_text()
    gpu_branch = text[text.index("export JAX_PLATFORMS=cuda"):]
    budgets = dict(re.findall(r"\b(B_\w+)=(\d+)", gpu_branch.split("fi\n")[0]))
    assert set(budgets) == {"B_ENV", "B_CORRECT", "B_GEMM", "B_MOE", "B_TRAIN_BF16",
                            "B_TRAIN_FP8", "B_DECODE"}
    assert sum(int(v) for v in budgets.values()) <= 450
    total = int(re.search(r'TOTAL="\$\{H200_TOTAL_S:-(\d+)\}"', gpu_branch).group(1))
    assert total <= 470        # + at most one 5 s kill grace and the summary: < 480 s
    files = set(re.findall(r'\$OUT/([\w.]+)', text)) - {"*.tmp"}
    assert len(files) <= 8 and "log.txt" in files and "correctness.json" in files, files


def test_pytest_plugin_counts_and_fails_loudly(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_hardware_ok(): pass\n"
        "def test_hardware_bad(): assert 1 == 2, 'wrong product'\n"
        "@pytest.mark.skip(reason='needs a Hopper GPU')\n"
        "def test_hardware_skipped(): pass\n"
        "def test_other(): pass\n")
    out = tmp_path / "correctness.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "experiments.benchmarks.pytest_results", "-k", "hardware", "test_x.py"],
                   cwd=tmp_path, env=_env(PYTEST_RESULTS_JSON=str(out)), capture_output=True,
                   timeout=120)
    data = json.loads(out.read_text())
    s = data["summary"]
    assert (s["ran"], s["passed"], s["failed"], s["skipped"], s["finished"]) == (2, 1, 1, 1, True)
    bad = next(t for t in data["tests"] if t["id"].endswith("test_hardware_bad"))
    assert "wrong product" in bad["message"]
    skipped = next(t for t in data["tests"] if t["outcome"] == "skipped")
    assert "Hopper" in skipped["message"]
    assert pytest_results.report(str(out), require_ran=True) == 1      # a failure
    assert pytest_results.report(str(out), require_ran=False) == 0

    # Everything skipped (what a CPU-only or misconfigured device gives): must fail.
    data["tests"] = [skipped]
    data["summary"] = {"ran": 0, "passed": 0, "failed": 0, "skipped": 1, "errors": 0,
                       "exit_status": 0, "finished": True}
    out.write_text(json.dumps(data))
    assert pytest_results.report(str(out), require_ran=True) == 1
    # One ran and passed, one skipped "needs a Hopper GPU": fine on CPU, a failure on a GPU.
    data["tests"] = [{**skipped, "outcome": "passed", "message": ""}, skipped]
    data["summary"].update(ran=1, passed=1, skipped=1)
    out.write_text(json.dumps(data))
    assert pytest_results.report(str(out), require_ran=True) == 0
    data["meta"]["backend"] = "gpu"
    out.write_text(json.dumps(data))
    assert pytest_results.report(str(out), require_ran=True) == 1


def test_summary_reads_partial_results(tmp_path, capsys):
    """A part cut short leaves some rows: the summary says met / MISSED / not measured."""
    Results(str(tmp_path / "fp8_gemm.json")).add("rows", {
        "m": 8192, "n": 8192, "k": 8192, "ours": 1300.0, "cublas": 1229.0, "bf16": 600.0,
        "xla_ref": 88.0, "diff_ours": 2e-6})
    moe = Results(str(tmp_path / "moe.json"))
    moe.add("v2-lite grouped GEMM", {"what": "dense GEMM", "tflops": 548.0})
    moe.add("v2-lite grouped GEMM", {"what": "gmm mosaic_gpu", "tflops": 422.0,
                                     "of_dense": 0.77})
    moe.add("v2-lite layer", {"what": "dense SwiGLU (width X·F) fwd+bwd", "ms": 10.0})
    moe.add("v2-lite layer", {"what": "MoE layer mosaic_gpu fwd+bwd", "x_dense": 1.2})
    moe.add("v2-lite layer", {"what": "MoE layer mosaic_gpu fp8", "error": "ValueError: x"})
    train = Results(str(tmp_path / "train.json"), merge=True)
    train.add("rows", {"variant": "bf16", "tokens_per_s": 1e5, "mfu_vs_bf16_peak": 0.5})
    Results(str(tmp_path / "train.json"), merge=True).add(
        "rows", {"variant": "fp8", "error": "compile failed"})
    (tmp_path / "log.txt").write_text("== part 2-fp8-gemm: rc=0 in 50 s\n"
                                      "== part 3-moe: rc=124 in 70 s (TIME LIMIT)\n")
    verdicts = {what: (value, verdict) for what, value, verdict in h200_summary.goals(tmp_path)}
    assert verdicts["fp8 GEMM 8192³ ours / cuBLAS blockwise ≥ 1"][1] == "met"
    assert verdicts["fp8 GEMM 8192³ ours / XLA bf16 ≥ 1.5"][1] == "met"
    assert verdicts["grouped GEMM v2-lite ≥ 85 % of dense"] == ("77 %", "MISSED")
    assert verdicts["grouped GEMM v3 ≥ 85 % of dense"][1] == "not measured"
    assert verdicts["MoE layer v2-lite fwd+bwd ≤ 1.3× dense SwiGLU (bf16)"] == ("1.20×", "met")
    assert verdicts["MoE layer fp8 v2-lite fwd+bwd ≤ 1.3× dense SwiGLU (bf16)"] == (
        "ValueError: x", "not measured")
    assert verdicts["train step MFU bf16 ≥ 45 %"][1] == "met"
    assert verdicts["train step fp8 / bf16 tokens/s ≥ 1.3"][1] == "not measured"
    assert verdicts["decode latent / expanded ≥ 5× at batch 128, 32k"][1] == "not measured"
    h200_summary.main(str(tmp_path))
    printed = capsys.readouterr().out
    assert "TIME LIMIT" in printed and "correctness: no results" in printed


def test_benchmarks_import_nothing_the_gpu_host_lacks():
    code = ("import experiments.benchmarks.fp8_gemm, experiments.benchmarks.moe, "
            "experiments.benchmarks.decode, experiments.benchmarks.train_step; "
            "from experiments.benchmarks.common import check_imports; check_imports(); "
            "print('clean')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr[-2000:]


def test_fp8_gemm_row_on_cpu(tmp_path):
    """One table row through the real code (kernel in interpret mode), written to JSON."""
    # In a fresh interpreter, as on the GPU host: the script refuses to finish when a package
    # that host lacks is imported, and earlier tests on this worker may have imported one.
    out = tmp_path / "fp8_gemm.json"
    subprocess.run([sys.executable, str(BENCH / "fp8_gemm.py"), "--smoke", "--shapes",
                    "64x256x384", "--json", str(out)], cwd=ROOT, env=_env(), check=True,
                   capture_output=True)
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert (row["m"], row["n"], row["k"]) == (64, 256, 384)
    assert row["bf16"] > 0 and row["xla_ref"] > 0
    assert row["cublas"] is None                       # no torch / GPU here
    # Our kernel runs in GPU interpret mode here; it sums the same fp8 products as the XLA
    # reference, one 128-K block at a time, so only fp32 summation order separates them.
    assert row["ours"] is not None and row["diff_ours"] < 1e-6


def test_decode_rows_that_cannot_fit_are_reported_not_tried():
    """At V3's widths the expanded cache of batch 128 × 32k is 344 GB: said, never allocated.
    (With 10 GB of device memory the 4.8 GB latent cache plus 6.2 GB of weights does not fit
    either, so nothing runs here.)"""
    import jax
    from experiments.benchmarks import decode
    config = decode.v3_attention_config(1)
    variables = jax.eval_shape(lambda: decode.init_variables(jax.random.key(0), config))
    errors = []
    pair = decode._decode_pair(config, variables, 128, 32768, errors, memory=10e9)
    assert pair["expanded"]["error"].startswith("does not fit (350 GB > 10 GB)")
    assert round(pair["expanded"]["cache_gb"]) == 344 and round(pair["latent"]["cache_gb"]) == 5
    assert pair["latent"]["error"].startswith("does not fit (11 GB")
    assert pair["ratio"] is None and errors == []


def test_train_batch_follows_the_device_memory():
    """The allocators of an H100 and an H200 (0.92 of 81,559 and 143,771 MiB) get 4 and 16
    sequences of 4096: the largest whose compiled need (gpu_compile.py) stays ≤ 90 % of it."""
    from experiments.benchmarks.train_step import default_batch
    assert default_batch(int(0.92 * 81_559 * 2**20)) == 4      # 8 would need 76 of 79 GB
    assert default_batch(int(0.92 * 143_771 * 2**20)) == 16    # 114 of 139 GB
    assert default_batch(None) == 4                            # CPU: no memory reported
    assert default_batch(40e9) == 1


def test_gpu_compile_row_reads_the_compilers_memory_analysis():
    """The row's need is arguments + temporaries + outputs not aliased to donated arguments,
    as XLA reports them (here for a CPU device: the same path the GPU targets take)."""
    import jax
    import jax.numpy as jnp
    from experiments.benchmarks import gpu_compile
    device = jax.devices()[0]
    step = jax.jit(lambda s, x: (s + jnp.sum(x * 2), x * 3), donate_argnums=0)
    args = (jax.ShapeDtypeStruct((256, 256), jnp.float32),
            jax.ShapeDtypeStruct((512, 512), jnp.float32))
    row = gpu_compile.compile_row("toy", step, args, device, limit=2e6)
    m = step.lower(*args).compile().memory_analysis()
    need = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes)
    assert m.alias_size_in_bytes == 256 * 256 * 4                 # the donated state
    assert row["need_gb"] * 1e9 == need and row["kernels"] == "none"
    assert row["fits"] == (need <= 2e6) and not row["remat"]
    # --peak: x (an argument) and x·3 (1 MiB each) are live together; no more than the program
    # holds. Listed: what the program made, not its arguments.
    listed = gpu_compile.compile_row("toy", step, args, device, limit=2e6, peak=2)
    assert 2 * 512 * 512 * 4 <= listed["peak_gb"] * 1e9 <= need
    assert listed["peak_gb_by_kind"]["parameter"] * 1e9 >= 512 * 512 * 4
    assert listed["at_peak"][0]["shape"] == "f32[512,512]"
    assert all(b["kind"] != "parameter" for b in listed["at_peak"])
    failed = gpu_compile.compile_row("bad", jax.jit(lambda x: x @ x), (args[0], args[1]), device,
                                     limit=1e9)
    assert "error" in failed and "fits" not in failed              # (takes one argument)


def test_gpu_compile_counts_kernels_by_family():
    from experiments.benchmarks.gpu_compile import kernels
    hlo = ('custom_call_target="mosaic_gpu_v2" custom_call_target="mosaic_gpu_v2" '
           'custom_call_target="__cudnn$fmhaSoftmax" custom_call_target="__cublas$gemm" '
           '{"kind":"__triton_nested_gemm_fusion"} {"kind":"__triton"}')
    assert kernels(hlo) == "mosaic_gpu 2, cudnn 1, cublas 1, triton_gemm 1"
    assert kernels("ROOT %add = f32[] add(a, b)") == "none"
