"""A hostile user's attacks on three changes: a store write's wait bounded
by its patience, a map iterator collected inside the scheduler's lock,
and HTCondor's ``max_transfer_output_mb`` (the backend and the stand-in
schedd's file transfer).  Each test failed on the code before its fix,
except the attacks that found nothing broken, kept as guards: a listing
while the flusher waits, a map collected by a done-callback on a serving
thread, a chunk of several tasks one far over the limit."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time

import pytest

from conftest import wait_until
from pymw_magic import Master
from pymw_magic import store as st
from pymw_magic.store import Store


def square(x):
    return x * x


def nap(x):
    time.sleep(x)
    return x


# --- the store: a write's patience bounds every wait ------------------------------------------
@pytest.fixture
def store_home(tmp_path, monkeypatch):
    path = tmp_path / "h16 home"
    monkeypatch.setenv("PYMW_HOME", str(path))
    monkeypatch.delenv("PYMW_STORE", raising=False)
    return path


class _Locker:
    """Another process holding the store's write lock (BEGIN EXCLUSIVE)
    until :meth:`release`."""

    CODE = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read(); "
            "c.execute('COMMIT')")

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _a_stored_job(home) -> str:
    with Master("local", workers=1) as m:
        m.map_async(square, range(2), name="mine").result(timeout=60)
        st.recorder().flush()
    return st.jobs()[0].uid


def test_a_short_patience_is_not_spent_waiting_behind_this_process_s_own_patient_writer(store_home):
    """A write with 0.5 s of patience, made while another thread of this
    process waits (default patience) for another process's lock, gives up
    in about 0.5 s, not after the other thread's whole busy wait; and the
    patient writer still goes through once the lock is let go ~2 s later."""
    uid = _a_stored_job(store_home)
    store = Store(store_home)
    for trial in range(3):
        locker = _Locker(store_home / st.DB_NAME)
        try:
            patient: dict = {}

            def write_patiently():
                try:
                    patient["out"] = store.request_cancel(uid)
                except BaseException as exc:  # noqa: BLE001  (reported below)
                    patient["out"] = exc
            held_since = time.monotonic()
            t = threading.Thread(target=write_patiently)
            t.start()

            def patient_waits() -> bool:  # (inside the store's lock, in SQLite's busy wait)
                if store._lock.acquire(blocking=False):
                    store._lock.release()
                    return False
                return True
            wait_until(patient_waits, timeout=30, what="the patient write waiting for the lock")
            hasty = []
            lock = threading.Barrier(4)

            def write_hastily(patience):
                lock.wait(timeout=30)
                began = time.monotonic()
                try:
                    store.request_cancel(uid, patience=patience)
                    hasty.append(("went through", patience, time.monotonic() - began))
                except st.StoreBusy:
                    hasty.append(("busy", patience, time.monotonic() - began))
            hs = [threading.Thread(target=write_hastily, args=(p,)) for p in (0.0, -1.0, 0.5, 1.0)]
            for h in hs:
                h.start()
            for h in hs:
                h.join(60)
            assert sorted(w for w, *_ in hasty) == ["busy"] * 4, (trial, hasty)
            slow = [(p, round(took, 2)) for _, p, took in hasty if took > max(p, 0) + 1.5]
            assert not slow, f"trial {trial}: waited far past their patience: {slow}"
            assert t.is_alive(), f"trial {trial}: the patient write gave up: {patient}"
            time.sleep(max(0.0, held_since + 2.0 - time.monotonic()))  # (the scenario: locked ~2 s)
        finally:
            locker.release()
        t.join(60)
        assert patient["out"] is False, f"trial {trial}: {patient['out']!r}"  # (the job had ended)
    store.close()


# --- the stand-in schedd: max_transfer_output_mb as HTCondor 25's file transfer -------------
htcondor2 = pytest.importorskip("htcondor2")
MiB = 1 << 20


@pytest.fixture
def standin_dir(tmp_path):
    from pymw_magic.testing.condor import StandInSchedd
    d = tmp_path / "job dir"
    d.mkdir()
    s = StandInSchedd(tmp_path / "schedd root", slots=2, idle_timeout=120)
    yield s, d
    s.stop()


def _held_ad(schedd, cid: int) -> dict:
    def ended_or_held() -> bool:
        ads = schedd.query(f"ClusterId == {cid}", ["JobStatus"])
        return not ads or ads[0]["JobStatus"] in (4, 5)
    wait_until(ended_or_held, timeout=120, what="the proc ended or held")
    ads = schedd.query(f"ClusterId == {cid}", ["JobStatus", "HoldReason", "HoldReasonCode", "HoldReasonSubCode"])
    assert ads, "the proc ended and left the queue: it was not held"
    return dict(ads[0])


def _sh(d, script: str, **extra) -> dict:
    quoted = script.replace("'", "''").replace('"', '""')
    out = {"executable": "/bin/sh", "arguments": f"\"-c '{quoted}'\"", "initialdir": str(d),
           "should_transfer_files": "YES", "when_to_transfer_output": "ON_EXIT_OR_EVICT"}
    out.update(extra)
    return out


def test_standin_sends_the_outputs_before_stdout_and_counts_every_file_past_the_limit(standin_dir):
    # HTCondor appends stdout and stderr to transfer_output_files: the
    # outputs go first; the file crossing the limit comes cut at it, every
    # later one that is not empty comes empty and counts as a failure.
    schedd, d = standin_dir
    script = ("head -c 2097152 /dev/zero > a.bin; head -c 2097152 /dev/zero > b.bin; "
              "head -c 1048576 /dev/zero; head -c 10 /dev/zero >&2")
    r = schedd.submit(htcondor2.Submit(_sh(d, script, transfer_output_files="a.bin,b.bin", output="out.txt",
                                           error="err.txt", max_transfer_output_mb="3")))
    ad = _held_ad(schedd, r.cluster())
    assert (ad["JobStatus"], ad["HoldReasonCode"], ad["HoldReasonSubCode"]) == (5, 33, 0), ad
    sizes = {n: (d / n).stat().st_size for n in ("a.bin", "b.bin", "out.txt", "err.txt")}
    assert sizes == {"a.bin": 2 * MiB, "b.bin": 1 * MiB, "out.txt": 0, "err.txt": 0}, sizes
    reason = ad["HoldReason"]
    assert "|Error: 3 total failures: first failure: sending file " in reason, reason
    assert reason.split("first failure: sending file ")[1].split(":")[0].endswith("/b.bin"), reason
    assert "max total download bytes exceeded (max=3 MB, this file=2 MB)" in reason, reason


@pytest.mark.parametrize("value, limit_mb", [("true", 1), ("-0.5", 0), ("2.9", 2), ("4294967298", 2)])
def test_standin_reads_max_transfer_output_mb_as_the_shadow_does(standin_dir, value, limit_mb):
    # The shadow reads it with LookupInteger into an int: a boolean is 0 or
    # 1, a real is cut toward zero (so -0.5 is a limit of 0, not none), and
    # the value is 32 bits.
    schedd, d = standin_dir
    r = schedd.submit(htcondor2.Submit(_sh(d, "head -c 3145728 /dev/zero > a.bin", transfer_output_files="a.bin",
                                           max_transfer_output_mb=value)))
    ad = _held_ad(schedd, r.cluster())
    assert (ad["JobStatus"], ad["HoldReasonCode"]) == (5, 33), ad
    assert f"(max={limit_mb} MB, this file=3 MB)" in ad["HoldReason"], ad
    assert (d / "a.bin").stat().st_size == limit_mb * MiB


# --- the backend: what a hold over max_transfer_output_mb says -----------------------------------
def _chatty(n):
    # straight to the process's stdout, as a C library or a child process
    # writes (what print() writes is captured and goes with the result)
    import os as _os
    block = b"." * (1 << 20)
    for _ in range(n // len(block)):
        _os.write(1, block)
    return n


def _big(n):
    return "x" * n


def test_a_chunk_held_for_what_its_tasks_printed_says_so_not_raise_max_output_mb(standin_dir, store_home):
    from conftest import by_value
    from pymw_magic.backends.condor import HOLD_OUTPUT_TOO_LARGE, JobHeld
    schedd, _ = standin_dir
    with Master("condor", schedd=schedd, chunksize=1, retries=1, max_output_mb=1) as m:
        out = m.map_async(by_value(_chatty), [10, 20 * MiB], name="chatty").result(timeout=180,
                                                                                   return_exceptions=True)
    assert out[0] == 10, out
    err = out[1]
    assert isinstance(err, JobHeld) and err.hold_reason_code == HOLD_OUTPUT_TOO_LARGE, repr(err)
    text = str(err)
    assert "_condor_stdout" in err.hold_reason, text
    assert "What the tasks printed (stdout)" in text and "print less" in text, text
    assert "--max-output-mb" not in text, text   # raising it would not be the fix


@pytest.mark.parametrize("key, value", [("max_transfer_output_mb", "2"), ("MAX_TRANSFER_OUTPUT_MB", "2"),
                                        ("My.MaxTransferOutputMB", "2"), ("max_transfer_output_mb", "1 + 1.5")])
def test_the_user_s_own_max_transfer_output_mb_wins_and_the_hold_names_it(standin_dir, store_home, key, value):
    from conftest import by_value
    from pymw_magic.backends.condor import HOLD_OUTPUT_TOO_LARGE, JobHeld
    schedd, _ = standin_dir
    with Master("condor", schedd=schedd, chunksize=1, retries=1, max_output_mb=8, submit={key: value}) as m:
        out = m.map_async(by_value(_big), [10, 3 * MiB], name="own").result(timeout=180, return_exceptions=True)
    assert out[0] == "x" * 10, out
    err = out[1]
    assert isinstance(err, JobHeld) and err.hold_reason_code == HOLD_OUTPUT_TOO_LARGE, repr(err)
    text = str(err)
    assert "(max=2 MB" in err.hold_reason, text
    assert f"which your submit sets ({key}={value!r})" in text and "max_output_mb=8 + 16" not in text, text


def _fat(n):
    return "x" * n if n else 0


@pytest.mark.parametrize("spool", [False, True])
def test_a_chunk_of_several_tasks_one_far_over_the_limit_fails_once_and_the_rest_still_come(
        standin_dir, store_home, spool):
    from conftest import by_value
    from pymw_magic.backends.condor import HOLD_OUTPUT_TOO_LARGE, JobHeld
    schedd, _ = standin_dir
    sizes = [0, 0, 20 * MiB, 0, 0, 0]
    with Master("condor", schedd=schedd, chunksize=3, retries=3, max_output_mb=0.5, spool=spool) as m:
        job = m.map_async(by_value(_fat), sizes, name="several")
        out = job.result(timeout=180, return_exceptions=True)
        assert out[3:] == [0, 0, 0], out
        held = out[:3]
        assert all(isinstance(e, JobHeld) and e.hold_reason_code == HOLD_OUTPUT_TOO_LARGE for e in held), held
        assert "(max=17 MB, this file=20 MB)" in held[0].hold_reason, held[0]
        assert job.counts()["failed"] == 3 and sum(t.attempts for t in job.tasks) <= 6
        assert m.map_async(by_value(_fat), [0, 0], name="after").result(timeout=180) == [0, 0]
    wait_until(lambda: not schedd.query("true", ["ClusterId"]), timeout=60, what="the queue empty")


def _gated_fat(gate):
    def task(n):
        import os
        import time
        while not os.path.exists(gate):
            time.sleep(0.05)
        return "y" * n
    return task


@pytest.mark.parametrize("cap", [None, 40])
def test_attach_after_the_hold_fails_the_chunk_removing_the_proc_and_naming_the_limit_it_was_submitted_with(
        standin_dir, store_home, tmp_path, cap):
    # The proc's output came back cut at max_transfer_output_mb: read first on
    # attach, it was run again (a raised cap) or failed as too large (the same
    # cap), and the held proc stayed in the queue for ever.
    from conftest import by_value
    import pymw_magic.reattach as reattach
    from pymw_magic.backends.condor import HOLD_OUTPUT_TOO_LARGE, JobHeld
    schedd, _ = standin_dir
    gate = tmp_path / "gate"
    m = Master("condor", schedd=schedd, chunksize=1, retries=2, max_output_mb=1)
    m.map_async(by_value(_gated_fat(str(gate))), [20 * MiB], name="held-then-attached")
    try:
        wait_until(lambda: len(schedd.query()) == 1, 120, "the proc queued")
        st.recorder().flush()
    finally:
        m.detach()
    gate.write_text("go")
    wait_until(lambda: [a["JobStatus"] for a in schedd.query("true", ["JobStatus"])] == [5], 120, "the hold")
    again = reattach.attach("held-then-attached", **({} if cap is None else {"max_output_mb": cap}))
    try:
        [err] = again.result(timeout=180, return_exceptions=True)
    finally:
        again.master.shutdown(wait=True)
    assert isinstance(err, JobHeld) and err.hold_reason_code == HOLD_OUTPUT_TOO_LARGE, repr(err)
    text = str(err)
    # the proc was held at 17 MB (max_output_mb=1 then), whatever this master's cap is now
    if cap is not None:
        assert "max_output_mb=40 + 16" not in text and "max_transfer_output_mb=17" in text, text
    else:
        assert "max_output_mb=1 + 16 MiB" in text, text
    wait_until(lambda: not schedd.query("true", ["ClusterId"]), timeout=60, what="the held proc removed")


@pytest.mark.parametrize("retries", [0, 1])
def test_with_no_retry_left_the_hold_not_the_eviction_before_it_fails_the_task(standin_dir, store_home, retries):
    # HTCondor evicts with the transfer's failure, then holds: the hold (code
    # 33, the fix named) decides, not an eviction charged as an attempt.
    from conftest import by_value
    from pymw_magic.backends.condor import HOLD_OUTPUT_TOO_LARGE, JobHeld
    schedd, _ = standin_dir
    with Master("condor", schedd=schedd, chunksize=1, retries=retries, max_output_mb=1) as m:
        out = m.map_async(by_value(_fat), [0, 20 * MiB], name="no-retry").result(timeout=180,
                                                                                  return_exceptions=True)
    assert out[0] == 0, out
    assert isinstance(out[1], JobHeld) and out[1].hold_reason_code == HOLD_OUTPUT_TOO_LARGE, repr(out[1])


# --- a map iterator collected where cancelling it could deadlock --------------------------------
_GC_IN_RECORDER_LOCK = """
import gc, sys, threading, time
from pymw_magic import Master
from pymw_magic import store as st

