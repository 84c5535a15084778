"""The simulation engine: one discrete-event loop on a virtual clock, and
``simulate()``, its one-call form.

::

            ┌──────────── Engine (this module) ────────────┐
            │ heap of (time, host rank): one pending event  │
            │ per host — "batch ends" or "comes up"         │
            │ idle hosts: a heap of ranks (policy.host_key) │
            │ platform: speeds, availability, failures,     │
            │ latency/bandwidth, master overhead            │
            └───────┬───────────────────────────▲───────────┘
        take(h, t)  │                           │ finish(...) / fail(...)
                    ▼                           │
       a Source: which tasks, and what their fate means
         · LeanSource (here)      — simulate(): light task records in
                                    arrays, the same Policy objects
         · SchedulerSource        — the ``simulator`` backend
           (backends/simulator.py)  (Master("simulator")): the real
                                    Scheduler, Task and Job objects

Who does what:

* the **Engine** owns time and the platform: when a free host asks for
  work, how long a batch takes there (master overhead serialised across
  dispatches, latency and bandwidth on the payload sizes, work / speed per
  task), whether an attempt fails (``failure_rate``, drawn per task) or is
  cut by the host going down (availability), and the record of wasted
  attempts (failed, or finished but lost with their batch);
* a **Source** owns the tasks: what a host gets (through the Policy and
  the chunking rule), and what a finished or failed batch means (results,
  retries, requeues).  ``LeanSource`` mirrors the Scheduler's rules
  (window, chunking, retry and requeue) on light records, so both sources
  give the same trace for the same seed — the tests check it;
* the **Policy** (``policies.py``) picks tasks, and ranks simultaneously
  free hosts through its optional ``host_key``.

Timing of one batch on host h that asks at time t (the ideal platform makes
every term but the work vanish, so textbook cases come out exact)::

    dispatch  d = max(t, master free) ; master busy until d + overhead
    start     s = d + overhead + latency_h + input bytes / bandwidth_h
    task k    runs [e_{k-1}, e_k), e_k = e_{k-1} + work_k / speed_h
    returned  r = e_last + latency_h + output bytes / bandwidth_h   (h asks again)

A task that fails (probability ``failure_rate`` per attempt) stops at a
uniformly drawn point of its run and takes its batch down with it, as a
dying worker does on a real pool: that attempt is charged to the task (it
is retried while its retries last).  The host going down (availability) or
away (``churn``) also takes its batch down, but that is nobody's fault:
every task of the batch goes back to the queue uncharged, as a real pool
requeues the tasks of a worker it stopped, and the cut attempt is recorded
as ``lost``.  A task that runs past its ``timeout`` is stopped at its
deadline and fails (not retried, as on a real pool); its batch mates go
back uncharged.  A task that fails for good is recorded once, as its own
outcome (the wasted attempts are those retried or lost).

No progress: should :data:`CUT_LIMIT` attempts in a row (50 per host at
least) be cut by outages with nothing finished or failed meanwhile, no host
stays up long enough for the tasks; the engine then drops the batches in
flight and the source fails what is left with a :class:`SimulationError`
saying so, instead of simulating (and recording lost attempts) for ever.

The scheduler's rules themselves — window, refill, batch size, the fate of
a lost batch's tasks — are the pure functions of :mod:`pymw_magic.rules`,
which the sources call rather than copy.

The fast path (:func:`run_fast`), chosen by :func:`simulate` on its own
(:func:`fast_path_applies`): FIFO task order, a platform of nothing but
speeds (always up, free network, no master overhead, no failures), a
duration model that ignores the host, batches of one.  Then all the rules
above reduce to list scheduling — the host free earliest (best rank on a
tie) takes the next task — and one fused loop runs it over plain columns:
one ``heapreplace`` and a few list stores per task, no task objects, the
adaptive chunking's estimate updated inline with the same arithmetic.  If
that estimate falls to where chunking would batch tasks, the fast path
builds the general state (SimTasks, the policy's queue, pending batches)
exactly as the general loop would have it and hands over before that
event.  Same trace, bit for bit: the tests compare both paths (a FIFO
subclass takes the general loop).  ``Engine.run`` has a lighter fast lane
of its own for the same plain platform: a host that finishes a batch
reports it and takes the next in one call (``LeanSource.cycle``), its
heap entry replaced in place.
"""

from __future__ import annotations

import copy
import gc
import heapq
import math
import random
from collections.abc import Sized
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from .. import rules
from ..payload import FunctionCache, FunctionPayload
from ..policies import FIFO, Chunking, FastestFirst, Policy, PolicyTaskError, is_policy_like, make_policy
from ..task import PENDING
from .models import (INF, DurationModel, Host, ModelError, Platform, build_platform, iter_args, payload_size,
                     value_size)

if TYPE_CHECKING:
    from .report import Report

__all__ = ["Engine", "LeanSource", "Source", "simulate", "SimulationError", "LOST", "FAILED_ATTEMPT",
           "fast_path_applies", "run_fast", "window_keeps_up", "estimate_weight"]

#: kinds of wasted attempts in the engine's record
FAILED_ATTEMPT, LOST = "failed", "lost"

#: why a batch ended early (``Source.fail``'s ``cause``): a task failed
#: (charged to it), its host went down or away (charged to nobody), a task
#: ran past its timeout (that task fails, as ``Scheduler.lost`` "timeout")
FAILURE, OUTAGE, TIMEOUT = 0, 1, 2

