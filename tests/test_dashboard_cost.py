"""What a displayed dashboard does while jobs run: nothing drawn for a new
job until it has run for ``delay`` (a short job gets its row once, in its
final state, after it ended), nothing made on the submitting thread, rows
reused across many jobs, and ticks racing submissions, ``refresh()`` and
``close()`` from other threads.  Behaviour only; the time it saves is
measured by bench/dashboard.py."""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
import weakref

import ipywidgets
import pytest
from ipywidgets.widgets.widget import _instances  # every live widget model

from pymw_magic.widgets.dashboard import Dashboard
from pymw_magic.widgets.jobview import JobView, Ticker
from tests.test_widgets import notebook, kernel_env  # noqa: F401 - fixtures
from conftest import wait_until


def _gate(arg: tuple) -> int:
    """Task ``i`` returns once the file ``gates/<i>`` (or ``gates/all``) exists (at most 120 s)."""
    gates, i = arg
    deadline = time.monotonic() + 120
    while (not os.path.exists(os.path.join(gates, str(i))) and not os.path.exists(os.path.join(gates, "all"))
           and time.monotonic() < deadline):
        time.sleep(0.005)
    return i


def _open(gates, name) -> None:
    with open(os.path.join(gates, str(name)), "w"):
        pass


class _Constructed:
    """Counts the widget models made, per thread (``Widget.on_widget_constructed``)."""

    def __init__(self):
        self.by_thread: dict[int, int] = {}
        self._lock = threading.Lock()
        self._active = True
        ipywidgets.Widget.on_widget_constructed(self._made)

    def _made(self, _widget) -> None:
        if self._active:
            with self._lock:
                tid = threading.get_ident()
                self.by_thread[tid] = self.by_thread.get(tid, 0) + 1

    def total(self) -> int:
        with self._lock:
            return sum(self.by_thread.values())

    def stop(self) -> None:
        self._active = False
        ipywidgets.Widget.on_widget_constructed(None)


@pytest.fixture
def constructed():
    counter = _Constructed()
    try:
        yield counter
    finally:
        counter.stop()


def _row_text(d: Dashboard) -> list[str]:
    return [row.bar.value for row in d.jobs_box.children]


def test_a_short_job_is_drawn_once_after_it_ended_in_its_final_state(master, tmp_path, constructed):
    """While a job younger than ``delay`` runs, the dashboard's ticks draw
    nothing and make no widget; the first tick after it ended lists it in
    its final state (row, job list, task table)."""
    d = Dashboard(masters=lambda: [master], ticker=Ticker(3600), delay=3600)
    try:
        before = constructed.total()
        models = len(_instances)
        job = master.map_async(_gate, [(str(tmp_path), i) for i in range(8)], chunksize=1, name="short")
        wait_until(lambda: job.counts()["running"] >= 1, timeout=60)
        for _ in range(5):
            assert d.tick() is True
        assert not job.done()
        assert d.jobs_box.children == () and d.job_select.options == ()
        assert constructed.total() == before and len(_instances) == models  # nothing made or drawn
        _open(tmp_path, "all")
        assert job.wait(60)
        d.tick()
        assert len(d.jobs_box.children) == 1
        assert "job &#x27;short&#x27; finished: done 8" in d.jobs_box.children[0].bar.value
        assert d.job_select.value is job
        assert d.task_table.table.value.count(">done<") == 8
    finally:
        _open(tmp_path, "all")
        job.cancel()
        d.close()


def test_a_long_job_is_listed_after_the_delay_and_its_row_moves(master, tmp_path):
    """The real ticker (in the background): a job running longer than
    ``delay`` is listed while it runs, no sooner than ``delay`` after it
    was submitted, and its row follows its counts up to the final state."""
    ticker = Ticker(0.02)
    delay = 0.3
    d = Dashboard(masters=lambda: [master], ticker=ticker, delay=delay)
    try:
        submitted = time.monotonic()
        job = master.map_async(_gate, [(str(tmp_path), i) for i in range(6)], chunksize=1, name="long")
        wait_until(lambda: len(d.jobs_box.children) == 1, timeout=60)
        assert time.monotonic() - submitted >= delay
        row = d.jobs_box.children[0]
        assert row.job is job
        for k in range(1, 4):   # the counts move on the row as tasks end, the job still running
            _open(tmp_path, k - 1)
            wait_until(lambda: f"done {k}" in row.bar.value, timeout=60)
            assert not job.done() and "running" in row.bar.value
        _open(tmp_path, "all")
        assert job.wait(60)
        wait_until(lambda: "job &#x27;long&#x27; finished: done 6" in row.bar.value, timeout=60)
        wait_until(lambda: d.task_table.table.value.count(">done<") == 6, timeout=60)
    finally:
        _open(tmp_path, "all")
        job.cancel()
        d.close()
        ticker.stop()


