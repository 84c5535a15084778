"""What every *batch* backend shares (HTCondor, BOINC): tasks handed to an
external scheduler in chunks, results read back from files.

::

    Scheduler ──take(start=False)──▶ pump thread ── chunking ──▶ JobDir (one per job)
        ▲                               │           function.bin once, in/<i>.in per chunk
        │                               ▼
        │                        submit(job, chunks)   (the engine: one submit per wave)
        │                               │
        │   start(batch)       ┌────────┴─────────── the engine's own log / status
        ├── completed(batch) ◀─┤ follower thread: poll_events() ──▶ BatchEvent
        ├── lost / reject      └──▶ running: start; finished: read_output → completed;
        │                           held/failed: retry as a new chunk or fail; evicted: retrying
        │
        └── store handle (through the recorder hook): job dir, chunks, engine state (log offset)

Who does what:

* :class:`BatchBackend` (this module) takes tasks from the scheduler
  without starting them (they stay pending until their chunk executes),
  groups them into chunks (:func:`chunk_size`: explicit ``chunksize``, or
  a size that weighs the engine's scheduling delay against the tasks'
  measured durations), writes each job's directory, moves tasks through
  their states from the engine's events, completes them from verified
  output files, retries failed chunks as new chunks (``retries``), removes
  what is cancelled, records the handle a later process needs to follow the
  job again (:meth:`adopt`, used by ``pymw_magic.reattach``);
* a subclass (``condor.py``) talks to its engine: :meth:`submit`,
  :meth:`remove`, :meth:`poll_events`, :meth:`safety_check` and the
  handle's engine part (:meth:`engine_handle`, :meth:`reconnect_options`).

What comes back from the nodes is data, not code, unless the user says
otherwise: ``trusted_results=False`` (the default) makes every job
directory with the safe codec, so a node that holds the job's key and
forges a pickled output is refused unread; ``trusted_results=True`` takes
pickled results from nodes the user controls.  The choice is stored with
the job's options, and :meth:`adopt` refuses to read a pickling job's
outputs unless it is given again.

Jobs outlive the process: at interpreter exit a batch master is detached
(``Master.detach``), never cancelled; ``shutdown(wait=False)`` stops
following without touching the engine's queue.
"""

from __future__ import annotations

import ast
import builtins
import fcntl
import itertools
import logging
import math
import os
import pickle
import re
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

from ..errors import PayloadError, PymwError, TaskFailed, TaskTimeout
from ..jobdir import JobDir, OutputCorrupt, OutputMissing, OutputTooLarge
from ..payload import dumps
from ..scheduler import Batch, SchedulerHooks
from ..task import FINAL_STATES, RUNNING, Task
from .base import Backend, Option, join_threads

if TYPE_CHECKING:
    from ..job import Job

_log = logging.getLogger("pymw_magic")

#: the most tasks of one job handed to the engine at once (a job's window)
JOB_WINDOW = 1 << 16
#: the most procs (chunks) one submit creates; a larger job is chunked coarser
MAX_PROCS = 1000
#: a proc should run at least this many times its fixed overhead
#: (scheduling delay + start-up): at most 1 / (1 + EFFICIENCY) of the pool's time lost
EFFICIENCY = 4.0
#: seconds a proc takes to start Python and our runtime on a node
STARTUP = 1.0
#: seconds the pump waits for more tasks before submitting a wave
#: (submit() calls arriving one by one then share one submit)
LINGER = 0.05
#: the largest task output file (MiB) the master reads by default: an
#: execute node we do not control must not exhaust the master's memory
#: (reading one costs a few times its size)
MAX_OUTPUT_MB = 64.0


def _output_mb_ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1 << 30


#: the options every batch backend takes, declared once (each backend's
#: ``options`` table includes them: the magics, forms and attach read them there)
BATCH_OPTIONS = {
    "max_output_mb": Option("max_output_mb", float, MAX_OUTPUT_MB, "the largest task output file the master "
                            "reads (MiB): a bigger one is refused unread and fails its chunk's tasks",
                            check=_output_mb_ok, requirement="a number of MiB > 0"),
}


def output_cap(max_output_mb: float) -> int:
    """``max_output_mb`` in bytes."""
    return max(1, int(float(max_output_mb) * (1 << 20)))


class BackendMissing(PymwError, ImportError):
    """The engine's Python bindings are not installed; the message says
    what to install."""


class BatchError(TaskFailed):
    """A chunk's proc failed without a usable output (it exited abnormally,
    its output file is missing or corrupt, it left the queue unseen), or
    the engine's log of its job cannot be read."""

    #: the job whose event source failed (set by :meth:`about`), if any
    state: Any = None

    @classmethod
    def about(cls, state: Any, message: str) -> BatchError:
        """An event-source failure of one job (the others are unaffected)."""
        exc = cls(message)
        exc.state = state
        return exc


def chunk_size(n: int, *, chunksize: int | None, mean: float | None, delay: float,
               startup: float = STARTUP, max_procs: int = MAX_PROCS) -> int:
    """How many tasks go into one chunk (one proc) when ``n`` are handed to
    the engine at once.

    ``chunksize`` (the user's) wins.  Otherwise each proc costs a fixed
    overhead — the engine's scheduling ``delay`` (a negotiation cycle, about
    10 s on HTCondor) plus ``startup`` — so a proc should run at least
    :data:`EFFICIENCY` times that: with ``mean`` (seconds per task,
    measured on earlier chunks of the function) known, that many tasks; while
    unknown, one task per proc (tasks may be long).  Never more than
    ``max_procs`` procs for the ``n`` tasks, never more tasks than ``n``.
    """
    if chunksize:
        return max(1, int(chunksize))
    if n <= 0:
        return 1
    by_overhead = 1
    if mean is not None and mean >= 0:
        by_overhead = math.ceil(EFFICIENCY * (delay + startup) / max(mean, 1e-6))
    by_count = math.ceil(n / max(1, max_procs))
    return max(1, min(n, max(by_overhead, by_count)))


@dataclass
class BatchEvent:
    """What an engine's event source reports about one chunk's proc.

    ``kind``: "submitted", "running" (``host``), "finished" (``normal``,
    ``code``: the return value or signal), "held" (``reason``, ``code``,
    ``subcode``), "released", "evicted" (``reason``), "aborted"
    (``reason``), "gone" (left the engine without an event: the safety net).
    ``proc`` is the engine's id of the proc (HTCondor's (cluster, proc)).
    """
    kind: str
    proc: Any
    host: str | None = None
    normal: bool = True
    code: int | None = None
    subcode: int | None = None
    reason: str = ""
    notes: str | None = None
    timeout: bool = False