def nap(x):
    time.sleep(x)
    return x

if __name__ == "__main__":
    with Master("local", workers=1) as m:
        rec = st.recorder()
        assert rec is not None, "recording is off"
        jobs, cycle = [], []
        for _ in range(int(sys.argv[1])):
            it = m.map(nap, [0.02] * 200)
            jobs.append(it._job)
            cycle.append(it)
        cycle.append(cycle)
        box = [cycle]
        del it, cycle

        def flusher_like():
            with rec._lock:  # (the store's flusher allocates under its lock: the collector may run there)
                box.clear()
                gc.collect()
        t = threading.Thread(target=flusher_like, daemon=True)
        t.start()
        t.join(30)
        print("collector thread", "stuck" if t.is_alive() else "free", flush=True)
        if t.is_alive():
            import os
            os._exit(3)
        deadline = time.monotonic() + 60
        while not all(j.done() and j.counts()["cancelled"] > 0 for j in jobs):
            assert time.monotonic() < deadline, [j.counts() for j in jobs]
            time.sleep(0.02)
        print("cancelled", len(jobs), flush=True)
    deadline = time.monotonic() + 30
    while any(t.name == "pymw-map-closed" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a canceller thread stayed"
        time.sleep(0.02)
    print("ok", flush=True)
"""


def test_maps_collected_by_the_gc_on_a_thread_inside_the_store_recorder_s_lock_do_not_deadlock(store_home, tmp_path):
    # cancel() publishes the job's end to the recorder, which takes that
    # (non-reentrant) lock: a synchronous cancel there hung the thread, and
    # then every event of the master.
    script = tmp_path / "gc_in_lock.py"
    script.write_text(_GC_IN_RECORDER_LOCK)
    import os
    import signal
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, str(script), "50"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "collector thread free" in out and "cancelled 50" in out and "ok" in out, out


def _closers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pymw-map-closed"]


@pytest.mark.parametrize("end", ["open", "shutdown", "terminate"])
def test_many_maps_collected_at_once_inside_the_scheduler_lock_end_cancelled_with_one_thread(end):
    errors: list = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        m = Master("local", workers=2)
        its = [m.map(nap, [0.05] * 100) for _ in range(200)]
        jobs = [it._job for it in its]
        cycle: list = [its]
        cycle.append(cycle)
        del its
        if end == "shutdown":
            m.shutdown(wait=False, cancel_futures=True)
        elif end == "terminate":
            m.terminate()
        started = threading.active_count()
        with m._scheduler.cond:
            del cycle
            assert gc.collect() > 0
            most = threading.active_count() - started
        assert most <= 1, f"{most} threads started for one collection"
        wait_until(lambda: all(j.done() for j in jobs), timeout=120, what="every collected map's job ended")
        if end == "open":
            assert all(j.counts()["cancelled"] > 0 for j in jobs)
        wait_until(lambda: not _closers(), timeout=30, what="the canceller thread gone")
        m.terminate()
    finally:
        threading.excepthook = old_hook
    assert errors == []


def test_a_map_collected_by_a_done_callback_on_a_serving_thread_is_cancelled():
    with Master("local", workers=2) as m:
        it = m.map(nap, [0.02] * 5000)
        job = it._job
        cycle: list = [it]
        cycle.append(cycle)
        box = [cycle]
        del it, cycle
        fired = threading.Event()
        where = []

        def on_done(_):
            where.append((threading.current_thread().name, m._scheduler.on_serving_thread(), job.done()))
            box.clear()
            gc.collect()   # (any allocation may do it)
            fired.set()
        m.submit(square, 3).add_done_callback(on_done)
        assert fired.wait(120)
        assert where and where[0][2] is False, where   # (it ran while the map had tasks left)
        # cancelled: it ends without reading the rest of its input
        wait_until(lambda: job.done() and job.counts()["done"] < 5000, timeout=60, what="the job cancelled")
    wait_until(lambda: not _closers(), timeout=30, what="the canceller thread gone")


def test_a_listing_while_the_flusher_waits_for_another_process_s_lock_takes_about_its_second(store_home):
    uid = _a_stored_job(store_home)
    with Master("local", workers=1) as m:
        locker = _Locker(store_home / st.DB_NAME)
        try:
            job = m.map_async(nap, [0.01] * 50, name="while-locked")
            job.result(timeout=60)
            rec = st.recorder()

            def flusher_waits() -> bool:  # (the flusher is in its write, holding its flush lock)
                if rec._flush_lock.acquire(blocking=False):
                    rec._flush_lock.release()
                    return False
                return True
            wait_until(flusher_waits, timeout=30, what="the flusher waiting for the lock")
            for _ in range(3):
                began = time.monotonic()
                listed = st.jobs()
                took = time.monotonic() - began
                assert uid in {r.uid for r in listed}
                assert took < 3.0, f"a listing took {took:.1f} s while the flusher waited"
        finally:
            locker.release()
        st.recorder().flush()
    assert "while-locked" in {r.name for r in st.jobs()}



def _child_status(child: int, timeout: float, hung: str) -> int:
    """The wait status of forked ``child``; killed, and ``hung`` raised, if
    it has not ended within ``timeout`` seconds."""
    import os
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return status
        if time.monotonic() > deadline:
            os.kill(child, 9)
            os.waitpid(child, 0)
            raise AssertionError(hung)
        time.sleep(0.05)


def test_a_child_forked_while_a_thread_is_inside_a_write_can_use_the_store(store_home):
    """The fork copies the store's locks as a thread inside a write (or one
    waiting there for another process) held them, and that thread does not
    exist in the child: its first read or write waited for ever."""
    import os
    uid = _a_stored_job(store_home)
    store = Store(store_home)
    inside, leave = threading.Event(), threading.Event()

    def writer_inside():  # (as a write waiting for another process's lock holds it)
        with store._lock:
            inside.set()
            leave.wait(60)
    t = threading.Thread(target=writer_inside)
    t.start()
    try:
        assert inside.wait(30)
        child = os.fork()
        if child == 0:  # the child: a read and a write, then out (nothing of pytest runs here)
            code = 1
            try:
                code = 0 if store.request_cancel(uid, patience=10) is False and store.job(uid).uid == uid else 3
            except BaseException:  # noqa: BLE001  (the exit code says it)
                code = 2
            finally:
                os._exit(code)
    finally:
        leave.set()
        t.join(60)
    status = _child_status(child, 30, "the child's store call waited for a lock held by a thread it does not have")
    store.close()
    assert os.waitstatus_to_exitcode(status) == 0, f"the child's store calls failed: {status}"


def test_a_child_forked_while_the_recorder_is_busy_records_its_own_jobs(store_home):
    """The fork copies the recorder's locks as the flusher (inside a flush)
    and a thread opening the store held them: the child's first job waited
    for ever to be recorded (its Master attaches the recorder)."""
    import os
    _a_stored_job(store_home)
    rec = st.recorder()
    held = [rec._lock, rec._flush_lock, st._Flusher._guard, st._open_lock]
    inside, leave = threading.Event(), threading.Event()

    def busy():  # (as a flush under way, with another thread opening the store)
        for lock in held:
            lock.acquire()
        inside.set()
        leave.wait(60)
        for lock in reversed(held):
            lock.release()
    t = threading.Thread(target=busy)
    t.start()
    try:
        assert inside.wait(30)
        child = os.fork()
        if child == 0:  # the child: a job of its own, recorded; then out (nothing of pytest runs here)
            code = 1
            try:
                with Master("local", workers=1) as m:
                    assert m.map_async(square, range(3), name="forked-child").result(timeout=60) == [0, 1, 4]
                st.recorder().flush(patience=10)
                code = 0 if "forked-child" in {r.name for r in st.jobs()} else 3
            except BaseException:  # noqa: BLE001  (the exit code says it)
                code = 2
            finally:
                os._exit(code)
    finally:
        leave.set()
        t.join(60)
    status = _child_status(child, 90, "the child's job waited for a recorder lock held by a thread it does not have")
    assert os.waitstatus_to_exitcode(status) == 0, f"the child's job was not recorded: {status}"
    assert "forked-child" in {r.name for r in st.jobs()}


def test_a_store_file_replaced_by_one_another_process_holds_locked_is_given_the_write_s_patience(store_home):
    """The store file replaced (a restore from a backup, a copy from another
    machine: not in WAL mode) while another process holds the new file
    locked: a write with 0.5 s of patience gives up in about that time
    (opening the new file waited SQLite's whole busy timeout, then retried
    for the default 30 s), and goes through once the lock is let go."""
    import os
    import sqlite3
    uid = _a_stored_job(store_home)
    store = Store(store_home)
    assert store.request_cancel(uid, patience=5) is False  # (a finished job: nothing to ask; the file is open)
    copy = store_home / "restored.sqlite"
    src = sqlite3.connect(store_home / st.DB_NAME)
    dst = sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA journal_mode = DELETE")
    dst.close()
    os.replace(copy, store_home / st.DB_NAME)
    locker = _Locker(store_home / st.DB_NAME)
    try:
        for trial in range(2):
            started = time.monotonic()
            with pytest.raises(st.StoreBusy):
                store.request_cancel(uid, patience=0.5)
            took = time.monotonic() - started
            assert took < 2.5, f"a write with 0.5 s of patience took {took:.1f} s on a replaced, locked file"
    finally:
        locker.release()
    assert store.request_cancel(uid, patience=10) is False
    assert store.job(uid).uid == uid
    store.close()
