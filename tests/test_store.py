"""The job store: what a real master's jobs leave in it, who can read it,
and what happens when its owner dies, many processes write at once, or the
file cannot be used.  Every test uses its own ``PYMW_HOME`` under tmp_path."""

from __future__ import annotations

import os
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import psutil
import pytest

from conftest import wait_gone, worker_processes
from conftest import wait_until as wait_for
from pymw_magic import Master
from pymw_magic import store as st
from pymw_magic.store import JobRecorder, Store, StoreError, UnknownJob

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def square(x):
    return x * x


def fail_on_seven(x):
    if x == 7:
        raise ValueError(f"seven is bad: {x}")
    return x


def nap(seconds):
    time.sleep(seconds)
    return seconds


def stored(home, name_or_uid, state=None):
    """The stored job once it exists (and is in ``state``), else None."""
    try:
        rec = Store(home).job(name_or_uid)
    except UnknownJob:
        return None
    return rec if state is None or rec.state == state else None


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A python3 kernel spec running this interpreter, whose kernels (and
    their workers) import this checkout.  (Defined here, not imported from
    test_notebooks: workers import this module to unpickle its functions,
    and nbformat would slow every worker's first task by seconds.)"""
    import json

    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pymw-magic tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", ROOT + (os.pathsep + path if path else ""))


@pytest.fixture
def local():
    m = Master("local", workers=2)
    try:
        yield m
    finally:
        m.shutdown(wait=True, cancel_futures=True)


def child_env(home, **extra):
    env = dict(os.environ, PYMW_HOME=str(home), PYTHONPATH=ROOT, **extra)
    env.pop("PYMW_STORE", None)
    return env


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"the child printed nothing within {timeout} s")
    return proc.stdout.readline().strip()


# --- what a job leaves in the store ---------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_local_job_is_recorded_with_its_counts_options_and_owner(home, local):
    rec = st.record(local)
    assert rec is not None and rec.store.path == home / "jobs.db"
    job = local.map_async(square, range(500), name="squares", chunksize=7)
    assert job.result(timeout=30) == [x * x for x in range(500)]
    r = wait_for(lambda: stored(home, "squares", "finished"), what="the job to show finished")
    assert r.uid == rec.uid(job) and len(r.uid) == 32
    assert r.job_id == job.id and r.backend == "local" and r.family == "pool"
    assert r.counts == {"pending": 0, "running": 0, "retrying": 0, "done": 500, "failed": 0, "cancelled": 0}
    assert r.total == 500 and r.ended is not None and r.ended >= r.created
    assert r.options["workers"] == 2 and r.options["chunksize"] == 7 and r.options["policy"] == "fifo"
    assert r.owner.pid == os.getpid() and r.owner.host == st.HOST and r.owner.alive() is True
    assert r.owner.kind == "script" and r.owner.script and os.path.isfile(r.owner.script)
    assert r.notebook is None and r.handle is None and not r.cancel_requested
    assert r.tasks_recorded is False and Store(home).tasks(r.uid) == []  # a pool job: counts only
    assert "squares" in repr(r) and "finished" in repr(r) and "500/500" in repr(r)
    table = repr(st.jobs())
    assert table.splitlines()[0].split()[:4] == ["id", "name", "backend", "state"]
    assert r.uid[:8] in table and "squares" in table
    assert r.as_dict()["owner"]["pid"] == os.getpid()


@pytest.mark.timeout(60)
def test_store_file_and_directory_are_readable_by_their_owner_only(home, local):
    st.record(local)
    local.map_async(square, range(50), name="perm").result(timeout=30)
    wait_for(lambda: stored(home, "perm", "finished"), what="the job to be written")
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    for name in ("jobs.db", "jobs.db-wal", "jobs.db-shm"):
        assert stat.S_IMODE(os.stat(home / name).st_mode) == 0o600, name
    with sqlite3.connect(home / "jobs.db") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(st.SCHEMA_VERSION)


