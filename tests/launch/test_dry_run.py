"""The launch scripts: the commands they would run (--dry-run, parsed with shlex), the GKE YAML
(parsed with PyYAML), SLURM's requeue on the preempted exit code (fake srun/scontrol), errors."""

import os
import shlex
import shutil
import stat
import subprocess

import pytest
import yaml

from deepseek_jax.train.run import EXIT_PREEMPTED

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def sh(*args, ok=True, env=None):
    r = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def flags(argv):
    """{--name: value} of `--name=value` arguments (value True for a bare `--name`)."""
    out = {}
    for a in argv:
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            out[name] = value if eq else True
    return out


def commands(script):
    """The simple commands of a shell script, each as argv: split into lines, then at the
    operators && || ; | & and the braces/parentheses shlex's punctuation mode returns."""
    out = []
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        current = []
        for token in lex:
            if token and set(token) <= set("&|;(){}<>"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(token)
        if current:
            out.append(current)
    return out


def find(cmds, program):
    found = [c for c in cmds if program in c]
    assert found, f"no {program!r} command in {cmds}"
    return found[0][found[0].index(program):]


# --- TPU VM pods ----------------------------------------------------------------------------

def _remote(line):
    """(gcloud argv, the command it runs on the workers) of one dry-run line."""
    argv = shlex.split(line)
    return argv, flags(argv)["--command"]


def test_tpu_pod_multislice_create_run_delete():
    out = sh("launch/tpu_pod.sh", "create", "--name=v3", "--zone=us-east5-a", "--type=v5p-1024",
             "--slices=2", "--dry-run").stdout.splitlines()
    argv = shlex.split(out[0])
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "v3"]
    assert flags(argv) == {"--zone": "us-east5-a", "--accelerator-type": "v5p-1024",
                           "--runtime-version": "v2-alpha-tpuv5", "--node-count": "2",
                           "--node-prefix": "v3"}
    out = sh("launch/tpu_pod.sh", "delete", "--name=v3", "--zone=z", "--dry-run").stdout
    assert shlex.split(out)[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete",
                                    "v3"]


def test_tpu_pod_run_initializes_jax_distributed_and_passes_env():
    """The same trainer command on every worker of both slices, with jax.distributed forced on
    (TPU VM workers have no environment variable naming the others), DCN data parallelism
    across slices, the user's variables (LIBTPU_INIT_ARGS) and a gs:// compilation cache, and
    the exit code kept next to the log."""
    out = sh("launch/tpu_pod.sh", "run", "--name=v3", "--zone=z", "--run=r1", "--slices=2",
             "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true --xla_x=1",
             "--compile-cache=gs://bkt/xla", "--dry-run", "--",
             "--config.train.steps=10").stdout.splitlines()
    assert len(out) == 2
    for node, line in zip(["v3-0", "v3-1"], out):
        argv, remote = _remote(line)
        assert argv[5] == node and flags(argv)["--worker"] == "all"
        inner = find(commands(remote), "bash")
        assert inner[1] == "-c" and find(commands(remote), "nohup")
        train = commands(inner[2])
        env = find(train, "env")
        python = env.index(".venv/bin/python")
        assignments = dict(a.split("=", 1) for a in env[1:python])
        assert assignments == {
            "LIBTPU_INIT_ARGS": "--xla_tpu_enable_async_all_gather=true --xla_x=1",
            "JAX_COMPILATION_CACHE_DIR": "gs://bkt/xla"}
        args = env[python + 1:]
        assert args[:2] == ["-m", "experiments.pretrain"]
        assert flags(args) == {"--config": "experiments/configs/pretrain.py:v3-671b",
                               "--workdir": "/mnt/run/r1", "--config.mesh.distributed": "true",
                               "--config.mesh.dcn_data": "-1", "--config.train.steps": "10"}
        assert find(train, "echo")[1] == "$?"                  # the exit code, into HOST.exit
    r = sh("launch/tpu_pod.sh", "run", "--name=v3", "--zone=z", "--run=r", "--env=oops",
           "--dry-run", ok=False)
    assert r.returncode == 2 and "NAME=VALUE" in r.stderr


