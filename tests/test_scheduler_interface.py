"""A backend of a third family uses the scheduler through its declared
hooks and public methods only: here a real one that runs each batch in a
thread of its own (as a batch system runs a submitted job), with its own
clock.  Tasks run for real; nothing is mocked."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pymw_magic import Master
from pymw_magic.backends import register_backend
from pymw_magic.backends.base import Backend
from pymw_magic.payload import loads
from pymw_magic.scheduler import SchedulerHooks
from pymw_magic.worker import describe_failure

TICKS = iter(range(10**9))

def run_tasks(batch, fns: dict, clock) -> tuple[list, list, dict]:
    """Run a batch's tasks here, as a worker does: (values, end times,
    failures by index); ``fns`` caches the unpickled functions."""
    values, ends, failures = [], [], {}
    for i, task in enumerate(batch.tasks):
        fn = fns.get(task.fn.id)
        if fn is None:
            fn = fns[task.fn.id] = loads(task.fn.data)
        try:
            values.append(fn(*task.args, **task.kwargs))
        except Exception as exc:
            values.append(None)
            failures[i] = describe_failure(exc)
        ends.append(clock())
    return values, ends, failures



def ticking_clock() -> float:
    """A clock of the backend's own (whole seconds since it started)."""
    return float(next(TICKS))


class ThreadBatchBackend(Backend):
    """Each batch the scheduler hands out runs as one 'job' in its own thread."""

    name = "thread-batch"
    family = "batch"

    def __init__(self, scheduler: Any, workers: int, key: bytes, **options: Any):
        super().__init__(scheduler, workers, key, **options)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stopped: list[set[str]] = []

    @classmethod
    def settle_workers(cls, requested: int | None, options: dict[str, Any]) -> int:
        return 3  # the "queue" runs three jobs at a time, whatever was asked

    def scheduler_hooks(self) -> SchedulerHooks:
        return SchedulerHooks(stop_workers=self.stop_workers, clock=ticking_clock)

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._serve, args=(f"slot-{i}",), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, name: str) -> None:
        sched = self.scheduler
        sched.worker_started(name, "batch-host")
        fns: dict[int, Any] = {}
        while not self._stop.is_set():
            batch = sched.take(name, block=True, timeout=0.5)
            if batch is None:
                if sched.closed:
                    return
                continue
            t_start = ticking_clock()
            values, ends, failures = run_tasks(batch, fns, ticking_clock)
            sched.completed(batch, t_start, ends, values, failures, {})

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        self.scheduler.close()
        for t in self._threads:
            t.join(timeout=None if wait else 5)

    def stop_workers(self, names: set[str]) -> None:
        self.stopped.append(names)

    def worker_info(self) -> list[dict[str, Any]]:
        return [{"name": f"slot-{i}", "host": "batch-host"} for i in range(self.workers)]


class Boom(Exception):
    pass


def boom_on_3(x):
    if x == 3:
        raise Boom("three")
    return x * 10


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_backend("thread-batch", f"{__name__}:ThreadBatchBackend")


def test_a_batch_family_backend_runs_jobs_through_the_public_interface():
    with Master("thread-batch", workers=8, policy="round-robin") as m:
        assert m.workers == 3 and m.options["workers"] == 3
        job = m.map_async(boom_on_3, range(12), chunksize=2)
        out = job.result(timeout=60, return_exceptions=True)
        assert isinstance(out[3], Boom)
        assert [v for i, v in enumerate(out) if i != 3] == [i * 10 for i in range(12) if i != 3]
        assert all(t.host == "batch-host" for t in job.tasks)
        # stamps come from the backend's clock
        assert all(float(t.submitted).is_integer() and float(t.started).is_integer() for t in job.tasks)
        assert [f.result(timeout=60) for f in [m.submit(boom_on_3, i) for i in (1, 2)]] == [10, 20]
