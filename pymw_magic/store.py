"""The job store: every job of every process, on disk, for readers elsewhere.

This module owns the SQLite file under ``$PYMW_HOME`` (by default the
user's data directory) that records jobs — name, backend, options, the
process that owns them, counts by state, times — and, for batch-family jobs,
every task and the backend's handle (cluster id, event-log offset, ...).
Readers in other processes (``pymw_magic.store.jobs()``, the Jupyter server
extension behind the lab sidebar, ``attach``) see what every kernel and
script recorded, including jobs whose process is gone.

Data flow::

    scheduler threads                      one thread per process
    ─────────────────                      ──────────────────────
    EventBus ──▶ JobRecorder.__call__ ──▶ dirty set ──▶ flusher (every 0.5 s,
     (TasksChanged,   (a set insert,       (jobs,       at job end, at exit,
      JobChanged)      nothing else)        tasks)      flush())
                                                             │ one transaction
                                                             ▼
    Store.jobs() / job() / tasks()  ◀───────────────  SQLite (WAL) jobs.db
    (this process, other kernels,                      ▲
     the server extension)          request_cancel() ──┘ (polled by the owner's
                                                          flusher: job.cancel())

The hot path (an observer called on the scheduler's threads) only marks a
job dirty; counts and task fields are read from the live objects when the
flusher writes them.  A master whose jobs need no per-task rows is
listened to for job events only (``subscribe(tasks=False)``): the scheduler
then builds no per-batch event at all for the recorder, and the flusher
reads the counts of the jobs still running at each flush (written when they
changed).  A store that cannot be opened or written never breaks a
computation: the recorder warns once and stops recording.

What a job's ``state`` says: ``active`` while it runs; ``finished`` (every
task done), ``failed`` (at least one task failed), ``cancelled`` (cancelled,
or still running when its process exited: every master is stopped at exit);
``lost`` is never written — a reader shows an active pool job whose process
is gone (this host, pid not alive) as lost.  A batch-family job outlives its
process and stays active.

Wiring: ``record(master)`` subscribes the process's recorder to a master's
events (``PYMW_STORE=0`` turns recording off); ``PYMW_HOME`` moves the store.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import socket
import sqlite3
import sys
import threading
import time
import uuid
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import PymwError
from .events import Event, JobChanged, Subscription, TasksChanged
from .task import despite_interrupts

if TYPE_CHECKING:
    from .job import Job
    from .master import Master
    from .task import Task

#: the schema this code writes; a file with a higher one is refused
SCHEMA_VERSION = 1
DB_NAME = "jobs.db"
#: seconds between two flushes of the dirty jobs
FLUSH_INTERVAL = 0.5
#: a flush woken by a job's end waits at least this long after the last one
#: (a kernel submitting single tasks would otherwise flush after each)
MIN_SPACING = 0.05
#: SQLite's own wait for a lock, then our retries, in seconds
BUSY_TIMEOUT = 5.0
WRITE_PATIENCE = 30.0
#: how long a process's exit waits for a locked store
EXIT_PATIENCE = 5.0
#: the least a write waits for another thread's write in this process
LOCK_FLOOR = 0.25

JOB_STATES = ("active", "finished", "failed", "cancelled", "lost")
TASK_STATES = ("pending", "running", "retrying", "done", "failed", "cancelled")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    uid              TEXT PRIMARY KEY,      -- globally unique (uuid4 hex)
    job_id           INTEGER,               -- Job.id in its process
    name             TEXT NOT NULL,
    backend          TEXT NOT NULL,
    family           TEXT NOT NULL,         -- "pool" or "batch"
    options          TEXT NOT NULL,         -- JSON, values JSON cannot hold as repr()
    owner_kind       TEXT NOT NULL,         -- "kernel", "script" or "python"
    owner_pid        INTEGER NOT NULL,
    owner_host       TEXT NOT NULL,
    owner_start      INTEGER,               -- the process's start tick (tells a reused pid)
    kernel_id        TEXT,
    script           TEXT,
    notebook         TEXT,
    created          REAL NOT NULL,         -- wall-clock seconds
    ended            REAL,
    state            TEXT NOT NULL,         -- {"/".join(JOB_STATES[:4])} (lost: computed by readers)
    {", ".join(f"{s} INTEGER NOT NULL DEFAULT 0" for s in TASK_STATES)},
    total            INTEGER,               -- NULL while the input's length is unknown
    updated_at       REAL NOT NULL,
    handle           TEXT,                  -- JSON, batch backends: cluster id, log offset, ...
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    tasks_recorded   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs (name);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE TABLE IF NOT EXISTS tasks (
    job_uid         TEXT NOT NULL REFERENCES jobs (uid) ON DELETE CASCADE,
    idx             INTEGER NOT NULL,       -- position in the job's input
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    host            TEXT,
    worker          TEXT,
    submitted       REAL,
    started         REAL,
    finished        REAL,
    result_location TEXT,
    error           TEXT,
    traceback       TEXT,
    PRIMARY KEY (job_uid, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (job_uid, state, idx);
"""

_JOB_COLUMNS = ("uid", "job_id", "name", "backend", "family", "options", "owner_kind", "owner_pid",
                "owner_host", "owner_start", "kernel_id", "script", "notebook", "created", "ended",
                "state", *TASK_STATES, "total", "updated_at", "handle", "cancel_requested",
                "tasks_recorded")
_TASK_COLUMNS = ("job_uid", "idx", "state", "attempts", "host", "worker", "submitted", "started",
                 "finished", "result_location", "error", "traceback")
# What a later flush of a known job changes (never the owner, created or a cancel request).
_JOB_UPDATED = ("state", "ended", *TASK_STATES, "total", "updated_at", "tasks_recorded")
_UPSERT_JOB = (
    f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({', '.join('?' * len(_JOB_COLUMNS))}) "
    f"ON CONFLICT (uid) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _JOB_UPDATED)}, "
    "handle = COALESCE(excluded.handle, jobs.handle)"
)
_UPSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(_TASK_COLUMNS)}) VALUES ({', '.join('?' * len(_TASK_COLUMNS))}) "
    f"ON CONFLICT (job_uid, idx) DO UPDATE SET "
    f"{', '.join(f'{c} = excluded.{c}' for c in _TASK_COLUMNS[2:] if c != 'result_location')}, "
    "result_location = COALESCE(excluded.result_location, tasks.result_location)"
)


class StoreError(PymwError):
    """The job store cannot be opened, read or written; the message names
    the file and what to do."""


class StoreBusy(StoreError):
    """Another process held the store locked for longer than we wait."""


