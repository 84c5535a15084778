"""The event stream observers subscribe to.

The scheduler publishes what happens — tasks changing state (one event per
*batch* of tasks, never one per task, so 100,000 tiny tasks do not cost
100,000 callbacks), jobs starting and ending, workers coming and going.
Observers (the dashboard, the text progress bar, a job store) subscribe to
a master's :class:`EventBus`.  Observers are called on the scheduler's
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

    def __init__(self, bus: EventBus, observer: Observer):
        self._bus = bus
        self.observer = observer

    def close(self) -> None:
        self._bus.unsubscribe(self.observer)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class EventBus:
    def __init__(self) -> None:
        self._observers: tuple[Observer, ...] = ()
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        """True when someone listens: publishers skip building events if not."""
        return bool(self._observers)

    def subscribe(self, observer: Observer) -> Subscription:
        with self._lock:
            self._observers = self._observers + (observer,)
        return Subscription(self, observer)

    def unsubscribe(self, observer: Observer) -> None:
        with self._lock:
            self._observers = tuple(o for o in self._observers if o is not observer)

    def emit(self, event: Event) -> None:
        for observer in self._observers:
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
