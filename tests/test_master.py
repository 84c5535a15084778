"""The Master as an Executor: results, jobs, task records, payloads, options."""

from __future__ import annotations

import concurrent.futures as cf
import os
import sqlite3
import threading
import time

import pytest

from pymw_magic import Job, Master, PayloadError, TaskFailed, TaskState
from pymw_magic.errors import InvalidTransition, RemoteTraceback
from pymw_magic.events import JobChanged, TasksChanged
from pymw_magic.task import Task


def square(x):
    return x * x


def add(a, b=0):
    return a + b


def shout(x):
    print(f"hello {x}")
    import sys
    print(f"warn {x}", file=sys.stderr)
    return x


class CustomError(Exception):
    pass


def fail_on(x, bad=3):
    if x == bad:
        raise CustomError(f"bad input {x}")
    return x


def test_submit_map_and_map_async_return_results_in_input_order(master):
    assert master.submit(square, 7).result(timeout=30) == 49
    assert master.submit(add, 1, b=2).result(timeout=30) == 3
    assert list(master.map(square, range(50))) == [x * x for x in range(50)]
    assert list(master.map(add, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]
    job = master.map_async(square, range(200), name="squares")
    assert isinstance(job, Job) and job.name == "squares"
    assert job.result(timeout=30) == [x * x for x in range(200)]
    assert job.done()
    assert job.counts()["done"] == 200 and sum(job.counts().values()) == 200


def test_notebook_style_functions_lambdas_closures_and_local_classes(master):
    offset = 10

    def closure(x):
        return x + offset

    class Point:
        def __init__(self, x):
            self.x = x

        def norm(self):
            return abs(self.x)

    assert list(master.map(lambda x: x * 3, range(5))) == [0, 3, 6, 9, 12]
    assert list(master.map(closure, range(3))) == [10, 11, 12]
    points = list(master.map(lambda x: Point(-x), range(3)))
    assert [p.norm() for p in points] == [0, 1, 2]


def test_task_records_worker_attempts_times_and_output(master):
    job = master.map_async(shout, range(6), chunksize=2)
    job.result(timeout=30)
    workers = {w["name"] for w in master.worker_info()}
    for task in job.tasks:
        assert task.state is TaskState.DONE
        assert task.worker in workers
        assert task.attempts == 1
        assert task.submitted <= task.started <= task.finished
        assert task.duration == pytest.approx(task.finished - task.started)
        assert task.stdout == f"hello {task.index}\n"
        assert task.stderr == f"warn {task.index}\n"
    assert sum(master.tasks_per_worker.values()) == 6


def test_as_completed_yields_every_task_once(master):
    job = master.map_async(square, range(100))
    seen = [t.index for t in job.as_completed(timeout=30)]
    assert sorted(seen) == list(range(100))
    assert all(t.state is TaskState.DONE for t in job.tasks)


def test_raising_task_reraises_original_type_with_remote_traceback(master):
    job = master.map_async(fail_on, range(6))
    with pytest.raises(CustomError, match="bad input 3") as info:
        job.result(timeout=30)
    exc = info.value
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "fail_on" in str(exc.__cause__) and 'raise CustomError' in str(exc.__cause__)
    assert exc.pymw_task.index == 3
    assert any("task 3" in note for note in getattr(exc, "__notes__", []))
    # finished work is not lost
    results = job.result(return_exceptions=True)
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], CustomError)
    assert job.counts()["failed"] == 1 and job.counts()["done"] == 5
    with pytest.raises(CustomError):
        master.submit(fail_on, 3).result(timeout=30)


