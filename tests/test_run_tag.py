"""The run tag of tests/conftest.py: every process a test starts inherits
it, and ``tagged_processes`` finds them by it, even when conftest runs a
second time in this process (a test module importing ``tests.conftest``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import conftest
from conftest import tagged_processes, wait_gone, wait_until


def test_a_second_import_of_conftest_keeps_the_run_tag(monkeypatch):
    # restored after the test, should the import below change it
    monkeypatch.setenv("PYMW_TEST_RUN", os.environ["PYMW_TEST_RUN"])
    assert os.environ["PYMW_TEST_RUN"] == conftest.RUN_TAG
    spec = importlib.util.spec_from_file_location("tests.conftest_again", conftest.__file__)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)
    assert again.RUN_TAG == conftest.RUN_TAG
    assert os.environ["PYMW_TEST_RUN"] == conftest.RUN_TAG
    # a process started now is found by its inherited tag
    marker = f"pymw-run-tag-probe-{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(120)", marker])
    try:
        assert wait_until(lambda: tagged_processes((marker,)), 60, "the probe found by its tag") == [proc.pid]
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert wait_gone([proc.pid], timeout=30) == []


def test_a_child_run_gets_a_tag_of_its_own():
    # a pytest run started by this one (its conftest inherits our tag) must
    # not take our processes for its own
    out = subprocess.run([sys.executable, "-c", "import conftest; print(conftest.RUN_TAG)"],
                         cwd=os.path.dirname(conftest.__file__), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    child = out.stdout.strip().splitlines()[-1]
    assert child != conftest.RUN_TAG and child.split("-")[0] != str(os.getpid())
