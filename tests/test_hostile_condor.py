"""The HTCondor backend attacked as a hostile user would, on the stand-in
schedd: the event log truncated or deleted under the follower, a job
attached with a schedd that never ran it, two processes following one job.

Each test here failed on the code before its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("htcondor2")

from conftest import ROOT, wait_until  # noqa: E402
import pymw_magic.reattach as reattach  # noqa: E402
from pymw_magic import Master, store  # noqa: E402
from pymw_magic.backends.batch import BatchError  # noqa: E402
from pymw_magic.errors import PymwError  # noqa: E402
from pymw_magic.testing.condor import StandInSchedd  # noqa: E402
from condor_fixtures import home, standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 120
#: well under the safety net's minute: the follower itself must notice
NOTICE = 30


def _sleeper():
    def sleeper(x):
        import time
        time.sleep(x)
        return x
    return sleeper


def ours(schedd, directory) -> list:
    return [ad for ad in schedd.query(projection=["ClusterId", "ProcId", "Iwd"])
            if str(ad.get("Iwd", "")).rstrip("/") == str(directory).rstrip("/")]


def test_truncated_event_log_is_an_error_naming_the_file(standin):
    with Master("condor", schedd=standin) as m:
        job = m.map_async(_sleeper(), [60], name="truncated-log")
        wait_until(lambda: job.counts()["running"] == 1, TIMEOUT, "the task running")
        directory = m.backend.job_dir(job)
        log = directory / "events.log"
        with open(log, "r+") as f:
            f.truncate(log.stat().st_size // 2)
        [err] = job.result(timeout=NOTICE, return_exceptions=True)
        assert isinstance(err, BatchError) and str(log) in str(err) and "truncated" in str(err), err
        wait_until(lambda: not ours(standin, directory), 60, "the procs removed")


def test_deleted_job_directory_is_an_error_naming_the_log(standin):
    with Master("condor", schedd=standin) as m:
        job = m.map_async(_sleeper(), [60], name="dir-deleted")
        wait_until(lambda: job.counts()["running"] == 1, TIMEOUT, "the task running")
        directory = m.backend.job_dir(job)
        shutil.rmtree(directory)
        [err] = job.result(timeout=NOTICE, return_exceptions=True)
        assert isinstance(err, BatchError) and str(directory / "events.log") in str(err), err
        wait_until(lambda: not ours(standin, directory), 60, "the procs removed")


def _counting(path):
    def task(x):
        import time
        with open(path, "a") as f:
            f.write(f"{x}\n")
        time.sleep(x)
        return x
    return task


def test_attach_with_a_schedd_that_never_ran_the_job_is_refused(standin, tmp_path):
    other = StandInSchedd(tmp_path / "other", slots=2, idle_timeout=120)
    runs = tmp_path / "runs.txt"
    try:
        other.query()  # (a schedd that answers, with an empty queue)
        m = Master("condor", schedd=standin, chunksize=1)
        job = m.map_async(_counting(str(runs)), [3, 3], name="wrong-schedd")
        wait_until(lambda: job.counts()["running"] == 2, TIMEOUT, "both tasks running")
        directory = m.backend.job_dir(job)
        m.detach()  # (as at interpreter exit: the procs run on)
        store.recorder().flush()
        del job
        with pytest.raises(PymwError, match="another schedd") as info:
            reattach.attach("wrong-schedd", schedd=other)
        assert str(standin.root) in str(info.value)
        assert not other.query()  # nothing submitted there
        again = reattach.attach("wrong-schedd")  # the recorded schedd: followed there
        try:
            assert again.result(timeout=TIMEOUT) == [3, 3]
        finally:
            again.master.shutdown(wait=True)
        assert sorted(runs.read_text().split()) == ["3", "3"]  # each task ran once
        assert not ours(standin, directory)
    finally:
        other.stop()


FOLLOWER = textwrap.dedent('''
    import os, sys, time
    import pymw_magic.reattach
    from pymw_magic import Master
    from pymw_magic.testing.condor import StandInSchedd

    def make(path):
        def task(x):
            import time
            with open(path, "a") as f:
                f.write(f"{x}\\n")
            time.sleep(x)
            return x
        return task

    m = Master("condor", schedd=StandInSchedd(sys.argv[1]), chunksize=1)
    job = m.map_async(make(sys.argv[2]), [4, 4, 4], name="followed-elsewhere")
    while not m.backend.worker_info():
        time.sleep(0.05)
    print("FOLLOWING", os.getpid(), flush=True)
    time.sleep(600)
''')


def test_a_job_followed_by_a_live_process_is_not_attached_twice(standin, tmp_path, home):
    runs = tmp_path / "runs.txt"
    script = tmp_path / "follower.py"
    script.write_text(FOLLOWER)
    env = dict(os.environ, PYTHONPATH=ROOT, PYMW_HOME=str(home))
    proc = subprocess.Popen([sys.executable, str(script), str(standin.root), str(runs)], stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["FOLLOWING"], line
        st = store.open_store(home)

        def recorded():
            try:
                return (st.job("followed-elsewhere").handle or {}).get("chunks")
            except store.UnknownJob:
                return None
        wait_until(recorded, TIMEOUT, "the job in the store")
        # Two followers would both retry a failed chunk: the task would run twice.
        with pytest.raises(PymwError, match=rf"followed by another process \(pid {line[1]}\)"):
            reattach.attach("followed-elsewhere")
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    job = reattach.attach("followed-elsewhere")  # its follower is gone: now it may be followed here
    try:
        assert job.result(timeout=TIMEOUT) == [4, 4, 4]
    finally:
        job.master.shutdown(wait=True)
    assert sorted(runs.read_text().split()) == ["4", "4", "4"]


def test_recording_while_the_pump_writes_chunks_never_fails(standin, caplog):
    import logging
    caplog.set_level(logging.WARNING, logger="pymw_magic")
    for trial in range(4):
        m = Master("condor", schedd=standin, chunksize=1)
        job = m.map_async(abs, range(10_000), name=f"detached-while-chunking-{trial}")
        wait_until(lambda: (d := m.backend.job_dir(job)) is not None and len(os.listdir(d / "in")) >= 2000,
                   TIMEOUT, "many chunks written")
        m.detach()  # records every job's handle while the pump still writes chunks
        job.cancel()
        failures = [r.getMessage() for r in caplog.records if "job store failed" in r.getMessage()]
        assert not failures, failures


def test_removing_a_running_job_leaves_no_directory_behind(standin):
    # The schedd writes the removed procs' last events into the job
    # directory as they leave: deleting it before then left it half-made.
    with Master("condor", schedd=standin, chunksize=1) as m:
        for trial in range(4):
            job = m.map_async(_sleeper(), [60, 60], name=f"removed-running-{trial}")
            wait_until(lambda: job.counts()["running"] >= 1, TIMEOUT, "a task running")
            directory = m.backend.job_dir(job)
            job.remove(cancel=True)
            assert job.done() and not ours(standin, directory)
            assert not directory.exists(), sorted(p.name for p in directory.rglob("*"))


# --- round 3: leaks, cancel during submit, Ctrl-C during a spooled retrieve ---------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_jobs_in_a_row_leave_nothing_behind(standin):
    """One master, job after job: the scheduler's per-worker maps, the
    backend's tables, open files and threads stay flat (each chunk is a
    fresh worker name, each job a fresh log and follow lock)."""
    import gc
    import threading
    with Master("condor", schedd=standin, chunksize=1) as m:
        backend = m.backend
        sched = backend.scheduler

        def sizes():
            gc.collect()
            return {"worker_hosts": len(sched.worker_hosts),
                    "tasks_per_worker": len(sched.tasks_per_worker),
                    "jobs": len(backend._jobs), "by_proc": len(backend._by_proc),
                    "batch_chunks": len(backend._batch_chunks), "outcomes": len(backend._batch_outcomes),
                    "worker_batch": len(backend._worker_batch), "claims": len(backend._claims),
                    "dirs": len(backend._dirs), "logs": len(backend._logs), "limits": len(backend._limits),
                    "began": len(backend._began)}

        def run(k):
            job = m.map_async(abs, [-1, -2, -3], name=f"row-{k}")
            assert job.result(timeout=TIMEOUT) == [1, 2, 3]
            wait_until(lambda: not backend._jobs, 30, "the finished job let go")

        def settle():
            # (the follower lets a finished job's directory go just after its result)
            wait_until(lambda: sizes()["dirs"] == 0, 60, "the finished jobs' directories let go")

        for k in range(5):  # (warm up: the runtime zipapp cached, threads started)
            run(k)
        settle()
        before, fds, threads = sizes(), _open_fds(), threading.active_count()
        for k in range(5, 35):
            run(k)
        settle()
        after = sizes()
        assert after == before, (before, after)
        assert after["worker_hosts"] <= 1 and after["by_proc"] == 0 and after["claims"] == 0, after
        assert _open_fds() <= fds + 2, (fds, _open_fds())
        assert threading.active_count() <= threads + 1


class SlowSubmit(StandInSchedd):
    """A schedd whose submit takes a while (a real one: seconds for a big cluster)."""

    delay = 3.0
    entered = None

    def submit(self, *args, **kwargs):
        type(self).entered.set()
        time.sleep(type(self).delay)
        return super().submit(*args, **kwargs)


@pytest.mark.parametrize("spool", [False, True], ids=["plain", "spool"])
def test_cancel_during_the_submit_leaves_nothing_queued(tmp_path, spool):
    import threading
    for trial in range(3):
        SlowSubmit.entered = threading.Event()
        SlowSubmit.delay = 0.5 + trial
        s = SlowSubmit(tmp_path / f"schedd{trial}", slots=2, idle_timeout=120)
        try:
            with Master("condor", schedd=s, chunksize=1, spool=spool) as m:
                job = m.map_async(_sleeper(), [60] * 4, name=f"cancel-in-submit-{trial}")
                assert SlowSubmit.entered.wait(TIMEOUT)
                assert job.cancel() == 4  # while the schedd is still taking the cluster
                assert job.done() and job.counts()["cancelled"] == 4
                # what the schedd accepted after the cancel leaves its queue at once
                wait_until(lambda: s.history(projection=["ClusterId"]) and not s.query(), TIMEOUT,
                           "the cluster submitted during the cancel removed")
        finally:
            s.stop()


class SlowRetrieve(StandInSchedd):
    """A remote schedd slow to hand back outputs."""

    entered = None

    def retrieve(self, job_spec):
        type(self).entered.set()
        time.sleep(3)
        return super().retrieve(job_spec)


def test_ctrl_c_during_a_spooled_retrieve_cancels_cleanly(tmp_path):
    import signal
    import threading
    SlowRetrieve.entered = threading.Event()
    s = SlowRetrieve(tmp_path / "schedd", slots=2, idle_timeout=120)
    try:
        before = threading.active_count()
        m = Master("condor", schedd=s, chunksize=1, spool=True)
        job = m.map_async(_sleeper(), [0, 60, 60], name="ctrl-c-retrieve")
        threading.Thread(target=lambda: SlowRetrieve.entered.wait(TIMEOUT) and os.kill(os.getpid(), signal.SIGINT),
                         daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            job.result(timeout=TIMEOUT)
        assert SlowRetrieve.entered.is_set()
        wait_until(lambda: not s.query(), TIMEOUT, "the spooled procs removed")
        m.shutdown(wait=True)
        assert job.done()
        assert job.tasks[0].state.value in ("done", "cancelled")
        assert all(t.state.value == "cancelled" for t in job.tasks[1:])
        wait_until(lambda: threading.active_count() <= before, 30, "the backend's threads gone")
    finally:
        s.stop()


def test_the_follower_reads_chunks_while_the_pump_adds_them(standin):
    """The pump adds chunks (under the backend's lock) while the follower
    looks for procs gone from the queue: a dict changing size under the
    follower's iteration would fail the whole job as a broken engine."""
    import threading
    from pymw_magic.backends.batch import Chunk, JobState

    class FakeDir:
        path = Path("/nonexistent-race-dir")

    with Master("condor", schedd=standin, spool=True) as m:
        b = m.backend
        job = m.map_async(abs, [-1], name="chunks-race")
        assert job.result(timeout=TIMEOUT) == [1]
        state = JobState(job, FakeDir())
        stop = threading.Event()

        def pump():
            i = 0
            while not stop.is_set():
                with b._lock:
                    c = Chunk(i, state, [i])
                    c.state = "ended"
                    state.chunks[i] = c
                    if len(state.chunks) > 2000:
                        state.chunks.clear()
                i += 1
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        t = threading.Thread(target=pump)
        t.start()
        try:
            for _ in range(200):
                b._spool_missing([state], set())
                b.safety_check([state])
        finally:
            stop.set()
            t.join(timeout=30)
            sys.setswitchinterval(old)
