"""The scheduler: the master's book-keeping of tasks, shared by every backend.

::

    Master.submit / map_async ──▶ Job (lazy input) ──feed──▶ policy queue
                                                             │ take(worker)
                                                             ▼
      backend thread per worker ◀──────────── Batch ─────────┘
            │  sent ahead (tasks stay PENDING, ``dispatched``), then
            │  start(batch) when the worker gets to it ──▶ tasks RUNNING
            ├── completed(batch, reply) ──▶ tasks DONE / FAILED, futures set,
            │                                estimates updated, job finished?
            └── lost(batches, culprit)  ──▶ culprit RETRYING or FAILED,
                                             the others back to PENDING
                       all of it ──▶ EventBus (one event per batch and state)

Who does what:

* the **Scheduler** (this module) owns the queue (through the policy), the
  feeding of jobs' lazy input within a bounded window, every task state
  change, retries, timeouts' verdicts, cancellation, and publishing events;
  all of it under one lock (``cond``).  Jobs and the map iterator wait on
  ``cond``; serving threads wait on a condition of their own over the same
  lock, so that a new task wakes a thread that can run it.
* **user code runs outside the lock**: the input iterables of jobs (read
  by :meth:`feed`, one thread per job at a time), Futures' results and
  their done-callbacks, job done-callbacks and event observers.  The
  policy is the exception: it *is* the queue, so its ``push``/``pop`` run
  under the lock (a policy must be quick, as the built-in ones are);
* a **backend** owns workers and moves batches: it declares what it gives
  the scheduler once (:class:`SchedulerHooks`: stop workers, skip tasks of
  a batch sent ahead, shared fate, a clock, a queue wrapper), then calls
  :meth:`take`, :meth:`start`, :meth:`completed`, :meth:`lost` and the
  other public methods; it sets nothing on the scheduler.  Pool backends
  (local, MPI), the simulator and batch backends use the same interface;
* the **Master** creates jobs and tasks and hands them over.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from . import rules
from .errors import PolicyFailed, RemoteTraceback, ShutDownError, TaskFailed, TaskTimeout, WorkerLost
from .events import EventBus, JobChanged, TasksChanged
from .payload import loads
from .policies import FIFO, Chunking, Policy, PolicyTaskError
from .task import CANCELLED, DONE, FAILED, FINAL_STATES, PENDING, RETRYING, RUNNING, Task, TaskState, move_all

if TYPE_CHECKING:
    from .job import Job


#: uncharged requeues after which a task is failed anyway (rules.MAX_REQUEUES)
MAX_REQUEUES = rules.MAX_REQUEUES


class Batch:
    """Tasks handed to one worker at once."""

    __slots__ = ("id", "tasks", "worker", "single_job", "has_futures", "exclusive", "started",
                 "sent", "send_error", "fresh", "ahead")

    def __init__(self, id: int, tasks: list[Task], worker: str, single_job: bool, has_futures: bool):
        self.id = id
        self.tasks = tasks
        self.worker = worker
        # One job means one function, and no keyword arguments unless the
        # job came from submit(): the transport can send both once.
        self.single_job = single_job
        self.has_futures = has_futures
        self.exclusive = False
        # False while it waits at its worker behind another batch
        self.started = False
        # Sent already by the thread that queued its task (see
        # SchedulerHooks.dispatch); what that send raised, if it failed.
        self.sent = False
        self.send_error: BaseException | None = None
        # The scheduler's epoch when its tasks were last seen all PENDING
        # (at the pop) or all RUNNING (at the start) and of one job; None:
        # not so.  While the epoch has not moved since, nothing but the
        # batch's own progress has touched them (see Scheduler._epoch), so
        # start and completion skip a check per task.
        self.fresh: int | None = None
        self.ahead = False  # sent ahead: its tasks point to it until it starts


def rebuild_error(failure: Sequence[Any], task: Task) -> BaseException:
    """A worker's failure record as the exception the master raises."""
    data, tname, message, tb = failure
    exc: BaseException | None = None
    if data is not None:
        try:
            exc = loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = TaskFailed(f"{tname}: {message}" if message else tname)
    exc.__cause__ = RemoteTraceback(tb)
    task.remote_traceback = tb
    _annotate(exc, task)
    return exc


def _annotate(exc: BaseException, task: Task) -> None:
    try:
        exc.pymw_task = task  # type: ignore[attr-defined]
    except Exception:
        pass
    job = f" of job {task.job.name!r}" if task.job is not None else ""
    note = f"pymw: task {task.index}{job} failed on input ({task.describe_input()})"
    if task.worker:
        note += f" on worker {task.worker}"
    if hasattr(exc, "add_note") and note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


@dataclass
class SchedulerHooks:
    """What a backend gives the scheduler, once, through :meth:`Scheduler.connect`.

    Every field is optional: a backend declares only what it has.
    """
    #: stop these workers now (a task running there was cancelled)
    stop_workers: Callable[[set[str]], None] | None = None
    #: tell a worker to skip these tasks of a batch sent ahead to it
    skip_tasks: Callable[[str, Batch, list[int]], None] | None = None
    #: its workers die together (an MPI job under MPICH): a task under
    #: suspicion then runs with nothing beside it, so that blame is certain
    shared_fate: bool = False
    #: the clock of task and job stamps and events (a simulator's virtual one)
    clock: Callable[[], float] | None = None
    #: wraps the policy as the queue the scheduler pushes to and pops from
    #: (a simulator's admission of jobs at their virtual arrival)
    queue: Callable[[Policy], Any] | None = None
    #: send ``batch`` to ``worker`` now, on the calling thread: a task
    #: submitted while a worker idles goes out from ``submit()`` itself,
    #: without waiting for the worker's serving thread to wake up (it takes
    #: the batch over from :meth:`Scheduler.take`, marked ``sent``).
    #: Returns False if nothing of it was left to send (all rejected).
    dispatch: Callable[[str, Batch], bool] | None = None
    #: wait for ``task``'s result on the calling thread (a caller in
    #: ``Future.result()``), reading its worker's replies there itself when
    #: it can; returns when the task may be done, at the timeout, or when
    #: it leaves the reading to the serving thread (see :meth:`Scheduler.wait_reply`)
    read_reply: Callable[[Task, float | None], None] | None = None