@pytest.mark.timeout(60)
def test_failed_and_cancelled_jobs_end_in_those_states(home, local):
    st.record(local)
    bad = local.map_async(fail_on_seven, range(20), name="bad")
    bad.wait(timeout=30)
    r = wait_for(lambda: stored(home, "bad", "failed"), what="the failing job to show failed")
    assert r.counts["failed"] == 1 and r.counts["done"] == 19
    slow = local.map_async(nap, [0.2] * 40, name="slow")
    wait_for(lambda: slow.counts()["done"] >= 1, what="a first task to finish")
    slow.cancel()
    assert slow.wait(timeout=30)
    r = wait_for(lambda: stored(home, "slow", "cancelled"), what="the cancelled job to show cancelled")
    assert r.counts["cancelled"] > 0 and r.counts["running"] == 0 and r.ended is not None


@pytest.mark.timeout(60)
def test_submitted_tasks_share_one_row_across_reopenings(home, local):
    st.record(local)
    assert local.submit(square, 3).result(timeout=30) == 9
    first = wait_for(lambda: stored(home, "submit:square", "finished"), what="the submit job")
    assert local.submit(square, 4).result(timeout=30) == 16
    wait_for(lambda: (r := stored(home, "submit:square")) and r.counts["done"] == 2 and r.state == "finished",
             what="the second submitted task to be counted")
    rows = [j for j in Store(home).jobs() if j.name == "submit:square"]
    assert [j.uid for j in rows] == [first.uid]


@pytest.mark.timeout(60)
def test_readers_list_newest_first_find_by_name_or_prefix_and_remove(home, local):
    st.record(local)
    first = local.map_async(square, range(10), name="twin")
    first.result(timeout=30)
    second = local.map_async(square, range(20), name="twin")
    second.result(timeout=30)
    wait_for(lambda: (r := stored(home, "twin", "finished")) and r.total == 20, what="the second twin")
    running = local.map_async(nap, [0.3] * 30, name="running")
    wait_for(lambda: stored(home, "running"), what="the running job to be written")
    store = Store(home)
    names = [j.name for j in store.jobs()]
    assert names == ["running", "twin", "twin"]
    assert [j.name for j in store.jobs(limit=2)] == ["running", "twin"]
    assert [j.name for j in store.jobs(all=False)] == ["running"]
    rec = st.recorder()
    uid = rec.uid(second)
    assert store.job("twin").uid == uid                   # the newest of that name
    assert store.job(uid[:10]).uid == uid and store.job(rec.uid(first)).total == 10
    with pytest.raises(UnknownJob, match="no job 'nothing'"):
        store.job("nothing")
    with pytest.raises(StoreError, match="still active"):
        store.remove(rec.uid(running))
    assert store.remove(uid) is True and store.remove(uid) is False
    assert store.job("twin").uid == rec.uid(first)
    running.cancel()
    assert running.wait(timeout=30)


@pytest.mark.timeout(60)
def test_prune_deletes_jobs_that_ended_long_ago_only(home, local):
    rec = JobRecorder(st.open_store(), tasks=True)
    rec.attach(local)
    old = local.map_async(square, range(10), name="old")
    old.result(timeout=30)
    wait_for(lambda: stored(home, "old", "finished") and Store(home).count_tasks("old") == 10,
             what="the old job's rows")
    running = local.map_async(nap, [0.3] * 30, name="still-running")
    wait_for(lambda: stored(home, "still-running"), what="the running job's row")
    store = Store(home)
    assert store.prune(older_than=3600) == 0
    assert store.prune(older_than=0) >= 1  # (a Master that records by itself adds its own rows)
    assert {j.name for j in store.jobs()} == {"still-running"}
    with sqlite3.connect(home / "jobs.db") as c:
        assert c.execute("SELECT COUNT(*) FROM tasks WHERE job_uid = ?", (rec.uid(old),)).fetchone()[0] == 0
    running.cancel()
    assert running.wait(timeout=30)
    rec.detach(local)


