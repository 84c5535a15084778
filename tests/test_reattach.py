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

from conftest import ROOT, wait_for_submitted, wait_until  # noqa: E402
import pymw_magic.reattach as reattach  # noqa: E402
from pymw_magic import Master, store  # noqa: E402
from pymw_magic.errors import PymwError  # noqa: E402
from pymw_magic.testing.condor import StandInSchedd  # noqa: E402
from condor_fixtures import home, schedd, standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 180

SUBMITTER = textwrap.dedent('''
    import sys, time
    import pymw_magic.reattach
    from pymw_magic import Master
    from pymw_magic.testing.condor import StandInSchedd

    root, count, n, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

    def make(path):
        def task(x):
            import time
            with open(path, "a") as f:
                f.write(f"{x}\\n")
            time.sleep(pause)
            return x * 10
        return task

    if root == "live":
        schedd = None  # (the local schedd, as a user's Master("condor") has it)
    else:
        schedd = StandInSchedd(root)
    m = Master("condor", schedd=schedd, chunksize=1)
    job = m.map_async(make(count), range(n), name="killed-mid-job")
    print("SUBMITTED", flush=True)
    time.sleep(600)
''')


def ours(schedd, directory) -> list:
    return [ad for ad in schedd.query(projection=["ClusterId", "ProcId", "Iwd"])
            if str(ad.get("Iwd", "")).rstrip("/") == str(directory).rstrip("/")]


def outputs(job_dir: Path) -> int:
    return len(list((job_dir / "out").glob("*.out")))


