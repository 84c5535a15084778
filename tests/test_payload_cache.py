"""The master's function cache: unique ids under concurrent submits, a
bounded size, and workers that forget what the master's cache dropped."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from pymw_magic import Master
from pymw_magic.payload import FunctionCache, WorkerFunctions, loads


@pytest.fixture
def busy_switching():
    """Threads switch as often as the interpreter allows: races show."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _tagged(tag):
    def fn():
        return tag
    return fn


def _run_threads(targets, timeout=60):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time"


def test_concurrent_gets_give_distinct_functions_distinct_ids(busy_switching):
    threads, trials = 8, 200
    clashes = []
    for trial in range(trials):
        cache = FunctionCache()
        fns = [_tagged((trial, i)) for i in range(threads)]
        got = [None] * threads
        barrier = threading.Barrier(threads)

        def work(i):
            barrier.wait(timeout=30)
            got[i] = cache.get(fns[i])

        _run_threads([lambda i=i: work(i) for i in range(threads)])
        ids = [fp.id for fp in got]
        if len(set(ids)) != threads:
            clashes.append((trial, ids))
        # each payload is its own function's
        assert [loads(fp.data)() for fp in got] == [(trial, i) for i in range(threads)]
    assert clashes == []


def test_concurrent_submits_each_run_their_own_function(busy_switching):
    threads, trials = 8, 200
    wrong = []
    with Master("local", workers=2) as m:
        for trial in range(trials):
            barrier = threading.Barrier(threads)
            out = [None] * threads

            def work(i, trial=trial):
                barrier.wait(timeout=30)
                out[i] = m.submit(_tagged((trial, i))).result(timeout=60)

            _run_threads([lambda i=i: work(i) for i in range(threads)], timeout=120)
            if out != [(trial, i) for i in range(threads)]:
                wrong.append((trial, out))
    assert wrong == []


def _capturing(big, extra):
    def fn(x):
        return float(big[0]) + extra["n"] + x
    return fn


def test_the_cache_is_bounded_by_bytes_and_keeps_the_newest():
    cache = FunctionCache(max_entries=100, max_bytes=10 << 20)
    big = np.ones(2 * 1024 * 1024 // 8)           # 2 MB
    extra = {"n": 0}
    fn = _capturing(big, extra)
    seen = []
    for n in range(50):
        extra["n"] = n                            # a changing dict: pickled afresh each time
        fp = cache.get(fn)
        seen.append(fp)
        assert cache.nbytes <= 10 << 20
        assert len(cache) <= 5
        assert loads(fp.data)(1) == 1.0 + n + 1
    assert len({fp.id for fp in seen}) == 50
    assert not seen[-1].retired                   # the newest stays
    assert all(fp.retired for fp in seen[:-5])    # the oldest were dropped
    # a payload the cache dropped still works for the job that holds it
    assert loads(seen[0].data)(0) == 1.0


def test_the_cache_is_bounded_by_count():
    cache = FunctionCache(max_entries=16)
    fps = [cache.get(_tagged(i)) for i in range(1000)]
    assert len(cache) == 16
    assert len({fp.id for fp in fps}) == 1000
    assert sum(not fp.retired for fp in fps) == 16
    assert [fp.id for fp in fps if not fp.retired] == [fp.id for fp in fps[-16:]]


def test_a_cached_function_is_reused_until_dropped():
    cache = FunctionCache(max_entries=2)
    keep = _tagged("keep")
    first = cache.get(keep)
    assert cache.get(keep) is first
    cache.get(_tagged(1))
    assert cache.get(keep) is first               # recently used: still there
    cache.get(_tagged(2))
    cache.get(_tagged(3))
    assert first.retired
    again = cache.get(keep)
    assert again is not first and again.id > first.id and not again.retired


def test_worker_functions_forgets_retired_payloads_and_sends_them_again():
    cache = FunctionCache(max_entries=2)
    a, b, c = (cache.get(_tagged(t)) for t in "abc")   # a is dropped by c
    assert a.retired and not b.retired and not c.retired
    held = WorkerFunctions()
    plan = held.plan({a.id: a})
    assert plan[:2] == ([a.id], [])
    held.commit({a.id: a}, plan)
    plan = held.plan({a.id: a})                     # a job still running with a: kept, not resent
    assert plan[:2] == ([], [])
    held.commit({a.id: a}, plan)
    plan = held.plan({b.id: b})                     # a batch without a: the worker forgets it
    assert plan[:2] == ([b.id], [a.id])
    held.commit({b.id: b}, plan)
    assert set(held.held) == {b.id}
    plan = held.plan({a.id: a})                     # a's job sends another batch: sent again
    assert plan[:2] == ([a.id], [])


def _worker_rss(m):
    return sum(psutil.Process(w["pid"]).memory_info().rss for w in m.worker_info())


def test_workers_memory_stays_bounded_over_many_submits(monkeypatch):
    monkeypatch.setattr(FunctionCache, "MAX_BYTES", 8 << 20)
    big = np.ones(2 * 1024 * 1024 // 8)
    extra = {"n": 0}
    fn = _capturing(big, extra)
    with Master("local", workers=1) as m:
        for n in range(5):
            extra["n"] = n
            assert m.submit(fn, 1).result(timeout=60) == 2.0 + n
        before = _worker_rss(m)
        for n in range(5, 80):
            extra["n"] = n
            assert m.submit(fn, 1).result(timeout=60) == 2.0 + n
        grown = _worker_rss(m) - before
    # 75 payloads of 2 MB, each also unpickled: 300 MB if the worker kept them
    assert grown < 40 << 20, f"the worker grew by {grown / 2**20:.0f} MB"


def _gated(gate):
    def block(x):
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
        return x
    return block


def _doubler(tag):
    def double(x):
        return (tag, 2 * x)
    return double


def test_a_running_job_whose_function_the_cache_dropped_still_runs(monkeypatch, tmp_path):
    """The worker is told to forget the running job's function (the cache
    keeps one payload) and gets it again for the job's later tasks."""
    monkeypatch.setattr(FunctionCache, "MAX_ENTRIES", 1)
    gate = str(tmp_path / "gate")
    with Master("local", workers=1, policy="lifo") as m:
        assert m.submit(_doubler("warm-up"), 0).result(timeout=60) == ("warm-up", 0)
        pids = [w["pid"] for w in m.worker_info()]
        blocker = m.submit(_gated(gate), 0)               # holds the worker
        job = m.map_async(_doubler("a"), range(6), chunksize=1)
        others = [m.submit(_doubler(i), i) for i in range(4)]   # newer: run before the job's
        open(gate, "w").close()
        assert blocker.result(timeout=60) == 0
        assert [f.result(timeout=60) for f in others] == [(i, 2 * i) for i in range(4)]
        assert job.result(timeout=60) == [("a", 2 * x) for x in range(6)]
        assert [w["pid"] for w in m.worker_info()] == pids   # no worker was lost on the way
