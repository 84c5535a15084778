"""The text progress bar (``progress.TextProgress``): the observer a plain
script gets in place of the notebook's widget.  Real jobs on local
workers; what is asserted is the bar's count (and what it printed) against
the job's own — never timings."""

from __future__ import annotations

import io
import time

from pymw_magic.events import TasksChanged
from pymw_magic.progress import TextProgress
from pymw_magic.task import DONE


def _slow(x: int) -> int:
    time.sleep(0.002)
    return x


def _ratio(x: int) -> float:
    return 1 / (x - 5)


def _eventually(predicate, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def _last_frame(out: io.StringIO) -> str:
    return out.getvalue().replace("\r", "\n").strip().splitlines()[-1]


def test_the_bar_ends_on_the_jobs_count(master):
    out = io.StringIO()
    job = master.map_async(_slow, range(300), chunksize=1, name="slow")
    with TextProgress(job, file=out) as bar:
        job.wait(60)
    finished, total = job.progress
    assert finished == total == 300 and job.counts()["done"] == 300
    assert bar._bar.n == 300
    assert "300/300" in _last_frame(out) and _last_frame(out).startswith("slow: 100%")
    # Closing again, or an event that comes late, changes nothing.
    bar.close()
    bar._on_event(TasksChanged(job, list(job.tasks[:10]), DONE, time.time()))
    assert bar._bar.n == 300


def test_many_tiny_tasks_are_counted_once(master):
    """Tiny tasks in automatic batches: the job ends (and its waiter returns)
    before the observer has seen the last batches; the bar still ends on
    exactly the job's count, neither short nor over."""
    for _ in range(3):
        out = io.StringIO()
        job = master.map_async(abs, range(20_000))
        with TextProgress(job, file=out) as bar:
            job.wait(60)
        assert bar._bar.n == job.progress[0] == 20_000
        assert "20000/20000" in _last_frame(out)


def test_failures_are_shown_and_counted(master):
    out = io.StringIO()
    job = master.map_async(_ratio, range(10), chunksize=1, name="ratios")
    with TextProgress(job, file=out) as bar:
        job.wait(60)
    assert job.counts()["failed"] == 1 and job.counts()["done"] == 9
    assert bar._bar.n == job.progress[0] == 10
    frame = _last_frame(out)
    assert "10/10" in frame and "failed=1" in frame


def test_the_bar_closes_itself_when_the_job_ends(master):
    out = io.StringIO()
    job = master.map_async(_slow, range(50), chunksize=1)
    bar = TextProgress(job, file=out, desc="alone")
    assert job.wait(60)
    _eventually(lambda: bar._bar.disable, "the bar closed on the job's end")
    assert bar._bar.n == 50 and "50/50" in _last_frame(out)


def test_a_finished_job_gets_a_full_bar_at_once(master):
    job = master.map_async(abs, range(-7, 0))
    assert job.wait(60)
    out = io.StringIO()
    bar = TextProgress(job, file=out)
    assert bar._bar.disable and bar._bar.n == 7 and "7/7" in _last_frame(out)