class Chunk:
    """One proc's worth of a job's tasks, and the proc running it."""

    __slots__ = ("index", "job", "seqs", "tasks", "batches", "proc", "state", "attempt", "deferred",
                 "submitted", "host", "restored", "removing", "_out")

    def __init__(self, index: int, job: JobState, seqs: list[int]):
        self.index = index
        self.job = job
        self.seqs = seqs
        #: seq -> the task (None while a restored job's task is not taken yet)
        self.tasks: dict[int, Task | None] = dict.fromkeys(seqs)
        #: the scheduler batches holding its tasks (each reported once)
        self.batches: dict[int, Batch] = {}
        self.proc: Any = None           # the engine's id, once submitted
        #: "new", "queued", "running", "ended"
        self.state = "new"
        self.attempt = 1
        self.deferred: list[BatchEvent] = []  # events seen before all its tasks were taken
        self.submitted: float | None = None
        self.host: str | None = None
        self.restored = False
        self.removing = False
        self._out: str | None = None

    def output(self) -> str:
        """Where its output file lands (a string: the store asks once per task)."""
        if self._out is None:
            self._out = str(self.job.dir.output_path(self.index))
        return self._out

    @property
    def bound(self) -> bool:
        return all(t is not None for t in self.tasks.values())

    def live(self) -> list[Task]:
        return [t for t in self.tasks.values() if t is not None and t.state not in FINAL_STATES]

    def name(self) -> str:
        return f"chunk {self.index} of {self.job.dir.path.name}"


class JobState:
    """A job as the batch backend follows it: its directory, its chunks."""

    def __init__(self, job: Job, jobdir: JobDir):
        self.job = job
        self.dir = jobdir
        self.chunks: dict[int, Chunk] = {}
        self.home: dict[int, Chunk] = {}       # seq -> the chunk it lives in
        self.next_index = 0
        self.engine: dict[str, Any] = {}       # the subclass's part of the handle
        self.recorded = False
        self.adopted = False
        #: the engine's log was read to its end since this job was adopted:
        #: only then is a chunk the handle shows unsubmitted known to be so
        self.caught_up = True
        self.uid: str | None = None            # the store's id of an attached job
        self.restored: dict[int, tuple[str, str | None, str | None]] = {}  # seq -> stored final (state, error, tb)

    def handle(self) -> dict[str, Any]:
        return {"dir": str(self.dir.path), "function": self.job.fn.name, "total": self.job.progress[1],
                "chunks": {str(c.index): {"seqs": _ranges(c.seqs), "proc": _jsonable_proc(c.proc),
                                          "attempt": c.attempt}
                           for c in self.chunks.values()}}


def _ranges(seqs: Sequence[int]) -> list[list[int]]:
    """[[start, stop), ...] of sorted runs: a 10,000-task chunk table stays small."""
    out: list[list[int]] = []
    for s in seqs:
        if out and out[-1][1] == s:
            out[-1][1] = s + 1
        else:
            out.append([s, s + 1])
    return out


def unranges(ranges: Iterable[Sequence[int]]) -> list[int]:
    return [s for a, b in ranges for s in range(int(a), int(b))]


def _jsonable_proc(proc: Any) -> Any:
    return list(proc) if isinstance(proc, tuple) else proc


#: how a batch job is recorded in the job store: ``fn(job)`` returns the
#: recorder (``store.JobRecorder``) or None; set by the layer above
#: (``pymw_magic.reattach``), which may import the store
_recorder_source: Callable[[Any], Any] | None = None
#: the root under which job directories are made: ``fn()``; set likewise
_root_source: Callable[[], Path] | None = None


def set_store_hooks(recorder: Callable[[Any], Any] | None, root: Callable[[], Path] | None) -> None:
    """Register how batch jobs reach the job store (the recorder of a
    master's jobs, and the directory job directories go under)."""
    global _recorder_source, _root_source
    _recorder_source, _root_source = recorder, root


def jobs_root() -> Path:
    if _root_source is not None:
        return Path(_root_source())
    home = os.environ.get("PYMW_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share"),
        "pymw-magic")
    return Path(home) / "jobs"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:40] or "job"


