"""The job store attached to every master: no call to the store is needed
for a script's or a kernel's jobs to be recorded, ``PYMW_STORE=0`` turns
it off, the files stay owner-only whatever the umask, and kernels and
scripts writing at once lose nothing.  The test run itself never writes
the user's data directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

import conftest
from conftest import ROOT
from pymw_magic import Master
from pymw_magic import store as st
from pymw_magic.store import Store
from test_jobs_magic import kernels, ok  # noqa: F401  (a fixture and a helper)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PYMW_STORE", None)
    env.update(extra)
    return env


def test_the_test_run_has_a_store_of_its_own():
    from platformdirs import user_data_dir
    assert os.environ["PYMW_HOME"] == conftest.TEST_HOME  # inherited by every kernel and script the tests start
    assert os.path.realpath(conftest.TEST_HOME) != os.path.realpath(user_data_dir("pymw-magic", appauthor=False))
    assert st.default_home() == st.Path(conftest.TEST_HOME)
    with Master("local", workers=1) as m:
        rec = st.recorder()
        assert rec is not None and rec.attached(m) and rec.store.path == st.Path(conftest.TEST_HOME) / "jobs.db"


@pytest.mark.timeout(120)
def test_a_scripts_masters_are_recorded_without_asking_and_owner_only_under_any_umask(home, tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent("""
        import os
        os.umask(0)  # the most permissive: the store must not follow it
        from pymw_magic import Master
        with Master("local", workers=1) as m:
            assert m.map_async(abs, range(-30, 30), name="unasked").result() == [abs(x) for x in range(-30, 30)]
        m2 = Master("local", workers=1)
        assert m2.submit(abs, -1).result() == 1
        m2.shutdown()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90,
                         env=child_env(PYMW_HOME=str(home)))
    assert out.returncode == 0, out.stderr
    jobs = {j.name: j for j in Store(home).jobs()}
    assert jobs["unasked"].state == "finished" and jobs["unasked"].counts["done"] == 60
    assert jobs["unasked"].owner.kind == "script" and jobs["unasked"].owner.script == str(script)
    assert jobs["submit:abs"].state == "finished" and jobs["submit:abs"].counts["done"] == 1
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    for name in os.listdir(home):
        if name.startswith("jobs.db"):
            assert stat.S_IMODE(os.stat(home / name).st_mode) == 0o600, name


@pytest.mark.timeout(120)
def test_a_listing_right_after_map_async_names_the_new_job_not_an_older_namesake(home):
    """``pymw_magic.jobs()`` / ``store.job(name)`` write what this process
    still holds first: the job just started is there at once."""
    with Master("local", workers=1) as m:
        for trial in range(20):
            job = m.map_async(abs, [-trial], name="same-name")
            assert st.job("same-name").uid == st.recorder().uid(job), trial
            assert st.jobs()[0].uid == st.recorder().uid(job), trial
            assert job.wait(timeout=60)


