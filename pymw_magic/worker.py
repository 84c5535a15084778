"""The worker runtime: ``python -m pymw_magic.worker``, the one entry point
every backend starts.

Modes::

    python -m pymw_magic.worker pipe --in FD --out FD --lifeline FD --slot-fd FD
                                     [--shm-in FD --shm-out FD]
        a long-lived channel loop (the local backend): read a signed batch,
        run it, write a signed reply, until told to stop or the master dies;
        with the two segment sockets, large buffers travel in shared memory.
    mpiexec -n N+1 python -m pymw_magic.worker mpi-hub --socket PATH
        an MPI job for a notebook kernel (the MPI backend): rank 0 routes
        signed frames between the kernel's Unix socket and ranks 1..N, which
        run the same channel loop over MPI messages.
    python -m pymw_magic.worker run IN OUT [--function F] [--key K]
        the batch backends (HTCondor, BOINC): one signed input file in, one
        output file out, then exit (:mod:`pymw_magic.oneshot`; the same as
        the shipped ``pymw-runtime.pyz run ...``).

Who does what here:

* :func:`serve` — the channel loop: verify-then-unpickle each frame, keep
  the job functions it was sent (each arrives once, and is dropped when
  the master says to forget it), run batches, reply;
* :class:`BatchRunner` — runs one batch: a fresh copy of the function for
  each job (what it captured does not leak from one job to the next), the
  job's directory, ``sys.path`` and reloaded modules applied first,
  per-task stdout/stderr capture,
  per-task end times, exceptions with their traceback text, and the
  *slot* (the seq and start time of the task now running, in shared memory,
  so the master knows which task was to blame if this process dies and
  when the running task started, for timeouts);
* the lifeline thread — exits the process when the master goes away, even
  in the middle of a long task, so no worker outlives its master;
* the task's own processes — a worker is the subreaper of what its tasks
  start, kills it when it exits (a "stop", the lifeline, SIGTERM) and
  after each batch (what a finished task left running), sparing only
  multiprocessing's resource tracker and forkserver;
  :func:`kill_task_processes` is what its master uses from outside.

Messages (tuples; all inside signed frames)::

    master → worker   ("run", batch_id, [(fn_id, fn_bytes, env, module_stamps)...], seqs, fn_ids,
                       args, kwargs, job_ids, forget_fn_ids)
                                                 fn_ids, job_ids: one int for the batch or one per task
                                                 kwargs: None, one dict|None per task, or
                                                 BARE_ARGS (args: one bare argument per task)
                      ("skip", batch_id, seqs)   tasks of a batch sent ahead, cancelled since:
                                                 not to be run (their results come back as None)
                      ("stop",)
    worker → master   ("ready", pid, hostname)
                      ("done", batch_id, t_start, ends, values, failures, outputs)
                      ("broken", reason)   the next batch could not be unpickled here

``failures`` maps a position in the batch to ``(exc_bytes | None, type
name, message, traceback text)``; ``outputs`` maps a position to
``(stdout, stderr)`` for the tasks that printed anything.
"""

from __future__ import annotations

import argparse
import importlib
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from array import array
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import cloudpickle

from .environment import Follower, StaleModule, WorkerEnv
from .errors import PayloadError, SignatureError
from .payload import PROTOCOL, Signer, loads, type_name
from .reaper import become_subreaper, children_of, has_children, is_runtime_helper, reap_children

SLOT = struct.Struct("<qd")  # (seq of the running task or -1, its start time)
IDLE = -1
#: a "run" message's ``kwargs`` when each item of ``args`` is the one
#: positional argument of its call, bare (a map over one iterable); such
#: a batch's ``seqs`` may be a range, and its reply's ``ends`` an array
BARE_ARGS = 1


