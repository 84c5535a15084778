"""The tiny-task shortcuts (bare arguments on the wire, batches popped and
made without a look at each task) under attack: a worker SIGKILLed in
the middle of a batch, a job cancelled in the middle of a map and another
map right after on the same queue, several maps at once from many
threads, live progress counted by events, one task looked at alone."""

from __future__ import annotations

import os
import signal
import threading

from conftest import wait_until

from pymw_magic import Master
from pymw_magic.events import TasksChanged
from pymw_magic.task import CANCELLED, DONE, PENDING


def square(x):
    return x * x


def sigkill_once_at(item):
    i, at, mark = item
    if i == at and not os.path.exists(mark):
        open(mark, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def test_a_worker_sigkilled_mid_batch_of_bare_tasks(tmp_path):
    for trial, at in enumerate((0, 77, 199)):
        mark = str(tmp_path / f"killed{trial}")
        with Master("local", workers=2, retries=1) as m:
            job = m.map_async(sigkill_once_at, [(i, at, mark) for i in range(200)], chunksize=50)
            assert job.result(timeout=120) == list(range(200))
        assert os.path.exists(mark)
        assert job.tasks[at].attempts == 2 and job.counts()["done"] == 200
        assert sum(t.attempts for t in job.tasks) == 201   # nobody else was charged


def test_cancel_mid_map_then_another_map_on_the_same_queue():
    with Master("local", workers=2) as m:
        for trial in range(3):
            big = m.map_async(square, range(200_000))
            # (some ran, most are still to come)
            wait_until(lambda: big.counts()["done"] > 0, timeout=60, what="the first results")
            big.cancel()
            assert big.wait(timeout=60)
            counts = big.counts()
            assert counts["pending"] == counts["running"] == 0
            assert counts["done"] + counts["cancelled"] + counts["failed"] == big.progress[0]
            assert counts["cancelled"] > 0 and counts["failed"] == 0
            for t in big.tasks:
                assert t.state in (DONE, CANCELLED)
                assert (t.result == t.index ** 2) if t.state is DONE else t.result is None
            # the cancelled tasks still sit in the queue: the next map
            # must neither run them nor count them as its own
            items = list(range(20_000))
            assert list(m.map(square, items)) == [x * x for x in items]
            small = m.map_async(square, range(5000))
            assert small.result(timeout=120) == [x * x for x in range(5000)]
            assert small.counts()["done"] == 5000 and small.counts()["cancelled"] == 0
            assert all(t.attempts == 1 and t.state is DONE for t in small.tasks)


def test_a_later_job_cancelled_while_an_earlier_one_runs():
    # the later job's cancelled tasks sit in the queue behind the earlier
    # job's, and the earlier job's input, read on, queues behind them: a
    # batch of the earlier job spans them
    with Master("local", workers=2) as m:
        for trial in range(3):
            a = m.map_async(square, range(100_000))
            b = m.map_async(square, range(30_000))
            assert b.cancel() > 0 and b.wait(timeout=60)
            assert a.result(timeout=300) == [x * x for x in range(100_000)]
            assert a.counts()["done"] == 100_000 and sum(a.counts().values()) == 100_000
            assert all(t.attempts == 1 for t in a.tasks)
            ran = [t for t in b.tasks if t.state is not CANCELLED]
            assert all(t.state is DONE and t.result == t.index ** 2 for t in ran)
            assert b.counts()["cancelled"] == len(b.tasks) - len(ran)
            assert all(t.attempts == 0 and t.worker is None for t in b.tasks if t.state is CANCELLED)


def test_many_maps_at_once_from_many_threads():
    errors: list[BaseException] = []
    with Master("local", workers=2) as m:
        def one(k):
            try:
                for r in range(3):
                    n = 3000 + 1000 * k + r
                    assert list(m.map(square, range(n))) == [x * x for x in range(n)]
                    job = m.map_async(square, range(k, n))
                    assert job.result(timeout=120) == [x * x for x in range(k, n)]
                    assert job.counts()["done"] == n - k
            except BaseException as exc:  # (reported by the main thread)
                errors.append(exc)
        threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


def test_live_progress_counts_every_task_of_a_bare_map_once():
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def observe(event):
        if isinstance(event, TasksChanged):
            with lock:
                seen[event.state.value] = seen.get(event.state.value, 0) + len(event.tasks)
    with Master("local", workers=2) as m:
        sub = m.events.subscribe(observe)
        try:
            for _ in range(3):
                seen.clear()
                items = list(range(20_000))
                assert list(m.map(square, items)) == [x * x for x in items]
                job = m.map_async(square, items)
                job.wait(timeout=120)
                assert job.counts()["done"] == 20_000 and job.progress == (20_000, 20_000)
                # (observers may be called on another thread: wait for the last events)
                wait_until(lambda: seen.get("done") == 40_000, timeout=60, what="every done event")
                with lock:
                    assert seen.get("running") == 40_000, seen
                    assert seen.get("failed", 0) == seen.get("cancelled", 0) == 0
        finally:
            sub.close()


def test_a_task_of_a_running_bare_map_looked_at_alone():
    with Master("local", workers=1) as m:
        job = m.map_async(square, range(50_000))
        t = job.tasks[-1]   # (the input is read lazily: the last task made so far)
        i = t.index
        assert t.args == (i,) and t.kwargs == {} and i > 0
        assert t.state in (PENDING, DONE) or t.state.value == "running"
        assert job.result(timeout=120)[i] == i ** 2
        assert t.state is DONE and t.result == i ** 2 and t.attempts == 1
        assert t.started <= t.finished and t.duration >= 0 and t.worker is not None
        assert job.tasks[i] is t
