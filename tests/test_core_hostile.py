"""The core executor contract under hostile use: the dashboard's reads
racing new jobs, submit history and memory, shutdown from the master's own
callbacks, abandoned map iterators.  Real worker processes throughout."""

from __future__ import annotations

import gc
import sys
import threading
import time

import psutil
import pytest

from pymw_magic import Master
from conftest import wait_until


def ident(x):
    return x


def size(a):
    return len(a)


def nap(x):
    import time
    time.sleep(0.2)
    return x


def run_in_thread(fn, timeout, what):
    """Run ``fn`` in a daemon thread; fail (not hang) if it does not return."""
    out: dict = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as exc:  # handed to the test, which checks it
            out["error"] = exc
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{what} did not return within {timeout} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


# --- the dashboard's reads race new jobs ------------------------------------------------------
def test_reading_jobs_while_threads_start_jobs_loses_none(fast_switching):
    """Threads reading ``master.jobs`` (the dashboard, status) while others
    call map_async: every job the callers hold stays listed."""
    with Master("local", workers=2) as m:
        for trial in range(3):
            held = []
            stop = threading.Event()

            def reader():
                while not stop.is_set():
                    m.jobs

            def starter():
                for i in range(30):
                    held.append(m.map_async(ident, [i]))
            readers = [threading.Thread(target=reader) for _ in range(3)]
            starters = [threading.Thread(target=starter) for _ in range(4)]
            for t in readers + starters:
                t.start()
            for t in starters:
                t.join(60)
            stop.set()
            for t in readers:
                t.join(60)
            listed = {id(j) for j in m.jobs}
            missing = [j.name for j in held if id(j) not in listed]
            assert not missing, f"trial {trial}: {len(missing)} held jobs vanished from master.jobs"
            for j in held:
                assert j.wait(60)


# --- memory: submit history --------------------------------------------------------------------
def test_submit_history_does_not_keep_the_arguments_of_ended_tasks():
    """submit(fn, big) many times, each Future dropped once read: the
    master's history of ended tasks (kept for the dashboard) does not hold
    the big arguments, so memory stays bounded."""
    proc = psutil.Process()
    with Master("local", workers=2) as m:
        m.submit(size, b"warm").result(timeout=60)
        gc.collect()
        base = proc.memory_info().rss
        for i in range(40):
            f = m.submit(size, bytes(5_000_000) + bytes([i]))
            assert f.result(timeout=60) == 5_000_001
            del f
        gc.collect()
        grown = proc.memory_info().rss - base
        # 40 x 5 MB = 200 MB if each argument were kept
        assert grown < 60e6, f"RSS grew {grown / 1e6:.0f} MB over 40 submits of 5 MB dropped"
        # the history still lists the ended tasks for the dashboard
        (job,) = m._all_jobs()
        assert job.counts()["done"] == 41


# --- shutdown from the master's own callbacks ------------------------------------------------
@pytest.mark.parametrize("where", ["future", "job", "observer"])
def test_shutdown_from_a_callback_on_a_serving_thread_does_not_deadlock(where):
    """A done-callback (of a Future or a Job) or an event observer that
    calls ``shutdown()`` on its own master, one worker, more work queued:
    it returns, and the queued work still runs."""
    from pymw_magic.events import JobChanged

    for trial in range(3):
        m = Master("local", workers=1)
        try:
            returned = threading.Event()

            def act():
                m.shutdown(wait=True)
                returned.set()
            if where == "future":
                m.submit(nap, 1).add_done_callback(lambda f: act())
            elif where == "job":
                m.map_async(nap, [1]).add_done_callback(lambda j: act())
            else:
                fired = []

                def observer(event):
                    if isinstance(event, JobChanged) and event.kind == "finished" and not fired:
                        fired.append(event)
                        act()
                m.events.subscribe(observer)
                m.map_async(nap, [1])
            queued = m.submit(nap, 2)
            assert queued.result(timeout=60) == 2, f"trial {trial}"
            assert returned.wait(60), f"trial {trial}: shutdown() in a callback never returned"
            assert m.closed
            run_in_thread(m.shutdown, 60, "a later shutdown()")
        finally:
            m.terminate()


# --- observers that raise, with warnings turned into errors ------------------------------------
@pytest.mark.filterwarnings("error")
def test_a_raising_observer_breaks_nothing_even_when_warnings_are_errors(caplog):
    """Under ``-W error`` (a test suite's filter) the warning about an
    observer that raised must not escape into the publisher: map_async
    still returns its job, and a serving thread does not take it for a
    master-side error (its worker is not replaced)."""
    from pymw_magic.events import TasksChanged, WorkerChanged

    for trial in range(3):
        with Master("local", workers=2) as m:
            m.submit(ident, 0).result(timeout=60)  # both workers up
            wait_until(lambda: len(m.worker_info()) == 2, what="two workers")
            workers = []
            m.events.subscribe(lambda e: workers.append(e) if isinstance(e, WorkerChanged) else None)

            def on_submit(event):
                raise ValueError("observer bug")

            def on_done(event):
                if isinstance(event, TasksChanged) and event.state.value == "done":
                    raise ValueError("observer bug")
            m.events.subscribe(on_submit)
            job = m.map_async(ident, range(20))  # the job's "submitted" event
            assert job.result(timeout=60) == list(range(20))
            m.events.subscribe(on_done)   # now on a serving thread
            assert m.map_async(ident, range(20)).result(timeout=60) == list(range(20))
            assert not workers, f"trial {trial}: workers changed: {[(e.worker, e.kind) for e in workers]}"
        assert "observer bug" in caplog.text


# --- simulator: a cancelled submit holds back the ones behind it ---------------------------------
def test_simulator_runs_a_submit_queued_behind_a_cancelled_one():
    m = Master("simulator", workers=1)
    try:
        # Holding the scheduler's lock, so that the simulator cannot take
        # the first task before its Future is cancelled.
        for trial in range(3):
            with m._scheduler.cond:
                first = m.submit(ident, 1)
                second = m.submit(ident, 2)
                assert first.cancel()
            assert second.result(timeout=30) == 2, f"trial {trial}"
    finally:
        m.terminate()
