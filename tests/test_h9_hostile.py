"""Round 9, hostile: a second Ctrl-C against what a first one started
(``task.despite_interrupts``), and the simulator lane's estimate at a job's
end."""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading

import pytest

from conftest import by_value, gated, wait_until
from pymw_magic import Master


gated = by_value(gated)   # (conftest is not for a worker to import)


def _ctrl_c_here():
    """Ctrl-C on the main thread, raised where we stand."""
    _thread.interrupt_main()
    wait_until(lambda: False, 30, "the interrupt")


@pytest.mark.timeout(120)
def test_a_ctrl_c_in_the_body_of_a_map_loop_cancels_the_job_despite_a_second_one(tmp_path):
    """``for x in m.map(...)``: Ctrl-C lands in the loop's body (where a loop
    that works on its results spends its time), the iterator is dropped and
    its close cancels the job.  That cancel is what the interrupt started,
    but it was a plain ``job.cancel()`` (the GeneratorExit path), not run
    ``despite_interrupts``: a second Ctrl-C while it ran (here as it
    reaches the scheduler's cancel, about 30 ms of work that stops the
    workers) cuts it off half-way.  Seen: the job is marked cancelled and
    closed to new input, while its tasks stay pending/running on their
    workers, the job never ends, and the second KeyboardInterrupt is only
    printed as "Exception ignored in generator"."""
    gate = str(tmp_path / "gate")
    m = Master("local", workers=2, retries=0)
    scheduler = m._scheduler
    real_cancel = scheduler.cancel
    seconds = []

    def cancel_hit_by_a_second_ctrl_c(*args, **kwargs):
        if not seconds:
            seconds.append(1)
            os.kill(os.getpid(), signal.SIGINT)   # the second Ctrl-C, as the cancel gets here
        return real_cancel(*args, **kwargs)

    scheduler.cancel = cancel_hit_by_a_second_ctrl_c
    box = [m.map(gated, ["now", gate, gate, gate])]
    job = box[0]._job
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in box.pop():
                wait_until(lambda: job.counts()["running"] == 2, 60, "both workers in a task")
                _ctrl_c_here()
        assert seconds, "the iterator's close did not cancel the job"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        wait_until(job.done, 10, "the job to end (its tasks cancelled)")
        assert job.counts()["cancelled"] == 3
    finally:
        scheduler.cancel = real_cancel
        open(gate, "w").close()
        m.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(120)
def test_a_second_ctrl_c_as_despite_interrupts_is_entered_still_lets_the_cancel_run(tmp_path):
    """``job.result()`` interrupted: its handler calls
    ``despite_interrupts(self.cancel)``.  A second Ctrl-C that lands as
    that call begins (placed there with a trace function: the signal is
    sent on the call event, its handler runs at the function's first
    instruction) was raised before the handler is swapped, outside the
    ``try`` that is meant to catch one "landing in here": the cancel never
    ran, and the job's tasks ran on behind the caller's back.  (The callers
    now try once more.)  (A narrow
    window: the function's entry and its ``current_thread()`` check, and
    the caller's ``except`` clause before the call.)"""
    import pymw_magic.task as task_mod
    gate = str(tmp_path / "gate")
    m = Master("local", workers=1, retries=0)
    fired = []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is task_mod.despite_interrupts.__code__ and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return None

    try:
        job = m.map_async(gated, [gate, gate])
        wait_until(lambda: job.counts()["running"] == 1, 60, "the first task running")
        timer = threading.Timer(0.2, _thread.interrupt_main)   # the first Ctrl-C
        timer.start()
        old_trace = sys.gettrace()   # (a coverage tracer, if any, is put back)
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                job.result()
        finally:
            sys.settrace(old_trace)
            timer.join()
        assert fired, "the cancel was not started"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        wait_until(job.done, 10, "the job to end (its tasks cancelled)")
        assert job.counts()["cancelled"] == 2
    finally:
        open(gate, "w").close()
        m.shutdown(wait=True, cancel_futures=True)
