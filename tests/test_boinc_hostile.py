"""The BOINC backend attacked as a hostile volunteer, a hostile member of
the project's group, and a careless user, on the stand-in project: what a
volunteer sends reaches errors only escaped, cleanup never leaves the
project, option values at the edges are clear errors or a clear meaning."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from conftest import by_value, wait_for_submitted, wait_until
from pymw_magic import Master
from pymw_magic.backends.boinc import BoincError
from test_boinc import TIMEOUT, keys, projects  # noqa: F401  (fixtures: the test's key, stand-in projects)


def _loud_crash(x):
    import os
    # a volunteer's stderr: terminal control sequences, a right-to-left override, a bell
    os.write(2, "boom \x1b[2J\x1b]0;owned\x07 \u202eevil\n".encode())
    os.kill(os.getpid(), 9)  # (a crash the runtime cannot turn into a task error)


loud_crash = by_value(_loud_crash)


def test_a_volunteers_stderr_reaches_the_error_only_as_escaped_text(projects):
    """The app's stderr (from the project's database, written by whatever
    ran on the volunteer) is shown in the task's error as escaped text,
    as the disagreeing values are: no terminal control sequence reaches a
    traceback, a log or a widget."""
    p = projects(hosts=1)
    with Master("boinc", project_home=str(p.root), max_error_results=1, retries=0, chunksize=1) as m:
        [err] = m.map_async(loud_crash, [1], name="loud").result(timeout=TIMEOUT, return_exceptions=True)
    assert isinstance(err, BoincError), err
    text = str(err)
    assert "boom" in text and "\\x1b[2J" in text and "\\u202e" in text, text
    assert not any(c in text for c in "\x1b\x07\u202e"), repr(text)
    assert not any(c in err.stderr for c in "\x1b\x07\u202e"), repr(err.stderr)
    # (the result's name, as the database gives it, is shown as a name, not as a bytes repr)
    assert "result pymw_" in text and "b'pymw_" not in text, text


def test_give_up_after_a_huge_whole_number_means_never(projects):
    """give_up_after=10**400 (more seconds than a float holds) is "never",
    as inf is, not an OverflowError from deep in the backend."""
    p = projects(hosts=1)
    for huge in (10**400, 10**309):
        m = Master("boinc", project_home=str(p.root), give_up_after=huge)
        try:
            assert m.backend.give_up_after is None
        finally:
            m.shutdown()
    m = Master("boinc", project_home=str(p.root), give_up_after=10**6)
    try:
        assert m.backend.give_up_after == 1e6 and not math.isinf(m.backend.give_up_after)
    finally:
        m.shutdown()


def test_removing_a_job_never_empties_a_directory_its_results_dir_links_to(projects, tmp_path):
    """pymw_results/ may be writable by the project's group (the web
    server's user): a results directory replaced by a symbolic link to
    another directory is not followed when the removed job's results are
    emptied; nothing outside the project is deleted."""
    p = projects(hosts=1)
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    (precious / "sub" / "data.csv").write_text("1,2,3")
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(by_value(lambda x: x + 1), [1, 2], name="linked")
        assert job.result(timeout=TIMEOUT) == [2, 3]
        [batch] = {w["batch"] for w in p.workunits()}
        # (the finished job let go: its templates leave the project)
        wait_until(lambda: not list((p.root / "templates").glob(f"pymw_{batch}_*")), 60, "the job let go")
        results = p.root / "pymw_results" / str(batch)
        wait_until(lambda: results.is_dir(), 30, "the results directory")
        moved = results.with_name(f"{batch}.real")
        os.rename(results, moved)
        os.symlink(precious, results)
        job.remove()
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert (precious / "sub" / "data.csv").read_text() == "1,2,3"


QUICK_SUBMITTER = '''
import sys, time
import pymw_magic.reattach
from pymw_magic import Master
m = Master("boinc", project_home=sys.argv[1], chunksize=1)
job = m.map_async(lambda x: x * 7, range(3), name="killed-early")
print("SUBMITTED", flush=True)
time.sleep(600)
'''


def test_a_job_attached_after_its_killed_master_ends_leaves_no_files_in_the_project(projects, tmp_path, home):
    """The master is killed mid-batch; every work unit is assimilated before
    anyone attaches.  attach gets every result, and the job's templates and
    function file leave the project then (only then: nothing else would
    ever delete them), and removing it empties its results directory."""
    import signal
    import subprocess
    import sys
    from conftest import ROOT
    from pymw_magic import reattach, store
    p = projects(hosts=1)
    script = tmp_path / "submitter.py"
    script.write_text(QUICK_SUBMITTER)
    proc = subprocess.Popen([sys.executable, str(script), str(p.root)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert proc.stdout.readline().strip() == "SUBMITTED"
        st = store.open_store(home)

        def submitted():
            try:
                chunks = (st.job("killed-early").handle or {}).get("chunks") or {}
            except store.UnknownJob:
                return False
            return len(chunks) == 3 and all(c.get("proc") for c in chunks.values())
        wait_until(submitted, TIMEOUT, "the job's work units in the store")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    [batch] = {w["batch"] for w in p.workunits()}
    events = p.root / "pymw_results" / str(batch) / "events"
    wait_until(lambda: events.exists() and len(events.read_text().splitlines()) == 3, TIMEOUT,
               "every work unit assimilated while nobody follows the job")
    files = lambda: list((p.root / "templates").glob(f"pymw_{batch}_*")) + \
        list((p.root / "download").rglob(f"pymw_{batch}_fn_*"))  # noqa: E731
    assert files(), "the job's files are still needed until someone collects it"
    job = reattach.attach("killed-early")
    try:
        assert job.result(timeout=TIMEOUT) == [0, 7, 14]
        wait_until(lambda: not files(), 60, f"the collected job's templates and function file gone ({files()})")
    finally:
        job.master.shutdown(wait=True)
    reattach.remove("killed-early")
    wait_until(lambda: not any((p.root / "pymw_results" / str(batch)).iterdir()), 60, "its results emptied")


def test_the_validators_log_line_about_disagreeing_replicas_is_capped(tmp_path):
    """A volunteer's result of 20,000 failed tasks with long exception names
    (or a long chunk error) disagrees with the honest one: what the
    validator writes to script_validator's log (its stderr) is capped as
    its notes are, not megabytes per comparison."""
    import shutil
    from pymw_magic import boinc_app
    from pymw_magic.runtime import runtime_zipapp
    from test_boinc_scripts import output, run
    root = tmp_path / "project"
    (root / "bin").mkdir(parents=True)
    (root / "tmp_host").mkdir()
    for name in boinc_app.SCRIPTS:
        (root / "bin" / name).write_bytes(boinc_app.script_bytes(name))
        (root / "bin" / name).chmod(0o755)
    shutil.copyfile(runtime_zipapp(), root / "bin" / "pymw_runtime.pyz")
    honest = output(tmp_path / "pymw_77_0_1_0_r1_0", {i: i for i in range(20000)})
    liar = output(tmp_path / "pymw_77_0_1_1_r2_0", {}, failed={i: "E" * 500 for i in range(20000)})
    said = run(root, "pymw_validate", str(honest), str(liar))
    assert said.returncode == 1 and "task 0" in said.stderr
    assert len(said.stderr) < 10_000, len(said.stderr)
    note = (root / "pymw_results" / "disagree" / liar.name).read_text()
    assert len(note) < 10_000 and "task 0" in note


def _nap(x):
    import time
    time.sleep(x)
    return x


nap = by_value(_nap)


def test_a_results_directory_deleted_and_made_again_mid_job_loses_no_result(projects):
    """The job's pymw_results/<batch>/ is deleted while the job runs (an
    admin cleaning up; the assimilator makes it again for the next work
    unit): the new events file is read from its start, not from the old
    file's offset, and every result comes back."""
    import shutil
    p = projects(hosts=1)
    with Master("boinc", project_home=str(p.root), chunksize=1, retries=0) as m:
        job = m.map_async(nap, [0, 0, 0, 6, 0.2, 0.1, 0.3], name="recreated")
        wait_until(lambda: job.counts()["done"] >= 3, TIMEOUT, "the first results collected")
        [batch] = {w["batch"] for w in p.workunits()}
        assert sum(bool(w["canonical_resultid"]) for w in p.workunits()) < 7
        shutil.rmtree(p.root / "pymw_results" / str(batch))
        assert job.result(timeout=120) == [0, 0, 0, 6, 0.2, 0.1, 0.3]


