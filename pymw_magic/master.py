"""The Master: a ``concurrent.futures.Executor`` in front of any backend.

::

    user code                Master                       Scheduler        Backend
    ─────────                ──────                       ─────────        ───────
    submit(fn, *a) ──▶ pickle fn once (FunctionCache) ──▶ add_task ─┐
    map_async(fn, xs) ─▶ Job(lazy input, window) ──────▶ add_job  ─┤
    map(fn, xs) ──────▶ streaming Job + ordered iterator             ├─▶ take / completed / lost
    shutdown() ───────▶ wait for jobs, close scheduler, stop backend ┘
                                    │
                                    └──▶ EventBus ──▶ observers (progress bar, dashboard)

Who does what:

* **Master** validates options, pickles each function once (an unpicklable
  captured global is a :class:`PayloadError` here, before any task is
  sent), creates tasks and jobs, and owns the lifecycle: at interpreter
  exit, the work accepted before ``shutdown(wait=False)`` completes (as in
  ``concurrent.futures``) and every other live master is terminated, so no
  worker outlives it; finished jobs are held weakly (their results go when
  the caller lets go of them);
* the **Scheduler** (``scheduler.py``) owns task states, the queue,
  retries, cancellation;
* the **Backend** (``backends/``) owns the workers.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Sized
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Callable, Iterable, Iterator

from .backends import get_backend, master_options
from .events import EventBus
from .job import Job
from .payload import FunctionCache, new_key
from .policies import Policy, make_policy
from .scheduler import Scheduler
from .task import DONE, FINAL_STATES, Task, TaskFuture, despite_interrupts, wait_slice

_live: "weakref.WeakSet[Master]" = weakref.WeakSet()
#: called with each new Master at the end of its ``__init__`` (on_new_master)
_new_master_callbacks: list[Callable[["Master"], Any]] = []


def on_new_master(callback: Callable[["Master"], Any]) -> Callable[["Master"], Any]:
    """Call ``callback(master)`` for every Master made from now on, at the end
    of its ``__init__``: how the layers above (the job store) follow masters
    without this module naming them.  A callback that raises is warned
    about and never breaks the master.  Registering the same callback twice
    registers it once.  Returns ``callback`` (usable as a decorator)."""
    if callback not in _new_master_callbacks:
        _new_master_callbacks.append(callback)
    return callback


def _announce(master: "Master") -> None:
    for callback in list(_new_master_callbacks):
        try:
            callback(master)
        except Exception as exc:
            warnings.warn(f"pymw-magic: on_new_master callback {callback!r} raised {exc!r}; "
                          "the master works without it", RuntimeWarning, stacklevel=3)


def live_masters() -> list[Master]:
    """Every master of this process not shut down yet (in no order): what
    the dashboard shows besides a front end's own masters."""
    return list(_live)

#: seconds detach() waits for a batch backend to take the tasks still queued
DETACH_TIMEOUT = 30.0
#: ended submit() tasks a master keeps per function for the dashboard (the
#: results live in the Futures the caller holds)
SUBMIT_HISTORY = 1000
#: at most this many spare Task objects are kept for reuse (Master._spare_tasks):
#: a job's window of tiny tasks on 2 workers (4 batches of at most 4,096
#: each per worker), ~7 MB at most
SPARE_TASKS = 1 << 15
#: a task is known to be unreferenced when ``sys.getrefcount`` says 2 (the
#: map's frame and the call's argument) only where every reference is
#: counted: CPython with the GIL before 3.14.  3.14 borrows references on
#: the operand stack (smaller counts) and the free-threaded build counts
#: approximately; there no task is reused (a reused task someone still held
#: would change under them).
REUSE_TASKS = (sys.implementation.name == "cpython" and sys.version_info < (3, 14)
               and getattr(sys, "_is_gil_enabled", lambda: True)())


def _reply_waiter(scheduler: Scheduler, task: Task) -> Callable[[float | None], None]:
    """What a submitted task's Future calls before it waits: the scheduler
    may read the reply on the caller's thread.  Held weakly (a Future the
    caller keeps must not keep its task, nor the master, alive)."""
    wait = weakref.WeakMethod(scheduler.wait_reply)
    ref = weakref.ref(task)

    def waiter(timeout: float | None) -> None:
        method, t = wait(), ref()
        if method is not None and t is not None:
            method(t, timeout)
    return waiter


