"""Pallas kernels with their plain-JAX references.

`fp8` — DeepSeek-V3's fp8 recipe: 1×128 / 128×128 e4m3 quantizers and block-scaled GEMMs
(forward, dgrad, wgrad) with backends "reference", "mosaic_gpu" (Hopper, `fp8_gpu.py`),
"mosaic_tpu" (`fp8_tpu.py`) and interpret modes for CPU tests.

Attention (import the modules; `deepseek_jax.model.attention` is the entry point): `attention`
(einsum reference, blockwise online softmax in plain JAX), `attention_tpu` (Pallas splash),
`attention_gpu` (cuDNN flash attention).
"""

from deepseek_jax.kernels.fp8 import (
    dequantize_activation,
    dequantize_weight,
    fp8_dgrad,
    fp8_dgrad_reference,
    fp8_gemm_nt,
    fp8_matmul,
    fp8_matmul_reference,
    fp8_wgrad,
    fp8_wgrad_reference,
    quantize_activation,
    quantize_flax_weight,
    quantize_weight,
    transpose_quantized_weight,
)

__all__ = [
    "dequantize_activation",
    "dequantize_weight",
    "fp8_dgrad",
    "fp8_dgrad_reference",
    "fp8_gemm_nt",
    "fp8_matmul",
    "fp8_matmul_reference",
    "fp8_wgrad",
    "fp8_wgrad_reference",
    "quantize_activation",
    "quantize_flax_weight",
    "quantize_weight",
    "transpose_quantized_weight",
]
