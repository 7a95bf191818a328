"""Whole train steps lowered for `cuda` from this CPU host, with the Hopper kernels named.

"auto" resolves on the tracing host (CPU here), so these runs name the GPU backends explicitly:
the bf16 MoE on the Mosaic grouped GEMM, fp8 projections on the Mosaic fp8 GEMM, fp8 experts on
the Hopper fp8 grouped GEMM. Lowering runs Mosaic GPU's layout inference, its wgmma operand and
dtype checks and its shared-memory check on every kernel the step contains, which is where an
fp32 operand or an fp8 transpose fails; compiling to a cubin needs a GPU (`-k hardware` there).
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.config import ConfigError, get_config
from deepseek_jax.train.optimizer import make_optimizer
from deepseek_jax.train.step import init_train_state, train_step

# name: (overrides, Mosaic GPU kernel calls the step must hold). `tiny` traces two MoE layer
# bodies (the scanned stack and the MTP block); each holds 9 grouped GEMMs (3 projections ×
# forward, dgrad, wgrad). fp8 adds 3 GEMMs per projection traced (attention, dense and shared
# FFNs, the dense-dispatch experts): 30 counted in the fp8_dense step when this was written.
CASES = {
    "bf16_moe": (dict(dtype=jnp.bfloat16, moe_backend="mosaic_gpu"), 18),
    "fp32_model": (dict(moe_backend="ragged_dot"), 0),
    "fp8_dense": (dict(dtype=jnp.bfloat16, fp8=True, fp8_backend="mosaic_gpu", moe_impl="dense"), 30),
    "fp8_moe": (dict(dtype=jnp.bfloat16, fp8=True, fp8_backend="mosaic_gpu",
                     moe_backend="mosaic_gpu"), 18 + 3 * 6),
}


def _lowered_step(config):
    tx = make_optimizer(1e-3)
    state = jax.eval_shape(lambda: init_train_state(jax.random.key(0), config, tx))
    batch = {"tokens": jax.ShapeDtypeStruct((2, 32), jnp.int32)}
    step = jax.jit(lambda s, b: train_step(s, b, config=config, tx=tx))
    return step.trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_lowers_for_cuda(case, hopper_sm_count):
    overrides, kernels = CASES[case]
    text = _lowered_step(dataclasses.replace(get_config("tiny"), **overrides))
    assert text.count("custom_call @mosaic_gpu") >= kernels, case
    if not kernels:
        assert "mosaic_gpu" not in text
    if overrides.get("fp8"):
        assert "f8E4M3FN" in text


def test_fp32_model_on_the_mosaic_grouped_gemm_is_a_clear_error():
    # wgmma transposes 16-bit operands only: an fp32 model naming the Mosaic backend is told what
    # to change before anything compiles ("auto" picks ragged_dot for it on a Hopper GPU).
    config = get_config("tiny", moe_backend="mosaic_gpu")
    with pytest.raises(ValueError, match="16-bit operands only.*ragged_dot"):
        _lowered_step(config)


def test_unknown_fp8_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="fp8_backend"):
        get_config("tiny", fp8=True, fp8_backend="cublas")