def _let_go_in_child() -> None:
    """A forked child (``os.fork``, multiprocessing's fork context) gets a
    copy of every master, but the workers, the MPI run and the engine's jobs
    stay the parent's.  The child's copies never stop them (at the child's
    exit, or when it drops a copy) and take no task (``Master._forked``)."""
    for master in list(_live):
        master._forked = True
        master._finalizer.detach()
        # (a thread of the parent may have held it, inside submit(): the
        # child's ``jobs`` and ``submit_jobs`` waited for ever)
        master._lock = threading.RLock()
        # (a job's copy cancelled here must not stop, nor tell anything
        # to, the parent's workers: an MPI rank was SIGKILLed by its pid)
        scheduler = master._scheduler
        scheduler.stopper = scheduler.dropper = scheduler.dispatcher = scheduler.reader = None
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


@atexit.register
def _shutdown_all() -> None:
    """At interpreter exit, as ``concurrent.futures`` does: the work a
    master accepted before ``shutdown(wait=False)`` completes first; a
    master never shut down (a kernel that exits, a script that forgot) is
    terminated, and so is everything when the wait is interrupted."""
    # A batch backend's jobs live in their engine's queue, not in this
    # process: they are neither waited for nor cancelled, only let go
    # (``attach`` follows them again from another process).
    for master in list(_live):
        if master._backend.family == "batch":
            master.detach()
    try:
        for master in list(_live):
            if master._shutdown:
                while not master._done.wait(wait_slice(None)):
                    pass
    except KeyboardInterrupt:
        pass
    finally:
        # (to its end: a second Ctrl-C must not leave workers behind)
        despite_interrupts(_terminate_live)


def _terminate_live() -> None:
    for master in list(_live):
        master.terminate()


