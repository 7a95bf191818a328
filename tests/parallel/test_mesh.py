"""Mesh construction on 8 fake CPU devices: sizes, -1 fill, multi-slice layout, error messages,
and the multi-process detection that must stay a no-op on one CPU."""

import jax
import ml_collections
import numpy as np
import pytest

from deepseek_jax.config import ConfigError
from deepseek_jax.parallel import mesh as mesh_lib
from deepseek_jax.parallel.mesh import MESH_AXES, MeshError, make_mesh, resolve_mesh_shape


def test_sizes_and_fill():
    mesh = make_mesh({"fsdp": -1, "tensor": 2})
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"dcn_data": 1, "data": 1, "stage": 1, "fsdp": 4, "context": 1,
                                "expert": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_config_dict_and_explicit_devices():
    cfg = ml_collections.ConfigDict(dict(dcn_data=1, data=2, fsdp=1, expert=2, tensor=2))
    assert dict(make_mesh(cfg).shape)["expert"] == 2
    one = make_mesh({"data": -1}, devices=jax.devices()[:1])
    assert one.devices.size == 1 and dict(one.shape)["data"] == 1


def test_multi_slice_is_slice_major():
    """dcn_data=2 on one host: the two 'slices' are the contiguous halves of the device list."""
    mesh = make_mesh({"dcn_data": 2, "fsdp": -1, "tensor": 2})
    assert mesh.devices.shape == (2, 1, 1, 2, 1, 1, 2)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
    # -1 on dcn_data means "the slices found": one here.
    assert dict(make_mesh({"dcn_data": -1, "fsdp": -1}).shape)["dcn_data"] == 1


@pytest.mark.parametrize("config, message", [
    ({"fsdp": 3}, "mesh fsdp=3 does not divide 8 devices; use one of 1,2,4,8"),
    ({"data": -1, "fsdp": -1}, "mesh has -1 on data and fsdp; only one axis may be -1"),
    ({"data": 2, "fsdp": 2}, "mesh data=2 × fsdp=2 uses 4 devices but 8 are given; make the "
                             "product 8, or set one axis to -1"),
    ({"data": 4, "fsdp": 4, "tensor": -1}, "mesh data=4 × fsdp=4 = 16 does not divide 8 "
                                           "devices"),
    ({"model": 8}, "unknown mesh axis 'model'; mesh axes are dcn_data, data, stage, fsdp, context, "
                   "expert, tensor"),
    ({"tensor": 0, "fsdp": -1}, "mesh tensor=0: use a positive size, or -1"),
])
def test_bad_sizes_name_the_fix(config, message):
    with pytest.raises(MeshError) as err:
        resolve_mesh_shape(config, 8)
    assert message in str(err.value)
    assert isinstance(err.value, ConfigError)


