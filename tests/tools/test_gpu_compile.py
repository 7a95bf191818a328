"""Our GPU kernels compiled by XLA's GPU compiler for a compile-only H100 on this CPU host: the
fp8 GEMM, cuDNN attention forward and backward, and the Mosaic grouped GEMM forward, dgrad and
wgrad, each inside a jitted program, as h200.sh's programs hold them. Compiling goes further
than lowering (`test_*lowers_for_cuda`): XLA's GPU passes run, the Mosaic kernels are built to
PTX for sm_90a (checked in the PTX they dump), and the program's memory is laid out. Also on
8 compile-only H100s: a layer scan of FSDP-gathered experts keeps its stacked weight gradients
in the parameters' order, the ragged all-to-all's buffers are found in collective memory, and a
run config's fit on GPU nodes is compiled.

JAX's CUDA plugin does the compiling (no GPU needed). It lives beside the environment, in
`.venv/cuda-plugin` (`make venv` installs it from requirements-gpu-compile.txt), not in it: on a
host without GPUs, an installed plugin prints its failed GPU checks whenever JAX starts without
JAX_PLATFORMS=cpu. So the compiles run in a child process with that folder on its path."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PLUGIN = ROOT / ".venv" / "cuda-plugin"

PROGRAMS = r'''
import json
import jax, jax.numpy as jnp
from deepseek_jax.kernels import fp8, grouped_gemm as gg
from deepseek_jax.model.attention import attention
from deepseek_jax.tools import gpu_targets
from experiments.benchmarks.gpu_compile import compile_row

device = gpu_targets.compile_only_devices("h100", 1)[0]
S = jax.ShapeDtypeStruct
bf16 = jnp.bfloat16
x, w = S((256, 1024), bf16), S((512, 1024), bf16)
quantized = (*jax.eval_shape(fp8.quantize_activation, x), *jax.eval_shape(fp8.quantize_weight, w))
qk, v = S((2, 256, 4, 192), bf16), S((2, 256, 4, 128), bf16)
rows, experts, sizes = S((512, 256), bf16), S((4, 256, 128), bf16), S((4,), jnp.int32)

def attention_loss(q, k, v):
    return attention(q, k, v, scale=0.1, backend="cudnn").astype(jnp.float32).sum()

def gmm_loss(a, b, s):
    return gg.gmm(a, b, s, backend="mosaic_gpu").astype(jnp.float32).sum()

rows_out = [
    compile_row("fp8 GEMM", jax.jit(lambda *a: fp8.fp8_matmul(*a, backend="auto")), quantized,
                device, 1e9),
    compile_row("cuDNN attention fwd+bwd", jax.jit(jax.grad(attention_loss, argnums=(0, 1, 2))),
                (qk, qk, v), device, 1e9),
    compile_row("grouped GEMM fwd+bwd", jax.jit(jax.value_and_grad(gmm_loss, argnums=(0, 1))),
                (rows, experts, sizes), device, 1e9),
]
print(json.dumps(rows_out))
'''


def _run(program: str, **env) -> object:
    """Runs `program` in a child process with the plugin on its path (compile-only devices of
    its own, no fake CPU devices); what it printed last, as JSON."""
    if not PLUGIN.is_dir():
        pytest.fail(f"{PLUGIN} is missing: run `make venv` (it installs JAX's CUDA plugin there "
                    "from requirements-gpu-compile.txt)")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(PLUGIN)]), **env}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_gpu_kernels_compile_for_a_compile_only_h100(tmp_path):
    printed = _run(PROGRAMS, MOSAIC_GPU_DUMP_TO=str(tmp_path), MOSAIC_GPU_DUMP_PTX="1")
    rows = {row["program"]: row for row in printed}
    for row in rows.values():
        assert "error" not in row, row
        assert row["fits"] and row["need_gb"] > 0
    assert rows["fp8 GEMM"]["kernels"] == "mosaic_gpu 1"
    assert rows["cuDNN attention fwd+bwd"]["kernels"] == "cudnn 2"              # fwd, bwd
    assert rows["grouped GEMM fwd+bwd"]["kernels"] == "mosaic_gpu 3"      # fwd, dgrad, wgrad
    # Each Mosaic kernel was built to Hopper PTX with its wgmma instructions: e4m3 for fp8.
    ptx = [f.read_text() for f in sorted(tmp_path.glob("*.ptx"))]
    assert len(ptx) == 4 and all(".target sm_90a" in t and "wgmma.mma_async" in t for t in ptx)
    assert sum(".e4m3.e4m3" in t for t in ptx) == 1 and sum(".bf16.bf16" in t for t in ptx) == 3


SCAN = r'''
import json
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from deepseek_jax.kernels import grouped_gemm as gg
from deepseek_jax.tools import buffers, gpu_targets

L, E, D, F, M = 4, 8, 1024, 512, 2048      # layers, experts, model width, expert width, rows
devices = gpu_targets.compile_only_devices("h100", 8)
mesh = jax.sharding.Mesh(np.array(devices), ("fsdp",))

def stack(x, w_up, w_down, sizes):    # x [M/8, D]; w_up [L, E, D/8, F]; w_down [L, E, F, D/8]
    def layer(h, w):
        w_up, w_down = (v.astype(h.dtype) for v in w)       # fp32 masters, bf16 products
        up = gg.gmm(h, w_up, sizes, backend="mosaic_gpu", gather=(("fsdp",), 1))    # [M/8, F]
        return h + gg.gmm(jax.nn.silu(up), w_down, sizes, backend="mosaic_gpu",
                          gather=(("fsdp",), 2)), None
    h, _ = jax.lax.scan(layer, x, (w_up, w_down))
    return jax.lax.psum(jnp.sum(h.astype(jnp.float32) ** 2), "fsdp")

loss = jax.shard_map(stack, mesh=mesh, out_specs=P(), check_vma=False, in_specs=(
    P("fsdp"), P(None, None, "fsdp"), P(None, None, None, "fsdp"), P()))
S = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh,
                                                                                         spec))
args = (S((M, D), jnp.bfloat16, P("fsdp")), S((L, E, D, F), jnp.float32, P(None, None, "fsdp")),
        S((L, E, F, D), jnp.float32, P(None, None, None, "fsdp")), S((E,), jnp.int32, P()))
with gpu_targets.answering_for(devices):
    lowered = jax.jit(jax.grad(loss, argnums=(1, 2))).trace(*args).lower()
    compiled, assignment, _ = buffers.compile_with_assignment(lowered)
print(json.dumps([b.shape for b in buffers.largest_buffers(assignment, n=None)
                  if b.shape.startswith("f32[")]))
'''


def test_fsdp_expert_gradients_stay_in_the_parameters_order_on_gpu():
    """The scan's stacked fp32 expert gradients ([L, E, D/8, F] and [L, E, F, D/8] per GPU)
    must be laid out as the parameters are. Before, each layer's gradient left its
    reduce-scatter D-major and the stack kept that order (f32[D/8, L, E, F]); one relayout
    after the loop then held a second copy: V3's peak on 256 H100s had three of 3.2 GiB."""
    L, E, D, F = 4, 8, 1024 // 8, 512
    stacked = [s for s in _run(SCAN)
               if sorted(map(int, re.findall(r"\d+", s[3:]))) == sorted((L, E, D, F))]
    assert set(stacked) == {f"f32[{L},{E},{D},{F}]", f"f32[{L},{E},{F},{D}]"}, stacked


