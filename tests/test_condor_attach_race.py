"""``attach`` racing the process that is still submitting the job.

Between a job's row reaching the store and its job directory being
recorded, the owner is still submitting (a real schedd takes seconds for a
big cluster).  ``attach`` then waits briefly and says the truth: the job is
followed by that process (or still being submitted by it), never that it
"never reached its engine".  A submitter killed in the middle of its submit
leaves a job that ``attach`` finds and finishes (its directory and chunks
are recorded before the engine is asked).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("htcondor2")

from conftest import ROOT, wait_until  # noqa: E402
import pymw_magic.reattach as reattach  # noqa: E402
from pymw_magic import store  # noqa: E402
from pymw_magic.errors import PymwError  # noqa: E402
from pymw_magic.testing.condor import StandInSchedd  # noqa: E402
from condor_fixtures import home, standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 180

SUBMITTER = textwrap.dedent('''
    import random, sys, time
    import pymw_magic.reattach
    from pymw_magic import Master
    from pymw_magic.testing.condor import StandInSchedd

    root, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

    class Slow(StandInSchedd):
        """A schedd slow to answer submit (a real one takes seconds for a big cluster)."""
        def submit(self, *args, **kwargs):
            time.sleep(delay if delay > 5 else random.uniform(0, delay))
            return super().submit(*args, **kwargs)

        def __reduce__(self):
            return (StandInSchedd, (str(self.root),))

    random.seed(int(sys.argv[4]))
    m = Master("condor", schedd=Slow(root), chunksize=1)
    for k in range(n):
        job = m.map_async(abs, [-1, -2, -3], name=f"race-{k}")
        print("SUBMITTING", k, flush=True)
        job.result(timeout=120)
        print("DONE", k, flush=True)
    print("ALL DONE", flush=True)
    time.sleep(600)
''')


def start_submitter(tmp_path, home, root, n, delay, seed=0):
    script = tmp_path / "submitter.py"
    script.write_text(SUBMITTER)
    env = dict(os.environ, PYTHONPATH=ROOT, PYMW_HOME=str(home))
    return subprocess.Popen([sys.executable, str(script), str(root), str(n), str(delay), str(seed)],
                            stdout=subprocess.PIPE, env=env, text=True)


def stored(name):
    try:
        return store.open_store().job(name)
    except store.UnknownJob:
        return None


def test_attach_while_the_owner_submits_says_the_truth(standin, tmp_path, home, monkeypatch):
    n = 12
    proc = start_submitter(tmp_path, home, standin.root, n, 1.5, seed=random.randrange(1 << 30))
    outcomes = []
    try:
        for k in range(n):
            assert proc.stdout.readline().split() == ["SUBMITTING", str(k)]
            wait_until(lambda: stored(f"race-{k}"), TIMEOUT, f"job race-{k} in the store")
            # half the trials give up at once, half wait as a user's attach does
            monkeypatch.setattr(reattach, "SUBMIT_PATIENCE", 0.0 if k % 2 else 10.0)
            try:
                job = reattach.attach(f"race-{k}", schedd=StandInSchedd(standin.root))
            except PymwError as exc:
                text = str(exc)
                assert "never reached" not in text, text
                assert f"pid {proc.pid}" in text, text
                assert "still being submitted" in text or "followed by another process" in text, text
                outcomes.append("being submitted" if "still being submitted" in text else "followed")
            else:  # (the owner let it go already: attached for real)
                try:
                    assert job.result(timeout=TIMEOUT) == [1, 2, 3]
                finally:
                    job.master.shutdown(wait=True)
                outcomes.append("attached")
            assert proc.stdout.readline().split() == ["DONE", str(k)]
        assert proc.stdout.readline().strip() == "ALL DONE"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    print("outcomes:", {o: outcomes.count(o) for o in set(outcomes)})
    assert len(outcomes) == n


def test_a_submitter_killed_during_its_submit_leaves_a_job_attach_finishes(standin, tmp_path, home):
    proc = start_submitter(tmp_path, home, standin.root, 1, 60.0)  # (a submit that takes a minute)
    try:
        assert proc.stdout.readline().split() == ["SUBMITTING", "0"]
        # its directory and chunks are recorded before the schedd is asked
        wait_until(lambda: (lambda r: r is not None and r.handle and r.handle.get("chunks"))(stored("race-0")),
                   TIMEOUT, "the job's directory and chunks in the store")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert standin.query() == []  # (killed before its submit reached the schedd)
    job = reattach.attach("race-0")
    try:
        assert job.result(timeout=TIMEOUT) == [1, 2, 3]
        assert all(t.attempts == 1 for t in job.tasks)
    finally:
        job.master.shutdown(wait=True)
    clusters = {int(ad["ClusterId"]) for ad in standin.history(projection=["ClusterId"])}
    assert len(clusters) == 1  # the three chunks submitted once, together


SLOW_PICKLE = textwrap.dedent('''
    import sys, time
    import pymw_magic.reattach
    from pymw_magic import Master
    from pymw_magic.testing.condor import StandInSchedd

    class SlowToPickle:
        """A task's argument: writing its chunk takes a while."""
        def __reduce__(self):
            time.sleep(30)
            return (int, ())

    m = Master("condor", schedd=StandInSchedd(sys.argv[1]))
    job = m.map_async(abs, [SlowToPickle()], name="never-submitted")
    print("SUBMITTING", flush=True)
    time.sleep(600)
''')


def test_attach_before_the_job_directory_exists_waits_then_names_the_owner(standin, tmp_path, home,
                                                                          monkeypatch):
    script = tmp_path / "slow_pickle.py"
    script.write_text(SLOW_PICKLE)
    env = dict(os.environ, PYTHONPATH=ROOT, PYMW_HOME=str(home))
    proc = subprocess.Popen([sys.executable, str(script), str(standin.root)], stdout=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "SUBMITTING"
        wait_until(lambda: stored("never-submitted"), TIMEOUT, "the job's row in the store")
        monkeypatch.setattr(reattach, "SUBMIT_PATIENCE", 1.0)
        with pytest.raises(PymwError, match="still being submitted") as err:
            reattach.attach("never-submitted")
        assert f"pid {proc.pid}" in str(err.value) and "never reached" not in str(err.value)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    # its owner is gone: now the job truly never reached its engine
    with pytest.raises(PymwError, match="never reached its engine") as err:
        reattach.attach("never-submitted")
    assert f"pid {proc.pid}" in str(err.value)
    assert standin.query() == []