#: attempts cut by outages in a row, with nothing finished or failed in
#: between, after which no progress is deemed possible (at least 50 per
#: host: every host may be cut at once, as with periodic availability).
#: A task whose attempt survives an outage with probability q needs
#: about 1/q attempts, so this gives up only where q is below ~1e-3.
CUT_LIMIT = 10_000


class SimulationError(RuntimeError):
    """The simulation cannot go on (e.g. no host will ever be up again)."""


class _NoProgress(Exception):
    """Raised inside the engine when no task can ever finish (see CUT_LIMIT)."""


class Source(Protocol):
    stamp: int
    #: whether tasks may have timeouts (the engine then asks ``timeouts`` per batch)
    timed: bool

    def has_work(self) -> bool: ...
    def take(self, h: int, t: float) -> tuple[Any, list, list[float]] | None: ...
    def finish(self, handle: Any, h: int, start: float, ends: list[float], returned: float) -> None: ...
    def fail(self, handle: Any, h: int, start: float, ends: list[float], culprit: int | None,
             t: float, why: str, cause: int) -> bool: ...
    def sizes(self, handle: Any, h: int) -> tuple[int, int]: ...
    def timeouts(self, handle: Any) -> list[float | None] | None: ...
    def give_up(self, why: str) -> None: ...