# --- tasks: batch-family jobs (or opted in) ---------------------------------------------------
@pytest.mark.timeout(60)
def test_tasks_recorded_when_opted_in_paged_and_filtered(home, local):
    rec = JobRecorder(st.open_store(), tasks=True)
    rec.attach(local)
    job = local.map_async(fail_on_seven, range(30), name="paged")
    job.wait(timeout=30)
    uid = rec.uid(job)
    store = Store(home)
    def recorded() -> bool:
        try:
            return store.count_tasks(uid) == 30 and stored(home, uid, "failed")
        except st.UnknownJob:  # (not flushed yet)
            return False
    wait_for(recorded, what="30 task rows")
    page = store.tasks(uid, offset=0, limit=10)
    assert [t.index for t in page] == list(range(10))
    assert [t.index for t in store.tasks("paged", offset=25, limit=10)] == [25, 26, 27, 28, 29]
    failed = store.tasks(uid, state="failed")
    assert [t.index for t in failed] == [7] and store.count_tasks(uid, "failed") == 1
    t7 = failed[0]
    assert t7.error == "ValueError: seven is bad: 7" and "seven is bad" in t7.traceback
    done = store.tasks(uid, state="done", limit=100)
    assert len(done) == 29 and all(t.host == st.HOST and t.worker and t.attempts == 1 for t in done)
    assert all(t.started <= t.finished and t.duration >= 0 for t in done)
    assert store.job(uid).tasks_recorded
    with pytest.raises(ValueError, match="not one of"):
        store.tasks(uid, state="exploded")
    rec.detach(local)
    assert store.remove(uid)
    with pytest.raises(UnknownJob):
        store.count_tasks(uid)
    with sqlite3.connect(home / "jobs.db") as c:
        assert c.execute("SELECT COUNT(*) FROM tasks WHERE job_uid = ?", (uid,)).fetchone()[0] == 0


@pytest.mark.timeout(60)
def test_track_sets_handle_and_result_location(home, local):
    rec = JobRecorder(st.open_store())
    rec.attach(local)
    job = local.map_async(square, range(5), name="handled")
    uid = rec.track(job, tasks=True, handle={"cluster": 17}, locate=lambda t: f"out/{t.index}.out")
    rec.set_handle(job, offset=1234)
    job.result(timeout=30)
    wait_for(lambda: stored(home, uid, "finished"), what="the job to be written")
    store = Store(home)
    wait_for(lambda: store.count_tasks(uid, "done") == 5, what="the task rows")
    assert store.job(uid).handle == {"cluster": 17, "offset": 1234}
    assert [t.result_location for t in store.tasks(uid)] == [f"out/{i}.out" for i in range(5)]
    store.set_handle(uid, {"cluster": 18})
    assert store.job(uid).handle == {"cluster": 18}


# --- cancel through the store (the lab sidebar's path) ------------------------------------------
@pytest.mark.timeout(60)
def test_a_cancel_request_in_the_store_cancels_the_owners_job(home, local):
    rec = st.record(local)
    job = local.map_async(nap, [0.2] * 300, name="to-cancel")   # (30 s on 2 workers: cancelled long before)
    uid = rec.uid(job)
    wait_for(lambda: stored(home, uid), what="the job to be written")
    other = Store(home)  # a separate connection, as the server extension has
    assert other.cancel_requested(uid) is False
    asked = time.monotonic()
    assert other.request_cancel(uid) is True
    assert job.wait(timeout=20), "the owner did not cancel the job"
    assert time.monotonic() - asked < 10
    assert job.counts()["cancelled"] > 0
    r = wait_for(lambda: stored(home, uid, "cancelled"), what="the job to show cancelled")
    assert r.cancel_requested and other.cancel_requested(uid)
    assert other.request_cancel(uid) is False  # it has ended


