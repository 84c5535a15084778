"""The stand-in schedd's daemon: one process per root that runs the jobs.

Data flow::

    client (condor.StandInSchedd) --JSON line--> Unix socket --> Daemon.handle
        submit/act/query/history/spool/retrieve/edit/fault/ping/shutdown
    Daemon loop (selectors: the socket, one pidfd per running proc, timers)
        idle proc --starter--> sandbox (inputs copied) --> local process
        process exit (pidfd) --> outputs copied back --> event log + queue
    Queue (_condor_queue) --journal--> root/job_queue.log, root/history
    events (_condor_eventlog) --append--> each job's user log

Owns the daemon's life (double fork, one daemon per root through a lock,
idle exit, a clean stop killing its procs), the starter's work (a fresh
sandbox per run, file transfer both ways, the environment, the executable
looked up on PATH when not transferred) and the schedd's policy (slots,
``max_idle`` late materialization, ``allowed_execute_duration``,
``on_exit_hold``, periodic expressions, holds, releases, removals,
evictions, injected faults).  Single-threaded: nothing races.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import hashlib
import heapq
import json
import math
import os
import re
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import classad2
import htcondor2

from . import _condor_eventlog as ev
from . import _condor_submit as sub
from ._condor_queue import (COMPLETED, HELD, HOST, IDLE, REMOVED, RUNNING, Cluster, Expr, Queue,
                            ad_text, custom_attrs, matches, now, owner, pick, translate)

SUBMIT_HOST = f"<127.0.0.1:9618?addrs=127.0.0.1-9618&alias={HOST}>"
EXECUTE_HOST = f"<127.0.0.1:9619?addrs=127.0.0.1-9619&alias={HOST}>"
KILL_GRACE = 2.0          # SIGTERM, then SIGKILL this many seconds later
PERIODIC_INTERVAL = 5.0   # the schedd's PERIODIC_EXPR_INTERVAL (real default 60 s)
HOUSEKEEPING = 10.0       # how often an idle daemon wakes to check its root still exists
MAX_REQUEST = 512 * 1024 * 1024
_CLUSTER_RE = re.compile(r"^\s*\(?\s*ClusterId\s*==\s*(\d+)\s*\)?\s*(&&|$)", re.IGNORECASE)


def user_log(ad: dict[str, Any]) -> str | None:
    """A proc's user log as a path (a relative one is in its Iwd: a spooled proc's)."""
    log = ad.get("UserLog")
    if not log:
        return None
    return log if os.path.isabs(log) else os.path.join(ad.get("Iwd") or "", log)


def socket_path(root: Path) -> str:
    """Where the daemon of ``root`` listens: in root when the path fits a
    Unix socket's 108 bytes, else in a per-user 0o700 directory, named by a
    hash of root."""
    p = str(root / "schedd.sock")
    if len(p.encode()) < 100:
        return p
    d = Path(tempfile.gettempdir()) / f"pymw-standin-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{d} must be a directory of yours with mode 0700")
    return str(d / (hashlib.sha256(str(root).encode()).hexdigest()[:24] + ".sock"))


class StopDaemon(Exception):
    pass


def _sigterm(signum, frame):
    raise StopDaemon()


_libc = None
# The job dies with the daemon, as a job dies with its starter: setpriv sets
# the parent-death signal and execs the job (a fork without a Python
# preexec_fn is five times cheaper); without setpriv, a preexec_fn does it.
_SETPRIV = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def _child_setup() -> None:
    # The job leads a session of its own (so its whole tree is killed with
    # it) and dies with the daemon, as a job dies with its starter.
    os.setsid()
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Run:
    """A proc's current execution: its process, sandbox and pending intent."""

    def __init__(self, key, popen, sandbox, slot, started, received, cwd_is_sandbox):
        self.key = key
        self.popen: subprocess.Popen = popen
        self.sandbox: Path = sandbox
        self.slot: str = slot
        self.started = started
        self.received = received
        self.cwd_is_sandbox = cwd_is_sandbox
        self.intent: tuple[str, dict[str, Any]] | None = None  # why we kill it
        self.pidfd: int | None = None
        self.snapshot: dict[str, tuple[int, int]] = {}
        self.timers: list[list] = []
        self.slot_n = 0


