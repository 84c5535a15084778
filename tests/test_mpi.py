"""The MPI backend on real MPI (mpi4py + the mpich wheel, installed by
``make test``): from a kernel, under mpiexec, and when ranks die."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import ROOT, tagged_processes, wait_gone, wait_until
from pymw_magic import Master, TaskState, TaskTimeout, WorkerLost

# Never import mpi4py.MPI here: that would make this test process an MPI
# singleton, which is exactly what the backend avoids in a kernel.
pytest.importorskip("mpi4py", reason="the MPI backend needs pip install 'pymw-magic[mpi]'")

MPI_NAMES = ("mpiexec", "hydra_pmi_proxy", "pymw_magic.worker")


def read_line(stream, timeout: float = 120.0) -> str:
    """The next line of ``stream``, waiting at most ``timeout`` seconds."""
    got: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=lambda: got.put(stream.readline()), daemon=True).start()
    try:
        return got.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no line within {timeout:.0f} s") from None


#: source of ``waiting_in_job`` (also pasted into the scripts below)
WAITING_IN_JOB = """
def waiting_in_job(thread_id):
    # A KeyboardInterrupt cancels a job only while Job.wait blocks: is
    # that thread blocked there (on the scheduler's condition) now?
    frame = sys._current_frames().get(thread_id)
    if frame is None or frame.f_code.co_name != "wait" or "threading" not in frame.f_code.co_filename:
        return False
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("job.py"):
            return True
        frame = frame.f_back
    return False
"""
exec(WAITING_IN_JOB)


def mpi_processes() -> list[int]:
    """Every process of this test run that belongs to an MPI job (mpiexec,
    proxies, ranks), wherever it was reparented to."""
    return tagged_processes(MPI_NAMES)


@pytest.fixture
def mpi_master():
    m = Master("mpi", workers=2)
    try:
        yield m
    finally:
        m.shutdown(wait=True, cancel_futures=True)
    assert wait_gone(mpi_processes(), timeout=15) == [], "MPI processes left behind"


def square(x):
    return x * x


class Odd(Exception):
    pass


def raise_on_odd(x):
    if x % 2:
        raise Odd(f"odd {x}")
    return x


def exit_on(x, bad=3):
    if x == bad:
        os._exit(5)
    time.sleep(0.02)
    return x


def test_results_closures_and_rank_records(mpi_master):
    offset = 7
    assert list(mpi_master.map(lambda x: x + offset, range(20), timeout=120)) == [x + 7 for x in range(20)]
    job = mpi_master.map_async(square, range(500))
    assert job.result(timeout=120) == [x * x for x in range(500)]
    workers = {t.worker for t in job.tasks}
    assert workers <= {"mpi-rank1", "mpi-rank2"} and workers
    import socket
    assert {t.host for t in job.tasks} == {socket.gethostname()}   # each record names its rank's host
    info = mpi_master.worker_info()
    assert sorted(w["rank"] for w in info) == [1, 2]
    assert all(w["pid"] and w["host"] for w in info)


def test_large_array_round_trip(mpi_master):
    np = pytest.importorskip("numpy")
    arr = np.arange(2_000_000, dtype=np.float64)
    out = mpi_master.submit(np.multiply, arr, 2.0).result(timeout=120)
    assert np.array_equal(out, arr * 2)


def test_raising_task_same_errors_as_local(mpi_master):
    job = mpi_master.map_async(raise_on_odd, range(4))
    results = job.result(timeout=120, return_exceptions=True)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], Odd) and "odd 1" in str(results[1])
    assert "raise_on_odd" in str(results[1].__cause__)


def test_rank_death_fails_that_task_alone_and_the_pool_recovers(mpi_master):
    job = mpi_master.map_async(exit_on, range(8), chunksize=1)
    results = job.result(timeout=180, return_exceptions=True)
    assert isinstance(results[3], WorkerLost)
    assert "MPI job ended" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    assert job.tasks[3].attempts == 2  # charged only when it ran alone
    assert mpi_master.submit(square, 5).result(timeout=120) == 25


def test_timeout_stops_the_job_and_blames_the_right_task():
    with Master("mpi", workers=2, timeout=3.0) as m:   # (the short tasks far within it under load)
        job = m.map_async(time.sleep, [0.01, 30, 0.01, 0.01], chunksize=1)
        results = job.result(timeout=180, return_exceptions=True)
        assert isinstance(results[1], TaskTimeout)
        assert [results[i] for i in (0, 2, 3)] == [None, None, None]
    assert wait_gone(mpi_processes(), timeout=15) == []


def test_interrupt_cancels_and_leaves_no_mpi_process():
    m = Master("mpi", workers=2)
    try:
        assert m.submit(square, 2).result(timeout=120) == 4
        ranks = [w["pid"] for w in m.worker_info()]
        job = m.map_async(time.sleep, [30] * 4, chunksize=1)

        main = threading.get_ident()

        def interrupt_once_running():   # what Ctrl-C does, once a rank is inside a task
            wait_until(lambda: any(t.state is TaskState.RUNNING for t in job.tasks)
                       and waiting_in_job(main), 120)
            os.kill(os.getpid(), signal.SIGINT)

        interrupter = threading.Thread(target=interrupt_once_running)
        with pytest.raises(KeyboardInterrupt):
            interrupter.start()
            job.result(timeout=120)
        interrupter.join(timeout=30)
        assert not interrupter.is_alive()
        assert all(t.state is TaskState.CANCELLED for t in job.tasks)
        assert wait_gone(ranks, timeout=15) == [], "the running ranks were stopped"
        assert m.submit(square, 3).result(timeout=120) == 9  # a new MPI job serves
    finally:
        m.shutdown()
    assert wait_gone(mpi_processes(), timeout=15) == []


SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
from pymw_magic import Master

def cube(x):
    return x ** 3

with Master("mpi") as m:
    total = sum(m.map(cube, range(100)))
    ranks = sorted(w["rank"] for w in m.worker_info())
    print("RESULT", total, m.workers, ranks, flush=True)
print("AFTER rank", os.environ.get("PMI_RANK"), flush=True)
"""