# --- the hot path never waits for the store --------------------------------------------------
@pytest.mark.timeout(90)
def test_a_locked_store_never_delays_a_job_and_loses_nothing(home, local):
    rec = st.record(local)
    path = rec.store.path
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # every other writer now waits
    try:
        jobs = [local.map_async(square, range(2000), name=f"blocked-{i}") for i in range(3)]
        for j in jobs:
            assert j.result(timeout=30) == [x * x for x in range(2000)]
        # the flusher tried and is still waiting: nothing reached the file
        assert blocker.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    for i in range(3):
        r = wait_for(lambda: stored(home, f"blocked-{i}", "finished"), what=f"job {i} after the lock")
        assert r.counts["done"] == 2000


# --- a dead owner ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_a_pool_job_whose_process_was_killed_shows_lost_with_its_owner(home, tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import time
        from pymw_magic import Master, store
        master = Master("local", workers=1)
        rec = store.record(master)
        job = master.map_async(time.sleep, [60] * 3, name="doomed")
        print(rec.uid(job), flush=True)
        job.wait()
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=child_env(home), start_new_session=True)
    try:
        uid = read_line(proc, 60)
        running = wait_for(lambda: (r := stored(home, uid)) and r.counts["running"] == 1 and r,
                           what="the child's task to show running")
        assert running.state == "active" and running.owner.pid == proc.pid
        assert [j.uid for j in Store(home).jobs(all=False)] == [uid]
        workers = [p.pid for p in worker_processes(psutil.Process(proc.pid))]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
    lost = Store(home).job(uid)
    assert lost.state == "lost"
    assert lost.owner.pid == proc.pid and lost.owner.kind == "script" and lost.owner.script == str(script)
    assert lost.counts["running"] == 1
    assert Store(home).jobs(all=False) == [] and "lost" in repr(st.jobs())
    assert not wait_gone(workers, timeout=20), "the dead master's workers stayed"


def test_a_reused_pid_is_not_taken_for_the_owner():
    me = st._proc_stat(os.getpid())
    assert me is not None
    assert st.pid_alive(os.getpid(), me[1]) is True
    assert st.pid_alive(os.getpid(), me[1] + 1) is False  # same pid, another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    assert st.pid_alive(child.pid) is False


