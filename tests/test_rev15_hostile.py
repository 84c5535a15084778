"""A hostile user of the job store, ``attach``/``remove`` and the condor
backend, through the public surface: a job removed by one process while
another still follows it, listings asked for with nonsense limits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("htcondor2")

import pymw_magic  # noqa: E402
from conftest import ROOT, wait_until  # noqa: E402
from pymw_magic import Master, store  # noqa: E402
from condor_fixtures import home, standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 180


FOLLOWER = textwrap.dedent('''
    import sys, time
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
    job = m.map_async(make(), [60, 60], name="followed-elsewhere")
    print("submitted", flush=True)
    try:
        job.result(timeout=150)
        print("RESULT", flush=True)
    except BaseException as exc:
        print("RAISED", type(exc).__name__, str(exc).replace("\\n", " ")[:300], flush=True)
    m.shutdown(wait=True)
    print("EXIT", flush=True)
''')


def _ended_as_removed(out: str) -> bool:
    """The follower's job ended as removed: cancelled (it learnt of the
    removal through the store), or, when it saw its procs and directory go
    first, failed saying the job was removed -- never hung, never another
    error."""
    return "RAISED CancelledError" in out or ("RAISED BatchError" in out and "the job was removed" in out)


@pytest.mark.timeout(300)
def test_a_job_removed_by_another_process_is_not_written_again_by_its_follower(standin, tmp_path, home):
    """remove(cancel=True) here while the submitting script follows the job
    there: the script sees its job cancelled, and its recorder must not put
    the row back (it did: the job came back as "cancelled", its directory gone)."""
    script = tmp_path / "follower.py"
    script.write_text(FOLLOWER)
    env = dict(os.environ, PYTHONPATH=ROOT, PYMW_HOME=str(home))
    proc = subprocess.Popen([sys.executable, str(script), str(standin.root)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "submitted"
        db = store.open_store(home)

        def recorded():
            try:
                rec = db.job("followed-elsewhere")
            except store.UnknownJob:
                return False
            return bool((rec.handle or {}).get("dir")) and len(standin.query()) == 2
        wait_until(recorded, TIMEOUT, "the job recorded with its directory and queued")
        pymw_magic.remove("followed-elsewhere", cancel=True)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert _ended_as_removed(out) and "EXIT" in out, out
    assert proc.returncode == 0
    with pytest.raises(store.UnknownJob):
        db.job("followed-elsewhere")
    assert not standin.query()


def _gated(gate):
    def task(x):
        import os
        import time
        while not os.path.exists(gate):
            time.sleep(0.02)
        return x
    return task


@pytest.mark.timeout(300)
def test_pool_jobs_removed_from_another_connection_stay_removed_and_recording_goes_on(tmp_path, home):
    """Many trials: the store row of a job still running here is deleted
    through another connection (what the sidebar's or another kernel's
    remove does); the job's later progress and end must not bring it back,
    and the recorder keeps recording the next jobs."""
    other = store.Store(home)  # another connection, as another process has
    try:
        with Master("local", workers=2) as m:
            rec = store.recorder()
            assert rec is not None
            for trial in range(12):
                gate = tmp_path / f"gate{trial}"
                job = m.map_async(_gated(str(gate)), range(4), name=f"gone-{trial}", chunksize=1)
                uid = rec.uid(job)
                wait_until(lambda: any(r.uid == uid for r in other.jobs()), 60, "the job's row")
                assert other.remove(uid, force=True)
                gate.touch()
                assert job.result(timeout=60) == [0, 1, 2, 3]
                rec.flush()
                assert not [r for r in other.jobs() if r.uid == uid], trial
                kept = m.map_async(abs, [-1], name=f"kept-{trial}")
                assert kept.result(timeout=60) == [1]
                rec.flush()
                assert not rec.disabled
                assert other.job(f"kept-{trial}").state == "finished"
    finally:
        other.close()


def test_negative_limits_are_refused_not_read_as_no_limit_or_all_but_the_last(home):
    with Master("local", workers=1) as m:
        assert m.map_async(abs, [-1], name="finished-one").result(timeout=60) == [1]
    for kwargs in ({"limit": -1}, {"all": False, "limit": -1}, {"limit": -5}):
        with pytest.raises(ValueError, match="limit"):
            pymw_magic.jobs(**kwargs)
    uid = store.open_store().job("finished-one").uid
    for kwargs in ({"offset": -1}, {"limit": -1}):
        with pytest.raises(ValueError, match="offset and limit"):
            store.open_store().tasks(uid, **kwargs)
    assert [r.name for r in pymw_magic.jobs(limit=0)] == []
    assert [r.name for r in pymw_magic.jobs(limit=1)] == ["finished-one"]


@pytest.mark.timeout(300)
def test_detach_right_after_submitting_lets_the_batch_job_go_on(standin):
    import pymw_magic.reattach as reattach
    for trial in range(4):
        m = Master("condor", schedd=standin, chunksize=1)
        m.map_async(abs, [-1, -2, -3], name=f"detached-{trial}")
        m.detach()
        again = reattach.attach(f"detached-{trial}")
        try:
            assert again.result(timeout=TIMEOUT) == [1, 2, 3]
        finally:
            again.master.shutdown(wait=True)


def test_pymw_jobs_shows_control_characters_of_a_name_escaped(home, capsys):
    """``%pymw jobs`` printed a job's name raw: a terminal escape or a bidi
    override typed into --name repainted or reordered the table (the
    store's table, ``%pymw jobs --all``, escapes them)."""
    from IPython.testing.globalipapp import start_ipython
    shell = start_ipython() or __import__("IPython").get_ipython()
    shell.run_line_magic("load_ext", "pymw_magic")
    names = set(shell.user_ns)
    try:
        shell.user_ns["xs"] = [1, 2]
        result = shell.run_cell('%%pymw --map x in xs --out ys --workers 1 --name "ab\u202edc\x1b[2Jzz"\nx*2')
        assert result.success and shell.user_ns["ys"] == [2, 4]
        capsys.readouterr()
        shell.run_line_magic("pymw", "jobs")
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\u202e" not in out, out
        assert "ab\\u202edc\\x1b[2Jzz" in out
        shell.run_line_magic("pymw", "jobs --all")
        assert "ab\\u202edc\\x1b[2Jzz" in capsys.readouterr().out
    finally:
        shell.run_line_magic("unload_ext", "pymw_magic")
        for name in set(shell.user_ns) - names:
            del shell.user_ns[name]


ATTACHER = textwrap.dedent('''
    import pymw_magic
    job = pymw_magic.attach("attached-elsewhere")
    print("attached", flush=True)
    try:
        job.result(timeout=150)
        print("RESULT", flush=True)
    except BaseException as exc:
        print("RAISED", type(exc).__name__, str(exc).replace("\\n", " ")[:300], flush=True)
    job.master.shutdown(wait=True)
    print("EXIT", flush=True)
''')


def _sleeper():
    def task(x):
        import time
        time.sleep(x)
        return x
    return task


@pytest.mark.timeout(300)
def test_a_job_removed_while_another_process_has_it_attached_stays_removed(standin, tmp_path, home):
    """The same through attach: the attaching process's recorder wrote the
    removed job back (as its own, cancelled)."""
    from pymw_magic.server import followed_by
    m = Master("condor", schedd=standin, chunksize=1)
    m.map_async(_sleeper(), [60, 60], name="attached-elsewhere")
    db = store.open_store(home)

    def submitted():
        store.recorder().flush()
        try:
            return (db.job("attached-elsewhere").handle or {}).get("chunks") and len(standin.query()) == 2
        except store.UnknownJob:
            return None
    # (detaching while the submission is under way loses the job: see the xfail test above)
    wait_until(submitted, TIMEOUT, "the job's chunks recorded and its procs queued")
    m.detach()
    script = tmp_path / "attacher.py"
    script.write_text(ATTACHER)
    env = dict(os.environ, PYTHONPATH=ROOT, PYMW_HOME=str(home))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "attached"
        wait_until(lambda: followed_by(db.job("attached-elsewhere")) == proc.pid, TIMEOUT,
                   "the other process following the job")
        pymw_magic.remove("attached-elsewhere", cancel=True)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert _ended_as_removed(out) and "EXIT" in out, out
    with pytest.raises(store.UnknownJob):
        db.job("attached-elsewhere")
    wait_until(lambda: not standin.query(), 60, "the procs removed")


def test_a_batch_job_under_an_unusable_pymw_home_says_which_directory_and_what_to_do(standin, monkeypatch):
    from pymw_magic.errors import PymwError
    bad = "/proc/pymw-cannot-be-made"  # (root may write anywhere else)
    monkeypatch.setenv("PYMW_HOME", bad)
    with pytest.warns(RuntimeWarning, match="PYMW_HOME"):  # the store says so already
        m = Master("condor", schedd=standin)
    with m:
        job = m.map_async(abs, [-1], name="homeless")
        with pytest.raises(PymwError) as info:
            job.result(timeout=60)
    assert bad in str(info.value) and "PYMW_HOME" in str(info.value), str(info.value)
