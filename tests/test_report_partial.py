"""job.report() of a job that has not finished: the simulator waits for it
(virtual time costs nothing); a real backend waits by default, or with
``wait=False`` returns a report marked partial, which says so."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pymw_magic import Master


def wait_for_gate(path: str) -> str:
    """A task that cannot end before the test opens its gate (a file)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)
    return path


@pytest.mark.parametrize("trial", range(3))
def test_simulator_report_right_after_map_async_is_the_finished_jobs(trial):
    with Master("simulator", workers=2, duration=1.0) as m:
        job = m.map_async(abs, range(6 + trial))
        r = job.report(wait=False)  # (the simulator waits all the same)
        assert job.done()
        assert not r.partial and "PARTIAL" not in repr(r)
        assert r.done == 6 + trial
        assert r.makespan == float((6 + trial + 1) // 2)
        again = m.map_async(abs, range(4)).report()
        assert not again.partial and again.done == 4 and again.makespan == 2.0


def test_real_report_without_waiting_is_marked_partial(tmp_path):
    gate = str(tmp_path / "gate")
    with Master("local", workers=2) as m:
        job = m.map_async(wait_for_gate, [gate] * 5)
        r = job.report(wait=False)
        assert r.partial
        assert r.done == 0  # nothing can have ended: the gate is shut
        assert "PARTIAL" in repr(r) and "still running" in repr(r) and "0 of 5 tasks" in repr(r)
        assert "partial report" in r._repr_html_()
        open(gate, "w").close()
        assert job.wait(timeout=60)
        full = job.report(wait=False)
        assert not full.partial and full.partial_detail == "" and "PARTIAL" not in repr(full)
        assert full.done == 5


@pytest.mark.parametrize("trial", range(3))
def test_real_report_waits_for_the_job_by_default(tmp_path, trial):
    gate = str(tmp_path / "gate")
    with Master("local", workers=2) as m:
        job = m.map_async(wait_for_gate, [gate] * 4)
        assert not job.done()  # it cannot end before the gate opens
        # Only a report that waits can see the job end: the gate opens later.
        opener = threading.Timer(0.3, lambda: open(gate, "w").close())
        opener.start()
        try:
            r = job.report()
        finally:
            opener.join(timeout=10)
        assert job.done()
        assert not r.partial and r.done == 4 and r.values == [gate] * 4
        assert r.makespan > 0


def test_real_report_with_a_timeout_waits_that_long_then_is_partial(tmp_path):
    gate = str(tmp_path / "gate")
    with Master("local", workers=2) as m:
        job = m.map_async(wait_for_gate, [gate] * 3)
        start = time.monotonic()
        r = job.report(timeout=0.5)
        assert time.monotonic() - start >= 0.5  # it waited the time given
        assert r.partial and r.done == 0 and "0 of 3 tasks" in repr(r)
        with pytest.raises(ValueError, match="timeout must be None or >= 0"):
            job.report(timeout=-1)
        open(gate, "w").close()
        full = job.report(timeout=60)  # ends as soon as the job does
        assert job.done() and not full.partial and full.done == 3
