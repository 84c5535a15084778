"""Hostile checks that a task's processes die with it, past what
test_task_processes covers: a process started through multiprocessing's
forkserver, a task holding the GIL in C when its master is SIGKILLed, a
task's process named like a runtime helper.  (Not covered, and said in the
README: a worker SIGKILLed by someone else while a task's child had left
the session and cleared its environment.)

Each test starts its processes as ``sleep 300.<random>``: a marker no other
process carries, so they are found wherever they were reparented."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import wait_gone
from pymw_magic import Master

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def marked(marker: str) -> list[int]:
    """Living processes whose command line carries ``marker``."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if marker in (p.info["cmdline"] or ()) and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def wait_marked(marker: str, n: int = 1, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while len(marked(marker)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"the task's {n} marked process(es) never started")
        time.sleep(0.02)
    return len(marked(marker))


def left_after(marker: str, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = marked(marker)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture
def marker():
    m = f"300.{random.randrange(10**8):08d}"
    yield m
    for pid in marked(m):  # (a failing test leaves nothing for the next)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def through_forkserver(marker: str) -> int:
    """The task: a process started by multiprocessing's forkserver (the
    default start method on Linux from Python 3.14), left running."""
    import multiprocessing
    import subprocess
    ctx = multiprocessing.get_context("forkserver")
    ctx.Process(target=subprocess.call, args=(["sleep", marker],)).start()
    return wait_marked(marker)


@pytest.mark.parametrize("trial", range(2))
def test_a_forkserver_process_of_a_finished_task_ends_with_its_batch(marker, trial):
    with Master("local", workers=1) as m:
        assert m.map_async(through_forkserver, [marker]).result(timeout=120) == [1]
        alive = left_after(marker)
        assert not alive, f"the task's forkserver child {alive} outlived its batch"


GIL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{root!r}]
    from pymw_magic import Master

    def hog(marker, ready):
        import subprocess
        subprocess.Popen(["sleep", marker])
        with open(ready, "w") as f:
            f.write(str(os.getpid()))
        return sum(range(10 ** 12))  # (a C loop that never lets go of the GIL)

    m = Master("local", workers=1)
    m.map_async(hog, [{marker!r}], [{ready!r}])
    time.sleep(600)
""")


def test_a_sigkilled_master_takes_a_gil_holding_task_and_its_children(marker, tmp_path):
    ready = tmp_path / "ready"
    script = tmp_path / "master.py"
    script.write_text(GIL_SCRIPT.format(root=ROOT, marker=marker, ready=str(ready)))
    proc = subprocess.Popen([sys.executable, str(script)])
    worker = None
    try:
        deadline = time.monotonic() + 120
        while not (ready.exists() and ready.stat().st_size):
            assert time.monotonic() < deadline, "the task never started"
            assert proc.poll() is None, "the master script ended"
            time.sleep(0.02)
        worker = int(ready.read_text())
        wait_marked(marker)
        proc.kill()
        proc.wait(timeout=60)
        alive = left_after(marker, timeout=30)
        # (the watchdog kills the task's processes, then the worker: wait for
        # that too, not only for the children to go)
        worker_alive = bool(wait_gone([worker], 30))
        assert not alive and not worker_alive, (
            f"master SIGKILLed: task children {alive} and worker alive={worker_alive} left running")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)
            except OSError:
                pass


def looks_like_a_helper(marker: str) -> int:
    """The task: a process whose command line names multiprocessing's
    resource tracker (as the real one's does), with a child of its own."""
    import subprocess
    import sys
    code = f"import subprocess, time; subprocess.Popen(['sleep', {marker!r}]); time.sleep(300)"
    subprocess.Popen([sys.executable, "-c", code, "multiprocessing.resource_tracker", marker])
    return wait_marked(marker, 2)


def keeps_a_real_tracker(marker: str) -> int:
    """The task: uses multiprocessing's shared memory, which starts the
    interpreter's real resource tracker (a helper the worker keeps)."""
    from multiprocessing import resource_tracker, shared_memory
    seg = shared_memory.SharedMemory(create=True, size=16)
    seg.close()
    seg.unlink()
    return resource_tracker._resource_tracker._pid


def test_a_task_process_named_like_a_runtime_helper_is_not_spared(marker):
    """Only the helpers the worker's interpreter started are spared after a
    batch: a task's process that merely carries a helper's name in its
    command line (and what it started) goes like any other; the real
    resource tracker stays, and serves the next task."""
    with Master("local", workers=1) as m:
        [tracker] = m.map_async(keeps_a_real_tracker, [marker]).result(timeout=120)
        assert m.map_async(looks_like_a_helper, [marker]).result(timeout=120) == [2]
        alive = left_after(marker)
        assert not alive, f"the task's look-alike helper and its child {alive} outlived the batch"
        assert psutil.pid_exists(tracker) and psutil.Process(tracker).status() != psutil.STATUS_ZOMBIE
        assert m.map_async(keeps_a_real_tracker, [marker]).result(timeout=120) == [tracker]
