"""The simulator backend's fast lane: ``Master("simulator")`` running a map
job as list scheduling and reporting it to the Scheduler in chains gives
the same job as the general loop (one take/completed per task) and the same
trace as ``simulate()`` — task by task: host, start, end, attempts, result,
states, counts, events, the function's duration estimate, virtual job times.

The general loop is reached with a FIFO subclass (the lane vouches only for
FIFO and FastestFirst themselves), as the engine's own fast-path tests do.
Nothing here reads a wall clock: every assertion is about virtual time.
"""

from __future__ import annotations

import random
import threading

import pytest

from pymw_magic import Master, simulate
from pymw_magic.backends import simulator as simulator_backend
from pymw_magic.events import JobChanged, TasksChanged
from pymw_magic.policies import FIFO, FastestFirst
from pymw_magic.task import CANCELLED, DONE, FAILED, RUNNING


def work(x):
    """A duration model: the item is the task's length at speed 1."""
    return x


def pymw_task(x):
    """PyMW's convention: the task function returns its own length."""
    return 2.0 * x


def bad_at_13(x):
    if x == 13:
        raise ValueError("no length for 13")
    return 1.0 + (x % 3)


class SameAsFIFO(FIFO):
    """FIFO by another class: the lane leaves it to the general loop."""


class SameAsFastestFirst(FastestFirst):
    """FastestFirst by another class (likewise)."""


def _uniform(n, lo, hi, seed=1):
    rng = random.Random(seed)
    return [rng.uniform(lo, hi) for _ in range(n)]


#: (fn, items, master options); ``duration`` defaults to the task function (PyMW's convention)
CASES = {
    "constant, lognormal speeds": (work, range(3000), dict(workers=50, speeds="lognormal:1,0.5", duration=1.0)),
    "model, many hosts": (work, _uniform(6000, 0.5, 1.5), dict(workers=200, speeds="lognormal:1,0.5",
                                                               duration=work)),
    "model, fastest-first": (work, _uniform(4000, 0.5, 1.5), dict(workers=64, speeds="lognormal:1,0.8",
                                                                  duration=work, policy="fastest-first")),
    "pymw values": (pymw_task, _uniform(2000, 0.1, 2.0), dict(workers=30, speeds="uniform:0.5,4")),
    "ties": (work, range(2500), dict(workers=40, duration=1.0)),
    "ties, fastest-first": (work, range(2500), dict(workers=40, speeds=[1.0, 2.0] * 20, duration=1.0,
                                                    policy="fastest-first")),
    "chunksize 1, tiny": (work, range(3000), dict(workers=20, speeds="lognormal:1,0.5", duration=0.001),
                          ),
    "few tasks": (work, range(7), dict(workers=50, speeds="lognormal:1,0.5", duration=2.0)),
    "one host": (work, range(300), dict(workers=1, duration=1.0)),
    # chunking starts part-way: the lane hands over to the general loop
    "tasks turn tiny": (work, [1.0] * 1500 + [0.001] * 3000 + [0.5] * 500,
                        dict(workers=25, speeds="lognormal:1,0.5", duration=work)),
    "tiny from the start": (work, range(3000), dict(workers=10, speeds="lognormal:1,0.5", duration=0.002)),
    "few tiny tasks": (work, range(7), dict(workers=50, speeds="lognormal:1,0.5", duration=0.001)),
    # the model fails on one task: the lane hands over, the general loop fails it there
    "a model that raises": (work, range(40), dict(workers=4, duration=bad_at_13)),
}
JOB_OPTIONS = {"chunksize 1, tiny": dict(chunksize=1)}
#: how the lane's run ends: True (ran to the end) or False (handed over)
HANDS_OVER = {"tasks turn tiny", "tiny from the start", "few tiny tasks", "a model that raises"}


def _record(task):
    return (task.index, task.state, task.worker, task.started, task.finished, task.attempts,
            task.result if task.state is DONE else type(task.error).__name__)


