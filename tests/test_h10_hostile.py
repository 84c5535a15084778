"""Helper h10's hostile tests of the simulator's lane and Scheduler.ran().

Every test here failed when it was written (see each docstring).  A cancel
is made to land while the lane holds simulated-but-unreported tasks by
issuing it from the duration model, which the lane calls (on its own
thread) as each task starts: deterministic, no wall clock involved.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

import pytest

from pymw_magic import Master
from pymw_magic.events import JobChanged, TasksChanged
from pymw_magic.policies import FIFO
from pymw_magic.task import CANCELLED, DONE, RUNNING

from conftest import wait_until


def work(x):
    return x


class SameAsFIFO(FIFO):
    """FIFO by another class: the general loop, not the lane."""


MARK = 1.2345


def _items(n=20_000, mark_at=5_000):
    items = [1.0 + (i % 7) * 0.1 for i in range(n)]
    items[mark_at] = MARK
    return items


class _CancelAtMark:
    """A duration model that cancels ``self.job`` when it is first asked
    for the item ``MARK`` (i.e. at the virtual moment that task starts)."""

    def __init__(self):
        self.job = None
        self.fired = False

    def __call__(self, x):
        if x == MARK and self.job is not None and not self.fired:
            self.fired = True
            self.job.cancel()
        return x


class _Events:
    def __init__(self):
        self.lock = threading.Lock()
        self.states = defaultdict(list)    # (job id, task index) -> states published
        self.ends = defaultdict(list)      # job id -> "finished"/"cancelled" events

    def __call__(self, ev):
        with self.lock:
            if isinstance(ev, TasksChanged):
                for t in ev.tasks:
                    self.states[(ev.job.id, t.index)].append(ev.state)
            elif isinstance(ev, JobChanged) and ev.kind in ("finished", "cancelled"):
                self.ends[ev.job.id].append(ev.kind)


def _run_cancel_at_mark(policy=None, second_job=False):
    model = _CancelAtMark()
    seen = _Events()
    opts = {} if policy is None else {"policy": policy}
    with Master("simulator", workers=50, speeds="lognormal:1,0.5", duration=model, **opts) as m:
        m.events.subscribe(seen)
        # (the model cancels only once job is set: set it under the
        # scheduler's lock so the lane cannot pass the mark before)
        with m._scheduler.cond:
            job = m.map_async(work, _items())
            model.job = job
        other = m.map_async(work, [1.0] * 500) if second_job else None
        assert job.wait(timeout=60)
        if other is not None:
            assert other.wait(timeout=60)
        assert model.fired
        out = dict(job=job, other=other, events=seen, samples=job.fn.samples,
                   counts=job.counts(), states=Counter(t.state for t in job.tasks))
    return out


def test_a_job_cancelled_mid_lane_with_another_job_waiting_has_no_task_come_back():
    """Map job A runs in the lane, map job B waits its turn; A is cancelled
    while the lane runs it.  Seen: the lane's hand_over() gives the 49
    CANCELLED tasks it had started (cur[r]) to sched.take() through
    gate.handing, and with B the only active job Scheduler._select skips
    its per-task state check (pending assumed): they go CANCELLED ->
    RUNNING -> DONE (events for one task: CANCELLED, RUNNING, DONE), A's
    counts() say pending -49 and cancelled 49 more than its tasks are.
    From another thread (cancel at a random point, B submitted before):
    also tasks left RUNNING in a job that ended.  Not new with the bulk
    report: the lane's hand-over path fails the same way before it."""
    got = _run_cancel_at_mark(second_job=True)
    job, seen = got["job"], got["events"]
    counts = job.counts()
    real = Counter(t.state.value for t in job.tasks)
    assert all(t.state.final for t in job.tasks), Counter(t.state for t in job.tasks)
    assert counts["pending"] >= 0, counts
    for key in ("done", "cancelled", "failed", "running"):
        assert counts[key] == real.get(key, 0), (key, counts, real)
    assert job.progress[0] == len(job.tasks)
    twice = {k: v for k, v in seen.states.items() if k[0] == job.id and sum(s.final for s in v) != 1}
    assert not twice, f"{len(twice)} tasks ended twice or never, e.g. {list(twice.items())[:2]}"
    assert seen.ends[job.id] == ["cancelled"]
    other = got["other"]
    assert other.counts()["done"] == 500 == len(other.tasks)


def test_fn_samples_count_only_tasks_that_completed_when_a_cancel_lands_mid_lane():
    """job.fn.samples after a cancel that lands while the lane holds
    simulated chains not yet reported: the lane adds every task of its
    chains to ``samples`` before Scheduler.ran() skips the cancelled ones
    (seen: samples 4952 for 4832 tasks done; the general loop: 4951 for
    4951).  The same with a cancel from another thread (samples > done in
    about half of random cancel points)."""
    got = _run_cancel_at_mark()
    assert got["samples"] == got["counts"]["done"], (got["samples"], got["counts"])
    general = _run_cancel_at_mark(policy=SameAsFIFO())
    assert general["samples"] == general["counts"]["done"]


@pytest.mark.xfail(reason="known, left: the lane reports what ran in bulk, so a cancel issued from inside "
                          "the simulation finds tasks that ended earlier in virtual time not yet reported "
                          "(they end CANCELLED, not DONE); a wall-clock cancel lands at an arbitrary virtual "
                          "time on either path", strict=False)
