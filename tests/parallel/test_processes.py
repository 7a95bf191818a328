"""`parallel.together` in a real 2-process run (2 CPU processes × 4 fake devices, gloo).

XLA's CPU collectives give the other processes 30 seconds to join a replica group's first
collective. Here process 1 reaches the program 40 s after process 0, as a slow compile on a
busy host does: without `together`, process 0's first collective fails with `Gloo context
initialization failed: DEADLINE_EXCEEDED` (seen with this script minus the wrapper); with it,
process 0 waits at the coordination service's barrier and both get the sum.
"""

from multihost_helpers import finish, start

LAG_S = 40          # past XLA's fixed 30 s for a Gloo group's first connection

SCRIPT = f"""
import time
import jax, numpy as np
from deepseek_jax import parallel
from deepseek_jax.parallel import processes
parallel.maybe_initialize_distributed()
from jax.sharding import NamedSharding, PartitionSpec as P
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: compiles.append(kw.get("fun_name"))
    if event.endswith("backend_compile_duration") else None)
mesh = jax.make_mesh((8,), ("data",))
rows = NamedSharding(mesh, P("data"))
total = parallel.together(jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P())),
                          "sum")
x = jax.make_array_from_process_local_data(rows, np.ones((4,), np.float32))
y = jax.make_array_from_process_local_data(rows, np.ones((8,), np.float32))
processes.barrier("start")               # both here; now process 1 falls behind
if jax.process_index() == 1:
    time.sleep({LAG_S})
print("sums", float(total(x)), float(total(y)), float(total(x)), flush=True)
print("compiles", compiles.count("jit(<lambda>)"), flush=True)
"""


def test_a_process_arriving_40_s_late_joins_the_first_collective(tmp_path):
    """Both processes sum 8 and 16 ones (each holds half); the program compiles once per
    argument shape on each process (the ahead-of-time compile fills jit's cache), and the
    repeated shape neither compiles nor waits again."""
    logdir = str(tmp_path / "logs")
    codes, logs = finish(start(["-c", SCRIPT], logdir), logdir, timeout=240)
    assert codes == [0, 0], logs
    for log in logs:
        assert "sums 8.0 16.0 8.0" in log, log
        assert "compiles 2" in log, log