def _run(fn, items, opts, job_opts, general, monkeypatch=None):
    """One job on Master("simulator"); what it did, task by task and event by event."""
    opts = dict(opts)
    if general:
        opts["policy"] = {"fifo": SameAsFIFO, "fastest-first": SameAsFastestFirst}[opts.get("policy", "fifo")]()
    seen = {"done": 0, "running": 0, "failed": 0, "finished": []}

    def watch(event):
        if isinstance(event, TasksChanged):
            key = {DONE: "done", RUNNING: "running", FAILED: "failed"}.get(event.state)
            if key:
                seen[key] += len(event.tasks)
        elif isinstance(event, JobChanged) and event.kind == "finished":
            seen["finished"].append(event.time)
    with Master("simulator", seed=3, **opts) as m:
        m.events.subscribe(watch)
        job = m.map_async(fn, list(items), **job_opts)
        assert job.wait(timeout=120)
        report = job.report()
        out = dict(tasks=[_record(t) for t in job.tasks], counts=job.counts(), progress=job.progress,
                   times=(job.created, job.finished_at), csv=report.to_csv(), makespan=report.makespan,
                   mean=job.fn.mean, samples=job.fn.samples, events=seen)
    return out


@pytest.fixture
def lane_runs(monkeypatch):
    """How each of the lane's runs ended (True: to the end; False: handed over)."""
    ends: list[bool] = []
    real = simulator_backend._Lane.run

    def run(self, job):
        got = real(self, job)
        ends.append(got)
        return got
    monkeypatch.setattr(simulator_backend._Lane, "run", run)
    return ends


@pytest.mark.parametrize("case", list(CASES))
def test_the_lane_gives_the_general_loops_job_and_simulates_trace(case, lane_runs):
    fn, items, opts = CASES[case]
    job_opts = JOB_OPTIONS.get(case, {})
    lane = _run(fn, items, opts, job_opts, general=False)
    assert lane_runs == [case not in HANDS_OVER]
    general = _run(fn, items, opts, job_opts, general=True)
    assert lane_runs == [case not in HANDS_OVER]     # (the subclass took the general loop)
    assert lane["tasks"] == general["tasks"]
    for key in ("counts", "progress", "times", "csv", "makespan", "mean", "samples"):
        assert lane[key] == general[key], key
    assert lane["events"] == general["events"]
    if case == "a model that raises":   # (simulate() raises the ModelError instead)
        assert lane["counts"]["failed"] == 1 and lane["tasks"][13][1] is FAILED
        return
    # and simulate()'s trace, from the same options
    sim_opts = dict(opts)
    hosts = sim_opts.pop("workers")
    duration = sim_opts.pop("duration", None)
    one_call = simulate(fn, list(items), hosts=hosts, duration=duration, seed=3, **job_opts, **sim_opts)
    assert lane["csv"] == one_call.to_csv()
    assert lane["makespan"] == one_call.makespan


def test_the_scenario_of_the_benchmark_small(lane_runs):
    """The benchmark's scenario (lognormal speeds, a model of the item),
    smaller: every task accounted for, as simulate() has it."""
    from math import exp
    rng = random.Random(1)
    speeds = [exp(0.5 * rng.gauss(0.0, 1.0)) for _ in range(300)]

    def model(x):
        return 0.5 + (x % 7) * 0.25
    one_call = simulate(None, range(30_000), hosts=300, speeds=speeds, duration=model)
    with Master("simulator", workers=300, speeds=speeds, duration=model) as m:
        job = m.map_async(work, range(30_000))
        results = job.result(timeout=300)
        report = job.report()
    assert lane_runs == [True]
    assert report.to_csv() == one_call.to_csv()
    assert results == [t.finished - t.started for t in job.tasks]
    assert job.counts()["done"] == 30_000 and job.progress == (30_000, 30_000)


def test_jobs_one_after_another_and_a_submit_between(lane_runs):
    """Arrivals as the module docstring says: each job when the one before
    ended; a submit() call goes the general way; the lane runs the jobs."""
    with Master("simulator", workers=3, duration=1.0) as m:
        first = m.map_async(work, range(9))
        one = m.submit(work, 5)
        second = m.map_async(work, range(4))
        assert one.result(timeout=30) == 1.0
        assert first.wait(timeout=30) and second.wait(timeout=30)
        a, b = first.report(), second.report()
    assert (a.t0, a.makespan) == (0.0, 3.0)
    assert (b.t0, b.makespan) == (4.0, 2.0) and {t.submitted for t in second.tasks} == {4.0}
    assert lane_runs == [True, True]


def test_map_streams_through_the_lane_in_order(lane_runs):
    with Master("simulator", workers=20, speeds="lognormal:1,0.5", duration=work) as m:
        items = _uniform(5000, 0.5, 1.5)
        got = list(m.map(work, items, timeout=120))
    assert len(got) == 5000 and all(g > 0 for g in got)
    assert lane_runs and lane_runs[0] in (True, False)   # (the iterator may read the input itself)


