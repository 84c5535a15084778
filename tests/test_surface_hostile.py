"""A hostile user's tests of the notebook surface: the options grammar,
the session's masters (replaced while they run), the exporter and the
simulator as reached through the magics, each on a real IPython shell
with real local workers."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from test_magics import _children, _gated_job, _wait_gone, cell, get_ipython, ip, session, use_local  # noqa: F401


def _wait_until(predicate, limit: float = 60.0) -> bool:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- a replaced default master that still runs a job ---------------------------------------

def test_status_lists_a_retiring_master_and_its_running_job(ip, capsys, tmp_path):
    use_local(ip)
    job = _gated_job(ip, tmp_path, n=4)
    ip.run_line_magic("pymw", "use local --workers 1")
    capsys.readouterr()
    try:
        ip.run_line_magic("pymw", "status")
        out = capsys.readouterr().out
        assert "pymw default: backend 'local' with 1 worker(s)" in out
        assert "pymw retiring (shuts down when its jobs end): backend 'local' with 2 worker(s)" in out
        assert f"job {job.id} 'long' (active)" in out
    finally:
        (tmp_path / "gate").touch()
    assert job.result(timeout=120) == list(range(4))


def test_status_with_only_a_retiring_master_does_not_say_no_master(ip, capsys, tmp_path):
    use_local(ip)
    job = _gated_job(ip, tmp_path, n=4)
    ip.run_line_magic("pymw", "use local --workers 1")
    s = session(ip)
    # The new default is dropped (as unloading would), the retiring one runs on.
    new = s.default
    s.default = None
    s.masters.remove(new)
    new.shutdown(wait=True)
    capsys.readouterr()
    try:
        ip.run_line_magic("pymw", "status")
        out = capsys.readouterr().out
        assert "no master yet" not in out and "'long' (active)" in out
    finally:
        (tmp_path / "gate").touch()
    assert job.result(timeout=120) == list(range(4))
