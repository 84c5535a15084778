"""The stand-in schedd's job queue: clusters, procs, their ads, the journal.

Owns the data a schedd keeps: each cluster's submit description and item
data, each proc's job ad (cluster attributes shared, proc attributes on top),
late materialization (``max_idle``), the history, and the journal in the
schedd's root (``job_queue.log``: one JSON line per change, replayed and
compacted when the daemon starts, as the real schedd does with its own
``job_queue.log``) so the queue survives a daemon restart.  No processes
here: ``_condor_daemon`` runs the procs and writes the event log.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import classad2
import htcondor2

from . import _condor_submit as sub

IDLE, RUNNING, REMOVED, COMPLETED, HELD = 1, 2, 3, 4, 5

HOST = socket.gethostname() or "localhost"


class Expr(str):
    """An attribute value that is a ClassAd expression, not a literal."""


def enc_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes as JSON values (an expression as {"$e": text})."""
    return {k: ({"$e": str(v)} if v.__class__ is Expr else v) for k, v in attrs.items()}


def dec_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: (Expr(v["$e"]) if v.__class__ is dict and "$e" in v else v) for k, v in attrs.items()}


def ad_text(attrs: dict[str, Any], only: set[str] | None = None) -> str:
    """ClassAd text of ``attrs`` (``only``: lower-cased names to keep)."""
    parts = []
    for k, v in attrs.items():
        if only is not None and k.lower() not in only:
            continue
        parts.append(f"{k} = {v if v.__class__ is Expr else sub.literal(v)}")
    return "[ " + "; ".join(parts) + " ]"


def pick(job: dict[str, Any], base: dict[str, Any] | None, only: set[str] | None) -> dict[str, Any]:
    """The ad of a job (its own attributes over its cluster's), or only the
    attributes named in ``only`` (lower-cased)."""
    if only is None:
        out = dict(base) if base else {}
        out.update(job)
        return out
    out = {k: v for k, v in base.items() if k.lower() in only} if base else {}
    if out:
        lower = {k.lower(): k for k in out}
        for k, v in job.items():
            lk = k.lower()
            if lk in only:
                out.pop(lower.get(lk, k), None)
                out[k] = v
    else:
        out = {k: v for k, v in job.items() if k.lower() in only}
    return out


_PARSED: dict[str, tuple[Any, set[str] | None]] = {}


def _parsed(constraint: str) -> tuple[Any, set[str] | None]:
    """(the constraint's ExprTree or None when it does not parse, the
    lower-cased names it reads or None when unknown); cached."""
    if constraint not in _PARSED:
        if len(_PARSED) > 256:
            _PARSED.clear()
        try:
            tree = classad2.ExprTree(constraint)
        except classad2.ClassAdException:
            _PARSED[constraint] = (None, None)
            return _PARSED[constraint]
        try:
            names = classad2.ClassAd().externalRefs(tree)
            refs = {n.rsplit(".", 1)[-1].lower() for n in names}
        except classad2.ClassAdException:
            refs = None
        _PARSED[constraint] = (tree, refs)
    return _PARSED[constraint]


def matches(constraint: str | None, job: dict[str, Any], base: dict[str, Any] | None = None) -> bool:
    """The constraint evaluated by classad2 in the job's ad (``job`` over
    ``base``): only a true boolean matches (undefined and error do not), as
    on the schedd."""
    c = (constraint or "").strip()
    if c == "" or c.lower() == "true":
        return True
    tree, refs = _parsed(c)
    if tree is None:
        return False
    attrs = None
    if refs is not None:
        # only what the constraint reads goes into the ad it is evaluated in
        # (ten times faster on a 10,000-proc queue); an attribute that is an
        # expression may read others, so then the whole ad goes
        attrs = pick(job, base, refs)
        if any(v.__class__ is Expr for v in attrs.values()):
            attrs = None
    if attrs is None:
        attrs = pick(job, base, None)
    try:
        return tree.eval(classad2.ClassAd(ad_text(attrs))) is True
    except classad2.ClassAdException:
        return False


