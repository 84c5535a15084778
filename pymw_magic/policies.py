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

and optional hooks, each with a do-nothing default, so a policy that
ignores them (or an old one written against the four methods, even one that
does not subclass :class:`Policy`: :func:`make_policy` adapts it) still works:

    attach(workers)        the number of workers, told by the scheduler (and
                           by the simulator) before any task arrives; it
                           resets the policy's per-worker state, so one
                           instance can serve one master after another
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
    missing_estimate()     None, or why the policy cannot run: a length
                           ordering with neither an estimate of its own nor
                           one given by ``use_estimate``.  A master asks it
                           once its backend is built (the simulator gives its
                           model; the real backends give none) and refuses
                           the policy with that reason
    idle_workers(workers)  told just before ``pop``: the workers free right
                           now (``wants_idle_workers`` policies only).  The
                           simulator passes its free hosts (``name``,
                           ``index``, ``speed``); a real pool the names of
                           the workers waiting for work
    reserved_workers()     names of workers the policy has set tasks aside
                           for (a PyMW function chose them): a scheduler
                           wakes them so they come and pop them

``push`` (and so ``push_front``) may refuse single tasks: it then queues
nothing and raises :class:`PolicyTaskError`, whose ``failures`` lists each
refused task with its error (an estimate that raises, or is not a number)
and ``accepted`` the others.  The scheduler fails the refused tasks and
pushes the accepted ones again; nothing else is lost.

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

A user policy is a :class:`Policy` subclass, a plain class with the four
methods, a factory returning either, or a PyMW-style function
``scheduler_func(tasks, workers) -> (task, worker)`` (``tasks`` the pending
tasks, ``workers`` the free ones; the task goes to the worker returned; a
task alone means the worker asking, None "nothing for now").

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


class PolicyTaskError(ValueError):
    """A policy's ``push`` refused some tasks, and queued none of the tasks
    it was given (a push is all or nothing).

    ``failures`` is a list of ``(task, exception)``, ``task`` the first
    refused task, ``accepted`` the tasks it would have queued: a scheduler
    fails each refused task with its exception and pushes ``accepted``
    again.
    """

    def __init__(self, failures: list[tuple[Any, BaseException]], accepted: list[Any] | None = None):
        self.failures = list(failures)
        self.accepted = list(accepted or [])
        self.task = self.failures[0][0]
        first = str(self.failures[0][1])
        more = len(self.failures) - 1
        super().__init__(first + (f" (and {more} more task(s) refused)" if more else ""))


def _worker_name(worker: object) -> str:
    return str(getattr(worker, "name", worker))