def test_no_widget_is_made_on_the_submitting_thread(master, constructed):
    """Even with no delay and a ticker firing every few ms, map_async and
    submit make no widget on the caller's thread: the rows are made by
    the ticker's ticks."""
    ticker = Ticker(0.002)
    d = Dashboard(masters=lambda: [master], ticker=ticker, delay=0)
    me = threading.get_ident()
    try:
        for trial in range(30):
            mine = constructed.by_thread.get(me, 0)
            job = master.map_async(abs, range(-50, 0), name=f"j{trial}")
            future = master.submit(abs, -trial)
            assert constructed.by_thread.get(me, 0) == mine
            assert job.wait(60) and future.result(60) == trial
        wait_until(lambda: "j29" in " ".join(_row_text(d)), timeout=60)
    finally:
        d.close()
        ticker.stop()


def test_200_jobs_in_a_row_reuse_max_jobs_rows(master, constructed):
    """Rows of jobs that drop off the list show the new ones: after 200
    jobs the dashboard has made ``max_jobs`` rows and holds no dropped
    job (a finished job nobody holds leaves its master's list)."""
    d = Dashboard(masters=lambda: [master], ticker=Ticker(3600), max_jobs=5, delay=0)
    try:
        rows: set[int] = set()
        jobs = []
        for i in range(200):
            job = master.map_async(abs, range(-3, 0), name=f"n{i}")
            if i % 3 == 0:
                d.tick()   # sometimes while the job runs
            assert job.wait(60)
            jobs.append(weakref.ref(job))
            del job
            d.tick()
            for row in d.jobs_box.children:   # (the rows' own ticks: this ticker never fires)
                row.tick()
            rows |= {id(row) for row in d.jobs_box.children}
            if i == 10:
                made = constructed.total()
            if i >= 4:
                assert [row.job.name for row in d.jobs_box.children] == [f"n{j}" for j in range(i - 4, i + 1)]
                assert all("finished: done 3" in text for text in _row_text(d))
        assert len(rows) == 5
        assert constructed.total() == made   # no widget made after the first rows
        assert len(d._views) == 5 and not d._first_seen
        gc.collect()   # the jobs the dashboard no longer shows are let go (a reused row holds only its own)
        assert [ref().name for ref in jobs if ref() is not None] == [f"n{j}" for j in range(195, 200)]
    finally:
        d.close()


def test_a_reused_row_of_an_ended_job_follows_a_running_one(master, tmp_path):
    """A row that had settled (Cancel hidden) shows a running job again:
    Cancel is back, and clicking it cancels the job the row now shows."""
    ticker = Ticker(3600)
    d = Dashboard(masters=lambda: [master], ticker=ticker, max_jobs=1, delay=0)
    try:
        first = master.map_async(abs, range(-3, 0), name="first")
        assert first.wait(60)
        d.tick()
        row = d.jobs_box.children[0]
        assert row.cancel_button.disabled and row.cancel_button.layout.display == "none"
        job = master.map_async(_gate, [(str(tmp_path), i) for i in range(4)], chunksize=1, name="second")
        d.tick()
        assert d.jobs_box.children == (row,) and row.job is job
        assert not row.cancel_button.disabled and row.cancel_button.layout.display != "none"
        assert row in ticker.views()   # it follows the running job
        row.cancel_button.click()
        assert job.wait(60) and job.counts()["cancelled"] >= 1
        assert first.counts()["done"] == 3
        d.tick()
        assert "cancelled" in row.bar.value
    finally:
        _open(tmp_path, "all")
        d.close()