class Engine:
    """The event loop over ``platform``'s hosts, serving ``source``."""

    def __init__(self, platform: Platform, source: Source, host_key: Callable[[Host], Any] | None = None):
        self.platform = platform
        self.hosts = platform.hosts
        self.source = source
        m = len(self.hosts)
        # Hosts are ranked once by the policy's host_key (then index); heap
        # entries are (time, rank): ties at equal times go to the best rank.
        if host_key is None:
            self.order = list(range(m))
        else:
            self.order = sorted(range(m), key=lambda i: (host_key(self.hosts[i]), i))
        self.rank = [0] * m
        for r, h in enumerate(self.order):
            self.rank[h] = r
        self.heap: list[tuple[float, int]] = []
        self.idle: list[int] = []   # ranks of idle hosts (a heap)
        self._kept: list[int] = []  # ranks an offer round passed over (idle too)
        self.pending: list[Any] = [None] * m
        self.busy = 0               # hosts with a batch in flight (pending not None)
        self.up_end = [INF] * m
        self.now = 0.0
        self.master_free = 0.0
        self.rng = random.Random(f"{platform.seed}:failures")
        self.ideal_network = platform.ideal_network
        self.always_up = platform.always_up
        self.events = 0
        self._offered = -1
        # Tasks' timeouts: only when the source may have some (then it says
        # which, per batch, through ``timeouts``).
        self.timed = bool(getattr(source, "timed", False))
        # No progress: attempts cut by outages in a row (since a batch last
        # ended otherwise), when the first of them started, and the longest
        # cut; ``cut_limit`` in a row means no host stays up long enough.
        self._cut = 0
        self._cut_since = 0.0
        self._cut_longest = 0.0
        self.cut_limit = max(CUT_LIMIT, 50 * m)
        # wasted attempts: (task, host index, start, end, kind)
        self.waste: list[tuple[Any, int, float, float, str]] = []

    # --- entry points ---------------------------------------------------------------
    def start(self, t: float = 0.0) -> None:
        """Bring every host in at time ``t``: those up are free together
        (so a policy that looks at the free hosts sees them all) and are
        served in host_key order."""
        self.now = t
        for h in self.order:
            if not self.always_up:
                w = self.hosts[h].availability.window(t)
                if w is None:
                    continue  # never up
                if w[0] > t:
                    heapq.heappush(self.heap, (w[0], self.rank[h]))
                    continue
                self.up_end[h] = w[1]
            self.idle.append(self.rank[h])   # ranks in increasing order: a heap
        self._offered = -1
        self._offer(t)

    def wake(self) -> None:
        """New work arrived from outside (the backend): offer it to idle hosts now."""
        self._offered = -1
        self._offer(self.now)

    def free_hosts(self, h: int) -> list[Host]:
        """The hosts free at this instant, ``h`` (the one asking) among
        them, best rank first: what a policy that wants to see every free
        worker (a PyMW ``scheduler_func``) is told."""
        ranks = set(self.idle)
        ranks.update(self._kept)
        ranks.add(self.rank[h])
        return [self.hosts[self.order[r]] for r in sorted(ranks)]

    def run(self, stop: Callable[[], bool] | None = None, until_idle: bool = False,
            pause: Callable[[], bool] | None = None) -> None:
        """Process events until none is left (or ``stop()`` says so); work
        that no host will ever take is handed to ``source.give_up``.

        ``until_idle``: return as soon as no batch is in flight and the
        source has no work, leaving later events (hosts coming back up) for
        the next run — so the clock stops where the last work ended, which
        is when new work then arrives (the backend).

        ``pause``: asked when the last batch in flight has just ended; if
        it says so, the host that ran it is parked idle and run returns at
        that moment (the backend's lane takes the next job from there)."""
        heap, pending, source, idle, order = self.heap, self.pending, self.source, self.idle, self.order
        heappop, heappush, heapreplace = heapq.heappop, heapq.heappush, heapq.heapreplace
        end, free, offer = self._end, self._free, self._offer
        # The fast path, for a platform with nothing but speeds (always up,
        # free network, no master overhead, no failures) and a source that
        # can report a batch and take the next in one call (``cycle``): the
        # host's heap entry is replaced in place, one heap operation per batch.
        p = self.platform
        simple = self.always_up and self.ideal_network and not p.overhead and not p.failure_rate \
            and not self.timed
        cycle = getattr(source, "cycle", None) if simple else None
        speeds = [h.speed for h in self.hosts]
        n = 0
        t = self.now
        while True:
            while heap:
                n += 1
                if stop is not None and not n & 1023 and stop():
                    self.events += n
                    return
                if until_idle and not self.busy and not source.has_work():
                    self.events += n - 1
                    return
                t, r = heap[0]
                h = order[r]
                rec = pending[h]
                if cycle is not None and rec is not None and not idle:
                    got = cycle(h, t, rec[0], rec[2], rec[3])
                    if got is not None:
                        handle, tasks, works = got
                        sp = speeds[h]
                        if len(works) == 1:
                            e = t + works[0] / sp
                            ends = [e]
                        else:
                            ends = []
                            e = t
                            for w in works:
                                e += w / sp
                                ends.append(e)
                        pending[h] = (handle, tasks, t, ends, True, None, "", False)
                        heapreplace(heap, (e, r))
                    else:
                        heappop(heap)
                        pending[h] = None
                        self.busy -= 1
                        heappush(idle, r)
                    continue
                heappop(heap)
                self.now = t
                if rec is not None:
                    pending[h] = None
                    self.busy -= 1
                    try:
                        end(h, rec, t)
                    except _NoProgress as exc:
                        self._abandon(t, str(exc))
                    if pause is not None and not self.busy and pause():
                        heappush(idle, self.rank[h])
                        self.events += n
                        return
                free(h, t)
                if idle and source.stamp != self._offered:
                    offer(t)
            self.now = t
            if not source.has_work():
                break
            self._offered = -1
            offer(t)
            if not heap:
                if source.has_work():
                    source.give_up(self._stuck_reason())
                break
        self.events += n

    def _stuck_reason(self) -> str:
        gone = sum(1 for h in self.hosts if h.availability.window(self.now) is None)
        if gone:
            return (f"no simulated host will ever be available again ({gone} of {len(self.hosts)} "
                    f"hosts' availability had ended by t={self.now:g} s)")
        return (f"no free host accepts the remaining tasks under policy "
                f"{getattr(self.source, 'policy_name', '?')!r}")

    # --- hosts -------------------------------------------------------------------------
    def _free(self, h: int, t: float) -> None:
        """Host ``h`` is free at ``t``: give it work, or park it."""
        if not self.always_up:
            w = self.hosts[h].availability.window(t)
            if w is None:
                return  # gone for good
            if w[0] > t:
                heapq.heappush(self.heap, (w[0], self.rank[h]))
                return
            self.up_end[h] = w[1]
        if self.idle:
            # others wait already: join them, and let the ranking decide
            heapq.heappush(self.idle, self.rank[h])
            self._offered = -1
        elif not self._dispatch(h, t):
            heapq.heappush(self.idle, self.rank[h])

    def _offer(self, t: float) -> None:
        """Offer work to idle hosts, best-ranked first."""
        source, idle = self.source, self.idle
        if not idle or not source.has_work():
            return
        stamp = source.stamp
        kept = self._kept = []
        while idle and source.has_work():
            r = heapq.heappop(idle)
            h = self.order[r]
            if t >= self.up_end[h]:   # went down while idle: sleep until it is up
                w = self.hosts[h].availability.window(t)
                if w is not None:
                    if w[0] > t:
                        heapq.heappush(self.heap, (w[0], r))
                        continue
                    self.up_end[h] = w[1]
                else:
                    continue
            if not self._dispatch(h, t):
                kept.append(r)
        self._kept = []
        for item in kept:
            heapq.heappush(idle, item)
        self._offered = stamp if source.stamp == stamp else -1

    def _dispatch(self, h: int, t: float) -> bool:
        got = self.source.take(h, t)
        if got is None:
            return False
        handle, tasks, works = got
        host = self.hosts[h]
        speed = host.speed
        d = t
        overhead = self.platform.overhead
        if overhead:
            if self.master_free > d:
                d = self.master_free
            d += overhead
            self.master_free = d
        out_time = 0.0
        if not self.ideal_network:
            inb, outb = self.source.sizes(handle, h)
            d += host.latency + inb / host.bandwidth
            out_time = host.latency + outb / host.bandwidth
        ends = []
        e = d
        for w in works:
            e += w / speed
            ends.append(e)
        t_end = e + out_time
        ok = True
        cause = FAILURE
        culprit: int | None = None
        why = ""
        p = self.platform.failure_rate
        if p:
            rnd = self.rng.random
            s = d
            for k, e_k in enumerate(ends):
                if rnd() < p:
                    t_end = s + rnd() * (e_k - s)
                    ok, culprit = False, k
                    why = f"simulated failure of host {host.name} (failure_rate={p:g})"
                    break
                s = e_k
        if self.timed:
            limits = self.source.timeouts(handle)
            if limits is not None:
                s = d
                for k, e_k in enumerate(ends):
                    limit = limits[k]
                    if limit is not None and e_k - s > limit:
                        # stopped at its deadline, unless it failed (or its batch was cut) before
                        if s + limit < t_end or ok:
                            ok, culprit, cause, t_end = False, k, TIMEOUT, s + limit
                            why = f"task ran longer than its timeout of {limit:g} s on host {host.name}"
                        break
                    if not ok and e_k >= t_end:
                        break
                    s = e_k
        u = self.up_end[h]
        if t_end > u:
            ok, cause, t_end, culprit = False, OUTAGE, u, None
            departs = getattr(host.availability, "departs", None)
            gone = departs is not None and departs(u)
            why = (f"host {host.name} left at t={u:g} s (churn) and was replaced" if gone
                   else f"host {host.name} went offline at t={u:g} s")
            s = d
            for k, e_k in enumerate(ends):
                if s <= u < e_k:
                    culprit = k     # the attempt cut (recorded as lost, charged to nobody)
                    break
                s = e_k
        self.pending[h] = (handle, tasks, d, ends, ok, culprit, why, cause)
        self.busy += 1
        heapq.heappush(self.heap, (t_end, self.rank[h]))
        return True

    def _end(self, h: int, rec: tuple, t: float) -> None:
        handle, tasks, start, ends, ok, culprit, why, cause = rec
        if ok:
            self._cut = 0
            self.source.finish(handle, h, start, ends, t)
            return
        # The source first: whether the culprit failed for good, in which
        # case its attempt is the task's own record, not a wasted one.
        final = self.source.fail(handle, h, start, ends, culprit, t, why, cause)
        waste = self.waste
        s = start
        for k, e in enumerate(ends):
            if k == culprit:
                if not final:
                    waste.append((tasks[k], h, s, t, LOST if cause == OUTAGE else FAILED_ATTEMPT))
                if cause == OUTAGE and t - s > self._cut_longest:
                    self._cut_longest = t - s
                break
            if e > t:
                break
            waste.append((tasks[k], h, s, e, LOST))
            s = e
        if cause != OUTAGE:
            if final:   # a task failed for good: progress (one retried is not)
                self._cut = 0
            return
        if not self._cut:
            self._cut_since = start
        self._cut += 1
        if self._cut >= self.cut_limit:
            raise _NoProgress(self._no_progress_reason(t))

    def _no_progress_reason(self, t: float) -> str:
        longest = self._cut_longest
        return (f"no task can finish: the last {self._cut} attempts (from t={self._cut_since:g} s to "
                f"t={t:g} s) were all cut short by their host going offline or leaving (churn), none "
                f"running longer than {longest:g} s first; the tasks need hosts that stay up longer "
                f"than that (see availability= and churn=)")

    def _abandon(self, t: float, why: str) -> None:
        """No progress is possible: hand every batch in flight back to the
        source (uncharged, nothing recorded), free its host at ``t``, and
        let the source fail all remaining work with ``why``."""
        freed = set()
        for h, rec in enumerate(self.pending):
            if rec is None:
                continue
            self.pending[h] = None
            self.busy -= 1
            freed.add(self.rank[h])
            self.source.fail(rec[0], h, rec[2], rec[3], None, t, why, OUTAGE)
        if freed:
            # a host's one event was its batch's end: it is free now instead
            self.heap[:] = [(t, r) if r in freed else (te, r) for te, r in self.heap]
            heapq.heapify(self.heap)
        self.source.give_up(why)
        self._cut = 0
        self._cut_longest = 0.0


