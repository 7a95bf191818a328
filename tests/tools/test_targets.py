"""Target names → chips, chip counts, slices and topologies; the hardware table's entries."""

import pytest

from deepseek_jax.tools.hardware import CHIPS
from deepseek_jax.tools.targets import TargetError, parse_target, slice_shape


@pytest.mark.parametrize("name,chips,slices,shape,compile_on", [
    ("tpu-v5p-1024", 512, 1, (8, 8, 8), "tpu"),      # v5p-N counts TensorCores (2 per chip)
    ("tpu-v5p-8", 4, 1, (2, 2, 1), "tpu"),
    ("tpu-v5p-2048", 1024, 1, (8, 8, 16), "tpu"),
    ("tpu-v5e-256", 256, 1, (16, 16), "tpu"),
    ("tpu-v5litepod-8", 8, 1, (2, 4), "tpu"),
    ("tpu-v6e-64", 64, 1, (8, 8), "tpu"),
    ("tpu-v6e-4x8", 32, 1, (4, 8), "tpu"),
    ("2xtpu-v5p-512", 512, 2, (4, 8, 8), "tpu"),
    ("gpu-h100-64", 64, 1, (), None),
    ("cpu-8", 8, 1, (8,), "cpu"),
])
def test_parse(name, chips, slices, shape, compile_on):
    t = parse_target(name)
    assert (t.n_chips, t.n_slices, t.slice_shape, t.compile_on) == (chips, slices, shape,
                                                                    compile_on)


def test_topology_names_and_descriptions():
    assert parse_target("tpu-v5p-1024").topology_name == "v5p:8x8x8"
    assert parse_target("2xtpu-v5p-512").describe() == \
        "2xtpu-v5p-512: 2 slices of TPU v5p 4x8x8 (512 chips)"
    assert "8 nodes" in parse_target("gpu-h100-64").describe()


@pytest.mark.parametrize("name,fragment", [
    ("tpu-v5p-7", "multiple of 2"),
    ("tpu-v5e-512", r"largest TPU v5e slice \(256\)"),
    ("tpu-v4-8", "use v5p, v5e or v6e"),
    ("gpu-h100", "missing the size"),
    ("2xgpu-h100-16", "no slices"),
    ("tpu-v5e-24", "not a power of two"),
    ("fpga-8", "write tpu-"),
])
def test_errors_say_what_to_write(name, fragment):
    with pytest.raises(TargetError, match=fragment):
        parse_target(name)


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


def test_gpu_target_is_analytic_only():
    with pytest.raises(TargetError, match="analytic model only"):
        parse_target("gpu-h100-64").devices()
