"""``%pymw jobs [--all] [--remove NAME [--cancel]]``, ``%pymw attach`` and
``pymw_magic.jobs()`` through real Jupyter kernels: every master a kernel
makes is in the job store; another process sees the kernel's jobs, a
killed kernel's running job shows as lost with that kernel, and a cancel
asked for from another process reaches the kernel through the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

import pymw_magic
from conftest import ROOT, execute_in_kernel, wait_gone, wait_until, worker_processes
from pymw_magic import Master
from pymw_magic import store as st
from pymw_magic.store import Store, UnknownJob


@pytest.fixture
def kernels(tmp_path, monkeypatch, home):
    """Start kernels (python3 = this interpreter and this checkout) named as
    a Jupyter server names them; every one is shut down at the end."""
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pymw-magic tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", ROOT + (os.pathsep + path if path else ""))
    started = []

    def start():
        kernel_id = str(uuid.uuid4())
        km = KernelManager(kernel_name="python3", connection_file=str(tmp_path / f"kernel-{kernel_id}.json"))
        km.start_kernel(cwd=str(tmp_path))
        kc = km.client()
        kc.start_channels()
        started.append((km, kc))
        kc.wait_for_ready(timeout=90)
        return km, kc, kernel_id

    yield start
    for km, kc in started:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=False)
        km.cleanup_resources()


def run(kc, code: str, timeout: float = 120) -> tuple[str, str]:
    """Execute ``code``: (status, everything it printed, errors included)."""
    printed: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            printed.append(msg["content"]["ename"] + ": " + msg["content"]["evalue"])

    reply = execute_in_kernel(kc, code, hook, timeout)
    return reply["content"]["status"], "".join(printed)


def ok(kc, code: str) -> str:
    status, out = run(kc, code)
    assert status == "ok", out
    return out


def stored(name: str) -> st.JobRecord | None:
    try:
        return Store().job(name)
    except UnknownJob:
        return None


def table_rows(text: str) -> dict[str, list[str]]:
    """``%pymw jobs --all``'s table: the row of each job by name."""
    lines = text.strip().splitlines()
    assert lines[0].split()[:4] == ["id", "name", "backend", "state"], text
    return {line.split()[1]: line.split() for line in lines[1:]}