# --- the lean source: simulate() ----------------------------------------------------------

class SimTask:
    """A task of ``simulate()``: what policies read (``index``, ``args``,
    ``kwargs``, ``state``) and the scheduler's per-task flags."""

    __slots__ = ("index", "args", "kwargs", "state", "attempts", "isolate", "work")

    def __init__(self, index: int, args: tuple):
        self.index = index
        self.args = args
        self.kwargs = None
        self.state = PENDING
        self.attempts = 0
        self.isolate = False
        self.work = -1.0

    def describe_input(self) -> str:
        return ", ".join(map(repr, self.args))

    def __repr__(self) -> str:
        return f"<SimTask {self.index}>"


# task outcome codes of LeanSource
DONE_CODE, FAILED_CODE, PENDING_CODE = 0, 1, 3   # (2, cancelled, never happens here)


class LeanSource:
    """The Scheduler's rules on light records, for speed — the same
    functions of :mod:`pymw_magic.rules`: a lazily read input fed within a
    job's window (``rules.job_window``), refilled when a host finds the
    queue low (``rules.refill_below``), batches sized by ``rules.batch_size``,
    lost batches handled by ``rules.lost_task`` (the culprit retried while
    it has retries, isolated; the rest requeued at the front uncharged)."""

    def __init__(self, items: Iterable[tuple], model: DurationModel, policy: Policy, platform: Platform,
                 *, chunksize: int | None, retries: int, keep_values: bool, total: int | None = None,
                 timeout: float | None = None):
        self.source = iter(items)
        self.model = model
        self.policy = policy
        self.policy_name = policy.name
        self.hosts = platform.hosts
        self.names = [h.name for h in self.hosts]
        self.workers = len(self.hosts)
        self.low = rules.refill_below(self.workers)
        self.chunking = Chunking()
        self.chunksize = chunksize
        self.retries = retries
        self.timeout = timeout
        self.timed = timeout is not None    # (the engine then asks ``timeouts``)
        self.final_failures = 0             # tasks whose last attempt failed (their own record)
        self.fn = FunctionPayload(0, model.label, b"")
        self.constant = model.spec if model.kind == "constant" else None
        self.tasks: list[SimTask] = []
        cap = total if total is not None else 0
        self.host_of: list[int] = [-1] * cap
        self.start_of: list[float] = [math.nan] * cap
        self.end_of: list[float] = [math.nan] * cap
        self.state_of: list[int] = [PENDING_CODE] * cap
        self.values: list[Any] | None = [None] * cap if keep_values else None
        self.capacity = cap
        self.fed = 0
        self.final = 0
        self.queued = 0          # tasks in the policy's queue (== len(policy): nothing is cancelled here)
        self.exhausted = False
        self.stamp = 0
        self.last_return = 0.0
        self.give_up_reason: str | None = None
        self.host_aware = model.host_aware
        # FIFO-like policies: while batches are of one, refill only when the
        # queue runs low (take), in gulps — the same order as refilling after
        # every completion, as the Scheduler does.  Where chunking may batch
        # (see _may_batch) the queue's length sizes the batches, so finish()
        # then refills after every completion as the Scheduler does.
        self.gulp_safe = bool(getattr(policy, "gulp_safe", False))
        self.wants_idle = bool(getattr(policy, "wants_idle_workers", False))
        self.engine: Engine | None = None   # set by simulate(): free hosts for wants_idle policies
        # the duration estimate only sizes batches when no chunksize is fixed
        self.observe = chunksize is None
        # Chunking.size's common case, tested inline: a mean call longer than
        # half its target means batches of one
        self.half_target = rules.single_task_above(self.chunking)
        self._fn_bytes_sent: set[int] = set()
        # False while run_fast holds the tasks as bare columns: then every
        # fed task has no SimTask (and, once run_fast finishes, one attempt)
        self.materialized = True
        policy.attach(self.workers)
        policy.use_estimate(self.estimate)

    # the estimate length-ordering policies use: the model's work at speed 1
    def estimate(self, task: SimTask) -> float:
        if task.work < 0:
            task.work = self._evaluate(task, None)
        return task.work

    def _evaluate(self, task: SimTask, host: Host | None) -> float:
        if self.constant is not None:
            return self.constant
        work, value = self.model.evaluate(task.args, None, host, task.describe_input)
        if value is not None and self.values is not None:
            self.values[task.index] = value
        return work

    def _window(self) -> int:
        return rules.job_window(self.chunking, self.fn, self.chunksize, self.workers)

    def _grow(self, need: int) -> None:
        k = max(need - self.capacity, self.capacity, 1024)
        self.capacity += k
        self.host_of.extend([-1] * k)
        self.start_of.extend([math.nan] * k)
        self.end_of.extend([math.nan] * k)
        self.state_of.extend([PENDING_CODE] * k)
        if self.values is not None:
            self.values.extend([None] * k)

    def _refill(self) -> None:
        room = self._window() - (self.fed - self.final)
        if room <= 0:
            return
        start = self.fed
        if start + room > self.capacity:
            self._grow(start + room)
        new = []
        source = self.source
        i = start
        for args in source:
            new.append(SimTask(i, args))
            i += 1
            if i - start >= room:
                break
        else:
            self.exhausted = True
        if new:
            self.fed = i
            self.tasks.extend(new)
            try:
                self.policy.push(new)
            except PolicyTaskError as exc:
                cause = exc.failures[0][1].__cause__
                raise (cause if isinstance(cause, ModelError) else exc) from None
            self.queued += len(new)
            self.stamp += 1

    def attempts(self) -> list[int]:
        """Attempts per fed task (the report's column)."""
        if not self.materialized:
            return [1] * self.fed   # run_fast finished them all, one attempt each
        return [t.attempts for t in self.tasks]

    def trim(self) -> None:
        """Drop the unused tail of the per-task columns (after the run)."""
        n = self.fed
        for name in ("host_of", "start_of", "end_of", "state_of", "values"):
            col = getattr(self, name)
            if col is not None and len(col) > n:
                del col[n:]

    def _may_batch(self) -> bool:
        """Whether the next batch may hold more than one task (so the
        queue's length matters): a fixed chunksize above one, or adaptive
        chunking whose estimate is down to half its target."""
        n = self.chunksize
        if n:
            return n > 1
        mean = self.fn.mean
        return mean is not None and mean <= self.half_target

    # --- Source ---------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.queued > 0 or (not self.exhausted and self.fed - self.final < self._window())

    def take(self, h: int, t: float) -> tuple[list, list, list[float]] | None:
        policy = self.policy
        if not self.exhausted and self.queued < self.low:
            self._refill()
        name = self.names[h]
        if self.wants_idle and self.engine is not None:
            policy.idle_workers(self.engine.free_hosts(h))
        tasks = policy.pop(name, 1)
        if not tasks:
            return None
        self.queued -= 1
        first = tasks[0]
        if not first.isolate:
            n = self.chunksize
            if not n:
                mean = self.fn.mean
                n = 1 if mean is None or mean > self.half_target else rules.batch_size(
                    self.chunking, self.fn, None, self.queued + 1, self.workers, False)
            if n > 1:
                more = policy.pop(name, n - 1)
                self.queued -= len(more)
                loners = [x for x in more if x.isolate]
                if loners:
                    policy.push_front(loners)
                    self.queued += len(loners)
                    self.stamp += 1
                    more = [x for x in more if not x.isolate]
                tasks += more
        if self.host_aware:
            host = self.hosts[h]
            works = []
            for task in tasks:
                task.attempts += 1
                works.append(self._evaluate(task, host))
            return tasks, tasks, works
        if len(tasks) == 1:
            first.attempts += 1
            w = first.work
            if w < 0:
                w = first.work = self._evaluate(first, self.hosts[h])
            return tasks, tasks, [w]
        works = []
        for task in tasks:
            task.attempts += 1
            w = task.work
            if w < 0:
                w = task.work = self._evaluate(task, self.hosts[h])
            works.append(w)
        return tasks, tasks, works

    def sizes(self, handle: list, h: int) -> tuple[int, int]:
        inb = sum(payload_size(t.args) for t in handle)
        if h not in self._fn_bytes_sent:
            self._fn_bytes_sent.add(h)
            inb += len(getattr(self.model, "fn_bytes", b""))
        outb = 0
        if self.values is not None and self.model.kind == "measure":
            outb = sum(value_size(self.values[t.index]) for t in handle)
        return inb, outb

    def finish(self, handle: list, h: int, start: float, ends: list[float], returned: float) -> None:
        if len(handle) == 1:
            i = handle[0].index
            e = ends[0]
            self.host_of[i] = h
            self.start_of[i] = start
            self.end_of[i] = e
            self.state_of[i] = DONE_CODE
            if self.observe:
                self.fn.observe(e - start if e > start else 0.0, 1)
            self.final += 1
        else:
            host_of, start_of, end_of, state_of = self.host_of, self.start_of, self.end_of, self.state_of
            prev = start
            for task, e in zip(handle, ends):
                i = task.index
                host_of[i] = h
                start_of[i] = prev
                end_of[i] = prev = e
                state_of[i] = DONE_CODE
            n = len(handle)
            if self.observe:
                self.fn.observe(max(ends[-1] - start, 0.0) / n, n)
            self.final += n
        if returned > self.last_return:
            self.last_return = returned
        if not self.exhausted and (not self.gulp_safe or self._may_batch()):
            self._refill()  # as Scheduler.completed: the policy sees the window as it moves

    def cycle(self, h: int, t: float, handle: list, start: float,
              ends: list[float]) -> tuple[list, list, list[float]] | None:
        """``finish`` then ``take``: host ``h`` reports at ``t`` (nothing
        but compute between ``start`` and ``t``) and asks for more — one
        call, so the engine can replace the host's event in place."""
        self.finish(handle, h, start, ends, t)
        return self.take(h, t)

    def timeouts(self, handle: list) -> list[float | None] | None:
        """Each task's timeout (the engine stops a task at its deadline)."""
        return [self.timeout] * len(handle) if self.timeout is not None else None

    def fail(self, handle: list, h: int, start: float, ends: list[float], culprit: int | None,
             t: float, why: str, cause: int = FAILURE) -> bool:
        """As ``Scheduler.lost`` (the rules of :func:`pymw_magic.rules.lost_task`):
        a failure ("died") charges the culprit — retried, isolated, while it
        has retries — and requeues the rest uncharged; a timeout fails the
        culprit; an outage ("stopped") requeues every task uncharged.  Like
        ``lost``, no refill here.  Returns whether the culprit failed for good
        (its attempt is then its own record, not a wasted one)."""
        retrying, requeued = [], []
        final = False
        several = len(handle) > 1
        known = culprit is not None and cause != OUTAGE
        reason = "stopped" if cause == OUTAGE else "timeout" if cause == TIMEOUT else "died"
        retries = self.retries
        for k, task in enumerate(handle):
            fate, isolate = rules.lost_task(culprit=known and k == culprit, reason=reason,
                                            attempts=task.attempts, retries=retries, requeues=0,
                                            culprit_known=known, several=several)
            if fate == rules.REQUEUE:
                task.attempts -= 1
                if isolate:
                    task.isolate = True
                requeued.append(task)
            elif fate == rules.RETRY:
                task.isolate = True
                retrying.append(task)
            else:   # failed for good: this attempt is its record
                i = task.index
                self.host_of[i] = h
                self.start_of[i] = start if k == 0 else ends[k - 1]
                self.end_of[i] = t
                self.state_of[i] = FAILED_CODE
                self.final += 1
                self.final_failures += 1
                final = True
        if t > self.last_return:
            self.last_return = t
        back = retrying + requeued
        if back:
            self.policy.push_front(back)
            self.queued += len(back)
            self.stamp += 1
        return final

    def give_up(self, why: str) -> None:
        self.give_up_reason = why
        while True:
            if not self.exhausted:
                self._refill()
            # every host's name: a policy may hand a task only to its owner
            tasks = [t for name in self.names + ["(none)"] for t in self.policy.pop(name, 1 << 30)]
            if not tasks:
                break
            for task in tasks:
                self.state_of[task.index] = FAILED_CODE
                self.final += 1
        self.queued = 0
        self.exhausted = True