class UnknownJob(StoreError, KeyError):
    """No stored job has that id or name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# --- where the store lives -------------------------------------------------------------
def default_home() -> Path:
    """``$PYMW_HOME``, else the user's data directory for pymw-magic."""
    env = os.environ.get("PYMW_HOME")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_data_dir
    except ImportError:  # an optional dependency for now: the XDG default by hand
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return Path(base) / "pymw-magic"
    return Path(user_data_dir("pymw-magic", appauthor=False))


def enabled() -> bool:
    """False when ``PYMW_STORE`` is 0/false/no/off: nothing is recorded."""
    return os.environ.get("PYMW_STORE", "1").strip().lower() not in ("0", "false", "no", "off")


# --- the owner: which process (kernel, script) a job belongs to -------------------------
HOST = socket.gethostname()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start tick) of ``pid`` from /proc, None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (not a zombie), and is the
    same process as the one that started at tick ``start`` when known."""
    stat = _proc_stat(pid)
    if stat is not None:
        state, tick = stat
        return state not in ("Z", "X") and (start is None or tick == start)
    if os.path.isdir("/proc"):
        return False  # Linux: no /proc entry, no process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Owner:
    """The process that ran a job."""
    kind: str                     # "kernel", "script" or "python"
    pid: int
    host: str
    start: int | None = None      # start tick of the pid (Linux), to tell a reused pid
    kernel_id: str | None = None
    script: str | None = None

    def alive(self) -> bool | None:
        """True/False on this host; None for another host (cannot tell)."""
        if self.host != HOST:
            return None
        return pid_alive(self.pid, self.start)

    def __str__(self) -> str:
        what = {"kernel": f"kernel {self.kernel_id}" if self.kernel_id else "kernel",
                "script": f"script {self.script}" if self.script else "script"}.get(self.kind, self.kind)
        return f"{what} (pid {self.pid} on {self.host})"


def current_owner() -> tuple[Owner, str | None]:
    """This process as an :class:`Owner`, and the notebook it runs when known."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    kernel_id = notebook = script = None
    kind = "python"
    shell = None
    ipython = sys.modules.get("IPython")
    if ipython is not None:
        try:
            shell = ipython.get_ipython()
        except Exception:
            shell = None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        kind = "kernel"
        try:
            from ipykernel.connect import get_connection_file
            # Jupyter's servers name it kernel-<kernel id>.json
            stem = os.path.basename(get_connection_file()).removesuffix(".json")
            kernel_id = stem.removeprefix("kernel-")
        except Exception:
            kernel_id = None
    elif sys.argv and sys.argv[0] not in ("", "-c", "-") and os.path.isfile(sys.argv[0]) \
            and not sys.flags.interactive:
        kind = "script"
        script = os.path.abspath(sys.argv[0])
    notebook = os.environ.get("JPY_SESSION_NAME") or None
    if notebook is None and shell is not None:
        ns = getattr(shell, "user_ns", {}) or {}
        notebook = ns.get("__session__") or ns.get("__vsc_ipynb_file__") or None
        notebook = str(notebook) if notebook else None
    return Owner(kind, pid, HOST, stat[1] if stat else None, kernel_id, script), notebook


# --- what readers get ---------------------------------------------------------------------
@dataclass
class JobRecord:
    """One stored job.  ``state`` is the recorded one, except that an active
    pool job whose owning process is gone reads as ``"lost"``."""
    uid: str
    job_id: int | None
    name: str
    backend: str
    family: str
    state: str
    counts: dict[str, int]
    total: int | None
    options: dict[str, Any]
    owner: Owner
    notebook: str | None
    created: float
    ended: float | None
    updated_at: float
    handle: dict[str, Any] | None = None
    cancel_requested: bool = False
    tasks_recorded: bool = False

    @property
    def finished_tasks(self) -> int:
        c = self.counts
        return c["done"] + c["failed"] + c["cancelled"]

    @property
    def elapsed(self) -> float:
        """Seconds from creation to the end (or to the last update while active)."""
        end = self.ended if self.ended is not None else (
            time.time() if self.state == "active" else self.updated_at)
        return max(0.0, end - self.created)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the server extension sends this)."""
        d = asdict(self)
        d["owner"] = asdict(self.owner)
        return d

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items() if v)
        total = "?" if self.total is None else self.total
        return (f"<JobRecord {self.uid[:8]} {self.name!r} {self.backend} {self.state} "
                f"{self.finished_tasks}/{total}{' ' + counts if counts else ''} — {self.owner}>")


@dataclass(frozen=True)
class TaskRecord:
    """One stored task of a batch-family job."""
    job_uid: str
    index: int
    state: str
    attempts: int
    host: str | None
    worker: str | None
    submitted: float | None
    started: float | None
    finished: float | None
    result_location: str | None
    error: str | None
    traceback: str | None

    @property
    def duration(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cell(text: str) -> str:
    """``text`` on one line of a table: a newline or another control
    character in a job's name could otherwise forge rows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class JobList(list):
    """A list of :class:`JobRecord` that shows itself as a table."""

    HEADER = ("id", "name", "backend", "state", "done/total", "failed", "other tasks", "created", "owner")

    def table(self) -> str:
        rows = [self.HEADER]
        for r in self:
            shown = {s: n for s, n in r.counts.items() if s not in ("done", "failed") and n}
            if r.state == "lost":  # nothing runs them any more: never shown as running
                gone = sum(shown.pop(s, 0) for s in ("pending", "running", "retrying"))
                shown = {"lost": gone, **shown} if gone else shown
            others = ", ".join(f"{s} {n}" for s, n in shown.items())
            rows.append((r.uid[:8], _cell(r.name), _cell(r.backend), r.state,
                         f"{r.counts['done']}/{'?' if r.total is None else r.total}",
                         str(r.counts["failed"]), others or "-",
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created)), _cell(str(r.owner))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.HEADER))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)

    def __repr__(self) -> str:
        return self.table() if self else "(no jobs in the store)"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


# --- the store ----------------------------------------------------------------------------
def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


#: every Store of this process, for the fork handler below
_live: weakref.WeakSet[Store] = weakref.WeakSet()


_live_recorders: weakref.WeakSet[JobRecorder] = weakref.WeakSet()


def _fresh_locks_in_child() -> None:
    """A forked child has only the thread that forked: a lock another thread
    held then (a store inside a write, waiting for another process; the
    flusher inside a flush; a thread opening the store) would never be let
    go there.  (The child opens connections of its own.)"""
    global _open_lock
    for store in list(_live):
        store._lock = threading.RLock()
        store._rlock = threading.Lock()
    for rec in list(_live_recorders):
        rec._lock = threading.Lock()
        rec._flush_lock = threading.Lock()
        # The parent's jobs are the parent's to record: the child's copies
        # never move again, and its exit would write them cancelled.
        rec._known = weakref.WeakKeyDictionary()
        rec._uids = weakref.WeakKeyDictionary()
        rec._dirty = {}
    _Flusher._guard = threading.Lock()
    _open_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_locks_in_child)


