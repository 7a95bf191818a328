"""The launch scripts under --dry-run: the commands they would run, and their argument errors."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def sh(*args, ok=True):
    r = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def test_tpu_pod_multislice_create_run_delete():
    out = sh("launch/tpu_pod.sh", "create", "--name=v3", "--zone=us-east5-a", "--type=v5p-1024",
             "--slices=2", "--dry-run").stdout
    assert ("gcloud compute tpus queued-resources create v3 --zone=us-east5-a "
            "--accelerator-type=v5p-1024 --runtime-version=v2-alpha-tpuv5 --node-count=2 "
            "--node-prefix=v3") in out
    out = sh("launch/tpu_pod.sh", "run", "--name=v3", "--zone=z", "--run=r1", "--slices=2",
             "--dry-run", "--", "--config.train.steps=10").stdout.splitlines()
    # The same command on every worker of both slices, DCN axis across slices.
    assert [l.split()[5] for l in out] == ["v3-0", "v3-1"]
    for line in out:
        assert "--worker=all" in line
        assert "experiments.pretrain" in line and "--workdir=/mnt/run/r1" in line
        assert "--config.mesh.dcn_data=-1" in line and "--config.train.steps=10" in line
    out = sh("launch/tpu_pod.sh", "delete", "--name=v3", "--zone=z", "--dry-run").stdout
    assert out.startswith("gcloud compute tpus queued-resources delete v3 --zone=z --force")


def test_tpu_pod_setup_mounts_the_bucket_and_installs():
    out = sh("launch/tpu_pod.sh", "setup", "--name=v6", "--zone=z", "--bucket=gs://bkt/runs",
             "--project=my-project", "--dry-run").stdout
    assert "--project=my-project" in out and "--worker=all" in out
    assert "pip install -q -r requirements-dev.txt" in out and "-e .[tpu]" in out
    assert "gcsfuse --implicit-dirs --only-dir=runs bkt /mnt/run" in out


def test_tpu_pod_runtime_per_generation_and_errors():
    out = sh("launch/tpu_pod.sh", "create", "--name=a", "--zone=z", "--type=v6e-64",
             "--dry-run").stdout
    assert "--runtime-version=v2-alpha-tpuv6e --node-id=a" in out
    r = sh("launch/tpu_pod.sh", "create", "--zone=z", "--dry-run", ok=False)
    assert r.returncode == 2 and "--name=... is required" in r.stderr
    r = sh("launch/tpu_pod.sh", "create", "--name=a", "--zone=z", "--type=v4-8", "--dry-run",
           ok=False)
    assert r.returncode == 2 and "accelerator type" in r.stderr
    r = sh("launch/tpu_pod.sh", "launch", ok=False)
    assert r.returncode == 2 and "usage" in r.stderr


def test_gke_jobset_renders_slices_hosts_and_topology():
    out = sh("launch/gke/launch.sh", "jobset", "--run=v3-001", "--type=v5p-1024", "--slices=2",
             "--image=IMAGE", "--bucket=gs://bkt", "--dry-run", "--",
             "--config.train.steps=10").stdout
    assert "${" not in out
    assert "replicas: 2" in out and "parallelism: 128" in out     # 512 chips / 4 per host
    assert "cloud.google.com/gke-tpu-topology: 8x8x8" in out
    assert "cloud.google.com/gke-tpu-accelerator: tpu-v5p-slice" in out
    assert "bucketName: bkt" in out and 'value: "v3-001-slice-0-0.v3-001"' in out
    assert "--config.mesh.dcn_data=-1 --config.train.steps=10" in out
    assert "kubectl apply -f -" in out


@pytest.mark.parametrize("accel,topology,hosts", [("v5p-8", "2x2x1", 1),
                                                  ("v5litepod-256", "16x16", 64),
                                                  ("v6e-16", "4x4", 4)])
def test_gke_topologies(accel, topology, hosts):
    out = sh("launch/gke/launch.sh", "jobset", "--run=r", f"--type={accel}", "--image=I",
             "--bucket=b", "--dry-run").stdout
    assert f"gke-tpu-topology: {topology}" in out and f"parallelism: {hosts}\n" in out


def test_gke_xpk():
    out = sh("launch/gke/launch.sh", "xpk", "--run=r", "--type=v6e-64", "--slices=4",
             "--image=I", "--cluster=c", "--zone=z", "--bucket=b", "--dry-run").stdout
    lines = out.splitlines()
    assert lines[0].startswith("xpk storage attach r-run --type=gcsfuse --bucket=b")
    assert lines[1].startswith("xpk workload create --workload=r --cluster=c --zone=z")
    assert "--device-type=v6e-64 --num-slices=4" in lines[1]
    assert "--config.mesh.dcn_data=-1" in lines[1]
    r = sh("launch/gke/launch.sh", "xpk", "--run=r", "--dry-run", ok=False)
    assert r.returncode == 2 and "is required" in r.stderr


def test_slurm_one_process_per_gpu():
    out = sh("launch/slurm.sbatch", "--dry-run", "--config=experiments/configs/pretrain.py:v3-671b",
             "--workdir=/shared/runs/v3").stdout
    assert out.startswith("srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1")
    assert "-m experiments.pretrain --config=experiments/configs/pretrain.py:v3-671b " in out
    assert "--workdir=/shared/runs/v3" in out
    r = sh("launch/slurm.sbatch", "--dry-run", "--workdir=/x", ok=False)
    assert r.returncode == 2 and "--config=" in r.stderr
