"""Hostile checks of a forked child next to a master: a child of a process
that runs a Master (os.fork, multiprocessing's fork context) holds copies
of that master's objects; what it does with them — ending normally, which
runs the interpreter's exit functions, or dropping its copy — must never
touch the parent's workers, their tasks or their shared memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, SCRIPT_HEAD

SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    gate = {gate!r}
    m = Master("local", workers=1, retries=0)
    job = m.map_async(gated, [gate])
    deadline = time.monotonic() + 120
    while job.counts()["running"] < 1:
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)
    worker = m.worker_info()[0]["pid"]
    pid = os.fork()
    if pid == 0:
        if {how!r} == "exit":
            sys.exit(0)            # the interpreter's exit functions run here
        del m, job                 # the child drops its copy of the master
        gc.collect()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    open(gate, "w").close()
    values = job.result(timeout=120, return_exceptions=True)
    print("RESULT", values == [worker], repr(values)[:300])
    m.shutdown()
""")


@pytest.mark.parametrize("how", ["exit", "drop"])
@pytest.mark.parametrize("trial", range(2))
def test_a_forked_child_leaves_the_parents_workers_and_running_task_alone(tmp_path, how, trial):
    script = tmp_path / "fork.py"
    script.write_text(SCRIPT.format(root=ROOT, gate=str(tmp_path / "gate"), how=how))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][0]
    assert line.startswith("RESULT True"), (
        f"the parent's running task did not finish on its own worker after the child's {how}: {line}")


STORE_SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    import multiprocessing
    os.environ["PYMW_HOME"] = {home!r}
    from pymw_magic import store

    def square(x):
        return x * x

    def in_child(name, how):
        with Master("local", workers=1) as c:
            assert c.map_async(square, [3], name=name).result(timeout=120) == [9]
        if how == "wait":  # the child's own flusher writes it (no flush called)
            deadline = time.monotonic() + 60
            while name not in {{r.name for r in store.jobs()}}:
                if time.monotonic() > deadline:
                    os._exit(4)
                time.sleep(0.02)
            os._exit(0)
        sys.exit(0)  # the exit functions flush what is left

    gate = {gate!r}
    m = Master("local", workers=1)
    job = m.map_async(gated, [gate], name="parent-job")
    deadline = time.monotonic() + 120
    while job.counts()["running"] < 1:
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)
    store.recorder().flush()
    if {how!r} == "wait":
        p = multiprocessing.get_context("fork").Process(target=in_child, args=("child-job", "wait"))
        p.start()
        p.join(180)
        code = p.exitcode
    else:
        pid = os.fork()
        if pid == 0:
            in_child("child-job", "exit")
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    rows = {{r.name: r for r in store.open_store().jobs()}}
    print("CHILD", code)
    print("RECORDED", "child-job" in rows and rows["child-job"].state == "finished")
    print("PARENT", rows["parent-job"].state, rows["parent-job"].counts.get("cancelled"))
    open(gate, "w").close()
    assert len(job.result(timeout=120)) == 1
    m.shutdown()
""")


@pytest.mark.parametrize("how", ["exit", "wait"])
def test_a_forked_childs_jobs_are_recorded_and_the_parents_left_alone(tmp_path, how):
    script = tmp_path / "store.py"
    script.write_text(STORE_SCRIPT.format(root=ROOT, home=str(tmp_path / "home"), gate=str(tmp_path / "gate"),
                                          how=how))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(x.split(" ", 1) for x in out.stdout.splitlines() if x.split(" ", 1)[0] in
                 ("CHILD", "RECORDED", "PARENT"))
    assert lines["CHILD"] == "0", f"the child's job was not in the store in time: {out.stdout}"
    assert lines["RECORDED"] == "True", f"the forked child's job was never recorded: {out.stdout}"
    assert lines["PARENT"] == "active 0", f"the child wrote the parent's running job: {lines['PARENT']}"


LIFELINE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path[:0] = [{root!r}]
    from pymw_magic import Master

    m = Master("local", workers=2)
    assert list(m.map(abs, [-1, -2, -3])) == [1, 2, 3]
    workers = [w["pid"] for w in m.worker_info()]
    pid = os.fork()
    if pid == 0:   # a child that outlives its parent (a daemon, a pool worker of the user's)
        deadline = time.monotonic() + 300
        while not os.path.exists({gate!r}) and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)
    print("PIDS", pid, *workers, flush=True)
    sys.stdin.readline()
    os.kill(os.getpid(), 9)   # the master dies without a word
""")


@pytest.mark.parametrize("trial", range(2))
def test_workers_end_with_their_killed_master_while_a_child_it_forked_lives_on(tmp_path, trial):
    """A child forked by the master's process inherited the workers'
    lifelines: the workers outlived their SIGKILLed master for as long as
    the child lived."""
    import psutil

    from conftest import wait_gone
    script = tmp_path / "lifeline.py"
    gate = tmp_path / "gate"
    script.write_text(LIFELINE_SCRIPT.format(root=ROOT, gate=str(gate)))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    child = None
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line
        child, *workers = [int(x) for x in line.split()[1:]]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
        assert psutil.pid_exists(child), "the forked child should still be running"
        left = wait_gone(workers, timeout=60)
        assert not left, f"workers {left} outlived their killed master while its forked child lived"
    finally:
        gate.write_text("")
        if child is not None:
            wait_gone([child], timeout=30)
            if psutil.pid_exists(child):
                os.kill(child, 9)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