class Store:
    """The SQLite file of recorded jobs.  Safe to share between threads; any
    number of processes may open the same file at once."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.path = self.home / DB_NAME
        self._lock = threading.RLock()
        self._conn_: sqlite3.Connection | None = None
        self._pid = -1
        self._file: tuple[int, int] | None = None  # (device, inode) of the file the connection has open
        #: counts the times the file was found replaced or deleted and opened anew
        self.generation = 0
        # Reads have a connection of their own: in WAL mode they never wait for
        # a lock, and must not wait behind this process's writer while that one
        # waits for another process's lock.
        self._rlock = threading.Lock()
        self._rconn: sqlite3.Connection | None = None
        self._rkey: tuple[int, int] = (-1, -1)  # (pid, generation) it was opened for
        self._busy_ms = int(BUSY_TIMEOUT * 1000)  # the write connection's busy_timeout now
        _live.add(self)
        self._connect()

    # --- opening --------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn_ is not None and self._pid == os.getpid():
            if self._same_file():
                return self._conn_
            # Deleted or replaced under us: writing on would go to a file no one else sees.
            try:
                self._conn_.close()
            except sqlite3.Error:
                pass
            self._conn_ = None
            self.generation += 1
        try:
            made = not self.home.exists()
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            if made:
                os.chmod(self.home, 0o700)  # whatever the umask
            # Never open and close the file when it exists: closing any descriptor of it drops
            # every POSIX lock this process's SQLite connections hold on it, and another
            # process closing then takes itself for the last one and deletes the WAL under them.
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            if os.stat(self.path).st_uid == os.getuid():
                os.chmod(self.path, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot create the job store {self.path}: {exc.strerror or exc}; "
                             "set PYMW_HOME to a directory you can write, or PYMW_STORE=0 to "
                             "record no jobs") from exc
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the job store {self.path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            self._busy_ms = int(BUSY_TIMEOUT * 1000)
            self._retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, no fsync per flush
            conn.execute("PRAGMA foreign_keys = ON")
            self._retry(lambda: self._init_schema(conn))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._damaged(exc) from exc
        except BaseException:
            conn.close()
            raise
        self._conn_, self._pid = conn, os.getpid()
        try:
            info = os.stat(self.path)
            self._file = (info.st_dev, info.st_ino)
        except OSError:
            self._file = None
        return conn

    def _same_file(self) -> bool:
        """Whether the path still names the file the connection has open."""
        try:
            info = os.stat(self.path)
        except OSError:
            return False
        return self._file is None or (info.st_dev, info.st_ino) == self._file

    def _damaged(self, exc: sqlite3.DatabaseError) -> StoreError:
        if isinstance(exc, sqlite3.OperationalError) and _busy(exc):
            return StoreBusy(f"the job store {self.path} stayed locked by another process: {exc}")
        if isinstance(exc, sqlite3.OperationalError):
            return StoreError(f"the job store {self.path} cannot be used: {exc}")
        return StoreError(
            f"the job store {self.path} cannot be read ({exc}); it is damaged or not a pymw-magic "
            f"store. Move it aside (mv {self.path} {self.path}.broken, with its -wal and -shm files) "
            "and a new, empty store is made on next use; the jobs recorded in it are then no longer "
            "listed")

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        found = self._schema_version(conn)
        if found == SCHEMA_VERSION:
            return
        if found is not None and found > SCHEMA_VERSION:
            raise StoreError(f"the job store {self.path} has schema version {found}, written by a newer "
                             f"pymw-magic (this one knows version {SCHEMA_VERSION}); upgrade pymw-magic, "
                             "or set PYMW_HOME to another directory")
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = self._schema_version(conn)  # another process may have made it meanwhile
            if found is None:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (repr(time.time()),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int | None:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if not row:
            return None
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise sqlite3.DatabaseError(f"its schema version {row[0]!r} is not a number") from None

    @property
    def schema_version(self) -> int | None:
        with self._lock:
            return self._schema_version(self._connect())

    def close(self) -> None:
        with self._rlock:
            if self._rconn is not None and self._rkey[0] == os.getpid():
                self._rconn.close()
            self._rconn = None
        with self._lock:
            if self._conn_ is not None and self._pid == os.getpid():
                self._conn_.close()
            self._conn_ = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Store {self.path}>"

    # --- the two primitives: a write transaction, a read ----------------------------------
    @staticmethod
    def _retry(fn: Callable[[], Any], patience: float = WRITE_PATIENCE) -> Any:
        """Run ``fn``, again after a short random pause while the file is locked
        (SQLite's busy_timeout covers most waits; this the rest)."""
        deadline = time.monotonic() + patience
        pause = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.5)

    def _write(self, fn: Callable[[sqlite3.Connection], Any], patience: float = WRITE_PATIENCE) -> Any:
        # SQLite's own wait for another process's lock is bounded by ``patience``
        # too: a caller that gave 1 s (a listing flushing its own jobs) is not
        # held for the whole BUSY_TIMEOUT.
        # So is the wait for this process's own writer (another thread,
        # perhaps in a patient write waiting for that same lock), and each
        # retry's busy_timeout by what is left of it.
        deadline = time.monotonic() + patience

        def attempt() -> Any:
            left = deadline - time.monotonic()
            # (a floor: a same-process write that waits for nobody takes milliseconds)
            if not self._lock.acquire(timeout=max(left, LOCK_FLOOR)):
                raise sqlite3.OperationalError("database is locked (by this process's writer, which waits "
                                               "for another process)")
            try:
                conn = self._connect()
                wait_ms = int(max(0.0, min(deadline - time.monotonic(), BUSY_TIMEOUT)) * 1000)
                if wait_ms != self._busy_ms:
                    conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
                    self._busy_ms = wait_ms
                conn.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(conn)
                    conn.execute("COMMIT")
                    return out
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                self._lock.release()
        try:
            return self._retry(attempt, patience)
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    def _reader(self) -> sqlite3.Connection:
        """The read connection (under ``_rlock``), opened again when the
        file was replaced or the process forked."""
        conn = self._rconn
        if conn is not None and self._rkey == (os.getpid(), self.generation) and self._same_file():
            return conn
        if self._pid == os.getpid() and self._file is not None and self._same_file():
            key = (os.getpid(), self.generation)  # the file is the one the writer set up
        else:
            with self._lock:
                self._connect()  # (makes the file and its schema, notices a replaced one)
                key = (os.getpid(), self.generation)
        if conn is not None and self._rkey[0] == os.getpid():
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._rconn = None
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the job store {self.path}: {exc}") from exc
        self._rconn, self._rkey = conn, key
        return conn

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        def attempt() -> list[tuple]:
            with self._rlock:
                return self._reader().execute(sql, tuple(params)).fetchall()
        try:
            return self._retry(attempt)
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc

    # --- readers ---------------------------------------------------------------------------
    def jobs(self, all: bool = True, limit: int | None = None) -> JobList:
        """Stored jobs, newest first; ``all=False``: only the active ones
        (a lost job is not active)."""
        if limit is not None and not 0 <= int(limit):
            # (SQLite reads LIMIT -1 as none at all, a slice [:-1] as all but the last)
            raise ValueError(f"limit must be a whole number >= 0 (or None for every job), not {limit!r}")
        where = "" if all else "WHERE state = 'active'"
        lim = "" if limit is None or not all else f"LIMIT {int(limit)}"
        rows = self._read(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs {where} "
                          f"ORDER BY created DESC, rowid DESC {lim}")
        records = [_job_record(row) for row in rows]
        if not all:
            records = [r for r in records if r.state == "active"]
            if limit is not None:
                records = records[:int(limit)]
        return JobList(records)

    def job(self, uid_or_name: str) -> JobRecord:
        """The job with this uid, unique uid prefix (at least 4 characters) or
        name (the newest of that name).  :class:`UnknownJob` if none."""
        key = _text(str(uid_or_name))
        sql = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE "
        rows = self._read(sql + "uid = ?", (key,))
        if not rows:
            named = self._read(sql + "name = ? ORDER BY created DESC LIMIT 1", (key,))
            prefixed: list[tuple] = []
            if len(key) >= 4 and all(c in "0123456789abcdef" for c in key):
                prefixed = self._read(sql + "uid LIKE ? LIMIT 2", (key + "%",))
                if len(prefixed) > 1:
                    raise UnknownJob(f"{key!r} is the start of several job ids in {self.path}; give more of it")
            if named and prefixed and named[0][0] != prefixed[0][0]:
                # Never guess which one is meant: a remove would delete the other.
                raise UnknownJob(f"{key!r} is both the name of job {named[0][0]} and the start of the id of "
                                 f"another job ({prefixed[0][0]}) in {self.path}; give the full id")
            rows = named or prefixed
        if not rows:
            raise UnknownJob(f"no job {key!r} in the job store {self.path} (pymw_magic.store.jobs() lists them)")
        return _job_record(rows[0])

    def tasks(self, uid: str, offset: int = 0, limit: int = 100, state: str | None = None) -> list[TaskRecord]:
        """A page of a job's recorded tasks in input order (batch-family jobs
        and jobs recorded with ``tasks=True``; empty for others)."""
        if int(offset) < 0 or int(limit) < 0:
            raise ValueError(f"offset and limit must be whole numbers >= 0, not {offset!r} and {limit!r}")
        uid = self._uid(uid)
        if state is not None and state not in TASK_STATES:
            raise ValueError(f"state {state!r} is not one of {', '.join(TASK_STATES)}")
        cond = "job_uid = ?" + (" AND state = ?" if state else "")
        params: list[Any] = [uid] + ([state] if state else [])
        rows = self._read(f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks WHERE {cond} ORDER BY idx "
                          f"LIMIT ? OFFSET ?", params + [int(limit), int(offset)])
        return [TaskRecord(*row) for row in rows]

    def count_tasks(self, uid: str, state: str | None = None) -> int:
        """How many tasks of the job are recorded (in ``state``, if given)."""
        uid = self._uid(uid)
        if state is None:
            return self._read("SELECT COUNT(*) FROM tasks WHERE job_uid = ?", (uid,))[0][0]
        return self._read("SELECT COUNT(*) FROM tasks WHERE job_uid = ? AND state = ?", (uid, state))[0][0]

    def _uid(self, uid_or_name: str) -> str:
        rows = self._read("SELECT uid FROM jobs WHERE uid = ?", (str(uid_or_name),))
        return rows[0][0] if rows else self.job(uid_or_name).uid

    # --- the sidebar's requests and housekeeping ------------------------------------------------
    def request_cancel(self, uid: str, patience: float = WRITE_PATIENCE) -> bool:
        """Ask the process that owns the job to cancel it (its recorder polls
        this, about twice a second).  False if the job has already ended."""
        uid = self._uid(uid)
        return self._write(lambda c: c.execute(
            "UPDATE jobs SET cancel_requested = 1 WHERE uid = ? AND state = 'active'", (uid,)).rowcount,
            patience) > 0

    def cancel_requested(self, uid: str) -> bool:
        """Whether someone asked to cancel the job."""
        rows = self._read("SELECT cancel_requested FROM jobs WHERE uid = ?", (uid,))
        return bool(rows and rows[0][0])

    def set_handle(self, uid: str, handle: dict[str, Any]) -> None:
        """Replace a job's backend handle (JSON-able: cluster id, log offset, ...)."""
        text = _to_json(handle)
        self._write(lambda c: c.execute("UPDATE jobs SET handle = ?, updated_at = ? WHERE uid = ?",
                                        (text, time.time(), uid)))

    def remove(self, uid: str, force: bool = False, patience: float = WRITE_PATIENCE) -> bool:
        """Delete a job and its tasks.  An active job (its owner alive) is
        refused unless ``force``: cancel it first.  False if there was none.
        ``patience``: seconds to wait for a store another process holds
        locked (then :class:`StoreBusy`)."""
        try:
            rec = self.job(uid)
        except UnknownJob:
            return False
        if rec.state == "active" and not force:
            raise StoreError(f"job {rec.name!r} ({rec.uid}) is still active ({rec.owner}); cancel it "
                             "first, or remove(..., force=True) to forget it anyway")

        def delete(c: sqlite3.Connection) -> int:
            c.execute("DELETE FROM tasks WHERE job_uid = ?", (rec.uid,))
            return c.execute("DELETE FROM jobs WHERE uid = ?", (rec.uid,)).rowcount
        return self._write(delete, patience) > 0

    def prune(self, older_than: float) -> int:
        """Delete the jobs (and their tasks) that ended more than
        ``older_than`` seconds ago; active and lost jobs stay.  Returns how
        many were deleted."""
        cutoff = time.time() - float(older_than)

        def delete(c: sqlite3.Connection) -> int:
            old = "SELECT uid FROM jobs WHERE state != 'active' AND ended IS NOT NULL AND ended < ?"
            c.execute(f"DELETE FROM tasks WHERE job_uid IN ({old})", (cutoff,))
            return c.execute(f"DELETE FROM jobs WHERE uid IN ({old})", (cutoff,)).rowcount
        return self._write(delete)

    # --- the recorder's bulk write --------------------------------------------------------------
    def _save(self, jobs: list[tuple], tasks: list[tuple], polled: list[str],
              patience: float = WRITE_PATIENCE, dropped: Iterable[str] = (), *,
              stored: set[str] | None = None, generation: int | None = None,
              gone: set[str] | None = None) -> list[str]:
        """One transaction: delete the ``dropped`` jobs' rows, upsert job and
        task rows; return which of ``polled`` have a cancel request (a plain
        read when nothing is written).  ``stored``: jobs whose row the
        writer knows is in the file of ``generation``; one missing there was
        removed by another process: none of its rows is written, its uid
        is added to ``gone``."""
        dropped = list(dropped)
        def asked(c: sqlite3.Connection) -> list[str]:
            out: list[str] = []
            for i in range(0, len(polled), 500):
                part = polled[i:i + 500]
                out += [r[0] for r in c.execute(
                    f"SELECT uid FROM jobs WHERE cancel_requested = 1 AND uid IN ({', '.join('?' * len(part))})",
                    part)]
            return out

        def write(c: sqlite3.Connection) -> list[str]:
            for uid in dropped:
                c.execute("DELETE FROM tasks WHERE job_uid = ?", (uid,))
                c.execute("DELETE FROM jobs WHERE uid = ?", (uid,))
            job_rows, task_rows = jobs, tasks
            missing: set[str] = set()
            if stored and generation == self.generation:  # (a replaced file: every row goes in anew)
                wanted = list(stored)
                for i in range(0, len(wanted), 500):
                    part = wanted[i:i + 500]
                    have = {r[0] for r in c.execute(
                        f"SELECT uid FROM jobs WHERE uid IN ({', '.join('?' * len(part))})", part)}
                    missing.update(u for u in part if u not in have)
                if missing:
                    job_rows = [r for r in jobs if r[0] not in missing]
                    task_rows = [r for r in tasks if r[0] not in missing]
            if job_rows:
                c.executemany(_UPSERT_JOB, job_rows)
            if task_rows:
                c.executemany(_UPSERT_TASK, task_rows)
            if gone is not None:
                gone.clear()  # (a retried attempt decides anew)
                gone.update(missing)
            return asked(c)

        if jobs or tasks or dropped:
            return self._write(write, patience)
        if not polled:
            return []

        def read() -> list[str]:
            with self._lock:
                return asked(self._connect())
        try:
            return self._retry(read, patience)
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc


