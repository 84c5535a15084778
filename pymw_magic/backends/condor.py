"""The HTCondor backend: one cluster per submission, followed through the
job's event log.

::

    BatchBackend (batch.py)                  this module                         HTCondor
    ──────────────────────                   ───────────                         ────────
    submit(job, chunks) ──▶ htcondor2.Submit(description) + itemdata [{chunk: i}] ─▶ Schedd.submit
                                              (transfer on, log = <job dir>/events.log,
                                               submit_event_notes = "pymw chunk <i>")
    poll_events() ◀──────── htcondor2.JobEventLog(events.log).events(stop_after) ◀── the schedd writes
                              execute / terminated / held / released / evicted / aborted
    safety_check() ◀─────── Schedd.query (at most once a minute): procs gone without an event
    remove(procs) ────────▶ Schedd.act(JobAction.Remove, ["c.p", ...])

Who does what: this module owns the HTCondor side only — options, the
submit description, translating event-log events into
:class:`~pymw_magic.backends.batch.BatchEvent`, removing procs, how the
schedd is recorded so that ``attach`` reconnects (a name/address, or an
object's ``__reduce__`` when it gives a class and JSON-able arguments,
never a pickle) and the event log's offset.  Chunking, task states,
retries and the store belong to ``batch.py``.  ``htcondor2`` is imported
when the backend is used (extra ``condor``).
"""

from __future__ import annotations

import ast
import importlib
import json
import logging
import math
import os
import re
import time
import weakref
from typing import Any, ClassVar, Iterable

from ..errors import PymwError, TaskFailed
from ..policies import resolve_name
from .base import Option
from .batch import (BATCH_OPTIONS, MAX_OUTPUT_MB, BackendMissing, BatchBackend, BatchError, BatchEvent, Chunk,
                    JobState)

#: HTCondor's hold code for a job past its ``allowed_execute_duration``
HOLD_DURATION_EXCEEDED = 47
#: an eviction's code when the starter ended the claim (a real starter
#: enforcing ``allowed_execute_duration`` evicts with it, then the proc runs again)
EVICT_CLAIM_DEACTIVATED = 1009
#: an eviction's code when the output transfer failed (a hold with the same code follows)
TRANSFER_OUTPUT_FAILED = 12
#: the hold code of a proc whose output files are over ``max_transfer_output_mb``
HOLD_OUTPUT_TOO_LARGE = 33
#: MiB allowed to a proc's stdout and stderr files beyond ``max_output_mb``
#: (HTCondor's ``max_transfer_output_mb`` counts every file sent back)
STD_FILES_MB = 16
#: seconds allowed beyond ``timeout`` x tasks for starting Python on the node
TIMEOUT_SLACK = 5
#: a chunk index in the description's template (replaced by ``$(chunk)``)
_SENTINEL = 987654321
#: HTCondor's JobStatus values
IDLE, RUNNING, REMOVED, COMPLETED, HELD = 1, 2, 3, 4, 5
#: the hold of a spooled proc waiting for its inputs (not the user's: spool() releases it)
HOLD_SPOOLING_INPUT = 16
#: the job directory's folder of spooled procs' logs (brought back by retrieve)
SPOOL_LOGS = "logs"
#: times retrieving a completed spooled proc's output is tried before its chunk fails
RETRIEVE_TRIES = 3
#: what a spooled job's procs are followed by (the queue, not the log)
SPOOL_PROJECTION = ["ClusterId", "ProcId", "JobStatus", "PymwJob", "PymwChunk", "NumJobStarts", "RemoteHost",
                    "LastRemoteHost", "HoldReason", "HoldReasonCode", "HoldReasonSubCode", "ExitCode",
                    "ExitBySignal", "ExitSignal", "RemoveReason"]

_log = logging.getLogger("pymw_magic")


def _own_transfer_limit(submit: dict[str, Any] | None) -> tuple[str, str] | None:
    """(key, value) of the user's own ``max_transfer_output_mb`` in a submit
    dict (a command's name is not case sensitive; ``My.MaxTransferOutputMB``
    or ``+MaxTransferOutputMB`` set the attribute itself), else None."""
    for key, value in (submit or {}).items():
        name = str(key).lower().removeprefix("+").removeprefix("my.")
        if name in ("max_transfer_output_mb", "maxtransferoutputmb"):
            return str(key), str(value)
    return None


class JobHeld(TaskFailed):
    """HTCondor held the task's proc (a missing input, a failed transfer, a
    policy): the proc was removed.  ``hold_reason``, ``hold_reason_code`` and
    ``hold_reason_subcode`` are HTCondor's ``HoldReason``, ``HoldReasonCode``
    and ``HoldReasonSubCode``."""

    def __init__(self, message: str, hold_reason: str = "", hold_reason_code: int | None = None,
                 hold_reason_subcode: int | None = None):
        super().__init__(message)
        self.hold_reason = hold_reason
        self.hold_reason_code = hold_reason_code
        self.hold_reason_subcode = hold_reason_subcode

    # HTCondor's own names, as in the job ad
    HoldReason = property(lambda self: self.hold_reason)
    HoldReasonCode = property(lambda self: self.hold_reason_code)
    HoldReasonSubCode = property(lambda self: self.hold_reason_subcode)

    def __reduce__(self) -> tuple:
        return (type(self), (self.args[0] if self.args else "", self.hold_reason, self.hold_reason_code,
                             self.hold_reason_subcode))


def htcondor() -> Any:
    """The ``htcondor2`` bindings, or :class:`BackendMissing` saying what to install."""
    try:
        import htcondor2
    except ImportError as exc:
        raise BackendMissing("the condor backend needs HTCondor's Python bindings (htcondor2): "
                             "pip install 'pymw-magic[condor]'") from exc
    return htcondor2


