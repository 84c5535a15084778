"""The Job: the tasks of one ``map_async`` call (or one ``%%pymw`` cell).

A job reads its input lazily — at most a bounded *window* of tasks exists
ahead of the workers, so a 100,000-item generator streams in bounded memory
— and keeps the per-state counts, the finished order and the results in
input order.  What a user does with one: ``counts()``, ``progress``,
``wait()``, ``result()``, ``as_completed()``, ``cancel()``, ``tasks``.

Waiting is interruptible: a KeyboardInterrupt while waiting cancels the
job (pending tasks are cancelled, running ones stopped by stopping their
workers) and is re-raised.  In a coroutine (a notebook cell), ``await
job.wait_async()`` or ``await job`` wait without blocking the event loop —
the kernel goes on handling widget messages such as a Cancel click — and
cancelling the awaiting task cancels the job the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator

from .errors import PymwError
from .task import DONE, FAILED, FINAL_STATES, NO_KWARGS, STATE_ORDER, Task

if TYPE_CHECKING:
    from .master import Master
    from .payload import FunctionPayload
    from .scheduler import Scheduler

_job_ids = itertools.count(1)


class Job:
    def __init__(self, master: Master, fn: FunctionPayload, source: Iterator[tuple] | None,
                 total: int | None, *, name: str | None, chunksize: int | None,
                 timeout: float | None, retries: int, stream: bool = False):
        self.id = next(_job_ids)
        self.name = name or f"job-{self.id}"
        self.master = master
        self.fn = fn
        self.chunksize = chunksize
        self.timeout = timeout
        self.retries = retries
        self.total = total            # number of tasks, when the input has a len()
        # The scheduler's clock: wall time, or virtual time on the simulator
        self._clock = master._scheduler.clock
        self.created = self._clock()
        self.finished_at: float | None = None
        # A streaming job (Master.map) drops tasks once their result is read.
        self.tasks: list[Task] | deque[Task] = deque() if stream else []
        self._stream = stream
        #: keep at most this many ended tasks (submit() jobs: their Futures
        #: hold the results, and a kernel may submit for days); None: all
        self._history: int | None = None
        self._counts = dict.fromkeys(STATE_ORDER, 0)
        self._source = source
        self._exhausted = source is None
        self._fed = 0
        self._final = 0
        self._order: list[Task] = []   # completion order, for as_completed()
        self._finished = False
        self._cancelled = False
        self._input_error: BaseException | None = None
        self._callbacks: list[Callable[[Job], Any]] = []

    # --- what users read --------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Tasks by state name; ``pending`` includes input not yet read when
        the total is known."""
        counts = {state.value: n for state, n in self._counts.items()}
        if self.total is not None and not self._cancelled:
            counts["pending"] += max(0, self.total - self._fed)
        return counts

    @property
    def progress(self) -> tuple[int, int | None]:
        """(finished tasks, total or None while the input length is unknown)."""
        total = self.total if self.total is not None else (self._fed if self._exhausted else None)
        return self._final, total

    def done(self) -> bool:
        return self._finished

    @property
    def elapsed(self) -> float:
        return (self.finished_at if self.finished_at is not None else self._clock()) - self.created

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every task ended; False if ``timeout`` passed first."""
        cond = self.master._scheduler.cond
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with cond:
                while not self._finished:
                    if deadline is None:
                        cond.wait()
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return False
                        cond.wait(left)
        except KeyboardInterrupt:
            self.cancel()
            raise
        return True

    def add_done_callback(self, fn: Callable[["Job"], Any]) -> None:
        """Call ``fn(job)`` once every task has ended — at once if that is
        already so, otherwise on the thread that ended the last task."""
        with self.master._scheduler.cond:
            if not self._finished:
                self._callbacks.append(fn)
                return
        fn(self)

    async def wait_async(self) -> None:
        """Wait, in a coroutine, until every task ended.  Cancelling the
        awaiting task (the kernel's stop button on an awaiting cell) cancels
        the job, as an interrupt does in :meth:`wait`."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def wake(_job: Job) -> None:
            loop.call_soon_threadsafe(lambda: ended.done() or ended.set_result(None))

        self.add_done_callback(wake)
        try:
            while not ended.done():
                # Wake the loop now and then: ipykernel turns the stop button's
                # SIGINT into a plain call_soon, which an idle loop only runs
                # when something else wakes it.
                await asyncio.wait({ended}, timeout=0.1)
        except asyncio.CancelledError:
            self.cancel()
            raise

    def __await__(self) -> Generator[Any, None, list[Any]]:
        """``await job``: the results, as :meth:`result` gives them."""
        return self._results_when_done().__await__()

    async def _results_when_done(self) -> list[Any]:
        await self.wait_async()
        return self.result()

    def result(self, timeout: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """Results in input order.

        Raises the first failed task's exception (in input order) unless
        ``return_exceptions``, in which case a failed or cancelled position
        holds its exception.  ``concurrent.futures.TimeoutError`` if
        ``timeout`` passes first.
        """
        if self._stream:
            raise PymwError("a streaming job's results are read through Master.map's iterator")
        if not self.wait(timeout):
            raise FuturesTimeout(f"job {self.name!r} did not finish within {timeout} s")
        if self._input_error is not None and not return_exceptions:
            raise PymwError(f"reading the input of job {self.name!r} failed: {self._input_error!r}") \
                from self._input_error
        out: list[Any] = []
        for task in self.tasks:
            if task.state is DONE:
                out.append(task.result)
                continue
            exc = task.error if task.state is FAILED else _cancelled(task)
            if not return_exceptions:
                raise exc
            out.append(exc)
        return out

    def as_completed(self, timeout: float | None = None) -> Iterator[Task]:
        """Yield tasks as they finish (done, failed or cancelled)."""
        cond = self.master._scheduler.cond
        deadline = None if timeout is None else time.monotonic() + timeout
        i = 0
        while True:
            with cond:
                while i >= len(self._order) and not self._finished:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise FuturesTimeout(f"job {self.name!r}: no task finished within {timeout} s")
                    try:
                        cond.wait(left)
                    except KeyboardInterrupt:
                        cond.release()
                        try:
                            self.cancel()
                        finally:
                            cond.acquire()
                        raise
                batch = self._order[i:]
                i = len(self._order)
                finished = self._finished
            yield from batch
            if finished and i >= len(self._order):
                return

    def cancel(self, stop_running: bool = True) -> int:
        """Cancel tasks not yet run and, unless ``stop_running`` is False,
        stop those running (their workers are replaced). Returns how many
        tasks were cancelled."""
        scheduler = self.master._scheduler
        with scheduler.cond:
            self._cancelled = True
        scheduler.close_job(self)
        return scheduler.cancel(list(self.tasks), stop_running=stop_running)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        """In a notebook a Job shows itself as the live job widget."""
        from .widgets.jobview import job_mimebundle
        return job_mimebundle(self, include, exclude)

    def report(self) -> Any:
        """Makespan, utilisation, waiting times, failures, timeline and CSV
        trace of this job: a :class:`pymw_magic.simulation.report.Report`
        (virtual times on the simulator, wall-clock times elsewhere)."""
        from .simulation.report import job_report  # issue 5 hook: the report lives there
        return job_report(self)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items() if v)
        return f"<Job {self.id} {self.name!r} {'finished' if self._finished else 'active'} {counts}>"

    # --- the scheduler's side (always under its lock) --------------------------
    def _window(self, scheduler: Scheduler) -> int:
        """How many unfinished (or, streaming, unread) tasks may exist at once."""
        n = scheduler.chunking.size(self.fn, self.chunksize, 1 << 30, 1)
        return max(64, 4 * scheduler.workers * n)

    def _in_window(self) -> int:
        return len(self.tasks) if self._stream else self._fed - self._final

    def _feed(self, room: int) -> list[Task]:
        if self._exhausted:
            return []
        now = self._clock()
        fn = self.fn
        ids = self.master._task_ids
        start = self._fed
        try:
            items = list(itertools.islice(self._source, room))
        except Exception as exc:  # the user's iterable raised
            self._input_error = exc
            self._exhausted = True
            items = []
        new = [Task(next(ids), self, start + i, fn, args, NO_KWARGS, now) for i, args in enumerate(items)]
        if len(new) < room:
            self._exhausted = True
        if new:
            self._fed += len(new)
            self._counts[STATE_ORDER[0]] += len(new)
            self.tasks.extend(new)
        return new

    def _on_final(self, tasks: list[Task], scheduler: Scheduler) -> None:
        self._final += len(tasks)
        if self._history is not None:
            kept = self.tasks
            while len(kept) > self._history and kept[0].state in FINAL_STATES:
                kept.popleft()  # type: ignore[union-attr]
        elif not self._stream:
            self._order.extend(tasks)
        self._check_finished(scheduler)

    def _check_finished(self, scheduler: Scheduler) -> None:
        if not self._finished and self._exhausted and self._final >= self._fed:
            self._finished = True
            self.finished_at = self._clock()
            scheduler.job_finished(self)

    def _run_callbacks(self) -> None:
        """Called by the scheduler, outside its lock, once the job finished."""
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


def _cancelled(task: Task) -> BaseException:
    from concurrent.futures import CancelledError
    return CancelledError(f"task {task.index} was cancelled")

