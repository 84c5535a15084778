"""``StandInSchedd``: a faithful stand-in of an HTCondor schedd, without a pool.

Data flow::

    StandInSchedd(root).submit(htcondor2.Submit, itemdata=iter(...))
        -> validation as htcondor2.Schedd.submit does it (same exceptions)
        -> one JSON request on root's Unix socket (the daemon started on first use)
        <- htcondor2.SubmitResult / classad2.ClassAd / lists of them
    the daemon (_condor_daemon, a process of its own) runs every proc in a
    fresh sandbox and writes each job's event log in HTCondor's text format

It has the ``htcondor2.Schedd`` methods a backend calls — ``submit``,
``act``, ``query``, ``history``, ``edit``, ``spool``, ``retrieve`` — with the
same signatures and return types, so code written for a real schedd runs
unchanged against it.  The daemon is found again by any process through
``root``, so jobs outlive the process that submitted them, and a pickled
``StandInSchedd`` reconnects by its root.  ``inject_fault`` is what a test
adds: hold a proc, evict it once, make it exit non-zero.

Reproduced as HTCondor 25 does it: the submit language (macros expanded by
``htcondor2.Submit`` itself, both argument and environment syntaxes, file
lists, remaps, request units), a fresh sandbox per run with file transfer
both ways (ON_EXIT_OR_EVICT keeps an evicted run's files), the event log's
text (000 with LogNotes, 001 with SlotName, 040, 005 with usage and bytes,
004, 012, 013, 009, 021), the hold codes and reasons of a missing input
(13/2), a missing output (12/2), outputs over max_transfer_output_mb (33/0), a failed exec (6), allowed_execute_duration
(47), on_exit_hold (3), a user hold (1), submit on hold (15) and spooling
(16), removal of a running job (004 "Claim deactivated" 1009, then 009),
Vacate, Suspend/Continue, periodic_hold/release/remove, requirements matched
against a Linux slot, max_idle late materialization, history with
``since``/``match``, spool/retrieve, a queue that survives a restart.

Not reproduced: the negotiation cycle (jobs start at once), jobs running as
the pool's own user, container jobs (no slot offers a container runtime:
they stay idle), URL transfers, ``on_exit_remove`` (ignored), the
"Partitionable Resources" block of 004/005 events, JobStatus 6.  Differs: a
job gets the daemon's PATH; periodic expressions are evaluated every 5 s
(HTCondor: 60 s); a daemon killed with SIGKILL takes its jobs with it (they
are evicted and run again by the next daemon, where a real schedd would
reconnect to them); a spooled job's event log is written at its path, and
the job leaves the queue when retrieved.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Union

import classad2
import htcondor2
from htcondor2 import JobAction, Submit, SubmitResult

from . import _condor_submit as sub

__all__ = ["StandInSchedd"]

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
# The daemon needs only pymw_magic.testing: it gets an empty pymw_magic
# package instead of the real one, whose import (the master, asyncio, the
# backends) costs seconds on a loaded machine.  The marker in argv lets
# stop() recognise its own daemon.
# The launcher detaches first (before any import: under load importing
# htcondor2 takes long, and a kernel restart signals the submitter's whole
# process group), sends its output to the daemon's log, then runs the daemon
# without pymw_magic's __init__ (nothing of the package is needed there).
_LAUNCH = ("import os, sys\n"
           "if os.fork() > 0: os._exit(0)\n"
           "os.setsid()\n"
           "if os.fork() > 0: os._exit(0)\n"
           "fd = os.open(os.path.join(sys.argv[2], 'daemon.log'), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)\n"
           "os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)\n"
           "import types; pkg = types.ModuleType('pymw_magic'); pkg.__path__ = [sys.argv[1]]\n"
           "sys.modules['pymw_magic'] = pkg; import runpy; sys.argv = ['pymw_magic.testing._condor_daemon'] "
           "+ sys.argv[2:] + ['--detached']; runpy.run_module('pymw_magic.testing._condor_daemon', run_name='__main__')")
_START_TIMEOUT = 60.0     # the launcher forks at once
_ANSWER_TIMEOUT = 300.0   # the daemon's imports under heavy load


class _SpooledProcs:
    """What htcondor2's SubmitResult carries for a spooled submit (its
    ``spool`` refuses a result without it)."""

    def __init__(self, cluster: int):
        self.cluster = cluster


class StandInSchedd:
    """A schedd of one's own, rooted in the directory ``root``.

    ``slots``: how many procs run at once (default 2); ``idle_timeout``: the
    daemon exits after this many seconds with nothing in its queue and no
    request (default 600).  Both, when given, also update a daemon already
    running for ``root``.  Nothing starts until the first call.
    """

    def __init__(self, root: Union[str, os.PathLike], *, slots: int | None = None,
                 idle_timeout: float | None = None):
        self.root = Path(root).expanduser().resolve()
        if slots is not None and int(slots) < 1:
            raise ValueError(f"slots must be at least 1, not {slots!r}")
        if idle_timeout is not None and float(idle_timeout) <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout!r}")
        self._slots = None if slots is None else int(slots)
        self._idle_timeout = None if idle_timeout is None else float(idle_timeout)

    # -- what makes it "this schedd" ----------------------------------------------------------
    def __reduce__(self):
        return (StandInSchedd, (str(self.root),))

    def __repr__(self) -> str:
        return f"StandInSchedd({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StandInSchedd) and other.root == self.root

    def __hash__(self) -> int:
        return hash(("StandInSchedd", self.root))

    def __enter__(self) -> "StandInSchedd":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the htcondor2.Schedd API ------------------------------------------------------------
    def submit(self, description: Submit, count: int = 0, spool: bool = False,
               itemdata: Any = sub.DEFAULT_ITEMDATA, queue: str | None = None) -> SubmitResult:
        """Submit one cluster, as ``htcondor2.Schedd.submit``."""
        count, keys, rows = sub.normalize_items(description, count, itemdata, queue)
        items = {k: v for k, v in description.items()}
        reply = self._call({
            "op": "submit", "submit": items, "keys": keys, "rows": rows, "count": count,
            "spool": bool(spool), "cwd": os.getcwd(),
            # the submitter's environment travels only when the job asks for it (getenv)
            "env": dict(os.environ) if any(k.lower() == "getenv" for k in items) else {},
        })
        clusterad = classad2.ClassAd(reply["clusterad"])
        return SubmitResult(reply["cluster"], reply["first_proc"], reply["num_procs"], clusterad,
                            _SpooledProcs(reply["cluster"]) if spool else None)

    def act(self, action: JobAction, job_spec: Union[list[str], str, classad2.ExprTree, int],
            reason: str | None = None) -> classad2.ClassAd:
        """Hold, Release, Remove, RemoveX, Vacate, VacateFast, Suspend,
        Continue, as ``htcondor2.Schedd.act``; the same totals ad."""
        if not isinstance(action, JobAction):
            raise TypeError("action must be a JobAction")
        if isinstance(reason, tuple):
            reason = reason[0]
        constraint, ids = _job_spec(job_spec)
        totals = self._call({"op": "act", "action": int(action), "constraint": constraint, "ids": ids,
                             "reason": reason})
        ad = classad2.ClassAd()
        for k in ("TotalError", "TotalSuccess", "TotalNotFound", "TotalBadStatus", "TotalAlreadyDone",
                  "TotalPermissionDenied", "TotalJobAds", "TotalChangedAds"):
            ad[k] = int(totals[k])
        return ad

    def query(self, constraint: Union[str, classad2.ExprTree] = "True", projection: list[str] = [],
              callback: Any = None, limit: int = -1, opts: Any = None) -> list[classad2.ClassAd]:
        """Job ads of the queue, as ``htcondor2.Schedd.query``."""
        texts = self._call({"op": "query", "constraint": _constraint(constraint),
                            "projection": list(projection), "limit": int(limit)})
        ads = [classad2.ClassAd(t) for t in texts]
        if callback is None:
            return ads
        return [r for r in (callback(a) for a in ads) if r is not None]

    def history(self, constraint: Union[str, classad2.ExprTree, None] = None, projection: list[str] = [],
                match: int = -1, since: Union[int, str, classad2.ExprTree, None] = None
                ) -> list[classad2.ClassAd]:
        """Ads of jobs that left the queue, most recent first, as
        ``htcondor2.Schedd.history``."""
        texts = self._call({"op": "history", "constraint": _constraint(constraint) if constraint is not None
                            else "", "projection": list(projection), "match": int(match),
                            "since": _since(since)})
        return [classad2.ClassAd(t) for t in texts]

    def edit(self, job_spec: Union[list[str], str, classad2.ExprTree, int], attr: str,
             value: Union[str, classad2.ExprTree], flags: Any = None) -> int:
        """Set ``attr`` of the jobs to ``value`` (ClassAd text), as ``htcondor2.Schedd.edit``."""
        constraint, ids = _job_spec(job_spec)
        str_value = repr(value) if isinstance(value, classad2.ExprTree) else str(value)
        return int(self._call({"op": "edit", "constraint": constraint, "ids": ids, "attr": str(attr),
                               "value": str_value}))

    def spool(self, result: SubmitResult) -> None:
        """Upload the inputs of a ``submit(spool=True)``; its procs, held
        until now, become idle."""
        if getattr(result, "_spooledProcAds", None) is None:
            raise ValueError("result must have come from submit() with spool set")
        self._call({"op": "spool", "cluster": int(result.cluster())})

    def retrieve(self, job_spec: Union[list[str], str, classad2.ExprTree, int]) -> None:
        """Fetch the outputs of completed spooled jobs into their Iwd; they
        then leave the queue."""
        constraint, ids = _job_spec(job_spec)
        self._call({"op": "retrieve", "constraint": constraint, "ids": ids})

    def reschedule(self) -> None:
        """Accepted, as on a real schedd; the stand-in never waits for a negotiator."""
        self._call({"op": "ping"})

    # -- what a test adds ------------------------------------------------------------------------
    def inject_fault(self, kind: str, *, proc: int, cluster: int | None = None, reason: str = "",
                     code: int | None = None, subcode: int = 0, exit_code: int = 1, times: int = 1) -> None:
        """Arrange a fault for proc ``proc`` of ``cluster`` (None: the next
        cluster submitted):

        - ``"hold"``: when the proc would start, it is held instead with
          ``reason``, ``code`` (default 1) and ``subcode``;
        - ``"evict"``: it is evicted just after it starts (004, back to idle,
          run again: NumJobStarts grows); ``reason``/``code`` go in the 004 event;
        - ``"exit"``: it runs, but exits ``exit_code`` (005 with that value).

        ``times``: how many of the proc's runs the fault hits."""
        if kind not in ("hold", "evict", "exit"):
            raise ValueError(f"unknown fault kind {kind!r}: use 'hold', 'evict' or 'exit'")
        if int(times) < 1:
            raise ValueError("times must be at least 1")
        fault = {"kind": kind, "proc": int(proc), "cluster": None if cluster is None else int(cluster),
                 "reason": reason, "code": int(code) if code is not None else (1 if kind == "hold" else 0),
                 "subcode": int(subcode), "exit_code": int(exit_code), "times": int(times)}
        self._call({"op": "fault", "fault": fault})

    def daemon_pid(self) -> int | None:
        """The daemon's pid, or None when none runs (nothing is started)."""
        info = self._read_info()
        if info is None:
            return None
        try:
            return int(self._unwrap(self._request(info["socket"], {"op": "ping"}, timeout=10))["pid"])
        except (OSError, ValueError, KeyError, htcondor2.HTCondorException):
            return None

    def running(self) -> dict[str, int]:
        """``{"cluster.proc": pid}`` of the procs running now."""
        return {k: int(v) for k, v in self._call({"op": "ping"})["running"].items()}

    def stop(self, timeout: float = 30.0) -> None:
        """End the daemon and its procs (they go back to idle in the
        persisted queue: a later daemon runs them again).  Nothing to do when
        no daemon runs."""
        info = self._read_info()
        pid = self._pid_from_file()
        if info is not None:
            try:
                self._request(info["socket"], {"op": "shutdown"}, timeout=timeout)
            except (OSError, ValueError, htcondor2.HTCondorException):
                pass
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid) and _is_our_daemon(pid, self.root):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        if _alive(pid):
            raise RuntimeError(f"the stand-in schedd of {self.root} (pid {pid}) did not stop within {timeout} s")

    # -- the wire ----------------------------------------------------------------------------------
    def _call(self, msg: dict[str, Any]) -> Any:
        if self._slots is not None:
            msg["slots"] = self._slots
        if self._idle_timeout is not None:
            msg["idle_timeout"] = self._idle_timeout
        info = self._read_info()
        if info is not None:
            try:
                return self._unwrap(self._request(info["socket"], msg))
            except (ConnectionRefusedError, FileNotFoundError):
                pass  # a dead daemon's leftovers: start another
        info = self._ensure_daemon()
        return self._unwrap(self._request(info["socket"], msg))

    @staticmethod
    def _unwrap(reply: dict[str, Any]) -> Any:
        if "error" in reply:
            kind, message = reply["error"]
            exc = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError,
                   "FileNotFoundError": FileNotFoundError}.get(kind, htcondor2.HTCondorException)
            raise exc(message)
        return reply["ok"]

    def _request(self, path: str, msg: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(msg).encode() + b"\n")
            chunks = []
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    break
        finally:
            s.close()
        data = b"".join(chunks)
        if not data.endswith(b"\n"):
            # never retried: the request may have been done (a submit twice is worse than an error)
            raise htcondor2.HTCondorException(
                f"the stand-in schedd of {self.root} closed the connection before answering")
        return json.loads(data)

    def _read_info(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / "daemon.json").read_text())
        except (OSError, ValueError):
            return None

    def _pid_from_file(self) -> int | None:
        try:
            return int((self.root / "daemon.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _ensure_daemon(self) -> dict[str, Any]:
        """Start the daemon of root unless one answers; two processes doing
        this at once start one daemon (a lock in root serialises them)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            info = self._read_info()
            if info is not None:
                try:
                    self._request(info["socket"], {"op": "ping"}, timeout=10)
                    return info
                except (OSError, ValueError, htcondor2.HTCondorException):
                    pass
            for stale in ("daemon.json",):
                try:
                    os.unlink(self.root / stale)
                except FileNotFoundError:
                    pass
            env = dict(os.environ)
            env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = [sys.executable, "-c", _LAUNCH, _PACKAGE_DIR, str(self.root),
                   "--slots", str(self._slots or 2), "--idle-timeout", str(self._idle_timeout or 600.0)]
            log = self.root / "daemon.log"
            try:
                logged = log.stat().st_size
            except FileNotFoundError:
                logged = 0
            # A session of its own: a signal to the caller's process group
            # (a kernel restart) does not reach the starting daemon.
            launcher = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, close_fds=True, cwd="/", start_new_session=True)
            try:
                _, err = launcher.communicate(timeout=_START_TIMEOUT)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.communicate()
                raise htcondor2.HTCondorException(
                    f"the stand-in schedd of {self.root} failed to start: its launcher did not return within "
                    f"{_START_TIMEOUT:.0f} s (is the machine overloaded?)") from None
            if launcher.returncode != 0:
                raise htcondor2.HTCondorException(
                    f"the stand-in schedd of {self.root} failed to start: {err.decode(errors='replace')}")
            deadline = time.monotonic() + _ANSWER_TIMEOUT
            while time.monotonic() < deadline:
                failed = _new_traceback(log, logged)
                if failed:
                    raise htcondor2.HTCondorException(
                        f"the stand-in schedd of {self.root} failed to start; its log, {log}, says:\n{failed}")
                info = self._read_info()
                if info is not None:
                    try:
                        self._request(info["socket"], {"op": "ping"}, timeout=10)
                        return info
                    except (OSError, ValueError, htcondor2.HTCondorException):
                        pass
                time.sleep(0.02)
            raise htcondor2.HTCondorException(
                f"the stand-in schedd of {self.root} did not answer within {_ANSWER_TIMEOUT:.0f} s; "
                f"its log, {self.root / 'daemon.log'}, ends with:\n{_tail(self.root / 'daemon.log')}")
        finally:
            os.close(fd)


def _new_traceback(log: Path, offset: int) -> str:
    """A traceback the daemon's log got after ``offset``, or ''."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    at = text.find("Traceback (most recent call last)")
    return text[at:] if at >= 0 else ""


# -- job specs, as htcondor2's job_spec_hack reads them -------------------------------------------

def _job_spec(job_spec: Any) -> tuple[str | None, list[str] | None]:
    """(constraint, None) or (None, ["c.p", ...])."""
    if isinstance(job_spec, list):
        if not all(isinstance(i, str) for i in job_spec):
            raise TypeError("All elements of the job_spec list must be strings.")
        if all(re.fullmatch(r"\d+\.\d+", i) for i in job_spec):
            return None, list(job_spec)
        constraints = []
        for i in job_spec:
            if re.fullmatch(r"\d+", i):
                constraints.append(f"(ClusterID == {i})")
            elif re.fullmatch(r"\d+\.\d+", i):
                c, p = i.split(".")
                constraints.append(f"(ClusterID == {c} && ProcID == {p})")
            else:
                raise ValueError("All elements of the job_spec list must be strings of the form "
                                 "clusterID[.procID]")
        return " || ".join(constraints), None
    if isinstance(job_spec, bool):
        raise TypeError("The job_spec must be list of strings, a string, an int, or an ExprTree.")
    if isinstance(job_spec, int):
        return f"ClusterID == {job_spec}", None
    if isinstance(job_spec, classad2.ExprTree):
        return str(job_spec), None
    if isinstance(job_spec, str):
        if re.fullmatch(r"\d+\.\d+", job_spec):
            return None, [job_spec]
        if re.fullmatch(r"\d+", job_spec):
            return f"ClusterID == {job_spec}", None
        try:
            classad2.ExprTree(job_spec)
        except classad2.ClassAdException:
            raise ValueError("The job_spec string must be a clusterID[.procID] or the string form of an "
                             "ExprTree.") from None
        return job_spec, None
    raise TypeError("The job_spec must be list of strings, a string, an int, or an ExprTree.")


def _constraint(c: Any) -> str:
    text = str(c)
    try:
        classad2.ExprTree(text)
    except classad2.ClassAdException:
        raise htcondor2.HTCondorException(f"Unable to parse the query constraint {text!r}") from None
    return text


def _since(since: Any) -> str:
    if since is None:
        return ""
    if isinstance(since, bool):
        raise TypeError("since must be an int, string, or ExprTree")
    if isinstance(since, int):
        return f"ClusterID == {since}"
    if isinstance(since, classad2.ExprTree):
        return str(since)
    if isinstance(since, str):
        m = re.fullmatch(r"(\d+)\.(\d+)", since)
        if m:
            return f"ClusterID == {m[1]} && ProcID == {m[2]}"
        if re.fullmatch(r"\d+", since):
            return f"ClusterID == {since}"
        try:
            classad2.ExprTree(since)
        except classad2.ClassAdException:
            raise ValueError("The job_spec string must be a clusterID[.procID] or the string form of an "
                             "ExprTree.") from None
        return since
    raise TypeError("since must be an int, string, or ExprTree")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _is_our_daemon(pid: int, root: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return b"pymw_magic.testing._condor_daemon" in b" ".join(argv) and str(root).encode() in argv
    except OSError:
        return False


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