# --- the fast path: FIFO list scheduling on a platform of speeds ----------------------------

def fast_path_applies(platform: Platform, model: DurationModel, policy: Policy, chunksize: int | None,
                      timeout: float | None = None) -> bool:
    """Whether :func:`run_fast` gives the general loop's trace here: FIFO
    order (exactly FIFO or FastestFirst, whose ranking of hosts the engine
    does, and nothing queued in it already; a subclass may change the
    order, so it takes the general loop), nothing in the platform but
    speeds, no timeout, a duration that does not depend on the host,
    batches of one (chunksize 1, or adaptive — run_fast hands over if
    adaptive chunking would start batching), and window rules under which
    a host finds the queue empty only once the input is exhausted
    (:func:`window_keeps_up`)."""
    workers = len(platform.hosts)
    return (type(policy) in (FIFO, FastestFirst) and len(policy) == 0
            and platform.always_up and platform.ideal_network
            and not platform.overhead and not platform.failure_rate
            and not model.host_aware and chunksize in (None, 1) and timeout is None
            and window_keeps_up(workers))


def window_keeps_up(workers: int) -> bool:
    """Whether, with batches of one, a host asking for work can find the
    queue empty only once the input is exhausted — what :func:`run_fast`
    relies on to treat a host that finds nothing as idle for good.

    A host asks when the queue holds q < ``refill_below`` tasks (else it
    finds one); then at most ``workers - 1`` other tasks run, so the window
    has room for ``window - q - (workers - 1)`` more, at least one when
    ``window >= refill_below + workers`` — and a refill that reads nothing
    means the input is exhausted.  The window only grows with the batch
    size, so its size for batches of one is the bound."""
    return rules.window(workers, 1) >= rules.refill_below(workers) + workers


