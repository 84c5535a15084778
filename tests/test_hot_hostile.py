"""Hostile review of the tiny-task hot path and the shared-memory frames:
the map iterator closes like a generator even before its first result and
its timeout counts from the call; task reuse across concurrent maps; the
transport's MAC over segments sent in steps."""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import TimeoutError as FuturesTimeout

import pytest

from pymw_magic import Master

from conftest import wait_until


def square(x):
    return x * x


def nap(x):
    time.sleep(x)
    return x


def _shutdown_within(m: Master, seconds: float) -> bool:
    """Shut ``m`` down from a thread; True if that ended within ``seconds``
    (terminated otherwise, so no worker outlives the test)."""
    t = threading.Thread(target=m.shutdown, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        m.terminate()
        t.join(30)
        return False
    return True


@pytest.mark.parametrize("how", ["close", "drop"])
def test_a_map_left_before_its_first_result_cancels_its_job(how):
    # A long map whose window fills and is never read: closing or dropping
    # its iterator must cancel the job, or shutdown waits for it for ever.
    for trial in range(3):
        m = Master("local", workers=2)
        it = m.map(square, range(100_000))
        if how == "close":
            it.close()
            assert list(it) == []
        del it
        gc.collect()
        assert _shutdown_within(m, 60), f"trial {trial}: shutdown hung on the abandoned map"


def test_a_map_closed_before_its_first_result_from_threads():
    m = Master("local", workers=2)
    try:
        its = [m.map(square, range(50_000)) for _ in range(8)]
        threads = [threading.Thread(target=it.close) for it in its]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        for it in its:
            assert next(it, "end") == "end"
    finally:
        assert _shutdown_within(m, 60), "shutdown hung on the closed maps"


def test_map_timeout_counts_from_the_call():
    with Master("local", workers=1) as m:
        t0 = time.monotonic()
        it = m.map(nap, [60.0], timeout=6.0)
        wait_until(lambda: time.monotonic() - t0 > 6.2, what="the map's timeout to pass")
        t1 = time.monotonic()
        with pytest.raises(FuturesTimeout):
            next(it)
        # (before: the deadline counted from the first next(), 6 s more;
        # the margin is for a loaded machine)
        assert time.monotonic() - t1 < 5


def test_a_map_closed_from_another_thread_while_one_waits_in_it_cancels_the_job():
    from concurrent.futures import CancelledError
    with Master("local", workers=2) as m:
        for trial in range(3):
            it = m.map(nap, [0.0] + [120.0] * 4)
            assert next(it) == 0.0
            out: list = []

            def consume():
                try:
                    out.append(next(it))
                except BaseException as exc:   # (what the waiting thread got)
                    out.append(exc)

            waiter = threading.Thread(target=consume)
            waiter.start()
            wait_until(lambda: it._runs.gi_running, what="the consumer to wait in the iterator")
            it.close()   # (raised ValueError: generator already executing, and cancelled nothing)
            waiter.join(60)
            assert not waiter.is_alive(), f"trial {trial}: the waiting thread was not woken"
            assert len(out) == 1 and isinstance(out[0], CancelledError), out
            assert next(it, "end") == "end"


def test_a_master_kept_after_shutdown_holds_no_spare_tasks():
    # A job or a dashboard may keep a master long after its shutdown: its
    # spare tasks (up to SPARE_TASKS, ~10 MB) must not stay with it.
    import tracemalloc
    kept = []
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            with Master("local", workers=2) as m:
                assert list(m.map(square, range(60_000))) == [x * x for x in range(60_000)]
            kept.append(m)
            gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 3 * (1 << 20), f"{held >> 10} KiB held by 3 shut-down masters"
    terminated = Master("local", workers=1)
    assert list(terminated.map(square, range(20_000)))[-1] == 19_999 ** 2
    terminated.terminate()
    assert not terminated._spare_tasks


def test_a_map_collected_in_a_cycle_on_a_thread_inside_the_scheduler_lock_cancels_once_it_is_let_go():
    # The cyclic collector runs finalizers on whichever thread allocates:
    # one inside the scheduler's lock, mid-update. The abandoned map's
    # cancel must not change the scheduler's state under that thread's feet.
    with Master("local", workers=1) as m:
        it = m.map(nap, [0.02] * 500)
        job = it._job
        cycle: list = [it]
        cycle.append(cycle)
        del it
        with m._scheduler.cond:
            del cycle
            assert gc.collect() > 0
            assert job.counts()["cancelled"] == 0   # not while the lock is held
        wait_until(lambda: job.done() and job.counts()["cancelled"] > 0, timeout=60,
                   what="the collected map's job cancelled")