class Slot:
    """16 bytes shared with the master: which task runs now, since when."""

    def __init__(self, path: str | None = None, fd: int | None = None):
        """The slot in the file at ``path``, or in the open file ``fd``
        (taken over and closed once mapped); neither: no slot."""
        self._mm = None
        #: the two fields as native views (None: pack them), for the per-task write
        self._seq: memoryview | None = None
        self._started: memoryview | None = None
        if fd is not None:
            with open(fd, "r+b") as f:
                self._mm = mmap.mmap(f.fileno(), SLOT.size)
        elif path:
            with open(path, "r+b") as f:
                self._mm = mmap.mmap(f.fileno(), SLOT.size)
        if self._mm is not None:
            if sys.byteorder == "little" and struct.calcsize("=q") == 8:  # (SLOT's layout natively)
                raw = memoryview(self._mm)
                self._seq, self._started = raw[0:8].cast("q"), raw[8:16].cast("d")

    def set(self, seq: int, started: float) -> None:
        if self._seq is not None:
            # Two item stores instead of a pack (a tiny task's largest cost
            # here); the start time first: a reader that sees the new time
            # beside the old seq finds that task younger, never older (a
            # timeout is never hastened), and reads again until both agree.
            self._started[0] = started  # type: ignore[index]
            self._seq[0] = seq
        elif self._mm is not None:
            SLOT.pack_into(self._mm, 0, seq, started)


def read_slot(buf: Any) -> tuple[int, float] | None:
    """(seq, start time) of the task a worker's slot says is running, or
    None when idle.  The 16 bytes are not written atomically: a read is
    repeated until two agree, and a half-written start time (0.0) reads as
    "just starting", never as a task that has run since 1970."""
    got = SLOT.unpack_from(buf, 0)
    for _ in range(8):
        again = SLOT.unpack_from(buf, 0)
        if again == got:
            break
        got = again
    seq, started = got
    return None if seq == IDLE or started <= 0.0 else (seq, started)


class _Capture:
    """A stand-in for sys.stdout/stderr that collects text cheaply; the
    runner checks ``parts`` after each task and only pays when it printed."""

    def __init__(self, real: Any):
        self.parts: list[str] = []
        self._real = real

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return getattr(self._real, "encoding", "utf-8")

    def take(self) -> str:
        text = "".join(self.parts)
        self.parts.clear()
        return text


