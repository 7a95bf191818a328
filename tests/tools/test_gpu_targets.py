"""Compile-only GPU devices (`tools/gpu_targets.py`): what the planner and gpu_compile.py compile
for on a host without GPUs. Where JAX's CUDA plugin is installed the devices are built and
checked; where it is not (CI), the error must say what to install."""

import re
from types import SimpleNamespace

import jax
import pytest

from deepseek_jax.kernels import fp8_gpu
from deepseek_jax.tools import gpu_targets


def test_devices_span_nodes_or_the_error_says_what_to_install():
    if not gpu_targets.has_cuda_plugin():
        with pytest.raises(gpu_targets.NoCompileOnlyGpu, match="jax-cuda13-plugin"):
            gpu_targets.compile_only_devices("h100", 16)
        return
    devices = gpu_targets.compile_only_devices("h100", 16)
    assert len(devices) == 16 and {d.process_index for d in devices} == {0, 1}
    assert all(d.platform == "gpu" and d.compute_capability == "9.0" for d in devices)
    assert devices[0].core_count == fp8_gpu.DEFAULT_NUM_SMS
    assert len(gpu_targets.compile_only_devices("h200", 4)) == 4      # less than one node


def test_requests_that_cannot_be_built_say_why():
    with pytest.raises(gpu_targets.NoCompileOnlyGpu, match="no compile-only description"):
        gpu_targets.compile_only_devices("a100", 8)
    with pytest.raises(gpu_targets.NoCompileOnlyGpu, match="do not fill nodes of 8"):
        gpu_targets.compile_only_devices("h100", 12)


def test_descriptions_agree_with_the_kernels_and_the_machines():
    for gpu, text in gpu_targets.TARGET_CONFIGS.items():
        fields = dict(re.findall(r"(\w+): (\d+)", text))
        assert int(fields["device_memory_size"]) == gpu_targets.MEMORY[gpu]
        assert int(fields["core_count"]) == fp8_gpu.DEFAULT_NUM_SMS
        assert int(fields["shared_memory_per_block_optin"]) == fp8_gpu.SMEM_LIMIT
        assert re.search(r"cuda_compute_capability \{ major: 9 minor: 0 \}", text)  # Hopper
    assert gpu_targets.CUDNN_VERSION >= 91000    # MLA's head widths need cuDNN 9.10 (kernels notes)


def test_jax_local_gpu_queries_are_answered_as_the_target_and_restored():
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd
    before = (cudnn.check_cudnn_version, cudnn.check_compute_capability,
              cudnn.is_cuda_compute_capability_equal, trd.jax)
    hopper = SimpleNamespace(compute_capability="9.0", core_count=132, platform="gpu")
    with gpu_targets.answering_for([hopper]):
        assert cudnn.check_compute_capability("9.0") and cudnn.check_compute_capability("8.0")
        assert not cudnn.check_compute_capability("10.0")
        assert cudnn.is_cuda_compute_capability_equal("9.0")
        assert cudnn.check_cudnn_version() == gpu_targets.CUDNN_VERSION
        assert trd.jax.devices()[0].core_count == 132 and trd.jax.numpy is jax.numpy
    assert (cudnn.check_cudnn_version, cudnn.check_compute_capability,
            cudnn.is_cuda_compute_capability_equal, trd.jax) == before
    with gpu_targets.answering_for(jax.devices()):                     # CPU: nothing answered
        assert cudnn.check_cudnn_version is before[0] and trd.jax is before[3]