# --- options ----------------------------------------------------------------------------------
#: ``module.path:Class(arguments)``: a schedd object named in text (a command line)
_LOCATOR = re.compile(r"^\s*([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)\((.*)\)\s*$", re.DOTALL)


def schedd_from_locator(text: str) -> Any:
    """A schedd object named in text, as the job store records one, for a
    command line (``python script.py --schedd ...``) where no notebook
    variable holds it: ``module.path:Class(arguments)`` — the arguments
    Python literals (``'/srv/standin'``), or one bare string
    (``pymw_magic.testing.condor:StandInSchedd(/srv/standin)``) — or the
    store's own JSON record (``{"kind": "object", "class": ..., "args": [...]}``).
    None when ``text`` is neither (a schedd's name or address)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            record = json.loads(text)
        except ValueError:
            return None
        if isinstance(record, dict) and record.get("kind") == "object":
            return schedd_from_record(record)
        return None
    m = _LOCATOR.match(text)
    if m is None:
        return None
    module, qualname, inner = m.groups()
    args: tuple
    try:
        args = ast.literal_eval(f"({inner},)") if inner.strip() else ()
    except (ValueError, SyntaxError):
        args = (inner.strip(),)  # (an unquoted path)
    return schedd_from_record({"kind": "object", "class": f"{module}:{qualname}", "args": list(args)})


def _schedd(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:  # a notebook name (%pymw use condor --schedd standin) names its object
            value = resolve_name(text)
        except KeyError:
            try:
                located = schedd_from_locator(text)
            except (ImportError, AttributeError, TypeError) as exc:
                raise ValueError(f"{text!r} names a schedd class that cannot be made: {exc}") from None
            if located is None:
                return text or None
            value = located
        if value is None or isinstance(value, str):
            return value or None
    for method in ("submit", "act", "query"):
        if not callable(getattr(value, method, None)):
            raise ValueError(f"a schedd is a name or address, or an object with the htcondor2.Schedd "
                             f"methods submit, act and query; {type(value).__name__} has no {method}()")
    return value


def _schedd_ok(value: Any) -> bool:
    return value is None or isinstance(value, str) or all(
        callable(getattr(value, m, None)) for m in ("submit", "act", "query"))


def _environment(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    text = str(value).strip()
    if text.startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    out = {}
    for part in text.split():
        key, sep, val = part.partition("=")
        if not sep or not key:
            raise ValueError(f"environment entries are NAME=VALUE, not {part!r}")
        out[key] = val
    return out


def _files(value: Any) -> list[str]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(p) for p in value]


def _submit_dict(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError("submit is a dict of submit commands (or its JSON)")
    if any(str(k).lower() == "queue" for k in value):
        raise ValueError("submit cannot hold 'queue': the backend queues one proc per chunk")
    return {str(k): str(v) for k, v in value.items()}


def _positive(n: Any) -> bool:
    return n is None or n >= 1


class CondorBackend(BatchBackend):
    """``Master("condor", schedd=None, pool=None, ...)``: see :attr:`options`."""

    name = "condor"
    scheduling_delay: ClassVar[float] = 10.0  # about one negotiation cycle
    #: seconds between two reads of the queue for spooled jobs (their event
    #: logs are in the schedd's spool: the queue is the only news of them)
    spool_interval: ClassVar[float] = 3.0
    options = {
        "schedd": Option("schedd", _schedd, None, "schedd name or address (default: the local schedd), or "
                         "an object with the htcondor2.Schedd methods (e.g. the stand-in: a notebook "
                         "variable, or module:Class(args) such as "
                         "pymw_magic.testing.condor:StandInSchedd(/path/to/root))",
                         check=_schedd_ok, requirement="a schedd name or address, or an object with the "
                         "htcondor2.Schedd methods submit, act and query"),
        "pool": Option("pool", str, None, "collector address (default: the configured one)"),
        "request_cpus": Option("request_cpus", int, None, "CPUs per proc", check=_positive,
                               requirement="a whole number >= 1"),
        "request_memory": Option("request_memory", str, None, "memory per proc (e.g. 2GB)"),
        "request_disk": Option("request_disk", str, None, "disk per proc (e.g. 1GB)"),
        "requirements": Option("requirements", str, None, "ClassAd requirements expression"),
        "python": Option("python", str, "python3", "interpreter on the execute node (same minor version)"),
        "container_image": Option("container_image", str, None, "run in this container (container universe)"),
        "environment": Option("environment", _environment, None, "environment of the procs (NAME=VALUE ...)"),
        "transfer_files": Option("transfer_files", _files, None, "extra input files sent with every proc"),
        "submit": Option("submit", _submit_dict, None, "further submit commands (a dict)",
                         check=lambda d: d is None or (isinstance(d, dict) and not any(
                             str(k).lower() == "queue" for k in d)),
                         requirement="a dict of submit commands without 'queue' (one proc per chunk is queued)"),
        "spool": Option("spool", bool, False, "spool inputs to a remote schedd and retrieve outputs"),
        "max_idle": Option("max_idle", int, None, "at most this many idle procs (late materialization)",
                           check=_positive, requirement="a whole number >= 1"),
        "chunksize": Option("chunksize", int, None, "tasks per proc (default: automatic)", check=_positive,
                            requirement="a whole number >= 1"),
        "trusted_results": Option("trusted_results", bool, False, "results come back pickled (any Python "
                                  "object), for execute nodes you control; default: plain data only (JSON, "
                                  "NumPy arrays), never unpickled"),
        **BATCH_OPTIONS,
    }

    def __init__(self, scheduler: Any, workers: int, key: bytes, *, schedd: Any = None, pool: str | None = None,
                 request_cpus: int | None = None, request_memory: str | None = None,
                 request_disk: str | None = None, requirements: str | None = None, python: str = "python3",
                 container_image: str | None = None, environment: dict[str, str] | None = None,
                 transfer_files: list[str] | None = None, submit: dict[str, str] | None = None,
                 spool: bool = False, max_idle: int | None = None, chunksize: int | None = None,
                 trusted_results: bool = False, max_output_mb: float = MAX_OUTPUT_MB):
        self.htcondor = htcondor()
        super().__init__(scheduler, workers, key, chunksize=chunksize, trusted_results=trusted_results,
                         max_output_mb=max_output_mb)
        self.pool = pool
        self.schedd_spec = schedd
        self.schedd = connect_schedd(schedd, pool)
        # proc -> its allowed_execute_duration, and when it last began
        # executing: an eviction past the limit is the timeout
        self._limits: dict[tuple[int, int], int] = {}
        self._began: dict[tuple[int, int], float] = {}
        self.python = python or "python3"
        self.spool = bool(spool)
        self.settings = {"request_cpus": request_cpus, "request_memory": request_memory,
                         "request_disk": request_disk, "requirements": requirements,
                         "container_image": container_image, "environment": environment,
                         "transfer_files": transfer_files, "submit": submit, "max_idle": max_idle}
        self._logs: dict[int, Any] = {}   # id(JobState) -> JobEventLog
        # spooled jobs: what the queue last said of each proc, procs whose
        # outputs were retrieved, failed retrieves, when the queue is next read
        self._seen: dict[tuple[int, int], tuple[int, int]] = {}
        self._retrieved: set[tuple[int, int]] = set()
        self._retrieve_failures: dict[tuple[int, int], int] = {}
        self._spool_polled: weakref.WeakSet[JobState] = weakref.WeakSet()  # (never a reused id)
        self._spool_due = 0.0
        self._log_ids: dict[int, tuple[int, int]] = {}  # id(JobState) -> the log's (device, inode)
        # (the schedd is recorded apart, by schedd_record: never as an option)
        self.backend_options = dict(self.settings, pool=pool, python=self.python, spool=self.spool,
                                    chunksize=chunksize, trusted_results=self.trusted_results,
                                    max_output_mb=self.max_output_mb)

    # --- the submit description ----------------------------------------------------------------
    def description(self, state: JobState, timeout: float | None) -> dict[str, str]:
        """The submit description of a job's chunks, ``$(chunk)`` standing
        for each proc's chunk index (and ``$(limit)`` for its time limit)."""
        jd = state.dir
        inv = jd.invocation(_SENTINEL, python=self.python)

        def t(text: Any) -> str:
            return str(text).replace(str(_SENTINEL), "$(chunk)")

        args = [t(a) for a in inv.arguments]
        if os.path.isabs(inv.executable):
            executable = inv.executable
        else:  # a name to look up on the execute node's PATH
            executable, args = "/usr/bin/env", [inv.executable] + args
        inputs = [t(p) for p in inv.inputs] + [os.path.abspath(p) for p in (self.settings["transfer_files"] or [])]
        outputs = [t(o) for o in inv.outputs]
        out_dir = jd.output_path(_SENTINEL).parent
        d: dict[str, str] = {
            "universe": "vanilla",
            "executable": executable,
            "transfer_executable": "false",
            "arguments": _arguments(args),
            "initialdir": str(jd.path),
            "should_transfer_files": "YES",
            "when_to_transfer_output": "ON_EXIT_OR_EVICT",
            "transfer_input_files": ",".join(inputs),
            "transfer_output_files": ",".join(outputs),
            "transfer_output_remaps": '"' + ";".join(f"{o} = {out_dir / o}" for o in outputs) + '"',
            "output": str(out_dir / "$(chunk).stdout"),
            "error": str(out_dir / "$(chunk).stderr"),
            "log": str(jd.log_path),
            "submit_event_notes": "pymw chunk $(chunk)",
            "My.PymwJob": f'"{jd.path.name}"',
            "My.PymwChunk": "$(chunk)",
        }
        if self._spooled(state):
            # A schedd moves a spooled proc's log into its spool and
            # retrieve() copies it back over this path, proc after proc: one
            # file per chunk (for reading after the fact; the job is followed
            # through the queue)
            d["log"] = str(jd.path / SPOOL_LOGS / "$(chunk).log")
        s = self.settings
        for key in ("request_cpus", "request_memory", "request_disk", "requirements", "max_idle"):
            if s[key] is not None:
                d[key] = str(s[key])
        if s["container_image"]:
            d["universe"] = "container"
            d["container_image"] = s["container_image"]
        if s["environment"]:
            d["environment"] = _environment_text(s["environment"])
        if timeout:
            d["allowed_execute_duration"] = "$(limit)"
        # An output over the cap is refused when read; this keeps it from
        # reaching this machine's disk at all (the proc is held instead).
        # (unless the user's submit sets it, in whatever case or as the attribute:
        # two spellings of one command would leave which one wins to chance)
        if _own_transfer_limit(s["submit"]) is None:
            d["max_transfer_output_mb"] = str(math.ceil(self.max_output_mb) + STD_FILES_MB)
        d.update(s["submit"] or {})
        return d

    def submit(self, state: JobState, chunks: list[Chunk]) -> list[Any]:
        htcondor2 = self.htcondor
        timeout = state.job.timeout
        description = self.description(state, timeout)
        items = []
        for c in chunks:
            item = {"chunk": str(c.index)}
            if timeout:
                item["limit"] = str(int(math.ceil(timeout * len(c.seqs))) + TIMEOUT_SLACK)
            items.append(item)
        spool = self._spooled(state)
        result = self.schedd.submit(htcondor2.Submit(description), itemdata=iter(items), spool=spool)
        cluster, first = int(result.cluster()), int(result.first_proc())
        if spool:
            try:
                self.schedd.spool(result)
            except BaseException as exc:
                # (its procs would wait on hold for inputs that never come)
                try:
                    self.schedd.act(htcondor2.JobAction.Remove, f"ClusterId == {cluster}",
                                    reason="pymw: spooling its inputs failed")
                except Exception as again:
                    _log.warning("pymw-magic: condor: removing cluster %d after a failed spool failed: %s",
                                 cluster, again)
                if not isinstance(exc, Exception):
                    raise
                raise BatchError(f"spool=True: sending the inputs of cluster {cluster} (job {state.job.name!r}) "
                                 f"to the schedd's spool failed: {exc}; the cluster was removed") from exc
        for k, item in enumerate(items):
            if "limit" in item:
                self._limits[(cluster, first + k)] = int(item["limit"])
        state.engine.setdefault("clusters", [])
        if cluster not in state.engine["clusters"]:
            state.engine["clusters"].append(cluster)
        return [(cluster, first + k) for k in range(len(chunks))]

    def remove(self, state: JobState, procs: list[Any], reason: str) -> None:
        self.schedd.act(self.htcondor.JobAction.Remove, [f"{c}.{p}" for c, p in procs], reason=reason)


    def hold_is_final(self, event: BatchEvent) -> bool:
        # the same tasks write the same output: a retry is held again
        return event.code == HOLD_OUTPUT_TOO_LARGE

    def held_error(self, chunk: Chunk, event: BatchEvent) -> BaseException:
        hint = ""
        own = _own_transfer_limit(self.settings["submit"])
        sent = re.search(r"first failure: sending file (.*?): max total", event.reason or "")
        std = sent and os.path.basename(sent.group(1)) in ("_condor_stdout", "_condor_stderr")
        if event.code == HOLD_OUTPUT_TOO_LARGE and std:
            limit = own[1] if own else f"max_output_mb={self.max_output_mb:g} + {STD_FILES_MB} MiB"
            hint = (f". What the tasks printed ({os.path.basename(sent.group(1))[8:]}) took it over "
                    f"max_transfer_output_mb ({limit}); print less, or write it to a file of your own")
        elif event.code == HOLD_OUTPUT_TOO_LARGE and own:
            hint = (f". Its output files are over max_transfer_output_mb, which your submit sets "
                    f"({own[0]}={own[1]!r}); raise it there if so large an output is expected")
        elif event.code == HOLD_OUTPUT_TOO_LARGE:
            need = max(2 * math.ceil(self.max_output_mb), 1)
            had = re.search(r"\(max=(\d+) MB", event.reason or "")
            sets = f"max_output_mb={self.max_output_mb:g} + {STD_FILES_MB} MiB"
            if had and int(had.group(1)) != math.ceil(self.max_output_mb) + STD_FILES_MB:
                # (a job attached to with another cap: the proc had the one it was submitted with)
                need = max(2 * (int(had.group(1)) - STD_FILES_MB), 1)
                sets = (f"max_transfer_output_mb={had.group(1)} when it was submitted: max_output_mb + "
                        f"{STD_FILES_MB} MiB")
            hint = (f". Its output files are over max_transfer_output_mb, which this backend sets to "
                    f"{sets} for stdout and stderr; if so "
                    f"large an output is expected, raise it: Master('condor', max_output_mb={need}, ...) or "
                    f"'%pymw use condor --max-output-mb {need}' (large arrays travel best as files: "
                    "transfer_files, or a shared file system)")
        return JobHeld(f"{chunk.name()} (proc {chunk.proc[0]}.{chunk.proc[1]}) was held by HTCondor: "
                       f"{event.reason} (HoldReasonCode {event.code}, HoldReasonSubCode {event.subcode}); "
                       f"it was removed from the queue{hint}", event.reason, event.code, event.subcode)

    # --- the event log ----------------------------------------------------------------------------
    def prepare(self, state: JobState) -> None:
        if self._spooled(state):
            (state.dir.path / SPOOL_LOGS).mkdir(mode=0o700, exist_ok=True)
            return
        # The log exists before the first submit, so it can be opened at once.
        state.dir.log_path.touch(exist_ok=True)

    def _spooled(self, state: JobState) -> bool:
        """Is this job spooled?  (An attached job: as it was submitted.)"""
        return bool(state.engine.get("spool", self.spool))

    def _log(self, state: JobState) -> Any:
        jel = self._logs.get(id(state))
        if jel is None:
            path = str(state.dir.log_path.absolute())
            jel = self.htcondor.JobEventLog(path)
            offset = int(state.engine.get("offset") or 0)
            if offset:
                # Resume where the last reader stopped (a JobEventLog's own
                # pickle protocol: its file name and offset, no pickle bytes).
                attrs, _ = jel.__getstate__()
                jel.__setstate__((attrs, offset))
            self._logs[id(state)] = jel
            try:
                self._log_ids[id(state)] = _file_id(path)
            except OSError:
                pass
        return jel

    def _check_log(self, state: JobState, jel: Any) -> None:
        """The log must still be the file being read, never shorter than
        what was read: a deleted, replaced or truncated log would otherwise
        show no event for ever (its procs' fates silently missed)."""
        path = state.dir.log_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BatchError.about(state, f"the HTCondor event log {path} of job {state.job.name!r} is gone "
                                   "(its job directory was deleted?): the job cannot be followed; its procs "
                                   "are removed") from None
        except OSError as exc:
            raise self._log_error(state, exc) from exc
        offset = int(jel.__getstate__()[1] or 0)
        known = self._log_ids.get(id(state))
        if known is not None and known != (st.st_dev, st.st_ino):
            raise BatchError.about(state, f"the HTCondor event log {path} of job {state.job.name!r} was replaced "
                                   "by another file while being read: the job cannot be followed; its procs "
                                   "are removed")
        if st.st_size < offset:
            raise BatchError.about(state, f"the HTCondor event log {path} of job {state.job.name!r} was truncated "
                                   f"({st.st_size} bytes, {offset} read already): the job cannot be followed; "
                                   "its procs are removed. Check the file, and the disk it is on")

    def poll_events(self, states: list[JobState], timeout: float) -> list[tuple[JobState, BatchEvent]]:
        spooled = [s for s in states if self._spooled(s)]
        if spooled:
            out = self._poll_spooled(spooled)
            states = [s for s in states if not self._spooled(s)]
            if not states:
                if not out:
                    time.sleep(max(0.0, min(timeout, self._spool_due - time.monotonic())))
                return out
            return out + self._poll_logs(states, 0 if out else timeout)
        return self._poll_logs(states, timeout)

    def _poll_logs(self, states: list[JobState], timeout: float) -> list[tuple[JobState, BatchEvent]]:
        out: list[tuple[JobState, BatchEvent]] = []
        if len(states) == 1:
            state = states[0]
            jel = self._log(state)
            self._check_log(state, jel)
            try:
                first = next(iter(jel.events(stop_after=max(1, int(timeout)) if timeout else 0)), None)
                raw = [] if first is None else [first] + list(jel.events(0))
            except Exception as exc:
                raise self._log_error(state, exc) from exc
            out = [(state, e) for e in map(self.translate, raw) if e is not None]
            state.engine["offset"] = jel.__getstate__()[1]
            return out
        for state in states:
            jel = self._log(state)
            self._check_log(state, jel)
            try:
                raw = list(jel.events(0))
            except Exception as exc:
                raise self._log_error(state, exc) from exc
            out += [(state, e) for e in map(self.translate, raw) if e is not None]
            state.engine["offset"] = jel.__getstate__()[1]
        if not out:
            time.sleep(0.2)
        return out

    # --- a spooled job: followed through the queue ----------------------------------------------
    def _poll_spooled(self, states: list[JobState]) -> list[tuple[JobState, BatchEvent]]:
        """Events of spooled jobs, from one query of the schedd's queue every
        :attr:`spool_interval` seconds (their event logs are in the schedd's
        spool, out of reach): a status change is an event; a completed proc's
        outputs are retrieved into the job directory before its "finished"."""
        now = time.monotonic()
        fresh = [s for s in states if s not in self._spool_polled]
        if now < self._spool_due and not fresh:
            return []
        self._spool_due = now + self.spool_interval
        by_name = {s.dir.path.name: s for s in states}
        constraint = " || ".join(f'PymwJob == "{name}"' for name in by_name)
        with self._engine_lock:
            ads = self.schedd.query(constraint=constraint, projection=SPOOL_PROJECTION)
        out: list[tuple[JobState, BatchEvent]] = []
        present: set[tuple[int, int]] = set()
        completed: list[tuple[JobState, tuple[int, int], Any]] = []
        for ad in ads:
            state = by_name.get(str(ad.get("PymwJob", "")))
            if state is None:
                continue
            proc = (int(ad["ClusterId"]), int(ad["ProcId"]))
            present.add(proc)
            for event in self._spool_events(proc, ad):
                out.append((state, event))
            if int(ad.get("JobStatus", 0) or 0) == COMPLETED:
                completed.append((state, proc, ad))
        if completed:
            out += self._retrieve(completed)
        out += self._spool_missing(states, present)
        for s in states:
            self._spool_polled.add(s)
        return out

    def _spool_events(self, proc: tuple[int, int], ad: Any) -> list[BatchEvent]:
        """What changed for one proc since the last look."""
        status = int(ad.get("JobStatus", 0) or 0)
        starts = int(ad.get("NumJobStarts", 0) or 0)
        before, before_starts = self._seen.get(proc, (None, 0))
        code = ad.get("HoldReasonCode")
        code = None if code is None else int(code)
        # (waiting for its spooled inputs is not a hold of the user's: as idle)
        self._seen[proc] = (IDLE if status == HELD and code == HOLD_SPOOLING_INPUT else status, starts)
        events: list[BatchEvent] = []
        if before is None:
            # (names the chunk of a proc the stored handle missed)
            events.append(BatchEvent("submitted", proc, notes=f"pymw chunk {ad.get('PymwChunk')}"))
        host = str(ad.get("RemoteHost") or ad.get("LastRemoteHost") or "") or None
        if status == RUNNING:
            # (a schedd counts a start when the starter reports it, after
            # JobStatus says running: 0 -> 1 is the first run, not an eviction)
            again = before == RUNNING and before_starts >= 1 and starts > before_starts
            if again:
                events.append(self._spool_evicted(proc, "it started again (evicted meanwhile)"))
            if before != RUNNING or again:
                self._began[proc] = time.time()
                events.append(BatchEvent("running", proc, host=host))
        elif status == IDLE:
            if before == RUNNING:
                events.append(self._spool_evicted(proc, "it went back to idle (evicted)"))
            elif before == HELD:
                events.append(BatchEvent("released", proc))
        elif status == HELD:
            if code != HOLD_SPOOLING_INPUT and before != HELD:
                events.append(BatchEvent("held", proc, reason=str(ad.get("HoldReason") or ""), code=code,
                                         subcode=int(ad.get("HoldReasonSubCode", 0) or 0),
                                         timeout=code == HOLD_DURATION_EXCEEDED))
        elif status == REMOVED:
            if before != REMOVED:
                events.append(BatchEvent("aborted", proc, reason=str(ad.get("RemoveReason") or "")))
        return events

    def _spool_evicted(self, proc: tuple[int, int], reason: str) -> BatchEvent:
        """An eviction seen in the queue; one past the proc's time limit is its timeout."""
        limit, began = self._limits.get(proc), self._began.pop(proc, None)
        if limit and began and time.time() - began >= limit - 1:
            return BatchEvent("held", proc, reason=f"the job exceeded allowed execute duration of {limit} s "
                              f"({reason})", code=HOLD_DURATION_EXCEEDED, timeout=True)
        return BatchEvent("evicted", proc, reason=reason)

    def _retrieve(self, completed: list[tuple[JobState, tuple[int, int], Any]]) -> list[tuple[JobState, BatchEvent]]:
        """Bring completed procs' outputs from the spool (one retrieve for
        all), then report them finished; a failed retrieve is tried again
        at the next look, and fails the chunk after :data:`RETRIEVE_TRIES`."""
        followed = [(s, p, ad) for s, p, ad in completed if p not in self._retrieved]
        if not followed:
            return []
        specs = [f"{p[0]}.{p[1]}" for _, p, _ in followed]
        try:
            with self._engine_lock:
                self.schedd.retrieve(specs)
        except Exception as exc:
            out = []
            for s, p, _ in followed:
                tries = self._retrieve_failures.get(p, 0) + 1
                self._retrieve_failures[p] = tries
                self._seen.pop(p, None)  # (seen again at the next look)
                if tries >= RETRIEVE_TRIES:
                    self._retrieved.add(p)
                    out.append((s, BatchEvent("gone", p, reason=f"retrieving its output from the schedd's "
                                              f"spool failed {tries} times: {exc}")))
            _log.warning("pymw-magic: condor: retrieving the outputs of %d spooled proc(s) failed: %s",
                         len(followed), exc)
            return out
        out = []
        for s, p, ad in followed:
            self._retrieved.add(p)
            self._retrieve_failures.pop(p, None)
            by_signal = bool(ad.get("ExitBySignal", False))
            code = ad.get("ExitSignal") if by_signal else ad.get("ExitCode")
            out.append((s, BatchEvent("finished", p, normal=not by_signal, code=None if code is None else int(code))))
        return out

    def _spool_missing(self, states: list[JobState], present: set[tuple[int, int]]) -> list[tuple[JobState, BatchEvent]]:
        """Followed procs no longer in the queue: their fate from the history."""
        with self._lock:  # (the pump adds chunks meanwhile)
            followed = [(s, c) for s in states for c in list(s.chunks.values())]
        missing = {c.proc: (s, c) for s, c in followed
                   if c.proc is not None and c.state in ("queued", "running") and c.proc not in present
                   and c.proc not in self._retrieved}
        if not missing:
            return []
        constraint = " || ".join(f'PymwJob == "{s.dir.path.name}"' for s in {id(s): s for s, _ in missing.values()}.values())
        try:
            with self._engine_lock:
                ads = list(self.schedd.history(constraint=constraint, projection=SPOOL_PROJECTION,
                                               match=max(100, 4 * len(missing))))
        except Exception as exc:  # (a schedd without history: the proc is gone, unexplained)
            _log.warning("pymw-magic: condor: the history of spooled procs could not be read: %s", exc)
            ads = []
        known = {(int(ad["ClusterId"]), int(ad["ProcId"])): ad for ad in ads}
        out: list[tuple[JobState, BatchEvent]] = []
        for proc, (s, c) in missing.items():
            ad = known.get(proc)
            status = int(ad.get("JobStatus", 0) or 0) if ad is not None else 0
            self._retrieved.add(proc)
            if status == REMOVED:
                out.append((s, BatchEvent("aborted", proc, reason=str(ad.get("RemoveReason") or ""))))
            elif status == COMPLETED and s.dir.output_path(c.index).exists():
                out.append((s, BatchEvent("finished", proc)))  # (retrieved by another process)
            else:
                why = ("it completed, but its output was retrieved by someone else" if status == COMPLETED
                       else "it is in neither the queue nor the history")
                out.append((s, BatchEvent("gone", proc, reason=why)))
        return out

    def _log_error(self, state: JobState, exc: BaseException) -> BatchError:
        return BatchError.about(state, f"the HTCondor event log {state.dir.log_path} of job {state.job.name!r} cannot be "
                          f"read ({type(exc).__name__}: {exc}): it is corrupted or truncated; its procs are "
                          "removed. Check the file, and the disk it is on")

    def translate(self, e: Any) -> BatchEvent | None:
        """One ``htcondor2.JobEvent`` as a :class:`BatchEvent` (None: not one we follow)."""
        T = self.htcondor.JobEventType
        proc = (int(e.cluster), int(e.proc))
        kind = e.type
        get = e.get if hasattr(e, "get") else (lambda k, d=None: e[k] if k in e else d)
        if kind == T.SUBMIT:
            return BatchEvent("submitted", proc, notes=get("LogNotes"))
        if kind == T.EXECUTE:
            self._began[proc] = float(getattr(e, "timestamp", 0) or 0)
            return BatchEvent("running", proc, host=get("SlotName") or get("ExecuteHost"))
        if kind in (T.JOB_TERMINATED, T.JOB_ABORTED):
            self._limits.pop(proc, None)
            self._began.pop(proc, None)
        if kind == T.JOB_TERMINATED:
            normal = bool(get("TerminatedNormally", True))
            code = get("ReturnValue") if normal else get("TerminatedBySignal")
            return BatchEvent("finished", proc, normal=normal, code=None if code is None else int(code))
        if kind == T.JOB_HELD:
            code = get("HoldReasonCode")
            return BatchEvent("held", proc, reason=str(get("HoldReason", "")),
                              code=None if code is None else int(code),
                              subcode=int(get("HoldReasonSubCode", 0) or 0),
                              timeout=code is not None and int(code) == HOLD_DURATION_EXCEEDED)
        if kind == T.JOB_RELEASED:
            return BatchEvent("released", proc)
        if kind == T.JOB_EVICTED:
            reason, code = str(get("Reason", "") or ""), int(get("ReasonCode", 0) or 0)
            if code in (TRANSFER_OUTPUT_FAILED, HOLD_OUTPUT_TOO_LARGE):
                # A real schedd holds the proc next, with the transfer's
                # reason (naming the missing output, or the one over
                # max_transfer_output_mb): that hold decides.
                return None
            limit, began = self._limits.get(proc), self._began.pop(proc, None)
            at = float(getattr(e, "timestamp", 0) or 0)
            if code == EVICT_CLAIM_DEACTIVATED and limit and began and at - began >= limit - 1:
                # A real starter enforces allowed_execute_duration by
                # evicting (the proc would run again): the timeout.
                return BatchEvent("held", proc, reason=f"the job exceeded allowed execute duration of {limit} s "
                                  f"(evicted: {reason})", code=HOLD_DURATION_EXCEEDED, timeout=True)
            return BatchEvent("evicted", proc, reason=reason)
        if kind == T.JOB_ABORTED:
            return BatchEvent("aborted", proc, reason=str(get("Reason", "") or ""))
        return None

    def safety_check(self, states: list[JobState]) -> list[tuple[JobState, BatchEvent]]:
        """Procs we follow that are no longer in the queue, with no event
        saying so (one query for all of them)."""
        with self._lock:  # (the pump adds chunks meanwhile)
            pairs = [(s, c) for s in states for c in list(s.chunks.values())]
        followed = {c.proc: (s, c) for s, c in pairs
                    if c.proc is not None and c.state in ("queued", "running") and not self._spooled(s)}
        if not followed:
            return []
        clusters = sorted({p[0] for p in followed})
        constraint = " || ".join(f"ClusterId == {c}" for c in clusters)
        with self._engine_lock:
            ads = self.schedd.query(constraint=constraint, projection=["ClusterId", "ProcId", "JobStatus"])
        present = {(int(ad["ClusterId"]), int(ad["ProcId"])) for ad in ads}
        # (read the log once more first: what left the queue meanwhile has its event now)
        return [(s, BatchEvent("gone", p)) for p, (s, c) in followed.items() if p not in present]

    def check_adopted(self, state: JobState) -> None:
        """A job with procs still to hear from must be known to this schedd
        (in its queue or its history, by the job directory's name): a wrong
        ``schedd=`` would otherwise see them "gone" and run them again."""
        waiting = [c for c in state.chunks.values()
                   if c.proc is not None and not state.dir.output_path(c.index).exists()]
        if not waiting:
            return
        constraint = f'PymwJob == "{state.dir.path.name}"'
        try:
            with self._engine_lock:
                if self.schedd.query(constraint=constraint, projection=["ClusterId", "ProcId"], limit=1):
                    return
                if self.schedd.history(constraint=constraint, projection=["ClusterId", "ProcId"], match=1):
                    return
        except Exception:  # (a schedd that cannot answer this: the follower finds out)
            return
        clusters = sorted({c.proc[0] for c in waiting if isinstance(c.proc, tuple)})
        recorded = state.engine.get("schedd") or {}
        raise PymwError(f"job {state.job.name!r}: none of its procs (cluster(s) {', '.join(map(str, clusters))}) "
                        f"is in the queue or the history of the schedd {self.schedd!r}: it ran on another "
                        f"schedd (recorded: {_record_text(recorded)}). attach({state.job.name!r}, "
                        "schedd=<the schedd that ran it>) follows it there")

    def wait_removed(self, directory: Any, timeout: float) -> bool:
        return _wait_left(self.schedd, str(getattr(directory, "name", directory)), timeout, self._engine_lock)

    def engine_handle(self, state: JobState) -> dict[str, Any]:
        return {"offset": int(state.engine.get("offset") or 0), "clusters": list(state.engine.get("clusters", [])),
                "schedd": schedd_record(self.schedd_spec, self.pool), "spool": self.spool}

    @classmethod
    def reconnect_options(cls, handle: dict[str, Any], given: Iterable[str] = ()) -> dict[str, Any]:
        record = (handle.get("engine") or {}).get("schedd") or {"kind": "local"}
        out: dict[str, Any] = {}
        if "schedd" not in given:  # (a schedd given is used as it is: the stored one may not be rebuildable)
            out["schedd"] = schedd_from_record(record)
        if record.get("pool") and "pool" not in given:
            out["pool"] = record["pool"]
        return out

    @classmethod
    def remove_stored(cls, handle: dict[str, Any], **options: Any) -> None:
        htcondor2 = htcondor()
        given = {k: v for k, v in options.items() if k in ("schedd", "pool")}
        opts = cls.reconnect_options(handle, given=given)
        opts.update(given)
        schedd = connect_schedd(opts.get("schedd"), opts.get("pool"))
        procs = [entry.get("proc") for entry in (handle.get("chunks") or {}).values() if entry.get("proc")]
        clusters = (handle.get("engine") or {}).get("clusters") or []
        specs = sorted({f"{p[0]}.{p[1]}" for p in procs} | {str(c) for c in clusters})
        if specs:
            schedd.act(htcondor2.JobAction.Remove, specs, reason="pymw: job removed")
            # (the schedd writes their last events into the job directory
            # as they leave: it is deleted after that)
            directory = handle.get("dir")
            if directory:
                _wait_left(schedd, os.path.basename(str(directory).rstrip("/")), REMOVE_PATIENCE)

    def closed_job(self, state: JobState) -> None:
        """A finished job's log is read no more (nor its procs' queue states kept)."""
        jel = self._logs.pop(id(state), None)
        self._log_ids.pop(id(state), None)
        self._spool_polled.discard(state)
        procs = {c.proc for c in state.chunks.values() if c.proc is not None}
        clusters = set(state.engine.get("clusters") or ())
        for table in (self._seen, self._retrieve_failures, self._limits, self._began):
            for p in [p for p in table if p in procs or p[0] in clusters]:
                del table[p]
        self._retrieved.difference_update([p for p in self._retrieved if p in procs or p[0] in clusters])
        if jel is not None:
            try:
                jel.close()
            except Exception:
                pass

    def shutdown(self, wait: bool = True) -> None:
        super().shutdown(wait)
        if any(t.is_alive() for t in self._threads):
            return  # (a follower still in a read: its logs go with it, never closed under it)
        for jel in self._logs.values():
            try:
                jel.close()
            except Exception:
                pass