class Master(Executor):
    """Run tasks on a backend.

    ``Master(backend="local", workers=None, *, policy="fifo", retries=1,
    timeout=None, **backend_options)``: ``workers=None`` means the
    machine's cores (under ``mpiexec``, the run's ranks but one: the
    backend settles the count); ``retries`` is how many times a task is
    re-run after its worker is lost; ``timeout`` stops a task that runs
    longer (it fails with :class:`TaskTimeout`).

    Thread-safe: ``submit``, ``map_async`` and ``shutdown`` may be called
    from any thread.
    """

    #: True in a forked child's copy: the parent's workers are not this
    #: process's to use or stop (set by _let_go_in_child)
    _forked = False

    def __init__(self, backend: str = "local", workers: int | None = None, *,
                 policy: str | Policy = "fifo", retries: int = 1, timeout: float | None = None,
                 **backend_options: Any):
        cls = get_backend(backend)
        common = master_options()
        unknown = set(backend_options) - set(cls.options)
        if unknown:
            valid = sorted(set(common) | set(cls.options))
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for backend {backend!r}; "
                             f"valid options: {', '.join(valid)}")
        requested = None if workers is None else common["workers"].convert(workers)
        self.retries = common["retries"].convert(retries)
        self.timeout = common["timeout"].convert(timeout)
        policy_obj = make_policy(policy)  # ValueError naming the valid policies
        self.backend_name = backend
        self._cannot_stop = cls.cannot_stop_tasks()
        self._check_timeout(self.timeout)
        options = {k: cls.options[k].convert(v) for k, v in backend_options.items()}
        # The one worker count: settled by the backend before anything uses it.
        workers = cls.settle_workers(requested, options)
        self.options = dict(options, workers=workers, retries=self.retries, timeout=self.timeout,
                            policy=policy if isinstance(policy, str) else policy_obj.name)
        self.events = EventBus()
        # Jobs from map_async, in order: weakly (a finished job's results go
        # when its caller lets go); the scheduler holds unfinished ones.
        self._job_refs: list[weakref.ref[Job]] = []
        self._prune_at = 64
        self._task_ids = itertools.count(1)
        # Task objects of map() jobs that nobody holds any more, made new
        # again by the next job's input (Job._accept) instead of allocated:
        # 20,000 tiny tasks allocated per map cost more in garbage
        # collection (they live long enough to reach the oldest
        # generation) than in their making.  Under the scheduler's lock.
        self._spare_tasks: list[Task] = []
        self._functions = FunctionCache()
        self._scheduler = Scheduler(policy_obj, self.events, workers)
        self._backend = cls(self._scheduler, workers, new_key(), **options)
        self._scheduler.connect(self._backend.scheduler_hooks())
        missing = getattr(policy_obj, "missing_estimate", lambda: None)()  # (a simulator gives one)
        if missing:
            self._backend.shutdown(wait=False)
            raise ValueError(missing)
        self._submit_jobs: dict[int, Job] = {}
        self._shutdown = False
        # Held around look-up, pickling, job creation and enqueueing, and by
        # shutdown: a task is either accepted before shutdown (and waited
        # for) or refused.  Reentrant: a done-callback may submit.
        self._lock = threading.RLock()
        self._done = threading.Event()  # set once the workers are released
        self._finishing: threading.Thread | None = None
        self._backend.start()
        _live.add(self)
        # A master dropped without shutdown() still stops its workers.
        self._finalizer = weakref.finalize(self, self._backend.shutdown, False)
        # At exit, _shutdown_all decides (it must run first: finalizers
        # registered later would run before it and kill accepted work).
        self._finalizer.atexit = False
        _announce(self)

    @property
    def workers(self) -> int:
        """How many workers this master runs (settled by the backend)."""
        return self._scheduler.workers

    @property
    def jobs(self) -> list[Job]:
        """The ``map_async`` jobs one can still see, oldest first: every
        unfinished one, and each finished one while something (the caller, a
        dashboard) still holds it; a finished job nobody holds is let go,
        with its results."""
        # Under the lock: a map_async from another thread appends meanwhile,
        # and the pruned list must not drop its job.
        with self._lock:
            alive = [(ref, ref()) for ref in self._job_refs]
            self._job_refs = [ref for ref, job in alive if job is not None]
        return [job for _, job in alive if job is not None]

    @property
    def submit_jobs(self) -> list[Job]:
        """The open-ended jobs that group ``submit()`` calls, one per function
        (the dashboard lists them beside :attr:`jobs`)."""
        with self._lock:
            return list(self._submit_jobs.values())

    @property
    def backend(self) -> Any:
        """The backend object this master runs on (read-only: what a report
        asks it, such as the simulator's hosts)."""
        return self._backend

    # --- Executor ---------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; returns a Future."""
        future = TaskFuture()
        self._check_here()
        with self._lock:
            self._check_open()
            fp = self._functions.get(fn)
            job = self._submit_job(fp)
            task = Task(next(self._task_ids), job, job._fed, fp, args, kwargs, self._scheduler.clock(), future)
            if self._scheduler.reader is not None:
                future.waiter = _reply_waiter(self._scheduler, task)
            self._scheduler.add_task(task)
        return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int | None = None) -> Iterator[Any]:
        """Results of ``fn`` over ``iterables``, in input order, as they come.

        Input is read lazily and only a bounded window of tasks is in flight,
        so a long generator streams in bounded memory.  A failed task raises
        when its result is reached; leaving the loop early, or an interrupt,
        cancels the rest.  ``timeout`` (seconds from this call) raises
        ``concurrent.futures.TimeoutError``; ``chunksize=None`` batches
        automatically.
        """
        job = self._start(fn, iterables, name=None, chunksize=chunksize, stream=True,
                          timeout=None, retries=None)
        return self._ordered(job, timeout)

    def map_async(self, fn: Callable, *iterables: Iterable, name: str | None = None,
                  chunksize: int | None = None, timeout: float | None = None,
                  retries: int | None = None) -> Job:
        """Start ``fn`` over ``iterables`` as a :class:`Job` and return at once.

        ``timeout`` and ``retries`` override the master's for this job.
        """
        return self._start(fn, iterables, name=name, chunksize=chunksize, stream=False,
                           timeout=timeout, retries=retries)

    def starmap_async(self, fn: Callable, arguments: Iterable[tuple], *, name: str | None = None,
                      chunksize: int | None = None, timeout: float | None = None,
                      retries: int | None = None) -> Job:
        """Like :meth:`map_async`, but each item of ``arguments`` is the tuple
        of one call's arguments (``[()]`` is a single call with none)."""
        return self._start(fn, (), name=name, chunksize=chunksize, stream=False,
                           timeout=timeout, retries=retries, arguments=arguments)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks and release the workers once the work in hand
        is done, as ``concurrent.futures`` executors do.

        ``cancel_futures``: cancel the tasks that have not started (running
        ones finish).  ``wait``: return only when every task has ended and
        the worker processes are gone; otherwise return at once and let a
        background thread finish the work and stop the workers (the work
        accepted before is still done: a later ``shutdown(wait=True)`` and
        interpreter exit wait for it).  An interrupt while waiting stops
        everything (:meth:`terminate`).  Called from one of the master's own
        threads (a done-callback), it cannot wait for the work that thread
        has to do: it returns at once, as with ``wait=False``.
        """
        if self._forked:   # (the parent's workers are the parent's to release)
            self._shutdown = True
            return
        if wait and self._scheduler.on_serving_thread():
            wait = False
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            jobs = self._all_jobs()  # (every task accepted so far is in one of these)
        if cancel_futures:
            for job in jobs:
                # (input first: what is read meanwhile would become tasks the
                # cancel never saw, failed at the close with ShutDownError)
                self._scheduler.close_job(job)
                self._scheduler.cancel(list(job.tasks), stop_running=False)
        try:
            if first:
                if not wait:
                    self._finishing = threading.Thread(target=self._finish, args=(jobs,), daemon=True,
                                                       name="pymw-shutdown")
                    self._finishing.start()
                    return
                self._finish(jobs)
            elif wait:
                while not self._done.wait(wait_slice(None)):
                    pass
        except KeyboardInterrupt:
            try:
                despite_interrupts(self.terminate)
            except KeyboardInterrupt:  # (a second one, landed before it could drop them)
                despite_interrupts(self.terminate)
            raise

    def _all_jobs(self) -> list[Job]:
        """Under ``_lock``: every job with work the master accepted."""
        active = self._scheduler.active_jobs()
        seen = {id(j) for j in active}
        return active + [j for j in self._submit_jobs.values() if id(j) not in seen]

    def _finish(self, jobs: list[Job]) -> None:
        try:
            for job in jobs:
                job.wait()
            self._backend.shutdown(wait=True)
            self._finalizer.detach()
            _live.discard(self)  # (if this failed, interpreter exit terminates it)
        finally:
            self._drop_spares()
            self._done.set()  # nobody waits for ever on a shutdown that failed

    def terminate(self) -> None:
        """Stop everything now: cancel what has not run, stop what runs,
        kill the workers.  What an interrupt, interpreter exit or an
        exception leaving a ``with`` block by force does."""
        if self._forked:
            self._shutdown = True
            return
        with self._lock:
            self._shutdown = True
            jobs = self._all_jobs()
        for job in jobs:
            self._scheduler.close_job(job)   # (input first, as in shutdown)
            self._scheduler.cancel(list(job.tasks), stop_running=True)
        self._backend.shutdown(wait=False)
        self._finalizer.detach()
        _live.discard(self)
        self._drop_spares()
        self._done.set()

    def _drop_spares(self) -> None:
        """A closed master makes no task again: its spare tasks go (a
        master kept after shutdown, by a job or a dashboard, would hold
        them, megabytes, for nothing)."""
        with self._scheduler.cond:
            self._spare_tasks.clear()

    def detach(self) -> None:
        """Let go of the jobs without cancelling them: a batch backend's jobs
        go on in their engine's queue (``pymw_magic.attach`` follows them
        again, from this process or another); the master is closed.  On a
        pool backend, whose workers are this process's children, it is
        :meth:`terminate`."""
        if self._backend.family != "batch" or self._forked:
            self.terminate()
            return
        with self._lock:
            self._shutdown = True
        # Tasks submitted just before are still in the scheduler's queue:
        # they go to the engine first, or the job would end here unsubmitted.
        if not self._scheduler.wait_handed_out(DETACH_TIMEOUT):
            warnings.warn(f"pymw-magic: detach() waited {DETACH_TIMEOUT:.0f} s for the {self.backend_name} "
                          "backend to take every queued task; the ones it did not take fail with ShutDownError",
                          RuntimeWarning, stacklevel=2)
        self._backend.shutdown(wait=False)
        self._finalizer.detach()
        _live.discard(self)
        self._done.set()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        # An interrupt (or SystemExit) leaving the block means "stop now", not
        # "wait for the running tasks"; an ordinary exception waits, as
        # concurrent.futures does -- except for a batch job, which may run for
        # days (or, on BOINC, wait for a volunteer forever): it goes on in its
        # engine's queue, in the job store, to be attached again.
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.terminate()
        elif exc_type is not None and self._backend.family == "batch":
            running = [job for job in self.jobs + self.submit_jobs if not job.done()]
            if running:
                names = ", ".join(repr(job.name) for job in running)
                warnings.warn(f"pymw-magic: {exc_type.__name__} left the 'with Master' block while batch "
                              f"job(s) {names} still run: they go on in the {self.backend_name} queue. "
                              "Follow one again with pymw_magic.attach(NAME) (%pymw attach NAME), or "
                              "cancel it with pymw_magic.remove(NAME, cancel=True) "
                              "(%pymw jobs --remove NAME --cancel)", RuntimeWarning, stacklevel=2)
                self.detach()
            else:
                self.shutdown(wait=True)
        else:
            self.shutdown(wait=True)
        return False

    def adopt(self, name: str, total: int, handle: dict[str, Any],
              final: dict[int, tuple[str, str | None, str | None]] | None = None, *,
              function: str = "function", chunksize: int | None = None, timeout: float | None = None,
              retries: int | None = None) -> Job:
        """A stored batch job, followed again on this master (what
        ``pymw_magic.attach`` calls): its ``total`` tasks, by input
        position, are those of the job directory in ``handle``; ``final``
        says which ended without an output, as the store recorded them."""
        if self._backend.family != "batch":
            raise ValueError(f"only batch jobs can be re-attached; the {self.backend_name} backend runs "
                             "its tasks in this process")
        from .payload import FunctionPayload
        fp = FunctionPayload(0, function, b"")  # (the nodes read the job directory's function.bin)
        self._check_here()
        with self._lock:
            self._check_open()
            job = Job(self, fp, itertools.repeat((), total), total, name=name, chunksize=chunksize,
                      timeout=self.timeout if timeout is None else timeout,
                      retries=self.retries if retries is None else retries, window=max(1, total))
            self._backend.adopt(job, handle, final)
            self._job_refs.append(weakref.ref(job))
            self._scheduler.add_job(job)
        self._scheduler.feed()
        return job

    # --- what the notebook and the dashboard read -----------------------------------
    @property
    def closed(self) -> bool:
        """True once shutdown() was called."""
        return self._shutdown

    def worker_info(self) -> list[dict[str, Any]]:
        """Live workers, each with the number of tasks it has run."""
        info = self._backend.worker_info()
        for w in info:
            w["tasks"] = self._scheduler.tasks_per_worker.get(w["name"], 0)
        return info

    @property
    def tasks_per_worker(self) -> dict[str, int]:
        """Tasks run by each worker so far (including replaced ones)."""
        return dict(self._scheduler.tasks_per_worker)

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend_name,
            "workers": self.workers,
            "options": dict(self.options),
            "jobs": [{"id": j.id, "name": j.name, "done": j.done(), **j.counts()} for j in self.jobs],
        }

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"{len(self.jobs)} jobs"
        return f"<Master {self.backend_name} workers={self.workers} {state}>"

    # --- internals -------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new tasks after shutdown")

    def _check_here(self) -> None:
        # (before any lock: a copy forked while another thread held one
        # would wait for ever)
        if self._forked:
            raise RuntimeError(f"this {self.backend_name} Master was made before this process was forked: "
                               "its workers serve the parent process only; make a new Master here")

    def _check_timeout(self, timeout: float | None) -> None:
        why = self._cannot_stop
        if timeout and why:
            raise ValueError(f"timeout={timeout} cannot be honoured on the {self.backend_name} backend "
                             f"here: {why}")

    def _submit_job(self, fp: Any) -> Job:
        """Under ``_lock``: tasks from submit() are grouped in one open-ended
        job per function."""
        job = self._submit_jobs.get(fp.id)
        if job is None:
            job = Job(self, fp, None, None, name=f"submit:{fp.name}", chunksize=None,
                      timeout=self.timeout, retries=self.retries, window=self._backend.job_window)
            job._exhausted = True
            job.tasks = deque()
            job._history = SUBMIT_HISTORY
            self._submit_jobs[fp.id] = job
        return job

    def _start(self, fn: Callable, iterables: tuple, *, name: str | None, chunksize: int | None,
               stream: bool, timeout: float | None, retries: int | None,
               arguments: Iterable[tuple] | None = None) -> Job:
        if not iterables and arguments is None:
            raise TypeError("map needs at least one iterable")
        common = master_options()
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a whole number >= 1 or None (automatic), not {chunksize!r}")
        timeout = self.timeout if timeout is None else common["timeout"].convert(timeout)
        self._check_timeout(timeout)
        retries = self.retries if retries is None else common["retries"].convert(retries)
        total = None
        if arguments is not None:
            total = len(arguments) if isinstance(arguments, Sized) else None
            source = (tuple(a) for a in arguments)
        else:
            if all(isinstance(it, Sized) for it in iterables):
                total = min(len(it) for it in iterables)  # type: ignore[arg-type]
            source = zip(*iterables)
        self._check_here()
        with self._lock:
            self._check_open()
            fp = self._functions.get(fn)
            job = Job(self, fp, source, total, name=name, chunksize=chunksize, timeout=timeout,
                      retries=retries, stream=stream, window=self._backend.job_window,
                      arity=len(iterables) if arguments is None else None)
            if not stream:
                refs = self._job_refs
                if len(refs) >= self._prune_at:
                    # (a kernel may start jobs for days without anyone
                    # reading ``jobs``: the dead references go now and then)
                    refs[:] = [r for r in refs if r() is not None]
                    self._prune_at = max(64, 2 * len(refs))
                refs.append(weakref.ref(job))
            self._scheduler.add_job(job)
        self._scheduler.feed()  # the first input, read outside every lock
        return job

    def _ordered(self, job: Job, timeout: float | None) -> Iterator[Any]:
        # The results flow through C iterators (a chain over runs of ready
        # results); the generator below runs once per run, not per result.
        # the run being handed out: its results and the count of pops left
        run: list[tuple[deque[Any], Iterator[deque[Any]]]] = [(deque(), iter(()))]
        runs = self._ready_runs(job, timeout, run)
        # Started now, up to an empty first run: its deadline counts from
        # this call, and closing or dropping the iterator before the first
        # result cancels the job (an unstarted generator's close runs no
        # code, and an unread map's window never drains: shutdown would
        # wait for it for ever).
        next(runs)
        results = _Results.from_iterable(runs)
        results._runs, results._run, results._job = runs, run, job
        return results

    def _ready_runs(self, job: Job, timeout: float | None,
                    run: list[tuple[deque[Any], Iterator[deque[Any]]]]) -> Iterator[Iterator[Any]]:
        """The map's results as runs: each run an iterator over the results
        ready in input order (it pops each as it hands it out); ``run[0]``
        is the run being handed out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._scheduler.cond
        window = job.tasks
        spare = self._spare_tasks
        refs = sys.getrefcount
        reuse = REUSE_TASKS
        try:
            yield iter(())
            while True:
                if self._forked:   # (a forked child's copy of the parent's map)
                    self._check_here()
                with cond:
                    while not (window and window[0].state in FINAL_STATES) and not (not window and job._exhausted):
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise FuturesTimeout(f"map did not finish within {timeout} s")
                        cond.wait(wait_slice(left))
                    if not window:
                        break
                    # (a closed master takes no new task: no spares for it)
                    keep = reuse and not self._shutdown
                    # Take every result that is ready, up to the first task
                    # that did not succeed; release the lock, then yield.
                    values: deque[Any] = deque()
                    add = values.append
                    popleft = window.popleft
                    bad: Task | None = None
                    while window:
                        state = window[0].state
                        if state is DONE:
                            task = popleft()
                            add(task.result)
                            # Held by nobody but this frame (no event kept
                            # it, its batch is gone): a spare, emptied of
                            # its result and input (the caller alone
                            # decides how long they live).
                            if keep and refs(task) == 2 and not task.__dict__ and len(spare) < SPARE_TASKS:
                                task.result = task.job = task.args = task.fn = None
                                spare.append(task)
                        elif state in FINAL_STATES:
                            bad = popleft()
                            break
                        else:
                            break
                self._scheduler.kick()
                # Nothing here may hold a result once it is handed out (the
                # run pops each): the caller alone decides how long a large
                # result lives, as in concurrent.futures.
                # A run is ``popleft`` called once per value it holds (not
                # ``iter(popleft, sentinel)``: that compares every result
                # with the sentinel, and an array's ``==`` raises, another
                # type's may say equal and end the map early).
                task = None
                counts = itertools.repeat(values, len(values))
                run[0] = (values, counts)
                yield map(deque.popleft, counts)
                del values, counts
                if bad is not None:
                    if bad.error is not None:
                        raise bad.error
                    from concurrent.futures import CancelledError
                    raise CancelledError(f"task {bad.index} was cancelled")
            if job._input_error is not None:
                raise job._input_error
        except (GeneratorExit, KeyboardInterrupt) as exc:
            if isinstance(exc, GeneratorExit) and (
                    self._scheduler.holds_lock() or _Results.collecting == threading.get_ident()):
                # Dropped inside the scheduler's lock, mid-update, or collected
                # in a reference cycle by the garbage collector, which runs on
                # whichever thread allocates: one inside the scheduler's lock,
                # or another lock cancel() takes (the job store recorder's):
                # cancelled from another thread, once that lock is let go.
                _Results.cancel_later(job)
            else:
                # (an interrupt here, or one in the loop's body that dropped
                # the iterator: what it started must not be cut short by the next)
                try:
                    despite_interrupts(job.cancel)
                except KeyboardInterrupt:  # (one landed before it could drop them)
                    despite_interrupts(job.cancel)
            raise
        except BaseException:
            job.cancel()
            raise