def test_a_fanout_directory_replaced_by_a_link_is_not_cleaned_through(projects, tmp_path):
    """download/'s fanout directories are writable by the project's group
    (mode 0771, the web server's user in the group): one replaced by a
    symbolic link to another directory holding a file of the job's
    function file's name: removing the job leaves that file alone."""
    p = projects(hosts=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(nap, [30], name="fanned")
        # Submitted, as the backend knows it (not only in BOINC's database:
        # a remove() while create_work has not returned yet leaves the work
        # unit open, and with it the templates this test waits to see go)
        wait_for_submitted(os.environ["PYMW_HOME"], "fanned", 1, TIMEOUT)
        wait_until(lambda: p.workunits(), TIMEOUT, "the work unit")
        [batch] = {w["batch"] for w in p.workunits()}
        [fn] = list((p.root / "download").rglob(f"pymw_{batch}_fn_*.bin"))
        fanout = fn.parent
        for f in fanout.iterdir():
            (elsewhere / f.name).write_bytes(b"someone else's file")
        os.rename(fanout, fanout.with_name(fanout.name + ".moved"))
        os.symlink(elsewhere, fanout)
        job.remove(cancel=True)
        wait_until(lambda: not list((p.root / "templates").glob(f"pymw_{batch}_*")), TIMEOUT,
                   "the job's templates gone")
    assert (elsewhere / fn.name).read_bytes() == b"someone else's file"
    assert (elsewhere / (fn.name + ".md5")).read_bytes() == b"someone else's file"


def test_a_job_removed_just_as_it_finishes_has_its_results_emptied(projects):
    """job.remove() right after result(): the follower may not have let the
    job go yet; its results directory in the project is emptied all the
    same (else pymw_results/<batch>/events stays for ever)."""
    p = projects(hosts=2)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        for i in range(4):
            job = m.map_async(by_value(lambda x: x * 2), [i, i + 1], name=f"quick-{i}")
            assert job.result(timeout=TIMEOUT) == [2 * i, 2 * i + 2]
            job.remove()
        batches = {w["batch"] for w in p.workunits()}
        assert len(batches) == 4
        left = lambda: {b: sorted(f.name for f in (p.root / "pymw_results" / str(b)).iterdir())  # noqa: E731
                        for b in batches if any((p.root / "pymw_results" / str(b)).iterdir())}
        wait_until(lambda: not left(), 60, f"every removed job's results emptied ({left()})")


def test_results_arrive_without_watchdog_and_when_inotify_sees_nothing(projects, monkeypatch):
    """Without watchdog (not installed) the files are read every second;
    with a watcher that never fires (a results directory on a network file
    system written from another host: inotify sees no change) the safety
    re-read still brings every result."""
    import sys
    from pymw_magic.backends import boinc as boinc_backend
    p = projects(hosts=2)
    monkeypatch.setitem(sys.modules, "watchdog.observers", None)  # (import fails: not installed)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(by_value(lambda x: x * 5), range(4), name="no-watchdog")
        assert job.result(timeout=TIMEOUT) == [0, 5, 10, 15]
        assert not m.backend._watcher.available
    monkeypatch.undo()
    monkeypatch.setattr(boinc_backend._Watcher, "dispatch", lambda self, event: None)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(by_value(lambda x: x * 6), range(4), name="blind-inotify")
        assert job.result(timeout=TIMEOUT) == [0, 6, 12, 18]
        assert m.backend._watcher.available


def test_cancel_remove_and_attach_from_many_threads_at_once(projects, monkeypatch, home):
    """12 threads at once on a running job: cancel(), remove(cancel=True),
    attach(name).  Each work unit is cancelled by one cancel_jobs process;
    nothing but the documented errors is raised; after it, the job is gone
    from the store and attach says so; three trials."""
    import threading
    from pymw_magic import reattach, store
    from pymw_magic.errors import PymwError
    from test_boinc import _count_tools
    p = projects(hosts=1)
    calls = _count_tools(monkeypatch)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        for trial in range(3):
            name = f"crowd-{trial}"
            job = m.map_async(nap, [60] * 5, name=name)
            wait_until(lambda: len(p.workunits()) == 5 * (trial + 1), TIMEOUT, "the work units")
            del calls[:]
            errors: list[BaseException] = []
            start = threading.Barrier(12)

            def go(i: int) -> None:
                try:
                    start.wait(30)
                    if i % 3 == 0:
                        job.cancel()
                    elif i % 3 == 1:
                        job.remove(cancel=True)
                    else:
                        reattach.attach(name)
                except (PymwError, store.UnknownJob) as exc:
                    if not isinstance(exc, store.UnknownJob) and "attach" not in str(exc) \
                            and "no job" not in str(exc).lower() and "running here" not in str(exc):
                        errors.append(exc)
                except BaseException as exc:  # (anything else is a defect: collected, then shown)
                    errors.append(exc)
            threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads)
            assert not errors, errors
            wait_until(lambda: all(w["error_mask"] & 16 for w in p.workunits()), 60, "every work unit cancelled")
            cancels = [c for c in calls if c[0] == "cancel_jobs"]
            assert len(cancels) == 1, cancels
            with pytest.raises((PymwError, store.UnknownJob)):
                reattach.attach(name)


