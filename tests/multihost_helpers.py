"""Starting a multi-process JAX run on this machine for tests: `n` CPU processes with `devices`
fake devices each, joined by a real coordinator on a free localhost port through the variables
`parallel.maybe_initialize_distributed` reads (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); collectives across processes are gloo's (JAX's CPU default)."""

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(argv, logdir, n=2, devices=4):
    """`n` processes of `python argv...`; output to logdir/process_i.log."""
    os.makedirs(logdir, exist_ok=True)
    port = free_port()
    procs = []
    for i in range(n):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
               "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
               "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}
        with open(os.path.join(logdir, f"process_{i}.log"), "w") as log:
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    return procs


def finish(procs, logdir, timeout):
    """Waits for every process (killing all at the timeout); returns (exit codes, logs)."""
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [open(os.path.join(logdir, f"process_{i}.log")).read() for i in range(len(procs))]
    return [p.returncode for p in procs], logs
