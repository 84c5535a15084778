"""The BOINC backend attacked as a hostile volunteer, a hostile member of
the project's group, and a careless user, on the stand-in project: what a
volunteer sends reaches errors only escaped, cleanup never leaves the
project, option values at the edges are clear errors or a clear meaning."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from conftest import by_value, wait_until
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
