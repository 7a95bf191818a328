"""pytest plugin: every test's outcome written to a JSON file as it finishes (h200.sh part 1).

Load it with `-p experiments.benchmarks.pytest_results` (repository root on `sys.path`) and name
the file in `PYTEST_RESULTS_JSON`. The file is rewritten after every test, so a run killed by its
time limit still says what passed; pytest's own `--junitxml` is written only at the end.

  {"meta": {...}, "tests": [{"id", "outcome": passed|failed|skipped|error, "seconds",
   "message"}], "summary": {"ran", "passed", "failed", "skipped", "errors", "exit_status"}}

"ran" counts the tests whose body executed (passed + failed). Then

  python experiments/benchmarks/pytest_results.py FILE [--require-ran]

prints the summary and the skip reasons, and with `--require-ran` exits 1 when no test ran, when
any failed or errored, or when, on a GPU, a test skipped for want of a GPU: hardware tests that
skip in silence must not pass for a success.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

_PATH = os.environ.get("PYTEST_RESULTS_JSON")
_DATA: dict = {"meta": {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, "tests": [],
               "summary": {}}
_INDEX: dict[str, int] = {}
MISSING_ON_GPU_HOST = ("ml_collections", "grain", "tensorflow_datasets", "tensorboardX")


def _summary(exit_status=None) -> dict:
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error")}
    for t in _DATA["tests"]:
        counts[t["outcome"]] += 1
    return {"ran": counts["passed"] + counts["failed"], "passed": counts["passed"],
            "failed": counts["failed"], "skipped": counts["skipped"], "errors": counts["error"],
            "exit_status": exit_status, "finished": exit_status is not None}


def _save(exit_status=None) -> None:
    if not _PATH:
        return
    _DATA["summary"] = _summary(exit_status)
    path = pathlib.Path(_PATH)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_DATA, indent=1))
    os.replace(tmp, path)


def _message(report) -> str:
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:      # a skip: (file, line, reason)
        return str(longrepr[2])
    text = str(longrepr)
    return text[-4000:]                                          # the assertion is at the end


def pytest_sessionstart(session):
    try:
        import jax
        _DATA["meta"].update(jax=jax.__version__, backend=jax.default_backend(),
                             device=jax.devices()[0].device_kind,
                             jax_platforms=os.environ.get("JAX_PLATFORMS"))
    except Exception as e:  # noqa: BLE001 - the tests will say what is wrong with JAX
        _DATA["meta"]["jax_error"] = f"{type(e).__name__}: {e}"
    _save()


def pytest_runtest_logreport(report):
    """Setup skipped → skipped, setup failed → error, call → passed/failed/skipped, teardown
    failure → error (overrides)."""
    outcome = None
    if report.when == "setup" and not report.passed:
        outcome = "skipped" if report.skipped else "error"
    elif report.when == "call":
        outcome = report.outcome                       # passed | failed | skipped
        if hasattr(report, "wasxfail"):
            outcome = "skipped" if report.skipped else "passed"
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    if outcome is None:
        return
    entry = {"id": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3),
             "message": _message(report) if outcome != "passed" else ""}
    if report.nodeid in _INDEX:
        old = _DATA["tests"][_INDEX[report.nodeid]]
        entry["seconds"] = round(old["seconds"] + report.duration, 3)
        _DATA["tests"][_INDEX[report.nodeid]] = entry
    else:
        _INDEX[report.nodeid] = len(_DATA["tests"])
        _DATA["tests"].append(entry)
    _save()


def pytest_sessionfinish(session, exitstatus):
    banned = [m for m in MISSING_ON_GPU_HOST if m in sys.modules]
    if banned:
        _DATA["meta"]["imported_missing_on_gpu_host"] = banned
    _save(int(exitstatus))


def report(path: str, require_ran: bool) -> int:
    data = json.loads(pathlib.Path(path).read_text())
    s = data.get("summary") or {}
    meta = data.get("meta", {})
    print(f"hardware tests on {meta.get('device')} ({meta.get('backend')}): ran {s.get('ran', 0)} "
          f"(passed {s.get('passed', 0)}, failed {s.get('failed', 0)}), skipped "
          f"{s.get('skipped', 0)}, errors {s.get('errors', 0)}; pytest exit status "
          f"{s.get('exit_status')}{'' if s.get('finished') else ' (did not finish: time limit?)'}")
    for t in data.get("tests", []):
        if t["outcome"] != "passed":
            first = (t["message"].strip().splitlines() or [""])[-1][:300]
            print(f"  {t['outcome'].upper():7} {t['id']}: {first}")
    if meta.get("imported_missing_on_gpu_host"):
        print(f"  imported packages the GPU host lacks: {meta['imported_missing_on_gpu_host']}")
    # On a GPU, a test that skips because it "needs a (Hopper) GPU" means the detection failed.
    wrongly_skipped = [t["id"] for t in data.get("tests", [])
                       if t["outcome"] == "skipped" and meta.get("backend") == "gpu"
                       and any(w in t["message"].lower() for w in ("gpu", "hopper"))]
    for test_id in wrongly_skipped:
        print(f"  SKIPPED ON A GPU although it asks for one: {test_id}")
    if not require_ran:
        return 0
    if wrongly_skipped:
        print("FAILED: hardware tests skipped on the GPU they ask for")
        return 1
    if not s.get("ran"):
        print("FAILED: NO HARDWARE TEST RAN (all skipped or none collected) — check JAX_PLATFORMS "
              "and the device")
        return 1
    if s.get("failed") or s.get("errors"):
        print("FAILED: hardware tests failed")
        return 1
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(report(args[0], "--require-ran" in args))
