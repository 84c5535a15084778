"""Observers of job events only (``subscribe(tasks=False)``): they hear
every job start and end, and while nobody wants task events the scheduler
builds none (a job store listening to every master costs tiny tasks
nothing per batch)."""

from __future__ import annotations

import threading

import pytest

from conftest import wait_until
from pymw_magic import Master
from pymw_magic.events import EventBus, JobChanged, TasksChanged


class Counting:
    """Counts the scheduler's per-batch publications (instrumentation of the
    real scheduler: the method still runs)."""

    def __init__(self, sched):
        self.calls = 0
        inner = sched._publish

        def publish(tasks, state):
            self.calls += 1
            return inner(tasks, state)
        sched._publish = publish


def square(x):
    return x * x


@pytest.fixture
def local():
    m = Master("local", workers=2)
    # the process's job store recorder, if any, listens to every master: out
    # of the way, so the test sees only its own observers
    from pymw_magic import store
    rec = store.recorder()
    if rec is not None:
        rec.detach(m)
    yield m
    m.shutdown()


def test_job_observers_hear_jobs_but_no_task_event_is_built(local):
    seen: list = []
    sub = local.events.subscribe(seen.append, tasks=False)
    counting = Counting(local._scheduler)
    assert local.events and not local.events.tasks
    job = local.map_async(square, range(2000))
    assert job.result(timeout=120) == [x * x for x in range(2000)]
    fut = local.submit(square, 3)
    assert fut.result(timeout=60) == 9
    # (the job-finished event goes out just after the results)
    wait_until(lambda: any(isinstance(e, JobChanged) and e.job is job and e.kind == "finished"
                           for e in list(seen)), timeout=60)
    assert counting.calls == 0
    assert not any(isinstance(e, TasksChanged) for e in seen)
    assert any(isinstance(e, JobChanged) and e.job is job and e.kind == "submitted" for e in seen)
    sub.close()
    assert not local.events


def test_want_tasks_turns_task_events_on_and_off(local):
    seen: list = []
    sub = local.events.subscribe(seen.append, tasks=False)
    sub.want_tasks()
    assert local.events.tasks
    job = local.map_async(square, range(500))
    job.wait(timeout=120)
    done = sum(len(e.tasks) for e in seen if isinstance(e, TasksChanged) and e.job is job
               and e.state.value == "done")
    assert done == 500
    sub.want_tasks(False)
    assert not local.events.tasks
    seen.clear()
    local.map_async(square, range(500)).wait(timeout=120)
    assert not any(isinstance(e, TasksChanged) for e in seen)


def test_a_task_observer_beside_a_job_observer_gets_every_task_event(local):
    jobs_only: list = []
    everything: list = []
    local.events.subscribe(jobs_only.append, tasks=False)
    local.events.subscribe(everything.append)
    job = local.map_async(square, range(1000))
    job.wait(timeout=120)
    assert not any(isinstance(e, TasksChanged) for e in jobs_only)
    assert sum(len(e.tasks) for e in everything if isinstance(e, TasksChanged)
               and e.state.value == "done") == 1000


def test_subscribing_and_leaving_from_many_threads_keeps_the_flag_true_to_the_observers():
    bus = EventBus()
    errors: list[BaseException] = []

    def churn(k):
        try:
            for i in range(300):
                sub = bus.subscribe(lambda e: None, tasks=bool((i + k) % 2))
                if i % 3 == 0:
                    sub.want_tasks(not sub.tasks)
                sub.close()
        except BaseException as exc:  # pragma: no cover - the failure looked for
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert not bus and not bus.tasks
    keep = bus.subscribe(lambda e: None, tasks=True)
    assert bus.tasks
    keep.close()
    assert not bus.tasks
