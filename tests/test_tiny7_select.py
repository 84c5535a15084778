"""The scheduler pops a batch of one job's tasks without looking at each
task when nothing queued can need it; when something can — tasks to run
alone after a worker was lost, a second job, retries — every batch is
still checked: suspects run alone, batches of two jobs are told so.

A real backend of the batch family (each batch runs in a thread, through
the scheduler's public interface) that reports its first batch of several
tasks lost with no culprit known: each of those tasks must then run alone."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pymw_magic import Master
from pymw_magic.backends import register_backend
from pymw_magic.backends.base import Backend
from pymw_magic.payload import loads


class LosingBackend(Backend):
    """Runs each batch in its serving thread; the first batch of more than
    one task is reported lost (its worker "died", which task it ran unknown)."""

    name = "tiny7-losing"
    family = "batch"
    batches: list[list[int]] = []      # the task indexes of each batch run
    kinds: list[tuple[bool, int]] = []  # each batch's single_job, and its count of jobs
    lost_first: list[int] = []

    def __init__(self, scheduler: Any, workers: int, key: bytes, **options: Any):
        super().__init__(scheduler, workers, key, **options)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @classmethod
    def settle_workers(cls, requested: int | None, options: dict[str, Any]) -> int:
        return requested or 1

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._serve, args=(f"w{i}",), daemon=True)
            t.start()
            self._threads.append(t)

    #: each serving thread waits for it before its first take
    gate = threading.Event()

    def _serve(self, name: str) -> None:
        sched = self.scheduler
        sched.worker_started(name, "here")
        fns: dict[int, Any] = {}
        if not LosingBackend.gate.wait(60):
            return
        while not self._stop.is_set():
            batch = sched.take(name, block=True, timeout=0.5)
            if batch is None:
                if sched.closed:
                    return
                continue
            with self._lock:
                lose = not LosingBackend.lost_first and len(batch.tasks) > 1
                if lose:
                    LosingBackend.lost_first[:] = [t.index for t in batch.tasks]
                else:
                    LosingBackend.batches.append([t.index for t in batch.tasks])
                    LosingBackend.kinds.append((batch.single_job, len({id(t.job) for t in batch.tasks})))
            if lose:
                sched.lost([batch], None, "died", "lost on purpose")
                continue
            t_start = sched.clock()
            values, ends = [], []
            for task in batch.tasks:
                fn = fns.get(task.fn.id)
                if fn is None:
                    fn = fns[task.fn.id] = loads(task.fn.data)
                values.append(fn(*task.args))
                ends.append(sched.clock())
            sched.completed(batch, t_start, ends, values, {}, {})

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        self.scheduler.close()
        for t in self._threads:
            t.join(timeout=None if wait else 5)

    def stop_workers(self, names: set[str]) -> None:
        pass

    def worker_info(self) -> list[dict[str, Any]]:
        return [{"name": f"w{i}", "host": "here"} for i in range(self.workers)]


@pytest.fixture(autouse=True)
def registered():
    register_backend(LosingBackend.name, f"{__name__}:LosingBackend")
    LosingBackend.batches.clear()
    LosingBackend.kinds.clear()
    LosingBackend.lost_first.clear()
    LosingBackend.gate.set()


@pytest.mark.parametrize("trial", range(5))
def test_tasks_of_a_lost_batch_of_one_job_then_run_alone(trial):
    # (a random policy puts them back among the others: most are not the
    # first task of the batch they are popped into)
    with Master(LosingBackend.name, workers=2, policy="random") as m:
        job = m.map_async(triple, range(200), chunksize=16)
        assert job.result(timeout=60) == [3 * i for i in range(200)]
    suspects = set(LosingBackend.lost_first)
    assert len(suspects) == 16
    for indexes in LosingBackend.batches:
        if suspects & set(indexes):
            assert len(indexes) == 1, indexes   # a suspect never shares a batch
    ran = sorted(i for b in LosingBackend.batches for i in b)
    assert ran == list(range(200))
    assert all(t.attempts == 1 for t in job.tasks)   # nobody was charged


def test_two_jobs_in_one_queue_still_make_batches_of_one_job_each():
    with Master(LosingBackend.name, workers=2) as m:
        LosingBackend.lost_first.append(-1)   # (nothing lost here)
        a = m.map_async(triple, range(300), chunksize=32)
        b = m.map_async(triple, range(300, 600), chunksize=32)
        assert a.result(timeout=60) == [3 * i for i in range(300)]
        assert b.result(timeout=60) == [3 * i for i in range(300, 600)]
        assert a.counts()["done"] == b.counts()["done"] == 300
    for indexes in LosingBackend.batches:
        assert len(indexes) <= 32
    # a batch says truly whether it holds one job's tasks (the pool sends
    # one function for such a batch)
    assert all(single == (jobs == 1) for single, jobs in LosingBackend.kinds)
    assert sorted(i for bt in LosingBackend.batches for i in bt) == sorted(list(range(300)) * 2)


@pytest.mark.parametrize("trial", range(3))
def test_tasks_cancelled_in_the_queue_behind_live_ones_never_run(trial):
    LosingBackend.gate.clear()   # (nothing taken until both jobs are queued and one cancelled)
    LosingBackend.lost_first.append(-1)
    with Master(LosingBackend.name, workers=1) as m:
        a = m.map_async(triple, range(30), chunksize=50)
        b = m.map_async(triple, range(100), chunksize=50)
        assert a.counts()["pending"] == 30 and b.counts()["pending"] == 100
        assert b.cancel() == 100
        LosingBackend.gate.set()
        assert a.result(timeout=60) == [3 * i for i in range(30)]
        assert b.wait(timeout=60)
        assert b.counts()["cancelled"] == 100 and a.counts()["done"] == 30
    assert all(t.state.value == "cancelled" and t.attempts == 0 and t.worker is None for t in b.tasks)
    assert LosingBackend.batches == [list(range(30))]   # B's tasks were never handed out
    assert LosingBackend.kinds == [(True, 1)]


def triple(x):
    return 3 * x
