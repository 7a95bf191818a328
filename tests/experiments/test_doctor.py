"""The preflight (`experiments/doctor.py`): every check passes in 2 processes × 4 CPU devices
joined by a real coordinator, and a workdir that cannot hold checkpoints fails it with a
message naming the fix."""

import os

from multihost_helpers import finish, start

ROWS = ("versions", "distributed", "devices", "collective", "workdir")


def _table(log):
    """{check: (ok, detail)} of one process's table."""
    out = {}
    for line in log.splitlines():
        if line.startswith("[process "):
            _, rest = line.split("] ", 1)
            name, status, detail = rest.split(None, 2)
            out[name] = (status == "ok", detail)
    return out


def test_doctor_passes_on_two_processes(tmp_path):
    workdir = str(tmp_path / "run")
    procs = start(["-m", "experiments.doctor", f"--workdir={workdir}", "--devices=8"],
                  str(tmp_path / "logs"))
    codes, logs = finish(procs, str(tmp_path / "logs"), timeout=240)
    assert codes == [0, 0], logs
    for i, log in enumerate(logs):
        table = _table(log)
        assert tuple(table) == ROWS, log
        assert all(ok for ok, _ in table.values()), log
        assert f"process {i} of 2" in table["distributed"][1]
        assert "4 here, 8 in all, 1 slice(s)" in table["devices"][1]
        assert "8 devices" in table["collective"][1]


def test_doctor_fails_on_a_workdir_that_is_a_file_and_on_a_wrong_device_count(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    procs = start(["-m", "experiments.doctor", f"--workdir={path}", "--devices=16"],
                  str(tmp_path / "logs"), n=1, devices=4)
    codes, logs = finish(procs, str(tmp_path / "logs"), timeout=240)
    assert codes == [1], logs
    table = _table(logs[0])
    assert not table["workdir"][0] and "pass a directory as --workdir" in table["workdir"][1]
    assert not table["devices"][0] and "expected 16" in table["devices"][1]
    assert os.path.isfile(path)
