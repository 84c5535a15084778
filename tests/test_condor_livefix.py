"""Defects the real HTCondor pool showed and the stand-in schedd now shows
too: a kernel restart must detach (not cancel) a condor job, ``--schedd``
takes a notebook name, a shutdown that cancels removes procs whose submit
was still in flight, the stand-in's daemon launcher survives its
submitter's process group, a resubmission is one cluster."""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid

import pytest

from conftest import ROOT, wait_until

htcondor2 = pytest.importorskip("htcondor2")

from pymw_magic.testing.condor import StandInSchedd  # noqa: E402
from test_jobs_magic import run  # noqa: E402  (a cell run in a real kernel, what it printed)


@pytest.fixture
def kernel(tmp_path, monkeypatch, home):
    """A real kernel (this interpreter, this checkout); shut down at the end."""
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pymw-magic tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", ROOT + (os.pathsep + path if path else ""))
    km = KernelManager(kernel_name="python3", connection_file=str(tmp_path / f"kernel-{uuid.uuid4()}.json"))
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=90)
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=False)
        km.cleanup_resources()


def ok(kc, code: str, timeout: float = 180) -> str:
    status, out = run(kc, code, timeout)
    assert status == "ok", out
    return out


SETUP = """%load_ext pymw_magic
from pymw_magic.testing.condor import StandInSchedd
schedd = StandInSchedd({root!r}, slots=1)
%pymw use condor --schedd schedd --chunksize 1
"""


@pytest.mark.timeout(400)
def test_a_kernel_restart_detaches_a_running_condor_job_and_attach_gets_every_result(kernel, tmp_path):
    km, kc = kernel
    root = str(tmp_path / "schedd")
    try:
        ok(kc, SETUP.format(root=root))
        ok(kc, "%%pymw --map n in range(6) --name overnight --nowait --out overnight\n"
               "import time\ntime.sleep(0.5)\nn ** 3")
        ok(kc, "import time\nt0 = time.monotonic()\n"
               "while not overnight.counts()['running'] and time.monotonic() - t0 < 120: time.sleep(0.1)\n"
               "assert overnight.counts()['running'], overnight.counts()")
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=120)
        ok(kc, SETUP.format(root=root))
        assert "attached job 'overnight'" in ok(kc, "%pymw attach overnight")
        out = ok(kc, "print(_pymw_job.result(timeout=240, return_exceptions=True))", timeout=300)
        assert out.strip() == str([n ** 3 for n in range(6)]), out
        # nothing was removed: every proc of the job ran to completion
        history = StandInSchedd(root).history(projection=["JobStatus", "RemoveReason"])
        assert history and all(ad["JobStatus"] == 4 for ad in history), list(history)
    finally:
        StandInSchedd(root).stop()


def test_schedd_option_takes_a_notebook_name():
    from pymw_magic import policies
    from pymw_magic.backends.condor import CondorBackend

    standin = StandInSchedd("/nonexistent/never-started")
    convert = CondorBackend.options["schedd"].convert
    policies.set_name_resolver({"myschedd": standin, "nothing": None})
    try:
        assert convert("myschedd") is standin
        assert convert("nothing") is None  # a name bound to None: the local schedd
        assert convert("schedd.example.org") == "schedd.example.org"  # no such name: a schedd's name
        assert convert("other") == "other"
    finally:
        policies.set_name_resolver(None)


# --- a shutdown that cancels while a submit is in flight ------------------------------------

def live_reason() -> str | None:
    if os.environ.get("PYMW_CONDOR_LIVE") == "1":
        return None
    return "no HTCondor pool here (PYMW_CONDOR_LIVE=1 where one answers)"


@pytest.fixture(params=["standin", "live"])
def schedd(request, tmp_path, monkeypatch):
    """The stand-in, or the real schedd (as the pool's user, PYMW_CONDOR_LIVE=1)."""
    if request.param == "live":
        why = live_reason()
        if why:
            pytest.skip(why)
        base = os.environ.get("PYMW_CONDOR_HOME")
        if base:
            monkeypatch.setenv("PYMW_HOME", os.path.join(base, f"t{uuid.uuid4().hex}"))
        yield htcondor2.Schedd()
        return
    monkeypatch.setenv("PYMW_HOME", str(tmp_path / "home"))
    s = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    yield s
    s.stop()


class SlowSubmit:
    """A schedd whose submit returns only when the test says so (a real
    schedd takes seconds to return from a big submit): the procs are in
    the queue, the submitter does not know their ids yet."""

    def __init__(self, schedd):
        self._schedd = schedd
        self.entered = threading.Event()
        self.release = threading.Event()

    def submit(self, *args, **kwargs):
        result = self._schedd.submit(*args, **kwargs)
        self.entered.set()
        assert self.release.wait(120), "the test never released the submit"
        return result

    def __getattr__(self, name):
        return getattr(self._schedd, name)


def ours(schedd, directory) -> list:
    return [ad for ad in schedd.query(projection=["ClusterId", "ProcId", "JobStatus", "Iwd"])
            if str(ad.get("Iwd", "")).rstrip("/") == str(directory).rstrip("/")]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("trial", range(3))
