"""No file of an MPI job outlives it: MPICH's shared-memory segment
(/dev/shm/mpich_shm_*), hydra's topology file (/tmp/hydra_hwloc_xmlfile_*)
and the master's pymw-mpi-* directory, whichever way the job ends.

Other tests and other users may run MPI on this machine at the same time,
so nothing here counts files globally: a file belongs to a job of ours if
one of our MPI processes holds it open (watched while the job runs), and
our pymw-mpi-* directories land in a private temporary directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

from conftest import ROOT, wait_gone
from test_mpi import WAITING_IN_JOB, read_line
from pymw_magic import Master, TaskState, TaskTimeout, WorkerLost

pytest.importorskip("mpi4py", reason="the MPI backend needs pip install 'pymw-magic[mpi]'")

JOB_FILE_PREFIXES = ("mpich_shm_", "hydra_hwloc_xmlfile_")


class JobFiles:
    """Watches the process tree under ``root`` (every 20 ms, in a thread)
    and collects the MPI job files its processes hold open, and the pids
    of its MPI processes."""

    def __init__(self, root: int):
        self.root = root
        self.files: set[str] = set()
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.02)

    def sample(self) -> None:
        try:
            family = psutil.Process(self.root).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in family:
            try:
                if not any(n in " ".join(p.cmdline()) for n in ("mpiexec", "hydra", "pymw_magic.worker")):
                    continue
                self.pids.add(p.pid)
                for f in p.open_files():
                    if os.path.basename(f.path).startswith(JOB_FILE_PREFIXES):
                        self.files.add(f.path)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    def shm(self) -> set[str]:
        return {f for f in self.files if os.path.basename(f).startswith("mpich_shm_")}

    def wait_for(self, condition, timeout: float = 120.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()

    def left(self) -> list[str]:
        return sorted(f for f in self.files if os.path.exists(f))


def pymw_dirs(base) -> list[str]:
    return sorted(n for n in os.listdir(base) if n.startswith("pymw-mpi-"))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """This test's masters make their pymw-mpi-* directories here."""
    base = tmp_path / "t"
    base.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    return base


