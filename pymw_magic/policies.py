"""Scheduling policies: which pending task a free worker gets next, and how
many of them at once.

A policy is a queue discipline owned by one scheduler.  Pool backends (local,
MPI) and the simulator all ask the same object, so a policy tuned in
simulation is the one deployed.  The contract is four methods::

    push(tasks)            new tasks arrive, in submission order
    push_front(tasks)      tasks coming back (a lost batch, a retry): first in line
    pop(worker, n)         up to n tasks for ``worker`` (a WorkerInfo)
    __len__()              how many are queued (may count tasks already
                           cancelled: those are skipped by pop, lazily)

Batch *size* is a separate concern, :class:`Chunking`: fixed when the user
gives a chunksize, otherwise adaptive — a batch is sized to take about
``target`` seconds from the measured mean duration of the function, so
tiny tasks are amortised while progress stays live.
"""

from __future__ import annotations

import math
import random
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterable

from .task import FINAL_STATES

if TYPE_CHECKING:
    from .payload import FunctionPayload
    from .task import Task


class Policy:
    """Base class and FIFO behaviour's contract; see the module docstring."""

    name = "base"

    def push(self, tasks: Iterable[Task]) -> None:
        raise NotImplementedError

    def push_front(self, tasks: Iterable[Task]) -> None:
        raise NotImplementedError

    def pop(self, worker: object, n: int) -> list[Task]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class FIFO(Policy):
    """First submitted, first run."""

    name = "fifo"

    def __init__(self) -> None:
        self._q: deque[Task] = deque()

    def push(self, tasks: Iterable[Task]) -> None:
        self._q.extend(tasks)

    def push_front(self, tasks: Iterable[Task]) -> None:
        self._q.extendleft(reversed(list(tasks)))

    def pop(self, worker: object, n: int) -> list[Task]:
        q = self._q
        out: list[Task] = []
        while q and len(out) < n:
            popleft = q.popleft
            got = [popleft() for _ in range(min(n - len(out), len(q)))]
            out += [t for t in got if t.state not in FINAL_STATES]
        return out

    def __len__(self) -> int:
        return len(self._q)


class LIFO(FIFO):
    """Newest first (depth-first over recursive submissions)."""

    name = "lifo"

    def pop(self, worker: object, n: int) -> list[Task]:
        q = self._q
        out: list[Task] = []
        while q and len(out) < n:
            task = q.pop()
            if task.state not in FINAL_STATES:
                out.append(task)
        return out

    def push_front(self, tasks: Iterable[Task]) -> None:
        self._q.extend(tasks)


class Random(Policy):
    """A uniformly random pending task (seedable, for reproducible studies)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._items: list[Task] = []
        self._rng = random.Random(seed)

    def push(self, tasks: Iterable[Task]) -> None:
        self._items.extend(tasks)

    push_front = push

    def pop(self, worker: object, n: int) -> list[Task]:
        items, rng = self._items, self._rng
        out: list[Task] = []
        while items and len(out) < n:
            i = rng.randrange(len(items))
            items[i], items[-1] = items[-1], items[i]
            task = items.pop()
            if task.state not in FINAL_STATES:
                out.append(task)
        return out

    def __len__(self) -> int:
        return len(self._items)


_POLICIES: dict[str, Callable[[], Policy]] = {
    "fifo": FIFO,
    "lifo": LIFO,
    "random": Random,
}


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Make a policy selectable by name (``Master(policy=name)``, ``--policy``)."""
    _POLICIES[name] = factory


def make_policy(spec: str | Policy | Callable[[], Policy]) -> Policy:
    """A policy instance from a name, an instance or a factory."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        try:
            return _POLICIES[spec]()
        except KeyError:
            raise ValueError(f"unknown policy {spec!r}; valid policies: {', '.join(policy_names())}") from None
    if isinstance(spec, type) and issubclass(spec, Policy):
        return spec()
    raise TypeError(f"policy must be a name ({', '.join(policy_names())}) or a Policy, not {spec!r}")


class Chunking:
    """How many tasks go to a worker in one batch.

    ``fixed`` (a user's chunksize) wins.  Otherwise: one task while a
    function's duration is unknown, then enough tasks to fill ``target``
    seconds, never more than ``cap``, and never so many that some workers
    would be left without work (``queued / workers``).
    """

    def __init__(self, target: float = 0.02, cap: int = 4096):
        self.target = target
        self.cap = cap

    def size(self, fn: FunctionPayload, fixed: int | None, queued: int, workers: int) -> int:
        if fixed:
            return fixed
        if fn.mean is None:
            return 1
        n = int(self.target / max(fn.mean, 1e-7))
        fair = math.ceil(queued / max(1, workers))
        return max(1, min(n, self.cap, fair))