def _job_record(row: tuple) -> JobRecord:
    d = dict(zip(_JOB_COLUMNS, row))
    owner = Owner(d["owner_kind"], d["owner_pid"], d["owner_host"], d["owner_start"], d["kernel_id"],
                  d["script"])
    state = d["state"]
    if state == "active" and d["family"] == "pool" and owner.alive() is False:
        state = "lost"  # its process is gone: nothing runs it any more
    return JobRecord(
        uid=d["uid"], job_id=d["job_id"], name=d["name"], backend=d["backend"], family=d["family"],
        state=state, counts={s: d[s] for s in TASK_STATES}, total=d["total"],
        options=_from_json(d["options"]) or {}, owner=owner, notebook=d["notebook"], created=d["created"],
        ended=d["ended"], updated_at=d["updated_at"], handle=_from_json(d["handle"]),
        cancel_requested=bool(d["cancel_requested"]), tasks_recorded=bool(d["tasks_recorded"]))


def _text(value: Any) -> Any:
    """``value`` as SQLite can store it: a str holding lone surrogates (a
    file name Python could not decode, text from another machine) gets them
    as ``\\udcxx`` escapes; anything else unchanged."""
    if value.__class__ is not str:
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _jsonable(value: Any) -> Any:
    """``value`` with everything JSON cannot hold (objects, inf, nan) as repr()."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _to_json(value: Any) -> str:
    return json.dumps(_jsonable(value), allow_nan=False)


def _from_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


# --- the writer: an observer of masters' events -----------------------------------------------
class _Tracked:
    """The recorder's note of one job (created on the job's first event).
    It holds the job weakly: a finished job its caller dropped is let go at
    once; what is still to be written of it was copied when it ended."""
    __slots__ = ("ref", "uid", "family", "tasks", "locate", "options", "created", "ended_kind",
                 "ended_at", "handle", "cancel_seen", "dirty_tasks", "dropped", "adopted", "final",
                 "final_tasks", "written", "removed", "stored", "__weakref__")

    def __init__(self, job: Job, uid: str, family: str, tasks: bool, options: str):
        self.ref = weakref.ref(job)
        self.uid = uid
        self.family = family
        self.tasks = tasks
        self.locate: Callable[[Task], str | None] | None = None
        self.options = options
        self.created = time.time()
        self.ended_kind: str | None = None
        self.ended_at: float | None = None
        self.handle: str | None = None
        self.cancel_seen = False
        self.dirty_tasks: dict[Task, None] = {}
        self.dropped: list[str] = []  # ids it was known by before track(uid=...): their rows go
        self.adopted = False          # its uid is a stored job's (track(uid=...)), not one made here
        self.final: tuple | None = None   # the job's row as it ended (written even if the job is gone)
        self.final_tasks: list[tuple] = []  # task rows made when it ended, not written yet
        self.written: Any = None  # the progress last written (a running job is rewritten when it moves)
        self.removed = False  # job.remove() deleted its rows: nothing of it is written again
        # Its row is in the file (written by this recorder, or the stored job it
        # continues): a later flush finding it gone knows another process removed it.
        self.stored = False

    @property
    def job(self) -> Job | None:
        return self.ref()


def _snapshot(tasks: Any) -> list[Task]:
    """A copy of a job's task list or deque, which a scheduler thread may be
    growing meanwhile (a deque refuses to be iterated while it changes)."""
    for _ in range(100):
        try:
            return list(tasks)
        except RuntimeError:
            continue
    return []


class JobRecorder:
    """Records the jobs of the masters it is attached to into a :class:`Store`.

    ``tasks``: record each task too — None (default) for batch-family
    backends only, True for every job, False for none; :meth:`track` opts a
    single job in.  The observer only marks jobs dirty; a process-wide
    thread writes them (see the module docstring).  If a write fails the
    recorder warns once and stops recording; the computation goes on.
    """

    def __init__(self, store: Store, *, tasks: bool | None = None,
                 on_cancel: Callable[[Job], Any] | None = None):
        self.store = store
        self.tasks = tasks
        #: what a cancel request from the store does (default: ``job.cancel()``)
        self.on_cancel = on_cancel or (lambda job: job.cancel())
        self.disabled = False
        self._lock = threading.Lock()        # the dirty sets
        self._flush_lock = threading.Lock()  # one flush at a time
        _live_recorders.add(self)
        self._dirty: dict[_Tracked, None] = {}
        # Both weak: a job dropped by its caller goes; an unfinished one its master holds.
        self._known: weakref.WeakKeyDictionary[Job, _Tracked] = weakref.WeakKeyDictionary()
        self._uids: weakref.WeakKeyDictionary[Job, _Tracked] = weakref.WeakKeyDictionary()
        self._subscriptions: dict[int, tuple[weakref.ref, Subscription]] = {}
        self._owner, self._notebook = current_owner()
        self._families: dict[str, str] = {}
        self._warned = False
        self._generation = store.generation
        _Flusher.get().add(self)

    # --- wiring -----------------------------------------------------------------------------
    def attach(self, master: Master) -> Subscription:
        """Subscribe to ``master.events`` (once: attaching twice returns the
        first subscription)."""
        with self._lock:
            entry = self._subscriptions.get(id(master))
            if entry is not None and entry[0]() is master:
                return entry[1]
            for key in [k for k, (ref, _) in self._subscriptions.items() if ref() is None]:
                del self._subscriptions[key]  # masters gone since
            # Per-batch task events only where per-task rows are kept: the
            # counts of a pool job are read at each flush instead.
            sub = master.events.subscribe(self, tasks=self._wants_tasks(master))
            self._subscriptions[id(master)] = (weakref.ref(master), sub)
        return sub

    def _wants_tasks(self, master: Master) -> bool:
        """(under ``_lock``) Whether ``master``'s jobs get per-task rows by default."""
        if self.tasks is not None:
            return self.tasks
        return self._family(getattr(master, "backend_name", "?")) == "batch"

    def _family(self, backend: str) -> str:
        """(under ``_lock``) The family of a backend, by name (cached)."""
        family = self._families.get(backend)
        if family is None:
            try:
                from .backends import get_backend
                family = str(get_backend(backend).family)
            except Exception:
                family = "pool"
            self._families[backend] = family
        return family

    def attached(self, master: Master) -> bool:
        """Whether this recorder listens to ``master``'s events."""
        with self._lock:
            entry = self._subscriptions.get(id(master))
            return entry is not None and entry[0]() is master

    def detach(self, master: Master) -> None:
        with self._lock:
            entry = self._subscriptions.pop(id(master), None)
        if entry is not None:
            entry[1].close()

    def track(self, job: Job, *, tasks: bool | None = None, handle: dict[str, Any] | None = None,
              locate: Callable[[Task], str | None] | None = None, uid: str | None = None) -> str:
        """Make sure ``job`` is recorded; return its uid.  ``tasks=True`` opts
        it into per-task rows, ``handle`` sets its backend handle, ``locate(task)``
        names where a task's result is kept (a batch job's output file).
        ``uid``: the job continues a stored one (attached again): its row is
        updated, never a second one made (one written meanwhile under a
        fresh id is deleted)."""
        with self._lock:
            t = self._known.get(job) or self._track(job)
            if t.removed:
                return t.uid
            if uid is not None and uid != t.uid:
                if not t.adopted:  # only an id this recorder made up; never another stored job's row
                    t.dropped.append(t.uid)
                t.uid, t.adopted = uid, True
                t.stored = True  # (the stored job's row: never made anew once removed)
                self._dirty[t] = None
            if tasks is not None:
                t.tasks = tasks
                if tasks:
                    t.dirty_tasks.update(dict.fromkeys(_snapshot(job.tasks)))
                    entry = self._subscriptions.get(id(job.master))
                    if entry is not None and entry[0]() is job.master and not entry[1].tasks:
                        entry[1].want_tasks()  # this job's task rows need the task events
            if locate is not None:
                t.locate = locate
            if handle is not None:
                t.handle = _to_json(handle)
            self._dirty[t] = None
        return t.uid

    def set_handle(self, job: Job, **handle: Any) -> None:
        """Merge ``handle`` into the job's stored handle (written with the next flush)."""
        with self._lock:
            t = self._known.get(job) or self._track(job)
            if t.removed:
                return
            current = _from_json(t.handle) or {}
            current.update(handle)
            t.handle = _to_json(current)
            self._dirty[t] = None

    def job_of(self, uid: str) -> Job | None:
        """The live job of this process recorded under ``uid``, if any."""
        with self._lock:
            for t in list(self._uids.values()):
                if t.uid == uid:
                    return t.job
        return None

    def uid(self, job: Job) -> str:
        """The job's id in the store (assigned on first sight)."""
        with self._lock:
            t = self._known.get(job) or self._uids.get(job) or self._track(job)
        return t.uid

    # --- the observer (scheduler threads: a dict insert, no I/O) -----------------------------
    def __call__(self, event: Event) -> None:
        if event.__class__ is TasksChanged:
            job = event.job
            with self._lock:
                t = self._known.get(job) or self._track(job)
                if t.removed:
                    return
                self._dirty[t] = None
                if t.tasks:
                    t.dirty_tasks.update(dict.fromkeys(event.tasks))
        elif event.__class__ is JobChanged:
            job = event.job
            with self._lock:
                t = self._known.get(job) or self._track(job)
                if t.removed:
                    return
                if event.kind == "submitted":
                    t.ended_kind = t.ended_at = None
                    t.final = None
                else:
                    t.ended_kind, t.ended_at = event.kind, time.time()
                    self._keep_final(t, job)
                self._dirty[t] = None
            if event.kind != "submitted" and not job.open_ended:
                # A job's end is written at once.  (Not the submit() job's,
                # which "ends" with each of its calls: a wake-up per round
                # trip; its end is written at the next flush, within 0.5 s.)
                _Flusher.get().wake()

    def _keep_final(self, t: _Tracked, job: Job) -> None:
        """Copy what is still to be written of an ended job (under ``_lock``):
        its caller may drop it before the next flush."""
        if not job.done():
            return
        try:
            t.final = self._job_row(t, time.time(), job=job)[0]
            if t.dirty_tasks:
                t.final_tasks += [self._task_row(t, task) for task in t.dirty_tasks]
                t.dirty_tasks = {}
        except Exception:  # (the live job is read at the flush instead)
            t.final = None

    def _track(self, job: Job) -> _Tracked:
        """First sight of a job (under ``_lock``)."""
        t = self._uids.get(job)
        if t is None:
            master = job.master
            family = self._family(getattr(master, "backend_name", "?"))
            options = dict(getattr(master, "options", {}) or {})
            options.update(chunksize=job.chunksize, timeout=job.timeout, retries=job.retries)
            tasks = self.tasks if self.tasks is not None else family == "batch"
            t = _Tracked(job, uuid.uuid4().hex, family, tasks, _to_json(options))
            self._uids[job] = t
        elif t.removed:
            return t  # (removed: known by its id, never written again)
        self._known[job] = t
        return t

    def forget(self, job: Job, patience: float = WRITE_PATIENCE) -> None:
        """``job`` is being removed: after this returns nothing of it is
        written again (a late event, a cancel racing the removal, the
        flusher), so deleting its rows then is for good.  Waits for a flush
        under way (it may hold the job's rows) up to ``patience`` seconds."""
        got = self._flush_lock.acquire(timeout=patience)
        try:
            with self._lock:
                t = self._uids.get(job)
                if t is None:
                    return
                self._drop(t)
        finally:
            if got:
                self._flush_lock.release()

    def _drop(self, t: _Tracked) -> None:
        """(under ``_lock``) Never write ``t`` again: its rows are deleted."""
        t.removed = True
        job = t.job
        if job is not None:
            self._known.pop(job, None)
        self._dirty.pop(t, None)
        t.dirty_tasks, t.final_tasks, t.final = {}, [], None

    # --- the flush (the flusher thread, flush(), exit) -----------------------------------------
    def flush(self, patience: float = WRITE_PATIENCE, exiting: bool = False) -> None:
        """Write every dirty job now, in one transaction (also done by the
        process's flusher thread twice a second and at each job's end).
        ``patience``: seconds to wait for a store another process holds
        locked; what could not be written stays dirty for the next flush.
        ``exiting``: the process ends — its pool jobs still running are
        written as cancelled (the master's exit handler stops them)."""
        if self.disabled:
            return
        if not self._flush_lock.acquire(timeout=patience):
            return
        try:
            with self._lock:
                known = list(self._known.items())
                if exiting:
                    for job, t in known:
                        if t.family == "pool" and not (t.ended_kind and job.done()):
                            self._dirty[t] = None
                for job, t in known:
                    if t.ended_kind is None and t not in self._dirty:
                        # Running, heard of through job events only: its
                        # counts are read now, written if they moved.
                        moved = tuple(job.counts().values())
                        if moved != t.written:
                            t.written = moved
                            self._dirty[t] = None
                dirty, self._dirty = self._dirty, {}
                tasks = {t: t.dirty_tasks for t in dirty if t.dirty_tasks}
                for t in tasks:
                    t.dirty_tasks = {}
                made = {t: t.final_tasks for t in dirty if t.final_tasks}
                for t in made:
                    t.final_tasks = []
                polled = [t for job, t in known
                          if not t.cancel_seen and (t.ended_kind is None or not job.done())]
                # No job is held past here: the write below may wait on another
                # writer for a long time, and a job its caller dropped must go.
                known = job = None
            if not dirty and not polled:
                return
            now = time.time()
            job_rows, task_rows, ended = [], [], []
            dropped = [uid for t in dirty for uid in t.dropped]
            for t in dirty:
                row, done = self._job_row(t, now, exiting)
                if row is None:
                    continue  # gone before it ended (its master gone too): nothing true to write
                job_rows.append(row)
                if done:
                    ended.append(t)
            for t, ts in tasks.items():
                task_rows += [self._task_row(t, task) for task in ts]
            for t, rows in made.items():
                task_rows += rows
            try:
                stored = {t.uid for t in dirty if t.stored}
                gone: set[str] = set()
                asked = self.store._save(job_rows, task_rows, [t.uid for t in polled], patience, dropped,
                                         stored=stored, generation=self._generation, gone=gone)
            except StoreBusy:
                self._requeue(dirty, tasks, made)  # locked beyond patience: try again next time
                return
            except (StoreError, sqlite3.Error, OSError) as exc:
                self._requeue(dirty, tasks, made)
                self._disable(exc)
                return
            with self._lock:
                written = {row[0] for row in job_rows}
                for t in dirty:
                    if t.uid in gone:
                        # Removed by another process (remove(), the sidebar) while
                        # this one still knew it: it stays removed.
                        self._drop(t)
                    elif t.uid in written and not t.removed:
                        t.stored = True
                if self.store.generation != self._generation:
                    # The file was deleted or replaced: what this process still
                    # knows goes into the new one at the next flush.
                    self._generation = self.store.generation
                    for t in list(self._uids.values()):
                        t.stored = False
                    for job, t in list(self._known.items()):
                        self._dirty[t] = None
                        if t.tasks:
                            t.dirty_tasks.update(dict.fromkeys(_snapshot(job.tasks)))
                    _Flusher.get().wake()
                for t in dirty:
                    if dropped and t.dropped:
                        t.dropped = [u for u in t.dropped if u not in dropped]
                for t in ended:
                    job = t.job
                    if t.removed:
                        continue
                    if t.ended_kind is not None and job is not None and self._known.get(job) is t \
                            and t not in self._dirty:
                        del self._known[job]  # the weak uid map keeps its id should it reopen
                job = None
        finally:
            self._flush_lock.release()
        if asked:
            by_uid = {t.uid: t for t in polled}
            del polled
            for uid in asked:
                t = by_uid[uid]
                t.cancel_seen = True
                job = t.job
                if job is None:
                    continue
                try:
                    self.on_cancel(job)
                except Exception as exc:
                    warnings.warn(f"pymw-magic: cancelling job {job.name!r} at the store's request "
                                  f"failed: {exc!r}", RuntimeWarning, stacklevel=2)
                del job

    def _requeue(self, dirty: dict[_Tracked, None], tasks: dict[_Tracked, dict],
                 made: dict[_Tracked, list[tuple]] | None = None) -> None:
        with self._lock:
            for t in dirty:
                self._dirty.setdefault(t, None)
            for t, ts in tasks.items():
                t.dirty_tasks.update(ts)
            for t, rows in (made or {}).items():
                t.final_tasks[:0] = rows

    def _job_row(self, t: _Tracked, now: float, exiting: bool = False,
                 job: Job | None = None) -> tuple[tuple | None, bool]:
        """The job's row and whether it has ended; (None, False) for a job
        gone before it ended.  A job gone after it ended: the row kept then."""
        if job is None:
            job = t.job
        if job is None:
            return (t.final, True) if t.final is not None else (None, False)
        counts = job.counts()
        total = job.progress[1]
        state, ended = "active", t.ended_at
        if t.ended_kind is not None and job.done():
            if t.ended_kind == "cancelled":
                state = "cancelled"
            elif counts.get("failed"):
                state = "failed"
            else:  # (a master terminated at exit cancels its tasks, not the job)
                state = "cancelled" if counts.get("cancelled") else "finished"
        elif exiting and t.family == "pool":
            # Every live master is stopped at exit: what has not ended is cancelled.
            state, ended = "cancelled", now
            for s in ("pending", "running", "retrying"):
                counts["cancelled"] = counts.get("cancelled", 0) + counts.get(s, 0)
                counts[s] = 0
        o = self._owner
        row = (t.uid, job.id, _text(job.name), _text(job.master.backend_name), t.family, t.options, o.kind, o.pid,
               _text(o.host), o.start, _text(o.kernel_id), _text(o.script), _text(self._notebook), t.created,
               ended if state != "active" else None, state,
               *(counts.get(s, 0) for s in TASK_STATES), total, now, t.handle, 0, int(bool(t.tasks)))
        return row, state != "active"

    def _task_row(self, t: _Tracked, task: Task) -> tuple:
        error = tb = None
        if task.error is not None:
            error = f"{type(task.error).__name__}: {task.error}"
            tb = task.remote_traceback
        location = None
        if t.locate is not None:
            try:
                location = t.locate(task)
            except Exception:
                location = None
        return (t.uid, task.index, task.state.value, task.attempts, _text(task.host), _text(task.worker),
                task.submitted, task.started, task.finished, _text(location), _text(error), _text(tb))

    def _disable(self, exc: BaseException) -> None:
        """Stop recording for good (warned once): the computation goes on."""
        self.disabled = True
        with self._lock:
            subs = [s for _, s in self._subscriptions.values()]
            self._subscriptions.clear()
            self._dirty.clear()
            self._known.clear()
        for s in subs:
            s.close()
        _Flusher.get().discard(self)
        if not self._warned:
            self._warned = True
            warnings.warn(f"pymw-magic: jobs are no longer recorded in the job store: {exc}",
                          RuntimeWarning, stacklevel=2)