def test_tpu_pod_setup_uses_uv_python_and_mounts_with_rename_dir_limit():
    """TPU VM images are Ubuntu 22.04 (Python 3.10, no python3.12-venv package): the venv's
    Python 3.12 comes from uv. gcsfuse comes from Google's apt repository and mounts with
    rename-dir-limit, without which Orbax's directory renames fail."""
    out = sh("launch/tpu_pod.sh", "setup", "--name=v6", "--zone=z", "--bucket=gs://bkt/runs",
             "--project=my-project", "--dry-run").stdout
    argv, remote = _remote(out.strip())
    assert flags(argv)["--project"] == "my-project" and flags(argv)["--worker"] == "all"
    cmds = commands(remote)
    for c in cmds:
        assert not any("python3.12-venv" in a for a in c), c
        if c[0] in ("apt-get", "sudo") and "install" in c:
            assert "python3" not in " ".join(c), c
    (venv,) = [c for c in cmds if c[:2] == ["uv", "venv"]]
    assert flags(venv)["--python"] == "3.12"
    install = [c for c in cmds if c[:3] == ["uv", "pip", "install"]][0]
    assert flags(install)["--python"] == ".venv/bin/python"
    assert "-e" in install and ".[tpu]" in install and "requirements-dev.txt" in install
    gcsfuse = [c for c in cmds if c and c[0] == "gcsfuse"][0]
    assert flags(gcsfuse) == {"--implicit-dirs": True, "--rename-dir-limit": "200000",
                              "--only-dir": "runs"}
    assert gcsfuse[-2:] == ["bkt", "/mnt/run"]


def test_tpu_pod_doctor_runs_the_preflight_on_every_worker():
    out = sh("launch/tpu_pod.sh", "doctor", "--name=v3", "--zone=z", "--slices=2",
             "--dry-run").stdout.splitlines()
    assert len(out) == 2
    for line in out:
        argv, remote = _remote(line)
        assert flags(argv)["--worker"] == "all"
        doctor = find(commands(remote), ".venv/bin/python")
        assert doctor[1:3] == ["-m", "experiments.doctor"]
        assert flags(doctor) == {"--workdir": "/mnt/run/.doctor", "--distributed": "true"}


def test_tpu_pod_runtime_per_generation_and_errors():
    out = sh("launch/tpu_pod.sh", "create", "--name=a", "--zone=z", "--type=v6e-64",
             "--dry-run").stdout.splitlines()
    f = flags(shlex.split(out[0]))
    assert f["--runtime-version"] == "v2-alpha-tpuv6e" and f["--node-id"] == "a"
    r = sh("launch/tpu_pod.sh", "create", "--zone=z", "--dry-run", ok=False)
    assert r.returncode == 2 and "--name=... is required" in r.stderr
    r = sh("launch/tpu_pod.sh", "create", "--name=a", "--zone=z", "--type=v4-8", "--dry-run",
           ok=False)
    assert r.returncode == 2 and "accelerator type" in r.stderr
    r = sh("launch/tpu_pod.sh", "launch", ok=False)
    assert r.returncode == 2 and "usage" in r.stderr


# --- GKE ------------------------------------------------------------------------------------

def _jobset(*args):
    out = sh("launch/gke/launch.sh", "jobset", "--dry-run", *args).stdout
    docs = out.split("\n---\n")
    return yaml.safe_load(docs[0]), docs[1]


def _pod(jobset):
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    return job, job["template"]["spec"]


