"""The BOINC backend: one work unit per chunk, signed inputs, results that
are never unpickled, replicas cross-checked by a quorum.

::

    BatchBackend (batch.py)                 this module                              the BOINC project
    ──────────────────────                  ───────────                              ─────────────────
    first use (Master(...)) ──────────────▶ setup(): config.xml daemons, bin/ scripts ─▶ bin/xadd, bin/update_versions,
                                            app version = launcher + runtime + PUBLIC key  bin/stop + bin/start if changed
    JobDir(scheme="ed25519", codec="safe")  function.bin, in/<i>.in signed with the user's
                                            private key (it never leaves this machine)
    submit(job, chunks) ──────────────────▶ immutable names (content hash) ──────────▶ bin/stage_file_native --copy DIR
                                            templates/pymw_<job>_in|_out (the job's      (one process per wave)
                                            quorum, limits, interpreter) ────────────▶ bin/create_work --stdin --batch B
                                            one line per chunk: --wu_name W fn in        (one process per wave)
                                                                volunteer: launcher ─▶ runtime verifies, runs, encodes
                                                                pymw_validate (quorum) ─▶ pymw_assimilate copies the
    poll_events() ◀── inotify (watchdog) ── pymw_results/<B>/events (from an offset) ◀── canonical output out of upload/
         │  blocks on the watcher's event;  pymw_results/<B>/notes  ◀──────────────── pymw_validate: replicas disagree
         │  re-reads every 5 s at most       (a warning at once, the values kept for the error)
         └─ give_up_after passed ──────────▶ the work unit cancelled, its tasks failed (a quorum no host can reach)
    fetch_output(chunk) ◀── size-capped ─── pymw_results/<B>/<W>.out   ──▶ out/<i>.out ──▶ read_output (safe codec)
    remove(procs) ────────────────────────▶ bin/pymw_wus B (ids) ──▶ bin/cancel_jobs MIN MAX per run of ids
                                            (bin/cancel_jobs --name W where the database cannot be read)
    job ended / removed ──────────────────▶ templates/pymw_<B>_in|_out, the function file (+ .md5) deleted;
                                            at removal pymw_results/<B>/ too

Who does what: this module owns the BOINC side only — options, the project
(found, checked, set up), naming and staging files, templates, the event
lines our assimilator writes, cancelling work units, and how a job is
recorded so that ``attach`` follows it again (the project, the batch, the
events offset).  The volunteer side is the shipped runtime
(:mod:`~pymw_magic.oneshot`) started by the launcher of
:mod:`pymw_magic.boinc_app`; the server-side scripts are there too.
Project tools run as the owner of the project directory: as root, tools
run as that user (never as root on another user's project).

Following is event-driven: a watchdog observer (inotify) on the project's
``pymw_results/`` and on each followed batch's directory wakes
:meth:`poll_events`; the files are read again without a wake-up at most
every :attr:`BoincBackend.safety_reread` seconds, because inotify misses
writes made on another host of a shared file system (an assimilator on
another machine writing over NFS).  Without watchdog (the ``boinc``
extra), or where inotify cannot watch, the files are read every second.

BOINC never ends a work unit whose next replica no volunteer may take (a
quorum of 3 on a project with 2 volunteers, with one result per user per
work unit): it stays unsent, without a deadline.  ``give_up_after`` bounds
that on our side: a work unit still open that many seconds after its
creation, or after its job's last collected result if that is later (a
long queue on few hosts is progress, not a hang), is cancelled and its
tasks fail saying why (with the values that disagreed, if any).

It talks only to the documented tools and files of a BOINC project, so
``pymw_magic.testing.boinc.StandInProject`` and a real server are used
the same way.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
import weakref
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, ClassVar, Iterable
from xml.sax.saxutils import escape

from .. import boinc_app
from ..errors import PymwError, TaskFailed
from ..jobdir import JobDir, OutputTooLarge
from .base import Option
from .batch import BATCH_OPTIONS, MAX_OUTPUT_MB, BatchBackend, BatchError, BatchEvent, Chunk, JobState

_log = logging.getLogger("pymw_magic")

#: the platform our app version is built for (the runtime needs a POSIX shell and python3)
PLATFORM = "x86_64-pc-linux-gnu"
#: seconds a project tool may take (create_work of 10,000 work units included)
TOOL_TIMEOUT = 600.0
#: seconds between tries of bin/pymw_wus while the database is busy (the last: none)
WUS_RETRY_PAUSES = (0.1, 0.2, 0.4, 0.8, 1.6, 0.0)
#: BOINC's default rsc_fpops_est (1 hour on a 1 GFLOPS host) when no duration is measured
DEFAULT_FPOPS = 3600e9
#: a host's assumed speed, to turn measured seconds into floating-point operations
HOST_FLOPS = 1e9
#: BOINC keeps a work unit's delay_bound in a signed 32-bit int column
MAX_DELAY_BOUND = 2**31 - 1
#: BOINC's batch column is a signed 32-bit int
MAX_BATCH = 2**31 - 1
#: the daemons every project needs for our app, besides the validator and assimilator
BASE_DAEMONS = ("feeder", "transitioner", "file_deleter")
#: seconds a removed job waits for BOINC to assimilate its cancelled work units
#: (their lines are the last of its results directory, which then goes)
REMOVE_PATIENCE = 30.0


class BoincError(BatchError):
    """A BOINC work unit failed (too many errors, no quorum, cancelled);
    ``error_mask`` is BOINC's, ``stderr`` the app's (where the project's
    database could be read), ``disagree`` what the validator saw."""

    error_mask: int = 0
    stderr: str = ""
    disagree: str = ""


class ProjectError(PymwError):
    """``project_home`` is not a usable BOINC project (nothing was written)."""


# --- options ------------------------------------------------------------------------------------
def _positive(n: Any) -> bool:
    return n is None or n >= 1


def _nonnegative(n: Any) -> bool:
    return n is None or n >= 0


def _app_name(value: Any) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,60}", text):
        raise ValueError(f"an app name is letters, digits, '_', '.', '-' (BOINC's names), not {value!r}")
    return text


def _python(value: Any) -> str:
    text = str(value).strip()
    if not text or any(c in text for c in "\n\r<>&\"'`$;|") or " " in text:
        raise ValueError(f"python is one interpreter name or path without spaces or shell characters, not {value!r}")
    return text


def _give_up(value: Any) -> Any:
    """give_up_after from text or a value: "auto", None ("none", "never",
    "inf"), or seconds."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "auto":
            return "auto"
        if low in ("none", "never", "inf", "infinity", ""):
            return None
        return float(low)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        try:
            return float(value)
        except OverflowError:  # (more seconds than a float holds: never, as inf)
            return math.inf
    return value


def _give_up_ok(value: Any) -> bool:
    if value is None or value == "auto":
        return True
    # (value == value: not NaN, and no float() of a huge int)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value == value


