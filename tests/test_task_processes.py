"""A task's own processes die with it: whatever a task starts — a plain
child, a child that left the session (``setsid``), a daemon whose parent
exited (reparented away from it) — is gone once the task is stopped, however
it is stopped, and once a finished task's batch is over.

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

from pymw_magic import Master

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: a daemon: its parent forks, exits at once; the child leaves the session
DAEMON = ("import os, sys\n"
          "if os.fork() == 0:\n"
          "    os.setsid()\n"
          "    os.execvp('sleep', ['sleep', sys.argv[1]])\n"
          "os._exit(0)\n")
#: a child that stays, with a grandchild that left the session
PARENT = ("import os, sys\n"
          "if os.fork() == 0:\n"
          "    os.setsid()\n"
          "    os.execvp('sleep', ['sleep', sys.argv[1]])\n"
          "os.execvp('sleep', ['sleep', sys.argv[1]])\n")
#: processes each task leaves: the plain child, setsid child, daemon, parent + grandchild
EXPECTED = 5


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


def start_processes(marker: str, ready: str, block: bool) -> int:
    """The task: start EXPECTED marked processes, say so, then block (or end)."""
    import subprocess
    import sys
    subprocess.Popen(["sleep", marker])
    subprocess.Popen(["setsid", "sleep", marker])
    subprocess.Popen([sys.executable, "-c", DAEMON, marker])
    subprocess.Popen([sys.executable, "-c", PARENT, marker])
    deadline = time.monotonic() + 200  # (five interpreters and sleeps on a loaded 2-core machine)
    while len(marked(marker)) < EXPECTED and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(ready, "w") as f:
        f.write(str(len(marked(marker))))
    if block:
        time.sleep(300)
    return os.getpid()


@pytest.fixture
def marker():
    m = f"300.{random.randrange(10**8):08d}"
    yield m
    for pid in marked(m):  # (a failing test leaves nothing for the next)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_ready(path: str, timeout: float = 240.0) -> int:
    """How many marked processes the task saw once it had started them."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path)):
        assert time.monotonic() < deadline, "the task never started its processes"
        time.sleep(0.02)
    with open(path) as f:
        return int(f.read())


def left_after(marker: str, timeout: float = 20.0) -> list[int]:
    """The marked processes still alive once up to ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        alive = marked(marker)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def check_none_left(marker: str, started: int) -> None:
    assert started == EXPECTED, f"the task started {started} processes, not {EXPECTED}"
    alive = left_after(marker)
    assert not alive, f"{len(alive)} of the task's {started} processes left running: {alive}"


def test_timeout_stops_the_tasks_processes(marker, tmp_path):
    ready = str(tmp_path / "ready")
    with Master("local", workers=1, timeout=15) as m:
        job = m.map_async(start_processes, [marker], [ready], [True])
        started = wait_ready(ready)
        assert job.wait(timeout=120)
        assert job.counts()["failed"] == 1
    check_none_left(marker, started)


def test_cancel_of_a_running_task_stops_its_processes(marker, tmp_path):
    ready = str(tmp_path / "ready")
    with Master("local", workers=1) as m:
        job = m.map_async(start_processes, [marker], [ready], [True])
        started = wait_ready(ready)
        job.cancel()
        check_none_left(marker, started)


def test_terminate_stops_the_tasks_processes(marker, tmp_path):
    ready = str(tmp_path / "ready")
    m = Master("local", workers=1)
    try:
        m.map_async(start_processes, [marker], [ready], [True])
        started = wait_ready(ready)
    finally:
        m.terminate()
    check_none_left(marker, started)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_lost_worker_takes_its_tasks_processes(marker, tmp_path, sig):
    ready = str(tmp_path / "ready")
    with Master("local", workers=1, retries=0) as m:
        job = m.map_async(start_processes, [marker], [ready], [True])
        started = wait_ready(ready)
        os.kill(m.worker_info()[0]["pid"], sig)
        assert job.wait(timeout=120)
        assert job.counts()["failed"] == 1
        check_none_left(marker, started)


def test_a_finished_tasks_leftovers_end_with_its_batch(marker, tmp_path):
    ready = str(tmp_path / "ready")
    with Master("local", workers=1) as m:
        job = m.map_async(start_processes, [marker], [ready], [False])
        worker = job.result(timeout=120)[0]
        started = wait_ready(ready)
        check_none_left(marker, started)  # while the worker lives on
        assert worker in [w["pid"] for w in m.worker_info()]


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    from pymw_magic import Master
    from test_task_processes import start_processes
    m = Master("local", workers=1)
    m.map_async(start_processes, [{marker!r}], [{ready!r}], [True])
    while True:
        time.sleep(0.05)
        try:
            with open({ready!r}) as f:
                if f.read():
                    break
        except OSError:
            pass
    if {kill_me!r}:
        time.sleep(300)
    # the script ends here, its master never shut down
""")


@pytest.mark.parametrize("how", ["interpreter exit", "master SIGKILLed"])
def test_the_masters_end_takes_the_tasks_processes(marker, tmp_path, how):
    ready = str(tmp_path / "ready")
    script = tmp_path / "master.py"
    script.write_text(SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), marker=marker,
                                    ready=ready, kill_me=how == "master SIGKILLed"))
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        started = wait_ready(ready)
        if how == "master SIGKILLed":
            proc.kill()
        assert proc.wait(timeout=120) in (0, -signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    check_none_left(marker, started)


def tracker_pid(_: int) -> int:
    """multiprocessing's resource tracker, started (once) by this worker."""
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()
    return resource_tracker._resource_tracker._pid


@pytest.mark.parametrize("trial", range(3))
def test_multiprocessings_resource_tracker_outlives_a_batch(trial):
    # It serves the worker's interpreter, not one task: killing it after a
    # batch would make every later task that uses shared memory relaunch it.
    with Master("local", workers=1) as m:
        pids = m.map_async(tracker_pid, range(6), chunksize=1).result(timeout=120)
        assert len(set(pids)) == 1
        assert psutil.pid_exists(pids[0]) and psutil.Process(pids[0]).status() != psutil.STATUS_ZOMBIE
