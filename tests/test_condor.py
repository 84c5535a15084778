"""The HTCondor backend against the stand-in schedd (and a real schedd when
one answers: ``PYMW_CONDOR_LIVE=1`` or a collector that locates a schedd).

Everything real but the schedd: htcondor2's Submit builds the descriptions,
htcondor2's JobEventLog reads the logs, the runtime zipapp runs each proc.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

htcondor2 = pytest.importorskip("htcondor2")

from conftest import by_value, wait_until  # noqa: E402
from pymw_magic import Master  # noqa: E402
import pymw_magic.reattach  # noqa: E402,F401  (wires the batch family to the store)
from pymw_magic.backends.batch import BatchError  # noqa: E402
from pymw_magic.backends.condor import CondorBackend, JobHeld, schedd_from_record, schedd_record  # noqa: E402
from pymw_magic.errors import PayloadError, TaskTimeout  # noqa: E402
from pymw_magic.testing.condor import StandInSchedd  # noqa: E402
from condor_fixtures import home, live_reason, schedd, standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 180


def _square(x):
    if x == 3:
        raise ValueError("three is not welcome")
    print("squaring", x)
    return x * x


square = by_value(_square)


def handle_of(job) -> dict:
    """The job's handle as the job store has it."""
    from pymw_magic import store
    rec = store.recorder()
    rec.flush()
    return store.open_store().job(rec.uid(job)).handle


def ours(schedd, job) -> list:
    """Our job's procs still in the schedd's queue."""
    directory = job.master.backend.job_dir(job)
    if directory is None:
        return []
    return [ad for ad in schedd.query(projection=["ClusterId", "ProcId", "JobStatus", "Iwd"])
            if str(ad.get("Iwd", "")).rstrip("/") == str(directory).rstrip("/")]


def test_map_results_failures_output_and_hosts(schedd):
    with Master("condor", schedd=schedd) as m:
        job = m.map_async(square, range(6), name="squares")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert out[:3] == [0, 1, 4] and out[4:] == [16, 25]
        assert isinstance(out[3], ValueError) and "three is not welcome" in str(out[3])
        failed = job.tasks[3]
        assert "in _square" in failed.remote_traceback and "ValueError: three" in failed.remote_traceback
        assert "in _square" in str(failed.error.__cause__)
        assert job.tasks[2].stdout == "squaring 2\n"
        assert all(t.host for t in job.tasks) and all(t.attempts == 1 for t in job.tasks)
        assert all(t.started is not None and t.finished >= t.started for t in job.tasks)
        # a real schedd keeps a finished proc in its queue for a few seconds
        wait_until(lambda: not ours(schedd, job), 60, "the finished procs out of the queue")


def test_options_are_validated_and_missing_bindings_are_named(tmp_path):
    with pytest.raises(ValueError, match="schedd"):
        Master("condor", schedd=object())
    with pytest.raises(ValueError, match="request_cpus"):
        Master("condor", schedd=StandInSchedd(tmp_path / "s"), request_cpus=0)
    with pytest.raises(ValueError, match="queue"):
        Master("condor", schedd=StandInSchedd(tmp_path / "s"), submit={"queue": "1"})


def test_backend_missing_names_the_extra(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_htcondor(name, *a, **k):
        if name == "htcondor2":
            raise ImportError("No module named 'htcondor2'")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_htcondor)
    from pymw_magic.backends.condor import htcondor
    from pymw_magic.backends.batch import BackendMissing
    with pytest.raises(BackendMissing, match=r"pip install 'pymw-magic\[condor\]'"):
        htcondor()


def test_the_submit_description(schedd):
    with Master("condor", schedd=schedd, request_cpus=2, request_memory="1GB", requirements="Arch == \"X86_64\"",
                environment={"A": "1", "B": "two words"}, submit={"+Project": '"p"'}, max_idle=5) as m:
        job = m.map_async(abs, [-1, -2], name="desc")
        assert job.result(timeout=TIMEOUT) == [1, 2]
        from pymw_magic.backends.batch import JobState
        from pymw_magic.jobdir import JobDir
        state = JobState(job, JobDir.open(m.backend.job_dir(job)))
        d = m.backend.description(state, None)
    assert d["should_transfer_files"] == "YES" and d["when_to_transfer_output"] == "ON_EXIT_OR_EVICT"
    assert d["log"] == str(state.dir.log_path) and d["submit_event_notes"] == "pymw chunk $(chunk)"
    assert d["request_cpus"] == "2" and d["request_memory"] == "1GB" and d["max_idle"] == "5"
    assert d["environment"] == "\"A=1 B='two words'\"" and d["+Project"] == '"p"'
    assert "$(chunk).in" in d["transfer_input_files"] and d["transfer_output_files"] == "$(chunk).out"
    str(htcondor2.Submit(d))  # the real parser takes it