@pytest.mark.timeout(300)
def test_jobs_magics_across_kernels_and_a_killed_kernels_job_is_lost(home, kernels):
    km, kc, kernel_id = kernels()
    ok(kc, "%load_ext pymw_magic\n%pymw use local --workers 1")
    ok(kc, "%%pymw --map x in range(3) --name quick\nx * 2")
    ok(kc, "%%pymw --map x in range(2) --name stuck --nowait\nimport time\ntime.sleep(120)\nx")
    kernel_pid = km.provisioner.process.pid
    running = wait_until(lambda: (r := stored("stuck")) and r.counts["running"] == 1 and r,
                         what="the kernel's job to show running in the store")
    assert running.state == "active" and running.owner.kind == "kernel"
    assert running.owner.pid == kernel_pid and running.owner.kernel_id == kernel_id
    assert stored("quick").state == "finished" and stored("quick").counts["done"] == 3

    # a job of this process (every master is recorded: no call to the store here)
    with Master("local", workers=1) as mine:
        assert mine.map_async(abs, range(-5, 5), name="from-test").result(timeout=60) == [abs(x) for x in range(-5, 5)]
    wait_until(lambda: (r := stored("from-test")) and r.state == "finished", what="this process's job")

    # %pymw jobs: the kernel's own; --all: the store's, newest first, every process
    own = ok(kc, "%pymw jobs")
    assert "quick" in own and "stuck" in own and "from-test" not in own
    everything = ok(kc, "%pymw jobs --all")
    rows = table_rows(everything)
    assert list(rows) == ["from-test", "stuck", "quick"], everything
    assert rows["stuck"][3] == "active" and rows["quick"][3] == "finished" and rows["from-test"][3] == "finished"
    assert f"kernel {kernel_id}" in everything and "running 1" in everything
    listed = pymw_magic.jobs()
    assert [j.name for j in listed] == ["from-test", "stuck", "quick"]

    # --remove: an ended job goes; a running one is refused, saying how
    assert "removed job 'quick'" in ok(kc, "%pymw jobs --remove quick")
    assert stored("quick") is None
    status, out = run(kc, "%pymw jobs --remove stuck")
    assert status == "error" and "still running" in out and "--cancel" in out
    status, out = run(kc, "%pymw jobs --remove nothing-of-that-name")
    assert status == "error" and "no job 'nothing-of-that-name'" in out
    for bad in ("--remove", "--all --remove quick", "stray", "--cancel", "--remove x --cancel y"):
        status, out = run(kc, f"%pymw jobs {bad}")
        assert status == "error" and "usage: %pymw jobs" in out, (bad, out)
    status, out = run(kc, "%pymw attach nothing-of-that-name")
    assert status == "error" and "no job 'nothing-of-that-name'" in out
    status, out = run(kc, "%pymw attach")
    assert status == "error" and "usage: %pymw attach NAME" in out

    # the kernel dies with its job running: the job is lost, with that kernel, never running
    workers = [p.pid for p in worker_processes(psutil.Process(kernel_pid))]
    os.kill(kernel_pid, signal.SIGKILL)
    wait_until(lambda: not km.is_alive(), what="the kernel to die")
    lost = pymw_magic.jobs()
    stuck = next(j for j in lost if j.name == "stuck")
    assert stuck.state == "lost" and stuck.owner.kernel_id == kernel_id and stuck.owner.pid == kernel_pid
    row = next(line for line in repr(lost).splitlines() if " stuck " in line)
    assert f"kernel {kernel_id}" in row and " lost " in row and "running" not in row and "lost 2" in row
    assert "stuck" not in [j.name for j in pymw_magic.jobs(all=False)]
    assert not wait_gone(workers, timeout=30), "the dead kernel's workers stayed"

    # another kernel sees it lost, and may forget it
    km2, kc2, _ = kernels()
    ok(kc2, "%load_ext pymw_magic")
    rows = table_rows(ok(kc2, "%pymw jobs --all"))
    assert rows["stuck"][3] == "lost"
    assert "removed job 'stuck'" in ok(kc2, "%pymw jobs --remove stuck")
    assert [j.name for j in pymw_magic.jobs()] == ["from-test"]


@pytest.mark.timeout(300)
def test_remove_with_cancel_stops_the_kernels_own_running_job(home, kernels):
    km, kc, _ = kernels()
    ok(kc, "%load_ext pymw_magic\n%pymw use local --workers 1")
    ok(kc, "%%pymw --map x in range(3) --name busy --nowait\nimport time\ntime.sleep(120)\nx")
    wait_until(lambda: (r := stored("busy")) and r.counts["running"] == 1, what="the job to run")
    out = ok(kc, "%pymw jobs --remove busy --cancel")
    assert "removed job 'busy'" in out
    assert stored("busy") is None
    assert ok(kc, "print(_pymw_job.done(), _pymw_job.counts()['cancelled'])").split() == ["True", "3"]


@pytest.mark.timeout(300)
def test_a_cancel_asked_by_another_process_reaches_the_kernel_within_a_second_or_so(home, kernels):
    km, kc, _ = kernels()
    ok(kc, "%load_ext pymw_magic\n%pymw use local --workers 1")
    ok(kc, "%%pymw --map x in range(4) --name remote-cancel --nowait\nimport time\ntime.sleep(120)\nx")
    rec = wait_until(lambda: (r := stored("remote-cancel")) and r.counts["running"] == 1 and r,
                     what="the job to run")
    # the server extension's way: another process writes the request into the store
    code = f"from pymw_magic.store import Store; print(Store().request_cancel({rec.uid!r}))"
    asked = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    requested = time.monotonic()
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr
    ended = wait_until(lambda: (r := stored("remote-cancel")) and r.state == "cancelled" and r, timeout=30,
                       what="the kernel to cancel its job")
    lag = time.monotonic() - requested
    # (the tasks sleep 120 s; the margin over the poll is for a loaded machine)
    assert lag < 20 * st.FLUSH_INTERVAL, f"the owner took {lag:.2f} s to cancel (it polls the store twice a second)"
    assert ended.counts["cancelled"] == 4 and ended.cancel_requested
    assert ok(kc, "print(_pymw_job.done(), _pymw_job.counts()['cancelled'])").split() == ["True", "4"]
    assert requested - asked < 60