def test_shutdown_cancel_futures_removes_procs_of_a_submit_in_flight(schedd, trial):
    import time

    from pymw_magic import Master

    slow = SlowSubmit(schedd)
    m = Master("condor", schedd=slow, chunksize=1)
    job = m.map_async(time.sleep, [60] * 6, name="in-flight")
    assert slow.entered.wait(120), "the submit never reached the schedd"
    directory = m.backend.job_dir(job)
    wait_until(lambda: len(ours(schedd, directory)) == 6, 120, "the six procs queued")
    closing = threading.Thread(target=m.shutdown, kwargs=dict(wait=True, cancel_futures=True), daemon=True)
    closing.start()
    wait_until(lambda: job.counts()["cancelled"] == 6, 60, "the tasks cancelled")
    slow.release.set()
    closing.join(120)
    assert not closing.is_alive()
    assert job.done()
    wait_until(lambda: not ours(schedd, directory), 60, "the procs of the submit in flight removed")


# --- the stand-in's daemon launcher ------------------------------------------------------------

def _daemon_alive(root) -> bool:
    import psutil
    try:
        pid = int((root / "daemon.pid").read_text())
    except (OSError, ValueError):
        return False
    return psutil.pid_exists(pid)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("trial", range(3))
def test_the_standin_daemon_survives_its_submitters_process_group_being_killed(tmp_path, trial):
    import signal
    import subprocess

    import psutil

    root = tmp_path / "schedd"
    code = ("import sys\nfrom pymw_magic.testing.condor import StandInSchedd\n"
            "StandInSchedd(sys.argv[1]).query()\nimport time\ntime.sleep(600)\n")
    submitter = subprocess.Popen([sys.executable, "-c", code, str(root)], env=dict(os.environ, PYTHONPATH=ROOT),
                                 start_new_session=True)
    try:
        # the moment the submitter's launcher is in a session of its own, the
        # submitter's process group dies (a kernel restart).  (Not at its
        # fork: until the child's setsid, which Popen does before exec, it is
        # still in the group, and no program can be signalled out of that.)
        def detached() -> bool:
            for child in psutil.Process(submitter.pid).children():
                try:
                    if os.getsid(child.pid) != submitter.pid:
                        return True
                except ProcessLookupError:
                    pass
            return False
        wait_until(lambda: detached() or (root / "daemon.pid").exists() or (root / "daemon.log").exists(),
                   120, "the submitter to launch the daemon")
        os.killpg(submitter.pid, signal.SIGKILL)
        submitter.wait(30)
        wait_until(lambda: _daemon_alive(root), 240, "the daemon to start all the same")
    finally:
        if submitter.poll() is None:
            os.killpg(submitter.pid, signal.SIGKILL)
            submitter.wait(30)
        StandInSchedd(root).stop()


@pytest.mark.timeout(300)
def test_a_standin_daemon_that_does_not_answer_in_time_is_a_clear_error(tmp_path, monkeypatch):
    import fcntl

    from pymw_magic.testing import condor as standin_module

    root = tmp_path / "schedd"
    root.mkdir(mode=0o700)
    # another daemon's lock: the new one waits for it (30 s) instead of answering
    fd = os.open(root / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setattr(standin_module, "_START_TIMEOUT", 2.0)
    monkeypatch.setattr(standin_module, "_ANSWER_TIMEOUT", 2.0, raising=False)
    try:
        with pytest.raises(htcondor2.HTCondorException, match=r"stand-in schedd of .* (did not answer|failed)"):
            StandInSchedd(root).query()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    # the late daemon (it waits 30 s for the lock) takes over once the lock is free; it is stopped
    wait_until(lambda: (root / "daemon.json").exists() and _daemon_alive(root), 60, "the late daemon to start")
    StandInSchedd(root).stop()
    assert not _daemon_alive(root)


# --- a resubmission is one submit ----------------------------------------------------------------

class RefusingSchedd:
    """A schedd that refuses every submit (its daemon did not start)."""

    def __init__(self, schedd):
        self._schedd = schedd

    def submit(self, *args, **kwargs):
        raise htcondor2.HTCondorException("the schedd is not answering (test)")

    def __reduce__(self):  # recorded as the schedd it stands for
        return self._schedd.__reduce__()

    def __getattr__(self, name):
        return getattr(self._schedd, name)


def _cube(n):
    return n ** 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("trial", range(4))
def test_attach_resubmits_a_jobs_unsubmitted_chunks_as_one_cluster(tmp_path, monkeypatch, trial):
    import types

    import pymw_magic.reattach  # noqa: F401  (wires the batch family to the store)
    from pymw_magic import Master, attach
    from pymw_magic.backends.batch import BatchError

    monkeypatch.setenv("PYMW_HOME", str(tmp_path / "home"))
    standin = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    cube = types.FunctionType(_cube.__code__, {}, "cube")  # sent by value
    try:
        with Master("condor", schedd=RefusingSchedd(standin), chunksize=1) as m:
            job = m.map_async(cube, range(8), name="refused")
            errors = job.result(timeout=120, return_exceptions=True)
        assert all(isinstance(e, BatchError) for e in errors), errors
        from pymw_magic import store
        store.recorder().flush()
        again = attach("refused", schedd=standin)
        assert again.result(timeout=240) == [n ** 3 for n in range(8)]
        clusters = {ad["ClusterId"] for ad in standin.history(projection=["ClusterId", "ProcId"])}
        assert len(clusters) == 1, f"resubmitted as {len(clusters)} clusters"
        again.master.shutdown(wait=True)
    finally:
        standin.stop()