# --- the schedd, and how it is recorded ------------------------------------------------------------
def connect_schedd(spec: Any, pool: str | None) -> Any:
    """The schedd for ``spec``: None (the local one), a name or address
    (located through ``pool``'s collector), or an object used as it is."""
    if spec is not None and not isinstance(spec, str):
        return spec
    htcondor2 = htcondor()
    try:
        if spec is None and not pool:
            return htcondor2.Schedd()
        collector = htcondor2.Collector(pool) if pool else htcondor2.Collector()
        if spec is None:
            ad = collector.locate(htcondor2.DaemonType.Schedd)
        else:
            ad = collector.locate(htcondor2.DaemonType.Schedd, spec)
        return htcondor2.Schedd(ad)
    except Exception as exc:
        where = f"schedd {spec!r}" if spec else "the local schedd"
        raise BackendMissing(f"the condor backend cannot reach {where}{' via pool ' + pool if pool else ''}: "
                             f"{exc}. Start HTCondor (or name a schedd with schedd=..., pool=...); without a "
                             "pool, pymw_magic.testing.condor.StandInSchedd(root) stands in for one") from exc


def schedd_record(spec: Any, pool: str | None) -> dict[str, Any]:
    """How a schedd is written in the job store: never a pickle."""
    if spec is None:
        return {"kind": "local", "pool": pool}
    if isinstance(spec, str):
        return {"kind": "name", "name": spec, "pool": pool}
    try:
        reduced = spec.__reduce__()
    except Exception:
        reduced = None
    if isinstance(reduced, tuple) and len(reduced) >= 2 and isinstance(reduced[0], type) \
            and isinstance(reduced[1], tuple):
        cls, args = reduced[0], reduced[1]
        try:
            json.dumps(list(args))
        except (TypeError, ValueError):
            pass
        else:
            return {"kind": "object", "class": f"{cls.__module__}:{cls.__qualname__}", "args": list(args),
                    "pool": pool}
    return {"kind": "unknown", "repr": repr(spec)[:200], "pool": pool}


