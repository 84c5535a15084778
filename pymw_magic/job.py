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
import logging
import time
from collections import deque
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator, Protocol, Sequence

from . import rules
from .errors import PymwError
from .task import DONE, FAILED, FINAL_STATES, NO_KWARGS, PENDING, STATE_ORDER, Task, despite_interrupts, wait_slice

if TYPE_CHECKING:
    import threading

    from .payload import FunctionPayload
    from .policies import Chunking

_job_ids = itertools.count(1)
_log = logging.getLogger("pymw_magic")


class JobScheduler(Protocol):
    """What a job needs of the scheduler that runs it (``scheduler.py``
    implements it; named here so that this module does not import it)."""
    cond: threading.Condition
    chunking: Chunking
    workers: int
    clock: Callable[[], float]

    def job_finished(self, job: Job) -> None: ...
    def close_job(self, job: Job) -> None: ...
    def cancel(self, tasks: Sequence[Task], stop_running: bool = True) -> int: ...


class JobOwner(Protocol):
    """What a job needs of the master that made it."""
    _scheduler: JobScheduler
    _task_ids: Iterator[int]
    #: Task objects nobody holds any more, to be made new (optional)
    _spare_tasks: list[Task]


# Hooks for the layers above this one: the live job widget
# (``widgets.jobview``) and the report (``simulation.report``) register
# themselves, so that a Job can show itself without this module naming them.
_viewer: Callable[[Job, Any, Any], Any] | None = None
_reporter: Callable[[Job], Any] | None = None


def set_viewer(fn: Callable[[Job, Any, Any], Any] | None) -> None:
    """Register ``fn(job, include, exclude) -> mimebundle``: how a Job
    shows itself in a notebook (``Job._repr_mimebundle_``)."""
    global _viewer
    _viewer = fn


_remover: Callable[[Job, bool], None] | None = None


def set_remover(fn: Callable[[Job, bool], None] | None) -> None:
    """Register ``fn(job, cancel)``: what :meth:`Job.remove` does (the job
    store's side, ``pymw_magic.reattach``)."""
    global _remover
    _remover = fn


def set_reporter(fn: Callable[[Job], Any] | None) -> None:
    """Register ``fn(job) -> report``: what :meth:`Job.report` returns."""
    global _reporter
    _reporter = fn


