"""The Master keeps the concurrent.futures contract under real use:
submits from many threads, done-callbacks that raise or block, input
generators that block, shutdown twice or without waiting, interpreter
exit, and memory over many jobs.  Real worker processes throughout."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import psutil
import pytest

from pymw_magic import Master
from pymw_magic.errors import ShutDownError
from conftest import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def square(x):
    return x * x


def make_fn(k):
    """A distinct function per ``k`` (its own payload)."""
    def fn(x):
        return (k, x)
    fn.__name__ = fn.__qualname__ = f"fn_{k}"
    return fn


# --- concurrent submits ---------------------------------------------------------------------
def test_concurrent_submits_of_different_functions_get_their_own_results(fast_switching):
    """8 threads, each submitting its own functions at once, many trials:
    every result is its own function's (no two functions share a payload id)."""
    with Master("local", workers=2) as m:
        for trial in range(100):
            barrier = threading.Barrier(8)
            out: dict[int, list] = {}

            def run(t):
                barrier.wait(timeout=30)
                fs = [(k, m.submit(make_fn(trial * 100 + t * 10 + k), k)) for k in range(3)]
                out[t] = [(k, f.result(timeout=60)) for k, f in fs]

            threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=120)
                assert not th.is_alive()
            for t in range(8):
                assert out[t] == [(k, (trial * 100 + t * 10 + k, k)) for k in range(3)], (trial, t)


def test_submits_racing_shutdown_are_each_accepted_and_run_or_refused(fast_switching):
    """Threads submit the same function to a fresh master while it shuts
    down: each submit either raises RuntimeError at once or its Future is
    done when shutdown(wait=True) returns (no orphaned job)."""
    for trial in range(25):
        m = Master("local", workers=2)
        barrier = threading.Barrier(9)
        futures: list[cf.Future] = []
        refused = []
        lock = threading.Lock()

        def run(t):
            fn = make_fn(t) if t % 2 else square  # (new jobs, and one job shared)
            barrier.wait(timeout=30)
            for i in range(6):
                try:
                    f = m.submit(fn, i)
                except RuntimeError as exc:
                    assert "after shutdown" in str(exc)
                    with lock:
                        refused.append(i)
                    continue
                with lock:
                    futures.append(f)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        barrier.wait(timeout=30)
        if trial % 2:
            time.sleep(0.001 * (trial % 5))  # (a varying head start for the submitters)
        m.shutdown(wait=True)
        for th in threads:
            th.join(timeout=60)
            assert not th.is_alive()
        assert len(futures) + len(refused) == 48
        pending = [f for f in futures if not f.done()]
        assert not pending, f"trial {trial}: {len(pending)} accepted futures left pending by shutdown"
        assert all(f.result(timeout=0) in {i * i for i in range(6)} | {(t, i) for t in range(8) for i in range(6)}
                   for f in futures)


def test_terminate_cancels_every_submit_from_many_threads(fast_switching):
    """Concurrent submits (first submit of each function included) are
    all known to terminate(): none is left pending."""
    for trial in range(15):
        m = Master("local", workers=1)
        barrier = threading.Barrier(8)
        futures: list[cf.Future] = []
        lock = threading.Lock()

        def run(t):
            barrier.wait(timeout=30)
            fn = make_fn(t)
            for i in range(5):
                f = m.submit(fn, i)
                with lock:
                    futures.append(f)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
            assert not th.is_alive()
        m.terminate()
        done, not_done = cf.wait(futures, timeout=30)
        assert not not_done, f"trial {trial}: {len(not_done)} futures never ended after terminate()"


# --- callbacks ----------------------------------------------------------------------------
def test_raising_done_callback_is_logged_and_breaks_no_other_job(caplog):
    """A job's done-callback that raises is logged; tasks of another job,
    in flight on the same worker, are not taken for a dead worker's."""
    caplog.set_level(logging.ERROR, logger="pymw_magic")
    with Master("local", workers=1) as m:
        for trial in range(8):
            other = [m.submit(square, i) for i in range(30)]
            job = m.map_async(square, range(3), chunksize=1)
            job.add_done_callback(lambda j: 1 / 0)
            more = [m.submit(square, i) for i in range(30)]
            assert job.result(timeout=60) == [0, 1, 4]
            for i, f in enumerate(other + more):
                assert f.result(timeout=60) == (i % 30) ** 2, f"trial {trial}: submit {i}"
        wait_until(lambda: sum("ZeroDivisionError" in r.getMessage() or
                               (r.exc_info and r.exc_info[0] is ZeroDivisionError)
                               for r in caplog.records) >= 8, 30, "the callbacks' errors logged")