def check_expression(text: str, what: str) -> None:
    try:
        classad2.ExprTree(text)
    except classad2.ClassAdException:
        raise htcondor2.HTCondorException(f"Parse error in expression for {what}: {text!r}") from None


class Cluster:
    """One submit: the description, its items, and the attributes its procs share."""

    def __init__(self, rec: dict[str, Any]):
        self.rec = rec
        self.id: int = rec["id"]
        self.submit: dict[str, str] = rec["submit"]
        self.lower = {k.lower(): k for k in self.submit}
        self.keys: list[str] = rec["keys"]
        self.rows: list[list[str]] = rec["rows"]
        self.count: int = rec["count"]
        self.nprocs: int = rec["nprocs"]
        self.materialized: int = rec.get("materialized", 0)
        self.cwd: str = rec["cwd"]
        self.spool: bool = rec["spool"]
        self.base: dict[str, Any] = dec_attrs(rec["base"])
        self.dynamic: set[str] = {k.lower() for k, v in self.submit.items() if "$" in v}
        #: the translation rules a proc runs again: those reading a key with a macro
        self.dynamic_rules = rules_for(self.dynamic)
        #: custom attributes holding a macro: expanded per proc
        self.dynamic_custom = {k: v for k, v in self.submit.items() if is_custom(k) and "$" in v}
        self._submit_obj: htcondor2.Submit | None = None
        #: procs of this cluster now in the queue
        self.in_queue = 0
        #: procs below this one have all left the queue
        self.scan_from = 0

    def raw(self, key: str) -> str | None:
        k = self.lower.get(key.lower())
        return None if k is None else self.submit[k]

    def submit_obj(self) -> htcondor2.Submit:
        if self._submit_obj is None:
            self._submit_obj = htcondor2.Submit("\n".join(f"{k} = {v}" for k, v in self.submit.items()))
        return self._submit_obj

    def item_vars(self, proc: int) -> dict[str, str]:
        if not self.rows:
            return {}
        row = self.rows[proc // self.count]
        return dict(zip(self.keys, row))

    def expander(self, proc: int):
        """A lookup of submit keys with macros expanded for ``proc``, by
        htcondor2's own expansion."""
        s = self.submit_obj()
        step = proc % self.count
        row = proc // self.count
        values = {"ClusterId": str(self.id), "Cluster": str(self.id), "ProcId": str(proc),
                  "Process": str(proc), "Step": str(step), "Row": str(row), "Node": "#pArAlLeLnOdE#"}
        values.update(self.item_vars(proc))
        for k, v in values.items():
            s[k] = v

        def lookup(key: str) -> str | None:
            k = self.lower.get(key.lower())
            if k is None:
                return None
            v = self.submit[k]
            return s.expand(k) if "$" in v else v
        return lookup


# Submit keys -> job attributes: a table of (the submit keys a rule reads,
# the rule).  A rule takes the expanding lookup and the submitter's cwd and
# returns attributes.  Per proc only the rules reading a key that holds a
# macro run again (so 10,000 procs cost 10,000 small expansions).
_ALIASES = {
    "arguments": ("arguments", "args"), "environment": ("environment", "env"),
    "initialdir": ("initialdir", "initial_dir", "iwd"), "output": ("output", "stdout"),
    "error": ("error", "stderr"), "input": ("input", "stdin"),
}
_IWD_KEYS = _ALIASES["initialdir"]


def _get(lookup, key: str) -> str | None:
    for k in _ALIASES.get(key, (key,)):
        v = lookup(k)
        if v is not None and v.strip() != "":
            return v.strip()
    return None


def _iwd(lookup, cwd: str) -> str:
    iwd = _get(lookup, "initialdir")
    return os.path.normpath(os.path.join(cwd, iwd)) if iwd else cwd


def _r_iwd(lookup, cwd):
    return {"Iwd": _iwd(lookup, cwd)}


def _r_executable(lookup, cwd):
    exe = _get(lookup, "executable")
    if exe is None:
        raise htcondor2.HTCondorException("ERROR: No 'executable' parameter was provided")
    transfer = sub.truthy(lookup("transfer_executable"), True)
    if transfer or "/" in exe:
        # condor_submit resolves the executable against its own directory
        exe = os.path.normpath(os.path.join(cwd, exe))
    return {"Cmd": exe, "TransferExecutable": transfer}


def _r_arguments(lookup, cwd):
    return {"Arguments": sub.v2_join(sub.parse_arguments(_get(lookup, "arguments")))}


def _r_environment(lookup, cwd):
    return {"Environment": sub.v2_env(sub.parse_environment(_get(lookup, "environment")))}


def _r_std(key, attr):
    return lambda lookup, cwd: {attr: _get(lookup, key) or "/dev/null"}


def _r_log(lookup, cwd):
    log = _get(lookup, "log")
    return {"UserLog": os.path.normpath(os.path.join(_iwd(lookup, cwd), log))} if log else {}


def _r_inputs(lookup, cwd):
    v = _get(lookup, "transfer_input_files")
    return {"TransferInput": ",".join(sub.file_list(v))} if v else {}


def _r_outputs(lookup, cwd):
    v = lookup("transfer_output_files")
    return {"TransferOutput": ",".join(sub.file_list(v))} if v is not None else {}


def _r_remaps(lookup, cwd):
    v = _get(lookup, "transfer_output_remaps")
    if not v:
        return {}
    sub.parse_remaps(v)
    return {"TransferOutputRemaps": v[1:-1] if v.startswith('"') and v.endswith('"') else v}


def _r_upper(key, attr, default):
    return lambda lookup, cwd: {attr: (_get(lookup, key) or default).upper()}


def _r_cpus(lookup, cwd):
    v = _get(lookup, "request_cpus")
    return {"RequestCpus": int(v) if v and v.isdigit() else (Expr(v) if v else 1)}


def _r_size(key, attr, unit_kb, default):
    def rule(lookup, cwd):
        v = sub.size_in(_get(lookup, key), unit_kb, default)
        return {attr: Expr(v) if isinstance(v, str) else v}
    return rule


def _r_string(key, attr):
    def rule(lookup, cwd):
        v = _get(lookup, key)
        return {attr: v} if v else {}
    return rule


def _r_int(key, attr):
    def rule(lookup, cwd):
        v = _get(lookup, key)
        if not v:
            return {}
        try:
            return {attr: int(v)}
        except ValueError:
            raise htcondor2.HTCondorException(f"ERROR: {key} = {v!r} is not an integer") from None
    return rule


def _r_expr(key, attr):
    def rule(lookup, cwd):
        v = _get(lookup, key)
        if not v:
            return {}
        check_expression(v, key)
        return {attr: Expr(v)}
    return rule


def _r_universe(lookup, cwd):
    u = (_get(lookup, "universe") or "vanilla").lower()
    return {"JobUniverse": {"vanilla": 5, "container": 5, "docker": 5, "local": 12, "scheduler": 7}.get(u, 5)}


def _r_container(lookup, cwd):
    v = _get(lookup, "container_image") or _get(lookup, "docker_image")
    return {"ContainerImage": v} if v else {}


RULES: list[tuple[tuple[str, ...], Any]] = [
    (_IWD_KEYS, _r_iwd),
    (("executable", "transfer_executable"), _r_executable),
    (_ALIASES["arguments"], _r_arguments),
    (_ALIASES["environment"], _r_environment),
    (_ALIASES["output"], _r_std("output", "Out")),
    (_ALIASES["error"], _r_std("error", "Err")),
    (_ALIASES["input"], _r_std("input", "In")),
    (("log",) + _IWD_KEYS, _r_log),
    (("transfer_input_files",), _r_inputs),
    (("transfer_output_files",), _r_outputs),
    (("transfer_output_remaps",), _r_remaps),
    (("should_transfer_files",), _r_upper("should_transfer_files", "ShouldTransferFiles", "IF_NEEDED")),
    (("when_to_transfer_output",), _r_upper("when_to_transfer_output", "WhenToTransferOutput", "ON_EXIT")),
    (("request_cpus",), _r_cpus),
    (("request_memory",), _r_size("request_memory", "RequestMemory", 1024, 128)),
    (("request_disk",), _r_size("request_disk", "RequestDisk", 1, 1048576)),
    (("submit_event_notes",), _r_string("submit_event_notes", "SubmitEventNotes")),
    (("batch_name",), _r_string("batch_name", "JobBatchName")),
    (("getenv",), _r_string("getenv", "GetEnv")),
    (("universe",), _r_universe),
    (("container_image", "docker_image"), _r_container),
] + [((key,), _r_int(key, attr)) for key, attr in (
    ("allowed_execute_duration", "AllowedExecuteDuration"), ("allowed_job_duration", "AllowedJobDuration"),
    ("max_idle", "JobMaterializeMaxIdle"), ("max_materialize", "JobMaterializeLimit"), ("priority", "JobPrio"))
] + [((key,), _r_expr(key, attr)) for key, attr in (
    ("on_exit_hold", "OnExitHold"), ("on_exit_remove", "OnExitRemove"),
    ("on_exit_hold_reason", "OnExitHoldReason"), ("on_exit_hold_subcode", "OnExitHoldSubCode"),
    ("periodic_hold", "PeriodicHold"), ("periodic_release", "PeriodicRelease"),
    ("periodic_remove", "PeriodicRemove"), ("requirements", "Requirements"),
    ("max_transfer_output_mb", "MaxTransferOutputMB"))
]


def rules_for(keys: set[str] | None) -> list:
    """The rules reading any of ``keys`` (lower-cased submit keys); all for None."""
    if keys is None:
        return [r for _, r in RULES]
    return [r for names, r in RULES if any(n in keys for n in names)]


def translate(lookup, cluster_cwd: str, rules: list | None = None) -> dict[str, Any]:
    """The job attributes condor_submit writes for the submit keys (every
    rule, or only ``rules``)."""
    a: dict[str, Any] = {}
    for rule in (rules_for(None) if rules is None else rules):
        a.update(rule(lookup, cluster_cwd))
    return a


def custom_attrs(submit: dict[str, str], lookup: Any = None) -> dict[str, Any]:
    """``+Name = expr`` and ``MY.Name = expr`` lines, as the ad's own
    attributes; one holding a macro (``MY.Chunk = $(chunk)``) expanded by
    ``lookup`` (a proc's expander), as condor_submit does per proc."""
    out: dict[str, Any] = {}
    for k, v in submit.items():
        if k.upper().startswith("MY.") or k.startswith("+"):
            name = k[3:] if k.upper().startswith("MY.") else k[1:]
            if "$" in v and lookup is not None:
                v = lookup(k) or ""
            check_expression(v, k)
            out[name] = Expr(v)
    return out


def is_custom(key: str) -> bool:
    return key.upper().startswith("MY.") or key.startswith("+")


class Queue:
    """The queue and the history, journaled under ``root``."""

    def __init__(self, root: Path):
        self.root = root
        self.clusters: dict[int, Cluster] = {}
        self.jobs: dict[tuple[int, int], dict[str, Any]] = {}
        self.runinfo: dict[tuple[int, int], dict[str, Any]] = {}
        self.faults: list[dict[str, Any]] = []
        self.next_cluster = 1
        self.journal_path = root / "job_queue.log"
        self.history_path = root / "history"
        self._pending: list[str] = []
        self._history_pending: list[str] = []
        self._history_bases: set[int] = set()
        self.records_since_compaction = 0

    # -- journal -------------------------------------------------------------
    def load(self) -> None:
        if self.journal_path.exists():
            with open(self.journal_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line: the daemon died mid-write
                    self._apply(rec)
        self.compact()

    def _apply(self, rec: dict[str, Any]) -> None:
        op = rec["op"]
        if op == "cluster":
            self.clusters[rec["id"]] = Cluster(rec)
            self.next_cluster = max(self.next_cluster, rec["id"] + 1)
        elif op == "next":
            self.next_cluster = max(self.next_cluster, rec["n"])
        elif op == "mat":
            c = self.clusters.get(rec["c"])
            if c is not None:
                c.materialized = max(c.materialized, rec["p"] + 1)
                if (rec["c"], rec["p"]) not in self.jobs:
                    c.in_queue += 1
            self.jobs[(rec["c"], rec["p"])] = dec_attrs(rec["a"])
        elif op == "mats":
            for p, a in rec["procs"]:
                self._apply({"op": "mat", "c": rec["c"], "p": p, "a": a})
        elif op == "factory_end":
            c = self.clusters.get(rec["c"])
            if c is not None:
                c.nprocs = c.rec["nprocs"] = rec["n"]
        elif op == "set":
            j = self.jobs.get((rec["c"], rec["p"]))
            if j is not None:
                _update(j, dec_attrs(rec["a"]))
        elif op == "gone":
            if self.jobs.pop((rec["c"], rec["p"]), None) is not None and rec["c"] in self.clusters:
                self.clusters[rec["c"]].in_queue -= 1
            self.runinfo.pop((rec["c"], rec["p"]), None)
            self._drop_cluster_if_done(rec["c"])
        elif op == "run":
            if rec.get("info") is None:
                self.runinfo.pop((rec["c"], rec["p"]), None)
            else:
                self.runinfo[(rec["c"], rec["p"])] = rec["info"]
        elif op == "faults":
            self.faults = rec["faults"]

    def _drop_cluster_if_done(self, cid: int) -> None:
        c = self.clusters.get(cid)
        if c is not None and c.materialized >= c.nprocs and c.in_queue <= 0:
            del self.clusters[cid]

    def compact(self) -> None:
        """Rewrite the journal as the current state (at start, and when it grew long)."""
        self.records_since_compaction = 0
        tmp = self.journal_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps({"op": "next", "n": self.next_cluster}) + "\n")
            for c in self.clusters.values():
                rec = dict(c.rec, materialized=c.materialized)
                f.write(json.dumps(rec) + "\n")
            for (cid, p), attrs in sorted(self.jobs.items()):
                f.write(json.dumps({"op": "mat", "c": cid, "p": p, "a": enc_attrs(attrs)}) + "\n")
            for (cid, p), info in self.runinfo.items():
                f.write(json.dumps({"op": "run", "c": cid, "p": p, "info": info}) + "\n")
            f.write(json.dumps({"op": "faults", "faults": self.faults}) + "\n")
        os.replace(tmp, self.journal_path)

    def log(self, rec: dict[str, Any]) -> None:
        self._pending.append(json.dumps(rec))

    def flush(self) -> None:
        """Write the journal records (and history lines) of one step of the
        daemon in one go."""
        if self._history_pending:
            # the history first: a job gone from the journal is already in it
            data = ("\n".join(self._history_pending) + "\n").encode()
            self._history_pending.clear()
            fd = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
        if not self._pending:
            return
        data = ("\n".join(self._pending) + "\n").encode()
        self.records_since_compaction += len(self._pending)
        self._pending.clear()
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)

    # -- changes ---------------------------------------------------------------
    def new_cluster(self, rec: dict[str, Any]) -> Cluster:
        rec = dict(rec, op="cluster", id=self.next_cluster)
        self.next_cluster += 1
        c = Cluster(rec)
        self.clusters[c.id] = c
        self.log({"op": "next", "n": self.next_cluster})
        self.log(rec)
        return c

    def materialize(self, c: Cluster, proc: int, attrs: dict[str, Any], batch: list) -> None:
        """A proc enters the queue; its journal record waits in ``batch``
        for log_materialized (one record for a whole batch)."""
        if (c.id, proc) not in self.jobs:
            c.in_queue += 1
        self.jobs[(c.id, proc)] = attrs
        c.materialized = max(c.materialized, proc + 1)
        batch.append((proc, attrs))

    def end_factory(self, c: Cluster) -> None:
        """No more procs of ``c`` will materialize."""
        c.nprocs = c.materialized
        c.rec["nprocs"] = c.nprocs
        self.log({"op": "factory_end", "c": c.id, "n": c.nprocs})
        self._drop_cluster_if_done(c.id)

    def log_materialized(self, c: Cluster, batch: list) -> None:
        if batch:
            self.log({"op": "mats", "c": c.id, "procs": [[p, enc_attrs(a)] for p, a in batch]})

    def set(self, key: tuple[int, int], journal: bool = True, **attrs: Any) -> None:
        """Change attributes of a job; None deletes one (as the schedd
        deletes RemoteHost when a job stops running).  ``journal=False``: the
        job leaves the queue in this same step, the history keeps the change."""
        _update(self.jobs[key], attrs)
        if journal:
            self.log({"op": "set", "c": key[0], "p": key[1], "a": enc_attrs(attrs)})

    def set_run(self, key: tuple[int, int], info: dict[str, Any] | None) -> None:
        if info is None:
            self.runinfo.pop(key, None)
        else:
            self.runinfo[key] = info
        self.log({"op": "run", "c": key[0], "p": key[1], "info": info})

    def set_faults(self) -> None:
        self.log({"op": "faults", "faults": self.faults})

    def leave(self, key: tuple[int, int]) -> None:
        """The job leaves the queue for the history."""
        c = self.clusters[key[0]]
        job = self.jobs.pop(key, None)
        if job is not None:
            c.in_queue -= 1
        self.runinfo.pop(key, None)
        self.log({"op": "gone", "c": key[0], "p": key[1]})
        # the history holds each cluster's shared attributes once, then each job's own
        if key[0] not in self._history_bases:
            self._history_bases.add(key[0])
            self._history_pending.append(json.dumps({"$base": key[0], "a": enc_attrs(c.base)}))
        self._history_pending.append(json.dumps({"$c": key[0], "a": enc_attrs(job or {})}))
        self._drop_cluster_if_done(key[0])

    # -- reading ---------------------------------------------------------------
    def ad(self, key: tuple[int, int]) -> dict[str, Any]:
        c = self.clusters[key[0]]
        out = dict(c.base)
        out.update(self.jobs[key])
        return out

    def history(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(job's own attributes, its cluster's) of the history, most
        recently recorded first."""
        if not self.history_path.exists():
            return
        bases: dict[int, dict[str, Any]] = {}
        jobs: list[tuple[int, dict[str, Any]]] = []
        with open(self.history_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line of a daemon that died writing it
                if "$base" in rec:
                    bases[rec["$base"]] = rec["a"]
                elif "$c" in rec:
                    jobs.append((rec["$c"], rec["a"]))
        decoded: dict[int, dict[str, Any]] = {}
        for cid, attrs in reversed(jobs):
            if cid not in decoded:
                decoded[cid] = dec_attrs(bases.get(cid, {}))
            yield dec_attrs(attrs), decoded[cid]


def _update(attrs: dict[str, Any], changes: dict[str, Any]) -> None:
    for k, v in changes.items():
        if v is None:
            attrs.pop(k, None)
        else:
            attrs[k] = v


def owner() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): the uid is the name
        return str(os.getuid())


def now() -> int:
    return int(time.time())
