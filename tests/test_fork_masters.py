"""A forked child's copy of a master, on every pool backend (the local
backend's own connections are covered in test_hostile15_fork): the child
can neither use nor stop the parent's workers.  Before, a child that ended
normally ran the exit functions on its copies and terminated the parent's
MPI run; one that dropped its copy ran the master's finalizer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import SCRIPT_HEAD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = SCRIPT_HEAD + textwrap.dedent("""

    gate = {gate!r}
    m = Master({backend!r}, workers=1, retries=0)
    job = m.map_async(gated, [gate])
    deadline = time.monotonic() + 120
    while job.counts()["running"] < 1:
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)
    worker = m.worker_info()[0]["pid"]
    pid = os.fork()
    if pid == 0:
        try:
            m.submit(abs, -1)
        except RuntimeError as exc:
            if "made before this process was forked" not in str(exc):
                os._exit(5)
        else:
            os._exit(3)            # the copy took a task for the parent's workers
        if {how!r} == "exit":
            with m:                # leaving the block, then the exit functions
                pass
            sys.exit(0)
        del m, job                 # the child drops its copy of the master
        gc.collect()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
    open(gate, "w").close()
    values = job.result(timeout=120, return_exceptions=True)
    print("RESULT", values == [worker], repr(values)[:300], flush=True)
    assert m.submit(abs, -2).result(timeout=120) == 2
    m.shutdown()
    print("SERVED", flush=True)
""")


@pytest.mark.parametrize("how", ["exit", "drop"])
@pytest.mark.parametrize("backend", ["mpi", "local"])
def test_a_forked_childs_copy_neither_uses_nor_stops_the_parents_workers(tmp_path, backend, how):
    if backend == "mpi":
        pytest.importorskip("mpi4py", reason="the MPI backend needs pip install 'pymw-magic[mpi]'")
    script = tmp_path / "fork.py"
    script.write_text(SCRIPT.format(root=ROOT, gate=str(tmp_path / "gate"), backend=backend, how=how))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    lines = {x.split(" ", 1)[0]: x for x in out.stdout.splitlines()}
    assert lines.get("CHILD") == "CHILD 0", f"the child's copy took a task (3) or said something else (5): " \
                                            f"{out.stdout} {out.stderr[-2000:]}"
    assert lines.get("RESULT", "").startswith("RESULT True"), (
        f"the parent's running task did not finish on its own worker after the child's {how}: "
        f"{out.stdout} {out.stderr[-3000:]}")
    assert "SERVED" in lines and out.returncode == 0, out.stderr[-3000:]