def describe_failure(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    """An exception as it travels home: its pickle if it has one, its type
    name, message and the traceback text the notebook will show."""
    frames = exc.__traceback__
    if frames is not None and frames.tb_frame.f_code.co_filename == __file__:
        frames = frames.tb_next  # start the story at the task, not at our loop
    tb = "".join(traceback.format_exception(type(exc), exc, frames))
    try:
        data = cloudpickle.dumps(exc, protocol=PROTOCOL)
        pickle_ok = True
    except Exception:
        data, pickle_ok = None, False
    if pickle_ok:
        try:
            loads(data)  # some exceptions pickle but cannot be rebuilt
        except Exception:
            data = None
    return data, type_name(exc), str(exc), tb


class BatchRunner:
    """Runs batches with the functions the master sent.

    A function arrives once, as bytes; each *job* gets its own copy,
    unpickled the first time one of its tasks runs here: what a function
    captured starts fresh for every job, and only tasks of the same job
    that run on this worker can see each other's changes to it.  Before a
    copy is made the job's environment is applied and modules it uses that
    changed are reloaded (:class:`~pymw_magic.environment.Follower`).
    """

    #: copies (jobs) kept per function; an older job's next task gets a new copy
    INSTANCES_PER_FUNCTION = 4

    def __init__(self, slot: Slot):
        self.slot = slot
        # fn id -> (pickled bytes, env, module stamps)
        self.payloads: dict[int, tuple[bytes, WorkerEnv | None, tuple]] = {}
        # fn id -> {job id: that job's copy of the function}
        self.instances: dict[int, dict[int, Callable]] = {}
        self.follower = Follower()

    @property
    def functions(self) -> dict[int, Callable]:
        """The newest copy of each function (for inspection)."""
        return {i: next(reversed(c.values())) for i, c in self.instances.items() if c}

    def learn(self, fns: list[tuple], forget: Iterable[int] = ()) -> None:
        for fn_id in forget:
            self.payloads.pop(fn_id, None)
            self.instances.pop(fn_id, None)
        for item in fns:
            fn_id, data = item[0], item[1]
            env = self.follower.intern(item[2]) if len(item) > 2 else None
            modules = tuple(item[3]) if len(item) > 3 else ()
            self.payloads[fn_id] = (data, env, modules)
            self.instances.pop(fn_id, None)

    def instance(self, fn_id: int, job: int) -> Callable:
        """Job ``job``'s copy of function ``fn_id``, made on first use.
        Call with the function's env applied (:meth:`enter`)."""
        copies = self.instances.get(fn_id)
        if copies is not None:
            fn = copies.get(job)
            if fn is not None:
                return fn
        else:
            copies = self.instances[fn_id] = {}
        data, _, modules = self.payloads[fn_id]
        try:
            self.follower.refresh(modules)
            try:
                fn = loads(data)
            except ImportError:
                importlib.invalidate_caches()  # a module written since a directory was listed
                fn = loads(data)
        except Exception as exc:
            # Every task of this job fails with the reason; the worker itself stays up.
            fn = _unloadable(exc)
        self.follower.note_imports()
        if len(copies) >= self.INSTANCES_PER_FUNCTION:
            del copies[next(iter(copies))]
        copies[job] = fn
        return fn

    def enter(self, fn_id: int, job: int) -> str | None:
        """Apply the env of function ``fn_id`` (in full for a job new here:
        a task of another may have moved); a warning to show, or None."""
        payload = self.payloads.get(fn_id)
        if payload is None:
            return None
        copies = self.instances.get(fn_id)
        return self.follower.apply(payload[1], force=copies is None or job not in copies)

    def run(self, seqs: list[int], fn_ids: list[int] | int, args: list[tuple],
            kwargs: list[dict | None] | None, skip: frozenset[int] = frozenset(),
            jobs: list[int] | int = 0) -> tuple[float, list, list, dict, dict]:
        slot = self.slot
        out, err = _Capture(sys.stdout), _Capture(sys.stderr)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        ends: list[float] | array = []
        values: list[Any] = []
        failures: dict[int, tuple] = {}
        outputs: dict[int, tuple[str, str]] = {}
        clock = time.time
        uniform = isinstance(fn_ids, int)
        bare = kwargs is BARE_ARGS or (type(kwargs) is int and kwargs == BARE_ARGS)
        if bare:
            kwargs = None
        t_start = clock()
        try:
            if uniform:
                job = jobs if isinstance(jobs, int) else jobs[0]
                warning = self.enter(fn_ids, job)
                if warning:
                    err.write(warning)
                fn = self.instance(fn_ids, job)
            last: tuple[int, int] | None = None
            if uniform and not skip and kwargs is None and slot._seq is not None:
                # The common case of tiny tasks, with the same records: a
                # task starts when the one before it ended.
                # (the clock read anew: loading the function above may have
                # imported modules, which is not the first task's time to run)
                if bare:
                    # (answered compactly too: the end times as one
                    # array, pickled as its bytes, not one float each)
                    ends = array("d")
                    self._run_bare(fn, seqs, args, ends, values, failures, outputs, out, err, clock())
                else:
                    self._run_plain(fn, seqs, args, ends, values, failures, outputs, out, err, clock())
                seqs = ()
            elif bare:
                args = [(a,) for a in args]  # (the general loop below takes tuples)
            for i, seq in enumerate(seqs):
                if skip and seq in skip:
                    values.append(None)
                    ends.append(clock())
                    continue
                if uniform:
                    f = fn
                else:
                    key = (fn_ids[i], jobs if isinstance(jobs, int) else jobs[i])
                    if key != last:
                        warning = self.enter(*key)
                        if warning:
                            err.write(warning)
                        f, last = self.instance(*key), key
                slot.set(seq, clock())
                kw = kwargs[i] if kwargs is not None else None
                try:
                    values.append(f(*args[i], **kw) if kw else f(*args[i]))
                except BaseException as exc:  # SystemExit too: the worker must survive it
                    values.append(None)
                    failures[i] = describe_failure(exc)
                ends.append(clock())
                if out.parts or err.parts:
                    outputs[i] = (out.take(), err.take())
        finally:
            sys.stdout, sys.stderr = saved
            slot.set(IDLE, 0.0)
        self.follower.note_imports()  # (a task may import a module itself)
        return t_start, ends, values, failures, outputs

    def _run_plain(self, f: Callable, seqs: list[int], args: list[tuple], ends: list[float],
                   values: list[Any], failures: dict[int, tuple], outputs: dict[int, tuple[str, str]],
                   out: _Capture, err: _Capture, now: float) -> None:
        """:meth:`run`'s loop for one function, no keyword arguments and
        nothing to skip: the slot written by item stores, one clock read
        per task."""
        seq_view, started_view = self.slot._seq, self.slot._started
        clock = time.time
        add_value, add_end = values.append, ends.append
        for i, seq in enumerate(seqs):
            started_view[0] = now   # type: ignore[index]  (the start time first: see Slot.set)
            seq_view[0] = seq       # type: ignore[index]
            try:
                add_value(f(*args[i]))
            except BaseException as exc:  # SystemExit too: the worker must survive it
                add_value(None)
                failures[i] = describe_failure(exc)
            now = clock()
            add_end(now)
            if out.parts or err.parts:
                outputs[i] = (out.take(), err.take())


    def _run_bare(self, f: Callable, seqs: Sequence[int], args: list[Any], ends: array,
                  values: list[Any], failures: dict[int, tuple], outputs: dict[int, tuple[str, str]],
                  out: _Capture, err: _Capture, now: float) -> None:
        """:meth:`_run_plain` for calls of one bare argument (``BARE_ARGS``)."""
        seq_view, started_view = self.slot._seq, self.slot._started
        clock = time.time
        add_value, add_end = values.append, ends.append
        for i, (seq, a) in enumerate(zip(seqs, args)):
            started_view[0] = now   # type: ignore[index]  (the start time first: see Slot.set)
            seq_view[0] = seq       # type: ignore[index]
            try:
                add_value(f(a))
            except BaseException as exc:  # SystemExit too: the worker must survive it
                add_value(None)
                failures[i] = describe_failure(exc)
            now = clock()
            add_end(now)
            if out.parts or err.parts:
                outputs[i] = (out.take(), err.take())


def _unloadable(exc: Exception) -> Callable:
    if isinstance(exc, StaleModule):
        error: PayloadError = exc
    else:
        error = PayloadError(
            f"the task function could not be loaded on worker {socket.gethostname()}:"
            f"{os.getpid()} ({type(exc).__name__}: {exc}); a function from a module "
            "needs that module importable on the workers")

    def unloadable(*args: Any, **kwargs: Any) -> Any:
        raise type(error)(*error.args)
    return unloadable


def _reply_unpicklable(values: list, failures: dict) -> None:
    """Replace results that cannot be pickled by a clear failure."""
    for i, value in enumerate(values):
        if i in failures:
            continue
        try:
            cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=lambda b: None)
        except Exception as exc:
            values[i] = None
            failures[i] = describe_failure(PayloadError(
                f"the task's result ({type_name(value)}) cannot be pickled "
                f"to send it back to the master: {exc}"))