@pytest.mark.timeout(120)
def test_pymw_store_0_in_a_process_records_nothing(home, tmp_path):
    code = ("from pymw_magic import Master\n"
            "with Master('local', workers=1) as m:\n"
            "    assert m.map_async(abs, range(5), name='off').result() == list(range(5))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                         env=child_env(PYMW_HOME=str(home), PYMW_STORE="0"))
    assert out.returncode == 0, out.stderr
    assert not home.exists()


WRITER = """
import sys
from pymw_magic import Master
n, k = sys.argv[1], int(sys.argv[2])
with Master("local", workers=1) as m:
    for i in range(k):
        assert m.map_async(abs, range(-20, 20), name=f"script{n}-{i}").result() == [abs(x) for x in range(-20, 20)]
print("ok", flush=True)
"""


@pytest.mark.timeout(400)
def test_kernels_and_scripts_writing_at_once_lose_nothing(home, kernels, tmp_path):  # noqa: F811
    n_kernels, n_scripts, k = 2, 3, 8
    started = [kernels() for _ in range(n_kernels)]
    for _, kc, _ in started:
        ok(kc, "%load_ext pymw_magic\n%pymw use local --workers 1")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    # every writer at once: the scripts in their processes, each kernel on a thread of ours
    procs = [subprocess.Popen([sys.executable, str(script), str(n), str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env(PYMW_HOME=str(home)))
             for n in range(n_scripts)]
    errors: list[str] = []

    def drive(index: int, kc) -> None:
        for i in range(k):
            error = ok_or_error(kc, f"%%pymw --map x in range(40) --name kernel{index}-{i}\nabs(x - 20)")
            if error:
                errors.append(error)

    def ok_or_error(kc, code: str) -> str | None:
        try:
            ok(kc, code)
        except AssertionError as exc:  # reported by the test below, naming it
            return str(exc)
        return None

    threads = [threading.Thread(target=drive, args=(i, kc)) for i, (_, kc, _) in enumerate(started)]
    for t in threads:
        t.start()
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for t in threads:
            t.join(timeout=300)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    assert not errors, errors
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err
        assert "Traceback" not in err and "locked" not in err, err
    # each kernel's last job is written at its end (the flusher is woken by it)
    expected = {f"script{n}-{i}" for n in range(n_scripts) for i in range(k)} | \
        {f"kernel{n}-{i}" for n in range(n_kernels) for i in range(k)}
    conftest.wait_until(lambda: {j.name for j in Store(home).jobs() if j.state == "finished"} >= expected,
                        what="every job of every writer to be recorded finished")
    jobs = Store(home).jobs()
    assert sorted(j.name for j in jobs) == sorted(expected)
    for j in jobs:
        assert j.counts["done"] == 40 and j.total == 40 and j.counts["failed"] == 0, j
    kinds = {j.name.rstrip("0123456789-"): j.owner.kind for j in jobs}
    assert kinds == {"script": "script", "kernel": "kernel"}


def square(x):
    return x * x


@pytest.mark.timeout(120)
def test_track_with_a_uid_continues_the_stored_row_and_drops_only_its_own_fresh_one(home, monkeypatch):
    monkeypatch.setenv("PYMW_STORE", "0")  # only this test's own recorders write
    first = st.JobRecorder(Store(home))
    with Master("local", workers=1) as m:
        first.attach(m)
        job = m.map_async(square, range(10), name="original")
        assert job.result(timeout=60) == [x * x for x in range(10)]
        first.flush()
        first.detach(m)
        stored_uid = first.uid(job)
        keep = m.map_async(square, range(3), name="bystander")
        keep.result(timeout=60)
        keep_uid = first.track(keep)
        first.flush()
    again = st.JobRecorder(Store(home))  # as a process that attaches the job later
    with Master("local", workers=1) as m:
        again.attach(m)
        job = m.map_async(square, range(10, 30), name="original")
        fresh = again.uid(job)
        job.result(timeout=60)
        again.flush()  # a row under a fresh id was written meanwhile
        assert {j.uid for j in Store(home).jobs()} == {stored_uid, keep_uid, fresh}
        assert again.track(job, uid=stored_uid) == stored_uid
        again.flush()
        rows = {j.uid: j for j in Store(home).jobs()}
        assert set(rows) == {stored_uid, keep_uid}  # the fresh row went, the stored one continued
        assert rows[stored_uid].counts["done"] == 20 and rows[stored_uid].total == 20
        # adopted twice (a caller's mistake): no stored job's row is ever deleted for it
        again.track(job, uid=keep_uid)
        again.flush()
        assert {j.uid for j in Store(home).jobs()} == {stored_uid, keep_uid}


@pytest.mark.timeout(120)
def test_a_job_removed_right_after_it_ended_stays_removed(home):
    import pymw_magic

    with Master("local", workers=1) as m:
        for i in range(20):
            assert m.map_async(square, range(5), name=f"gone-{i}").result(timeout=60) == [x * x for x in range(5)]
            pymw_magic.remove(f"gone-{i}")  # no wait for the flusher: remove finds it all the same
        kept = m.map_async(square, range(5), name="kept")
        kept.result(timeout=60)
        st.recorder().flush()
    st.recorder().flush()
    assert [j.name for j in Store(home).jobs()] == ["kept"]


@pytest.mark.timeout(120)
def test_a_removed_job_is_not_written_again_by_a_late_event(home):
    """After job.remove() nothing of the job is written again: an event
    that arrives late (a cancel racing the removal from another thread),
    a track() or a handle for it does not bring its row back."""
    from pymw_magic.events import JobChanged, TasksChanged

    with Master("local", workers=1) as m:
        for i in range(5):
            job = m.map_async(square, range(3), name=f"late-{i}")
            assert job.result(timeout=60) == [0, 1, 4]
            job.remove()
            rec = st.recorder()
            rec(JobChanged(job, "cancelled", 0.0))
            rec(TasksChanged(job, list(job.tasks), job.tasks[0].state, 0.0))
            rec.set_handle(job, late=True)
            rec.track(job)
            rec.flush()
            assert [j.name for j in Store(home).jobs() if j.name.startswith("late-")] == [], i


@pytest.mark.timeout(180)
def test_a_finished_job_its_caller_dropped_is_let_go_and_still_written(home, monkeypatch):
    import gc
    import weakref

    monkeypatch.setenv("PYMW_STORE", "0")  # only this test's recorder, which records every task too
    rec = st.JobRecorder(Store(home), tasks=True)
    with Master("local", workers=1) as m:
        rec.attach(m)
        for trial in range(20):
            job = m.map_async(square, range(30), name=f"dropped-{trial}")
            assert job.result(timeout=60) == [x * x for x in range(30)]
            ref = weakref.ref(job)
            del job
            conftest.wait_until(lambda: gc.collect() is not None and ref() is None, timeout=10,
                                what="the dropped job to be collected (the recorder holds it weakly)")
        rec.flush()
    store = Store(home)
    jobs = store.jobs()
    assert sorted(j.name for j in jobs) == sorted(f"dropped-{i}" for i in range(20))
    for j in jobs:
        assert j.state == "finished" and j.counts["done"] == 30
        assert store.count_tasks(j.uid, "done") == 30  # its last task rows were kept when it ended


def test_a_finished_job_is_let_go_while_the_recorder_waits_for_a_busy_store(home):
    """The recorder's flush held the last job it looked at (a loop variable)
    for as long as its write waited: a finished job the caller dropped stayed
    alive while another process held the store's write lock (seen in the
    suite as 'finished jobs dropped by the caller are let go' failing)."""
    import gc
    import sqlite3
    import weakref

    with Master("local", workers=1) as m:
        assert m.map_async(abs, [-1], name="warm").result(timeout=60) == [1]
        rec = st.recorder()
        rec.flush()
        path = st.open_store(home).path
        blocker = sqlite3.connect(path, timeout=5, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another writer: the flush waits
            job = m.map_async(abs, [-2, -3], name="dropped")
            assert job.result(timeout=60) == [2, 3]
            ref = weakref.ref(job)
            del job
            # the flush the job's end woke is under way, waiting on the lock
            conftest.wait_until(lambda: rec._flush_lock.locked(), 30, "the recorder flushing")

            def let_go():
                gc.collect()
                return ref() is None
            conftest.wait_until(let_go, 5, "the dropped job let go while the flush waits")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        rec.flush()
    assert st.open_store(home).job("dropped").state == "finished"