def wait_any(tasks, state, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(t.state is state for t in tasks):
        assert time.monotonic() < deadline, [t.state for t in tasks]
        time.sleep(0.02)


def square(x):
    return x * x


def exit_on(x, bad=1):
    if x == bad:
        os._exit(5)
    return x


def assert_nothing_left(watch: "JobFiles", private_tmp: "str | None" = None) -> None:
    """After a stopped watch: no process of the job, none of its MPICH
    files and (given the private temp dir) no pymw-mpi-* directory left."""
    assert wait_gone(list(watch.pids), timeout=30) == []
    assert watch.left() == []
    if private_tmp is not None:
        assert pymw_dirs(private_tmp) == []


def test_a_timeout_restart_leaves_no_file(private_tmp):
    watch = JobFiles(os.getpid())
    try:
        with Master("mpi", workers=2, timeout=3.0) as m:   # (the short tasks far within it under load)
            job = m.map_async(time.sleep, [0.01, 30, 0.01, 0.01], chunksize=1)
            results = job.result(timeout=180, return_exceptions=True)
            assert isinstance(results[1], TaskTimeout)
            assert m.submit(square, 4).result(timeout=120) == 16   # a new job serves
            watch.sample()
        assert len(watch.shm()) >= 2, watch.files   # the killed job's and its successor's
    finally:
        watch.stop()
    assert_nothing_left(watch, private_tmp)


def test_cancelling_a_running_task_leaves_no_file(private_tmp):
    watch = JobFiles(os.getpid())
    try:
        with Master("mpi", workers=2) as m:
            job = m.map_async(time.sleep, [60, 60], chunksize=1)
            wait_any(job.tasks, TaskState.RUNNING)
            assert watch.wait_for(lambda: watch.shm()), "the job's segment was seen"
            job.cancel()
            assert m.submit(square, 5).result(timeout=120) == 25   # on a new job
            watch.sample()
        assert len(watch.shm()) >= 2, watch.files   # the stopped job's and its successor's
        assert [t.state for t in job.tasks] == [TaskState.CANCELLED] * 2
    finally:
        watch.stop()
    assert_nothing_left(watch, private_tmp)


def test_a_rank_that_dies_leaves_no_file(private_tmp):
    watch = JobFiles(os.getpid())
    try:
        with Master("mpi", workers=2) as m:
            assert m.submit(square, 3).result(timeout=120) == 9
            assert watch.wait_for(lambda: watch.shm())
            results = m.map_async(exit_on, range(4), chunksize=1).result(timeout=180, return_exceptions=True)
            assert isinstance(results[1], WorkerLost)
            assert m.submit(square, 5).result(timeout=120) == 25
            watch.sample()
        assert len(watch.shm()) >= 2, watch.files
    finally:
        watch.stop()
    assert_nothing_left(watch, private_tmp)


MASTER_SCRIPT = """
import sys, threading, time
sys.path.insert(0, {root!r})
from pymw_magic import Master
{waiting_in_job}
main = threading.get_ident()

def announce(job):   # once a rank is in its task and this thread waits on the job
    while not (any(t.state.name == "RUNNING" for t in job.tasks) and waiting_in_job(main)):
        time.sleep(0.02)
    print("running", flush=True)

with Master("mpi", workers=2) as m:
    print("up", m.submit(abs, -2).result(timeout=120), flush=True)
    job = m.map_async(time.sleep, [60, 60], chunksize=1)
    threading.Thread(target=announce, args=(job,), daemon=True).start()
    try:
        job.result(timeout=120)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def start_master(tmp_path, base) -> subprocess.Popen:
    """A kernel-mode master in a child, its temporary files under ``base``."""
    script = tmp_path / "master.py"
    script.write_text(MASTER_SCRIPT.format(root=ROOT, waiting_in_job=WAITING_IN_JOB))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(base)})


def await_running(proc: subprocess.Popen) -> None:
    """Until the master's ranks are inside their tasks."""
    for expected in ("up 2", "running"):
        line = read_line(proc.stdout).strip()
        assert line == expected, (line, proc.stderr.read() if proc.poll() is not None else "")


def end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_ctrl_c_of_a_master_leaves_no_file(tmp_path, private_tmp):
    proc = start_master(tmp_path, private_tmp)
    watch = JobFiles(proc.pid)
    try:
        await_running(proc)
        assert watch.wait_for(lambda: watch.shm() and len(watch.files) >= 2), watch.files
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "interrupted" in out, err
        assert proc.returncode == 0, err
    finally:
        watch.stop()
        end(proc)
    assert_nothing_left(watch, private_tmp)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_master_s_files_go_when_the_next_master_starts(tmp_path, private_tmp, sig):
    proc = start_master(tmp_path, private_tmp)
    watch = JobFiles(proc.pid)
    try:
        await_running(proc)
        assert watch.wait_for(lambda: watch.shm() and len(watch.files) >= 2), watch.files
        watch.sample()
        proc.send_signal(sig)                  # no shutdown, no atexit
        proc.wait(timeout=30)
    finally:
        watch.stop()
        end(proc)
    # the hub sees the socket close without a goodbye and aborts its job
    assert wait_gone(list(watch.pids), timeout=30) == []
    assert len(pymw_dirs(private_tmp)) == 1    # what the dead master left
    # a new master (here, in this process: the same private temporary directory)
    with Master("mpi", workers=1) as m:
        assert m.submit(square, 6).result(timeout=120) == 36
        assert [d for d in pymw_dirs(private_tmp) if d.startswith(f"pymw-mpi-{os.getpid()}-")]
        assert all(d.startswith(f"pymw-mpi-{os.getpid()}-") for d in pymw_dirs(private_tmp))
    assert watch.left() == []
    assert pymw_dirs(private_tmp) == []


def test_a_new_master_leaves_a_live_master_s_files_alone(tmp_path, private_tmp):
    proc = start_master(tmp_path, private_tmp)
    watch = JobFiles(proc.pid)
    try:
        await_running(proc)
        assert watch.wait_for(lambda: watch.shm() and len(watch.files) >= 2), watch.files
        theirs = pymw_dirs(private_tmp)
        assert len(theirs) == 1
        with Master("mpi", workers=1) as m:
            assert m.submit(square, 7).result(timeout=120) == 49
            assert set(theirs) < set(pymw_dirs(private_tmp))
        assert watch.left() == sorted(watch.files)     # the live master's files are all there
        assert pymw_dirs(private_tmp) == theirs
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert "interrupted" in out and proc.returncode == 0, err
    finally:
        watch.stop()
        end(proc)
    assert_nothing_left(watch, private_tmp)


CTRL_C_UNDER_MPIEXEC = """
import os, sys, threading, time
sys.path.insert(0, {root!r})
from pymw_magic import Master
{waiting_in_job}
main = threading.get_ident()

def announce(job):
    while not (any(t.state.name == "RUNNING" for t in job.tasks) and waiting_in_job(main)):
        time.sleep(0.02)
    print("running", flush=True)

with Master("mpi") as m:
    job = m.map_async(time.sleep, [60] * 2, chunksize=1)
    threading.Thread(target=announce, args=(job,), daemon=True).start()
    job.result()
"""


def test_ctrl_c_under_mpiexec_leaves_no_file(tmp_path):
    from pymw_magic.backends.mpi import find_mpiexec
    script = tmp_path / "long.py"
    script.write_text(CTRL_C_UNDER_MPIEXEC.format(root=ROOT, waiting_in_job=WAITING_IN_JOB))
    proc = subprocess.Popen([find_mpiexec(), "-n", "3", sys.executable, str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    watch = JobFiles(proc.pid)
    try:
        line = read_line(proc.stdout).strip()
        assert line == "running", proc.stderr.read() if proc.poll() is not None else line
        assert watch.wait_for(lambda: watch.shm() and len(watch.files) >= 2), watch.files
        proc.send_signal(signal.SIGINT)    # a terminal's Ctrl-C (mpiexec forwards it)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
    finally:
        watch.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert_nothing_left(watch)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def test_only_directories_of_dead_masters_are_reaped_and_only_mpich_files(tmp_path):
    from pymw_magic.backends import mpi

    keep = tmp_path / "not-an-mpich-file"
    keep.write_text("x")
    shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    dead, live = [], []
    for i in range(20):
        theirs = [os.path.join(shm_dir, f"mpich_shm_pymwtest{os.getpid()}_{i}"),
                  str(tmp_path / f"hydra_hwloc_xmlfile_pymwtest{i}")]
        for path in theirs:
            with open(path, "w") as f:
                f.write("x")
        owner = dead_pid() if i % 2 else os.getpid()
        d = tmp_path / f"pymw-mpi-{owner}-{i:04d}abcd"
        d.mkdir()
        (d / "job-files").write_text("".join(p + "\n" for p in theirs) + str(keep) + "\n")
        (dead if i % 2 else live).append((d, theirs))
    try:
        removed = mpi._reap_dead_masters_files(str(tmp_path))
        assert sorted(removed) == sorted(str(d) for d, _ in dead)
        assert not any(os.path.exists(p) for d, files in dead for p in [str(d), *files])
        assert all(os.path.exists(p) for d, files in live for p in [str(d), *files])
        assert keep.exists()                    # named in the list, but not an MPICH file
        assert mpi._reap_dead_masters_files(str(tmp_path)) == []
    finally:
        for _, files in dead + live:
            for path in files:
                if os.path.exists(path):
                    os.unlink(path)