class Unrebuildable(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from args
        super().__init__(f"{a}-{b}")


def raise_unrebuildable(x):
    raise Unrebuildable(x, x)


def test_exception_that_cannot_be_unpickled_becomes_task_failed(master):
    with pytest.raises(TaskFailed, match="Unrebuildable") as info:
        master.submit(raise_unrebuildable, 1).result(timeout=30)
    assert "raise_unrebuildable" in str(info.value.__cause__)


def test_unpicklable_captured_global_is_named_before_any_task_runs(master):
    conn = sqlite3.connect(":memory:")

    def query(x):
        return conn.execute("select ?", (x,)).fetchone()

    before = dict(master.tasks_per_worker)
    with pytest.raises(PayloadError, match=r"'conn' \(sqlite3.Connection\) cannot be sent to workers"):
        master.map_async(query, range(3))
    with pytest.raises(PayloadError, match="'conn'"):
        master.submit(query, 1)
    assert master.tasks_per_worker == before
    assert master.jobs == []


def test_unpicklable_argument_fails_that_task_alone(master):
    lock = threading.Lock()
    job = master.map_async(lambda x: type(x).__name__, [1, lock, 3], chunksize=3)
    results = job.result(timeout=30, return_exceptions=True)
    assert results[0] == "int" and results[2] == "int"
    assert isinstance(results[1], PayloadError)
    assert "argument 0 of task 1" in str(results[1]) and "lock" in str(results[1])


def test_unpicklable_result_fails_that_task_with_clear_message(master):
    def make(x):
        import threading
        return threading.Lock() if x == 2 else x

    job = master.map_async(make, range(4), chunksize=4)
    results = job.result(timeout=30, return_exceptions=True)
    assert results[0] == 0 and results[1] == 1 and results[3] == 3
    assert isinstance(results[2], PayloadError)
    assert "cannot be pickled" in str(results[2]) and "lock" in str(results[2])


def test_function_travels_once_per_worker_not_per_task(tmp_path, master):
    log = tmp_path / "unpickles"

    class Counted:
        """Callable whose every unpickling appends a line to ``log``."""

        def __init__(self, path):
            self.path = str(path)

        def __reduce__(self):
            return (_counted_rebuild, (self.path,))

        def __call__(self, x):
            return x + 1

    fn = Counted(log)
    assert list(master.map(fn, range(500), chunksize=5)) == list(range(1, 501))
    lines = log.read_text().splitlines() if log.exists() else []
    assert 1 <= len(lines) <= 2, lines  # one per worker, not one per task or batch


def _counted_rebuild(path):
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return _Incr()


class _Incr:
    def __call__(self, x):
        return x + 1


def test_automatic_batching_groups_tiny_tasks(master):
    sizes = []
    master.events.subscribe(lambda e: sizes.append(len(e.tasks))
                            if isinstance(e, TasksChanged) and e.state is TaskState.RUNNING else None)
    assert list(master.map(square, range(20000))) == [x * x for x in range(20000)]
    assert max(sizes) > 50, "tiny tasks should be batched"
    assert sizes[0] == 1, "an unknown function starts with a single task to measure it"


def test_fixed_chunksize_is_respected(master):
    sizes = []
    master.events.subscribe(lambda e: sizes.append(len(e.tasks))
                            if isinstance(e, TasksChanged) and e.state is TaskState.RUNNING else None)
    master.map_async(square, range(100), chunksize=10).result(timeout=30)
    assert sizes and max(sizes) == 10


def test_event_stream_follows_the_state_machine(master):
    events = []
    sub = master.events.subscribe(events.append)
    job = master.map_async(square, range(30), chunksize=4)
    job.result(timeout=30)
    deadline = time.monotonic() + 5
    while not any(isinstance(e, JobChanged) and e.kind == "finished" for e in events):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sub.close()
    seen: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, TasksChanged):
            for t in e.tasks:
                seen.setdefault(t.index, []).append(e.state.value)
    assert set(seen) == set(range(30))
    assert all(states == ["running", "done"] for states in seen.values()), seen
    kinds = [e.kind for e in events if isinstance(e, JobChanged)]
    assert kinds == ["submitted", "finished"]
    assert isinstance(events[-1], JobChanged) and events[-1].kind == "finished"


def test_illegal_transition_raises():
    t = Task(1, None, 0, None, (), {}, 0.0)
    t.to(TaskState.RUNNING)
    t.to(TaskState.DONE)
    with pytest.raises(InvalidTransition):
        t.to(TaskState.RUNNING)


@pytest.mark.parametrize("policy", ["fifo", "lifo", "random"])
def test_policies_run_every_task(policy):
    with Master(workers=2, policy=policy) as m:
        assert sorted(m.map(square, range(300))) == sorted(x * x for x in range(300))


