"""A text progress bar for scripts: the observer role the notebook's widget
plays, over tqdm.

``with TextProgress(job): job.wait()`` — or ``TextProgress(job)`` and it
closes itself when the job ends.  It listens to the master's events (one
per batch), so it costs nothing per task.  It ends on the job's own count:
the observer (a scheduler thread) and ``close()`` (the caller's) share a
lock, and events that arrive after the close are ignored, so the last
batch is never counted twice nor missed.
"""

from __future__ import annotations

import sys
import threading
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
        self._lock = threading.Lock()
        self._closed = False
        self._sub = job.master.events.subscribe(self._on_event)
        if job.done():
            self.close()

    def _on_event(self, event: Any) -> None:
        if getattr(event, "job", None) is not self.job:
            return
        if isinstance(event, TasksChanged) and event.state in FINAL_STATES:
            with self._lock:
                if self._closed:
                    return
                if event.state.value == "failed":
                    self._failed += len(event.tasks)
                    self._bar.set_postfix(failed=self._failed, refresh=False)
                self._bar.update(len(event.tasks))
        elif isinstance(event, JobChanged) and event.kind in ("finished", "cancelled"):
            self.close()

    def close(self) -> None:
        """End the bar on the job's count (once; later calls do nothing)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sub.close()
            done, total = self.job.progress
            if total is not None and self._bar.total != total:
                self._bar.total = total
            # A job can end (and its waiter return) before the observers have
            # seen its last events: the bar ends on the job's own count.
            failed = self.job.counts()["failed"]
            if failed != self._failed:
                self._failed = failed
                self._bar.set_postfix(failed=failed, refresh=False)
            if done != self._bar.n:
                self._bar.n = done
                self._bar.refresh()
            self._bar.close()

    def __enter__(self) -> TextProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
