"""The MPI backend: worker ranks over mpi4py, from a notebook or under mpiexec.

Two ways in, one pool loop (``pool.py``) and one worker loop
(``worker.mpi_worker_loop``) for both::

  from a kernel (not under mpiexec)                    under ``mpiexec -n N+1 python script.py``
  ─────────────────────────────────                    ───────────────────────────────────────
  kernel ── Unix socket ── rank 0: hub ── MPI ──▶ 1..N   rank 0: the script = master ── MPI ──▶ 1..N
  (serving threads;        (routes signed bytes,          (serving threads; a receiver
   a reader thread          never unpickles)               thread probes for replies)
   demuxes by rank)                                       ranks 1..N: Master("mpi") turns
                                                          them into workers; they never
                                                          return to the script

Who does what:

* :class:`HubJob` — a kernel's MPI job: ``mpiexec -n N+1 python -m
  pymw_magic.worker mpi-hub`` in its own session; the kernel itself never
  initialises MPI.  That is deliberate: with MPICH, one rank dying aborts
  the whole MPI job, and a kernel inside that job would be killed with it.
  Here the job dies alone; the kernel sees its socket close, requeues the
  batches in hand (the slot files say which task each rank was running, so
  the culprit is charged and retried, the others are not), and starts a new
  job for the next batch.
* :class:`WorldLinks` — rank 0 of an mpiexec job as the master, talking to
  ranks 1..N of COMM_WORLD directly.  A rank death there ends the whole job
  (MPICH's default), master included: that is the batch-script path, where
  the scheduler of the cluster reports it.
* :class:`RankConnection` — one rank as the pool sees it (send, recv,
  running, kill), over either of the above.
* :class:`MPIBackend` — chooses the mode and keeps one job alive for all
  the pool's serving threads.

Files a job leaves: MPICH's shared-memory segment (``/dev/shm/mpich_shm_*``,
unlinked only by MPI_Finalize) and hydra's topology file
(``/tmp/hydra_hwloc_xmlfile_*``, unlinked only by a proxy that exits
normally) have fixed names that no environment variable moves, so they are
told apart from other jobs' by who holds them open: a :class:`HubJob` notes
the ones its own processes hold (in ``job-files`` of its directory
``pymw-mpi-<master pid>-*``) and removes them when the job ends, however it
ends.  A master killed before it could do that leaves the directory; the
next master to start a job removes it and the files it names, once the pid
in its name is gone.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from ..payload import Signer
from ..transport import ConnectionLost, decode_frame, encode_frame
from ..worker import (GOODBYE, IDLE, SLOT, MPIChannel, await_byes, mpi_worker_loop, read_slot, receive,
                      task_processes)
from .base import Option, worker_env
from .pool import Connection, PoolBackend

START_TIMEOUT = 120.0
#: under mpiexec: a Master("mpi") took ranks 1..N already (they serve one master per run)
_world_taken = False
_ENVELOPE = struct.Struct("<IQ")
_LOST = object()  # put in a rank's queue when its job is gone


def _check_mpi4py() -> None:
    """mpi4py importable, without initialising MPI in this process: a kernel
    that called MPI_Init would be part of every MPI job it starts and be
    killed with it."""
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        raise ImportError("the MPI backend needs mpi4py and an MPI library: pip install "
                          "'pymw-magic[mpi]' (mpi4py plus the mpich wheel), or mpi4py built "
                          "against your cluster's MPI")


def _import_mpi() -> Any:
    """mpi4py.MPI, initialised: only in ranks and under mpiexec."""
    _check_mpi4py()
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(
            "the MPI backend needs mpi4py and an MPI library: pip install 'pymw-magic[mpi]' "
            f"(mpi4py plus the mpich wheel), or mpi4py against your cluster's MPI ({exc})") from exc
    except RuntimeError as exc:  # mpi4py present, no libmpi
        raise ImportError(f"mpi4py found no MPI library ({exc}); pip install mpich, "
                          "or load your cluster's MPI module") from exc
    return MPI


def _diagnose(python: str) -> str:
    """Why ranks may fail to start: can ``python`` load mpi4py's MPI
    library at all?  (Probed in a child, so this process never loads it.)"""
    probe = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
             "print(MPI.Get_library_version().splitlines()[0])")
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f" ({python} could not be run: {exc})"
    if done.returncode == 0:
        return f" (MPI library: {done.stdout.strip()}; see mpiexec's messages on stderr)"
    last = (done.stderr.strip().splitlines() or ["?"])[-1]
    return (f": {python} cannot load an MPI library ({last}); pip install 'pymw-magic[mpi]' "
            "(mpi4py plus the mpich wheel), or load your cluster's MPI module")


def under_mpiexec() -> bool:
    """True when this process was started by mpiexec with other ranks."""
    keys = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "HYDRA_CONTROL_FD")
    if not any(k in os.environ for k in keys):
        return False
    return _import_mpi().COMM_WORLD.Get_size() > 1


def find_mpiexec() -> str:
    """The mpiexec that belongs to the MPI library mpi4py loaded: for the
    mpich wheel the one beside this interpreter, else the first on PATH."""
    here = os.path.dirname(sys.executable)
    found = shutil.which("mpiexec", path=here) or shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("no mpiexec found beside this Python or on PATH: "
                                "pip install 'pymw-magic[mpi]' (the mpich wheel brings one)")
    return found


#: names of the files an MPICH job leaves behind when it does not finalize
_JOB_FILE_PREFIXES = ("mpich_shm_", "hydra_hwloc_xmlfile_")
_JOB_FILES = "job-files"
_JOB_DIR = re.compile(r"pymw-mpi-(\d+)-\w+")


def _open_job_files(pids: list[int]) -> set[str]:
    """The MPICH job files (still named) that the processes ``pids`` hold open."""
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (os.path.basename(target).startswith(_JOB_FILE_PREFIXES)
                    and not target.endswith(" (deleted)")):
                found.add(target)
    return found


def _remove_job_files(paths: set[str] | list[str]) -> None:
    for path in paths:
        # only what this module notes: never a path a damaged list makes up
        if os.path.basename(path).startswith(_JOB_FILE_PREFIXES):
            try:
                os.unlink(path)
            except OSError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _reap_dead_masters_files(base: str | None = None) -> list[str]:
    """Remove the ``pymw-mpi-<pid>-*`` directories (in ``base``, default the
    temporary directory) whose master process is gone, and the MPICH files
    they name; the directories removed.  A live master's are left alone."""
    base = base or tempfile.gettempdir()
    try:
        entries = os.listdir(base)
    except OSError:
        return []
    removed = []
    for name in entries:
        match = _JOB_DIR.fullmatch(name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        path = os.path.join(base, name)
        try:
            with open(os.path.join(path, _JOB_FILES)) as f:
                _remove_job_files(f.read().split("\n"))
        except OSError:
            pass  # (another user's, or the job never started)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


class _Links:
    """Frames in from ranks, sorted into one queue per rank."""

    def __init__(self, size: int):
        self.queues: dict[int, queue.SimpleQueue] = {r: queue.SimpleQueue() for r in range(1, size)}
        self.dead = False
        self.killed_by_us = False
        #: rank -> (task id, start) of every rank that was running a task
        #: when the job died; the culprit is known only if there was one
        self.running_at_death: dict[int, tuple[int, float]] = {}

    def deliver(self, rank: int, data: Any) -> None:
        q = self.queues.get(rank)
        if q is not None:
            q.put(data)

    def slot_path(self, rank: int) -> str | None:
        return None

    def fail_all(self) -> None:
        for rank in self.queues:
            path = self.slot_path(rank)
            if path:
                try:
                    with open(path, "rb") as f:
                        running = read_slot(f.read(SLOT.size))
                except (OSError, struct.error):
                    continue
                if running is not None:
                    self.running_at_death[rank] = running
        self.dead = True
        for q in self.queues.values():
            q.put(_LOST)


class HubJob(_Links):
    """An MPI job of N worker ranks started by (and routed to) this process."""

    def __init__(self, workers: int, key: bytes, python: str, mpiexec: str, extra: list[str]):
        super().__init__(workers + 1)
        _reap_dead_masters_files()
        # The pid in the name tells a later master whether this one is alive.
        self._tmp = tempfile.mkdtemp(prefix=f"pymw-mpi-{os.getpid()}-")
        self.files: set[str] = set()
        self.slot_dir = os.path.join(self._tmp, "slots")
        os.mkdir(self.slot_dir)
        for rank in range(1, workers + 1):
            with open(os.path.join(self.slot_dir, f"rank-{rank}"), "wb") as f:
                f.write(SLOT.pack(IDLE, 0.0))
        path = os.path.join(self._tmp, "hub.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(START_TIMEOUT)
        cmd = [mpiexec, *extra, "-n", str(workers + 1), python, "-m", "pymw_magic.worker",
               "mpi-hub", "--socket", path, "--slots", self.slot_dir]
        self.python = python
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=worker_env())
        try:
            self.sock, _ = self._accept(listener)
            # Every rank has passed MPI_Init: the segment and the topology file exist.
            self._note_files(task_processes(self.proc.pid))
        except BaseException:
            self.terminate()
            raise
        finally:
            listener.close()
        self.sock.sendall(key)
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True, name="pymw-mpi-hub-reader").start()

    def _accept(self, listener: socket.socket) -> tuple[socket.socket, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        listener.settimeout(0.2)
        while True:
            try:
                return listener.accept()
            except socket.timeout:
                if self.proc.poll() is not None:
                    raise ConnectionLost(f"mpiexec exited with status {self.proc.returncode} "
                                         f"before its ranks started{_diagnose(self.python)}") from None
                if time.monotonic() > deadline:
                    raise ConnectionLost(f"the MPI job did not start within {START_TIMEOUT:.0f} s") from None

    def _note_files(self, family: list[int]) -> None:
        """Note the job files that the processes ``family`` of this job hold,
        here and on disk (for the next master, should this one be killed)."""
        new = _open_job_files(family) - self.files
        if new:
            self.files |= new
            try:
                with open(os.path.join(self._tmp, _JOB_FILES), "a") as f:
                    f.write("".join(p + "\n" for p in sorted(new)))
            except OSError:
                pass

    def _read(self) -> None:
        reader = self.sock.makefile("rb", buffering=1 << 20)
        try:
            while True:
                head = reader.read(_ENVELOPE.size)
                if len(head) < _ENVELOPE.size:
                    break
                rank, n = _ENVELOPE.unpack(head)
                data = bytearray(n)
                if reader.readinto(data) < n:
                    break
                self.deliver(rank, data)
        except OSError:
            pass
        self.fail_all()

    def send(self, rank: int, frame: bytearray) -> None:
        if self.dead:
            raise ConnectionLost("the MPI job is gone")
        try:
            with self._send_lock:
                self.sock.sendall(_ENVELOPE.pack(rank, len(frame)))
                self.sock.sendall(frame)
        except OSError as exc:
            raise ConnectionLost(f"the MPI job is gone: {exc}") from exc

    def slot_path(self, rank: int) -> str:
        return os.path.join(self.slot_dir, f"rank-{rank}")

    def close(self) -> None:
        """Graceful end: the hub tells its ranks to stop and finalizes.  An
        end of the socket without the goodbye (this process died) makes the
        hub abort the job at once, busy ranks and all."""
        try:
            with self._send_lock:
                self.sock.sendall(_ENVELOPE.pack(GOODBYE, 0))
            self.sock.shutdown(socket.SHUT_WR)
        except (OSError, AttributeError):  # (no socket: the job never started)
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.terminate()

    def terminate(self) -> None:
        """Kill mpiexec, its proxy and every rank, and remove the files the
        job leaves when it does not finalize."""
        # The proxy and the ranks run in sessions of their own: found
        # through mpiexec while it lives, they are killed with it.
        family = task_processes(self.proc.pid) if self.proc.poll() is None else []
        self._note_files(family)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait()
        if hasattr(self, "sock"):
            self.sock.close()
        _remove_job_files(self.files)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def exit_detail(self) -> str:
        code = self.proc.poll()
        return "its MPI job ended" + (f", mpiexec exit status {code}" if code is not None else "")


class WorldLinks(_Links):
    """Rank 0 of COMM_WORLD as master: ranks 1..N are the workers."""

    def __init__(self, comm: Any, key: bytes):
        super().__init__(comm.Get_size())
        self.comm = comm
        self._MPI = _import_mpi()
        self._signer = Signer(key)
        comm.bcast(key, root=0)
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True, name="pymw-mpi-receiver")
        self._thread.start()

    def _read(self) -> None:
        while (got := receive(self.comm, self._MPI.ANY_SOURCE, lambda: self._stop)) is not None:
            self.deliver(*got)

    def send(self, rank: int, frame: bytearray) -> None:
        self.comm.Send([frame, self._MPI.BYTE], dest=rank, tag=MPIChannel.TAG)

    #: set by kill(): a running task was to be stopped (a cancel, an interrupt)
    abort_requested = False

    def kill(self) -> None:
        self.abort_requested = True

    def close(self) -> None:
        """Stop the ranks.  A rank still busy with a task cannot be stopped
        alone: if one does not leave in time (at once when a stop was
        asked for), the whole run is aborted, this rank included, rather
        than wait in MPI_Finalize for the task to end."""
        self._stop = True
        self._thread.join(timeout=5)
        stop = encode_frame(self._signer, ("stop",))
        for rank in self.queues:
            self.comm.Send([stop, self._MPI.BYTE], dest=rank, tag=MPIChannel.TAG)
        left = await_byes(self.comm, self.queues, self._signer,
                          timeout=1.0 if self.abort_requested else 10.0)
        if left:
            # MPI_Abort skips MPI_Finalize, which alone unlinks the shared
            # segment, and the proxy's exit that unlinks the topology file
            # (it is our parent); every rank has read both, so their names can go.
            _remove_job_files(_open_job_files([os.getpid(), os.getppid()]))
            print(f"pymw: aborting the MPI run: rank(s) {sorted(left)} still running a task "
                  "that was cancelled or interrupted (under mpiexec a rank cannot be stopped alone)",
                  file=sys.stderr, flush=True)
            self.comm.Abort(1)

    def terminate(self) -> None:
        self.abort_requested = True
        self.close()

    def exit_detail(self) -> str:
        return "rank lost"


