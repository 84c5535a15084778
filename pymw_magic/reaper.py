"""The processes below this one: what both workers need to make a task's
processes die with it.

A worker — the pool's (:mod:`~pymw_magic.worker`) and the batch family's
one-shot worker (:mod:`~pymw_magic.oneshot`) — makes itself the *child
subreaper* of everything its tasks start (Linux), so a grandchild whose
parent exits (a daemon, a ``setsid``) comes back to the worker instead of
init; after a task it finds its descendants here and kills them, sparing
the interpreter's own helpers (multiprocessing's resource tracker and
forkserver, which serve the worker, not one task).

Standard library only, and no import of our own: it travels in the
runtime zipapp to execute nodes and volunteer hosts.
"""

from __future__ import annotations

import os
import sys
import time

_PR_SET_CHILD_SUBREAPER = 36
#: children that serve the worker's interpreter itself, not one task, and
#: outlive a task by design (they end with the worker)
RUNTIME_HELPERS = (b"multiprocessing.resource_tracker", b"multiprocessing.forkserver")


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux
    ``prctl(PR_SET_CHILD_SUBREAPER)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def has_children() -> bool:
    """Whether this process has any child, living or not (one system call:
    cheap enough to ask after every task)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    except OSError:
        return True
    return True


def children_of(pid: int | str = "self") -> list[int]:
    """The children of ``pid``, living or not (Linux /proc, every thread's
    children; empty where unknown)."""
    out: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return out


def reap_children() -> None:
    """Collect our children that have ended (orphans reparented to us have
    nobody else to wait for them)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def process_state(pid: int | str) -> str:
    """The state letter of ``pid`` ("R", "S", "Z", ...; "" when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat[stat.rfind(b")") + 2:][:1].decode()  # (the name may hold spaces and parentheses)


def cmdline(pid: int | str) -> bytes:
    """The raw command line of ``pid`` (b"" when unknown)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def is_runtime_helper(pid: int, grace: float = 0.2) -> bool:
    """Whether child ``pid`` is one of :data:`RUNTIME_HELPERS`.  One just
    forked still shows our command line until it execs: it is given up to
    ``grace`` seconds (a child that never execs, a bare fork, shows ours for
    good; one in the middle of its exec shows nothing)."""
    ours = cmdline("self")
    deadline = time.monotonic() + grace
    while True:
        line = cmdline(pid)
        if line not in (ours, b"") or time.monotonic() > deadline:
            return any(h in line for h in RUNTIME_HELPERS)
        time.sleep(0.005)