class Policy:
    """Base class; see the module docstring for the contract."""

    name = "base"
    #: whether the scheduler should call :meth:`idle_workers` before ``pop``
    wants_idle_workers = False

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

    def missing_estimate(self) -> str | None:
        """Why this policy cannot order tasks (no estimate), or None."""
        return None

    def idle_workers(self, workers: Iterable[Any]) -> None:
        """The workers free right now, told before ``pop`` (see the module docstring)."""

    def reserved_workers(self) -> list[str]:
        """Names of workers with tasks set aside for them (see the module docstring)."""
        return []

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
            # (popped by C iterators: a batch may be thousands of tasks)
            got = list(itertools.islice(iter(q.popleft, None), min(n - len(out), len(q))))
            out += [t for t in got if t.state not in FINAL_STATES]
        return out

    def __len__(self) -> int:
        return len(self._q)

    def pop_live(self, n: int) -> list[Task]:
        """The next ``n`` tasks (or fewer), unchecked: for a caller that
        knows no queued task has ended (the scheduler, while no task was
        cancelled or failed in the queue), so that a batch of thousands is
        popped without a look at each."""
        q = self._q
        return list(itertools.islice(iter(q.popleft, None), min(n, len(q))))


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
        self._fixed = workers          # a slot count the user chose (else: the master's workers)
        self._workers = workers
        self._slots: list[deque[Task]] = []
        self._owner: dict[str, int] = {}
        self._last_ask: list[int] = []
        self._clock = itertools.count()
        self._next = 0
        self._len = 0

    def attach(self, workers: int) -> None:
        """A new master (or simulation): one slot per worker (unless a count
        was given at construction), no owners yet, dealing from slot 0.
        Tasks still queued, if any, are dealt again in their order."""
        queued = [t for q in self._slots for t in q if t.state not in FINAL_STATES]
        self._workers = self._fixed if self._fixed is not None else workers
        self._slots = []
        self._owner = {}
        self._last_ask = []
        self._next = 0
        self._len = 0
        if queued:
            self.push(sorted(queued, key=lambda t: t.index))

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

    def attach(self, workers: int) -> None:
        # A default estimate belongs to the backend that gave it (a
        # simulator's model): a new master gives its own, or none.
        self._default = None

    def missing_estimate(self) -> str | None:
        if self._user is not None or self._default is not None:
            return None
        return (f"policy {self.name!r} orders tasks by their estimated duration and has no estimate: "
                f"pass one, e.g. {type(self).__name__}(estimate=lambda x: cost(x)) (called with a "
                "task's arguments); on the simulator the duration model is used by default")

    def _key(self, task: Task) -> float:
        """The heap key of ``task``; ValueError (naming the task) when there is none."""
        if self._user is None and self._default is None:
            raise ValueError(self.missing_estimate())
        try:
            if self._user is not None:
                value = self._user(*task.args, **(task.kwargs or {}))
            else:
                value = self._default(task)  # type: ignore[misc]
        except Exception as exc:
            raise ValueError(f"policy {self.name!r}: the estimate of task {task.index} "
                             f"({_describe(task)}) raised {type(exc).__name__}: {exc}") from exc
        try:
            key = self.sign * float(value)
        except (TypeError, ValueError):
            key = math.nan
        if key != key:
            raise ValueError(f"policy {self.name!r}: the estimate of task {task.index} "
                             f"({_describe(task)}) is {value!r}, not a number of seconds")
        return key

    def push(self, tasks: Iterable[Task]) -> None:
        """Queue ``tasks`` by their estimate.  All or nothing: if the
        estimate of any task raises or is not a number, nothing is queued
        and :class:`PolicyTaskError` names each such task (its ``accepted``
        are the others, to push again)."""
        keyed: list[tuple[float, Task]] = []
        refused: list[tuple[Task, BaseException]] = []
        for t in tasks:
            try:
                keyed.append((self._key(t), t))
            except ValueError as exc:
                refused.append((t, exc))
        if refused:
            raise PolicyTaskError(refused, [t for _, t in keyed])
        heap, seq = self._heap, self._seq
        for key, t in keyed:
            heapq.heappush(heap, (key, next(seq), t))

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