def test_tasks_that_ended_before_a_cancel_stay_done_as_in_the_general_loop():
    """A cancel issued at the virtual moment task 5000 starts (from the
    duration model): the general loop has DONE every task that ended
    before that moment (4951); the lane had simulated them to their end
    but not reported them yet, and the cancel turns 119 of them CANCELLED
    (4832 done) -- results the simulation produced are lost and the job
    differs from the general loop's, against the lane's docstring ('the
    lane reports what ran ... and the general loop goes on from that very
    event')."""
    lane = _run_cancel_at_mark()
    general = _run_cancel_at_mark(policy=SameAsFIFO())
    assert lane["counts"]["done"] == general["counts"]["done"], (lane["counts"], general["counts"])
    lane_done = sorted(t.index for t in lane["job"].tasks if t.state is DONE)
    general_done = sorted(t.index for t in general["job"].tasks if t.state is DONE)
    assert lane_done == general_done


def _raising_at(stop):
    def gen():
        for i in range(3000):
            if i == stop:
                raise ValueError("bad input")
            yield 1.0 + (i % 5)
    return gen()


def test_a_generator_that_raises_part_way_gives_the_general_loops_job():
    """map over a generator that raises at item 1700: the general loop
    runs the 1700 items read before the error; the lane (whose bulk report
    makes the job's input be read in big slices) has only 1666 -- 34 items
    the generator did yield are silently dropped (Job._read returns [] for
    the whole slice in which the iterable raised).  Before the bulk report
    the lane had all 1700 (and at item 150: 145, the general loop 150)."""
    got = {}
    for name, opts in (("lane", {}), ("general", {"policy": SameAsFIFO()})):
        with Master("simulator", workers=20, duration=work, **opts) as m:
            job = m.map_async(work, _raising_at(1700))
            assert job.wait(timeout=60)
            results = job.result(return_exceptions=True)
            got[name] = (job.progress, len(results), job.counts()["done"])
    assert got["general"] == ((1700, 1700), 1700, 1700)
    assert got["lane"] == got["general"]


def test_a_job_terminated_mid_lane_counts_no_pending_task():
    """m.terminate() (or shutdown(wait=False, cancel_futures=True)) while a
    map job runs: the job ends (wait() is True, every task object final)
    but job.counts() still says 'pending': 89800 -- the unread input, which
    will never be read.  terminate() cancels through the scheduler, not
    job.cancel(), so Job._cancelled stays False and counts() adds
    total - fed as pending; the job's end event says 'finished'.  (Not the
    lane's: the general loop does the same.)"""
    seen = _Events()
    m = Master("simulator", workers=50, speeds="lognormal:1,0.5", duration=work)
    try:
        m.events.subscribe(seen)
        fired = []

        def stop_at_first_done(ev):
            if isinstance(ev, TasksChanged) and ev.state is DONE and not fired:
                fired.append(True)
                m.terminate()
        m.events.subscribe(stop_at_first_done)
        job = m.map_async(work, [1.0 + (i % 7) * 0.1 for i in range(90_000)])
        assert job.wait(timeout=60)
        wait_until(lambda: fired, timeout=30, what="the terminate")
        assert all(t.state.final for t in job.tasks)
        counts = job.counts()
        assert counts["pending"] == 0, counts
        assert sum(counts.values()) == job.progress[0]
    finally:
        m.terminate()


@pytest.mark.parametrize("how", ["terminate", "cancel_futures"])
def test_input_read_while_a_master_is_terminated_never_becomes_a_failed_task(how):
    """terminate() (and shutdown(cancel_futures=True)) cancelled the job's
    tasks, then stopped reading its input: an item read in between became a
    task the cancel never saw, failed at the close with ShutDownError
    (h10 saw some terminated jobs end with failed tasks).  Here the input's
    second item comes just after the cancel, and the close waits for it to
    be accepted when it comes after the cancel (the old order)."""
    m = Master("local", workers=1)
    scheduler = m._scheduler
    blocked, released = threading.Event(), threading.Event()
    real_cancel, real_close = scheduler.cancel, scheduler.close_job

    def source():
        yield -1
        blocked.set()
        assert released.wait(60)
        yield -2

    def cancel(*args, **kwargs):
        n = real_cancel(*args, **kwargs)
        released.set()
        return n

    def close_job(job):
        if released.is_set():   # (after the cancel: let the read land first)
            wait_until(lambda: len(job.tasks) >= 2, 30, "the item read after the cancel")
        return real_close(job)

    scheduler.cancel, scheduler.close_job = cancel, close_job

    def stop():
        assert blocked.wait(60)
        if how == "terminate":
            m.terminate()
        else:
            m.shutdown(wait=False, cancel_futures=True)
    stopper = threading.Thread(target=stop)
    stopper.start()
    try:
        job = m.map_async(abs, source())     # (its first read runs here, and blocks in the input)
        stopper.join(60)
        assert job.wait(timeout=30)
        counts = job.counts()
        assert counts["failed"] == 0 and counts["pending"] == 0, counts
    finally:
        released.set()
        m.terminate()
