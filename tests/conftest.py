"""Test set-up: CPU with 8 fake devices (set before JAX is imported), shared tiny fixtures."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


class _HopperLikeJax:
    """`jax` as one kernel module sees it, with a first device that reports an H100/H200's 132 SMs."""

    class _Device:
        core_count = 132

    def devices(self, *args):
        return [self._Device()]

    def __getattr__(self, name):
        return getattr(jax, name)


@pytest.fixture
def hopper_sm_count(monkeypatch):
    """Lets the Mosaic GPU wgrad kernel trace on a CPU host (interpret mode, lowering for cuda).

    `transposed_ragged_dot` reads `jax.devices()[0].core_count` while tracing; CPU devices have
    none. Only that module's view of `jax` changes, for one test.
    """
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as trd
    monkeypatch.setattr(trd, "jax", _HopperLikeJax())
