"""Re-attaching a stored batch job from another process, and removing jobs.

The key case: a process submits a map to the stand-in schedd and is killed
with SIGKILL mid-job; a new process attaches and gets every result,
including the outputs written while nobody watched, and no task runs twice
(each run appends to a side file)."""

from __future__ import annotations

import os
import signal
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
from pymw_magic.errors import PymwError  # noqa: E402
from pymw_magic.testing.condor import StandInSchedd  # noqa: E402

TIMEOUT = 180

SUBMITTER = textwrap.dedent('''
    import sys, time
    import pymw_magic.reattach
    from pymw_magic import Master
    from pymw_magic.testing.condor import StandInSchedd

    root, count, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def make(path):
        def task(x):
            import time
            with open(path, "a") as f:
                f.write(f"{x}\\n")
            time.sleep(0.3)
            return x * 10
        return task

    m = Master("condor", schedd=StandInSchedd(root), chunksize=1)
    job = m.map_async(make(count), range(n), name="killed-mid-job")
    print("SUBMITTED", flush=True)
    time.sleep(600)
''')


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def standin(tmp_path):
    s = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    yield s
    s.stop()


def outputs(job_dir: Path) -> int:
    return len(list((job_dir / "out").glob("*.out")))


def test_killed_submitter_attach_gets_every_result_once(standin, tmp_path, home):
    n = 8
    count = tmp_path / "runs.txt"
    script = tmp_path / "submitter.py"
    script.write_text(SUBMITTER)
    env = dict(os.environ, PYTHONPATH=ROOT, PYMW_HOME=str(home))
    proc = subprocess.Popen([sys.executable, str(script), str(standin.root), str(count), str(n)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "SUBMITTED"
        st = store.open_store(home)

        def handle():
            try:
                h = st.job("killed-mid-job").handle or {}
            except store.UnknownJob:
                return None
            chunks = h.get("chunks") or {}
            return h if len(chunks) == n and all(c.get("proc") for c in chunks.values()) else None
        h = wait_until(handle, TIMEOUT, "the submitted job in the store")
        job_dir = Path(h["dir"])
        wait_until(lambda: outputs(job_dir) >= 1, TIMEOUT, "a first output")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        seen = outputs(job_dir)
        assert seen < n, "the job ended before the submitter was killed: nothing to attach to"
        # Outputs keep coming while nobody watches.
        wait_until(lambda: outputs(job_dir) > seen, TIMEOUT, "an output written after the kill")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    job = reattach.attach("killed-mid-job")
    try:
        assert job.result(timeout=TIMEOUT) == [x * 10 for x in range(n)]
        assert all(t.host for t in job.tasks)
        runs = sorted(int(line) for line in count.read_text().split())
        assert runs == list(range(n)), f"tasks ran twice or never: {runs}"
        assert standin.query() == []
        assert reattach.attach("killed-mid-job") is job  # attached once per process
    finally:
        job.master.shutdown(wait=True)
    reattach.remove("killed-mid-job")
    assert not job_dir.exists()
    with pytest.raises(store.UnknownJob):
        st.job("killed-mid-job")


def _sleepy():
    def sleepy(x):
        import time
        time.sleep(x)
        return x
    return sleepy


def test_remove_refuses_a_running_job_unless_cancel(standin):
    with Master("condor", schedd=standin) as m:
        job = m.map_async(_sleepy(), [60, 60], name="to-remove")
        wait_until(lambda: job.counts()["running"] >= 1, TIMEOUT, "a task running")
        directory = m.backend.job_dir(job)
        with pytest.raises(PymwError, match="cancel=True"):
            job.remove()
        with pytest.raises(PymwError, match="cancel=True"):
            reattach.remove("to-remove")
        job.remove(cancel=True)
        assert job.done() and not directory.exists()
        wait_until(lambda: not standin.query(), 60, "the procs removed")
        with pytest.raises(store.UnknownJob):
            store.open_store().job("to-remove")


def test_attach_with_an_overriding_schedd_and_a_finished_job(standin, tmp_path):
    with Master("condor", schedd=standin, chunksize=2) as m:
        job = m.map_async(abs, [-1, -2, -3], name="done-before")
        assert job.result(timeout=TIMEOUT) == [1, 2, 3]
    store.recorder().flush()
    again = reattach.attach("done-before", schedd=StandInSchedd(standin.root))
    try:
        assert again.result(timeout=TIMEOUT) == [1, 2, 3]
    finally:
        again.master.shutdown(wait=True)


def test_attach_refuses_pool_jobs():
    with Master("local", workers=1) as m:
        m.map_async(abs, [-1], name="pooljob").result(timeout=60)
    rec = store.recorder()
    if rec is None:
        pytest.skip("recording is off")
    with pytest.raises((PymwError, store.UnknownJob)):
        reattach.attach("pooljob")


EXITER = textwrap.dedent('''
    import sys
    import pymw_magic.reattach
    from pymw_magic import Master
    from pymw_magic.testing.condor import StandInSchedd

    def make():
        def task(x):
            import time
            time.sleep(x)
            return x
        return task

    m = Master("condor", schedd=StandInSchedd(sys.argv[1]), chunksize=1)
    job = m.map_async(make(), [60, 60], name="outlives-its-process")
    import time
    while not m.backend.worker_info():
        time.sleep(0.05)
    # the interpreter exits without shutdown(): the job must live on
''')


def test_a_batch_job_outlives_a_normal_exit(standin, tmp_path, home):
    script = tmp_path / "exiter.py"
    script.write_text(EXITER)
    env = dict(os.environ, PYTHONPATH=ROOT, PYMW_HOME=str(home))
    subprocess.run([sys.executable, str(script), str(standin.root)], env=env, timeout=TIMEOUT, check=True)
    assert len(standin.query()) == 2  # neither cancelled nor waited for at exit
    assert store.open_store(home).job("outlives-its-process").state == "active"
    job = reattach.attach("outlives-its-process")
    try:
        job.cancel()
        wait_until(lambda: not standin.query(), 60, "the procs removed")
    finally:
        job.master.shutdown(wait=True)
