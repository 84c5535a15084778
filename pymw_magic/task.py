"""The Task and its state machine.

A :class:`Task` is one call ``fn(*args, **kwargs)`` on its way through the
system.  It owns its state and the record of its life: the worker that ran
it, how many times it was started, when it was submitted, started and
finished, what it printed, and its result or error.  Every backend — real
or simulated — reports through these same fields, so the dashboard and the
statistics never need to know which backend ran a task.

The state machine (every other edge is a bug and raises
:class:`~pymw_magic.errors.InvalidTransition`)::

    PENDING ──▶ RUNNING ──▶ DONE
       │  ▲        │  ╲────▶ FAILED       (raised, timed out, retries used up)
       │  └────────┤   ╲───▶ CANCELLED   (stopped by cancel / interrupt)
       │   requeued│
       │  (never   ▼
       │  started) RETRYING ──▶ RUNNING   (its worker was lost; runs again)
       │           │
       └──▶ FAILED / CANCELLED  (bad payload / cancelled before it ran)

``RUNNING`` means "its worker has started it" (a batch of small tasks
starts as one).  Pool backends send each worker its next batch ahead, so
that it never waits for the master; the tasks of a batch sent ahead stay
``PENDING`` (or ``RETRYING``) until the worker gets to it — their
``worker`` is already set and ``dispatched`` is true — and cancelling them
stops nothing: the worker is told to skip them.  A task of a lost batch
that had not started yet goes back to ``PENDING`` without being charged an
attempt; the one that was running when the worker died goes to
``RETRYING`` (or ``FAILED`` with ``WorkerLost`` once its retries are used
up).
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from concurrent.futures import Future as _Future
from concurrent.futures import TimeoutError as _FuturesTimeout
from typing import TYPE_CHECKING, Any, Callable, Protocol

from types import MappingProxyType

from .errors import InvalidTransition

#: shared by every task called without keyword arguments (read-only)
NO_KWARGS: Any = MappingProxyType({})

if TYPE_CHECKING:
    from concurrent.futures import Future


class TaskOwner(Protocol):
    """What a task reads of its job (``job.Job`` is one; named here so that
    this lower module does not import the job module)."""
    name: str
    timeout: float | None
    retries: int
    chunksize: int | None
    _counts: dict[Any, int]


class TaskState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    # The string's own hash (in C), consistent with the string equality a
    # str enum has: ``state in FINAL_STATES`` runs per task on hot paths,
    # and Enum's hash is a Python-level call.
    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


PENDING, RUNNING, RETRYING, DONE, FAILED, CANCELLED = TaskState
FINAL_STATES = frozenset({DONE, FAILED, CANCELLED})
#: Display order (the dashboard's bar and the counts follow it).
STATE_ORDER = (PENDING, RUNNING, RETRYING, DONE, FAILED, CANCELLED)

TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    PENDING: frozenset({RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({DONE, FAILED, CANCELLED, RETRYING, PENDING}),
    RETRYING: frozenset({RUNNING, FAILED, CANCELLED}),
    DONE: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


#: for each state, the states with an edge into it
SOURCES: dict[TaskState, frozenset[TaskState]] = {
    new: frozenset(old for old, targets in TRANSITIONS.items() if new in targets) for new in TaskState
}


def move_all(tasks: list["Task"], new: TaskState) -> bool:
    """Move every task to ``new``, checking each edge like :meth:`Task.to`.

    The batch form of ``to()`` for the hot paths (a batch of thousands of
    tiny tasks): counts are updated once per batch when the tasks share a
    job and a state.  Returns True in that case (one job, one old state).
    """
    if not tasks:
        return True
    first = tasks[0]
    job, old = first.job, first.state
    sources = SOURCES[new]
    uniform = True
    for t in tasks:
        if t.state is not old or t.job is not job:
            uniform = False
        if t.state not in sources:
            raise InvalidTransition(f"task {t.id}: {t.state} -> {new} is not an edge of the task state machine")
    if not uniform:
        for t in tasks:
            t.to(new)
        return False
    for t in tasks:
        t.state = new
    if job is not None:
        job._counts[old] -= len(tasks)
        job._counts[new] += len(tasks)
    return True


class Task:
    """One function call and its record.

    Attributes a user reads: ``index`` (position in its job's input),
    ``args``/``kwargs``, ``state``, ``worker`` (and its ``host``), ``attempts``, ``submitted``,
    ``started``, ``finished`` (``time.time()`` stamps, or virtual seconds
    on the simulator), ``duration``, ``stdout``, ``stderr``, ``result``,
    ``error`` and ``remote_traceback``.
    """

    # What every task sets lives in slots; what few tasks ever set (output,
    # an error, a Future, a retry's marks) reads the class defaults below
    # until set, in an instance dict made only then: a tiny task is made
    # with 14 stores, not 21 (creating tasks was a third of the master's
    # time per tiny task).
    __slots__ = (
        "id", "job", "index", "fn", "args", "kwargs", "state", "worker",
        "attempts", "submitted", "started", "finished", "result", "batch", "host", "__dict__",
        "__weakref__",
    )
    stdout: str = ""
    stderr: str = ""
    error: BaseException | None = None
    remote_traceback: str | None = None
    future: Future | None = None
    # Set after its batch was lost: run it alone so a task that kills
    # its worker cannot take innocent neighbours down with it again.
    isolate: bool = False
    requeues: int = 0  # times sent back uncharged after a lost worker

    def __init__(self, id: int, job: TaskOwner | None, index: int, fn: Any,
                 args: tuple, kwargs: dict, submitted: float,
                 future: Future | None = None):
        self.id = id
        self.job = job
        self.index = index
        self.fn = fn  # a payload.FunctionPayload: the job's function, pickled once
        self.args = args
        self.kwargs = kwargs
        self.state = PENDING
        self.worker: str | None = None
        self.host: str | None = None  # the machine of ``worker``, where the backend knows it
        self.attempts = 0
        self.submitted = submitted
        self.started: float | None = None
        self.finished: float | None = None
        self.result: Any = None
        if future is not None:
            self.future = future
        # The batch it was sent ahead in, until its worker starts it (see
        # the module docstring); None while queued and once started.
        self.batch: Any = None

    @property
    def dispatched(self) -> bool:
        """Sent to ``worker`` ahead of time and not started yet."""
        return self.batch is not None

    @property
    def duration(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def to(self, new: TaskState) -> TaskState:
        """Move to ``new``; return the old state. Raises on an illegal edge."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise InvalidTransition(f"task {self.id}: {old} -> {new} is not an edge of the task state machine")
        self.state = new
        if self.job is not None:
            counts = self.job._counts
            counts[old] -= 1
            counts[new] += 1
        return old

    def describe_input(self, limit: int = 80) -> str:
        """The task's input as a short string, for error messages."""
        parts = [repr(a) for a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        text = ", ".join(parts)
        if len(text) > limit:
            text = text[: limit - 3] + "..."
        return text

    def __repr__(self) -> str:
        job = f" job={self.job.name!r}" if self.job is not None else ""
        return f"<Task {self.id}{job} index={self.index} {self.state.value}>"


#: seconds a main thread waits at a time (see wait_slice)
WAIT_SLICE = 0.25


def wait_slice(left: float | None) -> float | None:
    """How long one wait of a loop that re-checks its condition may block.

    On the main thread, at most ``WAIT_SLICE``: CPython runs a signal's
    handler only between waits, and a Ctrl-C (or pytest-timeout's SIGALRM)
    that lands just as the thread starts a lock wait does not end that
    wait, so an unbounded wait would hold the interrupt back for ever.
    Other threads wait ``left`` (None: without limit)."""
    if threading.current_thread() is threading.main_thread():
        return WAIT_SLICE if left is None else min(left, WAIT_SLICE)
    return left


def _dropped(signum: int, frame: Any) -> None:
    """A SIGINT handler that drops the interrupt (see :func:`despite_interrupts`)."""


def despite_interrupts(fn: Callable[[], Any]) -> None:
    """Run ``fn()`` to its end even if Ctrl-C is pressed again meanwhile.

    What an interrupt starts (cancelling a job, terminating a master) must
    not itself be cut off half-way by the next Ctrl-C: tasks would be marked
    cancelled while their workers, never told, run them on.  On the main
    thread, SIGINT is dropped while ``fn`` runs (its handler is put back
    after; the caller raises the first interrupt).  An error of ``fn``'s
    own is raised.  Off the main thread (no interrupt lands there) it is a
    plain call.  (One landing as this is entered, before the swap, is
    raised here: callers in an ``except KeyboardInterrupt:`` clause call
    it once more then.)"""
    if threading.current_thread() is not threading.main_thread():
        fn()
        return
    previous = None
    while True:
        # (a Ctrl-C landing in here, before the handler is swapped, is
        # dropped too: the swap is tried again; once done, none comes)
        try:
            previous = signal.getsignal(signal.SIGINT)
            if previous is not None and previous is not _dropped:
                signal.signal(signal.SIGINT, _dropped)
            break
        except KeyboardInterrupt:
            continue
        except (ValueError, TypeError, AttributeError):  # (at interpreter exit, say)
            previous = None
            break
    try:
        fn()
    finally:
        if previous is not None and previous is not _dropped:
            # (None: a handler set outside Python, which cannot be put back)
            signal.signal(signal.SIGINT, previous)


class TaskFuture(_Future):
    """The Future of a submitted task.  ``result()`` and ``exception()``
    may first read the task's reply on the calling thread (``waiter``, set
    by the master: the backend reads it from the worker's connection when
    it can), so that the answer does not pass through another thread.
    Everything else is ``concurrent.futures.Future``'s."""

    #: callable(timeout) -> None: returns once the task may be done, or
    #: when it leaves the wait to the backend's own threads
    waiter: Callable[[float | None], None] | None = None

    def _wait_here(self, timeout: float | None) -> float | None:
        waiter = self.waiter
        if waiter is None or self.done():
            return timeout
        start = time.monotonic()
        waiter(timeout)
        if timeout is None:
            return None
        return max(0.0, timeout - (time.monotonic() - start))

    def _sliced(self, call: Callable[[float | None], Any], timeout: float | None) -> Any:
        # On the main thread the wait goes in slices: a Ctrl-C that lands as
        # this thread starts to wait is raised at the next slice (CPython runs
        # signal handlers only between waits), not when the timeout runs out.
        if threading.current_thread() is not threading.main_thread():
            return call(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                return call(WAIT_SLICE if left is None else max(0.0, min(left, WAIT_SLICE)))
            except _FuturesTimeout:
                if self.done() or (left is not None and left <= WAIT_SLICE):
                    raise   # (the task's own TimeoutError, or ours)

    def result(self, timeout: float | None = None) -> Any:
        return self._sliced(super().result, self._wait_here(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._sliced(super().exception, self._wait_here(timeout))