class BatchBackend(Backend):
    """The shared engine of batch backends; subclasses talk to the engine."""

    family = "batch"
    job_window = JOB_WINDOW
    #: seconds between submit and execution the engine usually needs (the
    #: chunking weighs it; replaced by the delay measured on this backend)
    scheduling_delay: ClassVar[float] = 10.0
    #: seconds between two safety-net checks of the engine's queue
    safety_interval: ClassVar[float] = 60.0

    def __init__(self, scheduler: Any, workers: int, key: bytes, *, chunksize: int | None = None,
                 trusted_results: bool = False, max_output_mb: float = MAX_OUTPUT_MB, **options: Any):
        super().__init__(scheduler, workers, key)
        self.chunksize = chunksize
        #: False (the default): nodes send results in the safe codec (JSON,
        #: .npy), never unpickled here, whatever a node holding the job's key
        #: writes; True: pickled results, for nodes you control
        self.trusted_results = bool(trusted_results)
        if not _output_mb_ok(max_output_mb):
            raise ValueError(f"max_output_mb is {BATCH_OPTIONS['max_output_mb'].requirement}, not {max_output_mb!r}")
        self.max_output_mb = float(max_output_mb)
        #: the largest output file read (bytes): checked on its size, before reading
        self.max_output_bytes = output_cap(self.max_output_mb)
        self.backend_options = dict(options, chunksize=chunksize, trusted_results=self.trusted_results,
                                    max_output_mb=self.max_output_mb)
        self._lock = threading.RLock()
        self._engine_lock = threading.RLock()  # one engine call at a time
        self._jobs: dict[int, JobState] = {}   # Job.id -> state
        self._by_proc: dict[Any, Chunk] = {}
        self._batch_chunks: dict[int, list[Chunk]] = {}  # batch id -> the chunks holding its tasks
        self._batch_outcomes: dict[int, dict[int, tuple]] = {}  # batch id -> task id -> outcome
        self._stopping = False
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._names = itertools.count(1)
        self._delay: float | None = None      # measured submit -> execute seconds
        self._last_safety = time.monotonic()
        self._dropped: set[str] = set()        # batch workers whose tasks were cancelled
        self._dirs: dict[int, Path] = {}          # Job.id -> its directory (kept after it ended)
        self._worker_batch: dict[str, int] = {}   # batch worker name -> batch id
        #: Job.id -> the open, locked "follow.lock" of its directory: one
        #: process follows a job at a time (two would both retry its failed chunks)
        self._claims: dict[int, int] = {}
        #: jobs let go by forget(), whose engine state the follower drops
        self._closing: list[JobState] = []

    # --- what a subclass provides -----------------------------------------------------------
    def submit(self, state: JobState, chunks: list[Chunk]) -> list[Any]:
        """Hand ``chunks`` to the engine as one submission; return each
        chunk's proc id, in order.  Raise to fail them all."""
        raise NotImplementedError

    def remove(self, state: JobState, procs: list[Any], reason: str) -> None:
        """Remove these procs from the engine's queue."""
        raise NotImplementedError

    def poll_events(self, states: list[JobState], timeout: float) -> list[tuple[JobState, BatchEvent]]:
        """Events since the last call, waiting up to ``timeout`` seconds."""
        raise NotImplementedError

    def safety_check(self, states: list[JobState]) -> list[tuple[JobState, BatchEvent]]:
        """At most every :attr:`safety_interval`: events for procs that left
        the engine without one (default: none)."""
        return []

    def fetch_output(self, chunk: Chunk) -> None:
        """Bring the chunk's output into the job directory (a remote engine's
        spool); by default the engine's file transfer put it there."""

    def engine_handle(self, state: JobState) -> dict[str, Any]:
        """The subclass's part of the stored handle (e.g. the log offset)."""
        return {}

    @property
    def codec(self) -> str:
        """How the nodes send results back: "safe" unless ``trusted_results``."""
        return "pickle" if self.trusted_results else "safe"

    def create_jobdir(self, root: Path, name: str) -> JobDir:
        """A new job's directory (a subclass with another signature scheme
        makes it its own way, with :attr:`codec` and ``trusted_results``)."""
        return JobDir.create(root, name, codec=self.codec, trusted_results=self.trusted_results)

    def open_jobdir(self, path: Path | str) -> JobDir:
        """A stored job's directory, found again (a subclass may give a signer)."""
        return JobDir.open(path)

    def prepare(self, state: JobState) -> None:
        """A job's directory was just made (or reopened): ready it for the engine."""

    def check_adopted(self, state: JobState) -> None:
        """A stored job is about to be followed again: raise (a
        :class:`PymwError` saying what to do) if this engine cannot be the
        one that ran it (default: trust it)."""

    @classmethod
    def reconnect_options(cls, handle: dict[str, Any], given: Iterable[str] = ()) -> dict[str, Any]:
        """Backend options that reach the engine again, from a stored handle.
        ``given``: the options the caller passes itself (they win: what they
        replace is not rebuilt from the handle, which may be impossible)."""
        return {}

    @classmethod
    def remove_stored(cls, handle: dict[str, Any], **options: Any) -> None:
        """Remove a stored job's procs from the engine without attaching it."""

    # --- Backend -----------------------------------------------------------------------------
    @classmethod
    def settle_workers(cls, requested: int | None, options: dict[str, Any]) -> int:
        # The engine decides where and how many run; ``workers`` only bounds
        # how many procs of this master may be out at once (None: no bound).
        return requested or 1

    def scheduler_hooks(self) -> SchedulerHooks:
        return SchedulerHooks(stop_workers=self.stop_workers, skip_tasks=self.skip_tasks)

    def start(self) -> None:
        # A batch master's "workers" are ready at once: the engine takes work.
        for i in range(self.workers):
            self.scheduler.worker_started(f"{self.name}-{i}", None)
        for target, what in ((self._pump, "pump"), (self._follow, "follow")):
            t = threading.Thread(target=target, name=f"pymw-{self.name}-{what}", daemon=True)
            t.start()
            self._threads.append(t)

    def shutdown(self, wait: bool = True) -> None:
        """Stop following.  ``wait``: until every chunk has ended (the master
        waited for its jobs already).  The engine's queue is left as it is:
        cancelling is what removes procs."""
        self._stopping = True
        self.scheduler.close()
        self._wake.set()
        join_threads(self._threads, wait)
        # What was cancelled just before (the job's end may be what shut
        # its master down) still leaves the engine's queue.
        with self._lock:
            dropped, self._dropped = self._dropped, set()
        if dropped:
            self._drop_dead(dropped)
        if not any(t.is_alive() for t in self._threads):
            # (with the follower gone: a log it may still be reading is never closed under it)
            self._prune()
            self._close_forgotten()
        self._record_all(flush=True)
        with self._lock:
            claims, self._claims = list(self._claims.values()), {}
        for fd in claims:
            _release(fd)

    def stop_workers(self, names: set[str]) -> None:
        """Running tasks of these chunks were cancelled: a chunk with
        nothing left to run is removed from the engine (by the follower,
        at once: a job's thousands of batches make one removal)."""
        with self._lock:
            self._dropped.update(names)
        self._wake.set()

    def skip_tasks(self, worker: str, batch: Batch, task_ids: list[int]) -> None:
        self.stop_workers({worker})

    def worker_info(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": f"{c.name()}", "proc": c.proc, "host": c.host, "state": c.state}
                    for s in self._jobs.values() for c in s.chunks.values() if c.state in ("queued", "running")]

    def job_dir(self, job: Job) -> Path | None:
        """The directory of ``job`` (None before its first chunk)."""
        with self._lock:
            return self._dirs.get(job.id)

    def _prune(self) -> None:
        """Let go of what has ended: a finished job (its results are its
        caller's to keep), a submit() job's ended chunks."""
        finished: list[JobState] = []
        orphans: list[Chunk] = []
        with self._lock:
            for jid, state in list(self._jobs.items()):
                chunks = state.chunks
                if state.job.done() and not state.job.open_ended:
                    # Every task ended (cancelled while still queued here, say):
                    # nothing may stay in the engine's queue for it.
                    orphans += [c for c in chunks.values() if c.state != "ended"]
                ended = [c for c in chunks.values() if c.state == "ended"]
                if len(ended) < len(chunks) or not state.job.done() or state.job.open_ended:
                    if state.job.open_ended and len(ended) > 64:
                        for c in ended:
                            chunks.pop(c.index, None)
                            self._by_proc.pop(c.proc, None)
                            for seq in c.seqs:
                                if state.home.get(seq) is c:
                                    del state.home[seq]
                    continue
                del self._jobs[jid]
                for c in ended:
                    self._by_proc.pop(c.proc, None)
                finished.append(state)
        for chunk in orphans:
            self._end_chunk(chunk, remove=chunk.proc is not None)
        if orphans:
            return  # (the job is let go at the next look, once they are ended)
        for state in finished:
            self._record(state)
            with self._lock:
                fd = self._claims.pop(state.job.id, None)
            if fd is not None:
                _release(fd)
            close = getattr(self, "closed_job", None)
            if close is not None:
                close(state)

    def forget(self, job: Job) -> None:
        """Stop following ``job`` (it is being removed): its procs still in
        the engine's queue are removed now.

        A submission of the job under way ends first (the engine lock): what
        it made in the engine is then known here and removed with the rest.
        Let go while the engine was still making it, it would stay queued,
        and the job's files in the engine with it."""
        with self._engine_lock:
            with self._lock:
                state = self._jobs.pop(job.id, None)
                fd = self._claims.pop(job.id, None)
                if fd is not None:
                    _release(fd)
                if state is None:
                    return
                left = [c for c in state.chunks.values() if c.proc is not None and c.state != "ended"
                        or c.removing]
                for chunk in state.chunks.values():
                    self._by_proc.pop(chunk.proc, None)
                    chunk.state = "ended"
            if left:
                self._remove(left, "pymw: job removed")
        # Its log is closed and its engine state dropped as for a finished
        # job, by the follower (which may be reading that log right now:
        # closing it under the reader crashes the engine's bindings)
        with self._lock:
            self._closing.append(state)
        self._wake.set()
        if not any(t.is_alive() for t in self._threads):
            self._close_forgotten()

    def _close_forgotten(self) -> None:
        with self._lock:
            closing, self._closing = self._closing, []
        close = getattr(self, "closed_job", None)
        for state in closing:
            if close is not None:
                close(state)

    def wait_removed(self, directory: Path, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the engine holds no proc of
        the job in ``directory`` (its last events written: the directory
        can go).  Default: nothing to wait for."""
        return True

    # --- re-attaching a stored job ----------------------------------------------------------------
    def adopt(self, job: Job, handle: dict[str, Any],
              final: dict[int, tuple[str, str | None, str | None]] | None = None) -> None:
        """Follow a stored job again: ``job`` (made by the master, its tasks
        by input position) lives in the job directory of ``handle``; its
        chunks are found again from the handle, and from the directory for
        chunks the handle missed.  ``final``: tasks the store says ended
        without an output (failed, cancelled): they end so again."""
        jobdir = self.open_jobdir(handle["dir"])
        if jobdir.codec == "pickle" and not self.trusted_results:
            # (the job directory says how its nodes answer; reading their
            # pickles is an opt-in given again, never inferred from files)
            raise PymwError(f"job {job.name!r} was submitted with trusted_results=True: its nodes send "
                            f"pickled results, and unpickling them runs whatever those nodes wrote. "
                            f"attach({job.name!r}, trusted_results=True) reads them, if you control "
                            f"every node that ran it")
        state = JobState(job, jobdir)
        state.restored = dict(final or {})
        state.adopted = True
        state.caught_up = False
        state.uid = handle.get("uid")
        state.engine = dict(handle.get("engine") or {})
        for key, entry in (handle.get("chunks") or {}).items():
            index = int(key)
            chunk = Chunk(index, state, unranges(entry.get("seqs") or []))
            proc = entry.get("proc")
            chunk.proc = tuple(proc) if isinstance(proc, list) else proc
            chunk.attempt = int(entry.get("attempt") or 1)
            chunk.state = "queued" if chunk.proc is not None else "new"
            chunk.restored = True
            state.chunks[index] = chunk
        # Chunks written but not in the handle (the process died before recording them).
        for path in sorted((jobdir.path / "in").glob("*.in")):
            try:
                index = int(path.stem)
            except ValueError:
                continue
            if index not in state.chunks:
                seqs = jobdir.chunk_seqs(index)
                if seqs:
                    chunk = Chunk(index, state, list(seqs))
                    chunk.restored = True
                    state.chunks[index] = chunk
        # Every task in its newest chunk (a retried task's later chunk wins).
        for index in sorted(state.chunks):
            chunk = state.chunks[index]
            for seq in chunk.seqs:
                old = state.home.get(seq)
                if old is not None and old is not chunk:
                    old.tasks.pop(seq, None)
                    old.seqs = [s for s in old.seqs if s != seq]
                state.home[seq] = chunk
        state.next_index = max(state.chunks, default=-1) + 1
        # (before anything is followed or submitted again: another engine's
        # queue would resubmit chunks that still run where they were sent)
        fd = _claim(jobdir.path, job.name)
        try:
            self.check_adopted(state)
        except BaseException:
            _release(fd)
            raise
        with self._lock:
            self._claims[job.id] = fd
            self._jobs[job.id] = state
            self._dirs[job.id] = jobdir.path
            weakref.finalize(job, self._dirs.pop, job.id, None)
            for chunk in state.chunks.values():
                if chunk.proc is not None:
                    self._by_proc[chunk.proc] = chunk
        self.prepare(state)
        self._record(state)
        self._wake.set()

    # --- the pump: tasks -> chunks -> the engine ---------------------------------------------------
    def _pump(self) -> None:
        sched = self.scheduler
        while not self._stopping:
            taken: list[Batch] = []
            try:
                while True:
                    batch = sched.take(f"{self.name}#{next(self._names)}", block=False, start=False)
                    if batch is None:
                        break
                    taken.append(batch)
                if not taken:
                    sched.wait_for_work(0.5)
                    continue
                # A moment for the rest of a burst of submit() calls: one submit for all.
                if LINGER and not self._stopping:
                    time.sleep(LINGER)
                    while True:
                        batch = sched.take(f"{self.name}#{next(self._names)}", block=False, start=False)
                        if batch is None:
                            break
                        taken.append(batch)
                self._dispatch(taken)
            except Exception as exc:
                if not isinstance(exc, PymwError):  # (ours say what to do: in the tasks' errors)
                    _log.exception("pymw-magic: the %s backend failed to hand tasks to its engine", self.name)
                self._fail_batches(taken, exc)

    def _fail_batches(self, batches: list[Batch], exc: BaseException) -> None:
        for batch in batches:
            with self._lock:
                if self._batch_chunks.get(batch.id):
                    continue  # (in a chunk: its fate follows the chunk's)
            live = [t for t in batch.tasks if t.state not in FINAL_STATES]
            if live:
                self.scheduler.reject([(t, type(exc)(*exc.args) if isinstance(exc, PymwError)
                                        else BatchError(f"the {self.name} backend could not submit: {exc!r}"))
                                       for t in live])
            self.scheduler.discard(batch)
            with self._lock:
                self._worker_batch.pop(batch.worker, None)
            self._forget_worker(batch.worker)

    def _dispatch(self, batches: list[Batch]) -> None:
        """Group taken batches into chunks per job and submit the new ones."""
        fresh: dict[int, tuple[JobState, list[Task]]] = {}
        rebound: list[Chunk] = []
        with self._lock:
            for batch in batches:
                self._worker_batch[batch.worker] = batch.id
        for batch in batches:
            for task in batch.tasks:
                job = task.job
                state = self._state_for(job)
                with self._lock:
                    home = state.home.get(task.index)
                    if home is not None and home.state != "ended":
                        home.tasks[task.index] = task
                        home.batches[batch.id] = batch
                        self._batch_chunks.setdefault(batch.id, []).append(home)
                        rebound.append(home)
                        continue
                fresh.setdefault(job.id, (state, []))[1].append(task)
                with self._lock:
                    self._batch_chunks.setdefault(batch.id, [])
        by_task: dict[int, Batch] = {t.id: b for b in batches for t in b.tasks}
        for state, tasks in fresh.values():
            if not state.dir.path.is_dir():
                # Removed (pymw_magic.remove, the sidebar) while it ran here:
                # its tasks cannot be written again, nor run.
                self.scheduler.reject([(t, BatchError(
                    f"task {t.index} of job {state.job.name!r} cannot run again: the job was removed "
                    f"while it ran (its directory {state.dir.path} is gone)")) for t in tasks
                    if t.state not in FINAL_STATES])
                continue
            if state.adopted:
                # Taken before its chunk was written by the process that died:
                # its input is gone with that process.
                self.scheduler.reject([(t, BatchError(
                    f"task {t.index} of job {state.job.name!r} never reached {self.name}: the process that "
                    "submitted the job ended before writing it; run it again") ) for t in tasks
                    if t.state not in FINAL_STATES])
                continue
            self._new_chunks(state, tasks, by_task)
        # A job's chunks that are ready again go in one submit (one cluster).
        ready: dict[int, tuple[JobState, list[Chunk]]] = {}
        for chunk in dict.fromkeys(rebound):
            self._on_bound(chunk, ready)
        for state, chunks in ready.values():
            self._submit(state, chunks)
        self._settle_batches(batches)

    def _state_for(self, job: Job) -> JobState:
        with self._lock:
            state = self._jobs.get(job.id)
            if state is not None:
                return state
        name = f"{_safe_name(job.name)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        root = jobs_root()
        try:
            jobdir = self.create_jobdir(root, name)
        except OSError as exc:
            raise BatchError(f"the {self.name} backend cannot make the job's directory under {root}: "
                             f"{exc.strerror or exc}. Batch jobs live under $PYMW_HOME/jobs: set PYMW_HOME "
                             "to a directory you can write (before the master is made)") from None
        jobdir.write_function(job.fn)
        fd = _claim(jobdir.path, job.name)
        state = JobState(job, jobdir)
        with self._lock:
            self._claims[job.id] = fd
            self._jobs[job.id] = state
            self._dirs[job.id] = jobdir.path
        # (kept while the job lives, for job_dir(): a master running job
        # after job does not keep every directory's path)
        weakref.finalize(job, self._dirs.pop, job.id, None)
        self.prepare(state)
        return state

    def _new_chunks(self, state: JobState, tasks: list[Task], by_task: dict[int, Batch]) -> None:
        live = [t for t in tasks if t.state not in FINAL_STATES]
        size = chunk_size(len(live), chunksize=state.job.chunksize or self.chunksize,
                          mean=state.job.fn.mean, delay=self.delay())
        if state.job.timeout:
            size = 1 if not (state.job.chunksize or self.chunksize) else size
        chunks: list[Chunk] = []
        rejected: list[tuple[Task, BaseException]] = []
        for start in range(0, len(live), size):
            part = [t for t in live[start:start + size] if t.state not in FINAL_STATES]
            if not part:  # (cancelled meanwhile: thousands of chunk files for nothing)
                continue
            with self._lock:
                index = state.next_index
                state.next_index += 1
            try:
                state.dir.write_chunk(index, [(t.index, t.args, dict(t.kwargs)) for t in part])
            except PayloadError:
                good = []
                for t in part:  # find the culprits: they fail alone, the others go
                    try:
                        dumps((t.args, dict(t.kwargs)))
                        good.append(t)
                    except Exception as exc:
                        rejected.append((t, PayloadError(f"an argument of task {t.index} cannot be sent to "
                                                         f"the {self.name} nodes: {exc}")))
                if not good:
                    continue
                part = good
                state.dir.write_chunk(index, [(t.index, t.args, dict(t.kwargs)) for t in part])
            chunk = Chunk(index, state, [t.index for t in part])
            for t in part:
                chunk.tasks[t.index] = t
                b = by_task[t.id]
                chunk.batches[b.id] = b
            with self._lock:
                state.chunks[index] = chunk
                for t in part:
                    state.home[t.index] = chunk
                for b in chunk.batches.values():
                    self._batch_chunks.setdefault(b.id, []).append(chunk)
            chunks.append(chunk)
        if rejected:
            self.scheduler.reject(rejected)
            self._settle_batches({b.id: b for t, _ in rejected for b in [by_task[t.id]]}.values())
        if chunks:
            self._submit(state, chunks)

    def _submit(self, state: JobState, chunks: list[Chunk]) -> None:
        with self._lock:  # (the pump and the follower may both find a chunk ready)
            chunks = [c for c in chunks if c.state == "new" and c.live()]
            for c in chunks:
                c.state = "submitting"
        if not chunks:
            return
        if not state.recorded:
            # The job directory and its chunks reach the store before the
            # engine: a process killed during a (slow) submit leaves a job
            # that attach finds, its procs named by their submit notes.
            self._record(state, flush=True)
        try:
            with self._engine_lock:
                with self._lock:
                    # (forgotten while this waited for the engine: not submitted)
                    chunks = [c for c in chunks if c.state == "submitting"]
                if not chunks:
                    return
                procs = self.submit(state, chunks)
                now = time.time()
                with self._lock:
                    for chunk, proc in zip(chunks, procs):
                        chunk.proc = proc
                        chunk.state = "queued"
                        chunk.submitted = now
                        self._by_proc[proc] = chunk
                    # Cancelled while it was being submitted: it goes at once.
                    dead = [c for c in chunks if not c.live()]
        except Exception as exc:
            error = exc if isinstance(exc, PymwError) else BatchError(
                f"submitting {len(chunks)} chunk(s) of job {state.job.name!r} to {self.name} failed: {exc}")
            for chunk in chunks:
                self._end_chunk(chunk, failure=error)
            return
        if dead:
            self._remove(dead, "pymw: cancelled")
            for c in dead:
                self._end_chunk(c)
        # At once, not at the next flush: a process killed now leaves a job
        # that a later attach can find.
        self._record(state, flush=True)
        self._wake.set()

    def _on_bound(self, chunk: Chunk, ready: dict[int, tuple[JobState, list[Chunk]]] | None = None) -> None:
        """Every task of a restored (or requeued) chunk is in hand again.
        ``ready``: where a chunk to submit is put (by job), to be submitted
        with the others, instead of alone."""
        if not chunk.bound:
            return
        if not chunk.live() and chunk.state != "ended":
            # Cancelled before it was handed over again: its proc goes.
            self._end_chunk(chunk, remove=chunk.proc is not None)
            return
        if chunk.state == "new":
            if chunk.job.caught_up:  # (else: once the log is read, it may show it submitted)
                if ready is None:
                    self._submit(chunk.job, [chunk])
                else:
                    ready.setdefault(id(chunk.job), (chunk.job, []))[1].append(chunk)
            return
        if chunk.restored and chunk.state != "ended":
            # Results written while nobody watched are read first.
            if chunk.job.dir.output_path(chunk.index).exists():
                self._finish(chunk, BatchEvent("finished", chunk.proc), early=True)
                if chunk.state == "ended":
                    return
        seen = chunk.job.restored
        for seq in chunk.seqs:
            if seen.get(seq, ("",))[0] == "running":
                chunk.host = chunk.host or seen[seq][1]
                if chunk.state == "queued":
                    chunk.state = "running"
                seen.pop(seq, None)
        deferred, chunk.deferred = chunk.deferred, []
        for event in deferred:
            self._apply(chunk, event)
        if chunk.state == "running":
            self._start_chunk(chunk)
        self._restore_final(chunk)

    def _restore_final(self, chunk: Chunk) -> None:
        """A restored chunk's tasks the store says ended without an output end so again."""
        restored = chunk.job.restored
        if not restored:
            return
        failed, cancelled = [], []
        for seq, task in chunk.tasks.items():
            if task is None or task.state in FINAL_STATES or seq not in restored \
                    or restored[seq][0] not in ("failed", "cancelled"):
                continue
            kind, error, tb = restored.pop(seq)
            if kind == "cancelled":
                cancelled.append(task)
            else:
                exc = BatchError(error or "failed (recorded before this job was attached)")
                if tb:
                    from ..errors import RemoteTraceback
                    exc.__cause__ = RemoteTraceback(tb)
                failed.append((task, exc))
        if failed:
            self.scheduler.reject(failed)
        if cancelled:
            self.scheduler.cancel(cancelled, stop_running=False)
        if failed or cancelled:
            if not chunk.live():
                self._end_chunk(chunk)

    # --- the follower: engine events -> task states ---------------------------------------------
    def _follow(self) -> None:
        while True:
            if self._closing:
                self._close_forgotten()
            with self._lock:
                dropped, self._dropped = self._dropped, set()
            if dropped:
                self._drop_dead(dropped)
            with self._lock:
                states = [s for s in self._jobs.values() if not s.caught_up or any(
                    c.state in ("queued", "running") for c in s.chunks.values())]
            if self._stopping:
                return
            if not states:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                events = self.poll_events(states, 1.0)
                if time.monotonic() - self._last_safety >= self.safety_interval:
                    self._last_safety = time.monotonic()
                    events += self.safety_check(states)
            except Exception as exc:
                broken = getattr(exc, "state", None)
                self._engine_broken([broken] if broken in states else states, exc)
                continue
            touched: dict[int, JobState] = {}
            for state, event in events:
                with self._lock:
                    chunk = self._by_proc.get(event.proc)
                    if chunk is None and event.kind == "submitted" and event.notes:
                        chunk = self._chunk_from_notes(state, event)
                if chunk is None or chunk.job is not state:
                    continue
                touched[id(state)] = state
                if not chunk.bound:
                    chunk.deferred.append(event)
                    continue
                try:
                    self._apply(chunk, event)
                except Exception:
                    _log.exception("pymw-magic: %s: handling %s of %s failed", self.name, event.kind, chunk.name())
            for state in touched.values():
                self._record(state)
            for state in states:
                if not state.caught_up:
                    self._caught_up(state)
            self._prune()
            # (nothing of a finished job stays referenced while this thread waits)
            events = touched = state = event = chunk = states = None  # type: ignore[assignment]

    def _caught_up(self, state: JobState) -> None:
        """An adopted job's log is read to its end: its chunks still
        unsubmitted (no proc in the handle nor in the log) go now."""
        state.caught_up = True
        with self._lock:
            ready = [c for c in state.chunks.values() if c.state == "new" and c.bound]
        if ready:
            self._submit(state, ready)

    def _chunk_from_notes(self, state: JobState, event: BatchEvent) -> Chunk | None:
        """Under the lock: a proc the handle missed, named by its submit note."""
        m = re.search(r"chunk (\d+)", event.notes or "")
        if not m:
            return None
        chunk = state.chunks.get(int(m.group(1)))
        if chunk is not None and chunk.proc is None:
            chunk.proc = event.proc
            chunk.state = "queued"
            self._by_proc[event.proc] = chunk
            return chunk
        return None

    def _engine_broken(self, states: list[JobState], exc: BaseException) -> None:
        """The event source failed for good (a corrupted log): the chunks it
        followed fail with its error, which names the file."""
        _log.error("pymw-magic: %s: %s", self.name, exc)
        for state in states:
            state.caught_up = True  # (its log is read no more: an adopted job is not polled for ever)
        error = BatchError(str(exc)) if not isinstance(exc, PymwError) else exc
        for state in states:
            for chunk in list(state.chunks.values()):
                if chunk.state in ("queued", "running"):
                    self._end_chunk(chunk, failure=type(error)(*error.args), remove=True)

    def _apply(self, chunk: Chunk, event: BatchEvent) -> None:
        if chunk.state == "ended" or event.proc != chunk.proc:
            return
        kind = event.kind
        if kind == "running":
            chunk.host = event.host
            if chunk.submitted is not None and not chunk.restored:
                lag = max(0.0, time.time() - chunk.submitted)
                self._delay = lag if self._delay is None else 0.8 * self._delay + 0.2 * lag
            chunk.state = "running"
            self._start_chunk(chunk)
        elif kind == "finished":
            self._finish(chunk, event)
        elif kind == "held":
            if event.timeout:
                limit = chunk.job.job.timeout
                self._end_chunk(chunk, failure=TaskTimeout(
                    f"{chunk.name()} ran longer than its limit ({limit} s per task) and was stopped by "
                    f"{self.name}: {event.reason}"), remove=True)
                return
            if self.hold_is_final(event):
                self._end_chunk(chunk, failure=self.held_error(chunk, event), remove=True)
                return
            self._proc_failed(chunk, self.held_error(chunk, event), remove=True)
        elif kind == "evicted":
            self._evicted(chunk, event)
        elif kind == "aborted":
            if chunk.removing:
                self._end_chunk(chunk)
                return
            live = chunk.live()
            if live:
                self.scheduler.cancel(live, stop_running=False)
                running = [t for t in live if t.state is RUNNING]
                if running:  # (cancel leaves running tasks alone when asked to)
                    self.scheduler.cancel(running, stop_running=True)
            self._end_chunk(chunk)
        elif kind == "gone":
            if chunk.job.dir.output_path(chunk.index).exists():
                self._finish(chunk, BatchEvent("finished", chunk.proc))
            else:
                self._proc_failed(chunk, BatchError(
                    f"{chunk.name()} (proc {_proc_text(chunk.proc)}) left the {self.name} queue without a "
                    f"result and without an event in its log{': ' + event.reason if event.reason else ''}"),
                    remove=False)
        elif kind == "released":
            chunk.state = "queued"

    def too_large(self, chunk: Chunk, exc: OutputTooLarge) -> str:
        """What a chunk whose output is over ``max_output_mb`` fails with:
        the file, its size, the cap, and how to raise it."""
        need = math.ceil(exc.size / (1 << 20) + 1)
        return (f"{chunk.name()} (proc {_proc_text(chunk.proc)}): its output file {exc.path} is {exc.size} bytes, "
                f"over the cap of {exc.cap} bytes (max_output_mb={self.max_output_mb:g}); it was not read. If "
                f"the tasks' results are meant to be this big, raise the cap and run them again: "
                f"Master({self.name!r}, max_output_mb={need}, ...) or '%pymw use {self.name} --max-output-mb "
                f"{need}' (a job not yet ended: attach(name, max_output_mb={need})); large arrays travel best "
                f"as NumPy arrays")

    def held_error(self, chunk: Chunk, event: BatchEvent) -> BaseException:
        return BatchError(f"{chunk.name()} was held: {event.reason}")

    def hold_is_final(self, event: BatchEvent) -> bool:
        """Whether a hold would come again on any retry (its chunk fails at
        once, as an output over the cap does): the engine's say."""
        return False

    def _start_chunk(self, chunk: Chunk) -> None:
        for batch in list(chunk.batches.values()):
            if batch.started:
                continue
            self.scheduler.worker_started(batch.worker, chunk.host)
            self.scheduler.start(batch)

    def _evicted(self, chunk: Chunk, event: BatchEvent) -> None:
        """The engine runs the proc again by itself: its tasks are retrying
        (charged an attempt: "evicted too often" fails them)."""
        chunk.state = "queued"
        self._requeue_started(chunk, f"evicted by {self.name}: {event.reason or 'no reason given'}")
        if chunk.bound and not chunk.live():
            self._end_chunk(chunk, remove=True)

    def _proc_failed(self, chunk: Chunk, error: BaseException, remove: bool) -> None:
        """A proc failed beyond repair: its chunk is submitted again as a new
        proc while the job's ``retries`` allow (its running tasks are
        retrying meanwhile), else its tasks fail with ``error``."""
        retries = chunk.job.job.retries
        if not (chunk.attempt <= retries and chunk.live()):
            self._end_chunk(chunk, failure=error, remove=remove)
            return
        if remove:
            self._remove([chunk], f"pymw: {chunk.name()} failed; submitted again")
        _log.warning("pymw-magic: %s: %s; submitted again (attempt %d of %s)", self.name, error,
                     chunk.attempt + 1, 1 + retries)
        with self._lock:
            self._by_proc.pop(chunk.proc, None)
            chunk.proc = None
            chunk.removing = False
            chunk.attempt += 1
            chunk.state = "new"
            chunk.deferred = []
        try:
            chunk.job.dir.output_path(chunk.index).unlink()
        except OSError:
            pass
        self._requeue_started(chunk, f"{chunk.name()} failed on {self.name}: {error}")
        if chunk.bound:
            self._on_bound(chunk)

    def _requeue_started(self, chunk: Chunk, detail: str) -> None:
        """The chunk's started tasks go back to the scheduler (retrying, an
        attempt charged; failed once their retries are used up) and come
        back to this chunk when it hands them over again."""
        with self._lock:
            batches = [b for b in chunk.batches.values() if b.started]
            moved: list[tuple[int, Task]] = []
            for b in batches:
                chunk.batches.pop(b.id, None)
                self._batch_chunks.pop(b.id, None)
                self._batch_outcomes.pop(b.id, None)
                for t in b.tasks:
                    if chunk.tasks.get(t.index) is t:
                        chunk.tasks[t.index] = None
                        moved.append((t.index, t))
        for b in batches:
            culprit = b.tasks[0].id if len(b.tasks) == 1 else None
            self.scheduler.lost([b], culprit, "died", detail)
            with self._lock:
                self._worker_batch.pop(b.worker, None)
            self._forget_worker(b.worker)
        with self._lock:
            for seq, t in moved:
                if t.state in FINAL_STATES and chunk.tasks.get(seq) is None:
                    chunk.tasks[seq] = t  # failed for good: it will not come back
        self._wake.set()

    def _finish(self, chunk: Chunk, event: BatchEvent, early: bool = False) -> None:
        """The proc ended: complete its tasks from its verified output.
        ``early``: read before the engine said how the proc ended; an
        unusable or oversize output then waits for that word (the file of a
        proc held for it, cut at the engine's transfer limit: the hold decides,
        and the held proc leaves the queue)."""
        try:
            try:
                self.fetch_output(chunk)
            except OutputTooLarge:
                raise
            except Exception as exc:
                _log.warning("pymw-magic: %s: fetching the output of %s failed: %s", self.name, chunk.name(), exc)
            output = chunk.job.dir.read_output(chunk.index, max_bytes=self.max_output_bytes)
        except OutputTooLarge as exc:
            if early:
                return
            # (not retried: the same tasks would write the same output again)
            self._end_chunk(chunk, failure=BatchError(self.too_large(chunk, exc)))
            return
        except (OutputMissing, OutputCorrupt) as exc:
            if early:
                return
            how = "normally" if event.normal else "abnormally"
            code = "" if event.code is None else (f" (return value {event.code})" if event.normal
                                                  else f" (signal {event.code})")
            self._proc_failed(chunk, BatchError(
                f"{chunk.name()} (proc {_proc_text(chunk.proc)}) ended {how}{code} without a usable "
                f"result: {exc}"), remove=False)
            return
        outcomes = {o.seq: o for o in output.outcomes}
        chunk.host = chunk.host or output.host
        self._start_chunk(chunk)  # (a restored chunk, or a missed execute event)
        with self._lock:
            for seq, task in chunk.tasks.items():
                if task is None:
                    continue
                o = outcomes.get(seq)
                outcome = (o.ok, o.value, _failure(o.failure), o.stdout, o.stderr, o.start, o.end) if o is not None else \
                    (False, None, (None, "BatchError", f"{chunk.name()}: the output has no outcome for task "
                                   f"{seq}", ""), "", "", output.started, output.ended)
                for b in chunk.batches.values():
                    if task in b.tasks:
                        self._batch_outcomes.setdefault(b.id, {})[task.id] = outcome
        self._end_chunk(chunk)

    def _end_chunk(self, chunk: Chunk, failure: BaseException | None = None, remove: bool = False) -> None:
        """The chunk is over: fail what has no outcome (with ``failure``),
        and report each of its batches whose every task is settled."""
        with self._lock:
            if chunk.state == "ended" and failure is None:
                pass
            chunk.state = "ended"
        if remove:
            self._remove([chunk], f"pymw: {chunk.name()} ended")
        if failure is not None:
            with self._lock:
                outcomes = self._batch_outcomes
                rejected = [t for b in chunk.batches.values() for t in b.tasks
                            if chunk.tasks.get(t.index) is t and t.id not in outcomes.get(b.id, {})
                            and t.state not in FINAL_STATES]
            if rejected:
                self.scheduler.reject([(t, _copy_error(failure)) for t in rejected])
        self._settle_batches(list(chunk.batches.values()))

    def _settle_batches(self, batches: Iterable[Batch]) -> None:
        """Report each batch whose tasks all have an outcome or have ended."""
        for batch in list(batches):
            with self._lock:
                if batch.id not in self._batch_chunks:
                    continue
                got = self._batch_outcomes.get(batch.id, {})
                if not all(t.id in got or t.state in FINAL_STATES for t in batch.tasks):
                    continue
                del self._batch_chunks[batch.id]
                self._batch_outcomes.pop(batch.id, None)
                self._worker_batch.pop(batch.worker, None)
            ran = [t for t in batch.tasks if t.id in got]
            if not ran:
                self.scheduler.discard(batch)
                self._forget_worker(batch.worker)
                continue
            values, ends, failures, outputs = [], [], {}, {}
            t_start = None
            for i, t in enumerate(batch.tasks):
                o = got.get(t.id)
                if o is None:
                    values.append(None)
                    ends.append(ends[-1] if ends else time.time())
                    continue
                ok, value, failure, out, err, start, end = o
                if t_start is None:
                    t_start = start
                values.append(value if ok else None)
                ends.append(end)
                if not ok:
                    failures[i] = failure
                if out or err:
                    outputs[i] = (out, err)
            self.scheduler.completed(batch, t_start if t_start is not None else time.time(), ends, values,
                                     failures, outputs)
            self._forget_worker(batch.worker)

    def _forget_worker(self, name: str) -> None:
        """A chunk's worker name asks for work no more: the scheduler drops
        it from its per-worker maps (each batch has a fresh name: a job of
        thousands of chunks would grow them for ever)."""
        forget = getattr(self.scheduler, "forget_worker", None)
        if forget is not None:  # (a scheduler without it keeps them)
            forget(name)

    # --- removing --------------------------------------------------------------------------------
    def _drop_dead(self, names: set[str]) -> None:
        """Chunks holding tasks of these batches with nothing left to run go."""
        with self._lock:
            chunks = {id(c): c for name in names for c in self._batch_chunks.get(self._worker_batch.get(name, -1), ())}
            dead = [c for c in chunks.values() if c.state in ("queued", "running") and c.bound and not c.live()]
        if dead:
            for c in dead:
                c.removing = True
            self._remove(dead, "pymw: cancelled")
            for c in dead:
                self._end_chunk(c)

    def _remove(self, chunks: list[Chunk], reason: str) -> None:
        by_state: dict[int, tuple[JobState, list[Any]]] = {}
        for c in chunks:
            c.removing = True
            if c.proc is not None:
                by_state.setdefault(id(c.job), (c.job, []))[1].append(c.proc)
        for state, procs in by_state.values():
            try:
                with self._engine_lock:
                    self.remove(state, procs, reason)
            except Exception as exc:
                _log.warning("pymw-magic: %s: removing %d proc(s) of job %r failed: %s", self.name, len(procs),
                             state.job.name, exc)

    # --- the store --------------------------------------------------------------------------------
    def delay(self) -> float:
        """The engine's scheduling delay: measured, or the class's default."""
        return self.scheduling_delay if self._delay is None else self._delay

    def _record(self, state: JobState, flush: bool = False) -> None:
        source = _recorder_source
        if source is None:
            return
        try:
            recorder = source(state.job)
            if recorder is None:
                return
            with self._lock:  # (the pump adds chunks meanwhile)
                handle = state.handle()
            handle.update(backend=self.name, engine=self.engine_handle(state),
                          options=_json_options(self.backend_options))
            if not state.recorded:
                # (the recorder must not keep a finished job alive: the
                # locator holds the job's directory only)
                out_dir = str(state.dir.output_path(0).parent)
                ref = weakref.ref(state)
                kwargs: dict[str, Any] = dict(tasks=True, handle=handle,
                                              locate=lambda task, ref=ref, d=out_dir: _locate(ref(), task, d))
                if state.uid:  # an attached job keeps its row
                    try:
                        recorder.track(state.job, uid=state.uid, **kwargs)
                    except TypeError:  # (a store without uid=: a new row)
                        recorder.track(state.job, **kwargs)
                else:
                    recorder.track(state.job, **kwargs)
                state.recorded = True
            else:
                recorder.set_handle(state.job, **handle)
            if flush:
                recorder.flush()
        except Exception as exc:  # the store never breaks a computation
            _log.warning("pymw-magic: recording job %r in the job store failed: %s", state.job.name, exc)

    def _record_all(self, flush: bool = False) -> None:
        with self._lock:
            states = list(self._jobs.values())
        for state in states:
            self._record(state, flush=flush)


def _json_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options a later ``attach`` can give again (what JSON holds as it is)."""
    import json
    out = {}
    for key, value in options.items():
        try:
            if json.loads(json.dumps(value)) == value:
                out[key] = value
        except (TypeError, ValueError):
            pass
    return out


def _locate(state: JobState | None, task: Task, out_dir: str) -> str | None:
    """Where ``task``'s result is kept: its chunk's output file (once the
    job is let go, the job directory's output folder)."""
    if state is None:
        return out_dir
    chunk = state.home.get(task.index)
    return None if chunk is None else chunk.output()


#: the lock file in a job directory held by the process following the job
FOLLOW_LOCK = "follow.lock"


def _claim(directory: Path, name: str) -> int:
    """Lock ``directory``'s follow lock for this process (released when the
    job is let go, or by the kernel when the process dies, even by SIGKILL);
    a :class:`PymwError` naming the process that holds it."""
    path = Path(directory) / FOLLOW_LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        if holder == str(os.getpid()):
            raise PymwError(f"job {name!r} is followed by another master of this process already: use that "
                            "job (pymw_magic.jobs() lists it), or shut its master down first") from None
        raise PymwError(f"job {name!r} is followed by another process (pid {holder}) already: one process "
                        f"at a time follows a batch job (two would both resubmit its failed chunks). Use it "
                        f"there, or end that process (its procs go on) and attach again") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass
    return fd


def _release(fd: int) -> None:
    try:
        os.close(fd)  # (closing the only descriptor drops the lock)
    except OSError:
        pass


def _failure(failure: tuple | None) -> tuple | None:
    """A task's failure as the scheduler takes it: one that came back
    without a pickled exception (the safe codec) and names a built-in type
    gets that type again (made here, never read from the node)."""
    if failure is None or failure[0] is not None:
        return failure
    return (_builtin_exception(failure[1], failure[2]),) + tuple(failure[1:])


def _builtin_exception(name: Any, message: Any) -> bytes | None:
    """A task's failure named by a built-in exception type (ValueError,
    KeyError, ...) made again here from its name and message, pickled by
    the master itself: ``except ValueError`` still catches it, and nothing
    a node wrote is unpickled.  None for any other type (the failure is then
    a TaskFailed naming the type)."""
    if type(name) is not str or "." in name:
        return None
    cls = getattr(builtins, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)) or issubclass(cls, Warning):
        return None
    text = str(message)
    args: tuple = (text,)
    if cls is KeyError and len(text) < 4096:  # (its message is the key's repr)
        try:
            args = (ast.literal_eval(text),)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    try:
        return pickle.dumps(cls(*args), protocol=5)
    except Exception:  # (a built-in whose constructor wants more: UnicodeDecodeError)
        return None


def _proc_text(proc: Any) -> str:
    return ".".join(map(str, proc)) if isinstance(proc, tuple) else str(proc)


def _copy_error(exc: BaseException) -> BaseException:
    """One exception object per task (each gets its own note)."""
    try:
        new = type(exc)(*exc.args)
        new.__dict__.update(getattr(exc, "__dict__", {}))
        return new
    except Exception:
        return BatchError(str(exc))


__all__ = ["BatchBackend", "BatchEvent", "BatchError", "BackendMissing", "Chunk", "JobState", "chunk_size",
           "set_store_hooks", "jobs_root", "JOB_WINDOW", "MAX_PROCS"]