def _printable(text: str) -> str:
    """What a volunteer or the project's group wrote, shown as text: every
    character but newlines and printable ones escaped (no terminal control
    sequence, no right-to-left override reaches a log or an error)."""
    return "".join(c if c == "\n" or c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class _Watcher:
    """A watchdog observer on ``pymw_results/`` and on the directories of
    the batches followed: a change there marks its batch (``None``: the top
    directory, a new batch's directory may have appeared) and sets
    :attr:`changed`.  ``available`` is False without watchdog or inotify."""

    def __init__(self, top: Path):
        self.top = top
        self.changed = threading.Event()
        self._dirty: set[int | None] = set()
        self._lock = threading.Lock()
        self._observer: Any = None
        self._watches: dict[Any, Any] = {}     # batch (None: top) -> ObservedWatch
        self.available = True
        self._closed = False

    def dispatch(self, event: Any) -> None:
        """Called by the observer's thread for each inotify event."""
        for path in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
            if not path:
                continue
            parent = Path(os.fsdecode(path)).parent
            batch: int | None = None
            if parent != self.top and parent.parent == self.top and parent.name.isdigit():
                batch = int(parent.name)
            with self._lock:
                self._dirty.add(batch)
        self.changed.set()

    def take(self) -> set[int | None]:
        """The marks since the last call (and :attr:`changed` cleared)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            self.changed.clear()
        return dirty

    def follow(self, batches: set[int]) -> bool:
        """Watch the top directory and these batches' directories (those that
        exist), and no other; False when nothing can be watched."""
        if not self.available or self._closed:
            return False
        try:
            if self._observer is None:
                try:
                    from watchdog.observers import Observer
                except ImportError:
                    self.available = False
                    _log.info("pymw-magic: boinc: watchdog is not installed (pip install 'pymw-magic[boinc]'): "
                              "results are looked for every second instead")
                    return False
                self._observer = Observer()
                self._observer.daemon = True
                self._observer.start()
            wanted: dict[Any, Path] = {None: self.top}
            wanted.update({b: self.top / str(b) for b in batches})
            for key in [k for k in self._watches if k not in wanted]:
                self._observer.unschedule(self._watches.pop(key))
            for key, path in wanted.items():
                if key not in self._watches and path.is_dir():
                    self._watches[key] = self._observer.schedule(self, str(path), recursive=False)
                    with self._lock:
                        # (what was written before the watch began is read now)
                        self._dirty.add(key)
                    self.changed.set()
            return None in self._watches
        except OSError as exc:  # (inotify's limits: max_user_watches, max_user_instances)
            _log.warning("pymw-magic: boinc: cannot watch %s (%s): results are looked for every second instead",
                         self.top, exc)
            self.stop()
            self.available = False
            return False

    def drop(self, batch: int) -> None:
        """The batch is followed no more: its directory's watch goes now (the
        next :meth:`follow` may never come while no job runs)."""
        watch = self._watches.pop(batch, None)
        if watch is not None and self._observer is not None:
            try:
                self._observer.unschedule(watch)
            except (KeyError, OSError):
                pass

    def stop(self) -> None:
        """Stop watching for good (a late :meth:`follow` starts nothing)."""
        self._closed = True
        observer, self._observer = self._observer, None
        self._watches = {}
        if observer is not None:
            try:
                observer.unschedule_all()
                observer.stop()
                if observer is not threading.current_thread():
                    observer.join(timeout=30)
            except Exception as exc:
                _log.warning("pymw-magic: boinc: stopping the results watcher failed: %s", exc)


class BoincBackend(BatchBackend):
    """``Master("boinc", project_home=..., ...)``: see :attr:`options`."""

    name = "boinc"
    #: a volunteer asks for work every few minutes at best
    scheduling_delay: ClassVar[float] = 60.0
    safety_interval: ClassVar[float] = 3600.0
    #: seconds between two reads of a job's files without a watcher's wake-up
    #: (inotify misses writes from another host of a shared file system)
    safety_reread: ClassVar[float] = 5.0
    #: seconds between two reads when nothing can be watched
    fallback_reread: ClassVar[float] = 1.0
    options = {
        "project_home": Option("project_home", str, None, "the BOINC project's directory (with config.xml, bin/)",
                               requirement="a directory path (a string)"),
        "app": Option("app", _app_name, "pymw", "the BOINC app the work units are for",
                      requirement="a BOINC app name"),
        "target_nresults": Option("target_nresults", int, 1, "results asked for per work unit", check=_positive,
                                  requirement="a whole number >= 1"),
        "min_quorum": Option("min_quorum", int, 1, "results that must agree (>= 2: replicas are compared)",
                             check=_positive, requirement="a whole number >= 1"),
        "max_error_results": Option("max_error_results", int, 3, "client errors before a work unit fails",
                                    check=_positive, requirement="a whole number >= 1"),
        "max_nbytes": Option("max_nbytes", int, 64 << 20, "the largest output file a client uploads (bytes, "
                             "BOINC's own limit; the master also reads none over max_output_mb)", check=_positive,
                             requirement="a whole number >= 1"),
        "delay_bound": Option("delay_bound", float, 86400.0, "seconds a host has to return a result before "
                              "it is sent elsewhere", check=lambda v: v is None or 1 <= v <= MAX_DELAY_BOUND,
                              requirement=f"a number of seconds from 1 to {MAX_DELAY_BOUND}"),
        "rsc_fpops_est": Option("rsc_fpops_est", float, None, "estimated floating-point operations per work "
                                "unit (default: from measured task durations, else BOINC's 3600e9)",
                                check=lambda v: v is None or 0 < v < math.inf, requirement="a positive number"),
        "python": Option("python", _python, "python3", "the interpreter volunteers run (same minor version); "
                         "a name on their PATH, or a file of custom_app_dir", requirement="an interpreter name"),
        "custom_app_dir": Option("custom_app_dir", str, None, "a directory with linux/ (PyMW's layout): its "
                                 "files ship in the app version (e.g. a bundled interpreter)",
                                 requirement="a directory path (a string)"),
        "trusted_results": Option("trusted_results", bool, False, "results come back pickled: only for hosts "
                                  "you control (unpickling runs whatever they send)"),
        "signing_key": Option("signing_key", str, None, "the Ed25519 private key file (default: the user's, "
                              "made on first use)", requirement="a file path (a string)"),
        "chunksize": Option("chunksize", int, None, "tasks per work unit (default: automatic)", check=_positive,
                            requirement="a whole number >= 1"),
        "give_up_after": Option("give_up_after", _give_up, "auto", "seconds a work unit may stay open (from its "
                                "creation, or its job's last result if later) before it is cancelled and its tasks "
                                "fail: BOINC never ends one whose quorum needs more volunteers than there are. "
                                "'auto': (max_error_results + 2) x delay_bound; None: wait as BOINC does",
                                check=_give_up_ok, requirement="a number of seconds > 0, 'auto' or None"),
        **BATCH_OPTIONS,
    }

    def __init__(self, scheduler: Any, workers: int, key: bytes, *, project_home: str | None = None,
                 app: str = "pymw", target_nresults: int = 1, min_quorum: int = 1, max_error_results: int = 3,
                 max_nbytes: int = 64 << 20, delay_bound: float = 86400.0, rsc_fpops_est: float | None = None,
                 python: str = "python3", custom_app_dir: str | None = None, trusted_results: bool = False,
                 signing_key: str | None = None, chunksize: int | None = None, give_up_after: Any = "auto",
                 max_output_mb: float = MAX_OUTPUT_MB):
        if not project_home:
            raise ProjectError("the boinc backend needs project_home=<the BOINC project's directory> (where "
                               "config.xml and bin/create_work are); pymw_magic.testing.boinc.StandInProject(root) "
                               "makes a stand-in project to try it")
        if min_quorum > target_nresults:
            raise ValueError(f"min_quorum ({min_quorum}) cannot exceed target_nresults ({target_nresults}): "
                             "BOINC would never have enough results to reach the quorum")
        self.project = Project(project_home)  # (checked before anything is written)
        super().__init__(scheduler, workers, key, chunksize=chunksize, trusted_results=trusted_results,
                         max_output_mb=max_output_mb)
        from ..ed25519 import load_or_create
        self.signer = load_or_create(signing_key)
        self.app = app
        self.python = python or "python3"
        self.custom_app_dir = custom_app_dir
        if custom_app_dir is not None and not (Path(custom_app_dir) / "linux").is_dir():
            raise ValueError(f"custom_app_dir {custom_app_dir!r} has no linux/ directory (PyMW's layout: "
                             "linux/, windows/, apple/; this backend ships linux/)")
        self.settings = {"target_nresults": int(target_nresults), "min_quorum": int(min_quorum),
                         "max_error_results": int(max_error_results), "max_nbytes": int(max_nbytes),
                         "delay_bound": float(delay_bound), "rsc_fpops_est": rsc_fpops_est}
        give_up_after = _give_up(give_up_after)
        if give_up_after == "auto":
            # every deadline a host may miss (each error reissues), and two more
            self.give_up_after: float | None = (int(max_error_results) + 2) * float(delay_bound)
        elif give_up_after is None or math.isinf(float(give_up_after)):
            self.give_up_after = None
        else:
            self.give_up_after = float(give_up_after)
        self.backend_options = dict(self.settings, project_home=str(self.project.path), app=app, python=self.python,
                                    custom_app_dir=custom_app_dir, trusted_results=self.trusted_results,
                                    signing_key=signing_key, chunksize=chunksize, max_output_mb=self.max_output_mb,
                                    give_up_after=None if give_up_after is None else
                                    (give_up_after if give_up_after == "auto" else self.give_up_after))
        self._watcher = _Watcher(self.project.path / boinc_app.RESULTS_DIR)
        #: job directory -> (batch, its work units still open) of jobs removed while followed
        self._removed: dict[str, tuple[int, set[str]]] = {}
        #: job directory -> batch, of every job followed here (one removed as the follower
        #: lets it go is no longer among the followed jobs, and not yet closed)
        self._batch_of: dict[str, int] = {}
        self.changes = self.project.setup(app, self.app_files(), replicas=int(min_quorum) >= 2)
        self.app_version: int = self.project.installed_version(app, self.app_files())

    # --- the app version ---------------------------------------------------------------------------
    def app_files(self) -> list[tuple[str, str, bytes, bool]]:
        """(physical name, logical name, bytes, main program) of our app version's files."""
        from ..oneshot import key_file_bytes
        from ..runtime import runtime_zipapp
        launcher = boinc_app.LAUNCHER.encode()
        runtime = runtime_zipapp().read_bytes()
        key = key_file_bytes("ed25519", self.signer.public_bytes)
        files = [(f"pymw-launcher-{boinc_app.digest(launcher)}", "launcher", launcher, True),
                 (f"pymw-runtime-{boinc_app.digest(runtime)}.pyz", "pymw-runtime.pyz", runtime, False),
                 (f"pymw-key-{boinc_app.digest(key)}", "key", key, False)]
        if self.custom_app_dir:
            root = Path(self.custom_app_dir) / "linux"
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                data = path.read_bytes()
                logical = path.relative_to(root).as_posix()
                if "/" in logical:
                    raise ValueError(f"custom_app_dir: {path} is in a subdirectory; BOINC app versions have no "
                                     "subdirectories (PyMW's workaround: zip them, and unzip in the task)")
                stem, dot, ext = logical.partition(".")
                files.append((f"{stem}-{boinc_app.digest(data)}{dot}{ext}", logical, data, False))
        return files

    # --- the job directory ---------------------------------------------------------------------------
    def create_jobdir(self, root: Path, name: str) -> JobDir:
        return JobDir.create(root, name, scheme="ed25519", codec=self.codec, signer=self.signer,
                             trusted_results=self.trusted_results)

    def open_jobdir(self, path: Path | str) -> JobDir:
        try:
            return JobDir.open(path, signer=self.signer)
        except ValueError as exc:
            if "not the key" not in str(exc):
                raise
            # (another key signed it: results can be read, chunks not re-signed)
            return JobDir.open(path)

    def prepare(self, state: JobState) -> None:
        engine = state.engine
        if "batch" not in engine:
            # BOINC's batch is an int create_work stores: ours names the job's templates,
            # work units and results directory, so one another job used is skipped
            batch = int(state.dir.job_id[:8], 16) & MAX_BATCH or 1
            while self.project.batch_used(batch):
                batch = batch % MAX_BATCH + 1
            engine["batch"] = batch
            engine["project"] = str(self.project.path)
            engine["app"] = self.app
            engine["offset"] = 0
        self._batch_of[str(state.dir.path)] = int(engine["batch"])

    # --- submitting ----------------------------------------------------------------------------------
    def _job_files(self, state: JobState) -> None:
        """The job's templates and its function file, once."""
        engine = state.engine
        if engine.get("wu_template"):
            return
        # (BOINC keeps a result template's name in 64 bytes: the batch names the job's templates)
        base = f"pymw_{engine['batch']}"
        fpops = self.settings["rsc_fpops_est"]
        mean = state.job.fn.mean
        if fpops is None:
            fpops = DEFAULT_FPOPS if mean is None else max(1e9, mean * HOST_FLOPS * 10)
        s = self.settings
        quorum, target = s["min_quorum"], max(s["target_nresults"], s["min_quorum"])
        max_success = target + (2 if quorum >= 2 else 0)
        wu = ("<input_template>\n"
              # (the function file is shared by the job's work units: file_deleter must keep it)
              "    <file_info>\n        <no_delete/>\n    </file_info>\n"
              "    <file_info>\n    </file_info>\n"
              "    <workunit>\n"
              "        <file_ref>\n            <open_name>function.bin</open_name>\n            <copy_file/>\n"
              "        </file_ref>\n"
              "        <file_ref>\n            <open_name>in</open_name>\n            <copy_file/>\n"
              "        </file_ref>\n"
              f"        <command_line>{escape(self.python)}</command_line>\n"
              f"        <target_nresults>{target}</target_nresults>\n"
              f"        <min_quorum>{quorum}</min_quorum>\n"
              f"        <max_error_results>{s['max_error_results']}</max_error_results>\n"
              f"        <max_success_results>{max_success}</max_success_results>\n"
              f"        <max_total_results>{max_success + s['max_error_results']}</max_total_results>\n"
              f"        <delay_bound>{int(math.ceil(s['delay_bound']))}</delay_bound>\n"
              f"        <rsc_fpops_est>{fpops:.6g}</rsc_fpops_est>\n"
              f"        <rsc_fpops_bound>{fpops * 1000:.6g}</rsc_fpops_bound>\n"
              "    </workunit>\n"
              "</input_template>\n")
        out = ("<output_template>\n"
               "    <file_info>\n"
               "        <name><OUTFILE_0/></name>\n"
               "        <generated_locally/>\n"
               "        <upload_when_present/>\n"
               f"        <max_nbytes>{s['max_nbytes']}</max_nbytes>\n"
               "        <url><UPLOAD_URL/></url>\n"
               "    </file_info>\n"
               "    <result>\n"
               "        <file_ref>\n"
               "            <file_name><OUTFILE_0/></file_name>\n"
               "            <open_name>out</open_name>\n"
               "            <copy_file/>\n"
               "        </file_ref>\n"
               "    </result>\n"
               "</output_template>\n")
        self.project.write_file(f"templates/{base}_in", wu.encode())
        self.project.write_file(f"templates/{base}_out", out.encode())
        fn = (state.dir.path / "function.bin").read_bytes()
        engine["function"] = f"{base}_fn_{boinc_app.digest(fn)}.bin"
        engine["wu_template"] = f"templates/{base}_in"
        engine["result_template"] = f"templates/{base}_out"
        engine["app_version"] = self.app_version

    def submit(self, state: JobState, chunks: list[Chunk]) -> list[Any]:
        self._job_files(state)
        engine = state.engine
        base = f"pymw_{engine['batch']}"
        files: dict[str, Path] = {engine["function"]: state.dir.path / "function.bin"}
        lines, names = [], []
        for c in chunks:
            data_path = state.dir.path / "in" / f"{c.index}.in"
            phys = f"{base}_{c.index}_{boinc_app.digest(data_path.read_bytes())}.in"
            files[phys] = data_path
            wu = f"{base}_{c.index}_{c.attempt}"
            names.append(wu)
            lines.append(f"--wu_name {wu} {engine['function']} {phys}\n")
        self.project.stage(files)
        self.project.tool(["create_work", "--appname", self.app, "--batch", str(engine["batch"]),
                           "--wu_template", engine["wu_template"], "--result_template", engine["result_template"],
                           "--app_version_num", str(engine.get("app_version") or self.app_version), "--stdin"],
                          stdin="".join(lines))
        now = int(time.time())
        created = state.engine.setdefault("created", {})
        for wu in names:
            created[wu] = now
        return names

    def remove(self, state: JobState, procs: list[Any], reason: str) -> None:
        over = state.engine.setdefault("over", set())
        # (a work unit BOINC ended, or that we cancelled already, needs no cancelling)
        done = over | state.engine.get("cancelled", set())
        wanted = [str(wu) for wu in procs if wu not in done]
        if not wanted:
            return
        failed = self.project.cancel_many(int(state.engine["batch"]), wanted)
        cancelled = state.engine.setdefault("cancelled", set())
        cancelled.update(w for w in wanted if w not in failed)
        if failed:
            state.engine["cancel_failed"] = True

    # --- following -----------------------------------------------------------------------------------
    def _events_path(self, state: JobState) -> Path:
        return self.project.results_dir(state.engine["batch"]) / "events"

    def poll_events(self, states: list[JobState], timeout: float) -> list[tuple[JobState, BatchEvent]]:
        """What our assimilator (events) and validator (notes) wrote since
        the last call: a job's files are read when the watcher saw its
        directory change, when it was never read by this process, or every
        :attr:`safety_reread` seconds; else this blocks on the watcher."""
        deadline = time.monotonic() + max(0.0, timeout)
        if not states:
            return []
        watching = self._watcher.follow({int(s.engine["batch"]) for s in states})
        interval = self.safety_reread if watching else self.fallback_reread
        while True:
            dirty = self._watcher.take()
            now = time.monotonic()
            out: list[tuple[JobState, BatchEvent]] = []
            for state in states:
                batch = int(state.engine["batch"])
                if batch in dirty or None in dirty or now - state.engine.get("read_at", -math.inf) >= interval:
                    state.engine["read_at"] = now
                    self._read_notes(state)
                    out += [(state, e) for e in self._read_events(state)]
            out += self._give_ups(states)
            if None in dirty:
                # (a batch directory may have appeared: watched from now on)
                watching = self._watcher.follow({int(s.engine["batch"]) for s in states})
            if out or self._stopping:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            due = min(state.engine.get("read_at", -math.inf) for state in states) + interval - time.monotonic()
            self._watcher.changed.wait(max(0.0, min(left, due)))

    def _give_ups(self, states: list[JobState]) -> list[tuple[JobState, BatchEvent]]:
        """Work units open longer than give_up_after (from their creation, or
        their job's last result if later): a "held" event each, once."""
        limit = self.give_up_after
        if limit is None:
            return []
        out = []
        now = time.time()
        for state in states:
            created = state.engine.get("created") or {}
            progress = float(state.engine.get("progress") or 0)
            given = state.engine.setdefault("given_up", set())
            with self._lock:
                chunks = [c for c in state.chunks.values() if c.state in ("queued", "running") and c.proc]
            for chunk in chunks:
                wu = str(chunk.proc)
                # (a work unit whose line was just read is not in it; a handle
                # written by an older version has no "created" at all)
                born = created.get(wu) if "created" in state.engine else chunk.submitted
                if born is None or wu in given or now - max(float(born), progress) < limit:
                    continue
                given.add(wu)
                out.append((state, BatchEvent("held", wu, reason="give_up_after", code=None, notes=json.dumps(
                    {"give_up": True, "disagree": (state.engine.get("disagree") or {}).get(wu, ""),
                     "open": now - float(born)}))))
        return out

    def _read_notes(self, state: JobState) -> None:
        """Our validator's lines: replicas that disagree are warned about at
        once (BOINC issues another replica, which may never find a host)."""
        path = self.project.results_dir(state.engine["batch"]) / "notes"
        offset = int(state.engine.get("notes_offset") or 0)
        try:
            with self.project.open_result(path) as f:
                if os.fstat(f.fileno()).st_size < offset:  # (a new file: its directory was made again)
                    offset = 0
                f.seek(offset)
                data = f.read(4 << 20)
        except (OSError, BatchError):
            return  # (notes only add words to a warning and an error: never fatal)
        end = data.rfind(b"\n")
        if end < 0:
            return
        state.engine["notes_offset"] = offset + end + 1
        disagree = state.engine.setdefault("disagree", {})
        seen = state.engine.setdefault("disagree_results", {})
        for line in data[:end].split(b"\n"):
            try:
                rec = json.loads(line)
                wu, values, results = rec["wu"], rec["values"], rec.get("results") or []
                if not isinstance(wu, str) or not isinstance(values, str) or not isinstance(results, list):
                    raise TypeError("not a line of pymw_validate")
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
            if wu not in (state.engine.get("created") or {}):
                continue  # (not an open work unit of this job)
            values = _printable(values[:2000])
            names = seen.setdefault(wu, [])
            new = [str(r)[:200] for r in results if str(r)[:200] not in names]
            names += new
            if not new:
                continue  # (the same replicas compared again, or the other way round)
            disagree[wu] = values
            quorum = self.settings["min_quorum"]
            _log.warning(
                "pymw-magic: boinc: job %r: the replicas of work unit %s disagree:\n%s\nBOINC issues another "
                "replica, which only a volunteer without a result of this work unit may take: with fewer than "
                "%d distinct volunteers (hosts of different users) it is never sent, and the work unit ends only "
                "at give_up_after (%s)", state.job.name, wu, values, max(quorum, len(names)) + 1,
                "never" if self.give_up_after is None else f"{self.give_up_after:g} s")

    def _read_events(self, state: JobState) -> list[BatchEvent]:
        path = self._events_path(state)
        offset = int(state.engine.get("offset") or 0)
        try:
            with self.project.open_result(path) as f:
                st = os.fstat(f.fileno())
                ident = [st.st_dev, st.st_ino]
                if state.engine.get("events_id", ident) != ident or st.st_size < offset:
                    # (the results directory was deleted and made again: a new file, read from its start)
                    _log.warning("pymw-magic: boinc: job %r: %s is a new file: read from its start",
                                 state.job.name, path)
                    offset = state.engine["offset"] = 0
                state.engine["events_id"] = ident
                f.seek(offset)
                data = f.read(16 << 20)
        except FileNotFoundError:
            return []
        except (OSError, BatchError) as exc:
            raise BatchError.about(state, f"the BOINC events file {path} of job {state.job.name!r} cannot be "
                                          f"read: {exc}") from None
        end = data.rfind(b"\n")
        if end < 0:
            return []
        state.engine["offset"] = offset + end + 1
        state.engine["progress"] = time.time()
        events = []
        for line in data[:end].split(b"\n"):
            # (anyone who can write pymw_results/ can append a line: one that is
            # not our assimilator's shape is skipped, it never fails the jobs)
            try:
                rec = json.loads(line)
                wu = rec["wu"]
                if not isinstance(wu, str) or not isinstance(rec.get("error_mask", 0), (int, type(None))):
                    raise TypeError("not an event line of pymw_assimilate")
                event = self.translate(rec, wu)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                _log.warning("pymw-magic: boinc: a malformed line in %s was skipped", path)
                continue
            if event.kind != "finished":
                state.engine.setdefault("over", set()).add(wu)
            (state.engine.get("created") or {}).pop(wu, None)
            (state.engine.get("disagree") or {}).pop(wu, None)
            (state.engine.get("disagree_results") or {}).pop(wu, None)
            events.append(event)
        return events

    def translate(self, rec: dict[str, Any], wu: str) -> BatchEvent:
        """One line of our assimilator as a :class:`BatchEvent`."""
        if rec.get("ok"):
            return BatchEvent("finished", wu)
        mask = int(rec.get("error_mask") or 0)
        if mask & 16:
            return BatchEvent("aborted", wu, reason="cancelled (bin/cancel_jobs)")
        return BatchEvent("held", wu, reason=str(rec.get("reason") or "failed"), code=mask,
                          notes=json.dumps({"stderr": str(rec.get("stderr") or "")[-8192:],
                                            "disagree": str(rec.get("disagree") or "")[:8192]}))

    def held_error(self, chunk: Chunk, event: BatchEvent) -> BaseException:
        try:
            extra = json.loads(event.notes or "{}")
        except ValueError:
            extra = {}
        # (both are what volunteers sent: shown escaped, as text)
        stderr, disagree = _printable(str(extra.get("stderr") or "")), _printable(str(extra.get("disagree") or ""))
        s = self.settings
        if extra.get("give_up"):
            secs = float(extra.get("open") or 0)
            took = f"{secs:.0f} s" if secs < 3600 else f"{secs / 3600:.1f} h"
            text = (f"{chunk.name()} (work unit {chunk.proc}) gave up: still open {took} after it was created "
                    f"(give_up_after={self.give_up_after:g} s, counted from its creation or the job's last result), "
                    "cancelled (bin/cancel_jobs). BOINC keeps a result it cannot send for ever: with "
                    f"min_quorum={s['min_quorum']} and one result per volunteer per work unit, a replica after "
                    "disagreeing or failed ones needs a volunteer that has not had one of this work unit. "
                    "Attach more volunteers (hosts of different users), lower min_quorum, or raise give_up_after "
                    "(None waits as BOINC does)")
            if disagree:
                text += f"; the results disagreed:\n{disagree}"
            exc = BoincError(text)
            exc.error_mask, exc.disagree = 0, disagree
            return exc
        text = (f"{chunk.name()} (work unit {chunk.proc}) failed on BOINC: {event.reason} "
                f"(error_mask {event.code}; target_nresults={s['target_nresults']}, min_quorum={s['min_quorum']}, "
                f"max_error_results={s['max_error_results']})")
        if "file size too big" in stderr or "exceeds size limit" in stderr or "-131" in stderr:
            text += f"; an output was over max_nbytes={s['max_nbytes']} bytes (the client refused to upload it)"
        if disagree:
            text += f"; the results disagreed:\n{disagree}"
        if stderr:
            text += f"\nthe app's stderr:\n{stderr}"
        exc = BoincError(text)
        exc.error_mask, exc.stderr, exc.disagree = int(event.code or 0), stderr, disagree
        return exc

    def fetch_output(self, chunk: Chunk) -> None:
        src = self.project.results_dir(chunk.job.engine["batch"]) / f"{chunk.proc}.out"
        dst = chunk.job.dir.output_path(chunk.index)
        # (BOINC's upload limit, and the master's read cap: a file over either is never copied)
        limit = min(self.settings["max_nbytes"], self.max_output_bytes)
        try:
            f = self.project.open_result(src)
        except FileNotFoundError:
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            if size > self.max_output_bytes:
                raise OutputTooLarge(src, size, self.max_output_bytes)
            if size > limit:
                raise BatchError(f"{chunk.name()}: its output is {size} bytes, over max_nbytes={limit}")
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
            copied = 0
            with open(tmp, "wb") as out:
                # (never more than max_nbytes, whatever the file grows to meanwhile)
                while copied <= limit:
                    block = f.read(min(1 << 20, limit + 1 - copied))
                    if not block:
                        break
                    out.write(block)
                    copied += len(block)
            if copied > limit:
                tmp.unlink()
                if limit == self.max_output_bytes:
                    raise OutputTooLarge(src, copied, limit, f"it grew past {limit} bytes while it was copied "
                                         f"(the cap)")
                raise BatchError(f"{chunk.name()}: its output grew over max_nbytes={limit} while it was read")
        os.replace(tmp, dst)
        try:  # (kept in the job directory now: the project keeps only the events line)
            src.unlink()
        except OSError:
            pass

    def check_adopted(self, state: JobState) -> None:
        """A stored job is followed on the project that ran it: another
        project never writes its events (the job would wait for ever)."""
        recorded = state.engine.get("project")
        if recorded and Path(recorded).resolve() != self.project.path:
            raise PymwError(f"job {state.job.name!r} ran on the BOINC project {recorded}, not {self.project.path}: "
                            f"attach({state.job.name!r}) follows it there (or attach(..., project_home="
                            f"{recorded!r}))")

    def engine_handle(self, state: JobState) -> dict[str, Any]:
        keep = ("batch", "project", "app", "offset", "function", "wu_template", "result_template", "app_version",
                "notes_offset", "progress", "events_id")
        out = {k: state.engine[k] for k in keep if k in state.engine}
        # (only the open work units: the give_up_after clock goes on after attach)
        out["created"] = dict(state.engine.get("created") or {})
        out["disagree"] = dict(state.engine.get("disagree") or {})
        return out

    # --- letting go ----------------------------------------------------------------------------------
    def closed_job(self, state: JobState) -> None:
        """A job is let go (it finished, or it is being removed): its batch is
        watched no more, and its templates and function file leave the
        project once no work unit of it can need them again."""
        if state.engine.get("batch"):
            self._watcher.drop(int(state.engine["batch"]))
            # (a finished job removed later: its results directory is emptied then;
            # forgotten with the job, so a long-lived master keeps no entry per job)
            key = str(state.dir.path)
            if key not in self._removed:
                self._removed[key] = (int(state.engine["batch"]), set())
                weakref.finalize(state.job, self._removed.pop, key, None)
        if not state.engine.get("wu_template"):
            return
        created = state.engine.get("created") or {}
        cancelled = state.engine.get("cancelled") or set()
        # The transitioner reads the result template whenever it makes a result
        # (a replica, a retry): a work unit still open keeps the job's files.
        if state.engine.get("cancel_failed") or any(wu not in cancelled for wu in created):
            _log.info("pymw-magic: boinc: job %r: %d work unit(s) still open: its templates stay in %s",
                      state.job.name, len([w for w in created if w not in cancelled]), self.project.path)
            return
        self.project.remove_job_files(state.engine)

    def forget(self, job: Any) -> None:
        with self._lock:
            state = self._jobs.get(job.id)
        directory = self.job_dir(job)
        super().forget(job)
        if state is not None and state.engine.get("batch"):
            # (wait_removed deletes its results directory once BOINC has assimilated them)
            self._removed[str(state.dir.path)] = (int(state.engine["batch"]), set(state.engine.get("created") or {}))
        elif directory is not None and str(directory) in self._batch_of:
            # (finished, being let go by the follower right now: nothing of it is open)
            self._removed.setdefault(str(directory), (self._batch_of[str(directory)], set()))

    def wait_removed(self, directory: Path, timeout: float) -> bool:
        """The removed job's cancelled work units have been assimilated (their
        lines are in its events file): its results directory goes."""
        self._batch_of.pop(str(directory), None)
        entry = self._removed.pop(str(directory), None)
        if entry is None:
            return True
        batch, open_wus = entry
        return self.project.remove_results(batch, open_wus, timeout)

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)
        self._watcher.stop()  # (a follower still in poll_events returns within a second, watching nothing)

    @classmethod
    def reconnect_options(cls, handle: dict[str, Any], given: Iterable[str] = ()) -> dict[str, Any]:
        engine = handle.get("engine") or {}
        if "project_home" in given or not engine.get("project"):
            return {}
        return {"project_home": engine["project"]}

    @classmethod
    def remove_stored(cls, handle: dict[str, Any], **options: Any) -> None:
        engine = handle.get("engine") or {}
        home = options.get("project_home") or engine.get("project")
        if not home:
            return
        project = Project(home)
        batch = engine.get("batch")
        names = [str(e["proc"]) for e in (handle.get("chunks") or {}).values() if e.get("proc")]
        names += [str(wu) for wu in (engine.get("created") or {}) if str(wu) not in names]
        if batch:
            failed = project.cancel_many(int(batch), names)
        else:  # (a handle of a job that never had a batch)
            failed = [n for n in names if not project.cancel(n)]
        if batch and not failed:
            project.remove_job_files(engine)
            project.remove_results(int(batch), set(engine.get("created") or {}) | set(names), REMOVE_PATIENCE)