class _Flusher:
    """The one thread per process that flushes every recorder."""

    _instance: _Flusher | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.recorders: weakref.WeakSet[JobRecorder] = weakref.WeakSet()
        self._wake = threading.Event()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="pymw-store", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls) -> _Flusher:
        inst = cls._instance
        if inst is not None and inst._pid == os.getpid():
            return inst
        with cls._guard:
            if cls._instance is None or cls._instance._pid != os.getpid():  # (a forked child)
                forked = cls._instance is not None
                cls._instance = _Flusher()
                if forked:
                    # The recorders the child inherited were added to the
                    # parent's flusher: this one flushes them now (else the
                    # child's jobs are never written, not even at its exit).
                    for recorder in list(_live_recorders):
                        if not recorder.disabled:
                            cls._instance.add(recorder)
            return cls._instance

    def add(self, recorder: JobRecorder) -> None:
        self.recorders.add(recorder)

    def discard(self, recorder: JobRecorder) -> None:
        self.recorders.discard(recorder)

    def wake(self) -> None:
        self._wake.set()

    def flush_all(self, patience: float = WRITE_PATIENCE, exiting: bool = False) -> None:
        for recorder in list(self.recorders):
            try:
                recorder.flush(patience, exiting)
            except Exception as exc:  # never let one recorder stop the thread
                recorder._disable(exc)

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            self.flush_all()
            time.sleep(MIN_SPACING)