def test_a_job_cancelled_while_the_lane_runs_ends_every_task():
    """A job cancelled while the lane holds its tasks: every task ends
    (done or cancelled), none is left pending, and the next job runs."""
    for trial in range(5):
        with Master("simulator", workers=50, speeds="lognormal:1,0.5", duration=work) as m:
            job = m.map_async(work, _uniform(20_000, 0.5, 1.5, seed=trial))
            stopper = threading.Thread(target=job.cancel)
            stopper.start()
            stopper.join(timeout=30)
            assert job.wait(timeout=60)
            counts = job.counts()
            assert counts["pending"] == counts["running"] == counts["retrying"] == 0
            assert all(t.state in (DONE, CANCELLED) for t in job.tasks)
            after = m.map_async(work, [1.0, 2.0])
            assert len(after.result(timeout=30)) == 2 and after.counts()["done"] == 2


def test_shutdown_while_the_lane_runs_leaves_nothing_pending():
    for trial in range(3):
        m = Master("simulator", workers=100, speeds="lognormal:1,0.5", duration=work)
        job = m.map_async(work, _uniform(100_000, 0.5, 1.5, seed=trial))
        m.terminate()
        assert job.wait(timeout=60)
        assert all(t.state.final for t in job.tasks)


def test_jobs_from_many_threads_each_end_whole_and_in_turn():
    """8 threads × 3 map jobs at once: every job ends with all its tasks
    done, and jobs never overlap in virtual time (each arrives when the one
    before it ended), whichever path ran each."""
    for trial in range(3):
        with Master("simulator", workers=16, speeds="lognormal:1,0.5", duration=work) as m:
            jobs, errors = [], []
            lock = threading.Lock()

            def submit(k):
                try:
                    for j in range(3):
                        job = m.map_async(work, _uniform(300 + 50 * k, 0.5, 1.5, seed=k * 10 + j))
                        with lock:
                            jobs.append(job)
                except BaseException as exc:   # (reported below)
                    errors.append(exc)
            threads = [threading.Thread(target=submit, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not errors and len(jobs) == 24
            for job in jobs:
                assert job.wait(timeout=120)
                assert job.counts()["done"] == len(job.tasks) == job.progress[1]
            spans = sorted((job.report().t0, job.report().t0 + job.report().makespan) for job in jobs)
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_a_generator_input_and_starmap_give_the_same_trace_as_a_list(lane_runs):
    items = _uniform(3000, 0.5, 1.5, seed=5)
    opts = dict(workers=40, speeds="lognormal:1,0.5", duration=work)
    with Master("simulator", **opts) as m:
        listed = m.map_async(work, items)
        assert listed.wait(timeout=120)
        gen = m.map_async(work, (x for x in items))
        assert gen.wait(timeout=120)
        star = m.starmap_async(work, [(x,) for x in items])
        assert star.wait(timeout=120)
        starts = [job.report().t0 for job in (listed, gen, star)]
        # (each job arrives at its own virtual time: times compared from it, to 1 ns)
        traces = [[(t.worker, round(t.started - t0, 9), round(t.finished - t0, 9)) for t in job.tasks]
                  for job, t0 in zip((listed, gen, star), starts)]
    assert traces[0] == traces[1] == traces[2]
    assert len(lane_runs) == 3 and lane_runs[0] and lane_runs[2]


@pytest.mark.parametrize("policy", ["fifo", "fastest-first"])
def test_the_job_ends_with_its_functions_estimate_final(policy, lane_runs):
    """Whoever the job's end wakes reads the lane's per-task estimate, the
    one it keeps, not a per-chain value the lane had yet to put back (a
    waiter saw 0.758 for 0.947 on a loaded machine)."""
    fn, items, opts = CASES["ties, fastest-first"]
    opts = dict(opts, policy=policy)
    at_end = []
    with Master("simulator", seed=3, **opts) as m:
        def watch(event):
            if isinstance(event, JobChanged) and event.kind == "finished":
                at_end.append(event.job.fn.mean)
        m.events.subscribe(watch)
        job = m.map_async(fn, list(items))
        assert job.wait(timeout=120)
        final = job.fn.mean
    assert lane_runs == [True]
    assert at_end == [final]