def _describe(task: Any) -> str:
    describe = getattr(task, "describe_input", None)
    try:
        return describe() if describe is not None else ", ".join(map(repr, task.args))
    except Exception:
        return "?"


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
    workers, and returns a task and the worker to run it on (a task alone:
    the worker asking; None: nothing for now).  As in PyMW, the task goes
    to the worker returned:

    * to the one asking: it is handed out now;
    * to another free worker: it is set aside (*reserved*) for that worker,
      which gets it when it asks next, and the function is asked again for
      the asking worker (without the workers that got a task), until it
      gives the asker a task, returns None, or no free worker is left.

    Which workers are free comes from :meth:`idle_workers`, told before each
    ``pop``: the simulator tells its free hosts (with ``name``, ``index``
    and ``speed``); a real pool's scheduler the names of its waiting workers
    (and it wakes :meth:`reserved_workers`).  Not told, the asking worker is
    the only free one.  A reservation whose worker is no longer free when
    the policy is next told (a host that went down) goes back to the front
    of the queue.  The returned worker must be one of those given (or its
    name).  The function is called once per task handed out, so it suits
    studies, not 100,000-task jobs.
    """

    name = "function"
    gulp_safe = False
    wants_idle_workers = True

    def __init__(self, fn: Callable[[list, list], Any]) -> None:
        super().__init__()
        self.fn = fn
        self.name = getattr(fn, "__name__", "function")
        self._reserved: dict[str, deque[Task]] = {}
        self._free: list[Any] | None = None

    def attach(self, workers: int) -> None:
        self._unreserve(list(self._reserved))
        self._free = None

    def idle_workers(self, workers: Iterable[Any]) -> None:
        self._free = list(workers)
        names = {_worker_name(w) for w in self._free}
        self._unreserve([n for n in self._reserved if n not in names])

    def reserved_workers(self) -> list[str]:
        return [name for name, q in self._reserved.items() if q]

    def _unreserve(self, names: list[str]) -> None:
        back: list[Task] = []
        for name in names:
            back += self._reserved.pop(name, ())
        if back:
            self.push_front(sorted(back, key=lambda t: t.index))

    def __len__(self) -> int:
        return len(self._q) + sum(len(q) for q in self._reserved.values())

    def pop(self, worker: object, n: int) -> list[Task]:
        asker = _worker_name(worker)
        told, self._free = self._free, None
        free = list(told) if told is not None else [worker]
        if asker not in {_worker_name(w) for w in free}:
            free.insert(0, worker)
        out: list[Task] = []
        mine = self._reserved.get(asker)
        while mine and len(out) < n:
            task = mine.popleft()
            if task.state not in FINAL_STATES:
                out.append(task)
        if not mine:
            self._reserved.pop(asker, None)
        # free workers that have no reservation waiting (the asker stays)
        free = [w for w in free if _worker_name(w) == asker or not self._reserved.get(_worker_name(w))]
        q = self._q
        while q and len(out) < n:
            live = [t for t in q if t.state not in FINAL_STATES]
            if len(live) != len(q):
                q.clear()
                q.extend(live)
            if not live or not free:
                break
            choice = self.fn(live, list(free))
            target: Any = worker
            if isinstance(choice, tuple):
                choice, target = (choice[0] if choice else None), (choice[1] if len(choice) > 1 else None)
                if target is None:
                    target = worker
            if choice is None:
                break
            name = _worker_name(target)
            slot = next((i for i, w in enumerate(free) if _worker_name(w) == name), None)
            if slot is None:
                raise ValueError(f"scheduling function {self.name!r} returned worker {target!r}, which is "
                                 f"not one of the free workers it was given "
                                 f"({', '.join(_worker_name(w) for w in free)})")
            try:
                q.remove(choice)
            except ValueError:
                raise ValueError(f"scheduling function {self.name!r} returned {choice!r}, "
                                 "which is not one of the pending tasks it was given") from None
            if name == asker:
                out.append(choice)
            else:
                self._reserved.setdefault(name, deque()).append(choice)
                del free[slot]
        return out


class _Adapted(Policy):
    """A plain policy object (``push``, ``push_front``, ``pop``, ``__len__``,
    no :class:`Policy` base) with the optional hooks it lacks: calls go to
    the object itself, which stays the one deployed (``.inner``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = str(getattr(inner, "name", None) or type(inner).__name__)
        for hook in ("host_key", "gulp_safe", "wants_idle_workers"):
            if hasattr(inner, hook):
                setattr(self, hook, getattr(inner, hook))

    def push(self, tasks: Iterable[Task]) -> None:
        self.inner.push(tasks)

    def push_front(self, tasks: Iterable[Task]) -> None:
        self.inner.push_front(tasks)

    def pop(self, worker: object, n: int) -> list[Task]:
        return list(self.inner.pop(worker, n))

    def __len__(self) -> int:
        return len(self.inner)

    def _hook(self, name: str, *args: Any) -> Any:
        fn = getattr(self.inner, name, None)
        return fn(*args) if callable(fn) else None

    def attach(self, workers: int) -> None:
        self._hook("attach", workers)

    def use_estimate(self, estimate: Callable[[Any], float]) -> None:
        self._hook("use_estimate", estimate)

    def missing_estimate(self) -> str | None:
        return self._hook("missing_estimate")

    def idle_workers(self, workers: Iterable[Any]) -> None:
        self._hook("idle_workers", workers)

    def reserved_workers(self) -> list[str]:
        return list(self._hook("reserved_workers") or [])

    def seed(self, seed: Any) -> None:
        self._hook("seed", seed)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


_QUEUE_METHODS = ("push", "push_front", "pop", "__len__")


def is_policy_like(obj: Any) -> bool:
    """A Policy, or an object (not a class) with the four queue methods."""
    if isinstance(obj, Policy):
        return True
    return not isinstance(obj, type) and all(callable(getattr(obj, m, None)) for m in _QUEUE_METHODS)


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


def _as_policy(obj: Any) -> Policy:
    return obj if isinstance(obj, Policy) else _Adapted(obj)


def make_policy(spec: str | Policy | Callable[..., Any]) -> Policy:
    """A policy instance from a name, an instance, a class (a Policy
    subclass or a plain class with ``push``, ``push_front``, ``pop`` and
    ``__len__``) or zero-argument factory, or a PyMW
    ``scheduler_func(tasks, workers)``.

    An *instance* is not copied: ``Master(policy=p)`` queues its tasks in
    ``p`` itself (a plain object is wrapped, the calls still reach it).
    Its ``attach`` resets its per-worker state when a master takes it, so
    one instance can serve one master after another (e.g. the simulator,
    then ``local``) — but not two live masters at once.
    :func:`pymw_magic.simulate` deep-copies an instance, and a name,
    class or factory makes a fresh one each time.
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        try:
            return _POLICIES[spec]()
        except KeyError:
            raise ValueError(f"unknown policy {spec!r}; valid policies: {', '.join(policy_names())}") from None
    if is_policy_like(spec):
        return _as_policy(spec)
    if isinstance(spec, type):
        if issubclass(spec, Policy):
            return spec()
        if all(callable(getattr(spec, m, None)) for m in _QUEUE_METHODS):
            return _as_policy(spec())
    if callable(spec):
        if _positional_arity(spec) == 2:
            return FunctionPolicy(spec)
        made = spec()
        if is_policy_like(made):
            return _as_policy(made)
        raise TypeError(f"policy factory {spec!r} returned {made!r}, not a Policy (nor an object with "
                        "push, push_front, pop and __len__)")
    raise TypeError(f"policy must be a name ({', '.join(policy_names())}), a Policy, an object with push, "
                    f"push_front, pop and __len__, or a scheduler_func(tasks, workers), not {spec!r}")


# --- names from the notebook ------------------------------------------------------------
#
# ``%pymw use simulator --duration model --policy lpt``: the magics hand
# options over as text; a name that is not one of an option's own words is
# looked up in the notebook's namespace.  ``resolve_name`` does that for the
# converters (the simulator's ``duration``, :func:`policy_option`); the
# default resolver reads the running IPython shell's ``user_ns``, and
# :func:`set_name_resolver` installs another (e.g. one bound to a given
# shell, or a dict for scripts).

_NOT_FOUND = object()
_resolver: Callable[[str], Any] | None = None


def set_name_resolver(resolver: Callable[[str], Any] | dict | None) -> None:
    """How option converters turn a notebook name into its object:
    ``resolver(name)`` returns it or raises KeyError (a dict works too);
    None restores the default (the running IPython shell's namespace)."""
    global _resolver
    _resolver = resolver.__getitem__ if isinstance(resolver, dict) else resolver


def resolve_name(text: str) -> Any:
    """The object the notebook calls ``text`` (a name or dotted name), or
    KeyError when there is none."""
    name = text.strip()
    head, *rest = name.split(".")
    if not head.isidentifier() or not all(p.isidentifier() for p in rest):
        raise KeyError(text)
    if _resolver is not None:
        obj = _resolver(head)
    else:
        import sys
        ipython = sys.modules.get("IPython")
        shell = ipython.get_ipython() if ipython is not None else None
        ns = getattr(shell, "user_ns", None)
        if ns is None or head not in ns:
            raise KeyError(text)
        obj = ns[head]
    for part in rest:
        obj = getattr(obj, part, _NOT_FOUND)
        if obj is _NOT_FOUND:
            raise KeyError(text)
    return obj


def policy_option(value: Any) -> Any:
    """The ``policy`` option's converter: a registered name stays a name;
    any other text is a notebook name resolved (:func:`resolve_name`) to a
    Policy, a policy class or factory, or a ``scheduler_func``; a Python
    object is checked by :func:`make_policy`.  ValueError names what is
    valid."""
    if isinstance(value, str):
        if value in _POLICIES:
            return value
        try:
            obj = resolve_name(value)
        except KeyError:
            raise ValueError(f"unknown policy {value!r}; valid policies: {', '.join(policy_names())}, or "
                             "the name of a Policy, a policy class or a scheduler_func(tasks, workers) "
                             "in the notebook") from None
        value = obj
    try:
        make_policy(value)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return value


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
