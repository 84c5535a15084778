"""What every *pool* backend shares: long-lived workers, one serving thread
each, batches pipelined two deep.

::

    Scheduler ──take()──▶ serving thread (one per worker) ──send──▶ worker
        ▲                      │   ▲                                  │
        │   completed()/lost() │   └──────────── recv ────────────────┘
        └──────────────────────┘
        (on loss: the thread reports the batches in hand, with the task the
         worker's slot says it was running, then connects a replacement)

    One submitted task on an idle worker, two wake-ups (the worker's, then
    the caller's own):

    submit() ──claims the idle worker──▶ encode + send on the caller's thread
    Future.result() ──claims the batch's reply──▶ recv and completed() on
        the caller's thread (the serving thread stays parked; it takes the
        batch over only if the caller gives up: see read_reply)

Who does what:

* :class:`PoolBackend` — the serving loop: take a batch, encode it (sending
  each job function once per worker), keep up to ``depth`` batches in
  flight so a worker never waits for the master (the one sent ahead
  starts when the reply to the one before it arrives: until then its tasks
  are pending, and cancelling them sends the worker a "skip"), hand replies
  to the scheduler, enforce task timeouts from the worker's slot, report a
  lost worker's batches and replace the worker;
* :meth:`PoolBackend.read_reply` — a caller waiting in ``Future.result()``
  for a task that a submitting thread sent, before the worker's serving
  thread has taken the batch over, reads and reports the reply itself
  (the scheduler makes the claim exclusive: the serving thread reads
  only batches it holds).  Anything but a plain "done" (a loss, a broken
  frame, its own timeout or an interrupt while waiting) it hands back to
  the serving thread, which handles it as if it had read it itself;
* a :class:`Connection` (one per worker) — the transport: ``send``,
  ``recv``, ``running`` (the slot), ``kill``, ``close``.  The local backend
  makes them from OS processes and pipes; the MPI backend from ranks.
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any

from ..errors import PayloadError
from ..events import WorkerChanged
from ..payload import FunctionPayload, WorkerFunctions, check_picklable
from ..scheduler import Batch, SchedulerHooks
from ..task import Task
from ..transport import ConnectionLost, UndecodableFrame
from ..worker import BARE_ARGS
from .base import Backend, join_threads

#: consecutive workers that die before saying "ready" before we give up
MAX_START_FAILURES = 3

_log = logging.getLogger("pymw_magic")


class WorkerStartError(RuntimeError):
    pass


class Connection(ABC):
    """One worker as the pool sees it."""

    name: str
    info: dict[str, Any]
    #: why we killed it, if we did: "timeout" or "stopped"
    kill_reason: str | None = None

    @abstractmethod
    def send(self, msg: Any) -> None: ...

    @abstractmethod
    def recv(self, timeout: float | None) -> Any:
        """The next message, None on timeout; ConnectionLost when gone."""

    def running(self) -> tuple[int, float] | None:
        """(task id, start time) of the task running now, or None."""
        return None

    @abstractmethod
    def kill(self) -> None:
        """Stop the worker at once (it may be in the middle of a task)."""

    @abstractmethod
    def close(self, graceful: bool) -> None:
        """Release the worker: ask it to stop (graceful) or kill it, and
        reap it."""

    def exit_detail(self) -> str:
        return ""


# The C functions under ``signal``'s: its wrappers convert to and from
# enums, which costs more than the rest of reading a small reply.
try:
    import _signal
    _getsignal, _setsignal, _SIGINT = _signal.getsignal, _signal.signal, int(signal.SIGINT)
except (ImportError, AttributeError):  # pragma: no cover - another implementation
    _getsignal, _setsignal, _SIGINT = signal.getsignal, signal.signal, signal.SIGINT


class _DeferSigint:
    """On the main thread, a Ctrl-C is held back while a caller claims,
    reads, reports and releases a reply (an interrupt there would leave
    the channel or the task states half-way); ``hit`` says whether one
    came, to be raised once things are in order.  Let go while it waits
    for the worker: a Ctrl-C there is raised at once."""

    __slots__ = ("old", "hit", "main")

    def __init__(self) -> None:
        self.old: Any = None
        self.hit = False
        # (Python runs signal handlers on the main thread only)
        self.main = threading.current_thread() is threading.main_thread()

    def hold(self) -> None:
        if self.old is None and self.main:
            old = _getsignal(_SIGINT)
            if old is signal.default_int_handler:
                self.old = old
                _setsignal(_SIGINT, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.hit = True

    def let_go(self) -> None:
        if self.old is not None:
            _setsignal(_SIGINT, self.old)
            self.old = None


class PoolBackend(Backend):
    depth = 2
    #: its workers die together (one MPI job under MPICH): see SchedulerHooks
    shared_fate = False

    def __init__(self, scheduler: Any, workers: int, key: bytes, **options: Any):
        super().__init__(scheduler, workers, key, **options)
        self._lock = threading.Lock()
        self._conns: dict[str, Connection] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._names = itertools.count()
        self._start_failures = 0
        # A connection is written by its serving thread and by whoever
        # cancels tasks sent ahead to it ("skip"): one lock per connection.
        self._send_locks: dict[str, threading.Lock] = {}
        self._known: dict[str, WorkerFunctions] = {}   # the functions each worker holds
        # What a caller reading its own reply met and left to the serving
        # thread: (reply,) or an exception, by worker.
        self._handback: dict[str, Any] = {}
        #: replies read, by who read them (tests and benchmarks look)
        self.reads = {"caller": 0, "serving": 0}

    def scheduler_hooks(self) -> SchedulerHooks:
        return SchedulerHooks(stop_workers=self.stop_workers, skip_tasks=self.skip_tasks,
                              shared_fate=self.shared_fate, dispatch=self._dispatch,
                              read_reply=self.read_reply)

    # --- what a concrete pool provides -----------------------------------------
    @abstractmethod
    def connect(self, name: str) -> Connection:
        """Start (or attach) a worker and wait for its "ready"."""

    # --- Backend ----------------------------------------------------------------
    def start(self) -> None:
        for _ in range(self.workers):
            t = threading.Thread(target=self._serve, name=f"pymw-{self.name}-serve", daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self, wait: bool = True) -> None:
        self._stopping = True
        self.scheduler.close()
        with self._lock:
            conns = list(self._conns.values())
        if not wait:
            for conn in conns:
                conn.kill_reason = "stopped"
                conn.kill()
        join_threads(self._threads, wait)
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:  # whatever a thread could not close itself
            conn.close(graceful=False)

    def stop_workers(self, names: set[str]) -> None:
        with self._lock:
            conns = [self._conns[n] for n in names if n in self._conns]
        for conn in conns:
            conn.kill_reason = "stopped"
            conn.kill()

    def skip_tasks(self, worker: str, batch: Batch, task_ids: list[int]) -> None:
        """Tell ``worker`` not to run these tasks of ``batch`` (sent ahead
        and cancelled since).  Best effort: if it has started the batch
        already, their results are dropped when they come back."""
        with self._lock:
            conn = self._conns.get(worker)
            lock = self._send_locks.get(worker)
        if conn is None or lock is None:
            return
        try:
            with lock:
                conn.send(("skip", batch.id, task_ids))
        except Exception:
            pass  # a lost connection is the serving thread's to report

    def _dispatch(self, worker: str, batch: Batch) -> bool:
        """Send ``batch`` to idle ``worker`` on the calling thread (a
        submit): its serving thread takes it over, marked sent."""
        with self._lock:
            conn = self._conns.get(worker)
            lock = self._send_locks.get(worker)
            known = self._known.get(worker)
        if conn is None or lock is None or known is None:
            raise ConnectionLost(f"worker {worker} is gone")
        with lock:
            return self._send(conn, batch, known)

    # --- a caller reads its own reply ------------------------------------------
    def read_reply(self, task: Task, timeout: float | None) -> None:
        """Wait for ``task`` on this thread, reading its reply here if a
        submitting thread sent its batch and the serving thread has not
        taken it over (then nobody else reads that connection).  Returns
        when the task is reported, at ``timeout``, or at once when the
        reply is not this thread's to read; the caller then waits on the
        Future as usual."""
        sched = self.scheduler
        worker = task.worker
        with self._lock:
            conn = self._conns.get(worker) if worker is not None else None
        if conn is None or not hasattr(conn, "readable"):
            return   # (a transport that cannot wait for a reply on another thread: MPI)
        defer = _DeferSigint()
        batch = None
        answered = False
        defer.hold()
        try:
            batch = sched.claim_reply(task)
            # (no early return from here: a Ctrl-C held back while claiming
            # is raised below, whatever the claim found)
            if batch is not None and batch.worker == worker and self._poll_interval([batch]) is None:
                answered = self._read_for(conn, batch, timeout, defer)
        finally:
            defer.hold()
            try:
                if batch is not None:
                    sched.release_reply(batch, answered)
            finally:
                defer.let_go()
        if defer.hit:
            raise KeyboardInterrupt

    def _read_for(self, conn: Connection, batch: Batch, timeout: float | None, defer: _DeferSigint) -> bool:
        """Read and report ``batch``'s reply; False if it was left (with
        what was met, if anything) to the serving thread."""
        deadline = None if timeout is None else time.monotonic() + timeout
        defer.let_go()
        if defer.hit:
            return False   # (it came while claiming: raised by read_reply)
        while True:
            if self._stopping:
                return False
            # (in slices: a shutdown that cannot kill the worker is noticed)
            wait = 0.25
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                wait = min(wait, left)
            if conn.readable(wait):  # type: ignore[attr-defined]
                break
        defer.hold()   # (the reply is consumed from here: see _DeferSigint)
        try:
            reply = conn.recv(0)
        except Exception as exc:   # a loss, an undecodable frame: the serving thread's to report
            self._handback[conn.name] = exc
            return False
        except BaseException as exc:  # (not SIGINT: held back) the channel is out of step
            self._handback[conn.name] = RuntimeError(
                f"reading a reply was interrupted ({type(exc).__name__})")
            raise
        if reply is None or reply[0] != "done" or reply[1] != batch.id:
            self._handback[conn.name] = (reply,)
            return False
        self.reads["caller"] += 1
        try:
            self.scheduler.completed(batch, *reply[2:])
        except BaseException as exc:
            # A master-side error, as if the serving thread met it: the
            # reply is consumed, so the batch is requeued, never waited for.
            if isinstance(exc, Exception):
                self._handback[conn.name] = exc
                return False
            self._handback[conn.name] = RuntimeError(
                f"reporting a reply was interrupted ({type(exc).__name__})")
            raise
        return True

    def worker_info(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(c.info, name=c.name) for c in self._conns.values()]

    # --- the serving thread -------------------------------------------------------
    def _serve(self) -> None:
        sched = self.scheduler
        while not self._stopping:
            name = f"{self.name}-{next(self._names)}"
            try:
                conn = self.connect(name)
            except Exception as exc:
                if self._stopping:
                    return
                self._start_failures += 1
                if self._start_failures >= MAX_START_FAILURES:
                    self._give_up(exc)
                    return
                time.sleep(0.2 * self._start_failures)
                continue
            self._start_failures = 0
            with self._lock:
                if self._stopping:
                    conn.close(graceful=False)
                    return
                self._conns[conn.name] = conn
                self._send_locks[conn.name] = threading.Lock()
                self._known[conn.name] = WorkerFunctions()
            sched.worker_started(conn.name, conn.info.get("host"))
            self._emit_worker(conn, "started")
            inflight: deque[Batch] = deque()
            try:
                self._loop(conn, inflight)
                conn.close(graceful=True)
                self._emit_worker(conn, "stopped")
                return
            except ConnectionLost:
                running = conn.running()
                conn.close(graceful=False)
                culprit = running[0] if running else None
                reason = conn.kill_reason or ("stopped" if self._stopping else "died")
                sched.lost(inflight, culprit, reason, conn.exit_detail())
                self._emit_worker(conn, "lost")
            except Exception:
                # A bug on the master's side, not the worker's death: nobody
                # is charged an attempt; the tasks in hand go back to the
                # queue and the worker, whose exchange is now out of step,
                # is replaced.
                _log.exception("pymw-magic: master-side error while serving worker %s; "
                               "its tasks are requeued", conn.name)
                conn.kill_reason = "stopped"
                conn.close(graceful=False)
                sched.lost(inflight, None, "stopped", "master-side error")
                self._emit_worker(conn, "stopped")
            finally:
                with self._lock:
                    self._conns.pop(conn.name, None)
                    self._send_locks.pop(conn.name, None)
                    self._known.pop(conn.name, None)
                    self._handback.pop(conn.name, None)

    def _loop(self, conn: Connection, inflight: deque[Batch]) -> None:
        sched = self.scheduler
        known = self._known[conn.name]   # the functions this worker holds
        lock = self._send_locks[conn.name]
        while True:
            # (the last batch and reply would otherwise stay referenced while
            # this thread blocks, and with them a finished job's results)
            batch = reply = None
            while len(inflight) < self.depth:
                # An idle worker starts its batch at once; the next one waits behind it.
                batch = sched.take(conn.name, block=not inflight, start=not inflight)
                if batch is None:
                    break
                inflight.append(batch)  # before sending: a send that fails loses it too
                if batch.sent:   # by the thread that submitted its task
                    if batch.send_error is not None:
                        raise batch.send_error
                    continue
                with lock:
                    sent = self._send(conn, batch, known)
                if not sent:
                    inflight.pop()
                    sched.discard(batch)
            if not inflight:
                if sched.closed or self._stopping:
                    return
                continue
            try:
                handback = self._handback.pop(conn.name, None) if self._handback else None
                if handback is None:
                    reply = conn.recv(self._poll_interval(inflight))
                    if reply is not None:
                        self.reads["serving"] += 1
                elif isinstance(handback, tuple):
                    reply = handback[0]
                else:
                    raise handback
            except UndecodableFrame as exc:
                batch = inflight.popleft()
                if len(batch.tasks) > 1:
                    sched.split(batch)  # find the one result that will not load, alone
                else:
                    self._fail_batch(batch, f"its result could not be unpickled in the master ({exc})")
                if inflight:
                    sched.start(inflight[0])  # the worker went on with the batch sent ahead
                continue
            if reply is None:
                self._check_timeout(conn, inflight)
                continue
            if reply[0] == "broken":
                self._fail_batch(inflight.popleft(), reply[1])
                if inflight:
                    sched.start(inflight[0])
                continue
            if reply[0] != "done" or reply[1] != inflight[0].id:
                raise ConnectionLost(f"worker {conn.name} answered out of turn: {reply[:2]!r}")
            batch = inflight.popleft()
            sched.completed(batch, *reply[2:], then=inflight[0] if inflight else None)

    def _fail_batch(self, batch: Batch, reason: str) -> None:
        self.scheduler.reject([(t, PayloadError(reason)) for t in batch.tasks])
        self.scheduler.discard(batch)

    @staticmethod
    def _encode(batch: Batch, known: WorkerFunctions) -> tuple[tuple, dict[int, FunctionPayload], tuple]:
        """The "run" message for ``batch``, with the functions the worker
        lacks and the ids it should forget; and what to commit once sent."""
        tasks = batch.tasks
        fn0 = tasks[0].fn
        if batch.single_job:
            fns = {fn0.id: fn0}
            fn_ids: int | list[int] = fn0.id
            # (a worker keeps one copy of a function per job)
            jobs: int | list[int] = tasks[0].job.id if tasks[0].job is not None else 0
        else:
            fns = {t.fn.id: t.fn for t in tasks}
            fn_ids = [t.fn.id for t in tasks]
            jobs = [t.job.id if t.job is not None else 0 for t in tasks]
        plan = known.plan(fns)
        seqs: list[int] | range = [t.id for t in tasks]
        job = tasks[0].job
        if batch.single_job and not batch.has_futures and job is not None and job.arity == 1:
            # A map over one iterable: each call's one argument goes bare
            # (a 1-tuple costs the pickler a memo entry each way, most of
            # what a tiny task's input costs on the wire), and a fresh
            # batch's consecutive ids as a range.
            args: list[Any] = [t.args[0] for t in tasks]
            kwargs: Any = BARE_ARGS
            first = seqs[0]
            if seqs[-1] - first == len(seqs) - 1 and seqs == list(range(first, first + len(seqs))):
                seqs = range(first, first + len(seqs))
        else:
            args = [t.args for t in tasks]
            kwargs = [t.kwargs or None for t in tasks] if batch.has_futures else None
        msg = ("run", batch.id, [fns[i].wire() for i in plan[0]], seqs, fn_ids, args, kwargs, jobs, plan[1])
        return msg, fns, plan

    def _send(self, conn: Connection, batch: Batch, known: WorkerFunctions) -> bool:
        """Send ``batch``; tasks whose arguments do not pickle fail alone with
        PayloadError and the rest go. False if nothing was left to send."""
        msg, fns, plan = self._encode(batch, known)
        try:
            conn.send(msg)  # pickles fully before writing a byte
        except ConnectionLost:
            raise
        except Exception:
            good, bad = [], []
            for t in batch.tasks:
                try:
                    check_picklable([(f"argument {i} of task {t.index}", a) for i, a in enumerate(t.args)]
                                    + [(f"argument {k!r} of task {t.index}", v) for k, v in t.kwargs.items()])
                    good.append(t)
                except PayloadError as exc:
                    bad.append((t, exc))
            if not bad:
                raise
            self.scheduler.reject(bad)
            if not good:
                return False
            batch.tasks = good
            return self._send(conn, batch, known)
        known.commit(fns, plan)
        return True

    def _poll_interval(self, inflight: deque[Batch]) -> float | None:
        limits = [b.tasks[0].job.timeout for b in inflight if b.tasks[0].job is not None]
        limits = [t for t in limits if t]
        return min(0.25, min(limits) / 10) if limits else None

    def _check_timeout(self, conn: Connection, inflight: deque[Batch]) -> None:
        running = conn.running()
        if running is None:
            return
        seq, started = running
        for batch in inflight:
            for task in batch.tasks:
                if task.id == seq:
                    limit = task.job.timeout if task.job is not None else None
                    if limit and time.time() - started > limit:
                        conn.kill_reason = "timeout"
                        conn.kill()
                    return

    def _give_up(self, exc: BaseException) -> None:
        """Workers cannot start at all: fail what is queued rather than hang."""
        self.scheduler.give_up(WorkerStartError(f"{self.name} workers cannot start: {exc}"))

    def _emit_worker(self, conn: Connection, kind: str) -> None:
        if self.scheduler.events:
            self.scheduler.events.emit(WorkerChanged(conn.name, kind, time.time(), dict(conn.info)))