def test_gke_jobset_slices_hosts_network_env_and_restart_policy():
    js, rest = _jobset("--run=v3-001", "--type=v5p-1024", "--slices=2", "--image=IMAGE",
                       "--bucket=gs://bkt", "--env=LIBTPU_INIT_ARGS=--a=1 --b=2",
                       "--compile-cache=gs://bkt/xla", "--", "--config.train.steps=10")
    assert js["kind"] == "JobSet" and js["metadata"]["name"] == "v3-001"
    assert js["spec"]["replicatedJobs"][0]["replicas"] == 2
    job, pod = _pod(js)
    assert job["parallelism"] == job["completions"] == 128          # 512 chips / 4 per host
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "8x8x8"}
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["terminationGracePeriodSeconds"] == 300
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "v3-001-slice-0-0.v3-001"
    assert env["MEGASCALE_NUM_SLICES"] == "2"
    assert env["LIBTPU_INIT_ARGS"] == "--a=1 --b=2"
    assert env["JAX_COMPILATION_CACHE_DIR"] == "gs://bkt/xla"
    argv = shlex.split(container["args"][0])
    assert argv[:3] == ["python", "-m", "experiments.pretrain"]
    assert flags(argv) == {"--config": "experiments/configs/pretrain.py:v3-671b",
                           "--workdir": "/mnt/run/v3-001", "--config.mesh.dcn_data": "-1",
                           "--config.train.steps": "10"}
    (volume,) = pod["volumes"]
    attrs = volume["csi"]["volumeAttributes"]
    assert attrs["bucketName"] == "bkt"
    assert "rename-dir-limit=200000" in attrs["mountOptions"].split(",")
    assert "kubectl apply -f -" in rest


