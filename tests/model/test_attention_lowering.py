"""The fused attention backends lowered for their platforms from this CPU host: splash for `tpu`
(forward and both backward kernels, V3's head dims), cuDNN for `cuda` (alone and inside the
train step), and the planner's ahead-of-time TPU compile of the tiny model picking splash.

Which platform a trace is for: the TPU traces run under a one-device abstract mesh of TPU
devices (`_target`), JAX's own way to say so, which the backend check reads
(`attention.platform`). For cuda that does not work (cuDNN's lowering asks for concrete devices,
and the MoE's ragged_dot has no explicit-sharding rule), so the `hopper_cudnn` fixture also
makes `attention.platform` answer "gpu", for that module only.

cuDNN: `jax.nn.dot_product_attention(implementation="cudnn")` asks the installed cuDNN for its
version and the local GPU for its compute capability while tracing; this host has neither, so
the `hopper_cudnn` fixture answers as an H200 with cuDNN 9.10 would (`gpu_targets.answer_as`,
which the compile-only GPU compiles use too). Everything after that (shape checks, the custom
call and its backward) is JAX's own.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.config import get_config
from deepseek_jax.model.attention import attention

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# V3's heads: A = H + R = 128 + 64, U = 128; a sequence of two 128-row blocks.
B, T, N, A, U = 2, 256, 4, 192, 128


def _shapes(dtype=jnp.bfloat16):
    qk = jax.ShapeDtypeStruct((B, T, N, A), dtype)
    return qk, qk, jax.ShapeDtypeStruct((B, T, N, U), dtype)


def _target(platform: str, device_kind: str):
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                     abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def _lowered_grad(backend, platform, segments=True):
    seg = jnp.asarray([[1] * 100 + [2] * 156, [1] * 256], jnp.int32)

    def loss(q, k, v):
        out = attention(q, k, v, scale=A ** -0.5, segment_ids=seg if segments else None,
                        backend=backend)
        return out.astype(jnp.float32).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    if platform == "tpu":
        with _target("tpu", "TPU v5 lite"):
            return grad.trace(*_shapes()).lower(lowering_platforms=("tpu",)).as_text()
    return grad.trace(*_shapes()).lower(lowering_platforms=(platform,)).as_text()


@pytest.fixture
def hopper_cudnn(monkeypatch, hopper_sm_count):
    # cuDNN's checks answered by `gpu_targets.answer_as` (through `hopper_sm_count`), as the
    # compile-only GPU compiles answer them.
    from deepseek_jax.model import attention as attention_module
    monkeypatch.setattr(attention_module, "platform", lambda: "gpu")


@pytest.mark.parametrize("segments", [False, True])
def test_splash_lowers_for_tpu(segments):
    text = _lowered_grad("splash", "tpu", segments)
    # forward, dq and dkv kernels (the forward is traced twice: the value and the residuals)
    assert text.count("tpu_custom_call") >= 3


@pytest.mark.parametrize("segments", [False, True])
def test_cudnn_lowers_for_cuda(hopper_cudnn, segments):
    text = _lowered_grad("cudnn", "cuda", segments)
    kind = "ScaleBias" if segments else ""                 # segments → a mask → a bias
    assert f"__cudnn$fmha{kind}Softmax(" in text
    assert f"__cudnn$fmha{kind}SoftmaxBackward(" in text


def test_train_step_with_cudnn_attention_lowers_for_cuda(hopper_cudnn):
    from deepseek_jax.train.optimizer import make_optimizer
    from deepseek_jax.train.step import init_train_state, train_step
    config = dataclasses.replace(get_config("tiny"), dtype=jnp.bfloat16,
                                 attention_backend="cudnn", moe_backend="ragged_dot")
    tx = make_optimizer(1e-3)
    batch = {"tokens": jax.ShapeDtypeStruct((2, 32), jnp.int32),
             "segment_ids": jax.ShapeDtypeStruct((2, 32), jnp.int32)}
    step = jax.jit(lambda s, b: train_step(s, b, config=config, tx=tx))
    state = jax.eval_shape(lambda: init_train_state(jax.random.key(0), config, tx))
    text = step.trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()
    # 3 dense-stack or MoE-stack layer bodies + MTP's block, each forward and backward
    assert text.count("__cudnn$fmhaScaleBiasSoftmaxBackward(") >= 3


def test_planner_tpu_compile_runs_splash():
    """auto → splash when the compile is for a TPU topology (the mesh's devices say so)."""
    pytest.importorskip("libtpu")
    from deepseek_jax.tools.compile import Strategy, compile_strategy
    from deepseek_jax.tools.targets import parse_target
    devices = parse_target("tpu-v5e-8").devices()
    config = get_config("tiny", max_seq_len=128)
    out = compile_strategy(config, Strategy.make("fsdp", {"fsdp": 8}), devices, batch=8,
                           seq=128, keep_hlo=True)
    assert out["fits"], out["error"]
    hlo = out["hlo"]
    assert "tpu_custom_call" in hlo and "splash" in hlo
