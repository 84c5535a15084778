"""A text progress bar for scripts: the observer role the notebook's widget
plays, over tqdm.

``with TextProgress(job): job.wait()`` — or ``TextProgress(job)`` and it
closes itself when the job ends.  It listens to the master's events (one
per batch), so it costs nothing per task.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

from .events import JobChanged, TasksChanged
from .job import Job
from .task import FINAL_STATES


class TextProgress:
    def __init__(self, job: Job, *, file: TextIO | None = None, desc: str | None = None,
                 mininterval: float = 0.2):
        self.job = job
        done, total = job.progress
        self._bar = tqdm(total=total, initial=done, desc=desc or job.name, unit="task",
                         file=file or sys.stderr, mininterval=mininterval, dynamic_ncols=True)
        self._failed = 0
        self._sub = job.master.events.subscribe(self._on_event)
        if job.done():
            self.close()

    def _on_event(self, event: Any) -> None:
        if getattr(event, "job", None) is not self.job:
            return
        if isinstance(event, TasksChanged) and event.state in FINAL_STATES:
            if event.state.value == "failed":
                self._failed += len(event.tasks)
                self._bar.set_postfix(failed=self._failed, refresh=False)
            self._bar.update(len(event.tasks))
        elif isinstance(event, JobChanged) and event.kind in ("finished", "cancelled"):
            self.close()

    def close(self) -> None:
        self._sub.close()
        done, total = self.job.progress
        if total is not None and self._bar.total != total:
            self._bar.total = total
        # A job can end (and its waiter return) before the observers have
        # seen its last events: the bar ends on the job's own count.
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)
        self._bar.close()

    def __enter__(self) -> TextProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