def _next_message(reader: Any) -> tuple:
    """The next frame, or ("broken", reason) for one that would not unpickle
    (it is answered in its turn, like the batch it stood for)."""
    from .transport import UndecodableFrame
    try:
        return reader.recv()
    except UndecodableFrame as exc:
        return ("broken", f"the worker could not unpickle the batch it was sent ({exc})")


def serve(reader: Any, writer: Any, slot: Slot) -> None:
    """The channel loop shared by the pool backends.

    Before it starts a batch it reads whatever else has arrived: the master
    sends each batch ahead of time, and a "skip" for it may be right
    behind."""
    runner = BatchRunner(slot)
    writer.send(("ready", os.getpid(), socket.gethostname()))
    queued: deque[tuple] = deque()
    skips: dict[int, set[int]] = {}

    def noted(msg: tuple) -> bool:
        """Record a "skip" (True), or leave the message to be handled (False)."""
        if msg[0] != "skip":
            return False
        skips.setdefault(msg[1], set()).update(msg[2])
        return True

    while True:
        msg = queued.popleft() if queued else _next_message(reader)
        kind = msg[0]
        if noted(msg):
            continue
        if kind == "broken":
            writer.send(msg)
            continue
        if kind == "stop":
            return
        if kind != "run":
            raise RuntimeError(f"unknown message {kind!r}")
        while reader.readable(0):
            more = _next_message(reader)
            if not noted(more):
                queued.append(more)
        _, batch_id, fns, seqs, fn_ids, args, kwargs = msg[:7]
        jobs, forget = msg[7:9] if len(msg) > 7 else (0, ())
        skip = frozenset(skips.pop(batch_id, ()))
        for stale in [b for b in skips if b < batch_id]:
            del skips[stale]  # (a skip that came too late: that batch ran)
        runner.learn(fns, forget)
        t_start, ends, values, failures, outputs = runner.run(seqs, fn_ids, args, kwargs, skip, jobs)
        reply = ("done", batch_id, t_start, ends, values, failures, outputs)
        try:
            writer.send(reply)
        except Exception as exc:
            from .transport import ConnectionLost
            if isinstance(exc, ConnectionLost):
                raise
            _reply_unpicklable(values, failures)
            writer.send(("done", batch_id, t_start, ends, values, failures, outputs))
        # Let go of the batch before waiting for the next: its array
        # arguments' shared memory goes back to the master now.
        del msg, args, kwargs, values, reply, failures, outputs
        end_leftovers()  # (once the reply is on its way: off the round trip)


