"""``spool=True``: a schedd that is not on this machine's file system.

A real schedd moves a spooled proc's working directory and user log into
its spool, so the job directory's event log never hears of it: a spooled
job is followed through the schedd's queue (one query every
``spool_interval`` seconds, the history for procs that left), a completed
proc's outputs come back with ``Schedd.retrieve`` before they are read, and
the procs' logs come back beside them (``logs/<chunk>.log``).  The stand-in
does what the real schedd does (log in the spool, outputs and log only
after retrieve); the same tests run live where a pool answers.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

htcondor2 = pytest.importorskip("htcondor2")

from conftest import wait_until  # noqa: E402
import pymw_magic.reattach as reattach  # noqa: E402
from pymw_magic import Master, store  # noqa: E402
from pymw_magic.backends.batch import BatchError  # noqa: E402
from pymw_magic.backends.condor import JobHeld  # noqa: E402
from pymw_magic.errors import TaskTimeout  # noqa: E402
from pymw_magic.testing.condor import StandInSchedd  # noqa: E402
from test_condor import by_value  # noqa: E402
from condor_fixtures import home, schedd, standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 240


def ours(schedd, job_dir) -> list:
    """The job's procs still in the queue (by the job directory's name:
    a spooled proc's Iwd is in the schedd's spool)."""
    if job_dir is None:
        return []
    return list(schedd.query(constraint=f'PymwJob == "{Path(job_dir).name}"',
                             projection=["ClusterId", "ProcId", "JobStatus"]))


def _square(x):
    if x == 3:
        raise ValueError("three is not welcome")
    print("squaring", x)
    return x * x


square = by_value(_square)


def test_a_spooled_map_comes_back_through_the_queue_and_retrieve(schedd):
    with Master("condor", schedd=schedd, spool=True, chunksize=2) as m:
        job = m.map_async(square, range(6), name="spooled-map")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
        d = m.backend.job_dir(job)
    assert out[:3] == [0, 1, 4] and out[4:] == [16, 25]
    assert type(out[3]) is ValueError and "three is not welcome" in str(out[3])
    assert "ValueError: three" in job.tasks[3].remote_traceback
    assert job.tasks[2].stdout == "squaring 2\n"
    assert all(t.host for t in job.tasks) and all(t.attempts == 1 for t in job.tasks)
    # the outputs and each proc's log came back with retrieve; the job
    # directory's own event log was never the way to follow it
    assert sorted(p.name for p in (d / "out").glob("*.out")) == ["0.out", "1.out", "2.out"]
    assert sorted(p.name for p in (d / "logs").iterdir()) == ["0.log", "1.log", "2.log"]
    assert not (d / "events.log").exists()
    wait_until(lambda: not ours(schedd, d), 90, "the retrieved procs out of the queue")


def test_a_spooled_input_that_does_not_exist_fails_at_submit_and_leaves_nothing(schedd, tmp_path):
    missing = tmp_path / "does_not_exist.dat"
    with Master("condor", schedd=schedd, spool=True, retries=0, transfer_files=[str(missing)]) as m:
        job = m.map_async(abs, [-1, -2], name="spool-missing")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
        d = m.backend.job_dir(job)
    assert all(isinstance(e, BatchError) for e in out), out
    assert "does_not_exist.dat" in str(out[0]) and "spool" in str(out[0])
    wait_until(lambda: not ours(schedd, d), 60, "nothing of the cluster in the queue")


def test_cancelling_a_spooled_job_removes_its_procs(schedd):
    with Master("condor", schedd=schedd, spool=True, chunksize=1) as m:
        job = m.map_async(time.sleep, [120] * 3, name="spool-cancel")
        wait_until(lambda: job.counts()["running"] >= 1, TIMEOUT, "a spooled task running")
        d = m.backend.job_dir(job)
        assert job.cancel() == 3
        wait_until(lambda: not ours(schedd, d), 90, "the procs removed")
        assert job.done() and job.counts()["cancelled"] == 3


def test_a_held_spooled_proc_is_job_held_and_removed(standin):
    standin.inject_fault("hold", proc=0, reason="policy said no", code=26, subcode=3)
    with Master("condor", schedd=standin, spool=True, retries=0) as m:
        job = m.map_async(abs, [-1], name="spool-held")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
        d = m.backend.job_dir(job)
    assert isinstance(err, JobHeld) and err.HoldReasonCode == 26 and err.HoldReasonSubCode == 3, err
    assert "policy said no" in str(err)
    wait_until(lambda: not ours(standin, d), 60, "the held proc removed")


def test_an_evicted_spooled_proc_runs_again(standin):
    standin.inject_fault("evict", proc=0, reason="the owner came back")

    def slow(x):
        import time
        time.sleep(4)  # (evicted just after it starts: seen running, then idle)
        return -x
    with Master("condor", schedd=standin, spool=True) as m:
        job = m.map_async(by_value(slow), [5], name="spool-evict")
        assert job.result(timeout=TIMEOUT) == [-5]
        d = m.backend.job_dir(job)
    [ad] = standin.history(constraint=f'PymwJob == "{d.name}"', projection=["NumJobStarts", "JobStatus"])
    assert ad["NumJobStarts"] == 2 and ad["JobStatus"] == 4  # (it was evicted, and ran again)


def test_a_spooled_proc_past_its_timeout_is_a_task_timeout(standin):
    with Master("condor", schedd=standin, spool=True, timeout=1) as m:
        job = m.map_async(time.sleep, [120], name="spool-slow")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
        d = m.backend.job_dir(job)
    assert isinstance(err, TaskTimeout), err
    wait_until(lambda: not ours(standin, d), 60, "the proc removed")


def _gated(gate):
    def task(x):
        import os
        import time
        while not os.path.exists(gate):
            time.sleep(0.05)
        return x * 100
    return task


def test_a_spooled_job_attached_later_retrieves_what_finished_meanwhile(standin, tmp_path):
    gate = tmp_path / "gate"
    m = Master("condor", schedd=standin, spool=True, chunksize=1)
    job = m.map_async(_gated(str(gate)), range(3), name="spool-attach")
    try:
        wait_until(lambda: len(ours(standin, m.backend.job_dir(job))) == 3, TIMEOUT, "the 3 procs queued")
        d = m.backend.job_dir(job)
        store.recorder().flush()
    finally:
        m.detach()
    gate.write_text("go")
    # finished while no one watched: outputs still in the spool, procs completed in the queue
    wait_until(lambda: [a["JobStatus"] for a in ours(standin, d)] == [4, 4, 4], TIMEOUT, "the procs completed")
    assert not list((d / "out").glob("*.out"))
    again = reattach.attach("spool-attach")
    try:
        assert again.result(timeout=TIMEOUT) == [0, 100, 200]
    finally:
        again.master.shutdown(wait=True)
    assert len(list((d / "out").glob("*.out"))) == 3
    wait_until(lambda: not ours(standin, d), 60, "the retrieved procs out of the queue")


class FlakyRetrieve(StandInSchedd):
    """A schedd whose retrieve fails the first ``fail`` times (a network
    blip between the submitter and a remote schedd)."""

    fail = 1
    calls = 0

    def retrieve(self, job_spec):
        type(self).calls += 1
        if type(self).calls <= type(self).fail:
            raise htcondor2.HTCondorException("DCSchedd::receiveJobSandbox: connection reset (injected)")
        return super().retrieve(job_spec)


@pytest.mark.parametrize("fail", [1, 10], ids=["once", "always"])
def test_a_failed_retrieve_is_tried_again_then_named(tmp_path, fail):
    FlakyRetrieve.fail, FlakyRetrieve.calls = fail, 0
    s = FlakyRetrieve(tmp_path / "schedd", slots=2, idle_timeout=120)
    try:
        with Master("condor", schedd=s, spool=True, retries=0) as m:
            job = m.map_async(abs, [-3], name="flaky")
            [out] = job.result(timeout=TIMEOUT, return_exceptions=True)
        if fail == 1:
            assert out == 3 and FlakyRetrieve.calls == 2
        else:
            assert isinstance(out, BatchError), out
            assert "retrieving its output" in str(out) and "connection reset (injected)" in str(out)
            assert FlakyRetrieve.calls == 3
    finally:
        s.stop()


def test_many_spooled_jobs_at_once_from_many_threads(standin):
    with Master("condor", schedd=standin, spool=True, chunksize=2) as m:
        jobs: list = []
        errors: list = []

        def go(k):
            try:
                jobs.append((k, m.map_async(abs, [-k, -k - 1, -k - 2], name=f"spool-thread-{k}")))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=go, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors and len(jobs) == 6
        for k, job in jobs:
            assert job.result(timeout=TIMEOUT) == [k, k + 1, k + 2]
