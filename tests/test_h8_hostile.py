"""Hostile checks of a forked child's copy of a parent's *jobs* (the
masters' copies are covered by test_fork_masters): the child must neither
stop the parent's workers through a job's copy nor hang on a lock a thread
of the parent held at the fork."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import SCRIPT_HEAD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CANCEL = SCRIPT_HEAD + textwrap.dedent("""

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
        job.cancel()            # the child's copy of the parent's job
        os._exit(0)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("CHILD hung", flush=True)
            break
        time.sleep(0.01)
    print("ALIVE", worker, os.path.exists(f"/proc/{{worker}}"), flush=True)
    open(gate, "w").close()
    values = job.result(timeout=120, return_exceptions=True)
    print("RESULT", values == [worker], repr(values)[:300], flush=True)
    m.shutdown()
""")


@pytest.mark.parametrize("backend", ["mpi", "local"])
def test_a_childs_cancel_of_the_parents_job_does_not_stop_the_parents_worker(tmp_path, backend):
    if backend == "mpi":
        pytest.importorskip("mpi4py", reason="the MPI backend needs pip install 'pymw-magic[mpi]'")
    script = tmp_path / "cancel.py"
    script.write_text(CANCEL.format(root=ROOT, gate=str(tmp_path / "gate"), backend=backend))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    lines = {x.split(" ", 1)[0]: x for x in out.stdout.splitlines()}
    assert "CHILD" not in lines, out.stdout
    assert lines.get("RESULT", "").startswith("RESULT True"), (
        f"the child's job.cancel() stopped the parent's running task: {out.stdout} {out.stderr[-3000:]}")
    assert out.returncode == 0, out.stderr[-3000:]


RACE = SCRIPT_HEAD + textwrap.dedent("""

    m = Master("local", workers=2)
    hung = 0
    for i in range(40):
        job = m.map_async(abs, range(-20000, 0), chunksize=1)
        time.sleep(0.005 * (i % 5))
        pid = os.fork()            # the serving threads are busy with the job
        if pid == 0:
            try:
                {action}
            except RuntimeError:
                pass
            os._exit(0)
        deadline = time.monotonic() + 10
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                hung += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        job.cancel()
    print("HUNG", hung, flush=True)
    m.terminate()
""")


@pytest.mark.parametrize("action", ["job.cancel()", "job.wait(0.1)", "list(job.as_completed(timeout=0.1))"])
def test_a_child_forked_while_the_workers_are_served_does_not_hang_on_a_jobs_copy(tmp_path, action):
    script = tmp_path / "race.py"
    script.write_text(RACE.format(root=ROOT, action=action))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert "HUNG 0" in out.stdout, f"{action} hung in forked children: {out.stdout} {out.stderr[-3000:]}"
    assert out.returncode == 0, out.stderr[-3000:]


WAIT = SCRIPT_HEAD + textwrap.dedent("""

    gate = {gate!r}
    m = Master("local", workers=1, retries=0)
    job = m.map_async(gated, [gate])
    it = m.map(gated, [gate])
    pid = os.fork()
    if pid == 0:
        try:
            {action}
        except RuntimeError as exc:
            os._exit(0 if "forked" in str(exc) else 5)
        os._exit(3)
    deadline = time.monotonic() + 30
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            print("CHILD hung", flush=True)
            break
        time.sleep(0.01)
    else:
        print("CHILD ended", flush=True)
    open(gate, "w").close()
    print("PARENT", len(job.result(timeout=120)), len(list(it)), flush=True)
    m.shutdown()
""")


@pytest.mark.parametrize("action", ["job.result()", "list(job.as_completed())", "list(it)"])
def test_a_child_waiting_on_the_parents_unfinished_job_is_told_not_left_hanging(tmp_path, action):
    # The child's copy of the parent's job never moves (its tasks run for
    # the parent): a wait without a timeout waited for ever.
    script = tmp_path / "wait.py"
    script.write_text(WAIT.format(root=ROOT, gate=str(tmp_path / "gate"), action=action))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert "CHILD ended" in out.stdout, f"{action} in the child: {out.stdout} {out.stderr[-3000:]}"
    assert "PARENT 1 1" in out.stdout and out.returncode == 0, out.stdout + out.stderr[-3000:]


LISTS = SCRIPT_HEAD + textwrap.dedent("""

    m = Master("local", workers=1)
    big = os.urandom(30_000_000)
    stop = threading.Event()
    started = threading.Event()

    def pump():
        while not stop.is_set():
            def f(x, big=big):   # a new function each time: pickled under the master's lock
                return len(big) + x
            started.set()
            m.submit(f, 1).result(timeout=60)

    threading.Thread(target=pump, daemon=True).start()
    assert started.wait(60)
    hung = 0
    for i in range(5):
        pid = os.fork()
        if pid == 0:
            {action}
            os._exit(0)
        deadline = time.monotonic() + 10
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                hung += 1
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
    stop.set()
    print("HUNG", hung, flush=True)
    m.terminate()
""")


@pytest.mark.parametrize("action", ["m.jobs", "m.submit_jobs"])
def test_a_child_forked_while_another_thread_submits_can_list_its_copys_jobs(tmp_path, action):
    # submit() holds the master's lock while it pickles a new function; a
    # child forked then inherited it held by a thread it does not have.
    script = tmp_path / "lists.py"
    script.write_text(LISTS.format(root=ROOT, action=action))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert "HUNG 0" in out.stdout, f"{action} hung in forked children: {out.stdout} {out.stderr[-3000:]}"
    assert out.returncode == 0, out.stderr[-3000:]


DOUBLE = SCRIPT_HEAD + textwrap.dedent("""

    def slow(x):
        time.sleep(60)
        return x

    m = Master("local", workers=2, retries=0)
    job = m.map_async(slow, range(200000))
    deadline = time.monotonic() + 60
    while job.counts()["running"] < 2:
        assert time.monotonic() < deadline, "the tasks never started"
        time.sleep(0.01)

    def hammer():                  # Ctrl-C twice, as fast as a user can
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0)              # (the main thread may take the first meanwhile)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Timer(0.5, hammer).start()
    start = time.monotonic()
    try:
        try:
            job.result()
        except KeyboardInterrupt:
            print("INTERRUPTED", round(time.monotonic() - start, 1), flush=True)
            time.sleep(1)          # (where a second interrupt may land)
    except KeyboardInterrupt:
        pass
    start = time.monotonic()
    m.shutdown(wait=True)
    print("SHUTDOWN", round(time.monotonic() - start, 1), flush=True)
""")


def test_two_ctrl_c_at_once_during_job_result_neither_get_lost_nor_hang_shutdown(tmp_path):
    script = tmp_path / "double.py"
    script.write_text(DOUBLE.format(root=ROOT))
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung: {exc.stdout!r}")
    assert "INTERRUPTED" in out.stdout and "SHUTDOWN" in out.stdout, out.stdout + out.stderr[-3000:]