def test_ten_thousand_tasks_are_one_submit(schedd):
    with Master("condor", schedd=schedd) as m:
        t0 = time.monotonic()
        job = m.map_async(abs, range(10_000), name="big")
        procs = wait_until(lambda: (lambda q: q if len(q) >= 1000 else None)(ours(schedd, job)), TIMEOUT,
                           "the cluster queued")
        elapsed = time.monotonic() - t0
        clusters = {int(ad["ClusterId"]) for ad in procs}
        assert len(clusters) == 1, clusters
        assert len(procs) == 1000  # automatic chunking: at most MAX_PROCS procs, 10 tasks each
        job.cancel()
        # every proc removed (a real schedd under load keeps a proc it was
        # starting in the queue as removed, JobStatus 3, for minutes: its
        # starter disconnects first, event 022; then it leaves)
        wait_until(lambda: all(int(ad["JobStatus"]) == 3 for ad in ours(schedd, job)), TIMEOUT,
                   "the cluster removed")
        counts = job.counts()
        # (a real pool may have run a proc or two before the cancel)
        assert job.done() and counts["cancelled"] + counts["done"] == 10_000 and counts["cancelled"] >= 9_900
    print(f"10,000 tasks to a queued cluster in {elapsed:.2f} s")


def test_held_proc_fails_with_job_held_and_is_removed(schedd, tmp_path):
    with Master("condor", schedd=schedd, retries=0, transfer_files=[str(tmp_path / "does_not_exist.dat")]) as m:
        job = m.map_async(abs, [1], name="held")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert isinstance(err, JobHeld), err
        assert err.HoldReasonCode == 13 and err.HoldReasonSubCode == 2
        assert "does_not_exist.dat" in err.HoldReason and "does_not_exist.dat" in str(err)
        wait_until(lambda: not ours(schedd, job), 60, "the held proc removed")


def test_injected_hold_is_retried_within_retries(standin):
    standin.inject_fault("hold", proc=0, reason="policy said no", code=26, subcode=0)
    with Master("condor", schedd=standin, retries=1) as m:
        job = m.map_async(abs, [-7], name="hold-retry")
        assert job.result(timeout=TIMEOUT) == [7]
        assert len(handle_of(job)["engine"]["clusters"]) == 2  # a new cluster


def test_evicted_proc_is_retried(standin):
    standin.inject_fault("evict", proc=0, reason="the owner came back")
    with Master("condor", schedd=standin) as m:
        seen = []
        m.events.subscribe(lambda e: seen.append(getattr(e, "state", None)))
        job = m.map_async(abs, [-5], name="evict")
        assert job.result(timeout=TIMEOUT) == [5]
        assert job.tasks[0].attempts == 2
        assert "retrying" in {str(s) for s in seen if s is not None}


def test_unpicklable_argument_is_a_payload_error_before_submit(schedd):
    with Master("condor", schedd=schedd) as m:
        job = m.map_async(id, [threading.Lock()], name="bad")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert isinstance(err, PayloadError) and "lock" in str(err).lower()
        # no chunk written, nothing submitted
        assert not ours(schedd, job) and not any((m.backend.job_dir(job) / "in").iterdir())
    lock = threading.Lock()
    with Master("condor", schedd=schedd) as m, pytest.raises(PayloadError):
        m.map_async(lambda x: lock, [1])


def test_cancel_removes_the_cluster(schedd):
    with Master("condor", schedd=schedd) as m:
        job = m.map_async(time.sleep, [60] * 4, name="sleepy")
        wait_until(lambda: job.counts()["running"] >= 1, TIMEOUT, "a task running")
        assert job.cancel() == 4
        wait_until(lambda: not ours(schedd, job), 60, "the procs removed")
        assert job.done()


def test_interrupt_in_result_removes_the_cluster(schedd):
    with Master("condor", schedd=schedd) as m:
        job = m.map_async(time.sleep, [60] * 3, name="interrupted")
        wait_until(lambda: ours(schedd, job), TIMEOUT, "the cluster queued")
        # a real SIGINT, as a terminal's Ctrl-C: it wakes the blocked wait
        # (_thread.interrupt_main only sets a flag a blocked wait never sees)
        timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            job.result(timeout=TIMEOUT)
        wait_until(lambda: not ours(schedd, job), 60, "the procs removed")


