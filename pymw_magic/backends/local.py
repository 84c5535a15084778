"""The local backend: long-lived worker processes on this machine.

::

    master process                                  worker process (one per worker)
    ──────────────                                  ──────────────────────────────
    serving thread ── signed frames, pipe ──▶  python -m pymw_magic.worker pipe
                   ◀── signed frames, pipe ───  (runs batches, captures output)
                   ◀── 16-byte slot (mmap) ───  task now running + its start time
    (holds write end) ── lifeline pipe ───────▶  exits the moment the master dies

Who does what:

* :class:`ProcessConnection` — starts a worker with ``subprocess`` (fork +
  exec, never a bare fork, so it is safe from a threaded Jupyter kernel),
  passes it the signing key over its private pipe, reads and writes signed
  frames, reads its slot, kills and reaps it;
* :class:`LocalBackend` — the shared pool loop (``pool.py``) over those
  connections.  Workers live in their own session, so a terminal's Ctrl-C
  reaches only the master, which decides what to stop.

A task's processes die with it: a worker is the subreaper of what its
tasks start and kills it when it exits or a batch ends (``worker.py``);
when the master stops a worker (timeout, cancel, terminate, a lost
worker) it freezes it, kills every process below it, its process group,
and every process carrying its tag (``PYMW_WORKER_TAG`` in the
environment: found even after the worker died and they were reparented).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
from typing import Any

from ..payload import Signer
from ..transport import Borrower, ConnectionLost, FrameReader, FrameWriter, Lender, channel_pair, enlarge_pipe
from ..worker import IDLE, PROCESS_TAG, SLOT, kill_task_processes, read_slot
from .base import Option, worker_env
from .pool import Connection, PoolBackend

#: seconds a new worker may take to import and say "ready"
START_TIMEOUT = 60.0


def _slot_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


#: the connections to workers this process started and has not closed
_live: weakref.WeakSet[ProcessConnection] = weakref.WeakSet()


def _let_go_in_child() -> None:
    """A forked child (``os.fork``, multiprocessing's fork context) inherits
    each worker's lifeline and pipes.  Held there, they kept a worker alive
    after its master died, for as long as the child lived: the child closes
    its copies (the workers stay the parent's)."""
    for conn in list(_live):
        if conn._closed:
            continue
        conn._closed = True   # (the child's copy never speaks to the worker)
        for fd in (conn._life_w, conn._to, conn._from):
            try:
                os.close(fd)
            except OSError:
                pass
        for sock in (conn._lender.sock, conn._borrower.sock):
            try:
                sock.close()
            except OSError:
                pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


class ProcessConnection(Connection):
    def __init__(self, name: str, key: bytes, python: str, env: dict[str, str]):
        import mmap

        self.name = name
        self.kill_reason = None
        self._closed = False
        # A forked child holds a copy of this object: the worker is not its
        # own (see _foreign), whatever it does with the copy.
        self._owner = os.getpid()
        signer = Signer(key)
        # The slot is a file with no name (O_TMPFILE where the kernel has
        # it), handed down by descriptor: nothing is left in /dev/shm
        # however this process ends, even killed while the worker starts.
        slot_file = tempfile.TemporaryFile(prefix="pymw-slot-", dir=_slot_dir())
        slot_file.write(SLOT.pack(IDLE, 0.0))
        slot_file.flush()
        self._slot = mmap.mmap(slot_file.fileno(), SLOT.size)
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        life_r, self._life_w = os.pipe()
        for p in (to_worker_w, from_worker_w):
            enlarge_pipe(p)
        # Large buffers: our segments lent down, the worker's lent up.
        down, down_w = channel_pair()
        up, up_w = channel_pair()
        self._lender, self._borrower = Lender(down), Borrower(up)
        child_fds = (to_worker_r, from_worker_w, life_r, down_w.fileno(), up_w.fileno(), slot_file.fileno())
        cmd = [python, "-m", "pymw_magic.worker", "pipe", "--in", str(to_worker_r),
               "--out", str(from_worker_w), "--lifeline", str(life_r), "--slot-fd", str(slot_file.fileno()),
               "--shm-in", str(down_w.fileno()), "--shm-out", str(up_w.fileno())]
        # Inherited by whatever its tasks start: how they are found once reparented.
        self._tag = f"{os.getpid()}.{name}.{secrets.token_hex(6)}"
        env = dict(env, **{PROCESS_TAG: self._tag})
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=child_fds, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env, close_fds=True)
        finally:
            for f in child_fds[:3]:
                os.close(f)
            down_w.close()
            up_w.close()
            slot_file.close()  # (our mapping keeps it)
        self._to = to_worker_w
        self._from = from_worker_r
        self.writer = FrameWriter(to_worker_w, signer, self._lender)
        self.reader = FrameReader(from_worker_r, signer, self._borrower)
        _live.add(self)
        self.info: dict[str, Any] = {"pid": self.proc.pid}
        try:
            try:
                os.write(to_worker_w, key)  # the key never touches argv or the environment
                hello = self.recv(START_TIMEOUT)
            except (OSError, ConnectionLost) as exc:
                raise ConnectionLost(self._start_failure(python, exc)) from None
            if hello is None:
                raise ConnectionLost(f"worker {name} did not start within {START_TIMEOUT:.0f} s")
            _, pid, host = hello
            self.info = {"pid": pid, "host": host}
        except BaseException:
            self.close(graceful=False)
            raise

    def _start_failure(self, python: str, exc: BaseException) -> str:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return (f"the worker process ({python} -m pymw_magic.worker) ended before it was ready "
                f"({self.exit_detail()}; {exc}); its error, if it printed one, is on stderr above. "
                "The interpreter must be a Python 3.10+ with pymw-magic installed")

    def send(self, msg: Any) -> None:
        self._borrower.poll()   # (the worker's segments our results no longer view go back)
        self.writer.send(msg)

    def readable(self, timeout: float | None) -> bool:
        """A reply has begun to arrive (or the worker is gone): what a
        caller reading its own reply waits for before ``recv``."""
        return self.reader.readable(timeout)

    def recv(self, timeout: float | None) -> Any:
        if not self.reader.readable(timeout):
            return None
        return self.reader.recv()

    def running(self) -> tuple[int, float] | None:
        if self._slot.closed:
            return None
        return read_slot(self._slot)

    def _foreign(self) -> bool:
        """Whether this is a forked child's copy: the child's exit functions
        or its garbage collector closing it must not stop, signal nor kill
        the parent's worker and its tasks, nor free the parent's shared
        memory (the descriptors the child inherited close as it exits)."""
        return os.getpid() != self._owner

    def kill(self) -> None:
        """Kill the worker and every process its tasks started."""
        if self._foreign():
            return
        proc = self.proc
        try:
            # Frozen first, it cannot start more while its tree is killed;
            # alive (unreaped), its pid still names it and its group.
            proc.send_signal(signal.SIGSTOP)
            alive = proc.returncode is None
            kill_task_processes(proc.pid if alive else None, self._tag)
            if alive:
                os.killpg(proc.pid, signal.SIGKILL)  # (its session is its own group)
        except OSError:
            pass
        finally:
            try:
                proc.kill()
            except OSError:
                pass

    def close(self, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._foreign():
            return
        if graceful:
            try:
                self.writer.send(("stop",))
            except (ConnectionLost, OSError):
                pass
        for fd in (self._to, self._life_w):
            try:
                os.close(fd)  # EOF on its input and lifeline: it exits
            except OSError:
                pass
        if not graceful:
            self.kill()
        try:
            self.proc.wait(timeout=2 if graceful else 0.5)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
        # The worker killed its own tree on the way out; what escaped it
        # (its tag) goes too.  (Reaped now: its pid may name another.)
        kill_task_processes(None, self._tag)
        try:
            os.close(self._from)
        except OSError:
            pass
        # Our segments go now (the worker's mappings died with it); results
        # viewing the worker's stay valid until their owner drops them.
        self._lender.close()
        self._lender.sock.close()
        self._borrower.close()
        self._borrower.sock.close()
        # The slot stays mapped: ``running()`` may still be read after close.

    def exit_detail(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            import signal
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"


class LocalBackend(PoolBackend):
    name = "local"
    options = {
        "python": Option("python", str, None, "interpreter for the workers (default: this one)",
                         check=lambda p: shutil.which(p) is not None,
                         requirement="an executable file (a path, or a name on PATH)"),
    }

    def __init__(self, scheduler: Any, workers: int, key: bytes, python: str | None = None, **options: Any):
        super().__init__(scheduler, workers, key, **options)
        self.python = python or sys.executable
        self._env = worker_env()

    def connect(self, name: str) -> Connection:
        return ProcessConnection(name, self.key, self.python, self._env)
