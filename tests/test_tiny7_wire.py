"""A map over one iterable travels compactly: each call's one argument
bare (no 1-tuple), a fresh batch's consecutive task ids as a range, and
the worker's end times back as one array.  The records are the same as
on the general path: per-task results, errors in place, output, the slot,
start and end times, retries of the culprit of a killed worker."""

from __future__ import annotations

import os
import sys
from array import array

import pytest

from pymw_magic import Master
from pymw_magic.backends import pool as P
from pymw_magic.payload import WorkerFunctions
from pymw_magic.scheduler import Batch
from pymw_magic.task import DONE, FAILED
from pymw_magic.worker import BARE_ARGS, IDLE, SLOT, BatchRunner, Slot, read_slot


@pytest.fixture
def slot_file(tmp_path):
    path = tmp_path / "slot"
    path.write_bytes(b"\0" * SLOT.size)
    return str(path)


def runner_for(slot_file, fn):
    runner = BatchRunner(Slot(slot_file))
    runner.instances = {1: {0: fn}}   # the function as if learned for job 0
    return runner


def test_bare_arguments_keep_every_record_of_the_plain_loop(slot_file):
    import mmap
    with open(slot_file, "rb") as f:
        view = mmap.mmap(f.fileno(), SLOT.size, prot=mmap.PROT_READ)

    def where(x):
        if x == 5:
            print("five")
            print("err", file=sys.stderr)
        if x == 7:
            raise ValueError("seven")
        return x, read_slot(view)

    runner = runner_for(slot_file, where)
    t_start, ends, values, failures, outputs = runner.run(range(100, 110), 1, list(range(10)), BARE_ARGS)
    assert isinstance(ends, array) and len(ends) == len(values) == 10
    for i in range(10):
        if i == 7:
            continue
        x, (seq, started) = values[i]
        assert x == i and seq == 100 + i   # the argument bare, the slot names the task
        assert started == (ends[i - 1] if i else started) and started >= t_start
    assert values[7] is None and failures[7][1] == "ValueError" and "seven" in failures[7][2]
    assert list(failures) == [7]
    assert outputs == {5: ("five\n", "err\n")}
    assert SLOT.unpack_from(view, 0)[0] == IDLE
    assert list(ends) == sorted(ends) and ends[0] >= t_start


def test_a_bare_argument_that_is_a_tuple_stays_one_argument(slot_file):
    runner = runner_for(slot_file, lambda x: ("got", x))
    _, _, values, failures, _ = runner.run([1, 2], 1, [(1, 2), ()], BARE_ARGS)
    assert not failures and values == [("got", (1, 2)), ("got", ())]


def test_bare_arguments_with_a_skip_take_the_general_loop(slot_file):
    runner = runner_for(slot_file, lambda x: -x)
    _, ends, values, failures, _ = runner.run(range(1, 5), 1, [1, 2, 3, 4], BARE_ARGS,
                                              skip=frozenset({3}))
    assert values == [-1, -2, None, -4] and not failures and len(ends) == 4


def test_bare_arguments_without_a_slot_file(tmp_path):
    runner = BatchRunner(Slot(None))
    runner.instances = {1: {0: abs}}
    _, _, values, _, _ = runner.run([1, 2], 1, [-1, -2], BARE_ARGS)
    assert values == [1, 2]


def _encoded(job, order):
    tasks = [job.tasks[i] for i in order]
    batch = Batch(1, tasks, "w", True, False)
    msg, _, _ = P.PoolBackend._encode(batch, WorkerFunctions())
    return msg


def test_the_encoding_is_bare_only_for_one_argument_maps():
    with Master("local", workers=1) as m:
        one = m.map_async(square, range(6))
        two = m.map_async(add, range(6), range(6))
        star = m.starmap_async(add, [(i, i) for i in range(6)])
        pairs = m.map_async(first, [(i, -i) for i in range(6)])
        for job in (one, two, star, pairs):
            job.wait(timeout=120)
        assert one.result() == [i * i for i in range(6)]
        assert two.result() == star.result() == [2 * i for i in range(6)]
        assert pairs.result() == list(range(6))   # a tuple item is one argument
        ids = [t.id for t in one.tasks]
        msg = _encoded(one, range(6))
        assert msg[6] == BARE_ARGS and msg[5] == list(range(6)) and msg[3] == range(ids[0], ids[0] + 6)
        # ids out of order (a retried task queued first): sent one by one
        msg = _encoded(one, [2, 0, 1, 3, 4, 5])
        assert msg[6] == BARE_ARGS and msg[3] == [ids[i] for i in [2, 0, 1, 3, 4, 5]]
        assert msg[5] == [2, 0, 1, 3, 4, 5]
        # not consecutive: a list too
        msg = _encoded(one, [0, 2, 4])
        assert msg[3] == [ids[0], ids[2], ids[4]]
        for job in (two, star):
            msg = _encoded(job, range(6))
            assert msg[6] is None and msg[5] == [(i, i) for i in range(6)]
        assert _encoded(pairs, range(2))[5] == [(0, 0), (1, -1)]


def test_a_bare_map_keeps_each_tasks_own_record():
    with Master("local", workers=2) as m:
        job = m.map_async(fail_on_3, range(2000))
        out = job.result(timeout=120, return_exceptions=True)
    assert [v for i, v in enumerate(out) if i != 3] == [i * i for i in range(2000) if i != 3]
    assert isinstance(out[3], ValueError) and "three" in str(out[3])
    t3 = job.tasks[3]
    assert t3.state is FAILED and t3.error is out[3] and t3.args == (3,) and t3.remote_traceback
    for t in job.tasks[:10]:
        if t.index == 3:
            continue
        assert t.state is DONE and t.args == (t.index,) and t.result == t.index ** 2
        assert t.worker is not None and t.attempts == 1
        assert t.submitted <= t.started <= t.finished
    assert job.counts()["done"] == 1999 and job.counts()["failed"] == 1
    assert job.progress == (2000, 2000)


def test_a_worker_killed_mid_bare_batch_retries_its_culprit_alone(tmp_path):
    mark = str(tmp_path / "died")
    with Master("local", workers=1, retries=1) as m:
        job = m.map_async(die_once_on_13, [(i, mark) for i in range(40)], chunksize=40)
        out = job.result(timeout=120)
    assert out == list(range(40))
    assert job.tasks[13].attempts == 2
    assert all(t.attempts == 1 for t in job.tasks if t.index != 13)
    assert os.path.exists(mark)   # (it did die once)


def square(x):
    return x * x


def add(x, y):
    return x + y


def first(pair):
    return pair[0]


def fail_on_3(x):
    if x == 3:
        raise ValueError("three")
    return x * x


def die_once_on_13(item):
    i, mark = item
    if i == 13 and not os.path.exists(mark):
        open(mark, "w").close()
        os._exit(3)
    return i


def ident(x):
    return x if isinstance(x, int) else "other"


def test_an_unpicklable_bare_argument_fails_its_task_alone():
    import threading
    from pymw_magic.errors import PayloadError
    items = list(range(10)) + [threading.Lock()] + list(range(10, 20))
    with Master("local", workers=2) as m:
        job = m.map_async(ident, items, chunksize=21)
        out = job.result(timeout=120, return_exceptions=True)
    assert isinstance(out[10], PayloadError)
    assert [v for i, v in enumerate(out) if i != 10] == list(range(20))
    assert job.counts()["failed"] == 1 and job.counts()["done"] == 20