def estimate_weight() -> float:
    """The weight ``FunctionPayload.observe`` gives a one-call sample: its
    update is ``mean += w * (sample - mean)``, so from a mean of 0 a sample
    of 1 leaves ``w``.  Read from the real method, not copied from it."""
    probe = FunctionPayload(0, "", b"")
    probe.observe(0.0, 1)
    probe.observe(1.0, 1)
    return probe.mean  # type: ignore[return-value]


def run_fast(engine: Engine, source: LeanSource) -> None:
    """Run ``engine`` from time 0 over ``source`` on the fast path (see the
    module docstring; only where :func:`fast_path_applies`).

    Returns with every task finished, or — when the adaptive chunking's
    estimate falls to where it would batch tasks — with the general state
    built (:func:`_hand_over`) just before that event, for ``engine.run()``
    to go on from.  Either way the caller then calls ``engine.run()``.

    Why batches of one are all there is to mirror: with single-task batches
    the window always has room when the queue runs low
    (:func:`window_keeps_up`, a condition of :func:`fast_path_applies`),
    so a host finds the queue empty only once the input is exhausted; and
    with no failures nothing ever comes back to the queue.  So a host that
    finds nothing is idle for good, and LeanSource's refill, window and
    chunking rules reduce to the few lines below, reading the window
    (``LeanSource._window``), the refill mark (``LeanSource.low``) and the
    chunking threshold (``LeanSource.half_target``) from the same rules."""
    order = engine.order
    m = len(order)
    speeds = [engine.hosts[h].speed for h in order]      # by rank
    heap, idle = engine.heap, engine.idle
    heapreplace, heappop, heappush = heapq.heapreplace, heapq.heappop, heapq.heappush
    it, low = source.source, source.low
    host_of, start_of, end_of = source.host_of, source.start_of, source.end_of
    const = source.constant
    # duration on each host: ``work / speed`` as the general loop computes it
    dur = [const / sp for sp in speeds] if const is not None else None
    model, values, hosts = source.model, source.values, engine.hosts
    observe = source.observe
    fn = source.fn
    mean = fn.mean
    wgt = estimate_weight()
    half = source.half_target

    args: list[tuple] = []      # each fed task's arguments, by index
    cur = [-1] * m              # by rank: the task running there
    begin = [0.0] * m           # by rank: when it started
    fed = final = nxt = 0       # tasks read, finished, handed out (FIFO: in index order)
    exhausted = source.exhausted
    stamp = source.stamp
    source.materialized = False

    def read(fed: int, final: int) -> tuple[list, bool]:
        """LeanSource._refill's reading: the same number of items at the same moments."""
        fn.mean = mean
        room = source._window() - (fed - final)
        if room <= 0:
            return [], False
        if fed + room > source.capacity:
            source._grow(fed + room)
        got = list(islice(it, room))
        return got, len(got) < room

    def work_of(i: int, r: int) -> float:
        """A task's work at speed 1 from a function model (LeanSource._evaluate)."""
        w, value = model.evaluate(args[i], None, hosts[order[r]])
        if value is not None and values is not None:
            values[i] = value
        return w

    # every host asks at t=0, in rank order (Engine.start)
    t = 0.0
    for r in range(m):
        if not exhausted and fed - nxt < low:
            got, exhausted = read(fed, final)
            if got:
                args += got
                fed += len(got)
                stamp += 1
        if nxt == fed:   # (so the input is exhausted: see window_keeps_up)
            idle.extend(range(r, m))   # ranks in order: already a heap
            break
        cur[r] = nxt
        e = t + (dur[r] if dur is not None else work_of(nxt, r) / speeds[r])
        nxt += 1
        heappush(heap, (e, r))
    # refill when fewer than ``low`` are queued, i.e. when nxt > refill_at
    refill_at = fed - low if not exhausted else fed
    started = final    # events are the tasks finished here
    now = engine.now
    while heap:
        t, r = heap[0]
        s = begin[r]
        if observe:
            x = t - s if t > s else 0.0
            new = x if mean is None else mean + wgt * (x - mean)
            if new <= half:
                break   # chunking would batch from here: the general loop takes over
            mean = new
        # events come in time order: the latest is also the last result back
        now = t
        i = cur[r]
        host_of[i] = order[r]
        start_of[i] = s
        end_of[i] = t
        final += 1
        if nxt > refill_at:
            got, exhausted = read(fed, final)
            if got:
                args += got
                fed += len(got)
                stamp += 1
            refill_at = fed - low if not exhausted else fed
        if nxt < fed:
            cur[r] = nxt
            begin[r] = t
            if dur is not None:
                heapreplace(heap, (t + dur[r], r))
            else:
                heapreplace(heap, (t + work_of(nxt, r) / speeds[r], r))
            nxt += 1
        else:   # the input is exhausted (see window_keeps_up): idle for good
            heappop(heap)
            heappush(idle, r)
            cur[r] = -1

    engine.now = now
    engine.events += final - started
    fn.mean = mean
    fn.samples += final if observe else 0
    source.fed, source.final, source.exhausted = fed, final, exhausted
    source.stamp = stamp
    if now > source.last_return:
        source.last_return = now
    source.queued = fed - nxt
    source.state_of[:nxt] = [DONE_CODE] * nxt
    if heap:
        _hand_over(engine, source, args, nxt, cur, begin)


