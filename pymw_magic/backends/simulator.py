"""The ``simulator`` backend: a pool backend on a virtual clock.

::

    Master.map_async ──▶ Job ──▶ Scheduler (policy queue, task states, retries)
                                   ▲  take(host, block=False) │ Batch
          completed(batch, virtual │                          ▼
          start, ends, values) /   │          SchedulerSource (this module)
          lost([batch], culprit)   │                          │ (tasks, work at speed 1)
                                   └────────── Engine (simulation/engine.py):
                                               modelled hosts, virtual time,
                                               failures, availability, network
    one thread ("pymw-simulator") runs the engine whenever the queue has work

    the lane (_Lane), for a map job on a platform of speeds in FIFO order:
    Job ──feed──▶ queue ──▶ _Lane: list scheduling over the job's own Tasks
                  (the lane pops them)   │ what each host ran, back to back
                                         ▼
          one Scheduler.ran(chains) for them all, when the input must move
          on and at the end

Who does what:

* the **Scheduler**, **Job** and **Task** are the real ones: a simulated
  job goes through the same state machine, retries, events and counts as a
  local one; ``task.worker`` is the host's name and ``task.started`` /
  ``finished`` / ``submitted`` are virtual seconds, so ``job.result()``,
  ``job.counts()``, progress bars, the timeline and ``job.report()`` work
  unchanged;
* the **Engine** (shared with :func:`pymw_magic.simulate`) owns virtual time
  and the platform model; this backend's :class:`SchedulerSource` adapts it
  to the Scheduler (take / completed / lost / reject);
* the **Policy** is the master's own object: the one you then deploy with
  ``Master("local", policy=...)``;
* the **lane** (:class:`_Lane`) runs, instead of the engine's general loop,
  a map job on a platform of nothing but speeds in FIFO or FastestFirst
  order with a host-independent duration, no timeout and batches of one —
  the case ``simulate()``'s fast path runs — where the scheduler's rules
  reduce to list scheduling; it reports what each host ran as one batch
  per host, so the job, its events and its trace are the general loop's
  (the tests compare them task by task), and hands over to the general
  loop at the very event where that stops being so (chunking would start
  batching, a cancel, a model error, input not readable yet).

Nothing real runs except what tells a task's length: the ``duration`` model
(a function of the task's arguments, optionally of the ``host``), a
constant, PyMW's convention (the task function itself returns its length —
the default), or ``"measure"`` (the task runs once here, timed).  A task's
result is what its function returned when the simulator called it ("pymw",
"measure"); with a separate duration model it is the task's simulated run
time on its host.  A task's ``timeout`` (the master's, or a job's) counts
virtual seconds on its host: a task that runs longer is stopped at its
deadline and fails with :class:`~pymw_magic.errors.TaskTimeout`, its host
free from then on, as a real backend stops it.

No progress: when hosts never stay up long enough for any task to finish
(every attempt cut by availability or churn, many times in a row), the
simulator fails the tasks it holds with a :class:`SimulationError` saying
so, rather than simulate for ever.

When work arrives, on the virtual clock (deterministic: it never depends
on how fast the calling code runs).  Each *submission* — a ``map_async`` /
``starmap_async`` / ``map`` job, a ``%%pymw`` cell, or one ``submit()``
call — arrives when the simulator is idle, at the virtual time the last
work ended (0 for the first); the virtual clock only moves while there is
work.  A submission made while earlier ones are unfinished waits for them,
in submission order, exactly as if the simulation had been instant (which
it nearly is): so six ``submit()`` calls of 1 s tasks on 2 hosts arrive at
0, 1, 2, ... and take 6 s, with or without a pause between them, while one
``map_async`` over the six arrives at once and takes 3 s.  Submit together
what should arrive together.  ``task.submitted`` is the arrival; waiting
times and a job's makespan count from it.  With a master whose scheduler
keeps a ``clock`` (``Scheduler.clock``), the backend sets it to this virtual
clock, so events, ``job.created`` / ``finished_at`` and ``job.elapsed`` are
virtual seconds too.

A bad duration model (or a task function that raises, PyMW's convention)
fails that task alone with a :class:`ModelError` naming its input; the
simulation goes on.  Should the simulator thread itself fail, everything
in flight or queued — input not yet read included — fails with that error
and the backend goes on serving later jobs.

Options (flat keywords; the magics take the string forms of
:mod:`pymw_magic.simulation.models`): ``speeds``, ``availability``,
``churn``, ``failure_rate``, ``latency``, ``bandwidth``, ``overhead``,
``duration``, ``seed``.  The defaults are the ideal platform.  In a magic,
``--duration NAME`` is a function of the notebook's namespace (see
:func:`pymw_magic.policies.resolve_name`).
"""

from __future__ import annotations

import heapq
import math
import threading
import warnings
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .. import rules
from ..policies import FIFO, FastestFirst, PolicyTaskError, resolve_name
from ..simulation.engine import (OUTAGE, TIMEOUT, Engine, SimulationError, estimate_weight, seed_policy,
                                 window_keeps_up)
from ..simulation.models import (AVAILABILITY_FORMS, DISTRIBUTION_FORMS, DurationModel, ModelError,
                                 build_platform, check_churn, check_duration, check_speeds,
                                 parse_distribution, payload_size, value_size)