def test_bad_options_give_clear_errors():
    with pytest.raises(ValueError, match="unknown backend 'nope'; available backends: local"):
        Master("nope")
    with pytest.raises(ValueError, match="unknown option.*frobnicate.*valid options: .*workers"):
        Master(workers=1, frobnicate=3)
    with pytest.raises(ValueError, match="workers"):
        Master(workers=0)
    with pytest.raises(ValueError, match="unknown policy 'best'; valid policies: fifo, lifo, random"):
        Master(workers=1, policy="best")
    with pytest.raises(ValueError, match="retries"):
        Master(workers=1, retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        Master(workers=1, timeout=0)


def test_shutdown_then_submit_raises_and_context_manager_shuts_down():
    with Master(workers=1) as m:
        assert m.submit(square, 2).result(timeout=30) == 4
    with pytest.raises(RuntimeError, match="after shutdown"):
        m.submit(square, 2)
    with Master(workers=1) as m2, pytest.raises(TypeError, match="callable"):
        m2.map_async(3, [1])


def test_shutdown_waits_for_queued_work():
    m = Master(workers=2)
    futures = [m.submit(time.sleep, 0.05) for _ in range(8)]
    m.shutdown(wait=True)
    assert all(f.done() and f.exception(timeout=0) is None for f in futures)


def test_shutdown_cancel_futures_cancels_pending():
    m = Master(workers=1)
    # (long enough that a loaded machine cannot run them all before the shutdown)
    futures = [m.submit(time.sleep, 1.0) for _ in range(6)]
    deadline = time.monotonic() + 30
    while not futures[0].running():
        assert time.monotonic() < deadline, "the first task did not start"
        time.sleep(0.01)
    m.shutdown(wait=True, cancel_futures=True)
    assert any(f.cancelled() for f in futures)
    assert all(f.done() for f in futures)


def test_future_cancel_before_it_runs(master):
    blocker = master.submit(time.sleep, 0.5)
    blocker2 = master.submit(time.sleep, 0.5)
    late = [master.submit(square, i) for i in range(3)]
    assert late[0].cancel()
    assert late[1].result(timeout=30) == 1
    assert late[0].cancelled()
    blocker.result(timeout=30), blocker2.result(timeout=30)


def test_map_timeout_raises_futures_timeout(master):
    with pytest.raises(cf.TimeoutError):
        list(master.map(time.sleep, [2, 2, 2], timeout=0.3))


def test_await_job_gives_its_results_and_cancelling_the_awaiting_task_cancels_the_job(master):
    import asyncio

    async def main():
        job = master.map_async(square, range(20))
        assert await job == [x * x for x in range(20)]
        # An ended job's wait returns at once; callbacks added then run at once.
        await job.wait_async()
        seen = []
        job.add_done_callback(seen.append)
        assert seen == [job]

        slow = master.map_async(time.sleep, [60] * 4, chunksize=1)
        waiter = asyncio.ensure_future(slow.wait_async())
        while slow.counts()["running"] < 2:
            await asyncio.sleep(0.02)
        assert not waiter.done()
        waiter.cancel()  # what the kernel does to an awaiting cell on interrupt
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return slow

    slow = asyncio.run(main())
    assert slow.wait(30)
    assert slow.counts()["cancelled"] == 4 and slow.counts()["done"] == 0


def test_a_task_the_policy_cannot_order_fails_alone_and_the_job_ends():
    from pymw_magic.policies import LongestFirst
    items = [1, 2, 0, 4] + list(range(5, 150))   # the estimate 1/x raises for x == 0
    with Master("local", workers=2, policy=LongestFirst(estimate=lambda x: 1 / x)) as m:
        job = m.map_async(abs, items)
        assert job.wait(timeout=60)
        results = job.result(return_exceptions=True)
        assert isinstance(results[2], ValueError) and "ZeroDivisionError" in str(results[2])
        assert [r for i, r in enumerate(results) if i != 2] == [x for i, x in enumerate(items) if i != 2]
        fut = m.submit(abs, 0)        # through submit() too
        with pytest.raises(ValueError, match="estimate of task"):
            fut.result(timeout=30)
        assert m.submit(abs, -3).result(timeout=30) == 3


def test_an_input_generator_may_submit_tasks_of_its_own(master):
    side = []

    def items():
        for i in range(300):
            if i % 100 == 0:
                side.append(master.submit(abs, -i))   # read under the scheduler's lock
            yield i

    assert master.map_async(abs, items()).result(timeout=60) == list(range(300))
    assert [f.result(timeout=30) for f in side] == [0, 100, 200]


def test_submit_keeps_a_bounded_history_not_every_task(master, monkeypatch):
    import pymw_magic.master as master_module
    monkeypatch.setattr(master_module, "SUBMIT_HISTORY", 50)
    futures = [master.submit(abs, -i) for i in range(400)]
    assert [f.result(timeout=60) for f in futures] == list(range(400))
    job = next(iter(master._submit_jobs.values()))
    assert job.counts()["done"] == 400
    assert len(job.tasks) <= 50 + 2 * master.workers * 2   # the rest were let go


def test_a_policy_that_needs_an_estimate_and_has_none_is_refused_at_once():
    with pytest.raises(ValueError, match="estimate"):
        Master("local", workers=2, policy="longest-first")


def test_retries_may_be_infinite():
    import math
    with Master("local", workers=1, retries=math.inf) as m:
        assert m.retries == math.inf and m.submit(abs, -1).result(timeout=30) == 1
    with Master("local", workers=1, retries="inf") as m:
        assert m.retries == math.inf
    with pytest.raises(ValueError, match="whole number >= 0, or inf"):
        Master("local", workers=1, retries=1.5)