EXCHANGE = r'''
import json
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from deepseek_jax.tools import buffers, gpu_targets

devices = gpu_targets.compile_only_devices("h100", 8)
mesh = jax.sharding.Mesh(np.array(devices), ("expert",))
N, D = 4096, 1024                              # rows each GPU sends and receives, width

def exchange(x):                               # x [N, D]: N/8 rows to each GPU, in order
    sizes = jnp.full((8,), N // 8, jnp.int32)
    offsets = jnp.arange(8, dtype=jnp.int32) * (N // 8)
    y = jax.lax.ragged_all_to_all(x, jnp.zeros_like(x), offsets, sizes, offsets, sizes,
                                  axis_name="expert")
    return jnp.sum(y.astype(jnp.float32) ** 2, keepdims=True)

f = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=P("expert"), out_specs=P("expert")))
x = jax.ShapeDtypeStruct((8 * N, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("expert")))
with gpu_targets.answering_for(devices):
    compiled, assignment, _ = buffers.compile_with_assignment(f.trace(x).lower())
print(json.dumps({"collective": buffers.gpu_collective_memory(assignment),
                  "temp": compiled.memory_analysis().temp_size_in_bytes}))
'''


def test_ragged_all_to_all_buffers_are_counted_as_gpu_collective_memory():
    """XLA:GPU puts the ragged all-to-all's receive buffer ([N, D] bf16 per GPU) in collective
    memory, an allocation of its own (color 1). A GPU row's total counts every temporary
    allocation whole, this one included (`compile.py`): the compiler's peak had left 6.6 GiB of
    it out for V3 under EP."""
    got = _run(EXCHANGE)
    assert got["collective"] >= 4096 * 1024 * 2, got               # the receive buffer
    assert got["temp"] >= got["collective"], got                    # part of the temporaries


FIT = r'''
import json
from deepseek_jax.configs import pretrain
from deepseek_jax.tools import fit

print(json.dumps(fit.verdict(pretrain.get_config("tiny"), target="gpu-h100-8")))
'''


def test_a_run_configs_fit_on_gpu_nodes_is_compiled():
    """With the plugin on the path a GPU target compiles the run's own train step, as a TPU
    slice does (before, GPU targets always got the analytic estimate)."""
    v = _run(FIT)
    assert v["source"] == "compiled" and v["fits"] and 0 < v["total"] < v["limit"], v
    assert abs(v["limit"] - 81_559 * 2**20) < 2**20, v             # an H100's memory
