"""One worker count, settled by the backend before the scheduler exists:
the master, its options, the scheduler, the policy and the backend agree
(real MPI under mpiexec, real local processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from pymw_magic import Master

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from pymw_magic import Master

# Asked for 4: under `mpiexec -n 3` the run has 2 worker ranks, and a
# static round-robin must deal to those 2, not to 4 slots.
with Master("mpi", workers=4, policy="round-robin") as m:
    job = m.map_async(abs, range(-8, 0), chunksize=1)
    print("RESULT", job.result(timeout=60), m.workers, m.options["workers"], flush=True)
"""


def test_workers_asked_under_mpiexec_are_the_ranks_of_the_run(tmp_path):
    pytest.importorskip("mpi4py", reason="the MPI backend needs pip install 'pymw-magic[mpi]'")
    from pymw_magic.backends.mpi import find_mpiexec
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(root=ROOT))
    proc = subprocess.run([find_mpiexec(), "-n", "3", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT [8, 7, 6, 5, 4, 3, 2, 1] 2 2" in proc.stdout.splitlines(), proc.stdout + proc.stderr


@pytest.mark.parametrize("asked", [None, 1, 3])
def test_one_worker_count_everywhere(asked):
    with Master("local", workers=asked, policy="round-robin") as m:
        n = m.workers
        assert n >= 1 and (asked is None or n == asked)
        assert m.options["workers"] == n
        assert m._backend.workers == n and m._scheduler.workers == n
        assert m.map_async(abs, range(-6, 0), chunksize=1).result(timeout=60) == [6, 5, 4, 3, 2, 1]