from ..scheduler import SchedulerHooks
from ..task import FAILED, PENDING, RUNNING
from .base import Backend, Option, join_threads

if TYPE_CHECKING:
    from ..job import Job
    from ..scheduler import Batch, Scheduler
    from ..task import Task


def _valid(check: Callable[[Any], Any]) -> Callable[[Any], bool]:
    def ok(value: Any) -> bool:
        try:
            check(value)
            return True
        except (ModelError, TypeError, ValueError):
            return False
    return ok


def _availability_form(value: str) -> str:
    """The string forms; a trace's *contents* are checked when the hosts
    are built, so its errors keep their detail (line numbers)."""
    import os
    text = value.strip()
    kind, colon, _ = text.partition(":")
    if text.lower() in ("always", "always-on", "on"):
        return "always"
    if colon and kind.lower() in ("onoff", "periodic"):
        from ..simulation.models import check_availability
        return check_availability(text)
    if os.path.exists(text):
        return text
    raise ValueError(text)


def _seconds(value: Any) -> float:
    x = float(value)
    if x < 0 or math.isnan(x) or math.isinf(x):
        raise ValueError(value)
    return x


def _per_host(what: str, allow_zero: bool) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        # "inf" is no limit for a bandwidth; an infinite latency is no value.
        if isinstance(value, str) and value.strip().lower() in (("none",) if allow_zero else ("none", "inf")):
            return None
        spec = parse_distribution(value, what)
        values = spec if isinstance(spec, list) else [spec] if isinstance(spec, float) else []
        if any(v < 0 or (v == 0 and not allow_zero) or math.isnan(v) or math.isinf(v) for v in values):
            raise ValueError(value)
        if isinstance(spec, str):
            _check_parameters(what, spec, allow_zero)
        return spec
    return convert


def _check_parameters(what: str, spec: str, allow_zero: bool) -> None:
    """A distribution's parameters checked when the option is read, not
    when hosts are drawn (where the error would name one random draw)."""
    kind, _, rest = spec.partition(":")
    a, b = (float(p) for p in rest.split(","))
    low = ">= 0" if allow_zero else "> 0"
    if kind.strip().lower() == "uniform":
        if not ((a >= 0 if allow_zero else a > 0) and a <= b < math.inf):
            raise ModelError(f"{what}: {spec!r} — uniform:LOW,HIGH needs LOW {low}, LOW <= HIGH, finite")
    elif not ((a >= 0 if allow_zero else a > 0) and a < math.inf and 0 <= b < math.inf):
        raise ModelError(f"{what}: {spec!r} — lognormal:MEDIAN,SIGMA needs MEDIAN {low} and SIGMA >= 0, finite")


def _latency(value: Any) -> Any:
    return _per_host("latency", True)(value)


def _bandwidth(value: Any) -> Any:
    return _per_host("bandwidth", False)(value)


def _probability(value: Any) -> float:
    x = float(value)
    if not 0.0 <= x < 1.0:
        raise ValueError(value)
    return x


def _duration(value: Any) -> Any:
    """``duration``'s converter: its own forms, or (text from a magic) the
    name of a function in the notebook."""
    try:
        return check_duration(value)
    except ModelError:
        if not isinstance(value, str):
            raise
        try:
            obj = resolve_name(value)
        except KeyError:
            text = value.strip()
            try:
                seconds = float(text)
            except ValueError:
                seconds = None
            if seconds is not None:  # a number, just not a usable one
                raise ModelError(f"duration: {text} is not a number of seconds >= 0 (finite)") from None
            if all(part.isidentifier() for part in text.split(".")):
                raise ModelError(f"duration: no function {text!r} is defined in the notebook (yet): define "
                                 f"duration(*args, host=...) before this line, or give measure, pymw or "
                                 "a number of seconds") from None
            raise ModelError(f"duration: {value!r} is not measure, pymw, a number of seconds, or the name of a "
                             "function duration(*args, host=...) in the notebook") from None
        if not callable(obj):
            raise ModelError(f"duration: {value!r} names {obj!r}, which is not a function") from None
        return obj


