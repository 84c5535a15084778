"""Batches sent ahead never keep work from an idle or starting worker.

A worker still running a batch is sent the next one ahead of time, to hide
the master's round trip for short calls.  Sent to the wrong worker, a long
task waits behind another while a worker idles: two long tasks on two
workers ran one after the other.  Each task here waits (with a deadline)
until every task of the job is running, so they meet only if they run at
once, on different workers.
"""

from __future__ import annotations

import os
import time

import pytest

from pymw_magic import Master, rules
from pymw_magic.policies import Chunking


def _meet(x: int, folder: str, n: int) -> tuple[int, bool]:
    """Say "I run", then wait (at most 30 s) until all n tasks run."""
    import os
    import time
    open(os.path.join(folder, f"{x}.running"), "w").close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len([f for f in os.listdir(folder) if f.endswith(".running")]) >= n:
            return os.getpid(), True
        time.sleep(0.01)
    return os.getpid(), False


@pytest.mark.timeout(180)
@pytest.mark.parametrize("warm", [False, True], ids=["right-after-start", "warm"])
def test_long_tasks_run_at_once_on_different_workers(tmp_path, warm):
    for trial in range(3):
        folder = tmp_path / f"{warm}-{trial}"
        folder.mkdir()
        with Master("local", workers=2) as m:
            if warm:
                m.map_async(abs, range(8)).result(timeout=60)
                deadline = time.monotonic() + 60
                while len(m.worker_info()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
            out = m.map_async(_meet, range(2), [str(folder)] * 2, [2] * 2, chunksize=1).result(timeout=90)
        assert all(met for _, met in out), f"trial {trial}: the tasks ran one after the other: {out}"
        assert len({pid for pid, _ in out}) == 2


def test_send_ahead_rule():
    chunking = Chunking()
    long = rules.single_task_above(chunking) * 10
    assert rules.send_ahead(chunking, None, others_idle=False)       # unknown: as before
    assert rules.send_ahead(chunking, 1e-4, others_idle=False)       # short calls: hide the round trip
    assert not rules.send_ahead(chunking, long, others_idle=False)   # long calls: never wait behind one
    assert not rules.send_ahead(chunking, 1e-4, others_idle=True)    # an idle worker takes it now
