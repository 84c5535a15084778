"""The job event log ("user log") in HTCondor's own text format.

Owns the exact text of each event the stand-in schedd writes, as HTCondor
25's ``condor_event.cpp`` formats it (and its strict C++ reader, used by
``htcondor2.JobEventLog``, parses it): a header ``NNN (CCC.PPP.SSS) DATE
TIME `` then the body, each event ending with a ``...`` line.  Events are
appended with one ``write`` each on an ``O_APPEND`` descriptor, so a follower
never sees half an event and sees each event as soon as it is written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

SUBMIT = 0
EXECUTE = 1
JOB_EVICTED = 4
JOB_TERMINATED = 5
JOB_ABORTED = 9
JOB_HELD = 12
JOB_RELEASED = 13
REMOTE_ERROR = 21
FILE_TRANSFER = 40


@dataclass
class Usage:
    """CPU seconds of one run (user, system), as ``wait4`` reports them."""
    user: float = 0.0
    system: float = 0.0


def _rusage(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return f"{days} {hours:02d}:{minutes:02d}:{s:02d}"


def _usage_line(u: Usage, label: str) -> str:
    return f"Usr {_rusage(u.user)}, Sys {_rusage(u.system)}  -  {label}"


_stamp_cache: tuple[int, str] = (-1, "")


def _stamp(when: float | None) -> str:
    # one strftime per second: a 10,000-proc submit writes 10,000 headers
    global _stamp_cache
    sec = int(time.time() if when is None else when)
    if _stamp_cache[0] != sec:
        _stamp_cache = (sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)))
    return _stamp_cache[1]


def header(event: int, cluster: int, proc: int, when: float | None = None) -> str:
    return f"{event:03d} ({cluster:03d}.{proc:03d}.000) {_stamp(when)} "


def _one_line(text: str) -> str:
    # A body line that held a newline would end the event early for the reader.
    return " ".join(str(text).splitlines())


def submit(cluster: int, proc: int, host: str, notes: str | None) -> str:
    body = f"Job submitted from host: {host}\n"
    if notes:
        body += f"    {_one_line(notes)[:8191]}\n"
    return header(SUBMIT, cluster, proc) + body + "...\n"


def execute(cluster: int, proc: int, host: str, slot: str, scratch: str,
            cpus: int, disk_kb: int, memory_mb: int) -> str:
    body = (f"Job executing on host: {host}\n"
            f"\tSlotName: {slot}\n"
            f"\tCondorScratchDir = \"{scratch}\"\n"
            f"\tCpus = {cpus}\n"
            f"\tDisk = {disk_kb}\n"
            f"\tGPUs = 0\n"
            f"\tMemory = {memory_mb}\n")
    return header(EXECUTE, cluster, proc) + body + "...\n"


def file_transfer(cluster: int, proc: int, what: str, host: str | None = None) -> str:
    """``what``: one of HTCondor's strings, e.g. "Started transferring input files"."""
    body = f"{what}\n"
    if host:
        body += f"\tTransferring to host: {host}\n"
    return header(FILE_TRANSFER, cluster, proc) + body + "...\n"


def terminated(cluster: int, proc: int, *, return_value: int | None, signal: int | None,
               run: Usage, total: Usage, sent: int, received: int,
               total_sent: int, total_received: int) -> str:
    body = "Job terminated.\n"
    if signal is None:
        body += f"\t(1) Normal termination (return value {return_value})\n"
    else:
        body += f"\t(0) Abnormal termination (signal {signal})\n\t(0) No core file\n"
    body += (f"\t\t{_usage_line(run, 'Run Remote Usage')}\n"
             f"\t\t{_usage_line(Usage(), 'Run Local Usage')}\n"
             f"\t\t{_usage_line(total, 'Total Remote Usage')}\n"
             f"\t\t{_usage_line(Usage(), 'Total Local Usage')}\n"
             f"\t{sent}  -  Run Bytes Sent By Job\n"
             f"\t{received}  -  Run Bytes Received By Job\n"
             f"\t{total_sent}  -  Total Bytes Sent By Job\n"
             f"\t{total_received}  -  Total Bytes Received By Job\n")
    return header(JOB_TERMINATED, cluster, proc) + body + "...\n"


def evicted(cluster: int, proc: int, *, reason: str, code: int = 0, subcode: int = 0,
            run: Usage | None = None, sent: int = 0, received: int = 0) -> str:
    run = run or Usage()
    first = f"Job was evicted. Code {code} Subcode {subcode}\n" if code else "Job was evicted.\n"
    body = (first
            + "\t(0) CPU times\n"
            + f"\t\t{_usage_line(run, 'Run Remote Usage')}\n"
            + f"\t\t{_usage_line(Usage(), 'Run Local Usage')}\n"
            + f"\t{sent}  -  Run Bytes Sent By Job\n"
            + f"\t{received}  -  Run Bytes Received By Job\n")
    if reason:
        body += f"\tReason: {_one_line(reason)}\n"
    return header(JOB_EVICTED, cluster, proc) + body + "...\n"


def held(cluster: int, proc: int, reason: str, code: int, subcode: int) -> str:
    body = (f"Job was held.\n\t{_one_line(reason) or 'Reason unspecified'}\n"
            f"\tCode {code} Subcode {subcode}\n")
    return header(JOB_HELD, cluster, proc) + body + "...\n"


def released(cluster: int, proc: int, reason: str) -> str:
    body = "Job was released.\n"
    if reason:
        body += f"\t{_one_line(reason)}\n"
    return header(JOB_RELEASED, cluster, proc) + body + "...\n"


def aborted(cluster: int, proc: int, reason: str) -> str:
    body = "Job was aborted.\n"
    if reason:
        body += f"\t{_one_line(reason)}\n"
    return header(JOB_ABORTED, cluster, proc) + body + "...\n"


def remote_error(cluster: int, proc: int, *, daemon: str, host: str, message: str,
                 code: int, subcode: int) -> str:
    body = f"Error from {daemon} on {host}:\n"
    for line in str(message).splitlines() or [""]:
        body += f"\t{line}\n"
    if code:
        body += f"\tCode {code} Subcode {subcode}\n"
    return header(REMOTE_ERROR, cluster, proc) + body + "...\n"


def append(path: str, text: str) -> None:
    """Append whole events to the log at ``path`` (created 0o644 like the
    schedd's user logs are); one write, so a reader sees all or nothing."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = text.encode("utf-8", "replace")
        while data:
            n = os.write(fd, data)
            data = data[n:]
    finally:
        os.close(fd)