def test_a_job_removed_while_create_work_runs_has_its_work_unit_cancelled_and_its_files_gone(projects, tmp_path):
    """``job.remove(cancel=True)`` while ``bin/create_work`` has put the work
    unit in the database but not yet returned (a loaded server): the
    removal waits for the submission, then cancels what it made, and the
    job's templates leave the project.  Let go mid-submission, the work
    unit stayed open and the templates with it."""
    import threading

    p = projects(hosts=1)
    tool = p.root / "bin" / "create_work"
    real = tool.with_name("create_work.real")
    os.rename(tool, real)
    gate = tmp_path / "gate"
    tool.write_text(f'#!/bin/sh\n"{real}" "$@"\nrc=$?\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\nexit $rc\n')
    tool.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    with Master("boinc", project_home=str(p.root), chunksize=1) as m:
        job = m.map_async(nap, [30], name="slowly-made")
        wait_until(lambda: p.workunits(), TIMEOUT, "the work unit in BOINC's database")
        [batch] = {w["batch"] for w in p.workunits()}
        assert list((p.root / "templates").glob(f"pymw_{batch}_*"))
        removed = threading.Event()
        failures: list[BaseException] = []

        def remove() -> None:
            try:
                job.remove(cancel=True)
            except BaseException as exc:  # (reported below)
                failures.append(exc)
            finally:
                removed.set()

        remover = threading.Thread(target=remove)
        remover.start()
        try:
            # The removal must wait for create_work: it may not end while the tool runs.
            assert not removed.wait(3), "job.remove() returned while create_work was still making the job"
        finally:
            gate.write_text("")
        assert removed.wait(TIMEOUT), "job.remove() did not return once create_work had"
        remover.join(TIMEOUT)
        assert not failures, failures
        wait_until(lambda: all(w["error_mask"] & 16 for w in p.workunits(batch=batch)), TIMEOUT,
                   "the work unit cancelled")
        wait_until(lambda: not list((p.root / "templates").glob(f"pymw_{batch}_*")), TIMEOUT,
                   "the job's templates gone")