@pytest.mark.parametrize("handle_lost", [False, True], ids=["handle-saved", "killed-before-recording"])
def test_killed_submitter_attach_gets_every_result_once(schedd, tmp_path, home, handle_lost):
    n = 8
    count = tmp_path / "runs.txt"
    script = tmp_path / "submitter.py"
    script.write_text(SUBMITTER)
    env = dict(os.environ, PYTHONPATH=ROOT, PYMW_HOME=str(home))
    where = str(schedd.root) if isinstance(schedd, StandInSchedd) else "live"
    pause = 2.0 if handle_lost else 0.3  # (the last chunk must still be waiting when attached)
    proc = subprocess.Popen([sys.executable, str(script), where, str(count), str(n), str(pause)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "SUBMITTED"
        h = wait_for_submitted(home, "killed-mid-job", n, TIMEOUT)
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
    if handle_lost:
        # As if killed between the submit and the store's write: the last
        # chunk's proc and the log offset never reached the store (the
        # log's submit notes name the chunk: it must not be submitted again).
        st = store.open_store(home)
        record = st.job("killed-mid-job")
        h = dict(record.handle)
        h["chunks"] = dict(h["chunks"])
        assert not (job_dir / "out" / f"{n - 1}.out").exists(), "too late: the last chunk ran already"
        h["chunks"][str(n - 1)] = dict(h["chunks"][str(n - 1)], proc=None)
        h["engine"] = dict(h["engine"], offset=0)
        st.set_handle(record.uid, h)
    job = reattach.attach("killed-mid-job")
    try:
        assert job.result(timeout=TIMEOUT) == [x * 10 for x in range(n)]
        assert all(t.host for t in job.tasks)
        runs = sorted(int(line) for line in count.read_text().split())
        assert runs == list(range(n)), f"tasks ran twice or never: {runs}"
        # (a real schedd keeps a finished proc in its queue for a few seconds)
        wait_until(lambda: not ours(schedd, job_dir), 60, "the finished procs out of the queue")
        assert reattach.attach("killed-mid-job") is job  # attached once per process
    finally:
        job.master.shutdown(wait=True)
    reattach.remove("killed-mid-job")
    assert not job_dir.exists()
    with pytest.raises(store.UnknownJob):
        store.open_store(home).job("killed-mid-job")


def _sleepy():
    def sleepy(x):
        import time
        time.sleep(x)
        return x
    return sleepy


def test_remove_refuses_a_running_job_unless_cancel(schedd):
    with Master("condor", schedd=schedd) as m:
        job = m.map_async(_sleepy(), [60, 60], name="to-remove")
        wait_until(lambda: job.counts()["running"] >= 1, TIMEOUT, "a task running")
        directory = m.backend.job_dir(job)
        with pytest.raises(PymwError, match="cancel=True"):
            job.remove()
        with pytest.raises(PymwError, match="cancel=True"):
            reattach.remove("to-remove")
        job.remove(cancel=True)
        assert job.done() and not directory.exists()
        wait_until(lambda: not ours(schedd, directory), 60, "the procs removed")
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


def test_attach_from_many_threads_gives_one_job_and_masters_leave_no_threads(standin):
    import threading
    with Master("condor", schedd=standin) as m:
        assert m.map_async(abs, [-1, -2], name="many-attach").result(timeout=TIMEOUT) == [1, 2]
    store.recorder().flush()
    before = threading.active_count()
    got, errors = [], []

    def attach():
        try:
            got.append(reattach.attach("many-attach"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=attach) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert not errors and len(got) == 8 and all(j is got[0] for j in got)
    assert got[0].result(timeout=TIMEOUT) == [1, 2]
    got[0].master.shutdown(wait=True)
    for _ in range(5):
        with Master("condor", schedd=standin) as m:
            m.map_async(abs, [-3], name="again").result(timeout=TIMEOUT)
    wait_until(lambda: threading.active_count() <= before + 1, 30, "the backends' threads gone")


class Unrecordable(StandInSchedd):
    """A schedd object the job store cannot record (its __reduce__ holds
    no JSON): attach must be told which schedd to use."""

    def __reduce__(self):
        return (Unrecordable, (object(),))


def _gate_task(gate):
    def task(x):
        import os
        import time
        while not os.path.exists(gate):
            time.sleep(0.05)
        return x + 1
    return task


def test_an_explicit_schedd_wins_without_rebuilding_the_stored_one(standin, tmp_path):
    from pymw_magic.backends.batch import BatchError
    gate = tmp_path / "gate"
    m = Master("condor", schedd=Unrecordable(standin.root), chunksize=1)
    job = m.map_async(_gate_task(str(gate)), range(3), name="unrecordable")
    try:
        wait_until(lambda: len(standin.query()) == 3, TIMEOUT, "the procs queued")
        store.recorder().flush()
    finally:
        m.detach()
    assert store.open_store().job("unrecordable").handle["engine"]["schedd"]["kind"] == "unknown"
    gate.write_text("go")
    with pytest.raises(BatchError, match=r"schedd=<the schedd object>"):
        reattach.attach("unrecordable")
    # several threads at once, each naming the schedd: one job, no stored schedd rebuilt
    import threading
    got, errors = [], []

    def attach():
        try:
            got.append(reattach.attach("unrecordable", schedd=StandInSchedd(standin.root)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=attach) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert not errors, errors
    assert len(got) == 6 and all(j is got[0] for j in got)
    try:
        assert got[0].result(timeout=TIMEOUT) == [1, 2, 3]
    finally:
        got[0].master.shutdown(wait=True)
    # removing it needs the schedd too, and takes it
    reattach.remove("unrecordable")


def test_remove_stored_with_an_explicit_schedd(standin):
    from pymw_magic.backends.condor import CondorBackend
    m = Master("condor", schedd=Unrecordable(standin.root), chunksize=1)
    m.map_async(_sleepy(), [60, 60], name="remove-explicit")
    try:
        wait_until(lambda: len(standin.query()) == 2, TIMEOUT, "the procs queued")
        store.recorder().flush()
    finally:
        m.detach()
    handle = store.open_store().job("remove-explicit").handle
    CondorBackend.remove_stored(handle, schedd=StandInSchedd(standin.root))
    wait_until(lambda: not standin.query(), 60, "the procs removed")



def test_an_error_leaving_the_block_lets_a_running_batch_job_go_on_instead_of_waiting(standin):
    """``with Master(...)`` waits for its jobs when an ordinary exception
    leaves it (as concurrent.futures does); a batch job may run for days, or
    on BOINC wait for a volunteer forever: it is detached instead, with a
    warning saying how to follow or cancel it, and stays attachable."""
    with pytest.warns(RuntimeWarning, match=r"'slow-after-error'.*pymw_magic.attach"):
        with pytest.raises(TimeoutError):
            with Master("condor", schedd=standin, chunksize=1) as m:
                job = m.map_async(_sleepy(), [40, 40], name="slow-after-error")
                wait_until(lambda: job.counts()["running"] >= 1, TIMEOUT, "a task running")
                raised = time.monotonic()
                job.result(timeout=0.1)
    assert time.monotonic() - raised < 25, "the block waited for the job"
    assert len(standin.query()) == 2  # neither cancelled nor waited for
    store.recorder().flush()
    assert store.open_store().job("slow-after-error").state == "active"
    again = reattach.attach("slow-after-error")
    try:
        assert again.result(timeout=TIMEOUT) == [40, 40]
    finally:
        again.master.shutdown(wait=True)


def test_an_error_after_the_batch_jobs_ended_leaves_the_block_as_before(standin):
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ValueError):
            with Master("condor", schedd=standin, chunksize=1) as m:
                assert m.map_async(abs, [-1, -2], name="ended-before-error").result(timeout=TIMEOUT) == [1, 2]
                raise ValueError("in the block")
    assert not [w for w in seen if "left the 'with Master' block" in str(w.message)]
    store.recorder().flush()
    assert store.open_store().job("ended-before-error").state == "finished"