class _Results(itertools.chain):
    """The iterator ``Master.map`` returns: a chain over runs of ready
    results (C-level per result), closed like a generator: ``close()``
    (or dropping it) before the end cancels the rest of the job."""

    _runs: Any
    _run: list[tuple[deque[Any], Iterator[deque[Any]]]]
    _job: Job
    #: the thread the cyclic garbage collector runs on now, else None
    collecting: int | None = None
    #: jobs of maps closed where cancelling could deadlock, for a thread of their own
    _to_cancel: deque[Job] = deque()

    @staticmethod
    def _gc_phase(phase: str, info: dict) -> None:
        """A ``gc.callbacks`` entry: notes the collecting thread; once the
        collection is over, one thread cancels what it closed."""
        if phase == "start":
            _Results.collecting = threading.get_ident()
            return
        _Results.collecting = None
        if _Results._to_cancel:
            _Results._start_canceller()

    @staticmethod
    def cancel_later(job: Job) -> None:
        _Results._to_cancel.append(job)  # (no lock: this runs inside whatever lock the thread holds)
        if _Results.collecting != threading.get_ident():
            _Results._start_canceller()  # (else at the collection's end: one thread for them all)

    @staticmethod
    def _start_canceller() -> None:
        def cancel_all() -> None:
            todo = _Results._to_cancel
            while todo:
                try:
                    job = todo.popleft()
                except IndexError:
                    return
                job.cancel()
        try:
            threading.Thread(target=cancel_all, daemon=True, name="pymw-map-closed").start()
        except RuntimeError:
            pass  # (the interpreter is exiting: every master is stopped at exit)

    def close(self) -> None:
        values, counts = self._run[0]
        deque(counts, 0)   # the run being handed out ends here (its count spent)
        values.clear()     # and the rest of its results go
        try:
            self._runs.close()
        except ValueError:
            # Another thread waits in next() for a result (a generator
            # cannot be closed while it runs): the job is cancelled all the
            # same, which wakes that thread with a CancelledError.
            self._job.cancel()


gc.callbacks.append(_Results._gc_phase)