class Scheduler:
    """Task states, the queue and the feeding of jobs, under one lock.

    Backends use :meth:`connect` (once), :meth:`worker_started`,
    :meth:`take`, :meth:`start`, :meth:`completed`, :meth:`ran`, :meth:`lost`,
    :meth:`split`, :meth:`discard`, :meth:`reject`, :meth:`give_up`,
    :meth:`wait_for_work`, :meth:`forget_worker` and :meth:`close`;
    nothing else.
    """

    def __init__(self, policy: Policy, events: EventBus, workers: int):
        # Reentrant: a policy of the user's runs under it and may call back.
        self.cond = threading.Condition(threading.RLock())
        # Serving threads wait here, not on ``cond`` (where jobs and the map
        # iterator wait), so that a new task wakes a thread that can run it.
        self._work = threading.Condition(self.cond._lock)  # type: ignore[attr-defined]
        # Each worker's serving thread waits on a condition of its own (same
        # lock): a batch sent for one worker wakes that thread alone.
        self._wake: dict[str, threading.Condition] = {}
        self.policy = policy
        self.events = events
        #: settled by the backend before the scheduler is made; never changes
        self.workers = workers
        # A policy may want the worker count (static round-robin): told once.
        attach = getattr(policy, "attach", None)
        if attach is not None:
            attach(workers)
        self.chunking = Chunking()
        self.closed = False
        self.stopper: Callable[[set[str]], None] | None = None
        self.dropper: Callable[[str, Batch, list[int]], None] | None = None
        self.dispatcher: Callable[[str, Batch], bool] | None = None
        self.reader: Callable[[Task, float | None], None] | None = None
        # Workers whose next batch a submitting thread is sending now, and
        # the batches so sent that their serving threads have not taken yet.
        self._claimed: set[str] = set()
        self._handed: dict[str, Batch] = {}
        # Workers whose handed batch's reply a caller reads (claim_reply).
        self._reading: set[str] = set()
        #: worker name -> its host, from the backend (each task records it)
        self.worker_hosts: dict[str, str] = {}
        #: the clock of task and job stamps and events
        self.clock: Callable[[], float] = time.time
        self.tasks_per_worker: Counter[str] = Counter()
        self._feeders: list[Job] = []
        #: unfinished jobs (held here strongly: their caller may have let go)
        self._active: dict[int, Job] = {}
        self._batch_ids = itertools.count(1)
        self._finished_jobs: list[Job] = []
        self._settle: list[tuple[Future, bool, Any]] = []  # futures to set once the lock is released
        self.shared_fate = False
        self._in_flight = 0       # batches handed out and not yet reported
        self._push_failed: list[Task] = []  # refused by the policy; published with the jobs
        #: set by :meth:`give_up`: every task queued from then on fails with
        #: it at once, rather than wait for ever
        self.broken: BaseException | None = None
        self._exclusive = False   # a suspect task is out, alone
        self._waiting: set[str] = set()  # workers blocked in take(): told to policies that ask
        #: workers that said they are ready: until all have, nothing is sent
        #: ahead (a worker still starting would find the work taken)
        self._started: set[str] = set()
        #: worker -> the mean call length of the batch it runs (None: unknown)
        self._in_hand: dict[str, float | None] = {}
        self._wants_idle = bool(getattr(policy, "wants_idle_workers", False))
        # Moves on every change of a task's state that is not a batch's own
        # progress (cancel, reject, lost, split, a policy's failure, close,
        # a cancelled Future):
        # a batch whose tasks were uniform at this epoch still is (Batch.fresh).
        self._epoch = 0
        # True while the queue may hold a task to run alone (``isolate``) or
        # one of no job: until then, with one job active and none of its
        # tasks RETRYING, every queued task is a PENDING one of that job
        # and a popped batch needs no look at each task (see _select).
        self._irregular = False
        # True while a task that ended (cancelled, failed) may still sit in
        # the queue: until then a FIFO queue's batch is popped unchecked.
        self._ended_queued = False
        # Marks the threads that serve workers (they call take()): user code
        # run there (a done-callback) must not wait for the work they do.
        self._serving = threading.local()

    # --- the backend connects once ----------------------------------------
    def connect(self, hooks: SchedulerHooks) -> None:
        """Take what the backend declares (before any job is added)."""
        with self.cond:
            self.stopper = hooks.stop_workers
            self.dropper = hooks.skip_tasks
            self.dispatcher = hooks.dispatch
            self.reader = hooks.read_reply
            self.shared_fate = hooks.shared_fate
            if hooks.clock is not None:
                self.clock = hooks.clock
            if hooks.queue is not None:
                self.policy = hooks.queue(self.policy)

    def worker_started(self, name: str, host: str | None) -> None:
        """A worker is ready; ``host`` is recorded on the tasks it runs."""
        with self.cond:
            self._started.add(name)
            if host:
                self.worker_hosts[name] = host

    def forget_worker(self, name: str) -> None:
        """``name`` will never ask for work again (a batch backend's chunk
        has ended): drop it from every per-worker map, so that a job of
        thousands of chunks, each under a fresh name, leaves them at a
        constant size.  The tasks it ran stay counted in
        :attr:`tasks_per_worker`, under its host (or ``"(forgotten)"``).

        Idempotent; a name never seen is ignored.  A worker still blocked in
        :meth:`take`, or whose batch a submitting thread is sending, keeps
        what that wait needs (it is not gone yet)."""
        with self.cond:
            self._started.discard(name)
            host = self.worker_hosts.pop(name, None)
            self._in_hand.pop(name, None)
            ran = self.tasks_per_worker.pop(name, 0)
            if ran:
                self.tasks_per_worker[host or "(forgotten)"] += ran
            if name not in self._waiting and name not in self._claimed and name not in self._handed \
                    and name not in self._reading:
                self._wake.pop(name, None)
            forget = getattr(self.policy, "forget_worker", None)
        if forget is not None:
            try:
                forget(name)
            except Exception:
                pass  # a policy's own book-keeping: never the backend's failure

    def give_up(self, error: BaseException) -> None:
        """The backend's workers cannot start at all: fail what is queued,
        and every task queued from now on, with ``error`` (one copy each)."""
        with self.cond:
            self.broken = error
        while True:
            batch = self.take("(none)", block=False)
            if batch is None:
                break
            self.reject([(t, type(error)(*error.args)) for t in batch.tasks])

    def wait_for_work(self, timeout: float | None) -> None:
        """Block a serving thread until tasks may be waiting (or ``timeout``)."""
        with self.cond:
            if not self.closed:
                self._work.wait(timeout)

    def on_serving_thread(self) -> bool:
        """True on a thread that serves workers (where done-callbacks and
        observers may run): waiting there for tasks to end could wait for
        ever, since the thread itself has to run them."""
        return getattr(self._serving, "here", False)

    def holds_lock(self) -> bool:
        """True on a thread inside the scheduler's lock.  A finalizer run by
        the cyclic garbage collector can land there, in the middle of an
        update: what it would change must wait until the lock is let go."""
        return self.cond._is_owned()  # type: ignore[attr-defined]

    def _notify_all(self) -> None:
        """Under the lock: wake every waiter, jobs and serving threads."""
        self.cond.notify_all()
        self._work.notify_all()
        for wake in self._wake.values():
            wake.notify_all()

    def _wake_one(self) -> None:
        """Under the lock: wake one serving thread that waits for work (it
        is no longer counted as waiting, so the next call wakes another)."""
        self._work.notify()
        for worker in self._waiting:
            if worker not in self._claimed and worker not in self._reading:
                self._waiting.discard(worker)
                self._wake[worker].notify()
                return

    # --- jobs hand their tasks over -------------------------------------
    def add_job(self, job: Job) -> None:
        """Register ``job``; its input is read by :meth:`feed` (which the
        caller calls outside its own locks, and serving threads call as
        they need tasks)."""
        with self.cond:
            if self.closed:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            self._feeders.append(job)
            self._active[job.id] = job
        if self.events:
            self.events.emit(JobChanged(job, "submitted", self.clock()))

    def active_jobs(self) -> list[Job]:
        """The jobs not finished yet, oldest first."""
        with self.cond:
            return list(self._active.values())

    def wait_handed_out(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until no task is queued and no
        job's input waits to be read: what was submitted is in a worker's
        hands (or beyond its job's window, as the window wants).  True when
        it is.  A batch master that lets go of its jobs waits for this, so a
        job submitted just before still reaches its engine."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.policy) or self._input_wanted():
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return False
                # (a short wait: takes do not notify this condition)
                self.cond.wait(min(left, 0.02))
            return True

    def add_task(self, task: Task) -> None:
        """Queue a task made by ``submit()`` (its job is open-ended)."""
        with self.cond:
            if self.closed:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            job = task.job
            if job is not None:
                job._append(task)
                self._active[job.id] = job
            else:
                self._irregular = True
            self._push_failed += self._push([task])
            direct = None
            if not self._push_failed and self.dispatcher is not None:
                direct = self._claim_idle()
            # One new task wakes one serving thread (all of them would fight
            # for it); a refused one wakes whoever waits for its job.
            if self._push_failed:
                self._notify_all()
            elif direct is None or direct[1] is None:
                self._wake_one()
            finished_jobs = self._take_finished()
        if direct is not None:
            worker, batch, changed = direct
            if batch is not None:
                self._dispatch(worker, batch, changed)
            elif self.events.tasks:
                self._publish(changed, CANCELLED)
        self._publish_jobs(finished_jobs)

    def wait_reply(self, task: Task, timeout: float | None) -> None:
        """Wait a while for ``task`` on the calling thread: the backend may
        read its worker's reply here (one wake-up less than a serving
        thread reading it and then waking the caller).  Returns when the
        task may be done or when the caller should wait on its Future as
        usual; never on a serving thread (it has replies of its own to read)."""
        reader = self.reader
        if reader is None or task.state is not RUNNING or self.on_serving_thread():
            return
        reader(task, timeout)

    def claim_reply(self, task: Task) -> Batch | None:
        """The batch holding ``task`` that a submitting thread sent and the
        worker's serving thread has not taken over, now claimed for the
        calling thread to read its reply (the serving thread leaves it
        alone until :meth:`release_reply`); None if there is none."""
        with self.cond:
            worker = task.worker
            batch = self._handed.get(worker) if worker is not None and self._handed else None
            if batch is None or worker in self._reading or batch.send_error is not None \
                    or not any(t is task for t in batch.tasks):
                return None
            self._reading.add(worker)
        # The caller now reports replies as a serving thread does: user code
        # run there (a done-callback) must not wait for the work it holds up.
        self._serving.here = True
        return batch

    def release_reply(self, batch: Batch, answered: bool) -> None:
        """The claim of :meth:`claim_reply` ends.  ``answered``: the caller
        reported the reply (the worker idles again, its serving thread
        need not wake unless there is work); otherwise the serving thread
        takes the batch over."""
        worker = batch.worker
        self._serving.here = False
        with self.cond:
            self._reading.discard(worker)
            wake = self._wake.get(worker)
            if answered:
                if self._handed.get(worker) is batch:
                    del self._handed[worker]
                if wake is not None and (self.closed or self._feeders or len(self.policy)):
                    wake.notify()
            elif wake is not None:
                wake.notify()

    def _claim_idle(self) -> tuple[str, Batch | None, list[Task]] | None:
        """Under the lock: a batch for a worker that idles in :meth:`take`,
        claimed for the calling thread to send (:meth:`_dispatch`), or None."""
        if self.closed or self._exclusive or len(self._started) < self.workers:
            return None
        for worker in self._waiting:
            if worker not in self._claimed and worker not in self._handed:
                break
        else:
            return None
        changed: list[Task] = []
        batch = self._select(worker, True, changed)
        if batch is not None:
            self._claimed.add(worker)
        return worker, batch, changed

    def _dispatch(self, worker: str, batch: Batch, changed: list[Task]) -> None:
        """Send a claimed batch on this thread, then hand it to the
        worker's serving thread (which goes on to read the reply)."""
        interrupted: BaseException | None = None
        try:
            sent = self.dispatcher(worker, batch)  # type: ignore[misc]
        except Exception as exc:   # the serving thread reports it as its own
            batch.send_error = exc
            sent = True
        except BaseException as exc:  # an interrupt mid-send: the channel is out of step
            batch.send_error = RuntimeError(f"sending the batch was interrupted ({type(exc).__name__})")
            sent, interrupted = True, exc
        with self.cond:
            self._claimed.discard(worker)
            if sent:
                batch.sent = True
                self._handed[worker] = batch
            wake = self._wake.get(worker)
            if wake is not None:
                wake.notify()
        if not sent:
            self.discard(batch)   # every task of it was rejected (and failed)
        if self.events.tasks:
            self._publish(changed, CANCELLED)
            if sent:
                self._publish(batch.tasks, RUNNING, _job_of(batch))
        if interrupted is not None:
            raise interrupted

    def _push(self, tasks: list[Task]) -> list[Task]:
        """Queue ``tasks`` through the policy.  Under the lock.  A task the
        policy refuses (its duration estimate raised, say) fails alone with
        the policy's error, rather than leave its job waiting for ever;
        returns those."""
        failed: list[Task] = []
        later: list[Task] = []   # failed by a nested _push (already accounted)
        if self.broken is not None:
            for task in tasks:  # (one exception each: each gets its own note)
                self._fail(task, type(self.broken)(*self.broken.args), failed)
        else:
            try:
                self.policy.push(tasks)
            except PolicyTaskError as exc:  # all or nothing, and it names the culprits
                for task, error in exc.failures:
                    self._fail(task, error, failed)
                if exc.accepted:
                    later = self._push(exc.accepted)
            except Exception:
                # A policy of the user's: which task it choked on is unknown,
                # so one by one (its push must queue nothing when it raises).
                for task in tasks:
                    try:
                        self.policy.push((task,))
                    except Exception as error:
                        self._fail(task, error, failed)
        self._after_final(failed)
        return failed + later

    def _input_wanted(self) -> bool:
        """Under the lock: some job's input should be read (its window has
        room and nobody is reading it now)."""
        return any(not job._reading and not job._exhausted and job._window(self) > job._in_window()
                   for job in self._feeders)

    def feed(self) -> None:
        """Read more input of the jobs whose window has room.

        The reading (the user's iterable or generator) happens outside the
        lock, so a slow generator stalls no other worker; a job is read by
        one thread at a time.  Call it without holding ``cond``.
        """
        if not self._feeders:  # (a racy peek: the common case costs no lock)
            return
        with self.cond:
            claims = []
            for job in self._feeders:
                if job._reading or job._exhausted:
                    continue
                room = job._window(self) - job._in_window()
                if room > 0:
                    job._reading = True
                    claims.append((job, room))
        if not claims:
            return
        reads = []
        try:
            for job, room in claims:
                reads.append((job, room, job._read(room)))
        finally:
            with self.cond:
                for job, room, (items, error) in reads:
                    tasks = job._accept(items, room, error)
                    if tasks:
                        self._push_failed += self._push(tasks)
                for job, _ in claims:
                    job._reading = False
                    if job._exhausted and job in self._feeders:
                        self._feeders.remove(job)
                        job._check_finished(self)
                finished_jobs = self._take_finished()
                self._notify_all()
        self._publish_jobs(finished_jobs)

    def kick(self) -> None:
        """A consumer made room (the map iterator yielded results)."""
        self.feed()

    # --- backends take work and report back ------------------------------
    def take(self, worker: str, block: bool = True, timeout: float | None = None,
             start: bool = True) -> Batch | None:
        """The next batch for ``worker``; None when closed (or nothing and not
        ``block``).  ``start=False``: the batch is sent ahead, behind one the
        worker is still running; its tasks stay pending (``dispatched``)
        until :meth:`start` (or :meth:`completed` of the batch before it)."""
        self._serving.here = True
        changed: list[Task] = []  # submitted tasks whose Future was cancelled
        batch: Batch | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ended: _Ended | None = None
            with self.cond:
                handed = self._handed.pop(worker, None) \
                    if self._handed and worker not in self._reading else None
                if handed is not None:   # sent for us by a submitting thread
                    batch = handed
                    finished_jobs = self._take_finished()
                    break
                read = not self.closed and self._input_first()
                if not read:
                    # (a submitting thread sends its batch now, or a caller
                    # reads the reply of the one it sent)
                    claimed = worker in self._claimed or worker in self._reading
                    if not self.closed and not claimed:
                        batch = self._select(worker, start, changed)
                    left = None if deadline is None else deadline - time.monotonic()
                    if (self.closed and not claimed) or batch is not None or not block \
                            or (left is not None and left <= 0):
                        finished_jobs = self._take_finished()
                        break
                    if self._push_failed or self._settle:
                        # (the policy failed the queue: say so before waiting on)
                        ended = self._take_finished()
                    elif self._wants_idle and self.policy.reserved_workers():
                        self._notify_all()  # it set a task aside for another free worker
                    if ended is None and not self._input_first():
                        self._waiting.add(worker)
                        wake = self._wake.get(worker)
                        if wake is None:
                            wake = self._wake[worker] = threading.Condition(self.cond._lock)  # type: ignore[attr-defined]
                        try:
                            wake.wait(left)
                        finally:
                            self._waiting.discard(worker)
            if ended is not None:
                self._publish_jobs(ended)
            elif read:
                self.feed()  # outside the lock: the input is the user's code
        if self.events.tasks and (batch is None or not batch.sent):
            self._publish(changed, CANCELLED)
            if batch is not None and start:
                self._publish(batch.tasks, RUNNING, _job_of(batch))
        self._publish_jobs(finished_jobs)
        return batch

    def _input_first(self) -> bool:
        """Under the lock: the queue runs short and some job's input should
        be read before taking from it."""
        return len(self.policy) < rules.refill_below(self.workers) and self._input_wanted()

    def _select(self, worker: str, start: bool, changed: list[Task]) -> Batch | None:
        """Under the lock: pop the next batch for ``worker`` from the queue,
        or None.  Tasks whose Future was cancelled are moved to CANCELLED
        and appended to ``changed``."""
        policy = self.policy
        if isinstance(self.broken, PolicyFailed):
            return None  # (its queue cannot be read: what it held has failed)
        if self._wants_idle:  # PyMW's scheduler_func(tasks, workers) picks among the free
            policy.idle_workers(sorted(self._waiting | {worker}))
        while True:
            if not start and not rules.send_ahead(
                    self.chunking, self._in_hand.get(worker),
                    bool(self._waiting - {worker}) or len(self._started) < self.workers):
                return None  # an idle or starting worker takes it instead, or it would wait long
            try:
                tasks = policy.pop(worker, 1)
            except Exception as exc:  # the user's policy: its queue cannot be read any more
                self._policy_failed(exc)
                return None
            if not tasks:
                if (self._irregular or self._ended_queued) and not len(policy):
                    # (nothing queued: none such left in it)
                    self._irregular = self._ended_queued = False
                return None
            if self.shared_fate and (self._exclusive or (tasks[0].isolate and self._in_flight)):
                # A suspect task runs alone on a shared-fate backend, so
                # that if it takes the workers down again, it is the one
                # to blame.
                policy.push_front(tasks)
                return None
            first = tasks[0]
            if not first.isolate:
                tasks += self._chunk(worker, first)
            job0 = first.job
            mixed = loners = False
            pending = True
            if job0 is None or self._irregular or len(self._active) != 1 or job0._counts[RETRYING] \
                    or job0.id not in self._active:   # (a task of an ended job came back)
                for t in tasks:   # (a plain loop: the hot path of thousands of tiny tasks)
                    if t.job is not job0:
                        mixed = True
                    if t.state is not PENDING:
                        pending = False
                    if t.isolate:
                        loners = True
            # else every queued task is a PENDING one of job0 (the only job
            # not finished), none to run alone: nothing to look at per task
            if loners and len(tasks) > 1:
                # Suspects run alone: back to the front of the queue.
                policy.push_front([t for t in tasks[1:] if t.isolate])
                tasks = [first] + [t for t in tasks[1:] if not t.isolate]
                mixed = any(t.job is not job0 for t in tasks)
                pending = all(t.state is PENDING for t in tasks)
            has_futures = mixed or first.future is not None
            if has_futures:
                tasks = self._honour_cancelled_futures(tasks, changed)
                if not tasks:
                    continue
            batch = Batch(next(self._batch_ids), tasks, worker, not mixed, has_futures)
            if pending and not mixed:
                batch.fresh = self._epoch
            if start:
                self._start(batch)
            else:
                batch.ahead = True
                for t in tasks:
                    t.worker = worker
                    t.batch = batch
            self._in_flight += 1
            if self.shared_fate and first.isolate:
                self._exclusive = batch.exclusive = True
            return batch

    def _chunk(self, worker: str, first: Task) -> list[Task]:
        """Under the lock: the tasks that go with ``first`` in one batch."""
        policy = self.policy
        job = first.job
        fixed = job.chunksize if job is not None else None
        n = rules.batch_size(self.chunking, first.fn, fixed, len(policy) + 1, self.workers, first.isolate)
        if n <= 1:
            return []
        if not self._ended_queued and type(policy) is FIFO:
            return policy.pop_live(n - 1)
        # (tasks to run alone among them are sent back by the caller, which
        # looks at each task once anyway)
        return policy.pop(worker, n - 1)

    def _honour_cancelled_futures(self, tasks: list[Task], changed: list[Task]) -> list[Task]:
        """Under the lock: submitted tasks whose Future was cancelled go to
        CANCELLED; the others' Futures are marked running."""
        live = []
        cancelled = []
        for t in tasks:
            # (a retried task's Future is running already)
            if t.future is not None and not t.future.running() \
                    and not t.future.set_running_or_notify_cancel():
                t.to(CANCELLED)
                cancelled.append(t)
            else:
                live.append(t)
        if cancelled:
            self._epoch += 1
            changed += cancelled
            self._after_final(cancelled)
            self.cond.notify_all()  # a job may have ended here
        return live

    def start(self, batch: Batch) -> None:
        """The worker got to ``batch`` (it was sent ahead): its tasks run now."""
        with self.cond:
            started = self._start(batch)
        if self.events.tasks:
            self._publish(started, RUNNING, _job_of(batch))

    def _start(self, batch: Batch) -> list[Task]:
        """Under the lock: the batch's live tasks to RUNNING, charged an
        attempt and stamped; those cancelled while it waited stay so."""
        if batch.started:
            return []
        batch.started = True
        # (what a batch sent ahead to this worker would wait behind)
        self._in_hand[batch.worker] = batch.tasks[0].fn.mean
        now = self.clock()
        worker = batch.worker
        host = self.worker_hosts.get(worker)
        tasks = batch.tasks
        job = tasks[0].job
        fresh = batch.fresh is not None and batch.fresh == self._epoch
        if not fresh:
            for t in tasks:   # (a plain loop: the hot path of thousands of tiny tasks)
                if t.state is not PENDING or t.job is not job:
                    break
            else:
                fresh = True
        if fresh:
            # One job, all pending: the common case, in one pass.
            if batch.ahead:
                for t in tasks:
                    t.state = RUNNING
                    t.batch = None
                    t.attempts += 1
                    t.started = now
                    t.host = host
            else:
                for t in tasks:
                    t.state = RUNNING
                    t.worker = worker
                    t.attempts += 1
                    t.started = now
                    t.host = host
            if job is not None:
                counts = job._counts
                counts[PENDING] -= len(tasks)
                counts[RUNNING] += len(tasks)
            batch.fresh = self._epoch   # (now: all RUNNING, one job)
            return tasks
        batch.fresh = None
        live = [t for t in tasks if t.state is PENDING or t.state is RETRYING]
        move_all(live, RUNNING)
        for t in live:
            t.worker = worker
            t.batch = None
            t.attempts += 1
            t.started = now
            t.host = host
        return live

    def completed(self, batch: Batch, t_start: float, ends: Sequence[float], values: Sequence[Any],
                  failures: dict[int, Any], outputs: dict[int, tuple[str, str]],
                  then: Batch | None = None) -> None:
        """A worker finished ``batch``: results, errors, timings and output.
        ``then``: the batch sent ahead to that worker, which it runs now."""
        done: list[Task] = []
        failed: list[Task] = []
        started: list[Task] = []
        tasks = batch.tasks
        with self.cond:
            self._returned(batch)
            self._start(batch)  # (a no-op unless the backend never said it started)
            if then is not None:
                started = self._start(then)
            job = tasks[0].job
            uniform = not failures
            if uniform and batch.fresh != self._epoch:  # (fresh: all RUNNING, one job, unchecked)
                for t in tasks:
                    if t.state is not RUNNING or t.job is not job:
                        uniform = False
                        break
            if uniform:
                # The hot path: a whole batch of one job's successes, in one pass.
                prev = t_start
                for task, value, end in zip(tasks, values, ends):
                    task.started = prev
                    task.finished = prev = end
                    task.result = value
                    task.state = DONE
                if job is not None:
                    counts = job._counts
                    counts[RUNNING] -= len(tasks)
                    counts[DONE] += len(tasks)
                done = tasks
            elif not failures and all(t.state is RUNNING for t in tasks):
                # A whole batch of successes of several jobs.
                prev = t_start
                for task, value, end in zip(tasks, values, ends):
                    task.started = prev
                    task.finished = prev = end
                    task.result = value
                move_all(tasks, DONE)
                done = tasks
            if done is tasks and batch.has_futures:
                for task in tasks:
                    if task.future is not None:
                        self._settle.append((task.future, True, task.result))
            if done is not tasks:
                prev = t_start
                for i, task in enumerate(tasks):
                    end = ends[i]
                    if task.state is not RUNNING:  # cancelled while it ran
                        prev = end
                        continue
                    task.started = prev
                    task.finished = prev = end
                    if i in failures:
                        exc = rebuild_error(failures[i], task)
                        task.error = exc
                        task.to(FAILED)
                        failed.append(task)
                        if task.future is not None:
                            self._settle.append((task.future, False, exc))
                    else:
                        task.result = values[i]
                        task.to(DONE)
                        done.append(task)
                        if task.future is not None:
                            self._settle.append((task.future, True, task.result))
            for i, (out, err) in outputs.items():
                tasks[i].stdout, tasks[i].stderr = out, err
            n = len(tasks)
            ran = len(done) + len(failed)
            if batch.single_job and ends and ran == n:  # (skipped tasks would skew the estimate)
                tasks[0].fn.observe(max(ends[-1] - t_start, 0.0) / n, n)
            self.tasks_per_worker[batch.worker] += ran
            if done is tasks and batch.single_job and job is not None:
                job._on_final(tasks, self)   # (one job: no grouping by job)
            else:
                self._after_final(done + failed if failed else done)
            finished_jobs = self._take_finished()
            if batch.exclusive or self.closed or self._feeders or self._wants_idle or len(self.policy):
                self._notify_all()
            else:
                # Nothing queued: idle serving threads would only wake to
                # wait again (and one woken could take over the batch a
                # submitter sent before its caller reads the reply).
                self.cond.notify_all()
        self._settle_futures(finished_jobs)
        if self.events.tasks:
            self._publish(done, DONE, job if done is tasks and batch.single_job else None)
            self._publish(failed, FAILED)
            self._publish(started, RUNNING, _job_of(then))
        self._publish_jobs(finished_jobs)
        self.feed()  # the window moved: read on (outside the lock)

    def ran(self, runs: Sequence[tuple[str, list[Task], float, Sequence[float], Sequence[Any]]],
            mean: float | None = None) -> None:
        """Tasks a backend took from the queue itself and ran to the end (a
        simulator that computed a stretch of virtual time at once): for each
        ``(worker, tasks, t_start, ends, values)``, ``tasks`` ran back to
        back on ``worker`` from ``t_start``, task k ending at ``ends[k]``
        with result ``values[k]``.  Each is charged its attempt, stamped and
        DONE, as :meth:`take` + :meth:`completed` of one batch per run would
        do, under one lock, with one event per job and state.  Tasks no
        longer pending (cancelled meanwhile) are left as they are; tasks
        with a Future are not for this method (map jobs' tasks have none).
        The duration estimate is the backend's to keep (it saw each task):
        ``mean`` (seconds per call) becomes the function's, and the tasks
        that ran its samples, under the lock, before any waiter wakes."""
        with self.cond:
            hosts = self.worker_hosts
            per_worker = self.tasks_per_worker
            done: list[Task] = []
            job = runs[0][1][0].job if runs and runs[0][1] else None
            one_job = True
            for worker, tasks, t_start, ends, values in runs:
                host = hosts.get(worker)
                prev = t_start
                n = len(done)
                for task, value, end in zip(tasks, values, ends):
                    if task.state is PENDING:
                        task.worker = worker
                        task.host = host
                        task.attempts += 1
                        task.started = prev
                        task.finished = end
                        task.result = value
                        if task.job is not job:
                            one_job = False
                        done.append(task)
                    prev = end
                per_worker[worker] += len(done) - n
            if mean is not None and done:
                fn = done[0].fn
                fn.mean = mean
                fn.samples += len(done)
            if one_job and job is not None:
                # The common case (a simulator's lane runs one job): PENDING
                # to DONE through RUNNING, counted once.
                for task in done:
                    task.state = DONE
                counts = job._counts
                counts[PENDING] -= len(done)
                counts[DONE] += len(done)
                if done:
                    job._on_final(done, self)
            else:
                move_all(done, RUNNING)
                move_all(done, DONE)
                self._after_final(done)
            finished_jobs = self._take_finished()
            self._notify_all()
        self._settle_futures(finished_jobs)
        if self.events.tasks:
            self._publish(done, RUNNING, job if one_job else None)
            self._publish(done, DONE, job if one_job else None)
        self._publish_jobs(finished_jobs)
        self.feed()  # the window moved: read on (outside the lock)

    def lost(self, batches: Iterable[Batch], culprit: int | None, reason: str, detail: str = "") -> None:
        """A worker went away with ``batches`` in hand.

        ``culprit`` is the id of the task it was running (from its slot), or
        None if unknown.  ``reason``: "died" (charge the culprit an attempt),
        "timeout" (the culprit ran too long) or "stopped" (we killed it on
        purpose: charge nobody).
        """
        requeued: list[Task] = []
        retrying: list[Task] = []
        failed: list[Task] = []
        with self.cond:
            self._epoch += 1
            self._irregular = True  # (tasks to run alone may go back to the queue)
            for batch in batches:
                self._returned(batch)
                several = len(batch.tasks) > 1 or self.shared_fate
                for task in batch.tasks:
                    if task.batch is batch:
                        # Sent ahead and never started: back to the queue as it was.
                        task.batch = None
                        if task.state is PENDING or task.state is RETRYING:
                            requeued.append(task)
                        continue
                    if task.state is not RUNNING:
                        continue
                    fate, isolate = rules.lost_task(
                        culprit=task.id == culprit, reason=reason, attempts=task.attempts,
                        retries=self._retries(task), requeues=task.requeues,
                        culprit_known=culprit is not None, several=several)
                    if fate == rules.TIMED_OUT:
                        limit = task.job.timeout if task.job is not None else None
                        self._fail(task, TaskTimeout(
                            f"task {task.index} ran longer than its timeout of {limit} s "
                            f"on worker {task.worker} and was stopped"), failed)
                    elif fate == rules.RETRY:
                        task.to(RETRYING)
                        task.isolate = isolate
                        retrying.append(task)
                    elif fate == rules.FAIL:
                        self._fail(task, WorkerLost(
                            f"worker {task.worker} died while running task {task.index} "
                            f"({detail or 'no exit status'}); attempts: {task.attempts}, "
                            f"retries allowed: {self._retries(task)}"), failed)
                    elif fate == rules.PRESUMED:
                        # Never blamed, yet always there when workers die:
                        # fail it rather than loop for ever.
                        self._fail(task, WorkerLost(
                            f"task {task.index} was in hand each of the {task.requeues + 1} times "
                            f"a worker died ({detail or 'no exit status'}); it is presumed to "
                            "be the cause"), failed)
                    else:
                        # Never started (or not to blame): no attempt charged.
                        task.requeues += 1
                        task.attempts -= 1
                        task.to(PENDING)
                        if isolate:
                            task.isolate = True
                        requeued.append(task)
            if self.closed:
                # Nobody will take them again: they fail rather than wait for ever.
                for task in retrying + requeued:
                    self._fail(task, self._shut_down_error(task), failed)
                retrying, requeued = [], []
            self.policy.push_front(retrying + requeued)
            self._after_final(failed)
            finished_jobs = self._take_finished()
            self._notify_all()
        if self.events.tasks:
            self._publish(retrying, RETRYING)
            self._publish(requeued, PENDING)
            self._publish(failed, FAILED)
        self._publish_jobs(finished_jobs)

    def split(self, batch: Batch) -> None:
        """The reply to ``batch`` could not be unpickled here (one result's
        class is not importable in the master, say): its tasks go back to
        the queue uncharged, to run one by one, so that only the culprit
        fails (:meth:`reject`) and the others' results come home."""
        requeued: list[Task] = []
        with self.cond:
            self._epoch += 1
            self._irregular = True  # (its tasks go back to the queue to run alone)
            self._returned(batch)
            for task in batch.tasks:
                task.batch = None
                if task.state is RUNNING:
                    task.attempts -= 1
                    task.to(PENDING)
                    task.isolate = True
                    requeued.append(task)
            failed: list[Task] = []
            if self.closed:
                for task in requeued:
                    self._fail(task, self._shut_down_error(task), failed)
                requeued = []
            self.policy.push_front(requeued)
            self._after_final(failed)
            finished_jobs = self._take_finished()
            self._notify_all()
        if self.events.tasks:
            self._publish(requeued, PENDING)
            self._publish(failed, FAILED)
        self._publish_jobs(finished_jobs)

    def discard(self, batch: Batch) -> None:
        """A batch the backend did not send after all (every task rejected)."""
        with self.cond:
            self._returned(batch)
            self._notify_all()

    def _returned(self, batch: Batch) -> None:
        self._in_flight -= 1
        if batch.exclusive:
            self._exclusive = False

    def reject(self, rejected: list[tuple[Task, BaseException]]) -> None:
        """Tasks a backend could not send (their arguments do not pickle)."""
        failed: list[Task] = []
        with self.cond:
            self._epoch += 1
            self._ended_queued = True  # (a backend's tasks: queued, for all we know)
            for task, exc in rejected:
                if task.state in FINAL_STATES:
                    continue
                if task.state is RUNNING:
                    task.attempts -= 1
                task.batch = None
                self._fail(task, exc, failed)
            self._after_final(failed)
            finished_jobs = self._take_finished()
            self.cond.notify_all()
        if self.events.tasks:
            self._publish(failed, FAILED)
        self._publish_jobs(finished_jobs)

    # --- cancellation and shutdown ----------------------------------------
    def cancel(self, tasks: Iterable[Task], stop_running: bool = True) -> int:
        """Cancel what has not finished; kill the workers of running tasks when
        ``stop_running``. Returns how many tasks were cancelled."""
        cancelled: list[Task] = []
        stop: set[str] = set()
        skip: dict[int, tuple[Batch, list[int]]] = {}
        with self.cond:
            self._epoch += 1
            self._ended_queued = True
            for task in list(tasks):
                if task.state in FINAL_STATES:
                    continue
                if task.state is RUNNING:
                    if not stop_running:
                        continue
                    stop.add(task.worker)
                    task.finished = self.clock()  # when it was stopped
                elif task.batch is not None:
                    # Waiting at its worker: cancelled without stopping
                    # anything; the worker is told to skip it.
                    skip.setdefault(task.batch.id, (task.batch, []))[1].append(task.id)
                    task.batch = None
                task.to(CANCELLED)
                if task.future is not None:
                    self._settle.append((task.future, False, None))  # None: cancel it
                cancelled.append(task)
            self._after_final(cancelled)
            finished_jobs = self._take_finished()
            self._notify_all()
        self._settle_futures(finished_jobs)
        if skip and self.dropper is not None:
            for batch, ids in skip.values():
                self.dropper(batch.worker, batch, ids)
        if stop and self.stopper is not None:
            self.stopper(stop)
        if self.events.tasks:
            self._publish(cancelled, CANCELLED)
        self._publish_jobs(finished_jobs)
        return len(cancelled)

    def close_job(self, job: Job) -> None:
        """Stop reading ``job``'s input (on cancel)."""
        with self.cond:
            job._exhausted = True
            if job in self._feeders:
                self._feeders.remove(job)
            job._check_finished(self)
            finished_jobs = self._take_finished()
            self._notify_all()
        self._publish_jobs(finished_jobs)

    def close(self) -> None:
        """No more work: serving threads leave :meth:`take`.  What is
        still queued then will never run, so it fails now with
        :class:`ShutDownError` (a master drains its queue before closing;
        this is the forced path: terminate, or a master dropped without
        shutdown); unread input is read no more.  Batches out at workers
        are the backend's to report."""
        failed: list[Task] = []
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self._epoch += 1
            self._ended_queued = True
            for job in list(self._active.values()):
                job._exhausted = True
                for task in list(job.tasks):
                    if task.batch is None and (task.state is PENDING or task.state is RETRYING):
                        self._fail(task, self._shut_down_error(task), failed)
                job._check_finished(self)
            self._feeders.clear()
            self._after_final(failed)
            finished_jobs = self._take_finished()
            self._notify_all()
        self._settle_futures(finished_jobs)
        if self.events.tasks:
            self._publish(failed, FAILED)
        self._publish_jobs(finished_jobs)

    # --- internals ------------------------------------------------------------
    @staticmethod
    def _shut_down_error(task: Task) -> ShutDownError:
        job = f" of job {task.job.name!r}" if task.job is not None else ""
        return ShutDownError(f"task {task.index}{job} was still queued when its master was closed "
                             "for good, so it never ran (shutdown() waits for queued tasks; this "
                             "happens after terminate() or when a master is dropped without shutdown())")

    @staticmethod
    def _retries(task: Task) -> int:
        return task.job.retries if task.job is not None else 0

    def _policy_failed(self, exc: Exception) -> None:
        """Under the lock: the policy raised in ``pop``.  Retrying would
        raise again (and a worker's serving thread must not die of it), so
        the scheduler is broken from now on: every queued task fails with a
        :class:`PolicyFailed` naming the policy's error, and so does every
        task queued later (:meth:`_push`)."""
        name = getattr(self.policy, "name", type(self.policy).__name__)
        error = PolicyFailed(f"the scheduling policy {name!r} raised {type(exc).__name__}: {exc} "
                             "when asked for the next task; the tasks queued on this master fail "
                             "with it. Fix the policy and make a new master.")
        error.__cause__ = exc
        self.broken = error
        self._epoch += 1
        self._ended_queued = True
        failed: list[Task] = []
        for job in list(self._active.values()):
            for task in list(job.tasks):
                if (task.state is PENDING or task.state is RETRYING) and task.batch is None:
                    failed_error = PolicyFailed(*error.args)
                    failed_error.__cause__ = exc
                    self._fail(task, failed_error, failed)
        self._after_final(failed)
        self._push_failed += failed
        self._notify_all()

    def _fail(self, task: Task, exc: BaseException, failed: list[Task]) -> None:
        _annotate(exc, task)
        task.error = exc
        task.finished = self.clock()
        task.to(FAILED)
        failed.append(task)
        if task.future is not None:
            self._settle.append((task.future, False, exc))

    def _after_final(self, tasks: list[Task]) -> None:
        """Tell jobs that some of their tasks reached a final state."""
        if not tasks:
            return
        job = tasks[0].job
        if job is not None and all(t.job is job for t in tasks):  # (a batch may mix jobs)
            job._on_final(tasks, self)
            return
        by_job: dict[int, tuple[Job, list[Task]]] = {}
        for t in tasks:
            if t.job is not None:
                by_job.setdefault(id(t.job), (t.job, []))[1].append(t)
        for job, ts in by_job.values():
            job._on_final(ts, self)

    def job_finished(self, job: Job) -> None:
        """Called by a job (under the lock) when its last task ended; the
        event goes out after that batch's task events."""
        self._finished_jobs.append(job)
        self._active.pop(job.id, None)

    def _take_finished(self) -> "_Ended":
        """Under the lock: what ended since the last call, to publish once
        the lock is released."""
        ended = _Ended(self._finished_jobs)
        ended.failed, self._push_failed = self._push_failed, []
        ended.futures, self._settle = self._settle, []
        self._finished_jobs = []
        return ended

    @staticmethod
    def _settle_futures(ended: "_Ended") -> None:
        """Outside the lock: set the Futures of tasks that ended (their
        done-callbacks are the user's code).  Idempotent per ``ended``."""
        futures, ended.futures = ended.futures, []
        for future, ok, value in futures:
            try:
                if ok:
                    future.set_result(value)
                elif value is None:
                    if future.cancel():
                        # Wake cf.wait()/as_completed(): no worker will take it now.
                        future.set_running_or_notify_cancel()
                    else:
                        future.set_exception(_cancelled_error())
                else:
                    future.set_exception(value)
            except InvalidStateError:
                pass  # the caller cancelled it in the meantime

    def _publish_jobs(self, jobs: "_Ended") -> None:
        self._settle_futures(jobs)
        if jobs.failed and self.events.tasks:
            self._publish(jobs.failed, FAILED)
        if not jobs:
            return
        if self.events:
            now = self.clock()
            for job in jobs:
                self.events.emit(JobChanged(job, "cancelled" if job._cancelled else "finished", now))
        for job in jobs:
            job._run_callbacks()

    def _publish(self, tasks: list[Task], state: TaskState, one_job: Job | None = None) -> None:
        """Emit ``tasks``' move to ``state``, one event per job (``one_job``:
        the job of every task, known to the caller)."""
        if not tasks:
            return
        now = self.clock()
        if one_job is not None:
            self.events.emit(TasksChanged(one_job, tasks, state, now))
            return
        job = tasks[0].job
        if tasks[-1].job is job and all(t.job is job for t in tasks):
            self.events.emit(TasksChanged(job, tasks, state, now))
            return
        groups: dict[int, list[Task]] = {}
        for t in tasks:
            groups.setdefault(id(t.job), []).append(t)
        for ts in groups.values():
            self.events.emit(TasksChanged(ts[0].job, ts, state, now))


def _job_of(batch: Batch | None) -> Job | None:
    """The job of every task of ``batch`` when it has one job, else None."""
    if batch is None or not batch.single_job or not batch.tasks:
        return None
    return batch.tasks[0].job


class _Ended(list):
    """Jobs that finished, tasks the policy refused (see ``_push``) and
    Futures to set, gathered under the lock and published after it."""
    failed: list[Task]
    futures: list[tuple[Future, bool, Any]]


def _cancelled_error() -> BaseException:
    from concurrent.futures import CancelledError
    return CancelledError("the task was cancelled while it ran")
