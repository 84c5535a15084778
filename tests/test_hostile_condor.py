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

TIMEOUT = 120
#: well under the safety net's minute: the follower itself must notice
NOTICE = 30


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("PYMW_HOME", str(path))
    return path


@pytest.fixture
def standin(tmp_path):
    s = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    yield s
    s.stop()


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