@pytest.mark.timeout(90)
def test_a_script_that_exits_right_after_its_job_leaves_it_recorded(home, tmp_path):
    script = tmp_path / "quick.py"
    script.write_text(textwrap.dedent("""
        from pymw_magic import Master, store
        with Master("local", workers=1) as master:
            store.record(master)
            for i in range(3):
                assert master.map_async(abs, range(-50, 50), name=f"quick-{i}").result() == [abs(x) for x in range(-50, 50)]
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env=child_env(home, JPY_SESSION_NAME="/home/u/analysis.ipynb"))
    assert out.returncode == 0, out.stderr
    store = Store(home)
    got = {j.name: j for j in store.jobs()}
    assert sorted(got) == ["quick-0", "quick-1", "quick-2"]
    for j in got.values():
        assert j.state == "finished" and j.counts["done"] == 100 and j.notebook == "/home/u/analysis.ipynb"


@pytest.mark.timeout(90)
def test_a_job_left_running_at_exit_is_recorded_cancelled(home, tmp_path):
    script = tmp_path / "leaves.py"
    script.write_text(textwrap.dedent("""
        import time
        from pymw_magic import Master, store
        master = Master("local", workers=1)
        rec = store.record(master)
        job = master.map_async(time.sleep, [60] * 3, name="left")
        while job.counts()["running"] == 0:
            time.sleep(0.01)
        print(rec.uid(job), flush=True)
        # the script ends here, its job still running: no shutdown, no wait
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env=child_env(home))
    assert out.returncode == 0, out.stderr
    r = Store(home).job(out.stdout.strip())
    assert r.state == "cancelled" and r.ended is not None
    assert r.counts["cancelled"] == 3 and r.counts["running"] == r.counts["pending"] == 0


# --- several writers at once ----------------------------------------------------------------
WRITER = """
import sys
from pymw_magic import Master, store
n, k = int(sys.argv[1]), int(sys.argv[2])
with Master("local", workers=1) as master:
    rec = store.record(master)
    for i in range(k):
        job = master.map_async(abs, range(-20, 20), name=f"w{n}-{i}")
        rec.track(job, tasks=True)
        job.result()
        rec.flush()
        uid = rec.uid(job)
        for h in range(25):   # many small transactions of its own
            rec.store.set_handle(uid, {"writer": n, "i": i, "h": h})
print("ok", flush=True)
"""


@pytest.mark.timeout(240)
def test_concurrent_writers_and_readers_lose_nothing(home, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    Store(home)  # (one of the writers would make it otherwise: that race is tested too, below)
    n_writers, k = 5, 6
    procs = [subprocess.Popen([sys.executable, str(script), str(n), str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env(home))
             for n in range(n_writers)]
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def reader():
        store = Store(home)
        while not stop.is_set():
            try:
                for j in store.jobs(limit=50):
                    store.tasks(j.uid, limit=20)
                reads[0] += 1
            except BaseException as exc:  # recorded, then the test fails naming it
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err
        assert "locked" not in err and "Traceback" not in err, err
    assert not errors, errors
    assert reads[0] > 0
    store = Store(home)
    jobs = store.jobs()
    assert sorted(j.name for j in jobs) == sorted(f"w{n}-{i}" for n in range(n_writers) for i in range(k))
    for j in jobs:
        n, i = map(int, j.name[1:].split("-"))
        assert j.state == "finished" and j.counts["done"] == 40 and j.total == 40
        assert j.handle == {"writer": n, "i": i, "h": 24}
        assert store.count_tasks(j.uid, "done") == 40


@pytest.mark.timeout(120)
def test_processes_creating_the_store_at_once_all_succeed(home):
    code = ("from pymw_magic.store import Store; s = Store(); "
            "print(s.schema_version, len(s.jobs()), flush=True)")
    for trial in range(3):
        where = home / f"race-{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=child_env(where)) for _ in range(6)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.split() == [str(st.SCHEMA_VERSION), "0"]


# --- a store that cannot be used never breaks a computation -----------------------------------
@pytest.mark.timeout(60)
def test_an_unwritable_home_warns_once_and_the_job_runs(tmp_path, monkeypatch, local):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PYMW_HOME", str(blocker / "sub"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert st.record(local) is None
        assert local.map_async(square, range(100)).result(timeout=30) == [x * x for x in range(100)]
        other = Master("local", workers=1)
        try:
            assert st.record(other) is None
            assert other.submit(square, 5).result(timeout=30) == 25
        finally:
            other.shutdown(wait=True)
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 1, texts
    assert "cannot create the job store" in texts[0] and str(blocker / "sub" / "jobs.db") in texts[0]
    assert "PYMW_HOME" in texts[0]
    with pytest.raises(StoreError, match="cannot create the job store"):
        Store()


@pytest.mark.timeout(60)
def test_a_store_that_breaks_while_recording_disables_the_recorder_once(home, tmp_path, local):
    broken = tmp_path / "to-break"  # (not PYMW_HOME: no other recorder writes there)
    rec = JobRecorder(Store(broken))
    rec.attach(local)
    assert rec.attached(local)
    local.map_async(square, range(10), name="before").result(timeout=30)
    wait_for(lambda: stored(broken, "before", "finished"), what="the first job")
    with sqlite3.connect(broken / "jobs.db") as c:  # someone wrecks the store under us
        c.execute("DROP TABLE tasks")
        c.execute("DROP TABLE jobs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            assert local.map_async(square, range(50), name=f"after-{i}").result(timeout=30) == \
                [x * x for x in range(50)]
            rec.flush()
        wait_for(lambda: rec.disabled, what="the recorder to give up")
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 1 and "no longer recorded" in texts[0] and "no such table" in texts[0], texts
    assert not rec.attached(local)  # unsubscribed


def test_a_corrupted_file_names_itself_and_the_fix(tmp_path, local):
    where = tmp_path / "corrupt"
    where.mkdir(mode=0o700)
    (where / "jobs.db").write_bytes(b"this is not SQLite at all\n" * 400)
    with pytest.raises(StoreError) as info:
        Store(where)
    msg = str(info.value)
    assert str(where / "jobs.db") in msg and "Move it aside" in msg and "mv " in msg
    with pytest.warns(RuntimeWarning, match="jobs are not recorded"):
        assert st.record(local, where) is None
    assert local.submit(square, 6).result(timeout=30) == 36


def test_a_store_of_a_newer_schema_is_refused(home):
    Store(home).close()
    with sqlite3.connect(home / "jobs.db") as c:
        c.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match=r"schema version 99, written by a newer pymw-magic.*knows version 1"):
        Store(home)


def test_pymw_store_0_records_nothing(home, monkeypatch):
    monkeypatch.setenv("PYMW_STORE", "0")
    with Master("local", workers=1) as m:
        assert st.record(m) is None
        assert m.submit(square, 2).result(timeout=30) == 4
    assert not home.exists()


def test_default_home_is_the_user_data_dir(monkeypatch):
    monkeypatch.delenv("PYMW_HOME", raising=False)
    from platformdirs import user_data_dir
    assert st.default_home() == __import__("pathlib").Path(user_data_dir("pymw-magic", appauthor=False))
    monkeypatch.setenv("PYMW_HOME", "~/elsewhere")
    assert st.default_home() == __import__("pathlib").Path(os.path.expanduser("~/elsewhere"))


def test_options_json_cannot_hold_are_stored_as_repr():
    assert st._from_json(st._to_json({"a": float("inf"), "b": object, "c": [1, (2, 3)], 4: None})) == \
        {"a": "inf", "b": repr(object), "c": [1, [2, 3]], "4": None}


# --- a kernel as the owner ----------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_kernels_job_names_its_kernel_and_notebook_and_is_lost_with_it(home, kernel_env, tmp_path):
    import uuid

    from jupyter_client.manager import KernelManager
    from test_notebooks import _run

    kernel_id = str(uuid.uuid4())  # as a Jupyter server names a kernel's connection file
    km = KernelManager(kernel_name="python3", connection_file=str(tmp_path / f"kernel-{kernel_id}.json"))
    km.start_kernel(cwd=ROOT)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        reply, out = _run(kc, "__session__ = '/home/u/analysis.ipynb'\n"
                              "import time\nfrom pymw_magic import Master, store\n"
                              "m = Master('local', workers=1)\nrec = store.record(m)\n"
                              "job = m.map_async(time.sleep, [60] * 2, name='in-kernel')\n"
                              "print(rec.uid(job))")
        assert reply["status"] == "ok", out
        uid = out.strip()
        r = wait_for(lambda: (x := stored(home, uid)) and x.counts["running"] == 1 and x,
                     what="the kernel's job to show running")
        kernel_pid = km.provisioner.process.pid
        assert r.state == "active" and r.owner.kind == "kernel" and r.owner.pid == kernel_pid
        assert r.owner.kernel_id == kernel_id and kernel_id in str(r.owner)
        assert r.notebook == "/home/u/analysis.ipynb"
        workers = [p.pid for p in worker_processes(psutil.Process(kernel_pid))]
    finally:
        kc.stop_channels()
        os.kill(km.provisioner.process.pid, signal.SIGKILL)  # the kernel dies: no shutdown, no atexit
        km.shutdown_kernel(now=True)
    lost = wait_for(lambda: stored(home, uid, "lost"), what="the job to show lost")
    assert lost.owner.kernel_id == kernel_id and lost.counts["running"] == 1
    assert not wait_gone(workers, timeout=20), "the dead kernel's workers stayed"