class RankConnection(Connection):
    def __init__(self, name: str, rank: int, links: Any, signer: Signer):
        import mmap

        self.name = name
        self.rank = rank
        self.links = links
        self.signer = signer
        self._kill_reason: str | None = None
        self._slot = None
        path = links.slot_path(rank)
        if path:
            with open(path, "r+b") as f:
                self._slot = mmap.mmap(f.fileno(), SLOT.size)
        hello = self.recv(START_TIMEOUT)
        if hello is None:
            raise ConnectionLost(f"rank {rank} did not start within {START_TIMEOUT:.0f} s")
        _, pid, host = hello
        self.info: dict[str, Any] = {"rank": rank, "pid": pid, "host": host}

    def send(self, msg: Any) -> None:
        self.links.send(self.rank, encode_frame(self.signer, msg))

    def recv(self, timeout: float | None) -> Any:
        try:
            data = self.links.queues[self.rank].get(timeout=timeout)
        except queue.Empty:
            return None
        if data is _LOST:
            self.links.queues[self.rank].put(_LOST)  # stays lost for later calls
            raise ConnectionLost(self.links.exit_detail())
        return decode_frame(self.signer, data)

    @property
    def kill_reason(self) -> str | None:
        # The other ranks of a job we killed on purpose are victims, not suspects.
        return self._kill_reason or ("stopped" if self.links.killed_by_us else None)

    @kill_reason.setter
    def kill_reason(self, value: str | None) -> None:
        self._kill_reason = value

    def running(self) -> tuple[int, float] | None:
        if self.links.dead:
            # All ranks died together: name a culprit only if it is certain.
            at_death = self.links.running_at_death
            return at_death.get(self.rank) if len(at_death) == 1 else None
        if self._slot is None or self._slot.closed:
            return None
        return read_slot(self._slot)

    def kill(self) -> None:
        # One rank cannot be stopped alone: MPICH takes the job down with it,
        # and the pool starts a new job.
        if isinstance(self.links, WorldLinks):
            self.links.kill()  # stopped at shutdown, by aborting the run if it must
            return
        pid = getattr(self, "info", {}).get("pid")
        if pid and isinstance(self.links, HubJob):
            self.links.killed_by_us = True
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self, graceful: bool) -> None:
        pass  # the job as a whole stops its ranks (MPIBackend.shutdown)

    def exit_detail(self) -> str:
        return self.links.exit_detail()


