"""A Ctrl-C that lands as the main thread starts to wait is not lost.

CPython runs a signal's Python handler only between waits: a SIGINT that
arrives while the main thread is entering a lock wait does not end that
wait.  ``_thread.interrupt_main()`` makes that case every time (it trips
the signal without waking the wait), so these tests show that each
blocking call of the public surface still raises KeyboardInterrupt at
once, and does not hold it back until its work (60 s here) or its
timeout ends.  The same window lost pytest-timeout's SIGALRM in a CI run,
which then hung until CI's own limit."""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time

import pytest

from conftest import wait_until
from pymw_magic import Master, TaskState

LONG = [60.0, 60.0]


def waiting(thread_id: int) -> bool:
    """Is that thread blocked in a wait of ``threading`` called by pymw_magic now?"""
    frame = sys._current_frames().get(thread_id)
    if frame is None or not frame.f_code.co_filename.endswith("threading.py"):
        return False
    while frame is not None:
        if f"{os.sep}pymw_magic{os.sep}" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def interrupt_when_waiting(started: list[float]) -> threading.Thread:
    """A thread that trips the main thread's SIGINT, without a signal that
    could wake its wait, once the main thread is waiting."""
    main = threading.main_thread().ident

    def run() -> None:
        wait_until(lambda: waiting(main), 120, "the main thread waiting")
        started.append(time.monotonic())
        _thread.interrupt_main()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def busy():
    m = Master("local", workers=2)
    try:
        yield m
    finally:
        m.terminate()


def _raised_soon(call) -> float:
    """Seconds between the interrupt and the KeyboardInterrupt out of ``call``."""
    sent: list[float] = []
    thread = interrupt_when_waiting(sent)
    with pytest.raises(KeyboardInterrupt):
        call()
    late = time.monotonic() - sent[0]
    thread.join(30)
    assert late < 10, f"the interrupt came {late:.1f} s after it was sent"
    return late


def _running(job) -> None:
    wait_until(lambda: all(t.state is TaskState.RUNNING for t in job.tasks), 120, "both tasks running")


@pytest.mark.parametrize("timeout", [None, 100.0])
def test_job_result_raises_at_once_and_cancels_the_job(busy, timeout):
    job = busy.map_async(time.sleep, LONG, chunksize=1)
    _running(job)
    _raised_soon(lambda: job.result(timeout=timeout))
    wait_until(job.done, 60, "the interrupted job ending")
    assert all(t.state is TaskState.CANCELLED for t in job.tasks)


def test_as_completed_raises_at_once_and_cancels_the_job(busy):
    job = busy.map_async(time.sleep, LONG, chunksize=1)
    _running(job)
    _raised_soon(lambda: list(job.as_completed()))
    wait_until(job.done, 60, "the interrupted job ending")
    assert all(t.state is TaskState.CANCELLED for t in job.tasks)


def test_the_map_iterator_raises_at_once(busy):
    _raised_soon(lambda: list(busy.map(time.sleep, LONG, chunksize=1)))
    # the master serves on afterwards
    assert busy.submit(abs, -3).result(timeout=60) == 3


def test_a_futures_result_raises_at_once(busy):
    future = busy.submit(time.sleep, 60)
    wait_until(future.running, 120, "the task running")
    _raised_soon(future.result)


def test_shutdown_waiting_for_a_job_raises_at_once_and_terminates(busy):
    job = busy.map_async(time.sleep, LONG, chunksize=1)
    _running(job)
    _raised_soon(lambda: busy.shutdown(wait=True))
    wait_until(job.done, 60, "the terminated job ending")
    assert not any(t.state is TaskState.DONE for t in job.tasks)


def test_a_backend_joining_its_threads_raises_at_once():
    """What every backend's shutdown(wait=True) does last: join its threads."""
    from pymw_magic.backends.base import join_threads

    release = threading.Event()
    busy_thread = threading.Thread(target=release.wait, args=(120,), daemon=True)
    busy_thread.start()
    try:
        # (CPython 3.11 then takes the thread for stopped, bpo-45274's
        # handling of an interrupted join: is_alive() cannot be asserted)
        _raised_soon(lambda: join_threads([busy_thread], wait=True))
    finally:
        release.set()


def test_what_an_interrupt_starts_runs_to_its_end_and_its_error_is_raised():
    """``despite_interrupts``: the cancel an interrupt starts runs to the end
    though Ctrl-C is pressed again meanwhile (even as it begins); an error
    of its own reaches the caller (chained to the interrupt it handled);
    the SIGINT handler is the caller's again after."""
    import signal
    from pymw_magic.task import despite_interrupts

    ran: list[str] = []
    gate = threading.Event()

    def cancel() -> None:
        ran.append(threading.current_thread().name)
        _thread.interrupt_main()     # a second Ctrl-C, while it runs
        assert gate.wait(60)
        ran.append("ended")

    opener = threading.Timer(0.5, gate.set)
    opener.start()
    despite_interrupts(cancel)       # (no KeyboardInterrupt comes out)
    assert ran == ["MainThread", "ended"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):   # (and the next Ctrl-C is raised again)
        _thread.interrupt_main()
        wait_until(lambda: False, 30, "the interrupt")

    def failing() -> None:
        raise ValueError("the cancel failed")
    with pytest.raises(ValueError, match="the cancel failed") as info:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            despite_interrupts(failing)
            raise
    assert isinstance(info.value.__context__, KeyboardInterrupt)

    # off the main thread it is a plain call
    out: list[str] = []
    t = threading.Thread(target=lambda: despite_interrupts(lambda: out.append(threading.current_thread().name)),
                         name="caller")
    t.start()
    t.join(30)
    assert out == ["caller"]


def test_what_an_interrupt_starts_still_runs_where_the_handler_cannot_be_swapped(monkeypatch):
    """At interpreter exit (or in an embedding that forbids it) SIGINT's
    handler may not be readable or settable: the cancel runs all the same,
    and nothing is swapped."""
    import signal

    from pymw_magic import task

    def refuse(*args):
        raise ValueError("signal only works in main thread of the main interpreter")
    ran = []
    monkeypatch.setattr(task.signal, "getsignal", refuse)
    task.despite_interrupts(lambda: ran.append(1))
    monkeypatch.undo()
    assert ran == [1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
