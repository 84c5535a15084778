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


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "pymw-home"
    monkeypatch.setenv("PYMW_HOME", str(path))
    monkeypatch.delenv("PYMW_STORE", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    return path


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


def run(kc, code: str, timeout: float = 180) -> tuple[str, str]:
    printed: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            printed.append(msg["content"]["ename"] + ": " + msg["content"]["evalue"])

    reply = kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    return reply["content"]["status"], "".join(printed)


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
