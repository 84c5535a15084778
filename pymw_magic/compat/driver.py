"""PyMW's scheduling loop, for a user-written (duck-typed) interface.

A PyMW interface that is not one of pymw-magic's backends is driven the
way PyMW drove it: while tasks are queued, one thread asks the interface
for its available workers (anything but a list — or an exception — means
``[None]``), lets the ``scheduler_func`` (default: the first of each) match
a task with a worker, reserves the worker (``reserve_worker``; failures
ignored) and calls ``execute_task(task, worker)`` in a thread of its own;
an exception from ``execute_task`` ends the task with that exception.  The
interface ends a task with ``task.task_finished(...)``, which gives the
worker back (``worker_finished``; failures ignored).  With no worker or no
match the loop waits for a worker to be given back, or one second (PyMW's
re-check, since an interface can gain workers on its own), unless the
interface's ``try_avail_check_again()`` says to retry at once.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("pymw_magic.compat")

#: how long the loop waits before asking an interface for workers again
RECHECK = 1.0


class InterfaceDriver:
    def __init__(self, interface: Any, match: Callable[[list, list], Any] | None):
        self._interface = interface
        self._match = match or (lambda tasks, workers: (tasks[0], workers[0]))
        self._cond = threading.Condition()
        self._queue: list[Any] = []
        self._thread: threading.Thread | None = None
        self._stopped = False

    def add(self, task: Any) -> None:
        with self._cond:
            self._queue.append(task)
            self._cond.notify_all()
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="pymw-compat-scheduler")
                self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def status(self) -> Any:
        """The interface's get_status(), under the lock that guards its workers."""
        with self._cond:
            try:
                return self._interface.get_status()
            except Exception:
                return {"interface_status": "error"}

    def worker_finished(self, worker: Any) -> None:
        with self._cond:
            try:
                self._interface.worker_finished(worker)
            except Exception:
                pass
            self._cond.notify_all()

    def _workers(self) -> list:
        try:
            workers = self._interface.get_available_workers()
        except Exception:
            return [None]
        return list(workers) if isinstance(workers, list) else [None]

    def _pick(self, tasks: list, workers: list) -> tuple[Any, Any]:
        try:
            # PyMW unpacked (task, worker): anything else means the first of each
            task, worker = self._match(tasks, workers)
        except Exception:
            task, worker = tasks[0], workers[0]
        if task is not None and not any(t is task for t in tasks):
            task = tasks[0]
        if worker not in workers:
            worker = workers[0]
        return task, worker

    def _wait(self) -> None:
        try:
            if self._interface.try_avail_check_again():
                return
        except Exception:
            pass
        self._cond.wait(RECHECK)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._queue or self._stopped:
                    self._thread = None
                    return
                workers = self._workers()
                if not workers:
                    self._wait()
                    continue
                task, worker = self._pick(list(self._queue), workers)
                if task is None:
                    self._wait()
                    continue
                self._queue.remove(task)
                task._assigned_worker = worker
                task._worker_finish_func = self.worker_finished
                try:
                    self._interface.reserve_worker(worker)
                except Exception:
                    pass
            log.info("Executing task %s", task)
            threading.Thread(target=self._execute, args=(task, worker), daemon=True,
                             name=f"pymw-compat-task-{task}").start()

    def _execute(self, task: Any, worker: Any) -> None:
        task._times["execute_time"] = time.time()
        task._task_state = task.TASK_RUNNING
        try:
            self._interface.execute_task(task, worker)
        except Exception as exc:
            task.task_finished(exc)
