""""auto" kernels and transports follow the devices a trace compiles for (the active mesh), not
the host: a TPU compile from this CPU host gets the TPU's grouped GEMM, fp8 GEMM and all-to-all.
Before, the planner's TPU compiles of the MoE took the CPU's tiled grouped GEMM, whose per-tile
weight copies dominated the 671B step's memory."""

import os

import jax
import numpy as np
import pytest

from deepseek_jax.kernels import fp8, grouped_gemm
from deepseek_jax.kernels.platform import active_platform
from deepseek_jax.model import dispatch

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")    # compile-only libtpu, shared host


def _choices():
    return (active_platform(), grouped_gemm.default_backend(), dispatch.resolve_transport("auto"),
            fp8._resolve_backend("auto"))


def test_auto_choices_follow_the_mesh_devices():
    assert _choices() == ("cpu", "tiled", "all_to_all", "reference")      # this host
    cpu = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8), ("x",))
    with jax.set_mesh(cpu):
        assert _choices() == ("cpu", "tiled", "all_to_all", "reference")
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    tpu = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
    with jax.set_mesh(jax.sharding.Mesh(np.array(tpu[:1]), ("x",))):
        assert _choices() == ("tpu", "megablox", "ragged_all_to_all", "mosaic_tpu")
    # Under several devices the fp8 GEMM stays XLA's: a Mosaic call outside a shard_map cannot
    # be partitioned (the grouped GEMMs run inside the MoE's shard_map, so they can).
    with jax.set_mesh(jax.sharding.Mesh(np.array(tpu).reshape(8), ("x",))):
        assert _choices() == ("tpu", "megablox", "ragged_all_to_all", "reference")


def test_fp8_gemm_is_the_tpu_kernel_where_every_axis_is_manual():
    # The fp8 linear layers run their GEMMs in a shard_map over the batch axes: under dp and
    # fsdp those are the whole mesh, so the Mosaic GEMM runs per shard; with an axis left to
    # the compiler (tensor parallelism) it would have to be partitioned, so XLA's GEMM runs.
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    from jax.sharding import PartitionSpec as P
    tpu = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
    mesh = jax.sharding.Mesh(np.array(tpu).reshape(4, 2, 1), ("fsdp", "tensor", "expert"))
    seen = {}

    def probe(name):
        def body(x):
            seen[name] = fp8._resolve_backend("auto")
            return x
        return body

    x = jax.ShapeDtypeStruct((8, 128), np.float32,
                             sharding=jax.sharding.NamedSharding(mesh, P("fsdp")))
    with jax.set_mesh(mesh):
        jax.jit(jax.shard_map(probe("all"), in_specs=P("fsdp"), out_specs=P("fsdp"),
                              check_vma=False)).lower(x)
        jax.jit(jax.shard_map(probe("tensor auto"), in_specs=P("fsdp"), out_specs=P("fsdp"),
                              axis_names={"fsdp", "expert"}, check_vma=False)).lower(x)
        # An axis of size 1 left to the compiler is still one Mosaic refuses.
        jax.jit(jax.shard_map(probe("size 1 auto"), in_specs=P("fsdp"), out_specs=P("fsdp"),
                              axis_names={"fsdp", "tensor"}, check_vma=False)).lower(x)
    assert seen == {"all": "mosaic_tpu", "tensor auto": "reference", "size 1 auto": "reference"}


def test_target_device_is_the_mesh_device_inside_a_trace():
    """The GPU kernels read compute capability and SM count from the device compiled for: the
    active mesh's, also inside jit (where `jax.sharding.get_mesh` refuses), else the default."""
    from deepseek_jax.kernels import fp8_gpu
    from deepseek_jax.kernels.platform import target_device
    seen = []

    def probe(x):
        seen.append(target_device())
        return x

    x = jax.ShapeDtypeStruct((4,), np.float32)
    jax.jit(probe).trace(x)
    third = jax.devices()[3]
    with jax.set_mesh(jax.sharding.Mesh(np.array([third]), ("x",))):
        jax.jit(probe).trace(x)
    assert seen == [jax.devices()[0], third]
    assert fp8_gpu.num_sms() == fp8_gpu.DEFAULT_NUM_SMS       # no GPU compiled for: H100/H200's
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    tpu = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
    with jax.set_mesh(jax.sharding.Mesh(np.array(tpu[5:6]), ("x",))):
        jax.jit(probe).trace(x)
        assert fp8_gpu.num_sms() == fp8_gpu.DEFAULT_NUM_SMS   # a TPU core count is no SM count
    assert seen[-1] == tpu[5]