def test_shutdown_cancel_futures_leaves_nothing_queued(schedd):
    m = Master("condor", schedd=schedd, chunksize=1)
    job = m.map_async(time.sleep, [0.2] + [8] * 5, name="shutdown")
    wait_until(lambda: ours(schedd, job), TIMEOUT, "the cluster queued")
    m.shutdown(wait=True, cancel_futures=True)
    assert job.done()
    counts = job.counts()   # (what ran on is waited for; what was queued, cancelled)
    assert counts["cancelled"] >= 1 and counts["done"] + counts["cancelled"] == 6, counts
    # a real schedd shows removed procs (JobStatus 3) for a few seconds
    wait_until(lambda: not ours(schedd, job), 60, "the removed procs out of the queue")


def test_timeout_stops_the_proc(schedd):
    with Master("condor", schedd=schedd, timeout=1) as m:
        job = m.map_async(time.sleep, [120], name="slow")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert isinstance(err, TaskTimeout), err
        wait_until(lambda: not ours(schedd, job), 60, "the proc removed")


def test_corrupted_event_log_is_an_error_naming_the_file(schedd):
    with Master("condor", schedd=schedd) as m:
        job = m.map_async(time.sleep, [60], name="corrupt")
        wait_until(lambda: job.counts()["running"] == 1, TIMEOUT, "the task running")
        log = m.backend.job_dir(job) / "events.log"
        cluster = int(ours(schedd, job)[0]["ClusterId"])
        with open(log, "a") as f:  # a terminated event without its usage lines: the reader refuses it
            f.write(f"005 ({cluster:03d}.000.000) 2026-12-06 20:21:37 Job terminated.\n"
                    "\t(1) Normal termination (return value 0)\n...\n")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert isinstance(err, BatchError) and str(log) in str(err), err
        wait_until(lambda: not ours(schedd, job), 60, "the procs removed")


def test_schedd_is_recorded_without_pickles(standin):
    record = schedd_record(standin, None)
    assert record == {"kind": "object", "class": "pymw_magic.testing.condor:StandInSchedd",
                      "args": [str(standin.root)], "pool": None}
    again = schedd_from_record(record)
    assert isinstance(again, StandInSchedd) and again.root == standin.root
    assert schedd_record("schedd@host", "cm:9618") == {"kind": "name", "name": "schedd@host", "pool": "cm:9618"}
    assert schedd_record(None, None)["kind"] == "local"
    assert schedd_record(object.__new__(CondorBackend), None)["kind"] == "unknown"


OTHER_PYTHON = next((p for p in ("/root/.pyenv/versions/3.12.1/bin/python3", "/root/.pyenv/versions/3.10.13/bin/python3")
                     if os.path.exists(p)), None)


@pytest.mark.skipif(OTHER_PYTHON is None, reason="no Python of another minor version on this machine")
def test_a_node_with_another_python_gives_a_clear_error(schedd):
    with Master("condor", schedd=schedd, python=OTHER_PYTHON) as m:
        job = m.map_async(abs, [-1], name="wrong-python")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
    text = str(err)
    assert isinstance(err, Exception) and "python=" in text and "container_image=" in text, text
    import platform
    assert platform.python_version() in text or ".".join(platform.python_version_tuple()[:2]) in text


def test_a_proc_without_its_output_file_is_held_retried_then_named(schedd):
    # /usr/bin/env finds no such interpreter: the proc writes no output, and
    # the transfer of the missing output holds it (as a real schedd does)
    with Master("condor", schedd=schedd, python="no-such-python3", retries=1) as m:
        job = m.map_async(abs, [-1], name="no-interpreter")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
        assert isinstance(err, JobHeld) and err.HoldReasonCode == 12 and "0.out" in str(err), err
        assert len(handle_of(job)["engine"]["clusters"]) == 2  # retried once as a new cluster
        wait_until(lambda: not ours(schedd, job), 60, "the held proc removed")


