"""Test set-up: CPU with 8 fake devices (set before JAX is imported), one compile cache for every
process of a run, heaviest files first, shared tiny fixtures."""

import os
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the test workers and every process they start (entrypoint
# runs, notebooks): the same tiny train step is compiled by several processes, and only the first
# should pay. It lives in the checkout (git-ignored), so a fresh clone starts cold.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "xla"))

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests compile many small programs: skipping XLA's optimization passes roughly halves compile
# time on two cores and changes no result beyond fp32 rounding.
jax.config.update("jax_disable_most_optimizations", True)

from deepseek_jax.config import get_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The `tiny` config: every feature on, fp32."""
    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_variables(tiny):
    from deepseek_jax.model import init_variables
    return init_variables(jax.random.key(0), tiny)


# What JAX's own GPU code asks of the local GPU while tracing, answered for a Hopper GPU.
HOPPER = SimpleNamespace(platform="gpu", compute_capability="9.0", core_count=132)


@pytest.fixture
def hopper_sm_count():
    """Lets the Mosaic GPU wgrad kernel trace on a CPU host (interpret mode, lowering for cuda).

    `transposed_ragged_dot` reads `jax.devices()[0].core_count` while tracing; CPU devices have
    none. `gpu_targets.answer_as`, which the compile-only GPU compiles use for the same reason,
    answers it (and cuDNN's checks) as an H100/H200 would, for one test.
    """
    from deepseek_jax.tools import gpu_targets
    with gpu_targets.answer_as(HOPPER):
        yield


# Wall time of each file on two busy cores, in seconds: the sums of its tests (setup included)
# in the `--durations=0` table of `make test` (refresh them when a file's cost changes; only their
# order matters). Heaviest files are collected first, so that under `--dist loadfile
# --no-loadscope-reorder` they start at once on separate workers instead of last; files not
# listed keep their order after them.
FILE_SECONDS = {
    "experiments/test_multiprocess.py": 650,
    "parallel/test_fp8_sharded.py": 490,
    "notebooks/test_notebooks.py": 410,
    "model/test_transformer.py": 330,
    "experiments/test_first_run.py": 290,
    "experiments/test_pretrain.py": 285,
    "parallel/test_expert.py": 265,
    "tools/test_plan.py": 235,
    "sampling/test_batching.py": 225,
    "train/test_chunked_loss.py": 225,
    "parallel/test_sharded_parity.py": 220,
    "experiments/test_grpo.py": 215,
    "kernels/test_fp8_linear.py": 210,
    "experiments/test_sft.py": 165,
    "train/test_schedules.py": 160,
    "tools/test_fit.py": 155,
    "tools/test_hlo.py": 155,
    "hf/test_hf_export.py": 150,
    "tools/test_gpu_compile.py": 140,
    "model/test_moe_padding.py": 135,
    "launch/test_dry_run.py": 125,
    "model/test_attention.py": 125,
    "tools/test_step_weight_casts.py": 125,
    "experiments/test_context_extension.py": 120,
    "train/test_cuda_lowering.py": 115,
    "rl/test_rollout_paths.py": 110,
    "experiments/test_sft_hf.py": 105,
    "train/test_train.py": 90,
    "rl/test_grpo_data_parallel.py": 80,
    "model/test_attention_lowering.py": 80,
    "kernels/test_fp8.py": 75,
    "model/test_remat.py": 55,
    "experiments/test_evaluate.py": 55,
    "model/test_moe.py": 55,
    "hf/test_hf_parity.py": 55,
    "parallel/test_processes.py": 45,
    "rl/test_grpo_learning.py": 40,
    "train/test_adapter_training.py": 75,
    "model/test_adapters.py": 60,
    "experiments/test_dpo.py": 120,
    "rl/test_dpo_loss.py": 45,
    "parallel/test_pipeline.py": 75,
}


def pytest_addoption(parser):
    parser.addoption("--reverse-order", action="store_true",
                     help="run the tests in the reverse of the usual order (lightest files and "
                          "last tests first), to show that no test depends on another's leftovers")


def pytest_collection_modifyitems(config, items):
    def seconds(item):
        path = os.path.relpath(str(item.path), os.path.join(ROOT, "tests")).replace(os.sep, "/")
        return FILE_SECONDS.get(path, 0)
    items.sort(key=lambda item: -seconds(item))        # stable: file order kept within ties
    if config.getoption("--reverse-order"):
        items.reverse()