# --- the project ----------------------------------------------------------------------------------
class Project:
    """A BOINC project directory, used only through its documented files
    and tools; tools run as the directory's owner."""

    def __init__(self, home: str | os.PathLike):
        path = Path(home).expanduser()
        if not path.is_dir():
            raise ProjectError(f"project_home {str(home)!r} is not a directory: give the BOINC project's "
                               "directory (made by BOINC's make_project)")
        self.path = path.resolve()
        config = self.path / "config.xml"
        missing = [p for p in ("config.xml", "bin/create_work", "bin/xadd", "bin/update_versions", "bin/start",
                               "bin/stop") if not (self.path / p).exists()]
        if missing:
            raise ProjectError(f"{self.path} is not a BOINC project: it has no {', '.join(missing)} (a project "
                               "made by BOINC's make_project has them); nothing was written")
        try:
            self.config = ET.parse(config).getroot()
        except ET.ParseError as exc:
            raise ProjectError(f"{config} is not valid XML ({exc}): fix the project's config.xml") from None
        if self.config.find("config") is None:
            raise ProjectError(f"{config} has no <config> section: not a BOINC project's config.xml")
        st = self.path.stat()
        self.uid, self.gid = st.st_uid, st.st_gid
        me = os.geteuid()
        self.as_user = me == 0 and self.uid != 0
        if me not in (0, self.uid):
            _log.info("pymw-magic: boinc: project %s belongs to uid %d, this process runs as uid %d: its tools "
                      "run as this user", self.path, self.uid, me)
        self._lock = threading.Lock()

    # -- running tools ----------------------------------------------------------------------------
    def tool(self, argv: list[str], stdin: str | None = None, check: bool = True,
             timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess:
        """``bin/<argv[0]> argv[1:]`` in the project directory, as its owner."""
        exe = self.path / "bin" / argv[0]
        kwargs: dict[str, Any] = {}
        if self.as_user:
            try:
                name = pwd.getpwuid(self.uid).pw_name
                groups = os.getgrouplist(name, self.gid)
            except KeyError:
                groups = [self.gid]
            kwargs.update(user=self.uid, group=self.gid, extra_groups=groups)
        try:
            proc = subprocess.run([str(exe)] + argv[1:], cwd=self.path, input=stdin, capture_output=True, text=True,
                                  timeout=timeout, **kwargs)
        except FileNotFoundError:
            raise ProjectError(f"{exe} is missing: the project {self.path} has no {argv[0]} tool") from None
        except subprocess.TimeoutExpired:
            raise ProjectError(f"{exe} did not finish in {timeout:.0f} s ({' '.join(argv)})") from None
        if check and proc.returncode != 0:
            said = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
            raise ProjectError(f"bin/{argv[0]} failed (exit status {proc.returncode}) in {self.path}: {said}")
        return proc

    def _own(self, path: Path) -> None:
        if self.as_user:
            os.chown(path, self.uid, self.gid)

    def write_file(self, rel: str, data: bytes, mode: int = 0o644) -> bool:
        """Write a file of the project (as its owner); False when it already held ``data``."""
        path = self.path / rel
        try:
            if path.read_bytes() == data:
                return False
        except OSError:
            pass
        self.mkdirs(path.parent)
        tmp = path.with_name(f".{path.name}.pymw-{os.getpid()}-{secrets.token_hex(3)}")
        tmp.write_bytes(data)
        os.chmod(tmp, mode)
        self._own(tmp)
        os.replace(tmp, path)
        return True

    def mkdirs(self, path: Path) -> None:
        """``path`` and its missing parents, owned by the project's owner
        (who must be able to replace what is in them later)."""
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o755)
            except FileExistsError:
                continue
            self._own(d)

    def stage(self, files: dict[str, Path]) -> None:
        """Put ``{physical name: source}`` into the download hierarchy:
        one ``stage_file_native --copy DIR`` for all of them (a same-named
        file with other contents is refused by BOINC: names carry a hash)."""
        tmp = self.path / f"tmp_pymw_{os.getpid()}_{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
        try:
            self._own(tmp)
            for phys, src in files.items():
                dst = tmp / phys
                if not self.as_user:
                    try:  # (no copy of the data: stage_file_native --copy makes the one BOINC keeps)
                        os.link(src, dst)
                        continue
                    except OSError:
                        pass
                shutil.copyfile(src, dst)
                os.chmod(dst, 0o644)
                self._own(dst)
            if (self.path / "bin" / "stage_file_native").exists():
                self.tool(["stage_file_native", "--copy", str(tmp)])
            else:  # (older projects) the path dir_hier_path prints
                for phys in files:
                    where = self.tool(["dir_hier_path", phys]).stdout.strip()
                    if not os.path.exists(where):
                        shutil.copyfile(tmp / phys, where)
                        self._own(Path(where))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def cancel(self, wu: str) -> bool:
        """``bin/cancel_jobs --name WU``; False when it failed (a work unit
        BOINC does not know is not a failure)."""
        proc = self.tool(["cancel_jobs", "--name", wu], check=False, timeout=120)
        if proc.returncode != 0 and "No workunit" not in proc.stderr:
            _log.warning("pymw-magic: boinc: cancelling work unit %s failed: %s", wu, proc.stderr.strip()[-500:])
            return False
        return True

    def open_workunits(self, batch: int) -> dict[str, int] | None:
        """{name: id} of the batch's work units not yet assimilated, from the
        project's database (``bin/pymw_wus``); None where it cannot be read."""
        if not (self.path / "bin" / "pymw_wus").exists():
            return None
        # A database busy for a moment (the project's daemons write to it)
        # is tried again, for about 3 s in all, before cancelling by name.
        for pause in WUS_RETRY_PAUSES:
            try:
                proc = self.tool(["pymw_wus", str(int(batch))], check=False, timeout=120)
            except ProjectError as exc:
                _log.info("pymw-magic: boinc: bin/pymw_wus: %s", exc)
                return None
            if proc.returncode == 0:
                break
            time.sleep(pause)
        if proc.returncode != 0:
            _log.info("pymw-magic: boinc: bin/pymw_wus cannot read the database (%s): cancelling by name",
                      proc.stderr.strip()[-300:])
            return None
        out = {}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit():
                out[parts[1]] = int(parts[0])
        return out

    def cancel_many(self, batch: int, names: Iterable[str]) -> list[str]:
        """Cancel these work units of ``batch`` with as few processes as
        BOINC's ``cancel_jobs`` allows: its forms are ``MIN_ID MAX_ID`` (every
        work unit in the range, whoever's) and ``--name WU`` (one).  So the
        ids are looked up, and each run of consecutive ids that are all ours
        and open is one ``cancel_jobs MIN MAX``; the rest by name.  Returns
        the names whose cancelling failed."""
        wanted = list(dict.fromkeys(str(n) for n in names))
        if not wanted:
            return []
        ids = self.open_workunits(batch) if len(wanted) > 1 else None
        failed: list[str] = []
        by_name = wanted
        if ids is not None:
            ours = sorted((ids[n], n) for n in wanted if n in ids)
            # (a name the database does not list as open was assimilated: nothing to cancel)
            by_name = []
            runs: list[list[tuple[int, str]]] = []
            for wu_id, name in ours:
                if runs and runs[-1][-1][0] + 1 == wu_id:
                    runs[-1].append((wu_id, name))
                else:
                    runs.append([(wu_id, name)])
            for run in runs:
                if len(run) == 1:
                    if not self.cancel(run[0][1]):
                        failed.append(run[0][1])
                    continue
                proc = self.tool(["cancel_jobs", str(run[0][0]), str(run[-1][0])], check=False, timeout=120)
                if proc.returncode != 0:
                    _log.warning("pymw-magic: boinc: cancel_jobs %d %d failed: %s", run[0][0], run[-1][0],
                                 (proc.stderr or proc.stdout).strip()[-500:])
                    failed += [n for _, n in run]
        for name in by_name:
            if not self.cancel(name):
                failed.append(name)
        return failed

    def remove_job_files(self, engine: dict[str, Any]) -> None:
        """A job's templates and its function file (and ``.md5``) leave the
        project: nothing of it needs them any more.  Only names this backend
        makes are touched (the handle is the user's file, not trusted)."""
        batch = engine.get("batch")
        paths = []
        for key, pattern in (("wu_template", r"templates/pymw_(\d+)_in"), ("result_template", r"templates/pymw_(\d+)_out")):
            m = re.fullmatch(pattern, str(engine.get(key) or ""))
            if m and int(m.group(1)) == batch:
                paths.append(self.path / m.group(0))
        fn = str(engine.get("function") or "")
        m = re.fullmatch(r"pymw_(\d+)_fn_[0-9a-f]+\.bin", fn)
        if m and int(m.group(1)) == batch:
            try:
                where = Path(self.tool(["dir_hier_path", fn], timeout=60).stdout.strip())
            except ProjectError as exc:
                _log.warning("pymw-magic: boinc: cannot find %s in the download hierarchy: %s", fn, exc)
            else:
                # (a fanout directory is writable by the project's group: one that is a
                # link is not deleted through; download/ itself may be one, the admin's)
                if where.name == fn and self.path in where.parents and not where.parent.is_symlink():
                    paths += [where, where.with_name(fn + ".md5")]
                elif where.parent.is_symlink():
                    _log.warning("pymw-magic: boinc: %s is a symbolic link: %s is left there", where.parent, fn)
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                _log.warning("pymw-magic: boinc: cannot delete %s: %s", path, exc)

    def remove_results(self, batch: int, open_wus: set[str], timeout: float) -> bool:
        """Empty ``pymw_results/<batch>/`` (and delete the validator's notes of
        the batch) once every work unit of ``open_wus`` has its line in the
        events file (BOINC assimilated it: nothing writes there again);
        False, leaving it, when that takes longer than ``timeout`` seconds.
        The empty directory stays: BOINC keeps work unit names for ever,
        and it marks the batch number (which names them) as used."""
        directory = self.results_dir(batch)
        deadline = time.monotonic() + timeout
        while open_wus:
            try:
                with self.open_result(directory / "events") as f:
                    seen = {json.loads(line).get("wu") for line in f.read(64 << 20).splitlines() if line.strip()}
            except (OSError, BatchError, ValueError, AttributeError):
                seen = set()
            if open_wus <= seen:
                break
            if time.monotonic() > deadline:
                _log.warning("pymw-magic: boinc: %d cancelled work unit(s) of batch %d not assimilated after %.0f s: "
                             "%s stays", len(open_wus - seen), batch, timeout, directory)
                return False
            time.sleep(0.5)
        _empty_dir(directory, lambda name: True)
        _empty_dir(self.path / boinc_app.RESULTS_DIR / "disagree", lambda name: name.startswith(f"pymw_{int(batch)}_"))
        return True

    def open_result(self, path: Path) -> Any:
        """``path`` under pymw_results/ opened for reading, only if it is a
        regular file our assimilator (the project's owner) wrote: the
        directory is writable by the project's group (the web server's), and
        a planted FIFO would block the reader for ever, a symbolic link
        would read any file this process can.  FileNotFoundError if absent."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if os.path.islink(path):
                raise BatchError(f"{path} is not a regular file (a symbolic link): not written by pymw_assimilate, "
                                 "refused; the project's pymw_results/ may be writable by others") from None
            raise
        st = os.fstat(fd)
        owners = {self.uid, os.geteuid()}
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in owners:
            os.close(fd)
            what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"owned by uid {st.st_uid}"
            raise BatchError(f"{path} is {what}: not written by pymw_assimilate (it runs as the project's owner, "
                             f"uid {self.uid}), refused; the project's pymw_results/ may be writable by others")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def batch_used(self, batch: int) -> bool:
        """A job of this project has (had) the batch number ``batch``."""
        return (self.path / "templates" / f"pymw_{batch}_in").exists() or self.results_dir(batch).exists()

    def results_dir(self, batch: int) -> Path:
        return self.path / boinc_app.RESULTS_DIR / str(int(batch))

    # -- setup -----------------------------------------------------------------------------------
    def daemons_wanted(self, app: str) -> list[str]:
        # The scripts are named alone: BOINC then passes its default arguments
        # (validator: the result's files; assimilator: wu_id and the files).
        # Named tokens ("files", "wu_name", ...) are never matched by server
        # 1.6.2 (its split() keeps the delimiter): the script got no argument.
        return list(BASE_DAEMONS) + [
            f"script_validator --app {app} --init_script pymw_validate --compare_script pymw_validate",
            f"script_assimilator --app {app} --script pymw_assimilate"]

    def setup(self, app: str, files: list[tuple[str, str, bytes, bool]], replicas: bool = False) -> list[str]:
        """Make the project ready for our app (idempotent, one process at
        a time); return what changed, in words.  ``replicas``: results are
        compared (min_quorum >= 2), so no volunteer may return two of a
        work unit's results."""
        with self._lock, open(self._lock_path(), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            changes: list[str] = []
            restart = self._setup_daemons(app, changes)
            if replicas:
                restart = self._setup_one_per_user(changes) or restart
            from ..runtime import runtime_zipapp
            scripts = {f"bin/{name}": boinc_app.script_bytes(name) for name in boinc_app.SCRIPTS}
            scripts["bin/pymw_runtime.pyz"] = runtime_zipapp().read_bytes()
            for rel, data in scripts.items():
                if self.write_file(rel, data, 0o755):
                    changes.append(f"installed {rel}")
            top = self.path / boinc_app.RESULTS_DIR
            if not top.exists() and os.geteuid() in (0, self.uid):
                # (made now, as the assimilator makes it: the master watches it from the first job on)
                top.mkdir(mode=0o750)
                self._own(top)
                changes.append(f"made {boinc_app.RESULTS_DIR}/ (where pymw_assimilate collects results)")
            self._setup_app(app, files, changes)
            if restart:
                self.tool(["stop"], check=False)
                self.tool(["start"])
                changes.append("restarted the daemons (bin/stop, bin/start)")
                self._check_running(app)
            for change in changes:
                _log.warning("pymw-magic: boinc: project %s: %s", self.path, change)
            return changes

    def _check_running(self, app: str, timeout: float = 30.0) -> None:
        """Our validator and assimilator run (their pid files name live
        processes): bin/status says "ENABLED" whatever runs."""
        host = socket.gethostname()
        deadline = time.monotonic() + timeout
        root = ET.parse(self.path / "config.xml").getroot()
        for cmd in self.daemons_wanted(app)[len(BASE_DAEMONS):]:
            name = cmd.split()[0]
            found = [d for d in root.iter("daemon")
                     if _same_daemon(cmd, " ".join((d.findtext("cmd") or "").split()))]
            if not found or not (found[0].findtext("pid_file") or "").strip():
                continue  # (an admin's own line: its pid file is the admin's business)
            tag = (found[0].findtext("output") or f"{name}_{app}.log").strip().rsplit(".log", 1)[0]
            pid_file = self.path / f"pid_{host}" / found[0].findtext("pid_file").strip()
            while True:
                try:
                    pid = int(pid_file.read_text().split()[0])
                    os.kill(pid, 0)
                    break
                except (OSError, ValueError, IndexError):
                    pass
                if time.monotonic() > deadline:
                    log = self.path / f"log_{host}" / f"{tag}.log"
                    try:
                        tail = log.read_text(errors="replace")[-1500:]
                    except OSError:
                        tail = "(no log)"
                    raise ProjectError(f"bin/start did not start '{name} --app {app}' (no live process in "
                                       f"{pid_file}): without it no result of pymw-magic's work units is "
                                       f"{'validated' if 'valid' in name else 'collected'}. Its log {log}: {tail}")
                time.sleep(0.2)

    def _setup_one_per_user(self, changes: list[str]) -> bool:
        """<one_result_per_user_per_wu/> in config.xml: by default BOINC may
        send a work unit's replicas to one volunteer, whose results then
        "agree" with each other."""
        text = (self.path / "config.xml").read_text()
        config = ET.fromstring(text).find("config")
        for name in ("one_result_per_user_per_wu", "one_result_per_host_per_wu"):
            node = config.find(name) if config is not None else None
            if node is not None and (node.text or "").strip() in ("", "1"):
                return False
        # (make_project writes <one_result_per_user_per_wu>0</...>: turned on in place)
        text, n = re.subn(r"<one_result_per_user_per_wu>\s*0\s*</one_result_per_user_per_wu>",
                          "<one_result_per_user_per_wu>1</one_result_per_user_per_wu>", text, count=1)
        if not n:
            text = re.sub(r"</config>", "    <one_result_per_user_per_wu/>\n  </config>", text, count=1)
        ET.fromstring(text)
        self.write_file("config.xml", text.encode(), (self.path / "config.xml").stat().st_mode & 0o777)
        changes.append("set <one_result_per_user_per_wu/> in config.xml (min_quorum >= 2: replicas must come "
                       "from different volunteers)")
        return True

    def _lock_path(self) -> Path:
        path = self.path / ".pymw_setup.lock"
        if not path.exists():
            path.touch(mode=0o644)
            self._own(path)
        return path

    def _setup_daemons(self, app: str, changes: list[str]) -> bool:
        text = (self.path / "config.xml").read_text()
        root = ET.fromstring(text)
        host = (root.findtext("config/host") or "").strip()
        if host and host != socket.gethostname():
            _log.warning("pymw-magic: boinc: config.xml's <host> is %r but this machine is %r: bin/start starts "
                         "no daemon on another host", host, socket.gethostname())
        blocks = [m.group(0) for m in re.finditer(r"[ \t]*<daemon>.*?</daemon>[ \t]*\n?", text, flags=re.S)]
        parsed = []
        for b in blocks:
            try:
                el = ET.fromstring(b.strip())
            except ET.ParseError:
                continue
            parsed.append((b, el, " ".join((el.findtext("cmd") or "").split())))
        missing = []
        upgraded = []
        for cmd in self.daemons_wanted(app):
            name = cmd.split()[0]
            if name in BASE_DAEMONS:
                if any(h.split()[:1] == [name] for _, _, h in parsed):
                    continue
                missing.append(cmd)
                continue
            ready, stale, foreign = False, [], []
            for b, el, h in parsed:
                if h.split()[:1] != [name] or _options_of(h).get("--app") != app:
                    continue
                if _same_daemon(cmd, h) and el.find("output") is not None:
                    ready = True  # (ours, whatever else the admin added: -d 3, ...)
                elif _same_daemon(cmd, h) or _ours_before(cmd, h):
                    stale.append((b, h))  # (an older pymw-magic's: named tokens, or no log/pid names of its own)
                else:
                    foreign.append(h)
            if ready:
                continue
            if foreign:
                raise ProjectError(f"config.xml already runs another {name} for app {app!r} ({foreign[0]!r} in "
                                   f"<daemons>): remove it, or use another app= for pymw-magic's work units")
            for b, h in stale:
                text = text.replace(b, "", 1)
                upgraded.append(h)
            missing.append(cmd)
        if not missing and not upgraded:
            return False

        def entry(cmd: str) -> str:
            # bin/start locks, logs and records a daemon by its program's name unless
            # <output>/<pid_file> say otherwise: a second script_validator (another
            # app's) would silently not start
            extra = ""
            if cmd.split()[0] not in BASE_DAEMONS:
                tag = f"{cmd.split()[0]}_{app}"
                extra = f"      <output>{escape(tag)}.log</output>\n      <pid_file>{escape(tag)}.pid</pid_file>\n"
            return f"    <daemon>\n      <cmd>{escape(cmd)}</cmd>\n{extra}    </daemon>\n"
        block = "".join(entry(cmd) for cmd in missing)
        if not block:
            pass
        elif "</daemons>" in text:
            text = text.replace("</daemons>", block + "  </daemons>", 1)
        elif re.search(r"<daemons\s*/>", text):
            text = re.sub(r"<daemons\s*/>", "<daemons>\n" + block + "  </daemons>", text, count=1)
        else:
            text = text.replace("</boinc>", "  <daemons>\n" + block + "  </daemons>\n</boinc>", 1)
        ET.fromstring(text)  # (never write a config.xml that does not parse)
        self.write_file("config.xml", text.encode(), (self.path / "config.xml").stat().st_mode & 0o777)
        changes += [f"replaced the daemon '{h}' (an older pymw-magic's) in config.xml" for h in upgraded]
        changes += [f"added the daemon '{cmd}' to config.xml" for cmd in missing]
        return True

    def _setup_app(self, app: str, files: list[tuple[str, str, bytes, bool]], changes: list[str]) -> None:
        project_xml = self.path / "project.xml"
        text = project_xml.read_text() if project_xml.exists() else "<boinc>\n</boinc>\n"
        root = ET.fromstring(text)
        if app not in [a.findtext("name") for a in root.iter("app")]:
            entry = (f"  <app>\n    <name>{escape(app)}</name>\n    <user_friendly_name>pymw-magic tasks "
                     f"({escape(app)})</user_friendly_name>\n  </app>\n")
            text = text.replace("</boinc>", entry + "</boinc>", 1)
            self.write_file("project.xml", text.encode())
            self.tool(["xadd"])
            changes.append(f"added the app {app!r} (project.xml, bin/xadd)")
        if not self.installed_version(app, files):
            self._install_version(app, files, changes)
        self._setup_min_version(app, changes)

    def _setup_min_version(self, app: str, changes: list[str]) -> None:
        """The app's <min_version> at most its oldest version: BOINC's feeder
        loads only an app's newest version unless it has one, and a work unit
        pinned to an older version (another user's key) would never be sent."""
        numbers = [n for n, _ in self._versions(app)]
        if len(numbers) < 2:
            return
        floor = min(numbers)
        path = self.path / "project.xml"
        text = path.read_text()
        for m in re.finditer(r"<app>.*?</app>", text, flags=re.S):
            try:
                el = ET.fromstring(m.group(0))
            except ET.ParseError:
                continue
            if (el.findtext("name") or "").strip() != app:
                continue
            have = (el.findtext("min_version") or "").strip()
            if have.isdigit() and 0 < int(have) <= floor:
                return
            block = m.group(0)
            if el.find("min_version") is not None:
                new = re.sub(r"<min_version>.*?</min_version>", f"<min_version>{floor}</min_version>", block, count=1)
            else:
                new = block.replace("</app>", f"  <min_version>{floor}</min_version>\n  </app>", 1)
            text = text[:m.start()] + new + text[m.end():]
            self.write_file("project.xml", text.encode())
            self.tool(["xadd"])
            self.write_file("reread_db", b"")  # (the feeder re-reads the app versions)
            changes.append(f"set the app {app!r}'s min_version to {floor} (project.xml, bin/xadd): the feeder then "
                           "sends every version, each user's key's included")
            return

    def _install_version(self, app: str, files: list[tuple[str, str, bytes, bool]], changes: list[str]) -> None:
        versions = [v for v in self._versions(app)]
        number = max([n for n, _ in versions], default=100) + 1
        vdir = f"apps/{app}/{number // 100}.{number % 100:02d}/{PLATFORM}"
        xml = ["<version>"]
        for phys, logical, data, main in files:
            self.write_file(f"{vdir}/{phys}", data, 0o644 if logical in ("key", "pymw-runtime.pyz") else 0o755)
            xml.append(f"  <file>\n    <physical_name>{escape(phys)}</physical_name>\n"
                       f"    <logical_name>{escape(logical)}</logical_name>\n    <copy_file/>\n"
                       + ("    <main_program/>\n" if main else "") + "  </file>")
        xml.append("</version>\n")
        self.write_file(f"{vdir}/version.xml", "\n".join(xml).encode())
        said = self.tool(["update_versions", "--noconfirm"])
        if "added successfully" not in said.stdout:
            # (update_versions is PHP: its die() exits with status 0)
            raise ProjectError(f"bin/update_versions did not add the app version {vdir}: "
                               f"{(said.stdout + said.stderr).strip()[-2000:]}")
        changes.append(f"installed app version {number // 100}.{number % 100:02d} of {app!r} for {PLATFORM} "
                       "(launcher, runtime, public key; bin/update_versions)")

    def _versions(self, app: str) -> list[tuple[int, Path]]:
        out = []
        for vdir in (self.path / "apps" / app).glob("*"):
            m = re.fullmatch(r"(\d+)(?:\.(\d+))?", vdir.name)
            if m and (vdir / PLATFORM).is_dir():
                out.append((int(m.group(1)) * 100 + int(m.group(2) or 0) if m.group(2) else int(m.group(1)),
                            vdir / PLATFORM))
        return sorted(out)

    def installed_version(self, app: str, files: list[tuple[str, str, bytes, bool]]) -> int:
        """The version number of an installed app version holding exactly
        ``files`` (0: none)."""
        want = {phys for phys, *_ in files}
        for number, pdir in reversed(self._versions(app)):
            try:
                root = ET.parse(pdir / "version.xml").getroot()
            except (OSError, ET.ParseError):
                continue
            have = {(f.findtext("physical_name") or "").strip() for f in root.iter("file")}
            if have == want and all((pdir / p).exists() for p in want):
                return number
        return 0


def _empty_dir(directory: Path, wanted: Any) -> None:
    """Delete the entries of ``directory`` whose names ``wanted`` accepts,
    never through a symbolic link: pymw_results/ may be writable by the
    project's group, and a results directory replaced by a link to another
    directory would have that one emptied."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if os.path.islink(directory):
            _log.warning("pymw-magic: boinc: %s is a symbolic link, not pymw_assimilate's directory: "
                         "left as it is (nothing it points to is deleted)", directory)
        elif not isinstance(exc, FileNotFoundError):
            _log.warning("pymw-magic: boinc: cannot empty %s: %s", directory, exc)
        return
    try:
        for name in os.listdir(fd):
            if not wanted(name):
                continue
            try:
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=fd, ignore_errors=True)  # (symlink-attack safe with dir_fd)
                else:
                    os.unlink(name, dir_fd=fd)
            except OSError:
                pass
    finally:
        os.close(fd)


def _options_of(cmd: str) -> dict[str, str]:
    import shlex
    try:
        words = shlex.split(cmd)
    except ValueError:
        return {}
    return {words[i]: words[i + 1] for i in range(1, len(words) - 1) if words[i].startswith("--")}


def _ours_before(want: str, have: str) -> bool:
    """``have`` is this daemon as an older pymw-magic wrote it: the same
    scripts, followed by named tokens."""
    a, b = _options_of(want), _options_of(have)
    return all(b.get(k, "").split()[:1] == v.split()[:1] for k, v in a.items())


def _replace_cmd(text: str, have: str, cmd: str) -> str:
    """config.xml's text with the <cmd> reading ``have`` (spaces aside) replaced by ``cmd``."""
    for m in re.finditer(r"<cmd>(.*?)</cmd>", text, flags=re.S):
        from xml.sax.saxutils import unescape
        if " ".join(unescape(m.group(1)).split()) == have:
            return text[:m.start(1)] + escape(cmd) + text[m.end(1):]
    return text


def _same_daemon(want: str, have: str) -> bool:
    """``have`` runs the daemon ``want`` describes: the same program, app
    and scripts (other options may differ)."""
    if want.split()[:1] != have.split()[:1]:
        return False
    a, b = _options_of(want), _options_of(have)
    return all(b.get(k, "").strip() == v for k, v in a.items())


__all__ = ["BoincBackend", "BoincError", "Project", "ProjectError", "PLATFORM"]