def test_missing_output_after_a_normal_termination_names_the_file(schedd, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    remap = '"$(chunk).out = ' + str(elsewhere) + '/$(chunk).out"'
    with Master("condor", schedd=schedd, retries=0, submit={"transfer_output_remaps": remap}) as m:
        job = m.map_async(abs, [-1], name="lost-output")
        [err] = job.result(timeout=TIMEOUT, return_exceptions=True)
        out = m.backend.job_dir(job) / "out" / "0.out"
    assert isinstance(err, BatchError) and str(out) in str(err), err
    assert "normally" in str(err)


def test_exit_fault_with_an_output_keeps_the_results(standin):
    standin.inject_fault("exit", proc=0, exit_code=3)
    with Master("condor", schedd=standin) as m:
        job = m.map_async(abs, [-4], name="exit-fault")
        out = job.result(timeout=TIMEOUT, return_exceptions=True)
    # a verified output is the truth, whatever the proc's exit code
    assert out == [4] or isinstance(out[0], BatchError), out


def test_spool_submits_and_retrieves(schedd):
    with Master("condor", schedd=schedd, spool=True) as m:
        job = m.map_async(abs, [-1, -2], name="spooled")
        assert job.result(timeout=TIMEOUT) == [1, 2]


def test_safety_net_finds_a_proc_gone_without_an_event(standin):
    from pymw_magic.backends.batch import Chunk, JobState

    class FakeDir:
        path = Path("/nonexistent")

    with Master("condor", schedd=standin) as m:
        state = JobState(m.map_async(abs, [-1], name="x"), FakeDir())
        state.job.result(timeout=TIMEOUT)
        chunk = Chunk(0, state, [0])
        chunk.proc, chunk.state = (424242, 0), "queued"
        state.chunks[0] = chunk
        events = m.backend.safety_check([state])
    assert [(e.kind, e.proc) for _, e in events] == [("gone", (424242, 0))]


def test_submit_from_many_threads_and_two_jobs_at_once(schedd):
    with Master("condor", schedd=schedd) as m:
        futures = []
        lock = threading.Lock()

        def submitter(k):
            fs = [m.submit(abs, -(k * 10 + i)) for i in range(5)]
            with lock:
                futures.extend(fs)
        threads = [threading.Thread(target=submitter, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        job_a = m.map_async(abs, [-1, -2, -3], name="a")
        job_b = m.map_async(square, [5, 6], name="b")
        for t in threads:
            t.join(timeout=60)
        assert sorted(f.result(timeout=TIMEOUT) for f in futures) == sorted(k * 10 + i for k in range(8)
                                                                            for i in range(5))
        assert job_a.result(timeout=TIMEOUT) == [1, 2, 3] and job_b.result(timeout=TIMEOUT) == [25, 36]
        # a real schedd keeps a finished proc in its queue for a few seconds
        wait_until(lambda: not ours(schedd, job_a) and not ours(schedd, job_b), 60, "the finished procs gone")


def test_attach_in_the_submitting_process_is_the_same_job(schedd):
    with Master("condor", schedd=schedd) as m:
        job = m.map_async(time.sleep, [60], name="followed-here")
        wait_until(lambda: ours(schedd, job), TIMEOUT, "the cluster queued")
        from pymw_magic import store
        wait_until(lambda: _stored(store, "followed-here"), 30, "the job in the store")
        assert pymw_magic.reattach.attach("followed-here") is job
        job.cancel()


def _stored(store, name):
    try:
        return store.open_store().job(name).handle
    except store.UnknownJob:
        return None


def test_a_proc_removed_by_someone_else_is_cancelled(schedd):
    with Master("condor", schedd=schedd) as m:
        job = m.map_async(time.sleep, [60], name="removed-outside")
        [ad] = wait_until(lambda: ours(schedd, job), TIMEOUT, "the proc queued")
        schedd.act(htcondor2.JobAction.Remove, f"{ad['ClusterId']}.{ad['ProcId']}", reason="an admin")
        assert job.wait(TIMEOUT) and job.counts()["cancelled"] == 1


@pytest.mark.parametrize("recorded", [False, True])
def test_a_finished_job_is_let_go(standin, monkeypatch, recorded):
    import gc
    import weakref
    if not recorded:
        monkeypatch.setenv("PYMW_STORE", "0")
    with Master("condor", schedd=standin) as m:
        job = m.map_async(abs, [-1, -2], name="let-go")
        assert job.result(timeout=TIMEOUT) == [1, 2]
        ref = weakref.ref(job)
        del job
        if recorded:
            from pymw_magic import store
            store.recorder().flush()
        wait_until(lambda: gc.collect() is not None and ref() is None, 20, "the finished job collected")


@pytest.mark.skipif(live_reason() is None, reason="a local schedd answers here")
def test_no_local_schedd_is_a_clear_error():
    from pymw_magic.backends.batch import BackendMissing
    with pytest.raises(BackendMissing, match="StandInSchedd"):
        Master("condor")
