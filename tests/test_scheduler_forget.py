"""Scheduler.forget_worker: a batch backend names a fresh worker per chunk
and forgets it once the chunk is done, so a job of thousands of chunks
leaves the scheduler's per-worker maps at a constant size.

The backend here drives the scheduler as the batch family does (take under
a fresh name, not started, then worker_started/start when the "engine" runs
it, completed, forget_worker) and runs the tasks for real in its pump
thread; nothing is mocked."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest

from conftest import wait_until
from pymw_magic import Master
from pymw_magic.backends import register_backend
from pymw_magic.backends.base import Backend
from test_scheduler_interface import run_tasks  # (a batch run here, as a worker runs it)
from pymw_magic.scheduler import SchedulerHooks

#: the scheduler's per-worker maps (what forget_worker must keep bounded)
MAPS = ("_started", "worker_hosts", "_in_hand", "tasks_per_worker", "_wake", "_waiting",
        "_claimed", "_handed")


def map_sizes(sched: Any) -> dict[str, int]:
    with sched.cond:
        return {name: len(getattr(sched, name)) for name in MAPS}


class ChunkBackend(Backend):
    """One fresh worker name per chunk, as the batch family names its procs."""

    name = "chunk-batch"
    family = "batch"
    forget = True          # the class under test; False: the control run
    pump = True            # False: no pump thread (the test takes work itself)
    samples: list[dict[str, int]] = []

    def __init__(self, scheduler: Any, workers: int, key: bytes, **options: Any):
        super().__init__(scheduler, workers, key, **options)
        self._stop = threading.Event()
        self._names = itertools.count()
        self._thread: threading.Thread | None = None
        self.chunks = 0

    @classmethod
    def settle_workers(cls, requested: int | None, options: dict[str, Any]) -> int:
        return requested or 1

    def scheduler_hooks(self) -> SchedulerHooks:
        return SchedulerHooks()

    def start(self) -> None:
        for i in range(self.workers):
            self.scheduler.worker_started(f"{self.name}-{i}", None)
        if type(self).pump:
            self._thread = threading.Thread(target=self._pump, daemon=True)
            self._thread.start()

    def _pump(self) -> None:
        sched = self.scheduler
        fns: dict[int, Any] = {}
        while not self._stop.is_set():
            name = f"{self.name}#{next(self._names)}"
            batch = sched.take(name, block=False, start=False)
            if batch is None:
                sched.wait_for_work(0.2)
                continue
            sched.worker_started(name, f"node{self.chunks % 7}")
            sched.start(batch)
            values, ends, failures = run_tasks(batch, fns, sched.clock)
            sched.completed(batch, ends[0], ends, values, failures, {})
            if type(self).forget:
                sched.forget_worker(name)
            self.chunks += 1
            if self.chunks % 1000 == 0:
                type(self).samples.append(map_sizes(sched))

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        self.scheduler.close()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def stop_workers(self, names: set[str]) -> None:
        pass

    def worker_info(self) -> list[dict[str, Any]]:
        return []


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_backend("chunk-batch", f"{__name__}:ChunkBackend")


def square(x):
    return x * x


def run_chunks(n: int, forget: bool) -> tuple[list[dict[str, int]], Master]:
    ChunkBackend.forget = forget
    ChunkBackend.samples = []
    with Master("chunk-batch", workers=2) as m:
        job = m.map_async(square, range(n), chunksize=1)
        assert job.result(timeout=300) == [x * x for x in range(n)]
    return ChunkBackend.samples, m


def test_a_10000_chunk_job_leaves_the_per_worker_maps_at_constant_size():
    samples, m = run_chunks(10_000, forget=True)
    assert len(samples) == 10
    # the same size after 1,000 chunks as after 10,000, and small
    assert samples[0] == samples[-1], samples
    assert all(v <= 10 for v in samples[-1].values()), samples[-1]
    # every task still counted, under the hosts that ran them
    per = m.tasks_per_worker
    assert sum(per.values()) == 10_000
    assert set(per) == {f"node{i}" for i in range(7)}


def test_without_forget_worker_the_maps_grow():
    # the control: what the test above would see if forget_worker did nothing
    samples, _ = run_chunks(3_000, forget=False)
    assert samples[-1]["_started"] > samples[0]["_started"] >= 1000


def test_forget_worker_is_idempotent_and_ignores_unknown_names():
    with Master("chunk-batch", workers=1) as m:
        sched = m._scheduler
        before = map_sizes(sched)
        sched.forget_worker("never-seen")
        sched.forget_worker("never-seen")
        assert map_sizes(sched) == before
        sched.worker_started("w", "h")
        with sched.cond:
            sched.tasks_per_worker["w"] += 3
        sched.forget_worker("w")
        sched.forget_worker("w")
        assert m.tasks_per_worker == {"h": 3}
        assert "w" not in sched._started and "w" not in sched.worker_hosts


def test_a_worker_waiting_in_take_keeps_its_wakeup_and_still_gets_work():
    # forget_worker on a name still blocked in take(): it must still be woken
    ChunkBackend.pump = False
    try:
        with Master("chunk-batch", workers=1) as m:
            sched = m._scheduler
            got: list[Any] = []

            def waiter():
                got.append(sched.take("live", block=True, timeout=60))

            t = threading.Thread(target=waiter, daemon=True)
            t.start()
            wait_until(lambda: "live" in sched._waiting, timeout=30)
            sched.forget_worker("live")
            assert "live" in sched._wake
            fut = m.submit(square, 4)
            t.join(timeout=60)
            assert not t.is_alive()
            batch = got[0]
            assert batch is not None and [task.args for task in batch.tasks] == [(4,)]
            now = sched.clock()
            sched.completed(batch, now, [now], [16], {}, {})
            assert fut.result(timeout=60) == 16
    finally:
        ChunkBackend.pump = True


def test_forget_worker_from_many_threads_while_a_job_runs():
    # hostile: forget names, seen or not, from 8 threads while chunks run
    ChunkBackend.forget = True
    ChunkBackend.samples = []
    with Master("chunk-batch", workers=2) as m:
        sched = m._scheduler
        stop = threading.Event()
        errors: list[BaseException] = []

        def hammer(k):
            i = 0
            while not stop.is_set():
                try:
                    sched.forget_worker(f"chunk-batch#{(i * 8 + k) % 3000}")
                    sched.forget_worker(f"chunk-batch-{k % 2}-nope")
                except BaseException as exc:  # pragma: no cover - the failure we look for
                    errors.append(exc)
                    return
                i += 1

        threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(8)]
        for t in threads:
            t.start()
        try:
            job = m.map_async(square, range(3000), chunksize=1)
            assert job.result(timeout=300) == [x * x for x in range(3000)]
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not errors
        assert sum(m.tasks_per_worker.values()) == 3000