class Job:
    def __init__(self, master: JobOwner, fn: FunctionPayload, source: Iterator[tuple] | None,
                 total: int | None, *, name: str | None, chunksize: int | None,
                 timeout: float | None, retries: int, stream: bool = False, window: int | None = None,
                 arity: int | None = None):
        self.id = next(_job_ids)
        self.name = name or f"job-{self.id}"
        self.master = master
        self._scheduler = master._scheduler
        self._task_ids = master._task_ids
        self._spare: list[Task] | None = getattr(master, "_spare_tasks", None)
        self.fn = fn
        self.chunksize = chunksize
        self.timeout = timeout
        self.retries = retries
        #: how many unfinished tasks may exist at once; None: the scheduler's
        #: rule (a batch backend hands its engine a whole job at once)
        self.window = window
        self.total = total            # number of tasks, when the input has a len()
        #: how many positional arguments every task gets, when all get the
        #: same (a map over that many iterables) and none gets keywords;
        #: None: unknown.  At 1 a pool backend sends each call's argument
        #: bare, without its 1-tuple.
        self.arity = arity
        # The scheduler's clock: wall time, or virtual time on the simulator
        self._clock = self._scheduler.clock
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
        self._reading = False  # a thread is reading the input now (outside the lock)
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
        the total is known and the input is still to be read (not once the
        job was cancelled or its master terminated)."""
        counts = {state.value: n for state, n in self._counts.items()}
        if self.total is not None and not self._cancelled and not self._exhausted:
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
    def open_ended(self) -> bool:
        """True for the job grouping ``submit()`` calls: it takes new tasks
        after it finished (a map job never does)."""
        return self._history is not None

    @property
    def elapsed(self) -> float:
        return (self.finished_at if self.finished_at is not None else self._clock()) - self.created

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every task ended; False if ``timeout`` passed first."""
        self._check_here()
        cond = self._scheduler.cond
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with cond:
                while not self._finished:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    cond.wait(wait_slice(left))
        except KeyboardInterrupt:
            try:
                despite_interrupts(self.cancel)
            except KeyboardInterrupt:  # (a second one, landed before it could drop them)
                despite_interrupts(self.cancel)
            raise
        return True

    def _check_here(self) -> None:
        # (before any lock: one a thread of the parent held at the fork is
        # never let go in the child)
        if not self._finished and getattr(self.master, "_forked", False):
            raise RuntimeError(f"job {self.name!r} was started before this process was forked: its tasks "
                               "run for the parent process only and never finish here")

    def add_done_callback(self, fn: Callable[["Job"], Any]) -> None:
        """Call ``fn(job)`` once every task has ended — at once if that is
        already so, otherwise on the thread that ended the last task."""
        with self._scheduler.cond:
            if not self._finished:
                self._callbacks.append(fn)
                return
        _call_back(fn, self)

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
        cond = self._scheduler.cond
        deadline = None if timeout is None else time.monotonic() + timeout
        i = 0
        while True:
            self._check_here()
            with cond:
                while i >= len(self._order) and not self._finished:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise FuturesTimeout(f"job {self.name!r}: no task finished within {timeout} s")
                    try:
                        cond.wait(wait_slice(left))
                    except KeyboardInterrupt:
                        cond.release()
                        try:
                            despite_interrupts(self.cancel)
                        except KeyboardInterrupt:  # (as above)
                            despite_interrupts(self.cancel)
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
        if getattr(self.master, "_forked", False):
            # A forked child's copy of the parent's job: the tasks run for
            # the parent, and a lock a thread of the parent held at the fork
            # (the scheduler's, a worker's send lock) is never let go here.
            self._cancelled = True
            return 0
        scheduler = self._scheduler
        with scheduler.cond:
            self._cancelled = True
        scheduler.close_job(self)
        return scheduler.cancel(list(self.tasks), stop_running=stop_running)

    def remove(self, cancel: bool = False) -> None:
        """Delete this job's record from the job store and, for a batch job,
        its job directory.  An unfinished job is refused unless ``cancel``:
        then it is cancelled first (a batch job's procs leave the queue)."""
        if _remover is None:
            raise PymwError("Job.remove() needs pymw_magic.reattach, which registers itself with "
                            "pymw_magic.job.set_remover when pymw_magic is imported; import pymw_magic")
        _remover(self, cancel)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> Any:
        """In a notebook a Job shows itself as the live job widget (the
        viewer registered with :func:`set_viewer`; None, the plain repr,
        when none is)."""
        if _viewer is None:
            return None
        return _viewer(self, include, exclude)

    def report(self, wait: bool = True, timeout: float | None = None) -> Any:
        """Makespan, utilisation, waiting times, failures, timeline and CSV
        trace of this job: a :class:`pymw_magic.simulation.report.Report`
        (virtual times on the simulator, wall-clock times elsewhere).

        An unfinished job is waited for (as :meth:`wait`: an interrupt
        cancels it), for at most ``timeout`` seconds if given; ``wait=False``
        returns at once.  A job that has not finished by then gets a report
        of what has ended so far, marked partial (``report.partial``, and
        said in its text).  On the simulator the job is always waited for:
        virtual time costs nothing."""
        if _reporter is None:
            raise PymwError("Job.report() needs pymw_magic.simulation.report, which registers itself "
                            "with pymw_magic.job.set_reporter when pymw_magic is imported; "
                            "import pymw_magic (not only pymw_magic.job)")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
        if wait and not self._stream:  # (a map() job ends only as its iterator is read)
            self.wait(timeout)
        return _reporter(self)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items() if v)
        return f"<Job {self.id} {self.name!r} {'finished' if self._finished else 'active'} {counts}>"

    # --- the scheduler's side (always under its lock) --------------------------
    def _window(self, scheduler: JobScheduler) -> int:
        """How many unfinished (or, streaming, unread) tasks may exist at once."""
        if self.window is not None:
            return self.window
        return rules.job_window(scheduler.chunking, self.fn, self.chunksize, scheduler.workers)

    def _in_window(self) -> int:
        return len(self.tasks) if self._stream else self._fed - self._final

    def _read(self, room: int) -> tuple[list[tuple], BaseException | None]:
        """Read up to ``room`` input items: the user's iterable, so called
        WITHOUT the scheduler's lock, by one thread at a time (``_reading``)."""
        items: list[tuple] = []
        try:
            items.extend(itertools.islice(self._source, room))  # type: ignore[arg-type]
        except Exception as exc:  # the user's iterable raised: what it gave before still runs
            return items, exc
        return items, None

    def _accept(self, items: list[tuple], room: int, error: BaseException | None) -> list[Task]:
        """Under the lock: the tasks of items :meth:`_read` returned (none if
        the job was closed meanwhile)."""
        if self._exhausted:
            return []
        if error is not None:
            self._input_error = error
            self._exhausted = True
        start, k = self._fed, len(items)
        fn, now, ids = self.fn, self._clock(), self._task_ids
        spare = self._spare
        if spare and k:
            # Spare Task objects made new (what Task.__init__ sets; its
            # result, job, input and function were emptied when it became a
            # spare, and ``batch`` is None once a task started): no
            # allocation, and nothing new for the garbage collector to track.
            r = min(k, len(spare))
            new = spare[-r:]
            del spare[-r:]
            for t, tid, i, args in zip(new, itertools.islice(ids, r), range(start, start + r), items):
                t.id = tid
                t.job = self
                t.index = i
                t.fn = fn
                t.args = args
                t.kwargs = NO_KWARGS
                t.state = PENDING
                t.attempts = 0
                t.submitted = now
                t.worker = t.host = t.started = t.finished = None
            if r < k:
                new += self._make(items[r:], start + r, now)
        else:
            new = self._make(items, start, now)
        if len(new) < room:
            self._exhausted = True
        if new:
            self._fed += len(new)
            self._counts[STATE_ORDER[0]] += len(new)
            self.tasks.extend(new)
        return new

    def _make(self, items: list[tuple], start: int, now: float) -> list[Task]:
        """New tasks of ``items`` from input position ``start``."""
        k = len(items)
        # (map over C iterators: no Python frame per task but Task's own)
        return list(map(Task, itertools.islice(self._task_ids, k), itertools.repeat(self, k),
                        range(start, start + k), itertools.repeat(self.fn, k), items,
                        itertools.repeat(NO_KWARGS, k), itertools.repeat(now, k)))

    def _append(self, task: Task) -> None:
        """Under the lock: a task from ``submit()`` joins this open-ended job."""
        self._finished = False
        self._fed += 1
        self._counts[task.state] += 1
        self.tasks.append(task)

    def _on_final(self, tasks: list[Task], scheduler: JobScheduler) -> None:
        self._final += len(tasks)
        if self._history is not None:
            # A submitted task's result lives in its Future, which the
            # caller holds as long as it wants it; the record kept here for
            # the dashboard does not keep it alive.
            # Nor does it keep the arguments: submit(fn, big_array) a
            # thousand times must not hold a thousand arrays.
            for t in tasks:
                if t.future is not None:  # (already handed its result, outside the lock)
                    t.result = t.future = None
                t.args, t.kwargs = (), NO_KWARGS
            kept = self.tasks
            while len(kept) > self._history and kept[0].state in FINAL_STATES:
                kept.popleft()  # type: ignore[union-attr]
        elif not self._stream:
            self._order.extend(tasks)
        self._check_finished(scheduler)

    def _check_finished(self, scheduler: JobScheduler) -> None:
        if not self._finished and self._exhausted and self._final >= self._fed:
            self._finished = True
            self.finished_at = self._clock()
            scheduler.job_finished(self)

    def _run_callbacks(self) -> None:
        """Called by the scheduler, outside its lock, once the job finished."""
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _call_back(fn, self)


def _call_back(fn: Callable[[Job], Any], job: Job) -> None:
    """A done-callback is the user's code: one that raises is logged and
    the others still run, as ``Future`` does; it must never be taken for a
    worker's failure by the thread that happened to end the job."""
    try:
        fn(job)
    except Exception:
        _log.exception("pymw-magic: done-callback %r of job %r raised", fn, job.name)


def _cancelled(task: Task) -> BaseException:
    from concurrent.futures import CancelledError
    return CancelledError(f"task {task.index} was cancelled")