def test_a_blocked_future_callback_stalls_no_other_worker():
    """A Future's done-callback blocks its thread: another job's tasks keep
    completing on the other worker meanwhile (the callback's wait ends
    early only if they do)."""
    release = threading.Event()
    entered = threading.Event()
    where = []

    def hold(_f):
        where.append(threading.current_thread())
        entered.set()
        if not release.wait(20):
            where.append("stalled")

    with Master("local", workers=2) as m:
        try:
            f = m.submit(time.sleep, 1.5)
            f.add_done_callback(hold)
            assert entered.wait(60)
            assert where[0] is not threading.main_thread()  # (run by a serving thread)
            job = m.map_async(square, range(40), chunksize=1)
            assert job.result(timeout=60) == [i * i for i in range(40)]
            other = m.submit(square, 3)
            assert other.result(timeout=60) == 9
        finally:
            release.set()
        assert f.result(timeout=30) is None
    assert "stalled" not in where, "the other worker waited for the callback"


def test_a_blocked_input_generator_stalls_no_other_job():
    """A job's input generator that blocks (under no lock) does not stop
    another job's tasks; once released, its job completes in order."""
    release = threading.Event()
    blocked = threading.Event()
    stalled = []

    def items():
        for i in range(100):
            if i == 70:
                blocked.set()
                if not release.wait(20):
                    stalled.append(i)
            yield i

    with Master("local", workers=2) as m:
        try:
            slow = m.map_async(square, items(), chunksize=1)
            assert blocked.wait(60)
            fast = m.map_async(square, range(30), chunksize=1)
            assert fast.result(timeout=60) == [i * i for i in range(30)]
            assert m.submit(square, 5).result(timeout=60) == 25
        finally:
            release.set()
        assert slow.result(timeout=60) == [i * i for i in range(100)]
    assert not stalled, "the other job waited for the generator"


# --- who gets woken -------------------------------------------------------------------------
def test_submit_to_an_idle_worker_is_not_stolen_by_threads_waiting_on_a_job():
    """Three threads in job.wait() of a long job, waiting since before the
    workers were up; a submit to the idle worker runs at once (a new task
    wakes a serving thread, never a waiter)."""
    for trial in range(3):
        with Master("local", workers=2) as m:
            long = m.map_async(time.sleep, [30], chunksize=1)
            waiters = [threading.Thread(target=long.wait, args=(90,), daemon=True) for _ in range(3)]
            for th in waiters:
                th.start()
            try:
                wait_until(lambda: long.counts()["running"] == 1 and len(m.worker_info()) == 2, 60,
                           "the long task to start and both workers to be up")
                t0 = time.monotonic()
                assert m.submit(square, trial).result(timeout=25) == trial * trial
                # (well before the long task's 30 s: it did not wait behind it)
                assert time.monotonic() - t0 < 20
            finally:
                long.cancel()
            for th in waiters:
                th.join(timeout=30)
                assert not th.is_alive()


# --- shutdown ------------------------------------------------------------------------------
def test_shutdown_nowait_then_wait_runs_every_queued_task():
    for trial in range(5):
        m = Master("local", workers=1)
        futures = [m.submit(square, i) for i in range(30)]
        job = m.map_async(square, range(50), chunksize=1)
        m.shutdown(wait=False)
        m.shutdown(wait=True)
        assert all(f.done() for f in futures), f"trial {trial}: queued futures left pending"
        assert [f.result(timeout=0) for f in futures] == [i * i for i in range(30)]
        assert job.done() and job.result(timeout=0) == [i * i for i in range(50)]


def test_shutdown_nowait_inside_with_block_still_runs_everything():
    with Master("local", workers=1) as m:
        futures = [m.submit(square, i) for i in range(20)]
        m.shutdown(wait=False)
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == [i * i for i in range(20)]


def test_terminate_racing_a_shutdown_without_wait_leaves_no_future_pending():
    for trial in range(5):
        m = Master("local", workers=1)
        futures = [m.submit(time.sleep, 0.05) for _ in range(20)]
        m.shutdown(wait=False)
        m.terminate()
        done, not_done = cf.wait(futures, timeout=60)
        assert not not_done, f"trial {trial}: {len(not_done)} futures left pending"
        for f in futures:
            if not f.cancelled():
                exc = f.exception(timeout=0)
                assert exc is None or isinstance(exc, (cf.CancelledError, ShutDownError)), exc


def _run_script(tmp_path, body, timeout=120):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body).format(root=ROOT, out=str(tmp_path)))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