#: what makes an object a schedd here
_SCHEDD_METHODS = ("submit", "act", "query")


def schedd_from_record(record: dict[str, Any]) -> Any:
    kind = record.get("kind")
    if kind == "local":
        return None
    if kind == "name":
        return record["name"]
    if kind == "object":
        module, _, qualname = str(record["class"]).partition(":")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, type):  # (only a class is made: never a function called)
            raise TypeError(f"{record['class']} is not a class")
        # Checked before it is made: a constructor may act (subprocess:Popen runs a command).
        missing = [m for m in _SCHEDD_METHODS if not callable(getattr(obj, m, None))]
        if missing:
            raise TypeError(f"{record['class']} is not a schedd class: it has no {', '.join(missing)} "
                            f"(a schedd has the htcondor2.Schedd methods {', '.join(_SCHEDD_METHODS)})")
        return obj(*record.get("args", []))
    raise BatchError(f"the job's schedd was {record.get('repr', 'an object')}, which cannot be made again from "
                     "the job store: attach(..., schedd=<the schedd object>)")


#: seconds a removal waits for removed procs to leave the queue
REMOVE_PATIENCE = 30.0


def _wait_left(schedd: Any, name: str, timeout: float, lock: Any = None) -> bool:
    """Wait until no proc of the job directory ``name`` is in the queue."""
    import contextlib
    deadline = time.monotonic() + timeout
    while True:
        try:
            with lock if lock is not None else contextlib.nullcontext():
                left = schedd.query(constraint=f'PymwJob == "{name}"', projection=["ClusterId"], limit=1)
        except Exception:  # (a schedd that cannot say: nothing to wait for)
            return True
        if not left:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _record_text(record: dict[str, Any]) -> str:
    kind = record.get("kind")
    if kind == "object":
        return f"{record.get('class')}{tuple(record.get('args') or ())}"
    if kind == "name":
        return repr(record.get("name"))
    if kind == "local":
        return "the local schedd"
    return str(record.get("repr") or "unknown")


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _arguments(args: list[str]) -> str:
    """HTCondor's argument syntax: plain when nothing needs quoting."""
    if all(a and not any(c in a for c in " \t'\"") for a in args):
        return " ".join(args)
    return '"' + " ".join("'" + a.replace("'", "''").replace('"', '""') + "'" for a in args) + '"'


def _environment_text(env: dict[str, str]) -> str:
    parts = []
    for k, v in env.items():
        v = str(v)
        if any(c in v for c in " \t'\""):
            v = "'" + v.replace("'", "''").replace('"', '""') + "'"
        parts.append(f"{k}={v}")
    return '"' + " ".join(parts) + '"'


__all__ = ["CondorBackend", "JobHeld", "connect_schedd", "schedd_record", "schedd_from_record", "htcondor"]
