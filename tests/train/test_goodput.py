"""The goodput ledger (`train.goodput`): its arithmetic against hand-computed times, with
compile spans reported through JAX's own monitoring API; the runs that write it are checked in
tests/experiments/test_pretrain.py (one run, a kill -9 and its rerun)."""

import json

import jax
import pytest

from deepseek_jax.train import goodput
from deepseek_jax.train.goodput import Ledger

TRACE, COMPILE = goodput.COMPILE_EVENTS[0], goodput.COMPILE_EVENTS[2]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ledger(tmp_path):
    clock = Clock()
    led = Ledger(tmp_path / "goodput.json", clock=clock)
    yield led, clock
    led.close()


def test_span_unions():
    spans = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.7)]
    assert goodput.merged(spans) == [(0.0, 3.0), (5.0, 6.0)]
    assert goodput.length(spans) == 4.0
    assert goodput.overlap(spans, [(2.5, 5.2), (2.6, 2.8)]) == pytest.approx(0.7, rel=1e-12)
    assert goodput.uncovered((-1.0, 7.0), goodput.merged(spans)) == [(-1.0, 0.0), (3.0, 5.0),
                                                                    (6.0, 7.0)]
    assert goodput.uncovered((1.0, 2.0), [(0.0, 3.0)]) == []


def test_parts_add_up_and_compile_is_counted_once(ledger):
    led, clock = ledger
    # t = 1000..1010: restore (3 s) with a 2 s compile inside it, reported twice (a trace
    # nested in another trace, as an inner jit traced inside an outer one reports).
    with led.timed("restore"):
        jax.monitoring.record_event_time_span(TRACE, 1001.0, 1003.0)
        jax.monitoring.record_event_time_span(TRACE, 1001.5, 1002.5)
        clock.t = 1003.0
    clock.t = 1004.0
    with led.timed("data"):
        clock.t = 1005.0
    # The first step's compile (4 s) between the data and the next data: not inside a block.
    jax.monitoring.record_event_time_span(COMPILE, 1005.0, 1009.0)
    jax.monitoring.record_event_time_span("/jax/some/other_event", 1005.0, 1010.0)
    clock.t = 1010.0
    with led.timed("checkpoint"):
        clock.t = 1011.0
    led.step_done(1)
    clock.t = 1012.0
    parts = led.parts()
    assert parts == {"compile": 6.0, "restore": 1.0, "data": 1.0, "eval": 0.0,
                     "checkpoint": 1.0, "steps": 3.0}
    assert sum(parts.values()) == 12.0 == led.row()["wall_s"]


def test_a_compile_reported_after_its_block_closed_and_nested_blocks(ledger):
    led, clock = ledger
    with led.timed("eval"):                    # 1000..1004, with a checkpoint block inside it
        clock.t = 1001.0
        with led.timed("checkpoint"):
            clock.t = 1003.0
        clock.t = 1004.0
    with led.timed("data"):                    # 1004..1006
        clock.t = 1006.0
    # A compile on another thread, 1003..1005, reported when it ends (after both blocks), and
    # again as a span nested in it: 1 s out of eval, 1 s out of data, 2 s of compile.
    jax.monitoring.record_event_time_span(COMPILE, 1003.0, 1005.0)
    jax.monitoring.record_event_time_span(TRACE, 1003.5, 1004.5)
    clock.t = 1007.0
    assert led.parts() == {"compile": 2.0, "restore": 0.0, "data": 1.0, "eval": 3.0,
                           "checkpoint": 0.0, "steps": 1.0}


def test_the_bookkeeping_stays_small_on_a_long_run(ledger):
    led, clock = ledger
    steps = 3 * int(Ledger.KEEP_S)             # one data block and one step a second
    for step in range(1, steps + 1):
        with led.timed("data"):
            clock.t += 0.25
        if step % 1000 == 1:                   # a compile each 1000 steps, inside the step
            jax.monitoring.record_event_time_span(COMPILE, clock.t, clock.t + 0.5)
        clock.t += 0.75
        led.step_done(step)
    compiles = len(range(1, steps + 1, 1000))
    assert len(led.closed) <= Ledger.KEEP_S + 1 and len(led.compile) <= Ledger.KEEP_S / 1000 + 1
    assert led.parts() == pytest.approx({"compile": 0.5 * compiles, "restore": 0.0,
                                         "data": 0.25 * steps, "eval": 0.0, "checkpoint": 0.0,
                                         "steps": 0.75 * steps - 0.5 * compiles},
                                        rel=1e-9)     # sums of ~10⁴ floats: ~1e-12 rounding


def test_lost_steps_of_the_previous_segment_and_the_run_goodput(tmp_path):
    # A first segment ran steps 1..10 (5 s of steps: 0.5 s each), was last written at step 10,
    # but metrics.jsonl shows it logged up to 12 before it was killed; the checkpoint resumed
    # from is step 4, so steps 5..12 (8 steps, 4 s) are redone.
    first = {"resumed_from": None, "first_step": 1, "last_step": 10, "wall_s": 20.0, "steps_s": 5.0, "lost_s": 0.0,
             **{f"{p}_s": 0.0 for p in goodput.PARTS if p != "steps"}}
    first["compile_s"] = 15.0
    (tmp_path / "goodput.json").write_text(json.dumps({"segments": [first]}))
    clock = Clock()
    led = Ledger(tmp_path / "goodput.json", clock=clock)
    try:
        led.resumed(4, logged_until=12)
        for step in range(5, 13):
            led.step_done(step)
        clock.t += 10.0                      # 10 s, all of it steps here
        run = led.run_totals()
        assert led.earlier[0]["lost_s"] == 4.0
        assert run["segments"] == 2 and run["wall_s"] == 30.0
        assert run["goodput"] == pytest.approx((5.0 + 10.0 - 4.0) / 30.0, rel=1e-12)
    finally:
        line = led.close()
    saved = json.loads((tmp_path / "goodput.json").read_text())
    assert [s["resumed_from"] for s in saved["segments"]] == [None, 4]
    assert saved["segments"][1]["first_step"] == 5 and saved["segments"][1]["last_step"] == 12
    assert "goodput 37%" in line and "4.0 s of steps redone" in line


def test_a_file_cut_by_a_kill_starts_the_history_over(tmp_path):
    (tmp_path / "goodput.json").write_text('{"segments": [{"first_st')
    led = Ledger(tmp_path / "goodput.json", clock=Clock())
    try:
        assert led.earlier == []
        led.resumed(4, logged_until=7)             # nothing to charge the lost steps to
        assert led.run_totals()["segments"] == 1
    finally:
        led.close()


def test_only_the_writing_process_writes(tmp_path):
    led = Ledger(tmp_path / "goodput.json", write=False, clock=Clock())
    with led.timed("checkpoint"):
        pass
    led.close()
    assert not (tmp_path / "goodput.json").exists()
