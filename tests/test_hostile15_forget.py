"""Hostile checks of removing a batch job while a submission of it is under
way (the removal waits for it, then removes what the engine made): from a
done-callback on the follower's thread and from many threads at once, with
the schedd's submit hanging until the test lets it go."""

from __future__ import annotations

import threading

import pytest

htcondor2 = pytest.importorskip("htcondor2")

from conftest import by_value, wait_until  # noqa: E402
from pymw_magic import Master  # noqa: E402
import pymw_magic.reattach  # noqa: E402,F401  (wires the batch family to the store)
from pymw_magic.testing.condor import StandInSchedd  # noqa: E402
from condor_fixtures import home  # noqa: E402,F401  (fixture)

TIMEOUT = 180


class SlowSchedd(StandInSchedd):
    """The stand-in whose submit, once armed, has queued the cluster but
    does not return until the gate opens (a loaded schedd)."""

    armed = threading.Event()
    gate = threading.Event()
    inside = threading.Event()

    def submit(self, *args, **kwargs):
        result = super().submit(*args, **kwargs)
        if self.armed.is_set():
            self.inside.set()
            if not self.gate.wait(TIMEOUT):
                raise RuntimeError("the test never opened the gate")
        return result


def in_queue(schedd, directory) -> list:
    return [ad for ad in schedd.query(projection=["ClusterId", "ProcId", "Iwd"])
            if str(ad.get("Iwd", "")).rstrip("/") == str(directory).rstrip("/")]


def _nap(x):
    import time
    time.sleep(x)
    return x


nap = by_value(_nap)  # (the node has not this test module)


def _gated(path):
    import os
    import time
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError("gate never opened")
        time.sleep(0.02)
    return 1


gated = by_value(_gated)


@pytest.fixture
def slow(tmp_path):
    SlowSchedd.armed.clear()
    SlowSchedd.gate.clear()
    SlowSchedd.inside.clear()
    s = SlowSchedd(tmp_path / "schedd", slots=2, idle_timeout=120)
    yield s
    SlowSchedd.gate.set()
    s.stop()


@pytest.mark.parametrize("where", ["done-callback", "threads"])
def test_removing_a_job_whose_submit_hangs_waits_then_leaves_nothing(slow, where):
    gate_file = slow.root.parent / "first-gate"
    with Master("condor", schedd=slow, chunksize=1) as m:
        # A job that ends while the other's submit hangs: its done-callback
        # runs on the follower's thread.
        first = m.map_async(gated, [str(gate_file)], name="first")
        wait_until(lambda: first.counts()["running"] == 1, TIMEOUT, "the first job running")
        SlowSchedd.armed.set()
        second = m.map_async(nap, [30, 30], name="hanging")
        assert SlowSchedd.inside.wait(TIMEOUT), "the second job's submit never began"
        directory = wait_until(lambda: m.backend.job_dir(second), TIMEOUT, "the second job's directory")
        failures: list[BaseException] = []
        removed = threading.Event()
        removers = 8 if where == "threads" else 1
        finished = []

        def remove(_job=None) -> None:
            try:
                second.remove(cancel=True)
            except BaseException as exc:  # (reported below)
                failures.append(exc)
            finally:
                finished.append(threading.current_thread().name)
                if len(finished) == removers:
                    removed.set()

        threads = []
        if where == "done-callback":
            called = threading.Event()
            first.add_done_callback(lambda j: (called.set(), remove()))
            gate_file.write_text("")
            assert called.wait(TIMEOUT), "the first job never ended while the submit hung"
        else:
            gate_file.write_text("")
            threads = [threading.Thread(target=remove) for _ in range(removers)]
            for t in threads:
                t.start()
        try:
            assert not removed.wait(3), "job.remove() returned while the submit was still making the job"
        finally:
            SlowSchedd.gate.set()
        assert removed.wait(TIMEOUT), "job.remove() never returned once the submit had"
        for t in threads:
            t.join(TIMEOUT)
        assert not failures, failures
        assert second.done() and second.counts()["cancelled"] == 2, second.result(timeout=5, return_exceptions=True)
        wait_until(lambda: not in_queue(slow, directory), TIMEOUT, "the removed job's procs out of the queue")
        wait_until(lambda: not directory.exists(), TIMEOUT, "the removed job's directory gone")
        assert first.result(timeout=TIMEOUT) == [1]
        assert m.map_async(abs, [-4], name="after").result(timeout=TIMEOUT) == [4]