# --- the processes a task starts ------------------------------------------------------
#
# A task's processes die with it.  A worker is the *child subreaper* of
# everything its tasks start (Linux): a grandchild whose parent exits — a
# daemon, a ``setsid`` — is reparented to the worker, not to init, so the
# worker's process tree holds every descendant while it lives.  The worker
# kills that tree when it exits (a "stop", its master gone, SIGTERM) and
# after each batch (what a finished task left running); its master kills it
# from outside when it stops a task (timeout, cancel, terminate): the tree,
# the worker's process group, and every process whose environment carries
# the worker's tag (found even once the worker is dead and they were
# reparented to init).

#: environment variable the master sets for each worker: inherited by all
#: a task starts, unless it clears its environment
PROCESS_TAG = "PYMW_WORKER_TAG"
_spared: set[int] = set()


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process (Linux /proc)."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # (the name may hold spaces and parentheses)
        if len(fields) > 1:
            table[int(entry)] = (int(fields[1]), fields[0].decode())
    return table


def _tagged(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in b"\0" + f.read()
    except OSError:
        return False


def task_processes(root: int | None, tag: str | None = None, spare: frozenset[int] = frozenset()) -> list[int]:
    """Living processes below ``root`` (by parentage; None: none; the
    processes in ``spare`` left out, but not what is below them: what a
    task started through multiprocessing's forkserver is the task's) and,
    with a ``tag``, every process whose environment carries that worker
    tag.  ``root`` must not have been reaped (its pid could name another)."""
    table = _process_table()
    found: set[int] = set()
    if root is not None:
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = list(children.get(root, ()))
        seen: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                if pid not in spare:
                    found.add(pid)
                todo.extend(children.get(pid, ()))
    if tag:
        marker = f"\0{PROCESS_TAG}={tag}\0".encode()
        me = os.getpid()
        for pid in table:
            if pid != me and pid != root and pid not in found and _tagged(pid, marker):
                found.add(pid)
    return sorted(p for p in found if table.get(p, (0, "Z"))[1] not in "ZX" and p != os.getpid())


def kill_task_processes(root: int | None, tag: str | None = None, timeout: float = 3.0,
                        spare: frozenset[int] = frozenset()) -> int:
    """SIGKILL what :func:`task_processes` finds, again until nothing is
    left (a process may start another while we look), for up to
    ``timeout`` seconds; zombies that are our own children are reaped.
    Returns how many kills were sent."""
    sent = 0
    deadline = time.monotonic() + timeout
    refused: set[int] = set()  # (not ours to kill: another user's, say)
    while True:
        found = [pid for pid in task_processes(root, tag, spare) if pid not in refused]
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                sent += 1
            except PermissionError:
                refused.add(pid)
            except OSError:
                pass
        if root == os.getpid():
            reap_children()
        if not found or time.monotonic() > deadline:
            return sent
        time.sleep(0.002)  # (a killed process takes a moment to become a zombie)


def _helper_pids() -> set[int] | None:
    """The pids of the resource tracker and forkserver this interpreter
    started, as multiprocessing keeps them; None where it does not say
    (another Python: they are then told by their command line alone)."""
    pids: set[int] = set()
    for module, holder, attr in (("multiprocessing.resource_tracker", "_resource_tracker", "_pid"),
                                 ("multiprocessing.forkserver", "_forkserver", "_forkserver_pid")):
        mod = sys.modules.get(module)
        if mod is None:
            continue   # (never imported here: it started nothing)
        obj = getattr(mod, holder, None)
        if obj is None or not hasattr(obj, attr):
            return None
        pid = getattr(obj, attr)
        if isinstance(pid, int):
            pids.add(pid)
    return pids


def end_leftovers() -> None:
    """After a batch: kill whatever its tasks left running (cheap when they
    left nothing).  multiprocessing's resource tracker and forkserver are
    spared (they serve the interpreter, and end with the worker) — those
    this interpreter started, not a task's process that only looks like
    one; what a task started through the forkserver is not spared."""
    if not has_children():
        return
    children = set(children_of())
    _spared.intersection_update(children)
    helpers = _helper_pids()
    for pid in children - _spared:
        if pid in helpers if helpers is not None else is_runtime_helper(pid):
            _spared.add(pid)
    if children and children <= _spared and not any(children_of(p) for p in _spared):
        reap_children()
        return
    kill_task_processes(os.getpid(), spare=frozenset(_spared))


def _stop_worker(code: int) -> None:
    """Kill this worker's task processes, then exit at once."""
    try:
        kill_task_processes(os.getpid())
    finally:
        os._exit(code)


def _watch_lifeline(fd: int) -> None:
    """Block on a pipe only the master writes to; EOF means it is gone."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    _stop_worker(0)


#: seconds the watchdog gives a worker whose master is gone to end by itself
WATCHDOG_GRACE = 1.0


def start_watchdog(lifeline: int) -> None:
    """Start the worker's watchdog: a process of its own that also waits for
    the lifeline's EOF.  The worker's lifeline thread cannot run while a
    task holds the GIL (a long C loop): the watchdog then stops the worker,
    kills its tasks' processes and the worker.  It ends with the worker
    (EOF on a pipe only the worker holds).  Forked twice, before the worker
    becomes a subreaper and before any thread starts: it is not the
    worker's child, so the worker's after-batch look at its children stays
    one system call, and the worker's tree holds only what tasks started."""
    worker = os.getpid()
    alive_r, alive_w = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(alive_r)
        os.close(alive_w)
        return
    if middle:
        os.close(alive_r)
        os.waitpid(middle, 0)
        return
    code = 0
    try:
        os.close(alive_w)
        if os.fork() == 0:
            _watchdog(worker, lifeline, alive_r)
    except BaseException:  # noqa: BLE001  (nothing of the worker's may run here)
        code = 1
    finally:
        os._exit(code)


def _watchdog(worker: int, lifeline: int, alive: int) -> None:
    # (hold nothing else of the worker's: its output pipe kept open here would
    # hide the worker's death from the master)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in (lifeline, alive):
            try:
                os.close(fd)
            except OSError:
                pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # (signals through a pidfd reach this worker, never a process that reused its pid)
        handle = os.pidfd_open(worker)
        send = lambda sig: signal.pidfd_send_signal(handle, sig)  # noqa: E731
    except (AttributeError, OSError):
        send = lambda sig: os.kill(worker, sig)  # noqa: E731
    poller = select.poll()
    for fd in (lifeline, alive):
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        for fd, _ in poller.poll():
            if os.read(fd, 1):
                continue
            if fd == alive:
                return   # the worker ended
            # The master is gone: the worker's own thread ends it unless a
            # task holds the GIL; past the grace, it is stopped from here.
            if select.select([alive], [], [], WATCHDOG_GRACE)[0]:
                return
            try:
                send(signal.SIGSTOP)
            except OSError:
                return
            kill_task_processes(worker, os.environ.get(PROCESS_TAG))
            try:
                send(signal.SIGKILL)
            except OSError:
                pass
            return


def _pipe_mode(ns: argparse.Namespace) -> int:
    from .transport import Borrower, ConnectionLost, FrameReader, FrameWriter, Lender

    key = b""
    while len(key) < 32:
        chunk = os.read(ns.fd_in, 32 - len(key))
        if not chunk:
            return 0
        key += chunk
    signer = Signer(key)
    start_watchdog(ns.lifeline)
    become_subreaper()
    signal.signal(signal.SIGTERM, lambda *_: _stop_worker(128 + signal.SIGTERM))
    threading.Thread(target=_watch_lifeline, args=(ns.lifeline,), daemon=True,
                     name="pymw-lifeline").start()
    borrower = lender = None
    if ns.shm_in is not None and ns.shm_out is not None:
        borrower = Borrower(socket.socket(fileno=ns.shm_in))
        lender = Lender(socket.socket(fileno=ns.shm_out))
    try:
        serve(FrameReader(ns.fd_in, signer, borrower), FrameWriter(ns.fd_out, signer, lender), Slot(ns.slot, ns.slot_fd))
    except ConnectionLost:
        pass  # the master closed the channel: a normal end
    except SignatureError as exc:
        # Nothing of the frame was unpickled; the channel cannot be trusted
        # any more, so the worker stops rather than resynchronise.
        print(f"pymw worker {os.getpid()}: {exc}", file=sys.__stderr__)
        return 3
    finally:
        kill_task_processes(os.getpid())
    return 0


class MPIChannel:
    """Signed frames as MPI messages with one peer rank (one frame, one
    message).  Waiting polls with a growing sleep, as mpi4py.futures does:
    MPICH's blocking receive spins a core, which idle ranks on a shared
    machine cannot afford."""

    TAG = 0x50D

    def __init__(self, comm: Any, peer: int, signer: Signer):
        from mpi4py import MPI
        self._MPI = MPI
        self.comm = comm
        self.peer = peer
        self.signer = signer

    def recv(self) -> Any:
        from .transport import decode_frame
        _, buf = receive(self.comm, self.peer)
        return decode_frame(self.signer, buf)

    def readable(self, timeout: float | None) -> bool:
        """Whether a message is waiting (``timeout`` must be 0: a probe)."""
        return bool(self.comm.Iprobe(source=self.peer, tag=self.TAG))

    def send(self, obj: Any) -> None:
        from .transport import encode_frame
        self.comm.Send([encode_frame(self.signer, obj), self._MPI.BYTE], dest=self.peer, tag=self.TAG)


def receive(comm: Any, source: int, stop: Callable[[], bool] = lambda: False) -> tuple[int, bytearray] | None:
    """The next message from ``source`` (or MPI.ANY_SOURCE) as (rank, bytes);
    None once ``stop()`` is true.  Polls with a growing sleep: MPICH's
    blocking receive spins a core, which idle ranks cannot afford."""
    from mpi4py import MPI

    status = MPI.Status()
    delay, spins = 0.0, 0
    while not comm.Iprobe(source=source, tag=MPIChannel.TAG, status=status):
        if stop():
            return None
        spins += 1
        if spins > 100:
            delay = min(0.001, delay * 2 or 0.00005)
            time.sleep(delay)
    buf = bytearray(status.Get_count(MPI.BYTE))
    sender = status.Get_source()
    comm.Recv([buf, MPI.BYTE], source=sender, tag=MPIChannel.TAG)
    return sender, buf


def mpi_worker_loop(comm: Any, slot_dir: str | None = None) -> None:
    """Serve as worker rank ``comm.rank`` (>= 1) of a master at rank 0."""
    # The master (rank 0) decides what an interrupt means: mpiexec forwards
    # a terminal's Ctrl-C to every rank, and a task must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    become_subreaper()  # (what a task leaves running is killed after its batch)
    key = comm.bcast(None, root=0)
    channel = MPIChannel(comm, 0, Signer(key))
    slot = Slot(os.path.join(slot_dir, f"rank-{comm.rank}") if slot_dir else None)
    try:
        serve(channel, channel, slot)
    except SignatureError as exc:
        print(f"pymw worker rank {comm.rank}: {exc}", file=sys.__stderr__)
        comm.Abort(3)
    # Say goodbye before MPI_Finalize, so rank 0 finalizes only once every
    # rank has left its loop (otherwise a rank may be torn down mid-exit).
    channel.send(("bye",))


def await_byes(comm: Any, ranks: Any, signer: Signer, timeout: float = 10.0) -> set[int]:
    """Rank 0: wait (bounded) until each of ``ranks`` has said "bye"; the
    ranks that did not (still busy with a task).  Late replies to batches
    are read and dropped on the way."""
    from mpi4py import MPI

    from .transport import decode_frame

    pending = set(ranks)
    deadline = time.monotonic() + timeout
    while pending:
        got = receive(comm, MPI.ANY_SOURCE, lambda: time.monotonic() > deadline)
        if got is None:
            break
        try:
            said = decode_frame(signer, got[1])
        except Exception:
            continue
        if said == ("bye",):
            pending.discard(got[0])
    return pending


#: the kernel's envelope "rank" that says goodbye: a graceful end of the socket
GOODBYE = 0xFFFFFFFF


def _mpi_hub_mode(ns: argparse.Namespace) -> int:
    """Rank 0 of an MPI job started by a notebook kernel: route frames
    between the kernel (a Unix socket) and ranks 1..N (MPI messages).

    It never unpickles anything: it moves signed bytes.  Envelope on the
    socket: u32 rank, u64 length, then the frame.
    """
    from mpi4py import MPI

    from .transport import encode_frame

    comm = MPI.COMM_WORLD
    if comm.rank != 0:
        mpi_worker_loop(comm, ns.slots)
        return 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(ns.socket)
    reader = sock.makefile("rb", buffering=1 << 20)
    key = reader.read(32)
    comm.bcast(key, root=0)
    env = struct.Struct("<IQ")
    send_lock = threading.Lock()
    done = threading.Event()

    def uplink() -> None:
        while (got := receive(comm, MPI.ANY_SOURCE, done.is_set)) is not None:
            source, buf = got
            try:
                with send_lock:
                    sock.sendall(env.pack(source, len(buf)))
                    sock.sendall(buf)
            except OSError:
                os._exit(0)  # the kernel is gone; MPICH cleans up the ranks

    up = threading.Thread(target=uplink, daemon=True, name="pymw-mpi-uplink")
    up.start()
    graceful = False
    while True:
        head = reader.read(env.size)
        if len(head) < env.size:
            break
        rank, n = env.unpack(head)
        if rank == GOODBYE:
            graceful = True
            break
        data = reader.read(n)
        if len(data) < n:
            break
        comm.Send([data, MPI.BYTE], dest=rank, tag=MPIChannel.TAG)
    done.set()
    up.join()
    if not graceful:
        # The kernel died: nobody will read what the ranks compute, and a
        # rank busy with a task would hold MPI_Finalize until it ends.
        comm.Abort(1)
    # A graceful end: the ranks are idle; tell them to stop, then finalize.
    # Any that does not leave in time is stuck in a task: abort.
    stop = encode_frame(Signer(key), ("stop",))
    for rank in range(1, comm.size):
        comm.Send([stop, MPI.BYTE], dest=rank, tag=MPIChannel.TAG)
    if await_byes(comm, range(1, comm.size), Signer(key)):
        comm.Abort(1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pymw_magic.worker",
                                     description="pymw-magic worker runtime")
    sub = parser.add_subparsers(dest="mode", required=True)
    pipe = sub.add_parser("pipe", help="serve batches over inherited pipes (local backend)")
    pipe.add_argument("--in", dest="fd_in", type=int, required=True)
    pipe.add_argument("--out", dest="fd_out", type=int, required=True)
    pipe.add_argument("--lifeline", type=int, required=True)
    pipe.add_argument("--slot", default=None)
    pipe.add_argument("--slot-fd", dest="slot_fd", type=int, default=None)
    pipe.add_argument("--shm-in", dest="shm_in", type=int, default=None)
    pipe.add_argument("--shm-out", dest="shm_out", type=int, default=None)
    hub = sub.add_parser("mpi-hub", help="an MPI job for a notebook kernel: rank 0 routes, ranks 1..N work")
    hub.add_argument("--socket", required=True)
    hub.add_argument("--slots", default=None)
    run = sub.add_parser("run", help="one-shot file mode for batch backends (HTCondor, BOINC)")
    run.add_argument("input", help="the signed input file (one chunk of tasks)")
    run.add_argument("output", help="where to write the output file")
    run.add_argument("--function", default=None, help="the job's function file (default: function.bin beside IN)")
    run.add_argument("--key", default=None, help="the key file (default: key beside IN)")
    ns = parser.parse_args(argv)

    # The master decides what an interrupt means; a terminal's Ctrl-C must
    # not kill workers behind its back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    extra = os.environ.get("PYMW_SYS_PATH")
    if extra:
        for entry in reversed(extra.split(os.pathsep)):
            if entry not in sys.path:
                sys.path.insert(0, entry)
    if ns.mode == "pipe":
        return _pipe_mode(ns)
    if ns.mode == "mpi-hub":
        return _mpi_hub_mode(ns)
    from .oneshot import run_files  # (only here: the pool workers' start stays as it was)
    return run_files(ns.input, ns.output, ns.function, ns.key)


if __name__ == "__main__":
    sys.exit(main())