def _hand_over(engine: Engine, source: LeanSource, args: list[tuple], taken: int,
               cur: list[int], begin: list[float]) -> None:
    """Build the state the general loop would have at this point: a SimTask
    per fed task (one attempt for those handed out), the rest queued in the
    policy, a pending batch of one for each running host."""
    tasks = [SimTask(i, a) for i, a in enumerate(args)]
    for task in tasks[:taken]:
        task.attempts = 1
    const = source.constant
    pending, order = engine.pending, engine.order
    for e, r in engine.heap:
        task = tasks[cur[r]]
        source.state_of[task.index] = PENDING_CODE
        if const is not None:
            task.work = const
        batch = [task]
        pending[order[r]] = (batch, batch, begin[r], [e], True, None, "", False)
    engine.busy = len(engine.heap)
    source.tasks = tasks
    source.policy.push(tasks[taken:])
    source.materialized = True
    engine._offered = -1


def _copy_policy(policy: Any) -> Policy:
    """A fresh policy for one simulation: a name or factory is made anew; an
    instance (a Policy or a plain object with the queue methods) is
    deep-copied, so the caller's object (maybe already used) is left alone
    and every run starts from the same state."""
    if is_policy_like(policy):
        return make_policy(copy.deepcopy(policy))
    return make_policy(policy)