SCRIPT_NOWAIT = """
import os, sys, time
sys.path.insert(0, {root!r})
from pymw_magic import Master

def write(i, folder):
    time.sleep(0.3)
    with open(os.path.join(folder, f"done-{{i}}"), "w") as f:
        f.write(str(i))
    return i

if __name__ == "__main__":
    m = Master("local", workers=2)
    for i in range(6):
        m.submit(write, i, {out!r})
    m.shutdown(wait=False)
    print("left the script")
"""


def test_shutdown_nowait_work_completes_before_the_interpreter_exits(tmp_path):
    proc = _run_script(tmp_path, SCRIPT_NOWAIT)
    assert proc.returncode == 0, proc.stderr
    assert "left the script" in proc.stdout
    assert sorted(p.name for p in tmp_path.glob("done-*")) == [f"done-{i}" for i in range(6)]


SCRIPT_FORGOT = """
import os, sys, time
sys.path.insert(0, {root!r})
from pymw_magic import Master

if __name__ == "__main__":
    m = Master("local", workers=2)
    futures = [m.submit(time.sleep, 60) for _ in range(4)]
    while len(m.worker_info()) < 2 or not futures[0].running():
        time.sleep(0.02)
    with open(os.path.join({out!r}, "pids"), "w") as f:
        f.write(" ".join(str(w["pid"]) for w in m.worker_info()))
"""


def test_a_script_that_never_shuts_down_exits_without_orphan_workers(tmp_path):
    t0 = time.monotonic()
    proc = _run_script(tmp_path, SCRIPT_FORGOT)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 60  # (terminated, not waited for: the tasks sleep 60 s)
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2

    def gone():
        return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in pids)

    wait_until(gone, 30, "the worker processes to exit")


# --- memory ----------------------------------------------------------------------------------
def big(i):
    return bytes(20_000_000) + bytes([i % 256])


def test_finished_jobs_dropped_by_the_caller_are_let_go():
    with Master("local", workers=2) as m:
        job = m.map_async(square, range(5))
        assert job.result(timeout=60) == [0, 1, 4, 9, 16]
        assert m.jobs == [job]
        ref = weakref.ref(job)
        del job
        gc.collect()
        assert ref() is None
        assert m.jobs == []
        running = m.map_async(time.sleep, [0.5])
        held = weakref.ref(running)
        del running
        gc.collect()
        assert held() is not None and m.jobs == [held()]  # unfinished: the master holds it
        held().wait(60)


def test_memory_stays_bounded_over_many_jobs_with_big_results():
    proc = psutil.Process()
    with Master("local", workers=2) as m:
        m.map_async(big, range(2)).result(timeout=120)  # warm up (buffers, imports)
        gc.collect()
        base = proc.memory_info().rss
        peak = base
        for _ in range(16):
            job = m.map_async(big, range(2))
            assert len(job.result(timeout=120)) == 2
            del job
            gc.collect()
            peak = max(peak, proc.memory_info().rss)
        # 16 jobs x 2 x 20 MB = 640 MB if kept; a few in transit at most
        assert peak - base < 200_000_000, f"RSS grew by {(peak - base) / 1e6:.0f} MB"
        assert len(m.jobs) <= 1


def test_raising_done_callback_on_mpi_leaves_the_ranks_serving(caplog):
    """On MPI a callback's error once broke the master for good (the rank
    was taken for dead and could not be replaced)."""
    pytest.importorskip("mpi4py", reason="the MPI backend needs pip install 'pymw-magic[mpi]'")
    caplog.set_level(logging.ERROR, logger="pymw_magic")
    with Master("mpi", workers=2) as m:
        for trial in range(4):
            other = [m.submit(square, i) for i in range(20)]
            job = m.map_async(square, range(3), chunksize=1)
            job.add_done_callback(lambda j: 1 / 0)
            assert job.result(timeout=60) == [0, 1, 4]
            assert [f.result(timeout=60) for f in other] == [i * i for i in range(20)], trial
        assert m.submit(square, 12).result(timeout=60) == 144
        assert sorted(w["name"] for w in m.worker_info()) == ["mpi-rank1", "mpi-rank2"]


def test_memory_stays_bounded_over_many_submits_with_big_results_dropped():
    proc = psutil.Process()
    with Master("local", workers=2) as m:
        assert len(m.submit(big, 0).result(timeout=120)) == 20_000_001  # warm up
        gc.collect()
        base = proc.memory_info().rss
        peak = base
        for i in range(30):
            assert len(m.submit(big, i).result(timeout=120)) == 20_000_001
            gc.collect()
            peak = max(peak, proc.memory_info().rss)
        # 30 x 20 MB = 600 MB if the task records kept them
        assert peak - base < 200_000_000, f"RSS grew by {(peak - base) / 1e6:.0f} MB"
