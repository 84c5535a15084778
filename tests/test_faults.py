"""Failure behaviour on real processes: killed workers, timeouts,
interrupts, interpreter exit, a dead master, forged frames, long streams."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import ROOT, wait_gone, wait_until, worker_processes
from pymw_magic import Master, TaskState, TaskTimeout, WorkerLost
from pymw_magic.events import JobChanged, TasksChanged
from pymw_magic.policies import Chunking


def kill_self_once(x, marker):
    """Kills its own worker the first time it runs for x == 3."""
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10


def always_kill_self(x):
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 10


def slow(x, seconds=0.2):
    time.sleep(seconds)
    return x


def test_killed_worker_task_is_retried_on_another_worker(tmp_path, master):
    marker = str(tmp_path / "killed")
    job = master.map_async(kill_self_once, range(8), [marker] * 8, chunksize=4)
    assert job.result(timeout=60) == [x * 10 for x in range(8)]
    task = job.tasks[3]
    assert task.attempts == 2
    assert os.path.exists(marker)
    # the innocent tasks of the lost batch were not charged an attempt
    assert all(t.attempts == 1 for t in job.tasks if t.index != 3)


def test_retries_exhausted_fail_that_task_alone_with_worker_lost(master):
    job = master.map_async(always_kill_self, range(8), chunksize=3)
    results = job.result(timeout=60, return_exceptions=True)
    assert isinstance(results[3], WorkerLost)
    assert "SIGKILL" in str(results[3]) and "retries allowed: 1" in str(results[3])
    assert job.tasks[3].attempts == 2
    assert [r for i, r in enumerate(results) if i != 3] == [x * 10 for x in range(8) if x != 3]
    assert job.counts() == {"pending": 0, "running": 0, "retrying": 0, "done": 7, "failed": 1, "cancelled": 0}


def test_retries_zero_fails_at_first_loss():
    with Master(workers=2, retries=0) as m:
        with pytest.raises(WorkerLost):
            m.submit(always_kill_self, 3).result(timeout=60)
        assert m.submit(slow, 5, 0).result(timeout=60) == 5  # the pool recovered


def test_worker_killed_from_outside_mid_task_is_replaced_and_task_retried(master):
    # (tasks long enough that the one seen running is still running when
    # killed, on a loaded machine too)
    job = master.map_async(slow, range(4), [3.0] * 4, chunksize=1)
    victims = _wait_workers(master, 2)
    conn = master._backend._conns[victims[0]["name"]]
    deadline = time.monotonic() + 20
    while conn.running() is None:  # its slot says a task has started
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(victims[0]["pid"], signal.SIGKILL)
    assert job.result(timeout=60) == [0, 1, 2, 3]
    assert sum(t.attempts for t in job.tasks) == 5
    retried = [t for t in job.tasks if t.attempts == 2]
    assert len(retried) == 1 and retried[0].worker != victims[0]["name"]
    assert victims[0]["name"] not in {w["name"] for w in master.worker_info()}
    assert len(master.worker_info()) == 2


def test_timeout_stops_the_task_and_replaces_the_worker():
    # (a timeout well above the 0.01 s tasks: a loaded machine stalls them)
    with Master(workers=2, timeout=2.5) as m:
        pids = {w["pid"] for w in _wait_workers(m, 2)}
        job = m.map_async(slow, [0, 1, 2], [0.01, 30, 0.01], chunksize=1)
        results = job.result(timeout=60, return_exceptions=True)
        assert results[0] == 0 and results[2] == 2
        assert isinstance(results[1], TaskTimeout)
        assert "timeout of 2.5 s" in str(results[1])
        assert job.tasks[1].state is TaskState.FAILED
        # the worker that ran it was stopped, not left sleeping
        dead = [p for p in pids if not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE]
        assert len(dead) >= 1
        assert m.submit(slow, 9, 0).result(timeout=60) == 9


def test_timeout_inside_a_batch_blames_the_right_task():
    with Master(workers=1, timeout=2.5) as m:
        job = m.map_async(slow, range(6), [0.01, 0.01, 30, 0.01, 0.01, 0.01], chunksize=6)
        results = job.result(timeout=60, return_exceptions=True)
        assert isinstance(results[2], TaskTimeout)
        assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4, 5]


def test_per_job_timeout_overrides_the_master(master):
    job = master.map_async(slow, [0, 1], [30, 0.01], timeout=2.5, chunksize=1)
    results = job.result(timeout=60, return_exceptions=True)
    assert isinstance(results[0], TaskTimeout) and results[1] == 1


def _wait_for(predicate, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _wait_workers(m, n, timeout=30):
    deadline = time.monotonic() + timeout
    while len(m.worker_info()) < n:
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.02)
    return m.worker_info()


def test_shutdown_leaves_no_worker_process():
    m = Master(workers=2)
    pids = [w["pid"] for w in _wait_workers(m, 2)]
    assert m.submit(slow, 1, 0).result(timeout=30) == 1
    m.shutdown()
    assert wait_gone(pids, timeout=30) == []   # (exited; a loaded machine may take seconds to reap)


def test_terminate_kills_running_tasks():
    m = Master(workers=2)
    pids = [w["pid"] for w in _wait_workers(m, 2)]
    fut = m.submit(slow, 1, 30)
    _wait_for(fut.running, "the task to start")
    m.terminate()
    assert wait_gone(pids, timeout=10) == []
    # It was running: its Future cannot be cancelled, so it fails with CancelledError.
    assert fut.done() and isinstance(fut.exception(timeout=0), cf.CancelledError)


def test_shutdown_without_wait_returns_at_once_and_finishes_the_work():
    """The concurrent.futures contract: queued and running work goes on in
    the background, then the workers are released."""
    m = Master(workers=2)
    pids = [w["pid"] for w in _wait_workers(m, 2)]
    futs = [m.submit(slow, i, 1.0) for i in range(4)]
    m.shutdown(wait=False)
    assert not all(f.done() for f in futs)   # it did not wait for two seconds of work
    with pytest.raises(RuntimeError, match="after shutdown"):
        m.submit(slow, 9, 0)
    assert [f.result(timeout=30) for f in futs] == [0, 1, 2, 3]
    assert wait_gone(pids, timeout=15) == []


def test_shutdown_cancel_futures_lets_running_tasks_finish():
    m = Master(workers=1)
    _wait_workers(m, 1)
    running = m.submit(slow, "ran", 0.5)
    deadline = time.monotonic() + 30
    while running.running() is False and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = [m.submit(slow, i, 0.5) for i in range(3)]
    m.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=30) == "ran"
    assert all(f.cancelled() or f.done() for f in queued)
    assert sum(f.cancelled() for f in queued) >= 2   # the one sent ahead may have started


def test_an_interrupt_leaving_a_with_block_stops_running_tasks():
    with pytest.raises(KeyboardInterrupt):
        with Master(workers=1) as m:
            pids = [w["pid"] for w in _wait_workers(m, 1)]
            fut = m.submit(slow, 1, 60)
            _wait_for(fut.running, "the task to start")
            raise KeyboardInterrupt
    assert wait_gone(pids, timeout=10) == []
    assert fut.done()


def _interrupt_soon(delay: float) -> threading.Timer:
    t = threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT))
    t.start()
    return t


def test_keyboard_interrupt_while_waiting_cancels_and_stops_running_tasks():
    with Master(workers=2) as m:
        pids = {w["pid"] for w in _wait_workers(m, 2)}
        job = m.map_async(slow, range(6), [30] * 6, chunksize=1)
        timer = _interrupt_soon(0.5)
        with pytest.raises(KeyboardInterrupt):
            job.result(timeout=60)
        timer.join(timeout=30)
        assert job.done()
        assert job.counts()["cancelled"] == 6
        assert all(t.state is TaskState.CANCELLED for t in job.tasks)
        assert wait_gone(list(pids), timeout=10) == [], "the workers running the tasks were stopped"
        # the pool is usable again
        assert m.submit(slow, 3, 0).result(timeout=60) == 3


def test_keyboard_interrupt_in_map_iterator_cancels_the_rest():
    with Master(workers=2) as m:
        _wait_workers(m, 2)
        timer = _interrupt_soon(0.5)
        got = []
        with pytest.raises(KeyboardInterrupt):
            for r in m.map(slow, range(100), [0.2] * 100):
                got.append(r)
        timer.join(timeout=30)
        assert len(got) < 100
        assert m.submit(slow, 3, 0).result(timeout=60) == 3


def test_breaking_out_of_map_cancels_the_rest(master):
    events = []
    master.events.subscribe(events.append)
    ran = []
    for r in master.map(slow, range(50), [0.05] * 50):
        ran.append(r)
        if len(ran) == 3:
            break
    ended = [e for e in events if isinstance(e, JobChanged) and e.kind != "submitted"]
    assert [e.kind for e in ended] == ["cancelled"]
    job = ended[0].job
    assert job.counts()["cancelled"] > 0 and job.counts()["done"] < 50
    assert master.submit(slow, 1, 0).result(timeout=30) == 1


def test_job_cancel_stops_running_and_cancels_pending(master):
    pids = {w["pid"] for w in _wait_workers(master, 2)}
    job = master.map_async(slow, range(10), [30] * 10, chunksize=1)
    deadline = time.monotonic() + 20
    while job.counts()["running"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    n = job.cancel()
    assert n == 10
    assert job.wait(timeout=25)   # (bounds below the tasks' 30 s: they were stopped)
    assert wait_gone(list(pids), timeout=25) == []
    assert job.counts()["cancelled"] == 10


SCRIPT_EXIT = """
import sys, time
sys.path.insert(0, {root!r})
from pymw_magic import Master
def slow(x):
    time.sleep(60)