def test_gke_restarts_on_preempted_exit_code_only():
    """A failed run (exit code other than 0 and 42) fails the JobSet through the Job's
    podFailurePolicy; 42 (preempted after saving) fails the Job plainly, which the JobSet
    restarts (up to maxRestarts)."""
    js, _ = _jobset("--run=r", "--type=v6e-16", "--image=I", "--bucket=b", "--max-restarts=5")
    job, pod = _pod(js)
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    (rule,) = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    exits = rule["onExitCodes"]
    assert exits["containerName"] == pod["containers"][0]["name"]
    assert exits["operator"] == "NotIn" and sorted(exits["values"]) == [0, EXIT_PREEMPTED]
    policy = js["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == 5
    assert policy["rules"] == [{"action": "FailJobSet",
                                "onJobFailureReasons": ["PodFailurePolicy"]}]


def test_gke_kueue_label_and_fuse_sidecar_limits():
    """--queue adds Kueue's queue label (xpk clusters admit workloads through Kueue); the FUSE
    sidecar that stages checkpoint uploads gets no resource limits ("0")."""
    js, _ = _jobset("--run=r", "--type=v6e-16", "--image=I", "--bucket=b", "--queue=lq")
    assert js["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "lq"}
    js, _ = _jobset("--run=r", "--type=v6e-16", "--image=I", "--bucket=b")
    assert "labels" not in js["metadata"]
    annotations = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"][
        "annotations"]
    assert annotations["gke-gcsfuse/volumes"] == "true"
    for limit in ("cpu-limit", "memory-limit", "ephemeral-storage-limit"):
        assert annotations[f"gke-gcsfuse/{limit}"] == "0"


@pytest.mark.parametrize("accel,topology,hosts,chips", [
    ("v5p-8", "2x2x1", 1, 4), ("v5litepod-256", "16x16", 64, 4), ("v6e-16", "4x4", 4, 4),
    ("v5litepod-8", "2x4", 1, 8), ("v6e-8", "2x4", 1, 8)])
def test_gke_topologies_and_chips_per_host(accel, topology, hosts, chips):
    """v5litepod-8 and v6e-8 are one 8-chip host (a 2x4 node), not two pods of 4 chips."""
    js, _ = _jobset("--run=r", f"--type={accel}", "--image=I", "--bucket=b")
    job, pod = _pod(js)
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology
    assert job["parallelism"] == hosts
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == chips


def test_gke_xpk_storage_once_and_workload_with_exit_codes_and_env():
    out = sh("launch/gke/launch.sh", "xpk-storage", "--cluster=c", "--zone=z", "--bucket=b",
             "--dry-run").stdout.splitlines()
    (attach,) = [shlex.split(line) for line in out]
    assert attach[:4] == ["xpk", "storage", "attach", "b"]
    f = flags(attach)
    assert f["--type"] == "gcsfuse" and f["--bucket"] == "b" and int(f["--size"]) >= 1
    assert f["--mount-point"] == "/mnt/run" and f["--auto-mount"] == "true"
    assert "rename-dir-limit=200000" in f["--mount-options"].split(",")

    out = sh("launch/gke/launch.sh", "xpk", "--run=r", "--type=v6e-64", "--slices=4",
             "--image=I", "--cluster=c", "--zone=z", "--env=LIBTPU_INIT_ARGS=--x=1",
             "--dry-run").stdout.splitlines()
    (create,) = [shlex.split(line) for line in out]      # no storage attach per run
    assert create[:3] == ["xpk", "workload", "create"]
    f = flags(create)
    assert f["--workload"] == "r" and f["--device-type"] == "v6e-64"
    assert f["--num-slices"] == "4" and f["--restart-on-exit-codes"] == str(EXIT_PREEMPTED)
    assert f["--env"] == "LIBTPU_INIT_ARGS=--x=1"
    command = shlex.split(f["--command"])
    assert flags(command)["--config.mesh.dcn_data"] == "-1"
    assert flags(command)["--workdir"] == "/mnt/run/r"
    r = sh("launch/gke/launch.sh", "xpk", "--run=r", "--dry-run", ok=False)
    assert r.returncode == 2 and "is required" in r.stderr


# --- SLURM ----------------------------------------------------------------------------------

def _sbatch_header():
    lines = open(os.path.join(ROOT, "launch", "slurm.sbatch")).read().splitlines()
    return flags([line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH ")])


def test_slurm_all_gpus_visible_to_each_task_and_requeue_signal():
    """JAX's SLURM detection makes local task k use GPU k, so every task must see all of its
    node's GPUs: no --gpus-per-task (which leaves each task one GPU, numbered 0)."""
    header = _sbatch_header()
    assert "--gpus-per-task" not in header
    assert header["--requeue"] is True and header["--signal"] == "TERM@120"
    out = sh("launch/slurm.sbatch", "--dry-run",
             "--config=experiments/configs/pretrain.py:v3-671b",
             "--workdir=/shared/runs/v3").stdout.splitlines()
    argv = shlex.split(out[0])
    assert argv[0] == "srun"
    f = flags(argv)
    assert "--gpus-per-task" not in f and f["--gpu-bind"] == "none"
    assert f["--ntasks-per-node"] == f["--gpus-per-node"] == "8"
    assert f["--kill-on-bad-exit"] == "0"
    i = argv.index("-m")
    assert argv[i + 1] == "experiments.pretrain"
    # Two nodes (the header's default): dcn_data over the nodes, one per node; the trainer
    # groups each node's 8 task ids into a host (tests/parallel/test_mesh.py).
    assert flags(argv[i:]) == {"--config": "experiments/configs/pretrain.py:v3-671b",
                               "--workdir": "/shared/runs/v3", "--config.mesh.dcn_data": "2"}
    one_node = sh("launch/slurm.sbatch", "--dry-run", "--config=experiments/configs/pretrain.py:tiny",
                  "--workdir=/x", env={"SLURM_JOB_NUM_NODES": "1"}).stdout
    assert "dcn_data" not in one_node
    r = sh("launch/slurm.sbatch", "--dry-run", "--workdir=/x", ok=False)
    assert r.returncode == 2 and "--config=" in r.stderr


@pytest.mark.parametrize("code, requeued", [(EXIT_PREEMPTED, True), (1, False), (0, False)])
def test_slurm_requeues_on_the_preempted_exit_code_only(tmp_path, code, requeued):
    """Run for real with fake `srun` and `scontrol` first on PATH: srun's exit code is the
    script's, and only 42 requeues the job."""
    log = tmp_path / "calls"
    for name, body in (("srun", f'echo "srun $*" >> {log}; exit {code}'),
                       ("scontrol", f'echo "scontrol $*" >> {log}')):
        path = tmp_path / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    r = sh("launch/slurm.sbatch", "--config=experiments/configs/pretrain.py:tiny",
           "--workdir=/shared/r", ok=False,
           env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
                "SLURM_JOB_NUM_NODES": "1"})
    assert r.returncode == code, r.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun ")
    assert (calls[1:] == ["scontrol requeue 1234"]) if requeued else calls[1:] == []


def test_scripts_parse():
    for script in ("launch/tpu_pod.sh", "launch/gke/launch.sh", "launch/slurm.sbatch"):
        sh("-n", script)


# --- the fit check before a pod is created ---------------------------------------------------

def _fit_command(stderr):
    lines = [line for line in stderr.splitlines() if "experiments.doctor" in line]
    assert len(lines) == 1, stderr
    return shlex.split(lines[0])


def test_launchers_check_the_fit_first_with_the_runs_overrides():
    """Both launchers run the planner's verdict (`experiments.doctor --target`) for the run's
    config on the slice before creating or submitting anything, with the overrides after `--`
    (and DCN data parallelism for several slices); `--fit-check` picks compile, analytic or
    off."""
    r = sh("launch/tpu_pod.sh", "create", "--name=v3", "--zone=z", "--type=v5p-512",
           "--slices=2", "--config=v2-lite", "--dry-run", "--", "--config.data.global_batch=256")
    check = _fit_command(r.stderr)
    assert check[1:3] == ["-m", "experiments.doctor"]
    assert flags(check) == {"--target": "2xtpu-v5p-512",
                            "--config": "experiments/configs/pretrain.py:v2-lite",
                            "--config.mesh.dcn_data": "-1", "--config.data.global_batch": "256"}
    assert shlex.split(r.stdout.splitlines()[0])[:5] == ["gcloud", "compute", "tpus",
                                                         "queued-resources", "create"]
    r = sh("launch/gke/launch.sh", "xpk", "--run=r", "--image=i", "--cluster=c", "--zone=z",
           "--type=v6e-64", "--fit-check=analytic", "--dry-run")
    check = _fit_command(r.stderr)
    assert flags(check) == {"--target": "tpu-v6e-64", "--analytic": True,
                            "--config": "experiments/configs/pretrain.py:v3-671b"}
    for script, action in (("launch/tpu_pod.sh", ["create", "--name=v3", "--zone=z"]),
                           ("launch/gke/launch.sh", ["jobset", "--run=r", "--image=i",
                                                     "--bucket=b"])):
        r = sh(script, *action, "--fit-check=off", "--dry-run")
        assert "experiments.doctor" not in r.stdout + r.stderr
        r = sh(script, *action, "--fit-check=maybe", "--dry-run", ok=False)
        assert r.returncode == 2 and "use compile, analytic or off" in r.stderr


def test_a_run_that_does_not_fit_creates_no_pod(tmp_path):
    """For real (no --dry-run): the tiny model at 65,536 × 1,024 tokens per step needs far more
    than a v5e chip's 16 GiB, so the compiled fit check fails and gcloud is never called;
    at its own batch it fits and creation goes ahead (gcloud here is a stand-in that records
    its calls: the real one needs a Google Cloud project)."""
    import sys
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHON": sys.executable}
    base = ["launch/tpu_pod.sh", "create", "--name=t", "--zone=z", "--type=v5litepod-8",
            "--config=tiny"]
    r = sh(*base, "--", "--config.data.global_batch=65536", "--config.data.seq_len=1024",
           ok=False, env=env)
    assert r.returncode != 0 and not calls.exists(), r.stderr
    assert "DOES NOT FIT" in r.stdout + r.stderr and "nothing was created" in r.stderr
    r = sh(*base, env=env)
    assert "fits" in r.stdout + r.stderr
    assert calls.read_text().startswith("compute tpus queued-resources create t")
