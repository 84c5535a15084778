"""The job store's recorder listens to a pool master for job events only,
so the scheduler builds no per-batch event for it, and the stored counts
still follow a running job; a job opted into task rows turns task events
on."""

from __future__ import annotations

import time

from conftest import wait_until
from pymw_magic import Master
from pymw_magic import store as st


def square(x):
    return x * x


def test_a_pool_masters_recorder_wants_no_task_events_and_the_counts_follow(home):
    rec = st.recorder()
    assert rec is not None
    with Master("local", workers=1) as m:
        assert rec.attached(m)
        assert not m.events.tasks            # nothing per batch is built for the recorder
        job = m.map_async(square, range(200))
        job.result(timeout=120)
        rec.flush()
        stored = rec.store.job(rec.uid(job))
        assert stored.state == "finished" and stored.finished_tasks == 200

        # a running job's counts reach the store at the flushes, without task events
        slow = m.map_async(time.sleep, [0.2] * 10)
        wait_until(lambda: slow.progress[0] >= 2, timeout=60)
        rec.flush()
        mid = rec.store.job(rec.uid(slow))
        assert mid.state == "active" and 2 <= mid.finished_tasks < 10
        slow.wait(timeout=120)
        rec.flush()
        assert rec.store.job(rec.uid(slow)).finished_tasks == 10


def test_a_job_opted_into_task_rows_turns_task_events_on(home):
    rec = st.recorder()
    with Master("local", workers=1) as m:
        assert not m.events.tasks
        job = m.map_async(square, range(50))
        rec.track(job, tasks=True)
        assert m.events.tasks
        job.result(timeout=120)
        rec.flush()
        rows = rec.store.tasks(rec.uid(job), limit=100)
        assert len(rows) == 50 and all(r.state == "done" for r in rows)