def test_multi_process_detection():
    detect = mesh_lib.multi_process_launch
    assert detect({}) is None
    assert detect({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert detect({"SLURM_NTASKS": "16"}) == "slurm"
    assert detect({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}) == "tpu"
    assert detect({"MEGASCALE_NUM_SLICES": "2"}) == "tpu"
    assert detect({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "explicit"


def test_initialize_distributed_is_a_no_op_on_one_process(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES",
                 "SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert mesh_lib.maybe_initialize_distributed() is False and calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert mesh_lib.maybe_initialize_distributed() is True
    assert calls == [{"num_processes": 2, "process_id": 1}]
    assert mesh_lib.maybe_initialize_distributed(enabled=False) is False and len(calls) == 1


def test_cloud_tpu_vm_initializes_with_no_arguments(monkeypatch):
    """A TPU VM pod worker has no TPU_* or MEGASCALE_* variables (the workers are in the
    metadata server): finding TPU chips on the PCI bus with libtpu installed is enough to call
    `jax.distributed.initialize()` with no arguments, whose GceTpuCluster reads the rest."""
    assert mesh_lib.multi_process_launch({}, tpu_vm=True) == "tpu-vm"
    assert mesh_lib.multi_process_launch({}, tpu_vm=False) is None
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    _bare_tpu_vm(monkeypatch)
    assert mesh_lib.maybe_initialize_distributed() is True
    assert calls == [{}]


def test_tpu_machine_without_a_cluster_runs_as_one_process(monkeypatch):
    """TPU chips but no worker list in the metadata (Colab's TPU runtime): JAX raises
    ValueError before starting anything, and the run goes on as one process. Elsewhere the
    error stands."""
    def no_cluster(**kw):
        raise ValueError("coordinator_address should be defined.")
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    _bare_tpu_vm(monkeypatch)
    assert mesh_lib.maybe_initialize_distributed() is False
    with pytest.raises(ValueError):
        mesh_lib.maybe_initialize_distributed(enabled=True)


def test_no_tpu_chips_here_means_no_tpu_vm():
    """This CPU machine has no TPU on its PCI bus: detection reads /sys and says so."""
    assert mesh_lib.on_cloud_tpu_vm() is False


def _tpu_devices(topology: str, **kwargs):
    pytest.importorskip("libtpu")
    import os
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices


def test_tpu_torus_layout_and_split_dimensions():
    """On a v5p 4x4x4 torus (compile-only devices, no TPU): fsdp=16 × tensor=4 lies on whole
    dimensions; fsdp=32 × expert=2 cannot, so one dimension is split between the two axes, and
    that is refused when splitting is not allowed."""
    devices = _tpu_devices("v5p:4x4x4")
    whole = make_mesh({"fsdp": 16, "tensor": 4}, devices)
    layout = mesh_lib.torus_layout(whole)
    assert sorted(layout["tensor"].values()) == [4]
    assert sorted(layout["fsdp"].values()) == [4, 4]
    assert mesh_lib.split_dimensions(layout, (4, 4, 4)) == {}

    split = make_mesh({"fsdp": 32, "expert": 2}, devices)
    layout = mesh_lib.torus_layout(split)
    assert {a: int(np.prod(list(d.values()))) for a, d in layout.items()} == {"fsdp": 32,
                                                                             "expert": 2}
    (dim, axes), = mesh_lib.split_dimensions(layout, (4, 4, 4)).items()
    assert set(axes) == {"fsdp", "expert"}
    assert layout["fsdp"][dim] * layout["expert"][dim] == 4
    with pytest.raises(MeshError, match="cannot be laid on whole dimensions"):
        make_mesh({"fsdp": 32, "expert": 2}, devices, allow_split_physical_axes=False)
    # CPU devices have no coordinates.
    assert mesh_lib.torus_layout(make_mesh({"fsdp": -1})) is None


def test_multi_slice_tpu_mesh_is_slice_major():
    """Two v5p 2x2x2 slices (slice_index set): the create_hybrid_device_mesh branch puts one
    slice at each dcn_data index."""
    devices = _tpu_devices("v5p:2x2x2", num_slices=2)
    mesh = make_mesh({"dcn_data": 2, "fsdp": 4, "expert": 2}, devices)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()


def _bare_tpu_vm(monkeypatch) -> None:
    """A TPU VM as JAX sees it before start-up: chips present, distributed not initialized, and
    none of the launchers' environment variables set."""
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(mesh_lib, "on_cloud_tpu_vm", lambda: True)
    for name in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES",
                 "SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_cpu_machine_does_not_start_libtpu():
    """With libtpu installed (the development requirements carry it) and no TPU chip here, an
    entrypoint's first call keeps JAX on the CPU: no TPU backend attempt, whose libtpu errors
    would otherwise be the first thing a `make demo` prints. Run as an absl app, as the
    entrypoints are (absl then shows JAX's log of a failed backend), without JAX_PLATFORMS."""
    import os
    import subprocess
    import sys
    pytest.importorskip("libtpu")
    script = ("from absl import app\n"
              "def main(argv):\n"
              "    from deepseek_jax import parallel\n"
              "    import jax\n"
              "    parallel.maybe_initialize_distributed()\n"
              "    print(jax.config.jax_platforms, jax.devices()[0].platform)\n"
              "app.run(main)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "cpu"]
    assert "tpu" not in out.stderr.lower(), out.stderr


def test_processes_grouped_into_hosts_over_dcn(tmp_path):
    """Four processes of 2 CPU devices each, joined by a real coordinator, standing in for 2
    GPU hosts that run one process per GPU (SLURM's layout): dcn_data=2 puts processes 0-1 on
    one side of the DCN axis and 2-3 on the other; dcn_data=4 gives each process its row."""
    from multihost_helpers import finish, start
    for dcn, rows in ((2, [[0, 1], [2, 3]]), (4, [[0], [1], [2], [3]])):
        logdir = str(tmp_path / f"dcn{dcn}")
        procs = start(["tests/parallel/mesh_hosts_probe.py", str(dcn)], logdir, n=4, devices=2)
        codes, logs = finish(procs, logdir, timeout=120)
        assert codes == [0] * 4, logs
        assert all(f"ROWS {rows}" in log for log in logs), logs


def test_dcn_that_splits_no_host_boundary_names_the_fix():
    class Device:                          # what make_mesh reads of a GPU device
        def __init__(self, i):
            self.id, self.process_index = i, i // 3
    # 4 processes of 3 devices: 3 hosts would split a process's devices between hosts.
    with pytest.raises(MeshError, match="devices span 4 processes; set dcn_data=4 .* a number "
                                        "of hosts that divides it"):
        make_mesh({"dcn_data": 3, "fsdp": -1}, devices=[Device(i) for i in range(12)])