def test_threads_submitting_while_the_dashboard_refreshes(master):
    """Four threads submit jobs while the ticker ticks and the main thread
    refreshes: every job's results are right, no tick fails, and the
    dashboard ends listing the newest jobs in their final state."""
    ticker = Ticker(0.005)
    d = Dashboard(masters=lambda: [master], ticker=ticker, max_jobs=8, delay=0.01)
    errors: list[BaseException] = []
    stop = threading.Event()

    def submitter(k: int) -> None:
        try:
            for i in range(25):
                job = master.map_async(abs, range(-20, 0), name=f"t{k}-{i}")
                assert job.wait(60) and sorted(job.result(60)) == list(range(1, 21))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                d.refresh()
                time.sleep(0.005)
            for t in threads:
                t.join(120)
            assert not errors, errors
            assert d in ticker.views()   # no tick failed (a failing view is dropped)
            wait_until(lambda: len(d.jobs_box.children) == 8
                       and all("finished: done 20" in text for text in _row_text(d)), timeout=60)
            assert len(d._views) == 8
        finally:
            stop.set()
            d.close()
            ticker.stop()
    assert [w for w in caught if "failed to refresh" in str(w.message)] == []


def test_closed_mid_job_it_draws_nothing_more_and_the_job_runs_on(master, tmp_path, constructed):
    ticker = Ticker(0.005)
    d = Dashboard(masters=lambda: [master], ticker=ticker, delay=0)
    job = master.map_async(_gate, [(str(tmp_path), i) for i in range(6)], chunksize=1, name="closing")
    try:
        wait_until(lambda: len(d.jobs_box.children) == 1, timeout=60)
        row = d.jobs_box.children[0]
        d.close()
        assert d not in ticker.views() and row not in ticker.views()
        assert row.comm is None and d.comm is None   # its rows are closed with it
        made = constructed.total()
        later = master.map_async(abs, range(-5, 0), name="after-close")
        assert d.tick() is False   # a tick that was due draws nothing
        d.refresh()
        _open(tmp_path, "all")
        assert job.wait(60) and sorted(job.result(60)) == list(range(6))
        assert later.wait(60)
        assert constructed.total() == made and d._views == {}
    finally:
        _open(tmp_path, "all")
        job.cancel()
        d.close()   # twice: harmless
        ticker.stop()


def test_two_dashboards_at_once_and_one_closed(master, tmp_path):
    ticker = Ticker(0.01)
    first = Dashboard(masters=lambda: [master], ticker=ticker, delay=0)
    second = Dashboard(masters=lambda: [master], ticker=ticker, delay=0)
    try:
        job = master.map_async(_gate, [(str(tmp_path), i) for i in range(4)], chunksize=1, name="both")
        for d in (first, second):
            wait_until(lambda: len(d.jobs_box.children) == 1, timeout=60)
        assert first.jobs_box.children[0] is not second.jobs_box.children[0]
        first.close()
        _open(tmp_path, "all")
        assert job.wait(60)
        wait_until(lambda: "finished: done 4" in _row_text(second)[0], timeout=60)
        assert second in ticker.views()
    finally:
        _open(tmp_path, "all")
        first.close()
        second.close()
        ticker.stop()