@atexit.register
def _flush_at_exit() -> None:
    # (to its end: a Ctrl-C at exit must not leave a cancelled job "active")
    despite_interrupts(_flush_all_and_close)


def _flush_all_and_close() -> None:
    inst = _Flusher._instance
    if inst is not None and inst._pid == os.getpid():
        inst.flush_all(EXIT_PATIENCE, exiting=True)
    for store in list(_stores.values()):
        store.close()  # the last connection to close folds the WAL file back into the store


# --- the one-liners ----------------------------------------------------------------------------
_stores: dict[Path, Store] = {}
_recorders: dict[Path, JobRecorder] = {}
_failed: dict[Path, str] = {}
_open_lock = threading.Lock()


def open_store(home: str | os.PathLike | None = None) -> Store:
    """The process's :class:`Store` for ``home`` (default :func:`default_home`),
    opened once and shared."""
    path = (Path(home).expanduser() if home is not None else default_home()).absolute()
    with _open_lock:
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = Store(path)
        return store


def recorder(home: str | os.PathLike | None = None) -> JobRecorder | None:
    """The process's recorder for the store at ``home``; None (warned once
    per place) when recording is off (``PYMW_STORE=0``) or the store cannot
    be opened."""
    if not enabled():
        return None
    path = (Path(home).expanduser() if home is not None else default_home()).absolute()
    with _open_lock:
        rec = _recorders.get(path)
        if rec is not None:
            return None if rec.disabled else rec  # a recorder that gave up stays off
        if path in _failed:
            return None
    try:
        store = open_store(path)
    except StoreError as exc:
        with _open_lock:
            first = path not in _failed
            _failed[path] = str(exc)
        if first:
            warnings.warn(f"pymw-magic: jobs are not recorded: {exc}", RuntimeWarning, stacklevel=3)
        return None
    with _open_lock:
        rec = _recorders.get(path)
        if rec is None:
            rec = _recorders[path] = JobRecorder(store)
        return None if rec.disabled else rec