class Daemon:
    def __init__(self, root: Path, slots: int, idle_timeout: float):
        self.root = root
        self.slots = slots
        self.idle_timeout = idle_timeout
        self.q = Queue(root)
        self.sel = selectors.DefaultSelector()
        self.runs: dict[tuple[int, int], Run] = {}
        self.idle_heap: list[tuple[int, int]] = []
        self.timers: list[list] = []  # [when, seq, fn, alive]
        self.seq = 0
        self.last_request = time.monotonic()
        self.sock: socket.socket | None = None
        self.sock_path = socket_path(root)
        self.busy_slots: set[int] = set()
        self.unmatched: set[tuple[int, int]] = set()
        self._events: dict[str, list[str]] = {}
        self.me = owner()

    # -- timers ------------------------------------------------------------------
    def at(self, delay: float, fn: Callable[[], None]) -> list:
        self.seq += 1
        t = [time.monotonic() + delay, self.seq, fn, True]
        heapq.heappush(self.timers, t)
        return t

    # -- life --------------------------------------------------------------------
    def serve(self) -> None:
        global _libc
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = None
        signal.signal(signal.SIGTERM, _sigterm)
        signal.signal(signal.SIGINT, _sigterm)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        self.q.load()
        (self.root / "execute").mkdir(mode=0o700, exist_ok=True)
        (self.root / "spool").mkdir(mode=0o700, exist_ok=True)
        self.recover()
        self.listen()
        try:
            self.loop()
        except StopDaemon:
            pass
        finally:
            self.shutdown()

    def listen(self) -> None:
        try:
            os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(self.sock_path)
        finally:
            os.umask(old)
        os.chmod(self.sock_path, 0o600)
        s.listen(64)
        s.setblocking(False)
        self.sock = s
        self.sel.register(s, selectors.EVENT_READ, self.accept)
        info = {"pid": os.getpid(), "socket": self.sock_path, "started": time.time()}
        tmp = self.root / "daemon.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.root / "daemon.json")

    def loop(self) -> None:
        next_periodic = time.monotonic() + PERIODIC_INTERVAL
        while True:
            self._guarded(self.schedule)
            self.flush()
            nowm = time.monotonic()
            deadline = nowm + HOUSEKEEPING
            while self.timers and not self.timers[0][3]:
                heapq.heappop(self.timers)
            if self.timers:
                deadline = min(deadline, self.timers[0][0])
            if self.has_periodic():
                deadline = min(deadline, next_periodic)
            if self.queue_empty():
                deadline = min(deadline, self.last_request + self.idle_timeout)
            for key, _ in self.sel.select(max(0.0, deadline - nowm)):
                self._guarded(key.data)
            nowm = time.monotonic()
            while self.timers and (self.timers[0][0] <= nowm or not self.timers[0][3]):
                t = heapq.heappop(self.timers)
                if t[3]:
                    t[3] = False
                    self._guarded(t[2])
            if nowm >= next_periodic:
                next_periodic = nowm + PERIODIC_INTERVAL
                self._guarded(self.periodic)
            if self.q.records_since_compaction > 200_000:
                self.flush()
                self.q.compact()
            if not self.root.is_dir():
                raise StopDaemon()
            if self.queue_empty() and nowm - self.last_request >= self.idle_timeout:
                self._idle_exit()

    def _idle_exit(self) -> None:
        """Exit for idleness without dropping a request: the address goes
        first (a client that cannot connect starts a new daemon), then what
        already waits in the backlog is served; if that brought work, the
        daemon listens again and stays."""
        for path in (self.root / "daemon.json", Path(self.sock_path)):
            try:
                os.unlink(path)
            except OSError:
                pass
        while True:
            try:
                ready = self.sel.select(0)
            except OSError:
                break
            if not any(key.fileobj is self.sock for key, _ in ready):
                break
            self.accept()
        if self.queue_empty():
            raise StopDaemon()
        self.sel.unregister(self.sock)
        self.sock.close()
        self.listen()

    def _guarded(self, fn: Callable[[], None]) -> None:
        """A bug in one step must not take the schedd (and every job) down:
        it is written to daemon.log and the daemon goes on."""
        try:
            fn()
        except StopDaemon:
            raise
        except Exception:
            print(f"stand-in schedd: internal error\n{traceback.format_exc()}", file=sys.stderr, flush=True)

    def queue_empty(self) -> bool:
        return not self.q.jobs and all(c.materialized >= c.nprocs for c in self.q.clusters.values())

    def shutdown(self) -> None:
        """Stop: every running proc is killed and goes back to idle (evicted),
        so a later daemon runs it again, as a schedd shutdown does."""
        for key, run in list(self.runs.items()):
            self._killpg(run, signal.SIGKILL)
            try:
                os.waitpid(run.popen.pid, 0)
            except ChildProcessError:
                pass
            run.popen.returncode = -9
            if key in self.q.jobs:
                self._log(key, ev.evicted(*key, reason="The schedd is shutting down",
                                          received=run.received))
                self.q.set(key, JobStatus=IDLE, EnteredCurrentStatus=now(), RemoteHost=None)
                self.q.set_run(key, None)
            shutil.rmtree(run.sandbox, ignore_errors=True) if run.cwd_is_sandbox else None
        self.runs.clear()
        try:
            self.flush()
        except OSError:
            pass
        try:
            if self.sock is not None:
                self.sock.close()
            os.unlink(self.sock_path)
        except OSError:
            pass
        try:
            os.unlink(self.root / "daemon.json")
        except OSError:
            pass

    def recover(self) -> None:
        """After a crash: procs the journal says were running lost their
        starter; their leftovers are killed and they run again."""
        for key, info in list(self.q.runinfo.items()):
            _kill_session(info.get("pid"), info.get("sandbox"))
            if key in self.q.jobs and self.q.jobs[key].get("JobStatus") == RUNNING:
                self._log(key, ev.evicted(*key, reason="The schedd restarted and the job's starter was gone",
                                          received=info.get("received", 0)))
                self.q.set(key, JobStatus=IDLE, EnteredCurrentStatus=now(), RemoteHost=None)
            if info.get("sandbox"):
                shutil.rmtree(info["sandbox"], ignore_errors=True)
            self.q.set_run(key, None)
        for key, attrs in list(self.q.jobs.items()):
            if attrs.get("JobStatus") == RUNNING:  # running without run info: same fate
                self.q.set(key, JobStatus=IDLE, EnteredCurrentStatus=now())
            if attrs.get("JobStatus") == IDLE:
                heapq.heappush(self.idle_heap, key)
            elif attrs.get("JobStatus") == REMOVED:
                self._finish_remove(key)
        for c in self.q.clusters.values():
            c.submit_obj()
        self.flush()

    # -- requests ----------------------------------------------------------------
    def accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.setblocking(True)
            conn.settimeout(10)
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _, uid, _ = struct.unpack("3i", creds)
                if uid != os.getuid():
                    return  # only the owner talks to this schedd
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        break
                    data += chunk
                    if len(data) > MAX_REQUEST:
                        return
                if not data:
                    return
                req = json.loads(data)
                self.last_request = time.monotonic()
                try:
                    reply = {"ok": self.handle(req)}
                except StopDaemon:
                    conn.sendall(json.dumps({"ok": True}).encode() + b"\n")
                    raise
                except (htcondor2.HTCondorException, ValueError, TypeError, KeyError, OSError) as e:
                    reply = {"error": [type(e).__name__, str(e)]}
                except Exception as e:  # a bug in the stand-in: say so, keep serving
                    reply = {"error": ["HTCondorException",
                                       f"stand-in schedd internal error: {e!r}\n{traceback.format_exc()}"]}
                self.flush()
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except (OSError, json.JSONDecodeError, socket.timeout):
                return

    def handle(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        if req.get("slots"):
            self.slots = int(req["slots"])
        if req.get("idle_timeout") is not None:
            self.idle_timeout = float(req["idle_timeout"])
        if op == "ping":
            return {"pid": os.getpid(), "slots": self.slots, "idle_timeout": self.idle_timeout,
                    "running": {f"{k[0]}.{k[1]}": r.popen.pid for k, r in self.runs.items()}}
        if op == "shutdown":
            raise StopDaemon()
        if op == "submit":
            return self.submit(req)
        if op == "act":
            return self.act(req["action"], req["constraint"], req.get("ids"), req.get("reason"))
        if op == "query":
            return self.query(req.get("constraint"), req.get("projection") or [], int(req.get("limit", -1)))
        if op == "history":
            return self.history(req.get("constraint"), req.get("projection") or [],
                                int(req.get("match", -1)), req.get("since") or "")
        if op == "edit":
            return self.edit(req["constraint"], req.get("ids"), req["attr"], req["value"])
        if op == "spool":
            return self.spool(int(req["cluster"]))
        if op == "retrieve":
            return self.retrieve(req["constraint"], req.get("ids"))
        if op == "fault":
            return self.add_fault(req["fault"])
        raise ValueError(f"unknown request {op!r}")

    # -- submit --------------------------------------------------------------------
    def submit(self, req: dict[str, Any]) -> dict[str, Any]:
        submit: dict[str, str] = req["submit"]
        cwd = req["cwd"]
        keys, rows, count = req["keys"], req["rows"], int(req["count"])
        nprocs = count * len(rows) if keys else count
        if nprocs <= 0:
            raise htcondor2.HTCondorException("ERROR: the submit queued no jobs (empty item data)")
        probe = Cluster({"id": 0, "submit": submit, "keys": keys, "rows": rows, "count": count,
                         "nprocs": nprocs, "cwd": cwd, "spool": bool(req["spool"]), "base": {}})
        base = translate(probe.expander(0), cwd)
        # condor_submit checks what it can at submit: the executable, the log's directory
        dynamic = probe.dynamic
        if base.get("TransferExecutable", True) and "executable" not in dynamic and not req["spool"]:
            if not os.path.exists(base["Cmd"]):
                raise htcondor2.HTCondorException(f"ERROR: Executable file {base['Cmd']} does not exist")
        if "UserLog" in base and not {"log", "initialdir", "initial_dir", "iwd"} & dynamic:
            d = os.path.dirname(base["UserLog"])
            if not os.path.isdir(d):
                raise htcondor2.HTCondorException(
                    f"ERROR: Invalid log file: \"{base['UserLog']}\" (No such file or directory)")
        base.update(custom_attrs(submit, probe.expander(0)))
        qdate = now()
        cluster_attrs = dict(base)
        cluster_attrs.update(
            Owner=self.me, User=f"{self.me}@{HOST}", QDate=qdate, JobSubmitMethod=2,
            TotalSubmitProcs=nprocs, MaxHosts=1, MinHosts=1, JobPrio=base.get("JobPrio", 0),
            NumJobStarts=0, NumShadowStarts=0, NumHolds=0, NumRestarts=0,
            JobRunCount=0, ExitBySignal=False, CommittedTime=0, RemoteWallClockTime=0.0,
            CumulativeRemoteUserCpu=0.0, CumulativeRemoteSysCpu=0.0, RemoteUserCpu=0.0, RemoteSysCpu=0.0,
            BytesSent=0.0, BytesRecvd=0.0, MyType="Job", TargetType="Machine",
        )
        cluster_attrs["ClusterId"] = self.q.next_cluster
        rec = {"submit": submit, "keys": keys, "rows": rows, "count": count, "nprocs": nprocs,
               "cwd": cwd, "spool": bool(req["spool"]), "env": req.get("env") or {},
               "hold": sub.truthy(probe.raw("hold")), "qdate": qdate}
        from ._condor_queue import enc_attrs
        rec["base"] = enc_attrs(cluster_attrs)
        c = self.q.new_cluster(rec)
        # faults waiting for "the next cluster"
        for f in self.q.faults:
            if f.get("cluster") is None:
                f["cluster"] = c.id
        self.q.set_faults()
        self.materialize(c)
        self.flush()
        first = ad_text(dict(c.base, ProcId=0))
        return {"cluster": c.id, "first_proc": 0, "num_procs": nprocs, "clusterad": first}

    def materialize(self, c: Cluster) -> None:
        """Bring procs of ``c`` into the queue, all at once or, with max_idle,
        while fewer than max_idle of its procs are idle."""
        limit = c.base.get("JobMaterializeMaxIdle")
        if c.materialized >= c.nprocs:
            return
        idle = 0
        if limit is not None:
            # procs below scan_from have left the queue: count only the live ones
            while c.scan_from < c.materialized and (c.id, c.scan_from) not in self.q.jobs:
                c.scan_from += 1
            idle = sum(1 for p in range(c.scan_from, c.materialized)
                       if self.q.jobs.get((c.id, p), {}).get("JobStatus") == IDLE)
        rules = c.dynamic_rules
        events: dict[str, list[str]] = {}
        batch: list = []
        base = c.base
        t = now()
        held = None
        if c.spool:
            held = ("Spooling input data files", 16)
        elif c.rec.get("hold"):
            held = ("submitted on hold at user's request", 15)
        while c.materialized < c.nprocs and (limit is None or idle < limit):
            p = c.materialized
            lookup = c.expander(p) if rules or c.dynamic_custom else None
            attrs = translate(lookup, c.cwd, rules) if rules else {}
            if c.dynamic_custom:
                attrs.update(custom_attrs(c.dynamic_custom, lookup))
            attrs.update(ProcId=p, JobStatus=IDLE, EnteredCurrentStatus=t,
                         GlobalJobId=f"{HOST}#{c.id}.{p}#{c.rec['qdate']}")
            if c.spool:
                # As a schedd does: a spooled proc's working directory and
                # user log move into its spool directory (the submitter's
                # are kept as SUBMIT_*; retrieve() copies the log back there)
                spool_dir = self.root / "spool" / f"{c.id}.{p}"
                spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                attrs.update(SUBMIT_Iwd=attrs.get("Iwd", base.get("Iwd")), Iwd=str(spool_dir))
                submit_log = attrs.get("UserLog", base.get("UserLog"))
                if submit_log:
                    attrs.update(SUBMIT_UserLog=submit_log, UserLog="events.log")
            if held:
                attrs.update(JobStatus=HELD, HoldReason=held[0], HoldReasonCode=held[1], HoldReasonSubCode=0)
            self.q.materialize(c, p, attrs, batch)
            if not held:
                heapq.heappush(self.idle_heap, (c.id, p))
                idle += 1
            log = user_log(dict(base, **attrs))
            if log:
                notes = attrs.get("SubmitEventNotes", base.get("SubmitEventNotes"))
                events.setdefault(log, []).append(ev.submit(c.id, p, SUBMIT_HOST, notes))
                if held and not c.spool:
                    events[log].append(ev.held(c.id, p, held[0], held[1], 0))
        self.q.log_materialized(c, batch)
        for log, texts in events.items():
            self._append(log, "".join(texts))

    # -- scheduling ----------------------------------------------------------------
    def schedule(self) -> None:
        """Start idle procs on free slots; with max_idle, materialize more as
        procs leave the idle state (and start those too)."""
        while True:
            for c in list(self.q.clusters.values()):
                if c.materialized < c.nprocs and c.base.get("JobMaterializeMaxIdle") is not None:
                    self.materialize(c)
            started = 0
            while len(self.runs) < self.slots and self.idle_heap:
                key = heapq.heappop(self.idle_heap)
                attrs = self.q.jobs.get(key)
                if attrs is None or attrs.get("JobStatus") != IDLE or key in self.runs:
                    continue
                ad = self.q.ad(key)
                if not self._matches_machine(ad):
                    # no slot here will ever match it: set aside until an edit
                    self.unmatched.add(key)
                    continue
                self.start(key, ad)
                started += 1
            if not started:
                return

    def _machine_ad(self, slot: str) -> dict[str, Any]:
        return {"OpSys": "LINUX", "Arch": "X86_64", "Name": slot, "Machine": HOST, "Cpus": 1,
                "Memory": 1 << 20, "Disk": 1 << 40, "HasFileTransfer": True, "TotalCpus": self.slots,
                "HasContainer": False, "HasDocker": False, "HasSingularity": False}

    def _matches_machine(self, ad: dict[str, Any]) -> bool:
        # No container runtime here: a container job matches no slot and stays idle, as in a
        # pool whose execute points cannot run containers.
        if ad.get("ContainerImage"):
            return False
        req = ad.get("Requirements")
        if not req:
            return True
        machine_attrs = self._machine_ad("slot1@" + HOST)
        # as in matchmaking, a name the job lacks is looked up in the machine (MY, then TARGET)
        scope = classad2.ClassAd(ad_text(dict(machine_attrs, **ad)))
        machine = classad2.ClassAd(ad_text(machine_attrs))
        try:
            return classad2.ExprTree(str(req)).eval(scope, machine) is True
        except classad2.ClassAdException:
            return False

    def _free_slot(self) -> str:
        n = 1
        while n in self.busy_slots:
            n += 1
        self.busy_slots.add(n)
        return f"slot1_{n}@{HOST}"

    # -- the starter -------------------------------------------------------------------
    def start(self, key: tuple[int, int], ad: dict[str, Any]) -> None:
        c = self.q.clusters[key[0]]
        fault = self._take_fault(key, "hold")
        if fault is not None:
            self.hold(key, fault.get("reason") or "Held by an injected fault",
                      int(fault.get("code", 1)), int(fault.get("subcode", 0)), before_run=True)
            return
        slot = self._free_slot()
        slot_n = int(slot.split("_")[1].split("@")[0])
        iwd = ad["Iwd"]
        spool_dir = self.root / "spool" / f"{key[0]}.{key[1]}"
        shared = ad.get("ShouldTransferFiles") == "NO"
        n = ad.get("NumJobStarts", 0) + 1
        sandbox = Path(iwd) if shared else self.root / "execute" / f"dir_{key[0]}.{key[1]}.{n}_{os.getpid()}"
        if not shared:
            shutil.rmtree(sandbox, ignore_errors=True)
            sandbox.mkdir(mode=0o700, parents=True)
        # input transfer, from the Iwd (or the spool, for spooled jobs)
        source = spool_dir / "in" if c.spool else Path(iwd)
        inputs = sub.file_list(ad.get("TransferInput"))
        exe = ad["Cmd"]
        if ad.get("TransferExecutable", True):
            inputs = [str(Path(source) / os.path.basename(exe)) if c.spool else exe] + inputs
        if ad.get("In") and ad["In"] != "/dev/null":
            inputs.append(ad["In"])
        received = 0
        failures = []
        if not shared:
            for name in inputs:
                src = name if os.path.isabs(name) else os.path.join(source, name)
                try:
                    received += _copy_in(src, sandbox)
                except FileNotFoundError:
                    failures.append(src)
                except OSError as e:
                    failures.append((src, e))
            # what an eviction saved (ON_EXIT_OR_EVICT) comes back with the inputs
            evict_dir = spool_dir / "evict"
            if evict_dir.is_dir():
                for p in evict_dir.iterdir():
                    received += _copy_in(str(p), sandbox)
        if failures:
            self.busy_slots.discard(slot_n)
            if not shared:
                shutil.rmtree(sandbox, ignore_errors=True)
            self._input_failure(key, slot, failures)
            return
        # the executable: transferred into the sandbox, or a path, or looked up on PATH
        if ad.get("TransferExecutable", True):
            exe_path = str(sandbox / os.path.basename(exe))
            try:
                os.chmod(exe_path, os.stat(exe_path).st_mode | 0o700)
            except OSError:
                pass
        elif "/" in exe:
            exe_path = exe if os.path.isabs(exe) else str(sandbox / exe)
        else:
            exe_path = shutil.which(exe) or exe
        args = sub.parse_arguments('"' + ad.get("Arguments", "").replace('"', '""') + '"')
        env = self._job_env(ad, c, sandbox, slot, key)
        stdin_name = ad.get("In", "/dev/null")
        if stdin_name == "/dev/null":
            stdin = subprocess.DEVNULL
        else:
            stdin = open(os.path.join(iwd, stdin_name) if shared else sandbox / os.path.basename(stdin_name), "rb")
        out_name = "_condor_stdout" if not shared else ad.get("Out", "/dev/null")
        err_name = "_condor_stderr" if not shared else ad.get("Err", "/dev/null")
        try:
            stdout = open(sandbox / out_name, "wb") if not shared or out_name != "/dev/null" \
                else subprocess.DEVNULL
            stderr = open(sandbox / err_name, "wb") if not shared or err_name != "/dev/null" \
                else subprocess.DEVNULL
        except OSError as e:
            self.busy_slots.discard(slot_n)
            self.hold(key, f"Error from {slot}: Failed to open '{out_name}' as standard output: {e.strerror} "
                      f"(errno {e.errno})", 7, e.errno or 0, before_run=True)
            return
        log = user_log(ad)
        if log:
            self._append(log, ev.file_transfer(*key, "Started transferring input files", EXECUTE_HOST)
                         + ev.file_transfer(*key, "Finished transferring input files"))
        snapshot = _snapshot(sandbox) if not shared else {}
        try:
            if not os.access(exe_path, os.X_OK) or os.path.isdir(exe_path):
                # checked here so that a launcher in front of the job cannot hide the exec error
                err = errno.EACCES if os.path.exists(exe_path) else errno.ENOENT
                raise OSError(err, os.strerror(err), exe_path)
            popen = subprocess.Popen(_SETPRIV + [exe_path] + args, cwd=str(sandbox), env=env,
                                     stdin=stdin, stdout=stdout, stderr=stderr, close_fds=True,
                                     **({"start_new_session": True} if _SETPRIV else {"preexec_fn": _child_setup}))
        except OSError as e:
            for f in (stdin, stdout, stderr):
                if hasattr(f, "close"):
                    f.close()
            self.busy_slots.discard(slot_n)
            if not shared:
                shutil.rmtree(sandbox, ignore_errors=True)
            reason = (f"Error from {slot}: Failed to execute '{exe_path}'"
                      f"{' with arguments ' + ' '.join(args) if args else ''}: "
                      f"(errno={e.errno}: '{e.strerror}')")
            self.hold(key, reason, 6, e.errno or 0, before_run=True)
            return
        for f in (stdin, stdout, stderr):
            if hasattr(f, "close"):
                f.close()
        t = now()
        run = Run(key, popen, sandbox, slot, time.monotonic(), received, not shared)
        run.snapshot = snapshot
        run.slot_n = slot_n
        self.runs[key] = run
        first = {} if ad.get("JobStartDate") else {"JobStartDate": t}
        self.q.set(key, JobStatus=RUNNING, EnteredCurrentStatus=t, RemoteHost=slot,
                   LastRemoteHost=slot, NumJobStarts=n, NumShadowStarts=n, JobRunCount=n,
                   JobCurrentStartDate=t, JobCurrentStartExecutingDate=t, ShadowBday=t,
                   BytesRecvd=float(received), **first)
        self.q.set_run(key, {"pid": popen.pid, "sandbox": str(sandbox) if not shared else None,
                             "received": received})
        if log:
            self._append(log, ev.execute(*key, EXECUTE_HOST, slot, str(sandbox), int(ad.get("RequestCpus", 1)
                         if isinstance(ad.get("RequestCpus", 1), int) else 1),
                         ad.get("RequestDisk") if isinstance(ad.get("RequestDisk"), int) else 1048576,
                         ad.get("RequestMemory") if isinstance(ad.get("RequestMemory"), int) else 128))
        try:
            run.pidfd = os.pidfd_open(popen.pid)
            self.sel.register(run.pidfd, selectors.EVENT_READ, lambda k=key: self.reap(k))
        except (AttributeError, OSError):  # no pidfd: poll this one process
            self._poll_exit(key)
        dur = ad.get("AllowedExecuteDuration")
        if isinstance(dur, int) and dur >= 0:
            run.timers.append(self.at(dur + 0.001, lambda k=key, d=dur: self._duration_exceeded(k, d)))
        if self._take_fault(key, "evict") is not None:
            f = self._last_fault
            self.kill(key, "evict", reason=f.get("reason") or "Claim preempted", code=int(f.get("code", 0)),
                      subcode=int(f.get("subcode", 0)))

    def _poll_exit(self, key):
        run = self.runs.get(key)
        if run is None:
            return
        if run.popen.poll() is not None:
            self.reap(key)
        else:
            self.at(0.05, lambda: self._poll_exit(key))

    def _job_env(self, ad, c: Cluster, sandbox: Path, slot: str, key) -> dict[str, str]:
        env: dict[str, str] = {}
        getenv = ad.get("GetEnv")
        client_env = c.rec.get("env") or {}
        if getenv:
            if sub.truthy(getenv):
                env.update(client_env)
            elif getenv.lower() not in ("false", "no", "f", "n", "0"):
                for name in sub.file_list(getenv):
                    if name in client_env:
                        env[name] = client_env[name]
        env.update(sub.parse_environment('"' + ad.get("Environment", "").replace('"', '""') + '"'))
        job_ad = sandbox / ".job.ad"
        try:
            job_ad.write_text(_old_ad(self.q.ad(key)))
            (sandbox / ".machine.ad").write_text(_old_ad(self._machine_ad(slot)))
        except OSError:
            pass
        env.update({
            "_CONDOR_SCRATCH_DIR": str(sandbox), "_CONDOR_SLOT": slot.split("@")[0],
            "_CONDOR_JOB_AD": str(job_ad), "_CONDOR_MACHINE_AD": str(sandbox / ".machine.ad"),
            "_CONDOR_JOB_IWD": str(sandbox), "_CONDOR_JOB_PIDS": "",
            "TMPDIR": str(sandbox), "TMP": str(sandbox), "TEMP": str(sandbox),
            "BATCH_SYSTEM": "HTCondor", "CONDOR_PARENT_ID": f"{HOST}:{os.getpid()}",
            "OMP_NUM_THREADS": str(ad.get("RequestCpus", 1) if isinstance(ad.get("RequestCpus", 1), int) else 1),
        })
        if "PATH" not in env:
            # the starter's own PATH lets a bare "python3" resolve inside the job too
            env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        return env

    def _input_failure(self, key, slot: str, failures: list) -> None:
        first = failures[0]
        if isinstance(first, tuple):
            path, err = first
            detail = f"reading from file {path}: (errno {err.errno}) {err.strerror}"
        else:
            detail = f"reading from file {first}: (errno 2) No such file or directory"
        details = f"{len(failures)} total failures: first failure: {detail}"
        starter = (f"Failed to transfer files: SHADOW at 127.0.0.1 failed to send file(s) to <127.0.0.1:9619>: "
                   f"|Error: {details}; STARTER failed to receive file(s) from <127.0.0.1:9618>")
        reason = (f"Transfer input files failure at access point {HOST} while sending files to "
                  f"execution point {slot}. Details: {details}")
        ad = self.q.ad(key)
        log = user_log(ad)
        if log:
            self._append(log, ev.remote_error(*key, daemon="starter", host=slot, message=starter, code=13,
                                              subcode=2)
                         + ev.evicted(*key, reason=reason, code=13, subcode=2))
        self.hold(key, reason, 13, 2, before_run=True)

    # -- a proc's end ------------------------------------------------------------------
    def reap(self, key) -> None:
        run = self.runs.get(key)
        if run is None:
            return
        try:
            _, status, ru = os.wait4(run.popen.pid, os.WNOHANG)
        except ChildProcessError:
            status, ru = 0, None
        else:
            if _ == 0:
                return  # not yet (a spurious wake)
        run.popen.returncode = os.waitstatus_to_exitcode(status)
        if run.pidfd is not None:
            try:
                self.sel.unregister(run.pidfd)
            except (KeyError, ValueError):
                pass
            os.close(run.pidfd)
        # the rest of its session (children of the job) goes with it
        self._killpg(run, signal.SIGKILL)
        for t in run.timers:
            t[3] = False
        del self.runs[key]
        self.busy_slots.discard(getattr(run, "slot_n", 0))
        usage = ev.Usage(ru.ru_utime, ru.ru_stime) if ru else ev.Usage()
        try:
            self._ended(key, run, status, usage)
        finally:
            if run.cwd_is_sandbox:
                shutil.rmtree(run.sandbox, ignore_errors=True)

    def _ended(self, key, run: Run, status: int, usage: ev.Usage) -> None:
        if key not in self.q.jobs:
            return
        ad = self.q.ad(key)
        log = user_log(ad)
        wall = time.monotonic() - run.started
        t = now()
        common = dict(RemoteWallClockTime=float(ad.get("RemoteWallClockTime", 0.0)) + wall,
                      RemoteUserCpu=usage.user, RemoteSysCpu=usage.system,
                      CumulativeRemoteUserCpu=float(ad.get("CumulativeRemoteUserCpu", 0.0)) + usage.user,
                      CumulativeRemoteSysCpu=float(ad.get("CumulativeRemoteSysCpu", 0.0)) + usage.system,
                      LastJobStatus=RUNNING, RemoteHost=None)
        self.q.set_run(key, None)
        if run.intent is not None:
            kind, info = run.intent
            sent = self._save_for_eviction(key, run, ad) if kind in ("evict", "vacate", "hold") else 0
            ev_text = ev.evicted(*key, reason=info.get("reason", ""), code=info.get("code", 0),
                                 subcode=info.get("subcode", 0), run=usage, sent=sent, received=run.received)
            if log:
                self._append(log, ev_text)
            self.q.set(key, **common)
            if kind == "remove":
                self._finish_remove(key)
            elif kind == "hold":
                self.hold(key, info["hold_reason"], info["hold_code"], info.get("hold_subcode", 0),
                          before_run=True)
            else:  # evict/vacate: back to idle, to run again
                self.q.set(key, JobStatus=IDLE, EnteredCurrentStatus=t, LastVacateTime=t,
                           NumJobStarts=ad.get("NumJobStarts", 0))
                heapq.heappush(self.idle_heap, key)
            return
        by_signal = os.WIFSIGNALED(status)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if by_signal else None
        fault = self._take_fault(key, "exit")
        if fault is not None:
            by_signal, sig, code = False, None, int(fault.get("exit_code", 1))
        # output transfer back to the access point
        if log:
            self._append(log, ev.file_transfer(*key, "Started transferring output files")
                         + ev.file_transfer(*key, "Finished transferring output files"))
        sent, failure, fcode, fsub = self._transfer_out(key, run, ad)
        exit_attrs = dict(ExitBySignal=by_signal, BytesSent=float(sent))
        if by_signal:
            exit_attrs["ExitSignal"] = sig
        else:
            exit_attrs["ExitCode"] = code
        self.q.set(key, **common, **exit_attrs)
        if failure is not None:
            if log:  # a real schedd evicts with the transfer's failure first, then holds
                self._append(log, ev.evicted(*key, reason=failure, code=fcode, subcode=fsub, run=usage,
                                             sent=sent, received=run.received))
            self.hold(key, failure, fcode, fsub, before_run=True)
            return
        ad = self.q.ad(key)
        hold = self._on_exit_hold(ad)
        if hold is not None:
            self.hold(key, *hold, before_run=True)
            return
        total = ev.Usage(float(ad.get("CumulativeRemoteUserCpu", 0.0)), float(ad.get("CumulativeRemoteSysCpu", 0.0)))
        if log:
            self._append(log, ev.terminated(*key, return_value=code, signal=sig, run=usage, total=total,
                                            sent=sent, received=run.received, total_sent=sent,
                                            total_received=run.received))
        leaving = not self.q.clusters[key[0]].spool
        self.q.set(key, journal=not leaving, JobStatus=COMPLETED, EnteredCurrentStatus=t, CompletionDate=t)
        if leaving:
            self.q.leave(key)
            # what evictions kept for it is no longer needed (a spooled
            # job's spool holds its outputs and log until retrieved)
            spool = self.root / "spool" / f"{key[0]}.{key[1]}"
            if spool.exists():
                shutil.rmtree(spool, ignore_errors=True)
        self._cluster_progress(key[0])

    def _on_exit_hold(self, ad) -> tuple[str, int, int] | None:
        expr = ad.get("OnExitHold")
        if not expr:
            return None
        job = classad2.ClassAd(ad_text(ad))
        try:
            val = classad2.ExprTree(str(expr)).eval(job)
        except classad2.ClassAdException:
            val = None
        if val is not True and not (isinstance(val, (int, float)) and not isinstance(val, bool) and val != 0):
            return None
        reason = None
        if ad.get("OnExitHoldReason"):
            try:
                r = classad2.ExprTree(str(ad["OnExitHoldReason"])).eval(job)
                reason = r if isinstance(r, str) else None
            except classad2.ClassAdException:
                reason = None
        subcode = 0
        if ad.get("OnExitHoldSubCode"):
            try:
                s = classad2.ExprTree(str(ad["OnExitHoldSubCode"])).eval(job)
                subcode = int(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else 0
            except classad2.ClassAdException:
                subcode = 0
        if not reason:
            reason = f"The job attribute OnExitHold expression '{expr}' evaluated to TRUE"
        return reason, 3, subcode

    def _max_output_bytes(self, ad) -> int | None:
        """MaxTransferOutputMB (an expression; absent or negative: no limit) in bytes."""
        expr = ad.get("MaxTransferOutputMB")
        if expr is None:
            return None
        try:
            val = classad2.ExprTree(str(expr)).eval(classad2.ClassAd(ad_text(ad)))
        except classad2.ClassAdException:
            return None
        if not isinstance(val, (int, float)) or math.isnan(val) or math.isinf(val):
            return None
        # read as the shadow does (LookupInteger into an int): a real is cut
        # toward zero, a boolean is 0 or 1, and the int is 32 bits
        mb = (int(val) + (1 << 31)) % (1 << 32) - (1 << 31)
        return None if mb < 0 else mb * 1024 * 1024

    def _transfer_out(self, key, run: Run, ad) -> tuple[int, str | None, int, int]:
        """Copy stdout/stderr and the output files back (to the Iwd, or to the
        spool for a spooled job); (bytes, hold reason of a failure or None,
        its HoldReasonCode, its HoldReasonSubCode)."""
        if not run.cwd_is_sandbox:
            return 0, None, 0, 0
        c = self.q.clusters[key[0]]
        iwd = Path(ad["Iwd"])
        spool_out = self.root / "spool" / f"{key[0]}.{key[1]}" / "out"
        sent = 0
        remaps = sub.parse_remaps(ad.get("TransferOutputRemaps"))
        pending: list[tuple[Path, str]] = []  # (source in sandbox, destination relative to/abs in Iwd)
        # HTCondor appends stdout and stderr to the output files' list: they go last
        std: list[tuple[Path, str]] = []
        for name, attr in (("_condor_stdout", "Out"), ("_condor_stderr", "Err")):
            dest = ad.get(attr, "/dev/null")
            if dest and dest != "/dev/null":
                std.append((run.sandbox / name, dest))
        listed = ad.get("TransferOutput")
        if listed is not None:
            names = sub.file_list(listed)
        else:
            names = [p.name for p in run.sandbox.iterdir() if _changed(p, run.snapshot)]
        for name in names:
            src = run.sandbox / name
            if listed is not None and not src.exists():
                reason = (f"Transfer output files failure at access point {HOST} while receiving files from "
                          f"the execution point {run.slot}. Details: reading from file {src}: "
                          f"(errno 2) No such file or directory")
                # what exists still comes back, as HTCondor transfers all it can
                for s, d in pending + std:
                    sent += self._deliver(s, d, iwd, spool_out, c.spool)
                return sent, reason, 12, 2
            pending.append((src, remaps.get(name, remaps.get(os.path.basename(name), os.path.basename(name)))))
        pending += std
        # max_transfer_output_mb: the files are sent in turn; the one that
        # crosses the limit arrives cut at it, the rest still go, and the job
        # is held (code 33) with the first failure's text, as HTCondor 25 does.
        # Every later file that is not empty fails too (none of the limit is
        # left): the reason counts them all and names the first.
        limit = self._max_output_bytes(ad)
        over: str | None = None
        failures = 0
        for s, d in pending:
            cut = None
            if limit is not None and s.exists() and s.is_file():
                size = s.stat().st_size
                if sent + size > limit:
                    cut = max(0, limit - sent)
                    failures += 1
                    over = over or (f"sending file {s}: max total download bytes exceeded (max="
                                    f"{limit // (1024 * 1024)} MB, this file={size // (1024 * 1024)} MB)")
            try:
                sent += self._deliver(s, d, iwd, spool_out, c.spool, cut)
            except OSError as e:
                return sent, (f"Transfer output files failure at access point {HOST} while receiving files from "
                              f"the execution point {run.slot}. Details: writing to file {d}: "
                              f"(errno {e.errno}) {e.strerror}"), 12, 2
        if over is not None:
            return sent, (f"Error from {run.slot}: STARTER at 127.0.0.1 failed to send file(s) to "
                          f"<127.0.0.1:9618>: |Error: {failures} total failures: first failure: {over}; "
                          "SHADOW failed to receive file(s) from <127.0.0.1:9619>"), 33, 0
        if c.spool:
            (spool_out.parent / "outputs.json").write_text(json.dumps([d for _, d in pending]))
        return sent, None, 0, 0

    def _deliver(self, src: Path, dest: str, iwd: Path, spool_out: Path, spooled: bool,
                 cut: int | None = None) -> int:
        if not src.exists():
            return 0
        if spooled:
            target = spool_out / dest.lstrip("/")
        else:
            target = Path(dest) if os.path.isabs(dest) else iwd / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
            return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        tmp = target.with_name(target.name + ".standin-tmp")
        if cut is None:
            shutil.copyfile(src, tmp)
        else:  # only its first ``cut`` bytes
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                left = cut
                while left > 0 and (block := fin.read(min(left, 1 << 20))):
                    fout.write(block)
                    left -= len(block)
        os.replace(tmp, target)  # a reader never sees half a file
        return target.stat().st_size

    def _save_for_eviction(self, key, run: Run, ad) -> int:
        """ON_EXIT_OR_EVICT: what the evicted run wrote (the listed outputs
        that exist, or every new or changed file) is kept in the spool and
        comes back into the next run's sandbox."""
        if ad.get("WhenToTransferOutput") != "ON_EXIT_OR_EVICT" or not run.cwd_is_sandbox:
            return 0
        d = self.root / "spool" / f"{key[0]}.{key[1]}" / "evict"
        d.mkdir(parents=True, exist_ok=True)
        listed = ad.get("TransferOutput")
        if listed is not None:
            paths = [run.sandbox / n for n in sub.file_list(listed)]
        else:
            paths = [p for p in run.sandbox.iterdir() if _changed(p, run.snapshot)]
        sent = 0
        for p in paths:
            if p.is_file():
                shutil.copyfile(p, d / p.name)
                sent += p.stat().st_size
            elif p.is_dir():
                shutil.copytree(p, d / p.name, dirs_exist_ok=True)
        return sent

    def _cluster_progress(self, cid: int) -> None:
        c = self.q.clusters.get(cid)
        if c is not None and c.materialized < c.nprocs:
            self.materialize(c)

    # -- holds, releases, removals, kills -------------------------------------------------
    def hold(self, key, reason: str, code: int, subcode: int, before_run: bool = False) -> None:
        ad = self.q.ad(key)
        t = now()
        self.q.set(key, JobStatus=HELD, EnteredCurrentStatus=t, HoldReason=reason, HoldReasonCode=code,
                   HoldReasonSubCode=subcode, NumHolds=ad.get("NumHolds", 0) + 1,
                   LastHoldReason=reason, LastHoldReasonCode=code, LastHoldReasonSubCode=subcode,
                   RemoteHost=None)
        if user_log(ad):
            self._append(user_log(ad), ev.held(*key, reason, code, subcode))
        self._cluster_progress(key[0])

    def kill(self, key, kind: str, **info) -> None:
        run = self.runs.get(key)
        if run is None:
            return
        if run.intent is not None:
            # already being killed: only a removal overrides why (a job held
            # or evicted and then removed before it died is removed)
            if kind == "remove" and run.intent[0] != "remove":
                run.intent = (kind, dict(run.intent[1], reason=info.get("reason", ""),
                                         code=info.get("code", 0), subcode=info.get("subcode", 0)))
            return
        run.intent = (kind, info)
        self._killpg(run, signal.SIGTERM)
        run.timers.append(self.at(KILL_GRACE, lambda: self._killpg(run, signal.SIGKILL)))

    def _killpg(self, run: Run, sig: int) -> None:
        try:
            os.killpg(run.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(run.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _duration_exceeded(self, key, duration: int) -> None:
        if key not in self.runs:
            return
        run, ad = self.runs[key], self.q.ad(key)
        listed = ad.get("TransferOutput")
        if ad.get("WhenToTransferOutput") == "ON_EXIT_OR_EVICT" and listed is not None and run.cwd_is_sandbox \
                and any(not (run.sandbox / n).exists() for n in sub.file_list(listed)):
            # As a real starter does: the kill's ON_EXIT_OR_EVICT transfer
            # fails on the missing output, the claim ends, the job is evicted
            # (code 1009) and goes back to idle, to run again, never held.
            self.kill(key, "evict", reason="Claim deactivated", code=1009, subcode=0)
            return
        reason = f"The job exceeded allowed execute duration of {sub.format_time_short(duration)}"
        self.kill(key, "hold", reason="", hold_reason=reason, hold_code=47, hold_subcode=0)

    def _finish_remove(self, key) -> None:
        job, base = self.q.jobs[key], self.q.clusters[key[0]].base
        reason = job.get("RemoveReason", base.get("RemoveReason", ""))
        log = user_log(dict(base, **job))
        if log and not self.q.clusters[key[0]].spool:  # (a spooled one's log goes with its spool)
            self._append(log, ev.aborted(*key, reason))
        self.q.set(key, journal=False, JobStatus=REMOVED, EnteredCurrentStatus=now(), RemoteHost=None)
        self.q.leave(key)
        spool = self.root / "spool" / f"{key[0]}.{key[1]}"
        if spool.exists():
            shutil.rmtree(spool, ignore_errors=True)
        self._cluster_progress(key[0])

    # -- act ----------------------------------------------------------------------------
    def _select(self, constraint: str | None, ids: list[str] | None) -> tuple[list[tuple[int, int]], int]:
        """(keys found, number of ids not found)."""
        if ids is not None:
            found, missing = [], 0
            for i in ids:
                c, p = (int(x) for x in i.split("."))
                if (c, p) in self.q.jobs:
                    found.append((c, p))
                else:
                    missing += 1
            return found, missing
        m = _CLUSTER_RE.match(constraint or "")
        if m is not None and m.group(2) == "":
            return self._candidates(constraint), 0
        keys = [k for k in self._candidates(constraint)
                if matches(constraint, self.q.jobs[k], self.q.clusters[k[0]].base)]
        return keys, 0

    def _candidates(self, constraint: str | None) -> list[tuple[int, int]]:
        """The jobs a constraint can match: one cluster's when it names one
        (what job_spec_hack sends for an int or "c"), else all, in order."""
        m = _CLUSTER_RE.match(constraint or "")
        if m:
            cid = int(m.group(1))
            c = self.q.clusters.get(cid)
            if c is None:
                return []
            return [(cid, p) for p in range(c.materialized) if (cid, p) in self.q.jobs]
        return sorted(self.q.jobs)

    def act(self, action: int, constraint: str | None, ids: list[str] | None, reason: str | None
            ) -> dict[str, int]:
        keys, missing = self._select(constraint, ids)
        by = f"{reason or 'Python-initiated action'} (by user {self.me})"
        m = _CLUSTER_RE.match(constraint or "")
        if int(action) in (3, 4) and m is not None and m.group(2) == "":
            # removing a whole cluster removes its factory too: procs not yet
            # materialized (max_idle) never will be
            c = self.q.clusters.get(int(m.group(1)))
            if c is not None and c.materialized < c.nprocs:
                self.q.end_factory(c)
        totals = {"TotalError": 0, "TotalSuccess": 0, "TotalNotFound": missing, "TotalBadStatus": 0,
                  "TotalAlreadyDone": 0, "TotalPermissionDenied": 0, "TotalJobAds": len(keys) + missing,
                  "TotalChangedAds": 0}
        for key in keys:
            status = self.q.jobs[key].get("JobStatus")
            outcome = self._act_one(int(action), key, status, by)
            totals[outcome] += 1
        totals["TotalChangedAds"] = totals["TotalSuccess"]
        return totals

    def _act_one(self, action: int, key, status: int, by: str) -> str:
        if action in (3, 4):  # Remove, RemoveX
            if status == REMOVED:
                if action == 4 and key in self.runs:
                    self._killpg(self.runs[key], signal.SIGKILL)
                return "TotalAlreadyDone"
            self.q.set(key, RemoveReason=by, JobStatusOnRelease=None)
            if key in self.runs:
                self.q.set(key, JobStatus=REMOVED, EnteredCurrentStatus=now())
                self.kill(key, "remove", reason="Claim deactivated", code=1009, subcode=0)
                if action == 4:
                    self._killpg(self.runs[key], signal.SIGKILL)
            else:
                self._finish_remove(key)
            return "TotalSuccess"
        if action == 1:  # Hold
            if status == HELD:
                return "TotalAlreadyDone"
            if status in (REMOVED, COMPLETED):
                return "TotalBadStatus"
            if key in self.runs:
                self.kill(key, "hold", reason="Claim deactivated", code=1009, subcode=0,
                          hold_reason=by, hold_code=1, hold_subcode=0)
            else:
                self.hold(key, by, 1, 0)
            return "TotalSuccess"
        if action == 2:  # Release
            if status != HELD:
                return "TotalBadStatus"
            ad = self.q.ad(key)
            if ad.get("HoldReasonCode") == 16:  # waiting for its spooled input: not the user's to release
                return "TotalBadStatus"
            self.q.set(key, JobStatus=IDLE, EnteredCurrentStatus=now(), ReleaseReason=by,
                       LastHoldReason=ad.get("HoldReason", ""), HoldReason=None,
                       HoldReasonCode=None, HoldReasonSubCode=None)
            if user_log(ad):
                self._append(user_log(ad), ev.released(*key, by))
            heapq.heappush(self.idle_heap, key)
            return "TotalSuccess"
        if action in (5, 6):  # Vacate, VacateFast
            if key not in self.runs:
                return "TotalBadStatus"
            self.kill(key, "vacate", reason="Claim deactivated", code=1009, subcode=0)
            if action == 6:
                self._killpg(self.runs[key], signal.SIGKILL)
            return "TotalSuccess"
        if action in (8, 9):  # Suspend, Continue
            run = self.runs.get(key)
            if run is None:
                return "TotalBadStatus"
            self._killpg(run, signal.SIGSTOP if action == 8 else signal.SIGCONT)
            self.q.set(key, JobStatus=7 if action == 8 else RUNNING, EnteredCurrentStatus=now())
            return "TotalSuccess"
        return "TotalError"

    def edit(self, constraint, ids, attr: str, value: str) -> int:
        keys, _ = self._select(constraint, ids)
        try:
            parsed = classad2.ExprTree(value)
        except classad2.ClassAdException:
            raise htcondor2.HTCondorException(f"Failed to parse the value of {attr}: {value!r}") from None
        v: Any = parsed.eval()
        # a literal is kept as its value, anything else as the expression (as the schedd stores it)
        literal = isinstance(v, (bool, int, float, str)) and not isinstance(v, classad2.Value) \
            and str(classad2.ExprTree(sub.literal(v))) == str(parsed)
        if not literal:
            v = Expr(value)
        for key in keys:
            self.q.set(key, **{attr: v})
            if key in self.unmatched:  # its requirements may match now
                self.unmatched.discard(key)
                heapq.heappush(self.idle_heap, key)
        return len(keys)

    # -- query and history ---------------------------------------------------------------
    def query(self, constraint, projection: list[str], limit: int) -> list[str]:
        only = {p.lower() for p in projection} or None
        out = []
        m = _CLUSTER_RE.match(constraint or "")
        exact = m is not None and m.group(2) == ""  # "ClusterId == N" alone: no need to evaluate it
        for key in self._candidates(constraint):
            job, base = self.q.jobs[key], self.q.clusters[key[0]].base
            if exact or matches(constraint, job, base):
                out.append(ad_text(pick(job, base, only)))
                if 0 <= limit <= len(out):
                    break
        return out

    def history(self, constraint, projection: list[str], match: int, since: str) -> list[str]:
        only = {p.lower() for p in projection} or None
        out = []
        since_expr = since.strip()
        for job, base in self.q.history():
            if since_expr and matches(since_expr, job, base):
                break
            if matches(constraint, job, base):
                out.append(ad_text(pick(job, base, only)))
                if 0 <= match <= len(out):
                    break
        return out

    # -- periodic expressions ----------------------------------------------------------------
    def has_periodic(self) -> bool:
        return any(any(a in c.base for a in ("PeriodicRemove", "PeriodicHold", "PeriodicRelease"))
                   for c in self.q.clusters.values())

    def periodic(self) -> None:
        for key in sorted(self.q.jobs):
            ad = self.q.ad(key)
            if not any(a in ad for a in ("PeriodicRemove", "PeriodicHold", "PeriodicRelease")):
                continue
            status = ad.get("JobStatus")
            job = classad2.ClassAd(ad_text(ad))

            def fires(attr: str) -> bool:
                if attr not in ad:
                    return False
                try:
                    return classad2.ExprTree(str(ad[attr])).eval(job) is True
                except classad2.ClassAdException:
                    return False
            if status not in (HELD, COMPLETED, REMOVED) and fires("PeriodicHold"):
                reason = f"The job attribute PeriodicHold expression '{ad['PeriodicHold']}' evaluated to TRUE"
                self._act_policy_hold(key, reason)
            elif status == HELD and ad.get("HoldReasonCode") != 1 and fires("PeriodicRelease"):
                self._act_one(2, key, status, "The job attribute PeriodicRelease expression "
                              f"'{ad['PeriodicRelease']}' evaluated to TRUE")
            elif status not in (REMOVED,) and fires("PeriodicRemove"):
                self._act_one(3, key, status, f"The job attribute PeriodicRemove expression "
                              f"'{ad['PeriodicRemove']}' evaluated to TRUE")
                # the policy's reason is the removal reason, without "(by user ...)"
                if key in self.q.jobs:
                    self.q.set(key, RemoveReason=f"The job attribute PeriodicRemove expression "
                               f"'{ad['PeriodicRemove']}' evaluated to TRUE")

    def _act_policy_hold(self, key, reason: str) -> None:
        if key in self.runs:
            self.kill(key, "hold", reason="Claim deactivated", code=1009, hold_reason=reason, hold_code=3)
        else:
            self.hold(key, reason, 3, 0)

    # -- spool and retrieve -----------------------------------------------------------------
    def spool(self, cid: int) -> None:
        c = self.q.clusters.get(cid)
        if c is None or not c.spool:
            raise htcondor2.HTCondorException(f"cluster {cid} was not submitted with spool=True")
        for p in range(c.materialized):
            key = (cid, p)
            if key not in self.q.jobs:
                continue
            ad = self.q.ad(key)
            dest = self.root / "spool" / f"{cid}.{p}" / "in"
            dest.mkdir(parents=True, exist_ok=True)
            names = sub.file_list(ad.get("TransferInput"))
            if ad.get("TransferExecutable", True):
                names.append(ad["Cmd"])
            if ad.get("In", "/dev/null") != "/dev/null":
                names.append(ad["In"])
            for name in names:
                src = name if os.path.isabs(name) else os.path.join(ad.get("SUBMIT_Iwd") or ad["Iwd"], name)
                try:
                    _copy_in(src, dest)
                except FileNotFoundError:
                    # as a schedd does: a job whose inputs could not be
                    # spooled leaves the queue (it would wait for them for ever)
                    for k in [k for k in self.q.jobs if k[0] == cid]:
                        self.q.set(k, RemoveReason="spooling its input files failed")
                        self._finish_remove(k)
                    raise htcondor2.HTCondorException(
                        f"DCSchedd::spoolJobFiles:7002:File transfer failed for target job {cid}.{p}: "
                        f"TOOL failed to send file(s): |Error: 1 total failures: first failure: reading "
                        f"from file {src}: (errno 2) No such file or directory") from None
            if ad.get("JobStatus") == HELD and ad.get("HoldReasonCode") == 16:
                self.q.set(key, JobStatus=IDLE, EnteredCurrentStatus=now(), HoldReason=None,
                           HoldReasonCode=None, HoldReasonSubCode=None,
                           StageInFinish=now())
                heapq.heappush(self.idle_heap, key)

    def retrieve(self, constraint, ids) -> int:
        keys, _ = self._select(constraint, ids)
        n = 0
        for key in keys:
            ad = self.q.ad(key)
            if ad.get("JobStatus") != COMPLETED:
                continue
            base = self.root / "spool" / f"{key[0]}.{key[1]}"
            listing = base / "outputs.json"
            dests = json.loads(listing.read_text()) if listing.exists() else []
            iwd = Path(ad.get("SUBMIT_Iwd") or ad["Iwd"])
            for d in dests:
                src = base / "out" / d.lstrip("/")
                if src.exists():
                    target = Path(d) if os.path.isabs(d) else iwd / d
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if src.is_dir():
                        shutil.copytree(src, target, dirs_exist_ok=True)
                    else:
                        shutil.copyfile(src, target)
            # the proc's log comes back over the submitter's log file (each
            # retrieved proc's in turn, as a schedd does: not appended)
            log, submit_log = user_log(ad), ad.get("SUBMIT_UserLog")
            if log and submit_log and os.path.exists(log):
                target = Path(submit_log) if os.path.isabs(submit_log) else iwd / submit_log
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, target)
            self.q.set(key, StageOutFinish=now())
            self.q.leave(key)
            shutil.rmtree(base, ignore_errors=True)
            n += 1
        return n

    # -- faults --------------------------------------------------------------------------
    def add_fault(self, fault: dict[str, Any]) -> None:
        if fault["kind"] not in ("hold", "evict", "exit"):
            raise ValueError(f"unknown fault kind {fault['kind']!r}: use 'hold', 'evict' or 'exit'")
        self.q.faults.append(fault)
        self.q.set_faults()

    _last_fault: dict[str, Any] = {}

    def _take_fault(self, key, kind: str) -> dict[str, Any] | None:
        for f in self.q.faults:
            if f["kind"] == kind and f.get("cluster") == key[0] and f["proc"] == key[1] and f.get("times", 1) > 0:
                f["times"] = f.get("times", 1) - 1
                self.q.set_faults()
                self._last_fault = f
                return f
        return None

    # -- the user log ----------------------------------------------------------------------
    def _log(self, key, text: str) -> None:
        log = user_log(self.q.ad(key)) if key in self.q.jobs else None
        if log:
            self._append(log, text)

    def _append(self, path: str, text: str) -> None:
        # events wait for the end of this step of the loop, then go out in
        # one write per log (before any reply: a client that was answered
        # finds the events of what it asked for)
        self._events.setdefault(path, []).append(text)

    def flush(self) -> None:
        """Write the step's events, journal records and history lines."""
        events, self._events = self._events, {}
        for path, texts in events.items():
            try:
                ev.append(path, "".join(texts))
            except OSError as e:  # a user log we cannot write must not stop the schedd
                print(f"stand-in schedd: cannot write the event log {path}: {e}", file=sys.stderr, flush=True)
        self.q.flush()


# -- helpers ----------------------------------------------------------------------------

def _copy_in(src: str, sandbox: Path) -> int:
    """Copy an input into the sandbox as the file transfer does: a file by its
    base name, a directory as itself, ``dir/`` as its contents."""
    if src.endswith("/") and os.path.isdir(src):
        n = 0
        for p in Path(src).iterdir():
            n += _copy_in(str(p), sandbox)
        return n
    if not os.path.exists(src):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", src)
    target = sandbox / os.path.basename(src.rstrip("/"))
    if os.path.isdir(src):
        shutil.copytree(src, target, dirs_exist_ok=True)
        return sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    shutil.copy2(src, target)
    return target.stat().st_size


def _snapshot(sandbox: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sandbox.iterdir():
        try:
            st = p.stat()
            out[p.name] = (st.st_mtime_ns, st.st_size)
        except OSError:
            pass
    return out


def _changed(p: Path, snapshot: dict[str, tuple[int, int]]) -> bool:
    if p.name in ("_condor_stdout", "_condor_stderr", ".job.ad", ".machine.ad", ".chirp.config"):
        return False
    try:
        st = p.stat()
    except OSError:
        return False
    return snapshot.get(p.name) != (st.st_mtime_ns, st.st_size)


def _old_ad(attrs: dict[str, Any]) -> str:
    return "\n".join(f"{k} = {v if isinstance(v, Expr) else sub.literal(v)}" for k, v in attrs.items()) + "\n"


def _kill_session(pid: int | None, sandbox: str | None) -> None:
    """Kill what is left of a job's session after a daemon crash: processes
    whose session is ``pid`` and whose environment names the job's sandbox
    (so a reused pid is never taken for the job)."""
    if not pid:
        return
    marker = f"_CONDOR_SCRATCH_DIR={sandbox}".encode() if sandbox else None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) != pid:  # field 6: session id
                continue
            if marker is not None:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
            os.kill(int(entry), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pymw_magic.testing._condor_daemon")
    ap.add_argument("root")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--idle-timeout", type=float, default=600.0)
    ap.add_argument("--foreground", action="store_true")
    ap.add_argument("--detached", action="store_true", help="the launcher forked already")
    args = ap.parse_args(argv)
    root = Path(args.root)
    if not args.foreground and not args.detached:
        # the classic double fork: the launcher returns at once, the daemon
        # leads no terminal and is nobody's child to wait for
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
    lock_fd = os.open(root / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    # Clients start a daemon only when none answers (under a lock of theirs),
    # so a held lock here is a daemon on its way out: wait for it a while.
    deadline = time.monotonic() + 30
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                return 0  # another daemon serves this root
            time.sleep(0.05)
    os.set_inheritable(lock_fd, False)
    os.write(lock_fd, b"")
    with open(root / "daemon.pid", "w") as f:
        f.write(f"{os.getpid()}\n")
    if not args.foreground:
        log = os.open(root / "daemon.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.chdir("/")
    d = Daemon(root, args.slots, args.idle_timeout)
    try:
        d.serve()
    finally:
        try:
            os.unlink(root / "daemon.pid")
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
