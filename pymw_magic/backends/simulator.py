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
  ``Master("local", policy=...)``.

Nothing real runs except what tells a task's length: the ``duration`` model
(a function of the task's arguments, optionally of the ``host``), a
constant, PyMW's convention (the task function itself returns its length —
the default), or ``"measure"`` (the task runs once here, timed).  A task's
result is what its function returned when the simulator called it ("pymw",
"measure"); with a separate duration model it is the task's simulated run
time on its host.  Task ``timeout`` is not simulated.

Options (flat keywords; the magics take the string forms of
:mod:`pymw_magic.simulation.models`): ``speeds``, ``availability``,
``failure_rate``, ``latency``, ``bandwidth``, ``overhead``, ``duration``,
``seed``.  The defaults are the ideal platform.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..simulation.engine import Engine, SimulationError, seed_policy
from ..simulation.models import (AVAILABILITY_FORMS, DISTRIBUTION_FORMS, DurationModel, ModelError,
                                 build_platform, check_duration, check_speeds, parse_distribution,
                                 payload_size, value_size)
from .base import Backend, Option

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
        if isinstance(value, str) and value.strip().lower() in ("none", "inf"):
            return None
        spec = parse_distribution(value, what)
        values = spec if isinstance(spec, list) else [spec] if isinstance(spec, float) else []
        if any(v < 0 or (v == 0 and not allow_zero) or math.isnan(v) for v in values):
            raise ValueError(value)
        return spec
    return convert


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
    return check_duration(value)


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
                       "or a function duration(*args, host=...) -> seconds at speed 1"),
    "seed": Option("seed", _seed, 0, "seed of every random draw (same seed, same trace)",
                   check=_valid(_seed), requirement="a whole number"),
}


class SchedulerSource:
    """The engine's Source over the real Scheduler (see the module docstring)."""

    def __init__(self, backend: SimulatorBackend):
        self.backend = backend
        self.sched: Scheduler = backend.scheduler
        self.hosts = backend.platform.hosts
        self.names = [h.name for h in self.hosts]
        self.stamp = 0
        self.policy_name = getattr(self.sched.policy, "name", "?")
        self.spec = backend.duration
        self._models: dict[int, DurationModel] = {}
        self._cache: dict[int, tuple[float, Any]] = {}   # task id -> (work, value), host-independent models
        self._fn_sent: set[tuple[int, int]] = set()
        self.now = 0.0
        self.arrivals: dict[int, float] = {}
        self.last_return: dict[int, float] = {}
        self.notes: dict[int, str] = {}
        self.wake_time = 0.0

    # --- durations --------------------------------------------------------------------
    def _model(self, task: Task) -> DurationModel:
        fp = task.fn
        model = self._models.get(fp.id)
        if model is None:
            fn = None
            if self.spec is None or self.spec in ("pymw", "measure"):
                import cloudpickle
                fn = cloudpickle.loads(fp.data)
            model = self._models[fp.id] = DurationModel(self.spec, fn)
        return model

    def evaluate(self, task: Task, host: Any) -> tuple[float, Any]:
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
        return self.evaluate(task, None)[0]

    # --- Source -------------------------------------------------------------------------
    def has_work(self) -> bool:
        return len(self.sched.policy) > 0

    def take(self, h: int, t: float) -> tuple[Batch, list, list[float]] | None:
        sched = self.sched
        host = self.hosts[h]
        while True:
            batch = sched.take(self.names[h], block=False)
            if batch is None:
                return None
            works, bad = [], []
            for task in batch.tasks:
                try:
                    works.append(self.evaluate(task, host)[0])
                except ModelError as exc:
                    bad.append((task, exc))
            if bad:
                sched.reject(bad)
                self.stamp += 1
                failed = {id(task) for task, _ in bad}
                batch.tasks = [task for task in batch.tasks if id(task) not in failed]
                if not batch.tasks:
                    self._discard(batch)
                    continue
                works = [self.evaluate(task, host)[0] for task in batch.tasks]
            for task in batch.tasks:
                if task.attempts == 1:   # first seen: its virtual submission time
                    job = task.job
                    if job is not None and job._source is None:   # submit(): per task
                        task.submitted = self.wake_time
                    elif job is not None:
                        task.submitted = self.arrivals.setdefault(job.id, self.wake_time)
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

    def _returned(self, batch: Batch, t: float) -> None:
        for task in batch.tasks:
            job = task.job
            if job is not None and t > self.last_return.get(job.id, -math.inf):
                self.last_return[job.id] = t

    def finish(self, batch: Batch, h: int, start: float, ends: list[float], returned: float) -> None:
        values = self._values(batch, start, ends)
        self._returned(batch, returned)
        self.sched.completed(batch, start, ends, values, {}, {})
        self.stamp += 1

    def fail(self, batch: Batch, h: int, start: float, ends: list[float], culprit: int | None,
             t: float, why: str) -> None:
        tasks = batch.tasks
        culprit_task = tasks[culprit] if culprit is not None else None
        self._returned(batch, t)
        self.sched.lost([batch], culprit_task.id if culprit_task is not None else None, "died", why)
        if culprit_task is not None and culprit_task.state.final:
            # the scheduler stamps wall-clock time; the attempt's virtual times are these
            culprit_task.started = start if culprit == 0 else ends[culprit - 1]
            culprit_task.finished = t
            self._cache.pop(culprit_task.id, None)
        self.stamp += 1

    def give_up(self, why: str) -> None:
        sched = self.sched
        err = SimulationError(why)
        for name in self.names + ["(none)"]:
            while True:
                batch = sched.take(name, block=False)
                if batch is None:
                    break
                for task in batch.tasks:
                    if task.job is not None:
                        self.notes[task.job.id] = why
                sched.reject([(task, err) for task in batch.tasks])
                self._discard(batch)
        self.stamp += 1

    def _discard(self, batch: Batch) -> None:
        """Tell the scheduler a batch it handed out will never be reported."""
        discard = getattr(self.sched, "discard", None)
        if discard is not None:
            discard(batch)


