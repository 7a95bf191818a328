"""Target names → chips, chip counts, slices and topologies; the hardware table's entries."""

import pytest

from deepseek_jax.tools.gpu_targets import has_cuda_plugin
from deepseek_jax.tools.hardware import CHIPS
from deepseek_jax.tools.targets import TargetError, parse_target, slice_shape

# H100/H200 targets compile where JAX's CUDA plugin is installed (no GPU needed), else are
# analytic; A100 is never described for compiling.
GPU_COMPILE = "gpu" if has_cuda_plugin() else None


@pytest.mark.parametrize("name,chips,slices,shape,compile_on", [
    ("tpu-v5p-1024", 512, 1, (8, 8, 8), "tpu"),      # v5p-N counts TensorCores (2 per chip)
    ("tpu-v5p-8", 4, 1, (2, 2, 1), "tpu"),
    ("tpu-v5p-2048", 1024, 1, (8, 8, 16), "tpu"),
    ("tpu-v5e-256", 256, 1, (16, 16), "tpu"),
    ("tpu-v5litepod-8", 8, 1, (2, 4), "tpu"),
    ("tpu-v6e-64", 64, 1, (8, 8), "tpu"),
    ("tpu-v6e-4x8", 32, 1, (4, 8), "tpu"),
    ("2xtpu-v5p-512", 512, 2, (4, 8, 8), "tpu"),
    ("tpu7x-256", 128, 1, (4, 4, 8), "tpu"),          # tpu7x-N counts TensorCores too
    ("tpu7x-8", 4, 1, (2, 2, 1), "tpu"),
    ("2xtpu7x-128", 128, 2, (4, 4, 4), "tpu"),
    ("tpu-ironwood-4x8x8", 256, 1, (4, 8, 8), "tpu"),
    ("gpu-h100-64", 64, 1, (), GPU_COMPILE),
    ("gpu-a100-16", 16, 1, (), None),
    ("cpu-8", 8, 1, (8,), "cpu"),
])
def test_parse(name, chips, slices, shape, compile_on):
    t = parse_target(name)
    assert (t.n_chips, t.n_slices, t.slice_shape, t.compile_on) == (chips, slices, shape,
                                                                    compile_on)


def test_topology_names_and_descriptions():
    assert parse_target("tpu-v5p-1024").topology_name == "v5p:8x8x8"
    assert parse_target("2xtpu-v5p-512").describe() == \
        "2xtpu-v5p-512: 2 slices of TPU v5p 4x8x8 torus (512 chips)"
    assert "8 nodes" in parse_target("gpu-h100-64").describe()


@pytest.mark.parametrize("name,fragment", [
    ("tpu-v5p-7", "multiple of 2"),
    ("tpu-v5e-512", r"largest TPU v5e slice \(256\)"),
    ("tpu-v4-8", "use v5p, v5e, v6e or tpu7x"),
    ("gpu-h100", "missing the size"),
    ("2xgpu-h100-16", "no slices"),
    ("tpu-v5e-24", "not a power of two"),
    ("fpga-8", "write tpu-"),
])
def test_errors_say_what_to_write(name, fragment):
    with pytest.raises(TargetError, match=fragment):
        parse_target(name)


@pytest.mark.parametrize("name,wrap,links", [
    ("tpu-v5p-1024", (True, True, True), "torus"),       # 8x8x8
    ("tpu-v5p-128", (True, True, True), "torus"),        # 4x4x4, the smallest torus
    ("tpu-v5p-4x4x12", (True, True, True), "torus"),
    ("tpu-v5p-64", (False, False, False), "mesh"),       # 2x4x4
    ("tpu-v5p-16", (False, False, False), "mesh"),       # 2x2x2
    ("tpu7x-256", (True, True, True), "torus"),          # 4x4x8
    ("tpu7x-64", (False, False, False), "mesh"),         # 2x4x4
    ("tpu-v6e-256", (True, True, False), "torus"),       # 16x16, a whole pod
    ("tpu-v5e-128", (False, True, False), "mesh (ring along 16)"),   # 8x16
    ("tpu-v6e-64", (False, False, False), "mesh"),       # 8x8
])
def test_slices_wrap_where_cloud_tpu_slices_do(name, wrap, links):
    t = parse_target(name)
    assert t.wrap == wrap
    assert f" {links} (" in t.describe()