def test_attach_without_the_reattach_module_says_what_is_missing(home, monkeypatch):
    from pymw_magic import PymwError
    from pymw_magic.session import reattach_module

    monkeypatch.setitem(sys.modules, "pymw_magic.reattach", None)  # as an install without it
    with pytest.raises(PymwError, match=r"needs pymw_magic\.reattach.*upgrade pymw-magic"):
        reattach_module()
    with pytest.raises(PymwError, match=r"needs pymw_magic\.reattach"):
        pymw_magic.attach("anything")


def test_the_facade_exports_the_store_surface():
    for name in ("jobs", "attach", "remove"):
        assert name in pymw_magic.__all__ and callable(getattr(pymw_magic, name))
    assert isinstance(pymw_magic.jobs(), st.JobList)


SUBMITTER = """
import sys, time
from pymw_magic import Master
from pymw_magic.testing.condor import StandInSchedd
def nap(seconds):
    time.sleep(seconds)
    return seconds * 2

master = Master("condor", schedd=StandInSchedd(sys.argv[1]), chunksize=1)
job = master.map_async(nap, [1.5] * 3, name="outlives-its-script")
while job.counts()["running"] == 0:
    time.sleep(0.05)
print("running", flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(300)
def test_attach_in_a_kernel_follows_a_batch_job_whose_submitter_died(home, kernels, tmp_path):
    pytest.importorskip("htcondor2")
    from pymw_magic.testing.condor import StandInSchedd

    schedd_root = tmp_path / "schedd"
    script = tmp_path / "submitter.py"
    script.write_text(SUBMITTER)
    proc = subprocess.Popen([sys.executable, str(script), str(schedd_root)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    try:
        try:
            assert proc.stdout.readline().strip() == "running"
            wait_until(lambda: (r := stored("outlives-its-script")) and r.handle and r.handle.get("chunks"),
                       what="the job's handle in the store")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
        km, kc, _ = kernels()
        ok(kc, "%load_ext pymw_magic")
        status, out = run(kc, "%pymw attach outlives-its-script --bogus 1")
        assert status == "error" and "unknown option --bogus" in out and "condor" in out
        status, out = run(kc, "%pymw attach outlives-its-script --request-cpus many")
        assert status == "error" and "--request-cpus" in out
        out = ok(kc, "%pymw attach outlives-its-script --python python3")
        assert "attached job 'outlives-its-script'" in out and "_pymw_job" in out
        assert ok(kc, "print(_pymw_job.result(timeout=120))").strip() == "[3.0, 3.0, 3.0]"
        rec = wait_until(lambda: (r := stored("outlives-its-script")) and r.state == "finished" and r,
                         what="the attached job's row to read finished")
        assert rec.counts["done"] == 3
        assert [j.name for j in pymw_magic.jobs()].count("outlives-its-script") == 1  # the same row, continued
        # a pool job cannot be attached: it says why
        ok(kc, "%pymw use local --workers 1")
        ok(kc, "%%pymw --map x in range(2) --name pooled\nx")
        status, out = run(kc, "%pymw attach pooled")
        assert status == "error" and "only batch jobs" in out
        assert "removed job 'outlives-its-script'" in ok(kc, "%pymw jobs --remove outlives-its-script")
        assert stored("outlives-its-script") is None
    finally:
        StandInSchedd(schedd_root).stop()