class SimulatorBackend(Backend):
    """See the module docstring."""

    name = "simulator"
    family = "pool"
    options = SIMULATOR_OPTIONS
    #: real seconds to let a burst of submit() calls land before simulating
    settle = 0.005

    def __init__(self, scheduler: Scheduler, workers: int, key: bytes, *, speeds: Any = 1.0,
                 availability: Any = "always", failure_rate: float = 0.0, latency: Any = 0.0,
                 bandwidth: Any = None, overhead: float = 0.0, duration: Any = None, seed: int = 0,
                 **options: Any):
        super().__init__(scheduler, workers, key, **options)
        self.platform = build_platform(workers, speeds=speeds, availability=availability,
                                       failure_rate=failure_rate, latency=latency, bandwidth=bandwidth,
                                       overhead=overhead, seed=seed)
        self.duration = check_duration(duration)
        self.seed = seed
        policy = scheduler.policy
        policy.attach(workers)
        seed_policy(policy, seed)
        self.source = SchedulerSource(self)
        policy.use_estimate(self.source.estimate)
        self.engine = Engine(self.platform, self.source, policy.host_key)
        scheduler.stopper = self.stop_workers
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # --- Backend ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="pymw-simulator", daemon=True)
        self._thread.start()

    def shutdown(self, wait: bool = True) -> None:
        self._stopping = True
        self.scheduler.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=None if wait else 5)

    def stop_workers(self, names: set[str]) -> None:
        """Nothing to kill: a cancelled task's batch ends on the virtual
        clock and the scheduler ignores it."""

    def worker_info(self) -> list[dict[str, Any]]:
        return [{"name": h.name, "host": "simulated", "speed": h.speed} for h in self.platform.hosts]

    # --- what reports read ------------------------------------------------------------------
    @property
    def now(self) -> float:
        """The virtual clock."""
        return self.engine.now

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
        }

    # --- the simulation thread -----------------------------------------------------------------
    def _serve(self) -> None:
        sched, engine, source = self.scheduler, self.engine, self.source
        try:
            engine.start(0.0)   # every host asks once: with no work yet, all idle
            while not self._stopping:
                with sched.cond:
                    while not self._stopping and not sched.closed and not len(sched.policy):
                        sched.cond.wait(0.05)
                if self._stopping or sched.closed:
                    return
                self._settle()
                source.wake_time = engine.now
                source.stamp += 1
                engine.wake()
                engine.run(stop=lambda: self._stopping)
        except BaseException as exc:  # a bug here must not hang the jobs
            self.error = exc
            self._abort(exc)

    def _abort(self, exc: BaseException) -> None:
        """Fail every task in flight or queued with the simulator's error."""
        import warnings
        warnings.warn(f"pymw-magic: the simulator thread failed: {exc!r}", RuntimeWarning, stacklevel=1)
        engine = self.engine
        try:
            batches = [rec[0] for rec in engine.pending if rec is not None]
            engine.pending = [None] * len(engine.pending)
            self.scheduler.lost(batches, None, "stopped")
            self.source.give_up(f"the simulator stopped: {exc!r}")
        except Exception:  # pragma: no cover - nothing more can be done
            pass

    def _settle(self) -> None:
        """Let a burst of submissions finish landing (so a loop of submit()
        calls starts together on the virtual clock, not one by one)."""
        policy = self.scheduler.policy
        seen = -1
        deadline = time.monotonic() + 0.5
        while len(policy) != seen and time.monotonic() < deadline:
            seen = len(policy)
            time.sleep(self.settle)