def test_compile_only_devices_have_the_slice_links():
    """A weight gathered over all 64 chips of a v5p-128 (4x4x4, a torus) on the mesh the trainer
    builds: with the target's devices libtpu writes an all-gather, as on the slice; on the same
    shape without wraparound links (an open mesh, libtpu's default for the name) it writes an
    all-reduce of a zero buffer instead."""
    pytest.importorskip("libtpu", reason="compile-only TPU devices need libtpu (dev deps)")
    import os
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    from deepseek_jax import parallel
    from deepseek_jax.tools import hlo

    def gathered_by(devices) -> set[str]:
        mesh = parallel.make_mesh({"fsdp": -1}, devices)       # the torus-aware device order
        whole = jax.jit(lambda w: 2 * jax.lax.with_sharding_constraint(
            w, NamedSharding(mesh, P())), in_shardings=NamedSharding(mesh, P("fsdp")))
        text = whole.lower(jax.ShapeDtypeStruct((64 * 8, 512), jnp.bfloat16)).compile().as_text()
        return set(hlo.collective_stats(text).bytes_by_kind())

    t = parse_target("tpu-v5p-128")
    assert gathered_by(t.devices()) == {"all-gather"}
    open_mesh = topologies.get_topology_desc(platform="tpu", topology_name=t.topology_name)
    assert gathered_by(open_mesh.devices) == {"all-reduce"}


def test_slice_shapes_follow_the_cloud_tables():
    assert [slice_shape(n, 3) for n in (4, 8, 16, 64, 128, 256)] == [
        (2, 2, 1), (2, 2, 2), (2, 2, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8)]
    assert [slice_shape(n, 2) for n in (4, 8, 32, 128)] == [(2, 2), (2, 4), (4, 8), (8, 16)]


def test_every_chip_has_the_numbers_the_model_reads():
    for chip in CHIPS.values():
        assert chip.peak_flops > 0 and chip.hbm_bytes > 0 and chip.hbm_bw > 0
        if chip.kind == "tpu":
            assert chip.ici_link_bw > 0 and chip.ici_dims in (2, 3) and chip.dcn_bw > 0
        if chip.kind == "gpu":
            assert chip.nvlink_bw > chip.node_bw > 0 and chip.gpus_per_node == 8


def test_cpu_target_has_no_devices_beyond_the_process():
    t = parse_target("cpu-64")
    with pytest.raises(TargetError, match="xla_force_host_platform_device_count=64"):
        t.devices()


def test_gpu_targets_without_compile_only_devices_say_so():
    with pytest.raises(TargetError, match="analytic model only"):
        parse_target("gpu-a100-16").devices()
    if not has_cuda_plugin():
        with pytest.raises(TargetError, match="analytic model only"):
            parse_target("gpu-h100-64").devices()


def test_tpu7x_devices_are_tensorcores():
    """TPU7x: each chip's two TensorCores are two JAX devices; the planner's unit is the device
    (its memory, peak and bandwidths are per device), and a mesh axis of 2 over one chip's
    devices runs on the die-to-die link, not the torus."""
    from deepseek_jax.tools import cost_model
    t = parse_target("tpu7x-256")
    assert (t.n_chips, t.n_devices, t.topology_name) == (128, 256, "tpu7x:4x4x8")
    assert t.describe() == "tpu7x-256: TPU7x (Ironwood), per TensorCore 4x4x8 torus (128 " \
        "chips, 256 devices)"
    chip = t.chip
    assert chip.peak_flops == pytest.approx(2307e12 / 2) and chip.devices_per_chip == 2
    sizes = {"fsdp": 128, "tensor": 2}
    assert cost_model.axis_dims(sizes, t) == {"tensor": [-1], "expert": [], "context": [],
                                              "fsdp": [0, 1, 2], "stage": [], "data": []}
    assert cost_model.axis_bandwidth(("tensor",), sizes, t) == chip.die_bw
    assert cost_model.axis_bandwidth(("fsdp",), sizes, t) == pytest.approx(
        2 * chip.ici_link_bw * 3 / 2)


def test_tpu7x_compile_only_devices_and_their_peak():
    pytest.importorskip("libtpu", reason="compile-only TPU devices need libtpu (dev deps)")
    import os
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from deepseek_jax import parallel
    from deepseek_jax.train.flops import peak_flops_per_device
    t = parse_target("tpu7x-8")
    devices = t.devices()
    assert len(devices) == t.n_devices == 8
    assert peak_flops_per_device(devices[0]) == pytest.approx(2307e12 / 2)
    mesh = parallel.make_mesh({"fsdp": -1, "tensor": 2}, devices)
    assert dict(mesh.shape)["fsdp"] == 4