def record(master: Master, home: str | os.PathLike | None = None) -> JobRecorder | None:
    """Record ``master``'s jobs in the job store (the default one, or the one
    at ``home``).  Never raises for a store problem: warns once and returns
    None.  This is what :class:`~pymw_magic.master.Master` calls."""
    rec = recorder(home)
    if rec is not None:
        rec.attach(master)
    return rec


def _flush_own(home: str | os.PathLike | None = None) -> None:
    """Write what this process's recorder still holds for the store at
    ``home``, so a listing right after ``map_async`` shows the new job
    (not an older namesake) without waiting for the flusher's next turn."""
    path = (Path(home).expanduser() if home is not None else default_home()).absolute()
    with _open_lock:
        rec = _recorders.get(path)
    if rec is not None and not rec.disabled:
        rec.flush(patience=1.0)


def jobs(all: bool = True, limit: int | None = None) -> JobList:
    """The stored jobs of every process, newest first (``all=False``: active only).
    A pool job whose process is gone reads as ``lost``, naming that process."""
    _flush_own()
    return open_store().jobs(all=all, limit=limit)


def job(uid_or_name: str) -> JobRecord:
    """One stored job by uid, uid prefix or name (newest of that name)."""
    _flush_own()
    return open_store().job(uid_or_name)


def _record_new_master(master: Master) -> None:
    """The master module's new-master hook: every master is recorded
    (unless ``PYMW_STORE=0``, read when the master is made)."""
    record(master)


def _wire() -> bool:
    """Register :func:`record` with the master module's hook, once per
    process; False where this master module has no hook."""
    from . import master as _master_module
    hook = getattr(_master_module, "on_new_master", None)
    if hook is None:
        return False
    hook(_record_new_master)
    return True


WIRED = _wire()

__all__ = ["Store", "StoreError", "StoreBusy", "UnknownJob", "JobRecorder", "JobRecord", "TaskRecord", "JobList",
           "Owner", "record", "recorder", "open_store", "jobs", "job", "default_home", "enabled",
           "SCHEMA_VERSION"]