def seed_policy(policy: Policy, seed: Any) -> None:
    if hasattr(policy, "seed") and callable(policy.seed):
        policy.seed(f"{seed}:policy")


def simulate(fn: Callable | None, items: Iterable[Any], *, hosts: int = 1, speeds: Any = 1.0,
             availability: Any = "always", failure_rate: float = 0.0, latency: Any = 0.0,
             bandwidth: Any = None, overhead: float = 0.0, duration: Any = None,
             policy: Any = "fifo", chunksize: int | None = None, retries: int = 1, seed: Any = 0,
             star: bool = False, label: str | None = None, keep_values: bool = True,
             churn: Any = None, timeout: float | None = None) -> "Report":
    """Simulate ``fn`` over ``items`` on modelled hosts; returns a
    :class:`~pymw_magic.simulation.report.Report`.

    The one-call form of ``Master("simulator", workers=hosts, ...).map_async(fn, items)``,
    with the same options, the same engine and the same trace for the same
    seed, without Task/Job objects (so a million tasks take seconds).
    ``star=True``: each item is a tuple of arguments (like ``starmap``).
    ``fn`` may be None when ``duration`` is a model or a number.
    ``churn``: the mean lifetime (seconds) of a host before it leaves and
    a fresh one of the same speed replaces it (None: hosts stay).
    ``timeout``: virtual seconds a task may run on its host; one that runs
    longer is stopped there and fails (TaskTimeout, not retried), as on a
    real backend (None: no limit).

    Each task's result (``report.values``) is what the task function
    returned when the simulator called it (``duration`` None/"pymw" or
    "measure"); with a separate duration model the function never runs and
    the result is the task's simulated run time.
    """
    from .report import Report

    if chunksize is not None and (not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1):
        raise ValueError(f"chunksize must be a whole number >= 1 or None (automatic), not {chunksize!r}")
    if isinstance(retries, bool) or not (isinstance(retries, int) or retries == math.inf) or retries < 0:
        raise ValueError(f"retries must be a whole number >= 0 (or math.inf), not {retries!r}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0 or None, not {timeout!r}")
        timeout = float(timeout)
    platform = build_platform(hosts, speeds=speeds, availability=availability, failure_rate=failure_rate,
                              latency=latency, bandwidth=bandwidth, overhead=overhead, seed=seed, churn=churn)
    model = DurationModel(duration, fn)
    if not platform.ideal_network and fn is not None:
        # The bytes the backend sends: a notebook's (__main__) function
        # travels with its source, and the transfer time counts them.
        try:
            model.fn_bytes = FunctionCache(max_entries=1).get(fn).data  # type: ignore[attr-defined]
        except Exception:
            model.fn_bytes = b""  # type: ignore[attr-defined]
    pol = _copy_policy(policy)
    seed_policy(pol, seed)
    total = len(items) if isinstance(items, Sized) else None
    source = LeanSource(iter_args(items, star), model, pol, platform, chunksize=chunksize,
                        retries=retries, keep_values=keep_values, total=total, timeout=timeout)
    engine = Engine(platform, source, pol.host_key)
    source.engine = engine
    # Millions of small records and no reference cycles among them: the
    # cyclic collector would rescan them all, again and again, for nothing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if fast_path_applies(platform, model, pol, chunksize, timeout):
            run_fast(engine, source)
        else:
            engine.start(0.0)
        engine.run()   # the general loop: all of it, or what run_fast handed over
    finally:
        if gc_was_enabled:
            gc.enable()
    source.trim()
    values = None
    if keep_values and model.gives_value:
        values = source.values
    return Report.from_columns(
        hosts=[h.name for h in platform.hosts], speeds=[h.speed for h in platform.hosts],
        task_host=source.host_of, task_start=source.start_of, task_end=source.end_of,
        task_state=source.state_of, task_attempts=source.attempts(),
        waste=[(t.index, h, s, e, kind) for t, h, s, e, kind in engine.waste],
        final_failures=source.final_failures,
        t0=0.0, t_end=max(source.last_return, 0.0), values=values,
        label=label or pol.name,
        params=dict(hosts=hosts, speeds=speeds, availability=availability, failure_rate=failure_rate,
                    latency=latency, bandwidth=bandwidth, overhead=overhead, duration=model.label,
                    policy=pol.name, chunksize=chunksize, retries=retries, seed=seed,
                    churn=platform.churn, timeout=timeout),
        note=source.give_up_reason)
