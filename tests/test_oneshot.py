"""The batch family's one-shot worker and job directory, run for real: each
chunk runs in a fresh sandbox holding only the files an engine would
transfer, through ``python -m pymw_magic.worker run`` or through the
shipped zipapp with ``python -I -S`` (no site-packages: only the archive)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, wait_gone, wait_until
from pymw_magic.errors import PayloadError, TaskFailed
from pymw_magic.jobdir import ChunkOutput, Invocation, JobDir, OutputCorrupt, OutputMissing, TaskOutcome
from pymw_magic.oneshot import MAGIC, seal

TIMEOUT = 120


def run_node(jd: JobDir, index: int, *, via: str = "zipapp", python: str = sys.executable,
             sandbox: pathlib.Path | None = None, keep: bool = True, drop: tuple[str, ...] = (),
             wait: bool = True, replace: dict[str, bytes] | None = None):
    """Lay out a sandbox as an engine would (only the invocation's inputs),
    run the node there, bring the output back into the job directory."""
    inv = jd.invocation(index, python=python)
    sandbox = sandbox or jd.path.parent / f"sandbox-{jd.name}-{index}-{time.monotonic_ns()}"
    sandbox.mkdir()
    for path in inv.inputs:
        if path.name not in drop:
            shutil.copy(path, sandbox / path.name)
    for name, data in (replace or {}).items():  # (damage on the way: the master's copy is intact)
        (sandbox / name).write_bytes(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    if via == "zipapp":
        cmd = [python, "-I", "-S", *inv.arguments]
    else:
        env["PYTHONPATH"] = ROOT
        cmd = [python, "-m", "pymw_magic.worker", *inv.arguments[1:]]
    if not wait:
        return subprocess.Popen(cmd, cwd=sandbox, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.run(cmd, cwd=sandbox, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    out = sandbox / inv.outputs[0]
    assert out.exists(), f"no output written; stderr: {proc.stderr}"
    shutil.copy(out, jd.output_path(index))
    return proc


def job(tmp_path, fn, chunks: list[list[tuple]], name: str = "job") -> JobDir:
    jd = JobDir.create(tmp_path / "jobs", name)
    jd.write_function(fn)
    for i, tasks in enumerate(chunks):
        jd.write_chunk(i, tasks)
    return jd


def make_task():
    """A task function pickled by value (local to a function, like a notebook's)."""
    def task(x, scale=1):
        print(f"out {x}")
        print(f"err {x}", file=sys.stderr)
        if x == 3:
            raise ValueError(f"three is bad ({x})")
        if x == 4:
            raise SystemExit(7)
        return x * scale
    return task


class Touch:
    """Pickles as a call to ``Path.touch``: the marker exists iff it was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def refused(out: ChunkOutput, seqs) -> None:
    assert [o.seq for o in out.outcomes] == list(seqs)
    for o in out.outcomes:
        assert not o.ok and o.value is None
        assert o.failure[1] == "pymw_magic.errors.SignatureError"
        assert o.failure[2].startswith("refused: signature"), o.failure
        assert "nothing" in o.failure[2] and "unpickled" in o.failure[2]


# --- results -----------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["zipapp", "module"])
def test_a_chunk_runs_with_outputs_errors_times_and_host(tmp_path, via):
    jd = job(tmp_path, make_task(), [[(10 + x, (x,), {"scale": 5}) for x in range(6)]])
    before = time.time()
    run_node(jd, 0, via=via)
    out = jd.read_output(0)
    assert out.host == socket.gethostname()
    assert out.python.split(".")[:2] == [str(v) for v in sys.version_info[:2]]
    assert before <= out.started <= out.ended <= time.time()
    assert [o.seq for o in out.outcomes] == [10, 11, 12, 13, 14, 15]
    by = {o.seq: o for o in out.outcomes}
    assert [by[s].value for s in (10, 11, 12, 15)] == [0, 5, 10, 25]
    assert all(by[s].ok and by[s].failure is None for s in (10, 11, 12, 15))
    assert by[11].stdout == "out 1\n" and by[11].stderr == "err 1\n"
    exc_bytes, type_name, message, tb = by[13].failure
    assert not by[13].ok and type_name == "ValueError" and message == "three is bad (3)"
    assert ", in task" in tb and "oneshot.py" not in tb  # (the story starts at the task)
    import pickle
    assert isinstance(pickle.loads(exc_bytes), ValueError)
    assert by[14].failure[1] == "SystemExit" and by[14].failure[2] == "7"  # and the next task still ran
    starts = [o.start for o in out.outcomes]
    assert starts == sorted(starts) and all(o.start <= o.end for o in out.outcomes)
    assert out.started <= starts[0] and out.outcomes[-1].end <= out.ended


def test_a_result_that_cannot_be_pickled_fails_only_its_task(tmp_path):
    def task(x):
        if x == 1:
            return (i for i in range(3))  # a generator: no pickle for it
        return x
    jd = job(tmp_path, task, [[(0, (0,), {}), (1, (1,), {}), (2, (2,), {})]])
    run_node(jd, 0)
    out = jd.read_output(0)
    assert [o.ok for o in out.outcomes] == [True, False, True]
    assert out.outcomes[1].failure[1] == "pymw_magic.errors.PayloadError"
    assert "cannot be pickled" in out.outcomes[1].failure[2] and "generator" in out.outcomes[1].failure[2]


def test_function_payloads_and_cell_functions_run_on_the_node(tmp_path):
    """What the master's function cache pickles (a %%pymw cell is a
    cellfunc object) loads from the zipapp alone."""
    from pymw_magic.cellfunc import compile_cell
    from pymw_magic.payload import FunctionCache
    cell = compile_cell("y = x * factor\ny + 1\n", params=["x"]).bind({"factor": 3})
    payload = FunctionCache().get(cell)
    jd = JobDir.create(tmp_path / "jobs", "cells")
    jd.write_function(payload)
    jd.write_chunk(0, [(0, (2,), {}), (1, (5,), {})])
    run_node(jd, 0)
    assert [o.value for o in jd.read_output(0).outcomes] == [7, 16]


# --- the job directory -------------------------------------------------------------------

def test_job_directory_layout_permissions_and_reopen(tmp_path):
    jd = job(tmp_path, make_task(), [[(0, (1,), {})], [(1, (2,), {})]])
    assert stat.S_IMODE(os.stat(jd.path).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(jd.path / "key").st_mode) == 0o600
    assert jd.log_path == jd.path / "events.log"
    inv = jd.invocation(1, python="/opt/py/bin/python3.11")
    assert isinstance(inv, Invocation)
    assert inv.executable == "/opt/py/bin/python3.11"
    assert inv.arguments == ["pymw-runtime.pyz", "run", "1.in", "1.out", "--function", "function.bin",
                             "--key", "key"]
    assert [p.name for p in inv.inputs] == ["pymw-runtime.pyz", "function.bin", "key", "1.in"]
    assert all(p.is_absolute() and p.exists() for p in inv.inputs)
    assert inv.outputs == ["1.out"]
    assert jd.output_path(1) == jd.path / "out" / "1.out"
    run_node(jd, 1)
    again = JobDir.open(jd.path)  # (another process reattaching)
    assert again.key == jd.key and again.job_id == jd.job_id
    assert [o.value for o in again.read_output(1).outcomes] == [2]
    again.write_chunk(2, [(5, (7,), {})])  # a reopened directory can still write chunks
    run_node(again, 2)
    assert again.read_output(2).outcomes[0].value == 7
    with pytest.raises(FileExistsError):
        JobDir.create(tmp_path / "jobs", "job")
    jd.remove()
    assert not jd.path.exists()
    jd.remove()  # (twice: nothing left to do)
    with pytest.raises(FileNotFoundError, match="not a pymw-magic job directory"):
        JobDir.open(jd.path)
    broken = JobDir.create(tmp_path / "jobs", "broken")
    (broken.path / "job.json").write_text("[]")
    with pytest.raises(ValueError, match="not a pymw-magic job directory"):
        JobDir.open(broken.path)
    (broken.path / "key").write_text("garbage")
    with pytest.raises(ValueError, match="not a pymw-magic job directory"):
        JobDir.open(broken.path)


def test_remove_refuses_a_directory_that_is_not_a_job(tmp_path):
    jd = JobDir.create(tmp_path, "j")
    (jd.path / "job.json").unlink()
    (jd.path / "key").unlink()
    with pytest.raises(ValueError, match="does not look like"):
        jd.remove()
    assert jd.path.exists()


def test_unpicklable_function_or_argument_fails_before_anything_is_written(tmp_path):
    lock = threading.Lock()

    def uses_lock(x):
        with lock:
            return x
    jd = JobDir.create(tmp_path, "j")
    with pytest.raises(PayloadError, match=r"'lock' \(_thread.lock\) cannot be sent"):
        jd.write_function(uses_lock)
    assert not (jd.path / "function.bin").exists()
    with pytest.raises(RuntimeError, match="write_function"):
        jd.write_chunk(0, [(0, (1,), {})])
    jd.write_function(make_task())
    with pytest.raises(PayloadError, match=r"argument 1 of task 8 \(_thread.lock\)"):
        jd.write_chunk(0, [(7, (1, 2), {}), (8, (1, threading.Lock()), {})])
    with pytest.raises(PayloadError, match=r"keyword argument 'k' of task 9"):
        jd.write_chunk(0, [(9, (1,), {"k": threading.Lock()})])
    assert list((jd.path / "in").iterdir()) == []


def test_read_output_names_the_file_and_what_is_wrong(tmp_path):
    jd = job(tmp_path, make_task(), [[(0, (1,), {}), (1, (2,), {})], [(2, (1,), {})]])
    with pytest.raises(OutputMissing, match=r"out/0.out: missing") as err:
        jd.read_output(0)
    assert isinstance(err.value, TaskFailed) and err.value.path == str(jd.output_path(0))
    run_node(jd, 0)
    good = jd.output_path(0).read_bytes()

    def corrupt(data: bytes, reason: str, index: int = 0) -> OutputCorrupt:
        jd.output_path(index).write_bytes(data)
        with pytest.raises(OutputCorrupt) as e:
            jd.read_output(index)
        assert e.value.reason == reason and str(jd.output_path(index)) in str(e.value), str(e.value)
        return e.value

    corrupt(b"", "empty")
    corrupt(b"\x80\x05K\x01.", "not a pymw-magic file")  # a bare pickle is never loaded
    corrupt(good[:len(good) // 2], "truncated")
    flipped = bytearray(good)
    flipped[-40] ^= 1
    corrupt(bytes(flipped), "bad signature")
    corrupt(good + b"x", "bad signature")
    # Another job's output (signed with its own key), and this job's output of another chunk.
    other = job(tmp_path, make_task(), [[(0, (1,), {})]], name="other")
    run_node(other, 0)
    corrupt(other.output_path(0).read_bytes(), "bad signature")
    corrupt(good, "wrong job", index=1)
    jd.output_path(0).write_bytes(good)
    assert [o.value for o in jd.read_output(0).outcomes] == [1, 2]


def test_no_prefix_of_an_output_verifies(tmp_path):
    """A run killed while writing never leaves a file that reads as good."""
    jd = job(tmp_path, make_task(), [[(s, (s % 3,), {}) for s in range(20)]])
    run_node(jd, 0)
    good = jd.output_path(0).read_bytes()
    for cut in list(range(0, 64)) + list(range(64, len(good), max(1, len(good) // 300))):
        jd.output_path(0).write_bytes(good[:cut])
        with pytest.raises(OutputCorrupt) as e:
            jd.read_output(0)
        assert e.value.reason in ("empty", "truncated"), (cut, e.value)


def test_a_node_killed_mid_run_leaves_no_output(tmp_path):
    started = tmp_path / "started"

    def slow(x):
        pathlib.Path(started).touch()
        time.sleep(60)
        return x
    jd = job(tmp_path, slow, [[(0, (1,), {})]])
    sandbox = tmp_path / "sb"
    proc = run_node(jd, 0, sandbox=sandbox, wait=False)
    try:
        wait_until(started.exists, timeout=TIMEOUT, what="the task to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
    assert sorted(p.name for p in sandbox.iterdir()) == ["0.in", "function.bin", "key", "pymw-runtime.pyz"]
    with pytest.raises(OutputMissing):
        jd.read_output(0)


def test_output_for_tasks_the_chunk_did_not_hold_is_dropped_and_missing_ones_fail(tmp_path):
    """A node's output is checked against the chunk the master wrote."""
    jd = job(tmp_path, make_task(), [[(0, (1,), {}), (1, (2,), {})]])
    import pickle
    blob = pickle.dumps(42)
    meta = {"outcomes": [[1, 0, 1.0, 2.0, "", ""], [99, 0, 1.0, 2.0, "", ""]], "blobs": [len(blob)], "error": None}
    body = json.dumps(meta).encode() + b"\n" + blob
    header = {"kind": "output", "codec": "pickle", "job": jd.job_id, "index": 0, "host": "h", "python": "3",
              "started": 1.0, "ended": 3.0}
    jd.output_path(0).write_bytes(seal(header, body, "hmac-sha256", jd.key))
    out = jd.read_output(0)
    assert [(o.seq, o.ok, o.value) for o in out.outcomes] == [(0, False, None), (1, True, 42)]
    assert "has no result for task 0" in out.outcomes[0].failure[2]


# --- refusals: nothing unpickled ---------------------------------------------------------

def marked_job(tmp_path, marker, name="job"):
    """A job whose argument touches ``marker`` when unpickled."""
    def task(x, *rest):
        return x
    return job(tmp_path, task, [[(0, (1, Touch(marker)), {}), (1, (2,), {})]], name=name)


def test_control_a_good_input_is_unpickled(tmp_path):
    """(The marker works: a verified input is unpickled, and touches it.)"""
    marker = tmp_path / "unpickled"
    jd = marked_job(tmp_path, marker)
    run_node(jd, 0)
    assert marker.exists()
    assert [o.value for o in jd.read_output(0).outcomes] == [1, 2]


@pytest.mark.parametrize("damage", ["flip a body byte", "flip a tag byte", "truncate", "unsigned pickle",
                                    "empty", "another job's key", "header claims sha256",
                                    "header changed", "extra bytes"])
def test_a_damaged_input_is_refused_unread(tmp_path, damage):
    marker = tmp_path / "unpickled"
    jd = marked_job(tmp_path, marker)
    path = jd.path / "in" / "0.in"
    data = bytearray(path.read_bytes())
    header_end = data.index(b"\n", len(MAGIC)) + 1
    header = json.loads(data[len(MAGIC):header_end])
    body = bytes(data[header_end:header_end + header["body"]])
    if damage == "flip a body byte":
        data[header_end + 10] ^= 0x20
    elif damage == "flip a tag byte":
        data[-1] ^= 1
    elif damage == "truncate":
        data = data[:-20]
    elif damage == "unsigned pickle":
        data = bytearray(body)
    elif damage == "empty":
        data = bytearray()
    elif damage == "another job's key":
        other = JobDir.create(tmp_path / "jobs", "other")
        data = bytearray(seal(header, body, "hmac-sha256", other.key))
    elif damage == "header claims sha256":  # a forger without the key recomputes a plain digest
        data = bytearray(seal(header, body, "sha256", None))
    elif damage == "header changed":
        changed = data.replace(b'"seqs":[0,1]', b'"seqs":[0,7]')
        assert changed != data
        data = changed
    elif damage == "extra bytes":
        data += b"\0"
    run_node(jd, 0, replace={"0.in": bytes(data)})
    assert not marker.exists(), "the damaged input was unpickled"
    out = jd.read_output(0)
    refused(out, [0, 1])
    assert out.error is not None and out.error[2].startswith("refused: signature")


def test_a_damaged_or_foreign_function_file_is_refused_unread(tmp_path):
    marker = tmp_path / "unpickled"
    import functools
    jd = JobDir.create(tmp_path / "jobs", "job")
    jd.write_function(functools.partial(_identity_local(), Touch(marker)))
    jd.write_chunk(0, [(0, (1,), {})])
    fn_path = jd.path / "function.bin"
    good = fn_path.read_bytes()
    run_node(jd, 0, replace={"function.bin": good[:-1] + bytes([good[-1] ^ 1])})
    assert not marker.exists()
    refused(jd.read_output(0), [0])
    # A function file validly signed for this job, but not the one the chunk was written for.
    JobDir.open(jd.path).write_function(make_task())
    swapped = fn_path.read_bytes()
    run_node(jd, 0, replace={"function.bin": good})  # (the function the chunk names: it runs)
    assert marker.exists()
    marker.unlink()
    run_node(jd, 0, replace={"function.bin": swapped})
    assert not marker.exists()
    out = jd.read_output(0)
    refused(out, [0])
    assert "not the function the input was written for" in out.outcomes[0].failure[2]


def _identity_local():
    def ident(marker_value, x):
        return x
    return ident


def test_a_missing_key_file_still_gives_an_output_that_says_why(tmp_path):
    marker = tmp_path / "unpickled"
    jd = marked_job(tmp_path, marker)
    run_node(jd, 0, drop=("key",))
    assert not marker.exists()
    with pytest.raises(OutputCorrupt) as e:
        jd.read_output(0)  # (unsigned: the node had no key) but the reason travels as text
    assert e.value.reason == "bad signature"
    assert "the node said (unverified)" in str(e.value) and "no usable key" in str(e.value)


# --- what a task leaves running ------------------------------------------------------------

def test_processes_a_task_starts_die_with_it(tmp_path):
    """Task 0 starts a child and a daemon (orphaned at once); by the time
    task 1 runs they are gone, and nothing is left after the run."""
    def spawn(x, note):
        import subprocess as sp
        if x == 0:
            direct = sp.Popen(["sleep", "300"])
            sh = sp.run(["sh", "-c", "sleep 301 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
            pids = [direct.pid, int(sh.stdout)]
            with open(note, "w") as f:
                f.write(" ".join(map(str, pids)))
            return pids
        if x == 2:  # left running by the last task: ended when the run ends
            return sp.Popen(["sleep", "303"]).pid
        alive = []
        for pid in open(note).read().split():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    alive.append(f.read().split(") ")[1][0] not in "ZX")
            except OSError:
                alive.append(False)
        return alive
    note = str(tmp_path / "pids")
    jd = job(tmp_path, spawn, [[(0, (0, note), {}), (1, (1, note), {}), (2, (2, note), {})]], name="spawn")
    run_node(jd, 0)
    values = [o.value for o in jd.read_output(0).outcomes]
    assert len(values[0]) == 2 and values[1] == [False, False]
    assert wait_gone(values[0] + [values[2]], timeout=10) == []


# --- the job directory under load ----------------------------------------------------------

def test_writing_ten_thousand_tasks_is_fast(tmp_path):
    jd = JobDir.create(tmp_path / "jobs", "big")
    jd.write_function(make_task())
    tasks = [(seq, (seq, float(seq) / 3, f"item-{seq}"), {"scale": 2}) for seq in range(10_000)]
    t0 = time.perf_counter()
    for i in range(200):
        jd.write_chunk(i, tasks[i * 50:(i + 1) * 50])
    elapsed = time.perf_counter() - t0
    print(f"\n10,000 tasks in 200 chunks written in {elapsed * 1000:.0f} ms")
    assert elapsed < 5.0  # (about 0.1 s on an idle machine; generous for a loaded CI)
    assert len(list((jd.path / "in").iterdir())) == 200
    assert jd.chunk_seqs(199) == list(range(9950, 10000))


def test_chunks_written_from_many_threads_all_verify(tmp_path):
    jd = JobDir.create(tmp_path / "jobs", "threads")
    jd.write_function(make_task())
    errors = []

    def writer(t):
        try:
            for i in range(t * 50, (t + 1) * 50):
                jd.write_chunk(i, [(i, (i,), {})])
                jd.write_chunk(i, [(i, (i,), {})])  # (rewritten: still whole)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert not errors
    from pymw_magic.oneshot import verify
    for i in range(400):
        header, _ = verify((jd.path / "in" / f"{i}.in").read_bytes(), "x", "hmac-sha256", jd.key)
        assert header["seqs"] == [i]
    assert not [p for p in (jd.path / "in").iterdir() if p.name.startswith(".")]


def test_task_outcome_and_chunk_output_shapes():
    o = TaskOutcome(1, True, 2, None, "", "", 0.0, 1.0)
    c = ChunkOutput("h", "3.11.7", 0.0, 1.0, [o])
    assert c.outcomes[0].value == 2 and c.error is None


@pytest.mark.parametrize("via", ["zipapp", "module"])
def test_sigterm_ends_the_run_and_its_processes_without_an_output(tmp_path, via):
    """An engine evicting or removing a job sends SIGTERM: what the task
    started goes too, and no output claims the run finished."""
    note = tmp_path / "pid"

    def task(x):
        import subprocess as sp
        child = sp.Popen(["sleep", "304"])
        pathlib.Path(note).write_text(str(child.pid))
        time.sleep(120)
        return x
    jd = job(tmp_path, task, [[(0, (1,), {})]])
    sandbox = tmp_path / "sb"
    proc = run_node(jd, 0, sandbox=sandbox, via=via, wait=False)
    try:
        wait_until(lambda: note.exists() and note.read_text(), timeout=TIMEOUT, what="the task's child")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
    assert wait_gone([int(note.read_text())], timeout=10) == []
    assert not (sandbox / "0.out").exists()
    assert not [p for p in sandbox.iterdir() if p.name.startswith(".pymw-")]


def test_an_exception_whose_str_raises_fails_only_its_task(tmp_path):
    def task(x):
        class Nasty(Exception):
            def __str__(self):
                raise RuntimeError("no str for you")
        if x:
            raise Nasty()
        return x
    jd = job(tmp_path, task, [[(0, (0,), {}), (1, (1,), {}), (2, (0,), {})]])
    run_node(jd, 0)
    out = jd.read_output(0)
    assert [o.ok for o in out.outcomes] == [True, False, True]
    assert out.outcomes[1].failure[1].endswith("Nasty") and "str() of the exception failed" in out.outcomes[1].failure[2]


def test_a_task_writing_bytes_to_stdout_fails_only_itself(tmp_path):
    def task(x):
        print("before")
        if x:
            sys.stdout.write(b"raw")
        return x
    jd = job(tmp_path, task, [[(0, (1,), {}), (1, (0,), {})]])
    run_node(jd, 0)
    bad, good = jd.read_output(0).outcomes
    assert bad.failure[1] == "TypeError" and "must be str, not bytes" in bad.failure[2]
    assert bad.stdout == "before\n" and good.ok and good.stdout == "before\n"


# --- volunteers: Ed25519-signed inputs, results in the safe codec --------------------------

@pytest.fixture(scope="module")
def signer():
    from pymw_magic.ed25519 import SigningKey
    return SigningKey.generate()


def volunteer_job(tmp_path, signer, fn, chunks, name="vol", **kw) -> JobDir:
    jd = JobDir.create(tmp_path / "jobs", name, scheme="ed25519", signer=signer, codec=kw.pop("codec", "safe"), **kw)
    jd.write_function(fn)
    for i, tasks in enumerate(chunks):
        jd.write_chunk(i, tasks)
    return jd


def test_a_signed_job_runs_on_a_bare_python_and_results_come_back_safe(tmp_path, signer):
    def task(x):
        if x == 2:
            return {1, 2}  # (a set: the safe codec does not carry it)
        if x == 3:
            raise KeyError("missing")
        return {"x": x, "pair": (x, float("nan")), "inf": float("-inf")}
    jd = volunteer_job(tmp_path, signer, task, [[(s, (s,), {}) for s in range(5)]])
    assert (jd.path / "key").read_bytes().split()[2] == b"ed25519"  # (the public key only)
    assert signer.public_bytes.hex().encode() in (jd.path / "key").read_bytes()
    run_node(jd, 0)  # (python -I -S: the pure verifier, from the zipapp)
    out = jd.read_output(0)
    by = {o.seq: o for o in out.outcomes}
    assert by[1].value["pair"][0] == 1 and isinstance(by[1].value["pair"], tuple)
    assert by[1].value["inf"] == float("-inf")
    assert not by[2].ok and by[2].failure[1] == "pymw_magic.codec.CodecError"
    assert "trusted_results=True" in by[2].failure[2]
    assert by[3].failure[:2] == (None, "KeyError")  # (an exception's pickle never comes back)


def test_a_signed_job_brings_numpy_arrays_back(tmp_path, signer):
    import numpy as np

    def task(n):
        import numpy
        return numpy.arange(n) * 2.5
    jd = volunteer_job(tmp_path, signer, task, [[(0, (4,), {})]])
    run_node(jd, 0, via="module")  # (a host with numpy)
    value = jd.read_output(0).outcomes[0].value
    assert isinstance(value, np.ndarray) and value.tolist() == [0.0, 2.5, 5.0, 7.5]


@pytest.mark.parametrize("attack", ["another key", "tampered body", "tampered header", "hmac with the public key",
                                    "plain digest", "function from another key"])
def test_inputs_not_signed_by_the_key_are_refused_unread(tmp_path, signer, attack):
    from pymw_magic.ed25519 import SigningKey
    marker = tmp_path / "unpickled"

    def task(x, *rest):
        return x
    jd = volunteer_job(tmp_path, signer, task, [[(0, (1, Touch(marker)), {}), (1, (2,), {})]])
    data = (jd.path / "in" / "0.in").read_bytes()
    header_end = data.index(b"\n", len(MAGIC)) + 1
    header = json.loads(data[len(MAGIC):header_end])
    body = data[header_end:header_end + header["body"]]
    replace = {}
    if attack == "another key":
        replace["0.in"] = seal(header, body, "ed25519", SigningKey.generate())
    elif attack == "tampered body":
        replace["0.in"] = data[:header_end + 5] + bytes([data[header_end + 5] ^ 4]) + data[header_end + 6:]
    elif attack == "tampered header":
        replace["0.in"] = data.replace(b'"index":0', b'"index":9')
    elif attack == "hmac with the public key":  # (a file must not choose how it is checked)
        replace["0.in"] = seal(header, body, "hmac-sha256", signer.public_bytes)
    elif attack == "plain digest":
        replace["0.in"] = seal(header, body, "sha256", None)
    elif attack == "function from another key":
        fn = (jd.path / "function.bin").read_bytes()
        fend = fn.index(b"\n", len(MAGIC)) + 1
        fheader = json.loads(fn[len(MAGIC):fend])
        replace["function.bin"] = seal(fheader, fn[fend:fend + fheader["body"]], "ed25519", SigningKey.generate())
    run_node(jd, 0, replace=replace)
    assert not marker.exists(), "an input not signed by the key was unpickled"
    refused(jd.read_output(0), [0, 1])


def test_control_a_signed_input_is_unpickled(tmp_path, signer):
    marker = tmp_path / "unpickled"

    def task(x, *rest):
        return x
    jd = volunteer_job(tmp_path, signer, task, [[(0, (1, Touch(marker)), {})]])
    run_node(jd, 0)
    assert marker.exists() and jd.read_output(0).outcomes[0].value == 1


def _forge_output(jd: JobDir, index: int, codec: str, blob: bytes, exc_blob: bytes | None = None) -> None:
    """An output as a volunteer host may write it: no secret, a plain digest."""
    rows = [[0, 0, 1.0, 2.0, "", ""]] if exc_blob is None else [[0, None, 1.0, 2.0, "", "", 1, "E", "m", "tb"]]
    blobs = [blob] if exc_blob is None else [blob, exc_blob]
    meta = {"outcomes": rows, "blobs": [len(b) for b in blobs], "error": None}
    body = json.dumps(meta).encode() + b"\n" + b"".join(blobs)
    header = {"kind": "output", "codec": codec, "job": jd.job_id, "index": index, "host": "volunteer",
              "python": "3.11.0", "started": 1.0, "ended": 2.0}
    jd.output_path(index).write_bytes(seal(header, body, "sha256", None))


def test_a_volunteer_sending_pickles_is_never_loaded(tmp_path, signer):
    marker = tmp_path / "unpickled"
    jd = volunteer_job(tmp_path, signer, _identity_local(), [[(0, (1, 2), {})]])
    evil = pickle_of(Touch(marker))
    _forge_output(jd, 0, "pickle", evil)
    with pytest.raises(OutputCorrupt) as err:
        jd.read_output(0)
    assert err.value.reason == "unsupported" and "trusted_results=True" in str(err.value)
    _forge_output(jd, 0, "safe", evil)  # (claims the safe codec, holds a pickle)
    out = jd.read_output(0)
    assert not out.outcomes[0].ok and "not a safe-codec value" in out.outcomes[0].failure[2]
    from pymw_magic.codec import encode
    _forge_output(jd, 0, "safe", encode(1), exc_blob=evil)  # (an exception's pickle)
    out = jd.read_output(0)
    assert out.outcomes[0].failure == (None, "E", "m", "tb")
    assert not marker.exists()


def test_an_output_over_the_cap_is_not_read(tmp_path, signer):
    jd = volunteer_job(tmp_path, signer, make_task(), [[(0, (2,), {})]])
    run_node(jd, 0)
    size = jd.output_path(0).stat().st_size
    assert jd.read_output(0, max_bytes=size).outcomes[0].value == 2
    with pytest.raises(OutputCorrupt) as err:
        jd.read_output(0, max_bytes=size - 1)
    assert err.value.reason == "too large"


def test_trusted_results_take_pickles_from_hosts_you_control(tmp_path, signer):
    jd = volunteer_job(tmp_path, signer, make_task(), [[(0, (2,), {"scale": 4})]], codec="pickle",
                       trusted_results=True)
    run_node(jd, 0)
    assert jd.read_output(0).outcomes[0].value == 8
    with pytest.raises(ValueError, match="codec='safe'"):
        JobDir.create(tmp_path / "jobs", "x", scheme="ed25519", signer=signer, codec="pickle")


def test_a_reopened_signed_job_needs_the_signer_to_write_and_not_to_read(tmp_path, signer):
    jd = volunteer_job(tmp_path, signer, make_task(), [[(0, (2,), {})]])
    run_node(jd, 0)
    again = JobDir.open(jd.path)
    assert again.read_output(0).outcomes[0].value == 2
    with pytest.raises(ValueError, match="signer="):
        again.write_chunk(1, [(1, (1,), {})])
    from pymw_magic.ed25519 import SigningKey
    with pytest.raises(ValueError, match="not the key"):
        JobDir.open(jd.path, signer=SigningKey.generate())
    JobDir.open(jd.path, signer=signer).write_chunk(1, [(1, (5,), {})])
    run_node(jd, 1)
    assert jd.read_output(1).outcomes[0].value == 5


def pickle_of(obj) -> bytes:
    import pickle
    return pickle.dumps(obj)


def test_a_task_that_changes_directory_or_forks_does_not_move_or_double_the_output(tmp_path):
    ran = tmp_path / "ran"

    def task(x):
        import os as os_
        if x == 0:
            os_.chdir("/")
            return "moved"
        if x == 1:
            return "parent" if os_.fork() else "child"  # (the child returns into the worker's loop)
        with open(ran, "a") as f:
            f.write(f"{os_.getpid()}\n")
        return "last"
    jd = job(tmp_path, task, [[(0, (0,), {}), (1, (1,), {}), (2, (2,), {})]])
    run_node(jd, 0)
    out = jd.read_output(0)
    assert [o.value for o in out.outcomes] == ["moved", "parent", "last"]
    assert len(ran.read_text().split()) == 1  # (the fork did not run the rest of the chunk)
    assert not pathlib.Path("/0.out").exists()


def test_an_output_elsewhere_is_read_as_the_chunk_it_claims_to_be(tmp_path):
    jd = job(tmp_path, make_task(), [[(0, (2,), {})], [(1, (5,), {})]])
    run_node(jd, 1)
    replica = tmp_path / "upload" / "ab" / "replica_1"
    replica.parent.mkdir(parents=True)
    shutil.move(jd.output_path(1), replica)
    assert jd.read_output_file(replica, 1).outcomes[0].value == 5
    with pytest.raises(OutputCorrupt) as err:
        jd.read_output_file(replica, 0)
    assert err.value.reason == "wrong job" and str(replica) in str(err.value)
    with pytest.raises(OutputMissing, match="replica_2"):
        jd.read_output_file(replica.with_name("replica_2"), 1)