class MPIBackend(PoolBackend):
    name = "mpi"
    options = {
        "python": Option("python", str, None, "interpreter for the ranks (default: this one)"),
        "mpiexec": Option("mpiexec", str, None, "mpiexec to start ranks with (default: the one of mpi4py's MPI)",
                          check=lambda p: shutil.which(p) is not None,
                          requirement="an executable file (a path, or a name on PATH)"),
    }

    def __init__(self, scheduler: Any, workers: int, key: bytes, python: str | None = None,
                 mpiexec: str | None = None, **options: Any):
        MPI = _import_mpi() if under_mpiexec() else None
        if MPI is not None and MPI.COMM_WORLD.Get_rank() > 0:
            # A worker rank of `mpiexec -n N+1 python script.py`: serve, then
            # leave without running the rest of the script.
            mpi_worker_loop(MPI.COMM_WORLD)
            # Leave through SystemExit: mpi4py finalizes at interpreter exit
            # like on rank 0, and the script's code after Master() never runs.
            raise SystemExit(0)
        self._world = MPI.COMM_WORLD if MPI is not None else None
        if self._world is not None:
            global _world_taken
            if _world_taken:
                raise RuntimeError(
                    "under mpiexec the worker ranks serve one Master('mpi') per run, and this script "
                    "has made one already (the ranks left with it): keep one master for the whole "
                    "script, e.g. make it once at the top and pass it around")
            _world_taken = True
            workers = self._world.Get_size() - 1
        super().__init__(scheduler, workers, key, **options)
        self.python = python or sys.executable
        self.mpiexec = mpiexec
        self._job: Any = None
        self._job_lock = threading.Lock()
        self._free: list[int] = []
        self._signer = Signer(key)
        if self._world is None:
            _check_mpi4py()  # a clear error now, not in a thread later
            self.mpiexec = mpiexec or find_mpiexec()
            self.shared_fate = True  # one rank's death ends the whole MPI job

    @classmethod
    def cannot_stop_tasks(cls) -> str | None:
        if under_mpiexec():
            return ("under mpiexec a rank cannot be stopped without ending the whole run (MPICH); "
                    "run the script with plain python for timeouts (Master('mpi') then spawns its ranks), "
                    "or drop timeout=")
        return None

    @classmethod
    def default_workers(cls) -> int:
        if under_mpiexec():
            return _import_mpi().COMM_WORLD.Get_size() - 1
        return super().default_workers()

    @classmethod
    def settle_workers(cls, requested: int | None, options: dict[str, Any]) -> int:
        # Under mpiexec the run's ranks are the workers, whatever was asked.
        if under_mpiexec():
            return cls.default_workers()
        return super().settle_workers(requested, options)

    def _extra_args(self) -> list[str]:
        try:
            version = subprocess.run([self.mpiexec, "--version"], capture_output=True, text=True,
                                     timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            version = ""
        if "Open MPI" in version or "OpenRTE" in version:
            extra = ["--oversubscribe"]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                extra.append("--allow-run-as-root")
            return extra
        return []

    def connect(self, name: str) -> Connection:
        with self._job_lock:
            if self._world is not None:
                if self._job is None:
                    self._job = WorldLinks(self._world, self.key)
                    self._free = list(range(self.workers, 0, -1))
                if not self._free:
                    raise ConnectionLost("no rank left: under mpiexec a lost rank cannot be replaced")
            elif self._job is None or self._job.dead:
                if self._job is not None:
                    self._job.terminate()
                self._job = HubJob(self.workers, self.key, self.python, self.mpiexec, self._extra_args())
                self._free = list(range(self.workers, 0, -1))
            job, rank = self._job, self._free.pop()
        return RankConnection(f"{self.name}-rank{rank}", rank, job, self._signer)

    def shutdown(self, wait: bool = True) -> None:
        if not wait and self._world is not None:
            # Under mpiexec a busy rank cannot be stopped alone: end the
            # ranks first (the run is aborted if one is still in a task),
            # rather than have the serving threads wait for their tasks.
            self._stopping = True
            self.scheduler.close()
            with self._job_lock:
                job, self._job = self._job, None
            if job is not None:
                job.terminate()
        super().shutdown(wait)
        with self._job_lock:
            job, self._job = self._job, None
        if job is not None:
            if wait:
                job.close()
            else:
                job.terminate()
