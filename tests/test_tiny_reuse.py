"""The master's tiny-task shortcuts keep every record a user can reach:
a map's Task objects are reused for later input only when nobody holds
them (an observer that kept them, or a widget, sees them unchanged), a
spare keeps no result or input alive, the map iterator closes like a
generator, and a batch's tasks touched by a cancel while it waits are
still checked one by one (the scheduler's epoch)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from pymw_magic import Master
from pymw_magic.events import TasksChanged
from pymw_magic.master import REUSE_TASKS, SPARE_TASKS
from pymw_magic.task import DONE, NO_KWARGS, PENDING, Task

from conftest import wait_until

#: tests that need a task to be reused (only where references are all counted)
needs_reuse = pytest.mark.skipif(not REUSE_TASKS, reason="no task reuse on this interpreter "
                                 "(sys.getrefcount is not exact: CPython 3.14+ or free-threaded)")


def square(x):
    return x * x


def ident(x):
    return x


class Blob:
    """A large result that supports weak references."""

    def __init__(self, i: int):
        self.i = i
        self.data = bytearray(1 << 20)


def make_blob(i: int) -> Blob:
    return Blob(i)


def test_a_new_task_reads_none_where_it_has_no_value_yet():
    t = Task(1, None, 0, None, (1,), NO_KWARGS, 0.0)
    assert (t.worker, t.host, t.started, t.finished, t.result, t.batch) == (None,) * 6
    assert t.duration is None and not t.dispatched
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        t.nothing  # noqa: B018
    assert getattr(t, "nothing", 7) == 7 and not hasattr(t, "nothing")
    t.worker = "w"
    assert t.worker == "w"


def test_tasks_an_observer_kept_are_never_reused():
    kept: list[Task] = []
    n = 3000
    with Master("local", workers=2) as m:
        sub = m.events.subscribe(lambda e: kept.extend(e.tasks)
                                 if isinstance(e, TasksChanged) and e.state is DONE else None)
        assert list(m.map(square, range(n))) == [x * x for x in range(n)]
        sub.close()
        snapshot = [(t.id, t.index, t.args, t.result, t.state, t.worker) for t in kept]
        assert len(snapshot) == n
        for _ in range(5):   # later maps, whose tasks may be spares
            assert list(m.map(ident, range(n, 2 * n))) == list(range(n, 2 * n))
        assert [(t.id, t.index, t.args, t.result, t.state, t.worker) for t in kept] == snapshot
        assert sorted(t.index for t in kept) == list(range(n))


@needs_reuse
def test_spares_hold_no_result_and_no_input():
    n = 40
    with Master("local", workers=2) as m:
        refs = []
        for blob in m.map(make_blob, range(n), chunksize=4):
            refs.append(weakref.ref(blob))
            del blob
        wait_until(lambda: gc.collect() >= 0 and all(r() is None for r in refs), 30,
                   "every result handed out to be let go")
        blobs = [Blob(i) for i in range(8)]
        blob_refs = [weakref.ref(b) for b in blobs]
        assert list(m.map(len, [b.data for b in blobs], chunksize=2)) == [1 << 20] * 8
        del blobs
        wait_until(lambda: gc.collect() >= 0 and all(r() is None for r in blob_refs), 30,
                   "every input to be let go")
        spares = m._spare_tasks
        assert spares and len(spares) <= SPARE_TASKS
        assert all(t.result is None and t.args is None and t.job is None and t.fn is None for t in spares)


@needs_reuse
def test_reused_tasks_look_new():
    n = 2000
    with Master("local", workers=2) as m:
        assert list(m.map(square, range(n))) == [x * x for x in range(n)]
        wait_until(lambda: len(m._spare_tasks) > 0, 30, "some tasks to become spares")
        spares = set(map(id, m._spare_tasks))
        job = m.map_async(square, range(n))
        assert job.result(timeout=60) == [x * x for x in range(n)]
        reused = [t for t in job.tasks if id(t) in spares]
        assert reused, "no spare was reused"
        ids = [t.id for t in job.tasks]
        assert ids == sorted(ids) and len(set(ids)) == n
        assert [t.index for t in job.tasks] == list(range(n))
        for t in job.tasks:
            assert t.state is DONE and t.job is job and t.attempts == 1
            assert t.started is not None and t.finished is not None and t.worker is not None
            assert t.result == t.args[0] ** 2
        assert job.counts()["done"] == n


def test_the_map_iterator_closes_like_a_generator():
    with Master("local", workers=1) as m:
        it = m.map(ident, range(100_000))
        assert iter(it) is it and next(it) == 0
        it.close()
        assert next(it, "end") == "end"
        wait_until(lambda: not m._scheduler.active_jobs(), 60, "the closed map's job to end")


class EqualsAll:
    """A result whose ``==`` says True to anything (as ``mock.ANY`` does)."""

    def __init__(self, i: int) -> None:
        self.i = i

    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = object.__hash__


class EqualsRaises:
    """A result whose ``==`` raises (as a NumPy array's or a DataFrame's
    truth value does)."""

    def __init__(self, i: int) -> None:
        self.i = i

    def __eq__(self, other: object) -> bool:
        raise ValueError("the truth value of this result is ambiguous")

    __hash__ = object.__hash__


def test_map_hands_out_every_result_whatever_its_eq_says():
    """The map iterator never compares results with anything: a result
    equal to everything does not end the map early, one whose ``==``
    raises does not break it."""
    with Master("local", workers=2) as m:
        for cls in (EqualsAll, EqualsRaises):
            got = [r.i for r in m.map(cls, range(500), chunksize=50)]
            assert got == list(range(500)), cls.__name__
            it = m.map(cls, range(200), chunksize=200)
            assert next(it).i == 0
            it.close()
            assert next(it, "end") == "end"


def test_a_cancel_during_a_fresh_batch_is_honoured_many_times():
    """Threads cancel jobs while their batches are out and sent ahead: the
    counts always add up, each task ends once (the epoch makes every
    touched batch check its tasks)."""
    with Master("local", workers=2) as m:
        for trial in range(6):
            jobs = [m.map_async(square, range(4000)) for _ in range(3)]
            gate = threading.Barrier(3)

            def cancel(job):
                gate.wait(timeout=30)
                job.cancel()

            threads = [threading.Thread(target=cancel, args=(j,)) for j in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            for job in jobs:
                assert job.wait(timeout=60)
                counts = job.counts()
                # (a cancel stops the reading of the input: what was read counts)
                assert counts["done"] + counts["cancelled"] == len(job.tasks) > 0, (trial, counts)
                assert counts["pending"] == counts["running"] == 0
                for t in job.tasks:
                    assert t.state in (DONE, "cancelled")
                    assert (t.result == t.args[0] ** 2) if t.state is DONE else t.result is None
        assert not any(t.state is PENDING for j in jobs for t in j.tasks)
