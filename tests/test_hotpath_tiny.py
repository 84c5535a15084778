"""The tiny-task paths keep their records: the worker's plain loop (one
function, no keyword arguments, nothing skipped) writes the slot the
master reads (which task runs, since when), captures each task's output,
reports failures in place; a Task's rarely set fields read their defaults
and are each task's own once set."""

from __future__ import annotations

import os
import sys

import pytest

from pymw_magic.task import NO_KWARGS, Task
from pymw_magic.worker import IDLE, SLOT, BatchRunner, Slot, read_slot


@pytest.fixture
def slot_file(tmp_path):
    path = tmp_path / "slot"
    path.write_bytes(b"\0" * SLOT.size)
    return str(path)


def runner_for(slot_file, fn):
    runner = BatchRunner(Slot(slot_file))
    runner.instances = {1: {0: fn}}   # the function as if learned for job 0
    return runner


def test_the_plain_loop_writes_the_slot_each_task_reads(slot_file):
    with open(slot_file, "rb") as f:
        import mmap
        view = mmap.mmap(f.fileno(), SLOT.size, prot=mmap.PROT_READ)

    def where(x):
        if x == 5:
            print("five")
            print("err", file=sys.stderr)
        if x == 7:
            raise ValueError("seven")
        return read_slot(view)

    runner = runner_for(slot_file, where)
    assert runner.slot._seq is not None  # (the fast path is the one under test)
    seqs = [100 + i for i in range(10)]
    t_start, ends, values, failures, outputs = runner.run(seqs, 1, [(i,) for i in range(10)], None)
    assert len(ends) == len(values) == 10
    for i in range(10):
        if i == 7:
            continue
        seq, started = values[i]
        assert seq == 100 + i
        # a task starts when the one before it ended (the first: once its
        # function is loaded, never before the batch's start)
        if i == 0:
            assert t_start <= started <= ends[0]
        else:
            assert started == ends[i - 1]
    assert values[7] is None and failures[7][1] == "ValueError" and "seven" in failures[7][2]
    assert list(failures) == [7]
    assert outputs == {5: ("five\n", "err\n")}
    assert read_slot(view) is None   # idle again after the batch
    assert SLOT.unpack_from(view, 0)[0] == IDLE
    assert ends == sorted(ends) and ends[0] >= t_start


def test_the_general_loop_still_serves_skips_and_keywords(slot_file):
    runner = runner_for(slot_file, lambda x, y=0: x + y)
    seqs = [1, 2, 3]
    _, ends, values, failures, _ = runner.run(seqs, 1, [(1,), (2,), (3,)], [None, {"y": 10}, None],
                                              skip=frozenset({3}))
    assert values == [1, 12, None] and not failures and len(ends) == 3


def test_loading_the_function_is_not_the_first_tasks_time(slot_file):
    # a job's function is loaded at its first batch (it may import modules,
    # slowly): the slot's start time, which timeouts read, begins after that
    import time

    class SlowToLoad:
        def __call__(self, x):
            return read_slot_started()

    runner = runner_for(slot_file, None)
    loaded: list[float] = []

    def instance(fn_id, job):
        time.sleep(0.3)        # a slow import
        loaded.append(time.time())
        return SlowToLoad()
    runner.instance = instance   # (the runner's own loading step, slowed)

    def read_slot_started():
        with open(slot_file, "rb") as f:
            return read_slot(f.read())[1]
    t_start, ends, values, _, _ = runner.run([1], 1, [(0,)], None)
    assert values[0] >= loaded[0] >= t_start + 0.29


def test_a_slot_without_a_file_is_a_no_op():
    slot = Slot(None)
    slot.set(3, 1.0)   # nothing to write, nothing raised
    runner = BatchRunner(slot)
    runner.instances = {1: {0: abs}}
    _, _, values, _, _ = runner.run([1, 2], 1, [(-1,), (-2,)], None)
    assert values == [1, 2]


def test_a_tasks_rare_fields_default_and_are_its_own():
    a = Task(1, None, 0, None, (1,), NO_KWARGS, 0.0)
    b = Task(2, None, 1, None, (2,), NO_KWARGS, 0.0)
    for t in (a, b):
        assert (t.stdout, t.stderr, t.error, t.remote_traceback, t.future, t.isolate, t.requeues) == \
            ("", "", None, None, None, False, 0)
    a.stdout, a.error, a.isolate = "x", ValueError("e"), True
    a.requeues += 1
    assert (b.stdout, b.error, b.isolate, b.requeues) == ("", None, False, 0)
    assert (a.stdout, a.isolate, a.requeues) == ("x", True, 1)
    assert Task.stdout == "" and Task.requeues == 0   # the class defaults untouched
    # only a task that set one has an instance dict
    assert not b.__dict__ and a.__dict__


def test_a_worker_killed_mid_batch_of_tiny_tasks_blames_the_task_it_ran():
    # the slot written by the plain loop is what the master reads when a
    # worker dies: the culprit alone fails, its neighbours run again
    from pymw_magic import Master
    with Master("local", workers=1, retries=0) as m:
        out = m.map_async(die_on_13, range(40), chunksize=40).result(timeout=120, return_exceptions=True)
    assert [v for i, v in enumerate(out) if i != 13] == [i for i in range(40) if i != 13]
    assert isinstance(out[13], Exception)
    assert "died" in str(out[13]) or "WorkerLost" in type(out[13]).__name__


def die_on_13(x):
    if x == 13:
        os._exit(3)
    return x


def test_a_task_states_hash_agrees_with_its_string_equality():
    # (a str enum equals its value; its hash now agrees, in C)
    from pymw_magic.task import DONE, FINAL_STATES, PENDING, TaskState
    for state in TaskState:
        assert state == state.value and hash(state) == hash(state.value)
    assert DONE in FINAL_STATES and "done" in FINAL_STATES and PENDING not in FINAL_STATES
    assert {DONE: 1}["done"] == 1
    assert DONE.final and not PENDING.final
