"""Scheduling policies: which pending task a free worker gets next, and how
many of them at once.

A policy is a queue discipline owned by one scheduler.  Pool backends (local,
MPI) and the simulator all ask the same object, so a policy tuned in
simulation is the one deployed (``Master("local", policy=p)`` with the ``p``
the tuning widget chose).  The contract is four methods::

    push(tasks)            new tasks arrive, in submission order
    push_front(tasks)      tasks coming back (a lost batch, a retry): first in line
    pop(worker, n)         up to n tasks for ``worker`` (its name)
    __len__()              how many are queued (may count tasks already
                           cancelled: those are skipped by pop, lazily)

and three optional hooks, each with a do-nothing default, so a policy that
ignores them (or an old one written against the four methods) still works:

    attach(workers)        the number of workers, told once by the scheduler
    host_key(host)         a sort key over *hosts*: when several hosts are
                           free at the same moment, the smallest key is
                           served first (None: in host order).  The
                           simulator, whose hosts are free at well-defined
                           instants, honours it; a real pool's worker
                           threads race for work, so there it cannot matter.
                           ``host`` has ``name``, ``index`` and ``speed``.
    use_estimate(fn)       a default duration estimate ``fn(task) -> seconds``
                           for policies that order tasks by length, used
                           when the user gave none (the simulator passes
                           its duration model)

What the policies here do:

=================  ==========================================================
``fifo``           first submitted, first run (self-scheduling)
``lifo``           newest first
``random``         a uniformly random pending task (seedable)
``round-robin``    static: the k-th task belongs to worker k mod W; a worker
                   whose share is done idles (``steal=True`` lets it help)
``fastest-first``  FIFO order of tasks; among free hosts the fastest is served
                   first (simulator; on a pool of equal processes it is FIFO)
``longest-first``  the longest estimated task first (LPT, Graham's 4/3 bound)
``shortest-first`` the shortest estimated task first (SPT: least mean wait)
=================  ==========================================================

Order-by-length policies need estimates: ``LongestFirst(estimate=lambda x:
cost(x))`` — called with a task's arguments — on any backend; on the
simulator the duration model is used when none is given.  Note that the
scheduler holds only a job's *window* of tasks (at least 64, four per worker
and batch) ahead of the workers: length-ordering is exact within it.

A user policy is a :class:`Policy` subclass, a factory returning one, or a
PyMW-style function ``scheduler_func(tasks, workers) -> (task, worker)``
(``tasks`` the pending tasks, ``workers`` the free ones; returning a task
alone, or None for "nothing for this worker now", is accepted too).

Batch *size* is a separate concern, :class:`Chunking`: fixed when the user
gives a chunksize, otherwise adaptive — a batch is sized to take about
``target`` seconds from the measured mean duration of the function, so
tiny tasks are amortised while progress stays live.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import math
import random
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .task import FINAL_STATES

if TYPE_CHECKING:
    from .payload import FunctionPayload
    from .task import Task


class Policy:
    """Base class; see the module docstring for the contract."""

    name = "base"

    def push(self, tasks: Iterable[Task]) -> None:
        raise NotImplementedError

    def push_front(self, tasks: Iterable[Task]) -> None:
        raise NotImplementedError

    def pop(self, worker: object, n: int) -> list[Task]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    # --- optional hooks (defaults: no effect) ---------------------------------
    def attach(self, workers: int) -> None:
        """Told the number of workers once, before any task arrives."""

    #: ``host_key(host) -> sortable`` or None (hosts served in index order)
    host_key: Callable[[Any], Any] | None = None

    #: True when the order tasks come out in does not depend on how many
    #: were pushed at a time (FIFO-like): the simulator may then read the
    #: input in bigger gulps than the scheduler's window, with the same trace.
    gulp_safe = False

    def use_estimate(self, estimate: Callable[[Any], float]) -> None:
        """A default duration estimate (``estimate(task) -> seconds``)."""

    def __repr__(self) -> str:
        return f"<policy {self.name}>"


class FIFO(Policy):
    """First submitted, first run."""

    name = "fifo"
    gulp_safe = True

    def __init__(self) -> None:
        self._q: deque[Task] = deque()

    def push(self, tasks: Iterable[Task]) -> None:
        self._q.extend(tasks)

    def push_front(self, tasks: Iterable[Task]) -> None:
        self._q.extendleft(reversed(list(tasks)))

    def pop(self, worker: object, n: int) -> list[Task]:
        q = self._q
        if n == 1:  # the common case, kept short
            while q:
                task = q.popleft()
                if task.state not in FINAL_STATES:
                    return [task]
            return []
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
    gulp_safe = False

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

    def seed(self, seed: Any) -> None:
        """Restart the random stream (the simulator seeds it from its ``seed``)."""
        self._rng.seed(seed)

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


class RoundRobin(Policy):
    """Static round-robin: the k-th task pushed belongs to slot k mod W, and
    each worker owns one slot — the classic static assignment that ignores
    speeds.  ``steal=True``: a worker whose slot is empty takes from the
    fullest other slot (then it is a work-stealing scheduler).

    Slots go to workers in the order they first ask.  A worker name never
    seen before when every slot is owned (a replacement for a lost worker)
    takes over the slot whose owner asked least recently, so no slot is
    ever stranded by a dead worker.  Returning tasks (retries, a lost
    batch) go to the front of slot ``task.index mod W`` (for a single job, the
    slot they came from).
    """

    name = "round-robin"

    def __init__(self, steal: bool = False, workers: int | None = None) -> None:
        self.steal = steal
        self._workers = workers
        self._slots: list[deque[Task]] = []
        self._owner: dict[str, int] = {}
        self._last_ask: list[int] = []
        self._clock = itertools.count()
        self._next = 0
        self._len = 0

    def attach(self, workers: int) -> None:
        if self._workers is None:
            self._workers = workers

    def _ensure_slots(self) -> None:
        if not self._slots:
            w = max(1, self._workers or 1)
            self._slots = [deque() for _ in range(w)]
            self._last_ask = [-1] * w

    def push(self, tasks: Iterable[Task]) -> None:
        self._ensure_slots()
        slots, w = self._slots, len(self._slots)
        k = self._next
        for t in tasks:
            slots[k % w].append(t)
            k += 1
            self._len += 1
        self._next = k

    def push_front(self, tasks: Iterable[Task]) -> None:
        self._ensure_slots()
        w = len(self._slots)
        for t in reversed(list(tasks)):
            self._slots[t.index % w].appendleft(t)
            self._len += 1

    def _slot(self, worker: object) -> int:
        name = str(getattr(worker, "name", worker))
        s = self._owner.get(name)
        if s is None:
            owned = set(self._owner.values())
            free = [i for i in range(len(self._slots)) if i not in owned]
            s = free[0] if free else min(range(len(self._slots)), key=self._last_ask.__getitem__)
            for other, slot in list(self._owner.items()):
                if slot == s:
                    del self._owner[other]
            self._owner[name] = s
        self._last_ask[s] = next(self._clock)
        return s

    def pop(self, worker: object, n: int) -> list[Task]:
        self._ensure_slots()
        s = self._slot(worker)
        out = self._take(self._slots[s], n)
        if not out and self.steal and self._len:
            fullest = max(range(len(self._slots)), key=lambda i: len(self._slots[i]))
            out = self._take(self._slots[fullest], n)
        return out

    def _take(self, q: deque[Task], n: int) -> list[Task]:
        out: list[Task] = []
        while q and len(out) < n:
            t = q.popleft()
            self._len -= 1
            if t.state not in FINAL_STATES:
                out.append(t)
        return out

    def __len__(self) -> int:
        return self._len


class FastestFirst(FIFO):
    """Tasks in FIFO order; among hosts free at the same moment the fastest
    is served first, so when there are fewer tasks than free hosts (the tail
    of a job, a small job, retries) the work goes to the fastest ones."""

    name = "fastest-first"

    @staticmethod
    def host_key(host: Any) -> float:  # type: ignore[override]
        return -float(getattr(host, "speed", 1.0) or 1.0)


class _ByLength(Policy):
    """Tasks ordered by an estimate of their duration (a heap)."""

    sign = 1.0

    def __init__(self, estimate: Callable[..., float] | None = None) -> None:
        # ``estimate`` is called with a task's arguments (the user's form);
        # the simulator's default (use_estimate) is called with the task.
        self._user = estimate
        self._default: Callable[[Any], float] | None = None
        self._heap: list[tuple[float, int, Task]] = []
        self._seq = itertools.count()

    def use_estimate(self, estimate: Callable[[Any], float]) -> None:
        self._default = estimate

    def _key(self, task: Task) -> float:
        if self._user is not None:
            value = self._user(*task.args, **(task.kwargs or {}))
        elif self._default is not None:
            value = self._default(task)
        else:
            raise ValueError(
                f"policy {self.name!r} orders tasks by their estimated duration and has no estimate: "
                f"pass one, e.g. {type(self).__name__}(estimate=lambda x: cost(x)) (called with a "
                "task's arguments); on the simulator the duration model is used by default")
        try:
            return self.sign * float(value)
        except (TypeError, ValueError):
            raise ValueError(f"policy {self.name!r}: the estimate of task {task.index} is {value!r}, "
                             "not a number of seconds") from None

    def push(self, tasks: Iterable[Task]) -> None:
        heap, seq = self._heap, self._seq
        for t in tasks:
            heapq.heappush(heap, (self._key(t), next(seq), t))

    def push_front(self, tasks: Iterable[Task]) -> None:
        # A task coming back keeps its place in the length order.
        self.push(tasks)

    def pop(self, worker: object, n: int) -> list[Task]:
        heap = self._heap
        out: list[Task] = []
        while heap and len(out) < n:
            t = heapq.heappop(heap)[2]
            if t.state not in FINAL_STATES:
                out.append(t)
        return out

    def __len__(self) -> int:
        return len(self._heap)


class LongestFirst(_ByLength):
    """Longest estimated task first (LPT): within 4/3 of the optimal
    makespan on identical hosts (Graham, 1969)."""

    name = "longest-first"
    sign = -1.0


class ShortestFirst(_ByLength):
    """Shortest estimated task first (SPT): the least mean waiting time."""

    name = "shortest-first"
    sign = 1.0


class FunctionPolicy(FIFO):
    """A PyMW-style ``scheduler_func(tasks, workers) -> (task, worker)``.

    The function sees the pending tasks (in submission order) and the free
    worker asking (a one-element list); it returns the task to run there, a
    ``(task, worker)`` pair, or None to give that worker nothing now.  It is
    called once per task handed out, so it suits studies, not 100,000-task
    jobs.
    """

    name = "function"
    gulp_safe = False

    def __init__(self, fn: Callable[[list, list], Any]) -> None:
        super().__init__()
        self.fn = fn
        self.name = getattr(fn, "__name__", "function")

    def pop(self, worker: object, n: int) -> list[Task]:
        q = self._q
        out: list[Task] = []
        while q and len(out) < n:
            live = [t for t in q if t.state not in FINAL_STATES]
            if len(live) != len(q):
                q.clear()
                q.extend(live)
            if not live:
                break
            choice = self.fn(live, [worker])
            if isinstance(choice, tuple):
                choice = choice[0]
            if choice is None:
                break
            try:
                q.remove(choice)
            except ValueError:
                raise ValueError(f"scheduling function {self.name!r} returned {choice!r}, "
                                 "which is not one of the pending tasks it was given") from None
            out.append(choice)
        return out


_POLICIES: dict[str, Callable[[], Policy]] = {
    # The first three in this order: error messages list names as registered.
    "fifo": FIFO,
    "lifo": LIFO,
    "random": Random,
    "round-robin": RoundRobin,
    "fastest-first": FastestFirst,
    "longest-first": LongestFirst,
    "shortest-first": ShortestFirst,
}


def policy_names() -> list[str]:
    return list(_POLICIES)


def register_policy(name: str, factory: Callable[[], Policy]) -> None:
    """Make a policy selectable by name (``Master(policy=name)``, ``--policy``)."""
    _POLICIES[name] = factory


def _positional_arity(fn: Callable) -> int | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               and p.default is p.empty)


def make_policy(spec: str | Policy | Callable[..., Any]) -> Policy:
    """A policy instance from a name, an instance, a Policy class or
    zero-argument factory, or a PyMW ``scheduler_func(tasks, workers)``."""
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        try:
            return _POLICIES[spec]()
        except KeyError:
            raise ValueError(f"unknown policy {spec!r}; valid policies: {', '.join(policy_names())}") from None
    if isinstance(spec, type) and issubclass(spec, Policy):
        return spec()
    if callable(spec):
        if _positional_arity(spec) == 2:
            return FunctionPolicy(spec)
        made = spec()
        if isinstance(made, Policy):
            return made
        raise TypeError(f"policy factory {spec!r} returned {made!r}, not a Policy")
    raise TypeError(f"policy must be a name ({', '.join(policy_names())}), a Policy, or a "
                    f"scheduler_func(tasks, workers), not {spec!r}")


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
        mean = fn.mean
        if mean is None or 2 * mean > self.target:
            return 1  # one call already fills the target (the common case: no arithmetic)
        n = int(self.target / max(mean, 1e-7))
        fair = math.ceil(queued / max(1, workers))
        return max(1, min(n, self.cap, fair))