def run_under_mpiexec(tmp_path, source: str, ranks: int = 3) -> subprocess.CompletedProcess:
    """``source`` (formatted with ``root``) as a script, run by ``mpiexec -n ranks``."""
    from pymw_magic.backends.mpi import find_mpiexec
    script = tmp_path / "script.py"
    script.write_text(source.format(root=ROOT))
    return subprocess.run([find_mpiexec(), "-n", str(ranks), sys.executable, str(script)],
                          capture_output=True, text=True, timeout=120)


def test_same_script_under_mpiexec_rank0_master_others_workers(tmp_path):
    proc = run_under_mpiexec(tmp_path, SCRIPT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"RESULT {sum(x ** 3 for x in range(100))} 2 [1, 2]" in lines
    # ranks 1 and 2 served as workers and never ran the rest of the script
    assert [l for l in lines if l.startswith("AFTER")] == ["AFTER rank 0"]


def test_missing_mpi4py_gives_install_hint():
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.modules["mpi4py"] = None  # as if not installed
        from pymw_magic import Master
        try:
            Master("mpi", workers=1)
        except ImportError as exc:
            print("ERR", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERR the MPI backend needs mpi4py" in proc.stdout
    assert "pip install 'pymw-magic[mpi]'" in proc.stdout


def test_mpi_notebook_runs_in_a_real_kernel(kernel_env):
    from test_notebooks import NOTEBOOKS, find, run_notebook, text_of

    nb, _ = run_notebook(NOTEBOOKS / "mpi.ipynb")
    assert "backend 'mpi' with 2 worker(s)" in text_of(find(nb, "%load_ext"))
    steps_cell = find(nb, "max(steps)")

    def collatz(n):
        s = 0
        while n != 1:
            n = n // 2 if n % 2 == 0 else 3 * n + 1
            s += 1
        return s

    expected = [collatz(n) / 10 for n in range(1, 201)]
    assert text_of(steps_cell) == repr((max(expected), expected[:6]))
    assert text_of(find(nb, "job = _pymw_job")) in ("['mpi-rank1', 'mpi-rank2']", "['mpi-rank1']", "['mpi-rank2']")
    assert "mpi" in text_of(find(nb, "%pymw status"))
    assert wait_gone(mpi_processes(), timeout=15) == []


from test_notebooks import kernel_env  # noqa: E402,F401  (the fixture)


LONG_SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from pymw_magic import Master

with Master("mpi") as m:
    job = m.map_async(time.sleep, [60] * 4, chunksize=1)
    while not any(t.state.name == "RUNNING" for t in job.tasks):
        time.sleep(0.02)
    print("ready", os.getpid(), flush=True)   # a rank is inside its 60 s task
    job.result()
"""


def _run_long_script(tmp_path):
    from pymw_magic.backends.mpi import find_mpiexec
    script = tmp_path / "long.py"
    script.write_text(LONG_SCRIPT.format(root=ROOT))
    proc = subprocess.Popen([find_mpiexec(), "-n", "3", sys.executable, str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    line = read_line(proc.stdout)
    assert line.startswith("ready"), proc.stderr.read() if proc.poll() is not None else line
    return proc


def test_ctrl_c_under_mpiexec_ends_the_run_at_once_with_busy_ranks(tmp_path):
    proc = _run_long_script(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)   # what a terminal's Ctrl-C sends mpiexec (it forwards it)
        proc.wait(timeout=30)             # not the 60 s the tasks would take
        err = proc.stderr.read()
        assert proc.returncode != 0, err
        # (usually rank 0 says it aborts the busy ranks; mpiexec may tear the run down first)
        assert "Traceback" not in err or "KeyboardInterrupt" in err, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert wait_gone(mpi_processes(), timeout=15) == []


TWO_MASTERS = """
import sys
sys.path.insert(0, {root!r})
from pymw_magic import Master
with Master("mpi") as m:
    print("first", sum(m.map(abs, range(10))), flush=True)
try:
    Master("mpi")
except RuntimeError as exc:
    print("second:", exc, flush=True)
"""


def test_under_mpiexec_a_second_master_is_a_clear_error_not_a_hang(tmp_path):
    proc = run_under_mpiexec(tmp_path, TWO_MASTERS)
    assert proc.returncode == 0, proc.stderr
    assert "first 45" in proc.stdout
    assert "second: under mpiexec the worker ranks serve one Master('mpi') per run" in proc.stdout


TIMEOUT_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from pymw_magic import Master
try:
    Master("mpi", timeout=1)
except ValueError as exc:
    print("refused:", exc, flush=True)
with Master("mpi") as m:
    try:
        m.map_async(abs, range(3), timeout=2)
    except ValueError as exc:
        print("job refused", flush=True)
    print("ok", sum(m.map(abs, range(4))), flush=True)
"""


def test_under_mpiexec_a_timeout_is_refused_clearly(tmp_path):
    proc = run_under_mpiexec(tmp_path, TIMEOUT_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    assert "timeout=1 cannot be honoured on the mpi backend here: under mpiexec" in proc.stdout
    assert "job refused" in proc.stdout and "ok 6" in proc.stdout


def test_a_killed_kernel_takes_its_busy_mpi_job_with_it(kernel_env):
    from jupyter_client.manager import start_new_kernel
    from test_notebooks import _run

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        reply, out = _run(kc, "from pymw_magic import Master\nimport time\n"
                              "m = Master('mpi', workers=2)\nprint(m.submit(abs, -4).result())")
        assert reply["status"] == "ok" and "4" in out, out
        reply, out = _run(kc, "job = m.map_async(time.sleep, [120] * 4, chunksize=1)\n"
                              "while not any(t.state.name == 'RUNNING' for t in job.tasks):\n"
                              "    time.sleep(0.02)\n"
                              "print('busy')")
        assert reply["status"] == "ok" and "busy" in out, out   # a rank is inside its task
        # mpiexec, proxy, hub and ranks are up (seen by their inherited run tag)
        deadline = time.monotonic() + 30
        while len(mpi_processes()) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(mpi_processes()) < 4:
            _, state = _run(kc, "print(m, job.counts())")
            import psutil
            seen = []
            for p in psutil.process_iter(["pid", "cmdline"]):
                line = " ".join(p.info["cmdline"] or ())
                if any(n in line for n in MPI_NAMES):
                    try:
                        seen.append((p.pid, line[:100], p.environ().get("PYMW_TEST_RUN")))
                    except psutil.Error:
                        seen.append((p.pid, line[:100], "?"))
            pytest.fail(f"the MPI processes are not found: kernel says {state!r}; by name: {seen}")
    finally:
        kc.stop_channels()
        os.kill(km.provisioner.process.pid, signal.SIGKILL)   # no shutdown, no atexit
        km.shutdown_kernel(now=True)
    # the hub sees the kernel's socket close without a goodbye and aborts the job
    assert wait_gone(mpi_processes(), timeout=30) == []


def test_no_mpi_library_is_diagnosed_with_an_install_hint(tmp_path):
    from pymw_magic.backends.mpi import _diagnose
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'RuntimeError: cannot load MPI library' >&2\n"
                    "echo 'libmpi.so.12: cannot open shared object file: No such file or directory' >&2\nexit 1\n")
    fake.chmod(0o755)
    said = _diagnose(str(fake))
    assert "cannot load an MPI library (libmpi.so.12: cannot open shared object file" in said
    assert "pip install 'pymw-magic[mpi]'" in said
    assert "MPI library: MPICH" in _diagnose(sys.executable)   # the mpich wheel loads