def test_a_failing_view_does_not_break_jobs_or_other_views(master, tmp_path):
    """A dashboard whose job source raises is dropped by the ticker with a
    warning; the job and another dashboard go on."""
    ticker = Ticker(0.01)
    broken_now = threading.Event()

    def masters():
        if broken_now.is_set():
            raise RuntimeError("this source of masters is broken")
        return [master]

    broken = Dashboard(masters=masters, ticker=ticker, delay=0)
    fine = Dashboard(masters=lambda: [master], ticker=ticker, delay=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            broken_now.set()
            job = master.map_async(abs, range(-30, 0), name="survives")
            assert job.wait(60) and sorted(job.result(60)) == list(range(1, 31))
            wait_until(lambda: broken not in ticker.views(), timeout=60)
            wait_until(lambda: "job &#x27;survives&#x27; finished" in " ".join(_row_text(fine)), timeout=60)
            assert fine in ticker.views()
        finally:
            broken.close()
            fine.close()
            ticker.stop()
    assert any("this source of masters is broken" in str(w.message) for w in caught)


def test_refresh_lists_a_running_job_at_once(master, tmp_path):
    """``refresh()`` draws everything now, however new the job."""
    d = Dashboard(masters=lambda: [master], ticker=Ticker(3600), delay=3600)
    job = master.map_async(_gate, [(str(tmp_path), i) for i in range(4)], chunksize=1, name="now")
    try:
        d.refresh()
        assert [row.job for row in d.jobs_box.children] == [job] and d.job_select.value is job
        assert JobView in {type(row) for row in d.jobs_box.children}
    finally:
        _open(tmp_path, "all")
        job.cancel()
        d.close()


# --- in a real kernel -----------------------------------------------------------------------

def test_in_a_kernel_a_short_job_gets_its_row_after_it_ended_and_nothing_during_submit(notebook):
    """A real kernel and front end: a displayed dashboard (the shared
    ticker, the default delay) makes no widget on the cell's thread while
    the job is submitted; the job gets its row, in its final state, which
    the front end receives."""
    shown = notebook.run("from pymw_magic.widgets.dashboard import Dashboard\nd = Dashboard()\nd")
    cell = notebook.run(
        "import threading, ipywidgets\n"
        "from pymw_magic.widgets.dashboard import current_master\n"
        "made = []\n"
        "ipywidgets.Widget.on_widget_constructed(lambda w: made.append(threading.get_ident()))\n"
        "job = current_master().map_async(abs, range(-3000, 0), name='short-in-kernel')\n"
        "print('made on the cell thread while submitting:', made.count(threading.get_ident()))\n"
        "assert job.wait(60)")
    assert "made on the cell thread while submitting: 0" in notebook.printed(cell)
    cell = notebook.run(
        "import time\n"
        "deadline = time.monotonic() + 60\n"
        "while time.monotonic() < deadline and not any(\n"
        "        'short-in-kernel' in r.bar.value and 'finished: done 3000' in r.bar.value\n"
        "        for r in d.jobs_box.children):\n"
        "    time.sleep(0.02)\n"
        "ipywidgets.Widget.on_widget_constructed(None)\n"
        "print('rows:', len(d.jobs_box.children), [r.job.name for r in d.jobs_box.children])")
    assert "'short-in-kernel'" in notebook.printed(cell)
    # What the front end holds: the dashboard's job box lists a row whose bar shows the final state.
    board = notebook.shown_widget(shown)
    jobs_box = next(notebook.state(ref) for ref in board["children"]
                    if "pymw-jobs" in notebook.state(ref).get("_dom_classes", ()))
    bars = [notebook.state(notebook.state(row)["children"][0])["value"] for row in jobs_box["children"]]
    assert any("short-in-kernel" in bar and "finished: done 3000" in bar for bar in bars), bars
    notebook.run("d.close()")


def test_a_job_not_yet_listed_pushes_no_older_job_off_the_list(master, tmp_path, constructed):
    """With the list full, a young running job changes nothing at the ticks
    that fall in it (it would otherwise push the oldest row off, a redraw
    during the job); once it ended it takes the oldest row's place."""
    d = Dashboard(masters=lambda: [master], ticker=Ticker(3600), max_jobs=3, delay=3600)
    try:
        old = [master.map_async(abs, range(-3, 0), name=f"old{i}") for i in range(3)]
        assert all(job.wait(60) for job in old)
        d.tick()
        rows, options = d.jobs_box.children, d.job_select.options
        assert [row.job for row in rows] == old
        made = constructed.total()
        job = master.map_async(_gate, [(str(tmp_path), i) for i in range(4)], chunksize=1, name="young")
        for _ in range(5):
            d.tick()
        assert d.jobs_box.children == rows and d.job_select.options == options
        assert [row.job for row in rows] == old and constructed.total() == made
        _open(tmp_path, "all")
        assert job.wait(60)
        d.tick()
        assert [row.job.name for row in d.jobs_box.children] == ["old1", "old2", "young"]
        assert constructed.total() == made   # the dropped row shows the new job
    finally:
        _open(tmp_path, "all")
        d.close()


def test_a_closed_dashboard_lets_its_jobs_and_widgets_go(master):
    """close() closes every widget the dashboard made (its form, job list,
    task table, rows) and the jobs it showed are let go."""
    before = set(_instances)
    d = Dashboard(masters=lambda: [master], ticker=Ticker(3600), delay=0)
    jobs = [master.map_async(abs, range(-3, 0), name=f"c{i}") for i in range(3)]
    assert all(job.wait(60) for job in jobs)
    d.tick()
    refs = [weakref.ref(job) for job in jobs]
    assert len(d.jobs_box.children) == 3
    del jobs
    d.close()
    left = {key: type(_instances[key]).__name__ for key in set(_instances) - before}
    # what stays open: the job rows' layouts and styles, shared by every JobView
    assert set(left.values()) <= {"Layout", "ButtonStyle", "HTMLStyle"} and len(left) <= 5, left
    del d
    gc.collect()
    assert [ref() for ref in refs if ref() is not None] == []
