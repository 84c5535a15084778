"""Shared fixtures: a master per test, and a check that no worker process
outlives the test that started it."""

from __future__ import annotations

import atexit
import faulthandler
import inspect
import os
import signal
import shutil
import sys
import tempfile
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Every master records its jobs in the job store: before pymw_magic is
# imported, point it at a directory of this run (inherited by the kernels,
# scripts and servers the tests start), never the user's data directory.
if "PYMW_HOME" not in os.environ:
    TEST_HOME = tempfile.mkdtemp(prefix="pymw-test-home-")
    os.environ["PYMW_HOME"] = TEST_HOME
    atexit.register(shutil.rmtree, TEST_HOME, ignore_errors=True)
else:
    TEST_HOME = os.environ["PYMW_HOME"]

from pymw_magic import Master  # noqa: E402

#: inherited by every process this test run starts (kernels, mpiexec, ranks,
#: workers): finds them even once they are reparented away from us.  Kept
#: when this file runs again in this process (imported under a second name,
#: ``tests.conftest``): a new tag would be inherited by every process started
#: afterwards while tagged_processes still looked for the old one.
_inherited = os.environ.get("PYMW_TEST_RUN", "")
RUN_TAG = (_inherited if _inherited.startswith(f"{os.getpid()}-")
           else f"{os.getpid()}-{time.time_ns()}")
os.environ["PYMW_TEST_RUN"] = RUN_TAG


def gated(path):
    """A task that returns its worker's pid once the test opens its gate
    (creates the file ``path``; "now": at once).  Self-contained (its
    imports inside): sent by value (:func:`by_value`) or as source
    (:data:`SCRIPT_HEAD`), never imported from here by a worker."""
    import os
    import time
    if path == "now":
        return os.getpid()
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError("gate never opened")
        time.sleep(0.01)
    return os.getpid()


#: the head of a script a test runs in a process of its own (``.format``
#: it with ``root=ROOT`` and the rest): pymw_magic from this checkout, and
#: :func:`gated`
SCRIPT_HEAD = """\
import gc, os, signal, sys, threading, time
sys.path[:0] = [{root!r}]
from pymw_magic import Master

""" + inspect.getsource(gated).replace("{", "{{").replace("}", "}}")


def tagged_processes(names: tuple[str, ...]) -> list[int]:
    """Live processes of this test run (anywhere on the machine) whose
    command line contains one of ``names``."""
    out = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == me or not any(n in " ".join(p.info["cmdline"] or ()) for n in names):
                continue
            if p.environ().get("PYMW_TEST_RUN") == RUN_TAG and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def worker_processes(root: psutil.Process | None = None) -> list[psutil.Process]:
    """Live pymw worker processes descending from ``root`` (default: us)."""
    root = root or psutil.Process()
    out = []
    for p in root.children(recursive=True):
        try:
            if "pymw_magic.worker" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still alive (not zombies) after waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and _not_zombie(p)]
        if alive:
            time.sleep(0.05)
    return alive


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A job store of this test's own, for this process and the kernels and
    scripts it starts (recording on, no kernel session name inherited)."""
    path = tmp_path / "pymw-home"
    monkeypatch.setenv("PYMW_HOME", str(path))
    monkeypatch.delenv("PYMW_STORE", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    return path


#: a copy of the run's stderr, made before any test captures fd 2
_STDERR = os.dup(sys.__stderr__.fileno())
#: seconds past a test's own pytest-timeout limit before the backstop acts
BACKSTOP = 120


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item):
    """The backstop behind pytest-timeout.  Its SIGALRM does not reach a
    main thread blocked in C, nor one whose signal was lost as it started
    a lock wait: a hung test would then use up all of CI's time, silently.
    ``BACKSTOP`` s after the test's limit, every thread's stack goes to
    stderr and the run exits, red at once and showing where it hung."""
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0] if marker and marker.args else item.config.getini("timeout") or 300)
    faulthandler.dump_traceback_later(limit + BACKSTOP, file=_STDERR, exit=True)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in the tests that send one, even when
    the suite was started in the background of a script (a non-interactive
    shell starts background jobs with SIGINT ignored, and Python keeps that)."""
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(autouse=True)
def no_orphan_workers():
    """Every test must leave no worker process of its own behind."""
    before = {p.pid for p in worker_processes()}
    yield
    # the processes a test starts carry this tag, or no check that looks for them can see them
    assert os.environ.get("PYMW_TEST_RUN") == RUN_TAG, "the run's process tag was changed"
    leftover = [p.pid for p in worker_processes() if p.pid not in before]
    alive = wait_gone(leftover, timeout=10)
    assert not alive, f"worker processes left behind: {alive}"


@pytest.fixture
def master():
    m = Master("local", workers=2)
    try:
        yield m
    finally:
        m.shutdown(wait=True, cancel_futures=True)


def by_value(fn):
    """``fn`` made afresh, so cloudpickle sends it by value: a test
    module's own functions would be pickled by reference, and batch nodes
    (the HTCondor and BOINC stand-ins' too) cannot import the tests."""
    import types
    return types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def wait_until(predicate, timeout: float = 60.0, what: str = "the condition"):
    """Poll ``predicate`` until it returns something true, and return that;
    fail (never hang) after ``timeout`` seconds: tests wait on conditions,
    never on fixed sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def execute_in_kernel(kc, code: str, output_hook, timeout: float = 120) -> dict:
    """Run ``code`` in a kernel as a front end would, and return its reply.

    A request that reaches ipykernel while it still aborts the queue after
    the error of the cell before (its "stop aborting" message is posted
    from another thread, so one sent at once may come first) is answered
    "aborted" without running: it is sent again, as a user would re-run it."""
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.execute_interactive(code, output_hook=output_hook,
                                       timeout=max(1.0, deadline - time.monotonic()))
        if reply["content"]["status"] != "aborted" or time.monotonic() > deadline:
            return reply


def wait_for_submitted(home, name: str, n: int, timeout: float) -> dict:
    """Wait until the store at ``home`` holds batch job ``name`` with all
    ``n`` chunks handed to the engine (each has its proc), and return the
    job's handle: the moment a test may kill the submitter."""
    from pymw_magic import store
    st = store.open_store(home)

    def handle():
        try:
            h = st.job(name).handle or {}
        except store.UnknownJob:
            return None
        chunks = h.get("chunks") or {}
        return h if len(chunks) == n and all(c.get("proc") for c in chunks.values()) else None
    return wait_until(handle, timeout, f"job {name!r} submitted in the store")


@pytest.fixture
def fast_switching():
    """Switch threads as often as possible, so that races show."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)