def _seed(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(value)


SIMULATOR_OPTIONS: dict[str, Option] = {
    "speeds": Option("speeds", check_speeds, 1.0, "host speeds (work seconds per second)",
                     check=_valid(check_speeds), requirement=DISTRIBUTION_FORMS + ", every speed > 0"),
    "availability": Option("availability", _availability_form, "always", "when hosts are up",
                           check=_valid(lambda v: v is None or not isinstance(v, str) or _availability_form(v)),
                           requirement=AVAILABILITY_FORMS),
    "churn": Option("churn", check_churn, None, "mean host lifetime (s): then a fresh host of the same speed "
                    "replaces it; none: hosts stay", check=_valid(check_churn),
                    requirement="a number of seconds > 0, or none"),
    "failure_rate": Option("failure_rate", _probability, 0.0, "probability that a task attempt fails",
                           check=_valid(_probability), requirement="a probability in [0, 1)"),
    "latency": Option("latency", _latency, 0.0, "seconds per message, per host",
                      check=_valid(_latency), requirement=DISTRIBUTION_FORMS + ", every value >= 0"),
    "bandwidth": Option("bandwidth", _bandwidth, None, "bytes/s per host (default: free transfers)",
                        check=_valid(lambda v: v is None or _bandwidth(v)),
                        requirement=DISTRIBUTION_FORMS + ", every value > 0, or none"),
    "overhead": Option("overhead", _seconds, 0.0, "master seconds per dispatch (see calibrate_overhead)",
                       check=_valid(_seconds), requirement="a number of seconds >= 0"),
    "duration": Option("duration", _duration, None,
                       "task length: measure | pymw (the function returns it) | SECONDS | a function",
                       check=_valid(_duration), requirement="measure, pymw, a number of seconds >= 0, "
                       "or a function duration(*args, host=...) -> seconds at speed 1 (in a magic: the name of "
                       "a notebook function)"),
    "seed": Option("seed", _seed, 0, "seed of every random draw (same seed, same trace)",
                   check=_valid(_seed), requirement="a whole number"),
}


def _submission(task: Task) -> tuple[str, int]:
    """What arrives together: a job fed from an input (map, starmap, a
    cell), or one submit() call (a job of submits has no input)."""
    job = task.job
    if job is None or job._source is None:
        return ("task", task.id)
    return ("job", job.id)


class _Admission:
    """The master's policy behind the simulator's arrival rule (see the
    module docstring): a submission reaches the policy — and so the hosts —
    when every earlier submission has finished; it then arrives at the
    virtual time the last work ended.  Everything else goes straight to the
    policy, which stays the master's own object (``inner``)."""

    def __init__(self, inner: Any, source: SchedulerSource):
        self.inner = inner
        self.source = source
        self.name = getattr(inner, "name", "?")
        self.host_key = getattr(inner, "host_key", None)
        self._jobs: set[int] = set()                         # admitted jobs (later refills pass)
        self._open: list[Any] = []                           # admitted submissions not finished
        self._held: OrderedDict[tuple, list[Task]] = OrderedDict()
        self.live: dict[int, Job] = {}                       # unfinished jobs seen (give_up sweeps them)
        #: while giving up: the held submissions to admit at once (and fail);
        #: those made since wait until it is over
        self.flush: set[tuple] | None = None
        self.refused: list[tuple[Task, BaseException]] = []  # the policy refused them: to fail
        #: (host name, tasks): what the next pop for that host returns (the lane's reports)
        self.handing: tuple[str, list[Task]] | None = None

    # --- the policy contract ------------------------------------------------------------
    def push(self, tasks: Iterable[Task]) -> None:
        """Called under the scheduler's lock: admitted jobs' tasks go on to
        the policy; a new submission waits its turn (at once if idle)."""
        tasks = list(tasks)
        job = tasks[0].job if tasks else None
        if job is not None and job.id in self._jobs and job._source is not None \
                and all(t.job is job for t in tasks):
            now = tasks   # the common case: more of an admitted job's input
            tasks = []
        else:
            now = []
        for t in tasks:
            key = _submission(t)
            if key[0] == "job" and key[1] in self._jobs:
                now.append(t)
            else:
                self._held.setdefault(key, []).append(t)
                if t.job is not None:
                    self.live.setdefault(t.job.id, t.job)
        if now:
            arrival = self.source.arrivals.get(now[0].job.id)   # type: ignore[union-attr]
            if arrival is not None:
                for t in now:
                    t.submitted = arrival
            self._push(now)
        self.advance()

    def push_front(self, tasks: Iterable[Task]) -> None:
        self.inner.push_front(tasks)   # only admitted tasks ever come back

    def pop(self, worker: object, n: int) -> list[Task]:
        handing = self.handing
        if handing is not None:
            # The lane reports tasks it simulated: the scheduler's take for
            # that host gets exactly them (a chunk asked on top: nothing).
            name, tasks = handing
            if worker != name or not tasks:
                return []
            self.handing = (name, [])
            return tasks
        return self.inner.pop(worker, n)

    def __len__(self) -> int:
        return len(self.inner)

    def idle_workers(self, workers: Iterable[Any]) -> None:
        """Ignored: the simulator tells the policy its free hosts itself."""

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # --- admission --------------------------------------------------------------------------
    def _push(self, tasks: list[Task]) -> None:
        """Into the policy; tasks it refuses wait in ``refused`` for the
        simulator thread to fail them (this runs under the scheduler's lock,
        often in the submitting thread, so it never raises)."""
        try:
            self.inner.push(tasks)
        except PolicyTaskError as exc:
            self.refused += exc.failures
            if exc.accepted:
                self._push(exc.accepted)

    @staticmethod
    def _finished(entry: Any) -> bool:
        return entry.done() if hasattr(entry, "done") else entry.state.final

    def take_refused(self) -> list[tuple[Task, BaseException]]:
        """Under the scheduler's lock: the tasks the policy refused, to fail."""
        refused, self.refused = self.refused, []
        return refused

    def advance(self) -> None:
        """Under the scheduler's lock: drop finished submissions and admit
        held ones while nothing admitted is unfinished (while giving up:
        those submitted before, at once)."""
        if self._open:
            self._open = [e for e in self._open if not self._finished(e)]
        for job_id in [j for j, job in self.live.items() if job.done()]:
            del self.live[job_id]
            self._jobs.discard(job_id)
        while self._held:
            if self.flush is not None:
                key = next((k for k in self._held if k in self.flush), None)
                if key is None:
                    break
                tasks = self._held.pop(key)
            elif not self._open:
                key, tasks = self._held.popitem(last=False)
            else:
                break
            arrival = self.source.now
            self.source.stamp += 1
            if key[0] == "job":
                job = tasks[0].job
                self._jobs.add(key[1])
                self._open.append(job)
                self.source.arrivals[key[1]] = arrival
                if self.source.virtual_jobs:
                    job.created = arrival   # type: ignore[union-attr]
            else:
                self._open.append(tasks[0])
            for t in tasks:
                t.submitted = arrival
            self._push(tasks)


class SchedulerSource:
    """The engine's Source over the real Scheduler (see the module docstring)."""

    def __init__(self, backend: SimulatorBackend):
        self.backend = backend
        self.sched: Scheduler = backend.scheduler
        self.hosts = backend.platform.hosts
        self.names = [h.name for h in self.hosts]
        self.stamp = 0
        self.policy = self.sched.policy                 # the master's own policy object
        self.policy_name = getattr(self.policy, "name", "?")
        self.wants_idle = bool(getattr(self.policy, "wants_idle_workers", False))
        self.spec = backend.duration
        self._models: dict[int, DurationModel] = {}
        self._cache: dict[int, tuple[float, Any]] = {}   # task id -> (work, value), host-independent models
        self._bad: dict[int, ModelError] = {}            # task id -> its model's error (seen by an estimate)
        self._fn_sent: set[tuple[int, int]] = set()
        #: the virtual clock: the time of the event being simulated, or of
        #: the last one while idle (when new work arrives)
        self.now = 0.0
        self.arrivals: dict[int, float] = {}
        self.last_return: dict[int, float] = {}
        self.notes: dict[int, str] = {}
        #: job id -> its tasks that failed for good on a failed attempt (the report counts them)
        self.final_failures: dict[int, int] = {}
        #: the engine asks ``timeouts`` of each batch (a job may set one)
        self.timed = True
        self.virtual_jobs = False    # set when the scheduler keeps a clock (job times are then virtual)
        self.gate = _Admission(self.policy, self)

    def clock(self) -> float:
        """The virtual clock (``Scheduler.clock``)."""
        return self.now

    # --- durations --------------------------------------------------------------------
    def _model(self, task: Task) -> DurationModel:
        return self.model_of(task.fn)

    def model_of(self, fp: Any) -> DurationModel:
        """The duration model of the tasks of function payload ``fp``."""
        model = self._models.get(fp.id)
        if model is None:
            fn = None
            if self.spec is None or self.spec in ("pymw", "measure"):
                import cloudpickle
                fn = cloudpickle.loads(fp.data)
            model = self._models[fp.id] = DurationModel(self.spec, fn)
        return model

    def evaluate(self, task: Task, host: Any) -> tuple[float, Any]:
        bad = self._bad.get(task.id)
        if bad is not None:
            raise bad
        model = self._model(task)
        if model.host_aware:   # a length per host: evaluated at each dispatch, the last one kept
            got = model.evaluate(task.args, task.kwargs, host, task.describe_input)
            if host is not None:
                self._cache[task.id] = got
            return got
        got = self._cache.get(task.id)
        if got is None:
            got = self._cache[task.id] = model.evaluate(task.args, task.kwargs, host, task.describe_input)
        return got

    def estimate(self, task: Task) -> float:
        """The length-ordering policies' default estimate: the model's work.
        Never raises: a model that fails on this task marks it, and the task
        fails with that error when it is handed out (at once, for it then
        sorts first or last)."""
        try:
            return self.evaluate(task, None)[0]
        except ModelError as exc:
            self._bad[task.id] = exc
            return 0.0

    # --- Source -------------------------------------------------------------------------
    def has_work(self) -> bool:
        return len(self.policy) > 0

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        """A scheduler call; tasks a policy refused on the way (a scheduler
        that lets PolicyTaskError out) fail with their error."""
        try:
            return method(*args)
        except PolicyTaskError as exc:
            self.fail_pending(exc.failures)
            return None

    def fail_pending(self, failures: list[tuple[Task, BaseException]]) -> None:
        """Fail tasks that are pending (not in anyone's hands) with their errors."""
        sched = self.sched
        out = []
        with sched.cond:
            for task, exc in failures:
                if task.state is PENDING:
                    task.to(RUNNING)
                    task.attempts += 1
                    out.append((task, exc))
        if out:
            sched.reject(out)
            self.stamp += 1

    def _advance(self) -> None:
        with self.sched.cond:
            self.gate.advance()
            refused = self.gate.take_refused()
        if refused:
            self.fail_pending(refused)

    def take(self, h: int, t: float) -> tuple[Batch, list, list[float]] | None:
        sched = self.sched
        host = self.hosts[h]
        self.now = t
        while True:
            if self.wants_idle:
                self.policy.idle_workers(self.backend.engine.free_hosts(h))
            batch = self._call(sched.take, self.names[h], False)
            if batch is None:
                return None
            works, bad = [], []
            for task in batch.tasks:
                try:
                    works.append(self.evaluate(task, host)[0])
                except ModelError as exc:
                    bad.append((task, exc))
            if bad:
                self._call(sched.reject, bad)
                self.stamp += 1
                failed = {id(task) for task, _ in bad}
                batch.tasks = [task for task in batch.tasks if id(task) not in failed]
                if not batch.tasks:
                    self._discard(batch)
                    self._advance()
                    continue
                works = [self.evaluate(task, host)[0] for task in batch.tasks]
            return batch, batch.tasks, works

    def sizes(self, batch: Batch, h: int) -> tuple[int, int]:
        inb = 0
        for task in batch.tasks:
            inb += payload_size(task.args, task.kwargs)
            key = (h, task.fn.id)
            if key not in self._fn_sent:
                self._fn_sent.add(key)
                inb += len(task.fn.data)
        outb = 0
        for task in batch.tasks:
            if self._model(task).kind == "measure":
                outb += value_size(self._cache.get(task.id, (0, None))[1])
        return inb, outb

    def _values(self, batch: Batch, start: float, ends: list[float]) -> list[Any]:
        values = []
        prev = start
        for task, e in zip(batch.tasks, ends):
            got = self._cache.pop(task.id, None)
            values.append(got[1] if got is not None and got[1] is not None else e - prev)
            prev = e
        return values

    def keep_value(self, task: Task, work: float, value: Any) -> None:
        """``task``'s (work, value), already evaluated (the lane's, handed over)."""
        self._cache[task.id] = (work, value)

    def note_job_return(self, job: Job, t: float) -> None:
        """A batch of ``job`` came back at virtual time ``t``."""
        if t > self.last_return.get(job.id, -math.inf):
            self.last_return[job.id] = t

    def _returned(self, batch: Batch, t: float) -> None:
        for task in batch.tasks:
            job = task.job
            if job is not None and t > self.last_return.get(job.id, -math.inf):
                self.last_return[job.id] = t

    def finish(self, batch: Batch, h: int, start: float, ends: list[float], returned: float) -> None:
        values = self._values(batch, start, ends)
        self._returned(batch, returned)
        self.now = returned
        self._call(self.sched.completed, batch, start, ends, values, {}, {})
        self.stamp += 1
        self._advance()

    def timeouts(self, batch: Batch) -> list[float | None] | None:
        """Each task's timeout (its job's), or None when none has one."""
        limits = [t.job.timeout if t.job is not None else None for t in batch.tasks]
        return limits if any(limits) else None

    def fail(self, batch: Batch, h: int, start: float, ends: list[float], culprit: int | None,
             t: float, why: str, cause: int = 0) -> bool:
        """A failure charges the culprit ("died"); a timeout fails it
        ("timeout"); an outage charges nobody ("stopped", as a real pool
        does for a worker it stopped).  Returns whether the culprit failed
        for good."""
        tasks = batch.tasks
        outage = cause == OUTAGE
        culprit_task = tasks[culprit] if culprit is not None and not outage else None
        self._returned(batch, t)
        self.now = t
        if outage:
            self._call(self.sched.lost, [batch], None, "stopped", why)
        else:
            # The simulator knows the culprit: the scheduler's safety net for
            # a real pool, which fails a task found in hand at too many worker
            # deaths (MAX_REQUEUES), must not catch the innocent ones here.
            for task in tasks:
                if task is not culprit_task:
                    task.requeues = 0
            self._call(self.sched.lost, [batch], culprit_task.id if culprit_task is not None else None,
                       "timeout" if cause == TIMEOUT else "died", why)
        final = False
        if culprit_task is not None and culprit_task.state.final:
            # the attempt's virtual times (the scheduler stamped its own clock)
            culprit_task.started = start if culprit == 0 else ends[culprit - 1]
            culprit_task.finished = t
            self._cache.pop(culprit_task.id, None)
            final = culprit_task.state is FAILED
            job = culprit_task.job
            if final and job is not None:
                self.final_failures[job.id] = self.final_failures.get(job.id, 0) + 1
        self.stamp += 1
        self._advance()
        return final

    def give_up(self, why: str) -> None:
        """Fail every task that is queued, held, or still to be read from
        its job's input, with a SimulationError saying ``why``."""
        sched, gate = self.sched, self.gate
        engine = getattr(self.backend, "engine", None)
        if engine is not None and engine.now > self.now:
            self.now = engine.now
        err = SimulationError(why)
        with sched.cond:
            gate.flush = set(gate._held)      # what was submitted before now
            jobs = list(gate.live.values())
        try:
            while True:
                progress = False
                self._advance()
                for name in self.names + ["(none)"]:
                    while True:
                        try:
                            batch = self._call(sched.take, name, False)
                        except Exception:   # a policy that raises: the sweep below fails its tasks
                            batch = None
                        if batch is None:
                            break
                        progress = True
                        for task in batch.tasks:
                            if task.job is not None:
                                self.notes[task.job.id] = why
                        self._call(sched.reject, [(task, err) for task in batch.tasks])
                        self._discard(batch)
                with sched.cond:
                    later = {id(t) for key, ts in gate._held.items() if key not in gate.flush for t in ts}
                    stranded = [t for job in jobs for t in list(job.tasks)
                                if t.state is PENDING and id(t) not in later]
                    for job in jobs:
                        if stranded:
                            self.notes.setdefault(job.id, why)
                if stranded:
                    progress = True
                    self.fail_pending([(t, err) for t in stranded])
                if not progress:
                    break
        finally:
            with sched.cond:
                gate.flush = None
            self._advance()
        self.stamp += 1

    def _discard(self, batch: Batch) -> None:
        """Tell the scheduler a batch it handed out will never be reported."""
        discard = getattr(self.sched, "discard", None)
        if discard is not None:
            discard(batch)


class _Lane:
    """The backend's fast lane: one map job on a platform of nothing but
    speeds, in FIFO order (FIFO or FastestFirst), with a duration that does
    not depend on the host, no timeout and batches of one — the case
    :func:`~pymw_magic.simulation.engine.run_fast` runs for ``simulate()``.

    There the Scheduler's rules reduce to list scheduling (the host free
    earliest, best rank on a tie, takes the next task; see
    ``window_keeps_up``), so the lane runs it itself over the job's own Task
    objects — one heap operation per task — instead of one ``take`` and one
    ``completed`` per task.  What each host ran since the last report is a
    *chain* of tasks back to back (each starts when the one before it ends),
    which is what a Scheduler batch records; the lane reports every chain
    at once through the scheduler's bulk report (:meth:`Scheduler.ran`:
    one lock, one event per state, one read of the input).  It reports
    when it needs more input (the job's window moves on completions) and
    at the end, so the job's states, counts, events, progress and results
    are the Scheduler's, and the trace is list scheduling's: the same as
    the general loop's and ``simulate()``'s.

    The duration estimate is kept per task with the Scheduler's own
    arithmetic (a chain's report would fold it in per chain), and handed
    to the scheduler with each report (set under its lock with the tasks).  Whenever list
    scheduling stops being the whole story — chunking would start batching
    (run_fast's rule), a task is cancelled, the duration model fails on a
    task, the input cannot be read now — the lane reports what ran, hands
    each host's running task to the engine as a batch taken from the
    Scheduler, puts the tasks it still holds back at the queue's front, and
    the general loop goes on from that very event.
    """

    def __init__(self, backend: SimulatorBackend):
        self.backend = backend

    def job(self) -> Job | None:
        """The admitted job the lane can run now, or None."""
        b = self.backend
        src, engine, p = b.source, b.engine, b.platform
        if not (p.always_up and p.ideal_network and not p.overhead and not p.failure_rate):
            return None
        gate = src.gate
        if type(gate.inner) not in (FIFO, FastestFirst) or src.wants_idle:
            return None
        if engine.busy or engine.heap:   # (on this platform: every host is free)
            return None
        if not window_keeps_up(b.scheduler.workers):
            return None
        with b.scheduler.cond:
            gate.advance()
            if len(gate._open) != 1 or gate.refused or gate.flush is not None or not len(gate.inner):
                return None
            job = gate._open[0]
            if not hasattr(job, "done") or job.done():   # (a submit() call is a Task)
                return None
            if job.timeout is not None or job.chunksize not in (None, 1):
                return None
        try:
            model = src.model_of(job.fn)
        except Exception:   # (the general loop says why, task by task)
            return None
        if model.host_aware:
            return None
        return job

    def run(self, job: Job) -> bool:
        """Run ``job`` from the virtual now; True when it ran to the end
        here, False when it was handed over to the general loop (or the
        backend is stopping)."""
        b = self.backend
        sched, src, engine = b.scheduler, b.source, b.engine
        gate, inner = src.gate, src.gate.inner
        cond = sched.cond
        order = engine.order
        m = len(order)
        speeds = [engine.hosts[h].speed for h in order]        # by rank
        names = [src.names[h] for h in order]                   # by rank
        fp = job.fn
        model = src.model_of(fp)
        evaluate = model.evaluate
        const = model.spec if model.kind == "constant" else None
        gives_value = model.gives_value
        adaptive = job.chunksize is None
        half = rules.single_task_above(sched.chunking)
        wgt = estimate_weight()
        with cond:
            mean = fp.mean
        total_known = job.progress[1]
        seen = 0                        # tasks taken from the queue (all this job's)
        queue: deque[Task] = deque()
        cur: list[Any] = [None] * m     # by rank: the task running there
        begin = [0.0] * m               # by rank: when it started
        val: list[Any] = [None] * m     # by rank: its value (the function's result), if any
        work_of: list[float] = [0.0] * m
        # by rank: what ran since the last report, back to back
        chain_tasks: list[list[Task]] = [[] for _ in range(m)]
        chain_ends: list[list[float]] = [[] for _ in range(m)]
        chain_values: list[list[Any]] = [[] for _ in range(m)]
        chain_start = [0.0] * m
        busy_ranks = []                 # ranks with a chain to report
        t = src.now
        heap: list[tuple[float, int]] = []
        heapreplace, heappop, heappush = heapq.heapreplace, heapq.heappop, heapq.heappush

        def refill() -> int:
            nonlocal seen
            with cond:
                got = inner.pop(names[0], len(inner)) if len(inner) else []
            seen += len(got)
            queue.extend(got)
            return len(got)

        def report(now: float) -> bool:
            """Report every chain (at virtual time ``now``) to the scheduler
            in one call; False once the scheduler is closed."""
            nonlocal busy_ranks
            if not busy_ranks:
                return True
            src.now = now
            runs = [(names[r], chain_tasks[r], chain_start[r], chain_ends[r], chain_values[r])
                    for r in busy_ranks]
            last = max(run[3][-1] for run in runs)
            for r in busy_ranks:
                chain_tasks[r], chain_ends[r], chain_values[r] = [], [], []
            busy_ranks = []
            # (before, not after: once the job ends its waiter may shut the
            # master down, and the lane did run to the end)
            ok = not sched.closed
            if ok:
                src.note_job_return(job, last)
                # The estimate is the lane's (it saw each task): set with the
                # tasks, under the scheduler's lock, counting those that ran.
                sched.ran(runs, mean)   # (tasks a close or cancel ended meanwhile are left as they are)
            src.stamp += 1
            return ok

        def hand_over(now: float, idle_rank: int | None) -> None:
            """The general loop goes on at ``now``: hosts in ``heap`` run
            their task (a batch taken from the scheduler), ``idle_rank``
            (if any) asks for work, the lane's queue goes back in front."""
            report(now)
            with cond:
                # (a cancel meanwhile: its tasks must not come back)
                inner.push_front([t for t in queue if t.state is PENDING])
                gone = {r for _, r in heap if cur[r].state is not PENDING}
            queue.clear()
            pending = engine.pending
            for e, r in heap:
                if r in gone:
                    continue   # (that host is free: the general loop gives it work)
                task = cur[r]
                gate.handing = (names[r], [task])
                try:
                    batch = sched.take(names[r], False)
                finally:
                    gate.handing = None
                if batch is None:
                    continue
                pending[order[r]] = (batch, batch.tasks, begin[r], [e], True, None, "", False)
                engine.busy += 1
                if val[r] is not None:
                    src.keep_value(task, work_of[r], val[r])
            busy = {r for _, r in heap}
            engine.heap[:] = [(e, r) for e, r in heap if engine.pending[order[r]] is not None]
            heapq.heapify(engine.heap)
            engine.idle[:] = [r for r in range(m) if r not in busy or engine.pending[order[r]] is None]
            heapq.heapify(engine.idle)
            engine._kept = []
            engine.now = src.now = now
            engine._offered = -1

        def start(r: int, now: float) -> int:
            """Rank ``r`` is free at ``now``: start the next task there.
            1: started; 0: no task (idle for good: the input is exhausted);
            -1: hand over (nothing to take yet, a task cancelled or a model error)."""
            nonlocal mean
            if not queue:
                total = job.progress[1]
                if total is not None and seen >= total:
                    return 0   # the input is exhausted: idle for good (the rest is reported at the end)
                if busy_ranks and not report(now):
                    return -2
                if b._stopping:
                    return -2
                refill()
                if not queue:
                    total = job.progress[1]
                    return 0 if total is not None and seen >= total else -1
                if job.done() or any(task.state is not PENDING for task in queue):
                    return -1
            task = queue[0]
            if task.state is not PENDING:
                return -1
            if const is not None:
                w, v = const, None
            else:
                try:
                    w, v = evaluate(task.args, task.kwargs, None, task.describe_input)
                except ModelError:
                    return -1   # the general loop fails it (at this moment, on this host)
            queue.popleft()
            cur[r] = task
            begin[r] = now
            val[r] = v
            work_of[r] = w
            heappush(heap, (now + w / speeds[r], r))
            return 1

        # every host asks at the arrival, in rank order (Engine.start)
        for r in range(m):
            got = start(r, t)
            if got == 1:
                continue
            if got == -2:
                return False
            if got == -1:
                hand_over(t, r)
                return False
            break
        while heap:
            t, r = heap[0]
            s = begin[r]
            x = t - s if t > s else 0.0
            new = x if mean is None else mean + wgt * (x - mean)
            if adaptive and new <= half:
                hand_over(t, None)   # chunking would batch from this event: the general loop's
                return False
            mean = new
            tasks = chain_tasks[r]
            if not tasks:
                chain_start[r] = s
                busy_ranks.append(r)
            tasks.append(cur[r])
            chain_ends[r].append(t)
            v = val[r]
            chain_values[r].append(t - s if v is None else v)
            if queue:   # the common case: the next task, in place
                task = queue[0]
                if task.state is PENDING:
                    if const is not None:
                        w, v = const, None
                    else:
                        try:
                            w, v = evaluate(task.args, task.kwargs, None, task.describe_input)
                        except ModelError:
                            w = -1.0
                    if w >= 0:
                        queue.popleft()
                        cur[r] = task
                        begin[r] = t
                        val[r] = v
                        work_of[r] = w
                        heapreplace(heap, (t + w / speeds[r], r))
                        continue
            heappop(heap)
            cur[r] = None
            got = start(r, t)
            if got == 1:
                continue
            if got == -2:
                return False
            if got == -1:
                hand_over(t, r)
                return False
        # the input is exhausted and every task has run
        if busy_ranks and not report(t):
            return False
        engine.now = src.now = t
        engine.idle[:] = range(m)   # every host is free (ranks in order: a heap)
        engine._kept = []
        src._advance()
        return True


class SimulatorBackend(Backend):
    """See the module docstring."""

    name = "simulator"
    family = "pool"
    options = SIMULATOR_OPTIONS

    def __init__(self, scheduler: Scheduler, workers: int, key: bytes, *, speeds: Any = 1.0,
                 availability: Any = "always", failure_rate: float = 0.0, latency: Any = 0.0,
                 bandwidth: Any = None, overhead: float = 0.0, duration: Any = None, seed: int = 0,
                 churn: Any = None, **options: Any):
        super().__init__(scheduler, workers, key, **options)
        self.platform = build_platform(workers, speeds=speeds, availability=availability,
                                       failure_rate=failure_rate, latency=latency, bandwidth=bandwidth,
                                       overhead=overhead, seed=seed, churn=churn)
        self.duration = check_duration(duration)
        self.seed = seed
        policy = scheduler.policy   # (attached to the worker count by the scheduler)
        seed_policy(policy, seed)
        lead_clock = hasattr(scheduler, "clock")    # a Scheduler that stamps with its ``clock``
        self.source = SchedulerSource(self)
        self.source.virtual_jobs = lead_clock
        policy.use_estimate(self.source.estimate)
        self.engine = Engine(self.platform, self.source, policy.host_key)
        self._stopping = False
        self._lane = _Lane(self)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # --- Backend ----------------------------------------------------------------------
    def scheduler_hooks(self) -> SchedulerHooks:
        # Arrivals go through the admission rule; the policy object stays
        # the master's.  Stamps and events use the virtual clock.
        return SchedulerHooks(stop_workers=self.stop_workers, clock=self.source.clock,
                              queue=lambda _policy: self.source.gate)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="pymw-simulator", daemon=True)
        self._thread.start()

    def shutdown(self, wait: bool = True) -> None:
        self._stopping = True
        self.scheduler.close()
        if self._thread is not None:
            join_threads([self._thread], wait)

    def stop_workers(self, names: set[str]) -> None:
        """Nothing to kill: a cancelled task's batch ends on the virtual
        clock and the scheduler ignores it."""

    def worker_info(self) -> list[dict[str, Any]]:
        return [{"name": h.name, "host": "simulated", "speed": h.speed} for h in self.platform.hosts]

    # --- what reports read ------------------------------------------------------------------
    @property
    def now(self) -> float:
        """The virtual clock."""
        return self.source.now

    def job_record(self, job: Job) -> dict[str, Any]:
        """Hosts, speeds, wasted attempts and virtual span of ``job``."""
        hosts = self.platform.hosts
        src = self.source
        waste = [(task.index, h, s, e, kind) for task, h, s, e, kind in list(self.engine.waste)
                 if getattr(task, "job", None) is job]
        t0 = src.arrivals.get(job.id)
        if t0 is None:
            subs = [t.submitted for t in job.tasks if t.started is not None]
            t0 = min(subs) if subs else 0.0
        return {
            "hosts": [h.name for h in hosts], "speeds": [h.speed for h in hosts], "waste": waste,
            "t0": t0, "t_end": src.last_return.get(job.id, t0), "note": src.notes.get(job.id),
            "final_failures": src.final_failures.get(job.id, 0),
        }

    # --- the simulation thread -----------------------------------------------------------------
    def _serve(self) -> None:
        sched, source = self.scheduler, self.source
        self.engine.start(0.0)   # every host asks once: with no work yet, all idle
        while not self._stopping:
            with sched.cond:
                while not self._stopping and not sched.closed and not len(source.policy) \
                        and not source.gate.refused:
                    # A held submission is admitted once the one before it
                    # ended, which a cancelled Future does without a push.
                    source.gate.advance()
                    if len(source.policy):
                        break
                    sched.wait_for_work(0.05)
            if self._stopping or sched.closed:
                return
            try:
                source._advance()   # (fails what the policy refused)
                source.stamp += 1
                # A job the lane can run: run there; what it hands over
                # (or cannot take) goes on in the general loop.
                job = self._lane.job()
                while job is not None and not self._stopping and self._lane.run(job):
                    job = self._lane.job()
                self.engine.wake()
                self.engine.run(stop=lambda: self._stopping, until_idle=True,
                                pause=lambda: self._lane.job() is not None)
            except Exception as exc:   # a bug here must not hang the jobs, nor end the backend
                self.error = exc
                self._abort(exc)

    def _abort(self, exc: BaseException) -> None:
        """Fail everything in flight, queued or still to be read with the
        simulator's error, then start a fresh engine at the same virtual
        time for later jobs."""
        warnings.warn(f"pymw-magic: the simulator failed ({exc!r}); the tasks it held fail with that error",
                      RuntimeWarning, stacklevel=1)
        old = self.engine
        try:
            batches = [rec[0] for rec in old.pending if rec is not None]
            old.pending = [None] * len(old.pending)
            old.busy = 0
            if batches:
                self.source._call(self.scheduler.lost, batches, None, "stopped")
            self.source.give_up(f"the simulator failed: {exc!r}")
        except Exception as again:  # pragma: no cover - nothing more can be done
            warnings.warn(f"pymw-magic: cleaning up after the simulator failed, too: {again!r}",
                          RuntimeWarning, stacklevel=1)
        engine = Engine(self.platform, self.source, self.source.policy.host_key)
        engine.waste = old.waste
        engine.rng = old.rng
        engine.master_free = old.master_free
        engine.start(max(old.now, self.source.now))
        self.engine = engine
