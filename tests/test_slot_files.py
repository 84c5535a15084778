"""The local backend's per-worker slot (which task runs, since when) is a
file with no name, handed to the worker by descriptor: however the master
ends, even killed while its workers start, nothing is left in /dev/shm."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, wait_gone, wait_until

SHM = Path("/dev/shm")

SCRIPT = """
import sys
from pymw_magic import Master
m = Master("local", workers=2, python=sys.argv[1])
print(m.submit(abs, -1).result())
"""


def mapped_slots(pid: int) -> set[str]:
    """The slot files process ``pid`` has mapped, by the name the kernel
    gives them (a file with no name shows as ``... (deleted)``)."""
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return {p for p in paths if p.startswith(str(SHM) + "/")}


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm here")
@pytest.mark.parametrize("trial", range(3))
def test_a_master_killed_while_its_workers_start_leaves_no_slot_file(tmp_path, trial):
    # Workers that take their time to start: the master waits for their
    # hello with its slots made, and is killed right there.
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 120\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(slow)], env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        master = psutil.Process(proc.pid)
        starting = wait_until(lambda: [c for c in master.children(recursive=True)
                                       if str(slow) in " ".join(c.cmdline())], 60, "a worker starting")
        pids = [c.pid for c in starting]
        slots = mapped_slots(proc.pid)
        assert slots, "the master maps no slot while its worker starts"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    for pid in pids:  # (the workers' own sessions: the kill of the master does not reach them)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not wait_gone(pids, 30)
    left = {p for p in slots if os.path.exists(p)}
    assert not left, f"slot files outlived their master: {left}"

