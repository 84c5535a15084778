"""The event stream observers subscribe to.

The scheduler publishes what happens — tasks changing state (one event per
*batch* of tasks, never one per task, so 100,000 tiny tasks do not cost
100,000 callbacks), jobs starting and ending, workers coming and going.
Observers (the dashboard, the text progress bar, a job store) subscribe to
a master's :class:`EventBus`.  An observer that needs only jobs and workers
(a job store reading counts at its own pace) subscribes with
``tasks=False``: while nobody wants task events the scheduler builds none,
so a job of tiny tasks pays nothing per batch for it.  Observers are called on the scheduler's
threads: they must be quick and must not block; an observer that raises is
reported once and unsubscribed, never allowed to break the scheduler.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from .job import Job
    from .task import Task, TaskState

_log = logging.getLogger("pymw_magic")


@dataclass(frozen=True)
class TasksChanged:
    """``tasks`` (all of one job) entered ``state`` at ``time``."""
    job: Job
    tasks: Sequence[Task]
    state: TaskState
    time: float


@dataclass(frozen=True)
class JobChanged:
    """``kind`` is "submitted", "finished" or "cancelled"."""
    job: Job
    kind: str
    time: float


@dataclass(frozen=True)
class WorkerChanged:
    """``kind`` is "started", "lost" or "stopped"; ``info`` describes the
    worker (name, pid, host)."""
    worker: str
    kind: str
    time: float
    info: dict[str, Any]


Event = TasksChanged | JobChanged | WorkerChanged
Observer = Callable[[Event], None]


class Subscription:
    """Returned by :meth:`EventBus.subscribe`; call ``close()`` (or use it as a
    context manager) to stop receiving events."""

    def __init__(self, bus: EventBus, observer: Observer, tasks: bool = True):
        self._bus = bus
        self.observer = observer
        #: whether the observer receives :class:`TasksChanged` events
        self.tasks = tasks

    def want_tasks(self, tasks: bool = True) -> None:
        """Start (or stop) receiving :class:`TasksChanged` events."""
        self._bus._set_tasks(self, tasks)

    def close(self) -> None:
        self._bus.unsubscribe(self.observer)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._subs: tuple[Subscription, ...] = ()
        self._observers: tuple[Observer, ...] = ()        # every observer
        self._task_observers: tuple[Observer, ...] = ()   # those that want TasksChanged
        #: True when some observer wants task events: the scheduler builds
        #: :class:`TasksChanged` only then (read without the lock: a racy
        #: read sees the old or the new tuple, both whole)
        self.tasks = False
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        """True when someone listens: publishers skip building events if not."""
        return bool(self._observers)

    def subscribe(self, observer: Observer, *, tasks: bool = True) -> Subscription:
        """Call ``observer`` with every event; ``tasks=False``: with job and
        worker events only (no :class:`TasksChanged`)."""
        sub = Subscription(self, observer, tasks)
        with self._lock:
            self._subs = self._subs + (sub,)
            self._rebuild()
        return sub

    def unsubscribe(self, observer: Observer) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s.observer is not observer)
            self._rebuild()

    def _set_tasks(self, sub: Subscription, tasks: bool) -> None:
        with self._lock:
            sub.tasks = tasks
            self._rebuild()

    def _rebuild(self) -> None:
        """Under the lock: the tuples the publishers read."""
        self._observers = tuple(s.observer for s in self._subs)
        self._task_observers = tuple(s.observer for s in self._subs if s.tasks)
        self.tasks = bool(self._task_observers)

    def emit(self, event: Event) -> None:
        observers = self._task_observers if event.__class__ is TasksChanged else self._observers
        for observer in observers:
            try:
                observer(event)
            except Exception as exc:
                self.unsubscribe(observer)
                message = f"pymw-magic: observer {observer!r} raised {exc!r} and was unsubscribed"
                try:
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                except Exception:
                    # Warnings turned into errors (``-W error``, a test
                    # suite's filter): the publisher (a serving thread, a
                    # submit) must still not fail for the observer's bug.
                    _log.error(message)