m = Master(workers=2)
fut = m.submit(slow, 1)
while len(m.worker_info()) < 2:
    time.sleep(0.05)
print(" ".join(str(w["pid"]) for w in m.worker_info()), flush=True)
{ending}
"""


@pytest.mark.parametrize("ending", ["pass", "sys.exit(0)", "raise RuntimeError('boom')"])
def test_interpreter_exit_leaves_no_worker(ending):
    script = SCRIPT_EXIT.format(root=ROOT, ending=ending)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2, proc.stderr
    assert wait_gone(pids, timeout=10) == []


def test_killed_master_takes_its_workers_with_it():
    script = SCRIPT_EXIT.format(root=ROOT, ending="time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        proc.kill()  # SIGKILL: no atexit, no cleanup in the master at all
        proc.wait(timeout=10)
        assert wait_gone(pids, timeout=10) == [], "workers must notice their master is gone"
    finally:
        proc.kill()


def test_hundred_thousand_task_map_streams_with_bounded_memory(master):
    consumed = 0
    max_ahead = 0

    def source():
        nonlocal consumed
        for i in range(100_000):
            consumed += 1
            yield i

    total = 0
    for i, r in enumerate(master.map(lambda x: x + 1, source())):
        total += r
        max_ahead = max(max_ahead, consumed - i)
    assert total == sum(range(1, 100_001))
    # the input is read a bounded window ahead, not all at once: at most the
    # job's window (4 batches of the largest size per worker) plus the
    # results being handed out
    window = 4 * master.workers * Chunking().cap
    assert max_ahead <= 2 * window < 100_000, max_ahead


def test_unread_map_results_do_not_pull_the_whole_input(master):
    consumed = 0

    def source():
        nonlocal consumed
        for i in range(1_000_000):
            consumed += 1
            yield i

    done = []
    sub = master.events.subscribe(lambda e: done.extend(e.tasks) if isinstance(e, TasksChanged)
                                  and e.state is TaskState.DONE else None)
    it = master.map(lambda x: x, source())
    assert next(it) == 0
    # A slow consumer: once every item read has run, the window is full
    # and the master reads no more (it must not read ahead unboundedly).
    _wait_for(lambda: len(done) >= consumed > 1, "the items read to run")
    sub.close()
    assert consumed <= 2 * 4 * master.workers * Chunking().cap, consumed
    it.close()


# --- batches sent ahead: pending until their worker starts them --------------------------------

def mark_and_wait(x, folder):
    """Leaves a file per task that really started, then waits for the gate
    file "go" (never a fixed sleep: on a loaded machine a task must not end
    before the test has looked)."""
    open(os.path.join(folder, f"started-{x}"), "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(folder, "go")):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate never opened")
        time.sleep(0.01)
    return x


def test_tasks_sent_ahead_are_pending_and_cancelling_them_stops_nothing(tmp_path):
    folder = str(tmp_path)
    with Master("local", workers=2) as m:
        job = m.map_async(mark_and_wait, range(12), [folder] * 12, chunksize=1)
        seen_running = []

        def settled():
            seen_running.append(job.counts()["running"])
            return seen_running[-1] == 2 and any(t.dispatched for t in list(job.tasks))
        wait_until(settled, 60, "both workers running a task, one sent ahead")
        # Each worker has one task running.  A worker that took work with
        # no other worker idle or starting was also sent its next task
        # ahead, which is still pending: the one that took work last, and
        # on a loaded machine (both took work before either looked) both.
        running = [t for t in job.tasks if t.state is TaskState.RUNNING]
        assert len(running) == 2 and len({t.worker for t in running}) == 2
        assert all(t.started is not None and t.finished is None and t.attempts == 1 for t in running)
        ahead = [t for t in job.tasks if t.dispatched]
        assert 1 <= len(ahead) <= 2 and all(t.state is TaskState.PENDING for t in ahead)
        assert len({t.worker for t in ahead}) == len(ahead)  # (at most one behind each batch)
        assert {t.worker for t in ahead} <= {t.worker for t in running}
        pids = {p.pid for p in worker_processes()}
        assert job.cancel(stop_running=False) == 10  # the ones sent ahead among them
        open(os.path.join(folder, "go"), "w").close()
        assert job.wait(timeout=60)
        counts = job.counts()
        assert counts["done"] == 2 and counts["cancelled"] == 10
        # the tasks sent ahead were skipped by their workers, not run
        started = sorted(int(name.split("-")[1]) for name in os.listdir(folder)
                         if name.startswith("started-"))
        assert started == sorted(t.index for t in running)
        assert {p.pid for p in worker_processes()} == pids  # nobody was stopped
        assert max(seen_running) <= 2
        # the workers go on with the next job at once
        assert m.map_async(abs, [-1, -2, -3]).result(timeout=30) == [1, 2, 3]


def test_a_batch_sent_ahead_to_a_killed_worker_is_requeued_uncharged(tmp_path):
    marker = str(tmp_path / "killed")
    with Master("local", workers=1, retries=1) as m:
        job = m.map_async(kill_self_once, [3, 4, 5], [marker] * 3, chunksize=1)
        assert job.result(timeout=60) == [30, 40, 50]
        # task 0 (x == 3) killed its worker while task 1 waited behind it
        assert [t.attempts for t in job.tasks] == [2, 1, 1]


def test_running_counts_never_exceed_the_workers_on_single_task_batches():
    with Master("local", workers=2) as m:
        peak = 0
        job = m.map_async(time.sleep, [0.05] * 40, chunksize=1)
        while not job.done():
            peak = max(peak, job.counts()["running"])
            time.sleep(0.005)
        assert job.result(timeout=60) == [None] * 40
        assert 1 <= peak <= 2


def test_workers_that_cannot_start_fail_every_task_clearly_and_never_hang():
    from pymw_magic.backends.pool import WorkerStartError
    with Master("local", workers=1, python="/bin/false") as m:
        with pytest.raises(WorkerStartError, match="ended before it was ready.*exit status 1"):
            m.submit(abs, -1).result(timeout=60)
        # what comes after fails at once too, rather than wait for workers that never come
        with pytest.raises(WorkerStartError):
            m.submit(abs, -2).result(timeout=30)
        job = m.map_async(abs, [1, 2, 3])
        assert job.wait(timeout=30) and job.counts()["failed"] == 3


def _explode_in_master():
    if os.environ.get("PYMW_TEST_IN_MASTER"):
        raise RuntimeError("cannot rebuild this here")
    return "rebuilt"


class _LoadsOnlyInWorkers:
    def __reduce__(self):
        return (_explode_in_master, ())


def _tricky(x):
    return _LoadsOnlyInWorkers() if x == 3 else x


def test_one_result_the_master_cannot_load_fails_alone_not_its_batch(master, monkeypatch):
    monkeypatch.setenv("PYMW_TEST_IN_MASTER", "1")   # (set after the workers started)
    job = master.map_async(_tricky, range(6), chunksize=6)
    results = job.result(timeout=60, return_exceptions=True)
    from pymw_magic import PayloadError
    assert isinstance(results[3], PayloadError) and "could not be unpickled in the master" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    assert all(t.attempts == 1 for t in job.tasks if t.index != 3)   # re-run alone, uncharged
