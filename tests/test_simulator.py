"""The grid simulator: closed-form results, known scheduling results,
determinism, the two forms (``simulate`` and ``Master("simulator")``)
giving the same trace, bad models, traces, network and overhead, reports.

Nothing here reads a wall clock: every assertion is about virtual time.
"""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest

from pymw_magic import Master, simulate
from pymw_magic.errors import WorkerLost
from pymw_magic.events import JobChanged, TasksChanged
from pymw_magic.policies import FIFO, FastestFirst, LongestFirst
from pymw_magic.simulation import ModelError, Report, SimulationError, compare, load_trace
from pymw_magic.simulation import models
from pymw_magic.task import RUNNING


def work(x):
    """A duration model: the item is the task's length at speed 1."""
    return x


def pymw_task(x):
    """PyMW's convention: the task function returns its own length."""
    return 2.0 * x


# --- closed forms ---------------------------------------------------------------------

@pytest.mark.parametrize("n, m, d", [(10, 3, 2.0), (12, 4, 0.5), (7, 7, 3.0), (1, 5, 1.0), (1000, 16, 0.25)])
def test_equal_tasks_on_equal_hosts_take_ceil_n_over_m_durations(n, m, d):
    r = simulate(None, range(n), hosts=m, duration=d)
    assert r.makespan == pytest.approx(math.ceil(n / m) * d, rel=1e-12)
    assert r.done == n and r.failures == 0 and r.retries == 0


def test_the_backend_gives_the_same_closed_form():
    with Master("simulator", workers=3, duration=2.0) as m:
        job = m.map_async(work, range(10))
        assert job.result(timeout=30) == [2.0] * 10      # a duration model: results are run times
        r = job.report()
    assert r.makespan == pytest.approx(8.0) and r.clock == "virtual"
    assert {t.worker for t in job.tasks} == {"host-0", "host-1", "host-2"}
    assert all(t.finished - t.started == pytest.approx(2.0) for t in job.tasks)


def test_speeds_scale_durations():
    r = simulate(work, [4.0, 4.0], hosts=2, speeds=[1, 4], duration=work)
    assert sorted(e - s for s, e in zip(r.task_start, r.task_end)) == [1.0, 4.0]


def test_hosts_up_half_the_time_halve_the_throughput():
    # regular on/off: 10 s up, 10 s down; 1-second tasks fit the windows exactly
    n, m = 2000, 2
    ideal = simulate(None, range(n), hosts=m, duration=1.0)
    half = simulate(None, range(n), hosts=m, duration=1.0, availability="periodic:10,10")
    cycles = n // m // 10
    assert half.makespan == pytest.approx((cycles - 1) * 20 + 10)
    assert half.throughput / ideal.throughput == pytest.approx(0.5, abs=0.01)
    # random on/off with the same means: about half too (a little work is lost at each outage)
    rnd = simulate(None, range(20000), hosts=8, duration=1.0, availability="onoff:50,50", seed=3)
    ideal8 = simulate(None, range(20000), hosts=8, duration=1.0)
    assert rnd.throughput / ideal8.throughput == pytest.approx(0.5, abs=0.06)
    assert rnd.lost + rnd.failures > 0


def _optimal_makespan(sizes: list[float], m: int) -> float:
    best = math.inf
    for assignment in itertools.product(range(m), repeat=len(sizes) - 1):
        loads = [0.0] * m
        loads[0] = sizes[0]                       # symmetry: the first job on host 0
        for size, host in zip(sizes[1:], assignment):
            loads[host] += size
        best = min(best, max(loads))
    return best


def test_longest_first_stays_within_grahams_bound():
    # Graham's tight instance: 2m+1 jobs 2m-1, 2m-1, ..., m+1, m+1, m, m, m
    m = 3
    sizes = [5, 5, 4, 4, 3, 3, 3]
    lpt = simulate(work, sizes, hosts=m, duration=work, policy="longest-first")
    assert lpt.makespan == 11 and _optimal_makespan(sizes, m) == 9
    rng = random.Random(1)
    for _ in range(6):
        sizes = [rng.randint(1, 20) for _ in range(8)]
        opt = _optimal_makespan(sizes, m)
        lpt = simulate(work, sizes, hosts=m, duration=work, policy="longest-first")
        assert lpt.makespan <= (4 / 3 - 1 / (3 * m)) * opt + 1e-9


def test_longest_first_beats_fifo_when_the_long_task_comes_last():
    sizes = [1, 1, 1, 1, 1, 1, 6]
    fifo = simulate(work, sizes, hosts=2, duration=work, policy="fifo")
    lpt = simulate(work, sizes, hosts=2, duration=work, policy="longest-first")
    assert (fifo.makespan, lpt.makespan) == (9, 6)


def test_shortest_first_minimises_mean_waiting_time():
    sizes = [5, 1, 4, 2, 3]
    waits = {p: simulate(work, sizes, hosts=1, duration=work, policy=p).waiting["mean"]
             for p in ("shortest-first", "fifo", "longest-first")}
    assert waits["shortest-first"] == (0 + 1 + 3 + 6 + 10) / 5
    assert waits["shortest-first"] < waits["fifo"] < waits["longest-first"]


def test_fastest_first_gives_the_few_tasks_to_the_fastest_hosts():
    speeds = [1, 2, 4, 8]
    fifo = simulate(None, range(2), hosts=4, speeds=speeds, duration=8.0)
    fast = simulate(None, range(2), hosts=4, speeds=speeds, duration=8.0, policy="fastest-first")
    assert fifo.makespan == 8.0 and fast.makespan == 2.0


def test_static_round_robin_is_slow_on_heterogeneous_hosts():
    speeds = [1, 1, 1, 4]
    fifo = simulate(None, range(40), hosts=4, speeds=speeds, duration=1.0)
    rr = simulate(None, range(40), hosts=4, speeds=speeds, duration=1.0, policy="round-robin")
    assert rr.makespan == 10.0 and fifo.makespan < rr.makespan


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_expected_attempts_per_task_is_one_over_one_minus_p(p):
    r = simulate(None, range(20000), hosts=10, duration=1.0, failure_rate=p, retries=math.inf, seed=5)
    assert r.done == 20000 and r.failed_tasks == 0
    assert r.attempts_per_task == pytest.approx(1 / (1 - p), rel=0.02)
    assert r.failures == r.retries


def test_retries_run_out_into_failed_tasks():
    r = simulate(None, range(2000), hosts=4, duration=1.0, failure_rate=0.5, retries=1, seed=2)
    assert 0 < r.failed_tasks < 2000 and r.done + r.failed_tasks == 2000
    assert r.failed_tasks == pytest.approx(2000 * 0.25, rel=0.15)   # fails twice: p^2


def test_failed_tasks_on_the_backend_are_worker_lost_after_retries():
    with Master("simulator", workers=2, duration=1.0, failure_rate=0.5, retries=0, seed=1) as m:
        job = m.map_async(work, range(40))
        results = job.result(timeout=30, return_exceptions=True)
    lost = [r for r in results if isinstance(r, BaseException)]
    assert lost and all(isinstance(e, WorkerLost) and "simulated failure" in str(e) for e in lost)
    assert job.counts()["failed"] == len(lost) and job.report().failures == len(lost)


# --- determinism and the one engine -----------------------------------------------------------

PLATFORM = dict(hosts=5, speeds="lognormal:1,0.5", failure_rate=0.1, availability="onoff:30,10",
                latency=0.01, overhead=0.001)


def test_same_seed_same_trace_other_seed_other_trace():
    items = [1 + (i % 7) / 3 for i in range(300)]
    a = simulate(work, items, duration=work, seed=11, **PLATFORM).to_csv()
    b = simulate(work, items, duration=work, seed=11, **PLATFORM).to_csv()
    c = simulate(work, items, duration=work, seed=12, **PLATFORM).to_csv()
    assert a == b and a != c


#: tasks of 1-3 ms: adaptive chunking batches them (the scheduler's queue
#: length then sizes the batches, so both sides must refill alike)
TINY = [0.001 + (i % 5) * 0.0005 for i in range(3000)]
SAME_TRACE_CASES = {
    **{policy: dict(items=[1 + (i % 7) / 3 for i in range(150)], policy=policy, retries=3, **PLATFORM)
       for policy in ["fifo", "random", "longest-first", "round-robin", "fastest-first"]},
    "tiny tasks": dict(items=TINY, hosts=4),
    "tiny tasks, overhead": dict(items=TINY, hosts=4, overhead=0.0005),
    "tiny tasks, failures": dict(items=TINY, hosts=4, failure_rate=0.05, retries=5),
    "tiny tasks, availability": dict(items=TINY, hosts=4, availability="onoff:0.05,0.01", retries=50),
    "tiny tasks, churn": dict(items=TINY, hosts=4, churn=0.05),
    "tiny tasks, longest-first": dict(items=TINY, hosts=4, policy="longest-first"),
    "churn and failures": dict(items=[1 + (i % 7) / 3 for i in range(150)], hosts=5, speeds="lognormal:1,0.5",
                               churn=20.0, failure_rate=0.1, retries=3),
}


@pytest.mark.parametrize("case", list(SAME_TRACE_CASES))
def test_simulate_and_the_backend_give_the_same_trace(case):
    opts = dict(SAME_TRACE_CASES[case])
    items, hosts = opts.pop("items"), opts.pop("hosts")
    one_call = simulate(work, items, duration=work, hosts=hosts, seed=4, **opts)
    batches = []

    def watch(event):
        if isinstance(event, TasksChanged) and event.state is RUNNING:
            batches.append(len(event.tasks))
    with Master("simulator", workers=hosts, duration=work, seed=4, **opts) as m:
        m.events.subscribe(watch)
        job = m.map_async(work, items)
        assert job.wait(timeout=120)
        backend = job.report()
    assert backend.to_csv() == one_call.to_csv()
    assert backend.makespan == one_call.makespan
    assert backend.done == one_call.done and backend.failures == one_call.failures
    if case.startswith("tiny"):
        assert max(batches) > 1       # the case is about batches: there were some
    if "failures" in case or "availability" in case or "churn" in case:
        assert one_call.failures + one_call.lost > 0


def test_a_policy_instance_is_copied_not_consumed():
    policy = LongestFirst()
    first = simulate(work, [1, 3, 2], hosts=1, duration=work, policy=policy)
    again = simulate(work, [1, 3, 2], hosts=1, duration=work, policy=policy)
    assert first.to_csv() == again.to_csv() and len(policy) == 0


# --- arrivals, the virtual clock, failing models ----------------------------------------------

def _submit_trace(pause):
    with Master("simulator", workers=2, duration=1.0) as m:
        futures = []
        for i in range(6):
            futures.append(m.submit(work, i))
            if pause:
                time.sleep(pause)
        assert [f.result(timeout=30) for f in futures] == [1.0] * 6
        tasks = [t for j in list(m._submit_jobs.values()) for t in j.tasks]
        return sorted((t.index, t.worker, t.submitted, t.started, t.finished) for t in tasks)


def test_arrivals_do_not_depend_on_how_fast_the_caller_runs():
    # each submit() call arrives when the simulator is idle: after the work before it
    quick, paused = _submit_trace(0), _submit_trace(0.02)
    assert quick == paused
    assert [(s, st, f) for _, _, s, st, f in quick] == [(float(i), float(i), float(i + 1)) for i in range(6)]
    # one map_async arrives at once; a second job arrives when the first is done
    with Master("simulator", workers=2, duration=1.0) as m:
        first = m.map_async(work, range(6))
        second = m.map_async(work, range(4))
        assert first.wait(timeout=30) and second.wait(timeout=30)
        a, b = first.report(), second.report()
        time.sleep(0.05)
        third = m.map_async(work, range(2))
        assert third.wait(timeout=30)
        c = third.report()
    assert (a.t0, a.makespan) == (0.0, 3.0)
    assert (b.t0, b.makespan) == (3.0, 2.0) and {t.submitted for t in second.tasks} == {3.0}
    assert (c.t0, c.makespan) == (5.0, 1.0)


def test_events_and_job_times_are_virtual():
    seen = []
    with Master("simulator", workers=1, duration=1.0) as m:
        m.events.subscribe(seen.append)
        job = m.map_async(work, range(30))
        assert job.wait(timeout=30)
    assert job.report().makespan == 30.0
    assert (job.created, job.finished_at, job.elapsed) == (0.0, 30.0, 30.0)
    times = [e.time for e in seen if isinstance(e, TasksChanged)]
    assert times and all(0.0 <= t <= 30.0 for t in times) and times == sorted(times)
    assert [e.time for e in seen if isinstance(e, JobChanged) and e.kind == "finished"] == [30.0]


def broken(x):
    return 1 / x


@pytest.mark.parametrize("policy", ["shortest-first", "longest-first", "fifo"])
def test_a_model_that_raises_on_a_later_item_fails_that_task_and_the_rest_goes_on(policy):
    items = list(range(1, 300))
    items[200] = 0
    with Master("simulator", workers=2, duration=broken, policy=policy) as m:
        job = m.map_async(work, items)
        results = job.result(timeout=60, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(results[200], ModelError)
        assert "ZeroDivisionError" in str(results[200]) and "on input (0)" in str(results[200])
        assert job.counts()["done"] == 298
        # the master goes on: a later job runs
        assert m.map_async(work, [1, 2, 4]).result(timeout=30) == [1.0, 0.5, 0.25]


def test_a_policy_estimate_that_raises_fails_that_task_alone_on_the_simulator():
    items = list(range(1, 200))
    items[5] = items[150] = 0           # one read with the first window, one much later
    with Master("simulator", workers=2, duration=1.0, policy=LongestFirst(estimate=lambda x: 1 / x)) as m:
        results = m.map_async(work, items).result(timeout=60, return_exceptions=True)
        assert m.submit(work, 0).exception(timeout=30) is not None    # a submit() too
    errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
    assert list(errors) == [5, 150] and all("ZeroDivisionError" in str(e) for e in errors.values())
    assert "task 150 (0)" in str(errors[150])


@pytest.mark.parametrize("path", ["general loop", "lane"])
def test_when_the_simulator_itself_fails_everything_it_held_fails_and_it_goes_on(monkeypatch, path):
    from pymw_magic.backends.simulator import SchedulerSource
    from pymw_magic.simulation.engine import Engine
    calls = [0]

    def flaky(real, at):
        def call(self, *args):
            calls[0] += 1
            if calls[0] == at:
                raise RuntimeError("a bug in the engine")
            return real(self, *args)
        return call
    if path == "general loop":
        # (a FIFO subclass: the lane leaves it to the general loop)
        policy = type("SameAsFIFO", (FIFO,), {})()
        monkeypatch.setattr(Engine, "_dispatch", flaky(Engine._dispatch, 20))
    else:   # the lane's first report of what ran
        policy = "fifo"
        monkeypatch.setattr(SchedulerSource, "note_job_return", flaky(SchedulerSource.note_job_return, 1))
    with Master("simulator", workers=2, duration=1.0, policy=policy) as m:
        with pytest.warns(RuntimeWarning, match="a bug in the engine"):
            job = m.map_async(work, range(500))      # more than its window: input not yet read
            results = job.result(timeout=60, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(results) == 500 and job.counts()["failed"] == len(failed) > 400
        assert all(isinstance(e, SimulationError) and "a bug in the engine" in str(e) for e in failed)
        assert m.map_async(work, range(10)).result(timeout=30) == [1.0] * 10


def test_a_pymw_scheduler_func_sees_the_free_hosts_and_its_choice_is_honoured():
    seen = []

    def fastest(tasks, workers):       # PyMW: the task to the fastest free worker
        seen.append(sorted((w.name, w.speed) for w in workers))
        return tasks[0], max(workers, key=lambda w: w.speed)
    r = simulate(None, range(1), hosts=3, speeds=[1, 4, 2], duration=8.0, policy=fastest)
    assert seen[0] == [("host-0", 1.0), ("host-1", 4.0), ("host-2", 2.0)]
    assert r.makespan == 2.0 and r.task_host == [1]
    seen.clear()
    with Master("simulator", workers=3, speeds=[1, 4, 2], duration=8.0, policy=fastest) as m:
        job = m.map_async(work, range(4))
        job.wait(timeout=30)
    # at t=0 every host is free: tasks go fastest first; then each frees alone
    assert [t.worker for t in job.tasks][:3] == ["host-1", "host-2", "host-0"]
    assert job.report().to_csv() == simulate(None, range(4), hosts=3, speeds=[1, 4, 2], duration=8.0,
                                             policy=fastest).to_csv()


# --- durations and results ------------------------------------------------------------------------

#: a stand-in for the clock "measure" times tasks with: ``spends(x)``
#: advances it by x seconds, so a measurement is exact (nothing reads a wall clock)
_FAKE_NOW = [0.0]


def _fake_clock():
    return _FAKE_NOW[0]


def spends(x):
    _FAKE_NOW[0] += x
    return x * 10


def test_what_a_task_result_holds(monkeypatch):
    # PyMW's convention: the function returns the task's length; that is the result
    with Master("simulator", workers=2, speeds=2.0) as m:
        job = m.map_async(pymw_task, [1, 2, 3])
        assert job.result(timeout=30) == [2.0, 4.0, 6.0]
        assert [t.finished - t.started for t in job.tasks] == [1.0, 2.0, 3.0]
    # "measure": the function really runs once here, timed; the result is its
    # value, and its simulated run time is the time measured / the host's speed
    monkeypatch.setattr(models, "_clock", _fake_clock)
    calls = _FAKE_NOW[0]
    with Master("simulator", workers=2, speeds=[1, 4], duration="measure") as m:
        job = m.map_async(spends, [4.0, 8.0, 2.0, 6.0])
        assert job.result(timeout=30) == [40.0, 80.0, 20.0, 60.0]
        speed = {w["name"]: w["speed"] for w in m.worker_info()}
        runs = {t.args[0]: (t.worker, t.finished - t.started) for t in job.tasks}
    assert _FAKE_NOW[0] - calls == 20.0                      # each task ran once
    assert {x: d * speed[w] for x, (w, d) in runs.items()} == {4.0: 4.0, 8.0: 8.0, 2.0: 2.0, 6.0: 6.0}
    assert {w for w, _ in runs.values()} == {"host-0", "host-1"}
    r = simulate(spends, [4.0, 8.0], hosts=2, speeds=[1, 4], duration="measure")
    assert r.values == [40.0, 80.0]
    assert sorted((e - s) * r.speeds[h] for h, s, e in zip(r.task_host, r.task_start, r.task_end)) == [4.0, 8.0]


def test_host_aware_duration_model():
    def on_host(x, host):
        return 1.0 if host is None or host.index == 0 else 10.0
    r = simulate(None, range(4), hosts=2, duration=on_host)
    per_host = {}
    for row in r.rows():
        per_host.setdefault(row[1], []).append(row[3] - row[2])
    assert set(per_host["host-0"]) == {1.0} and set(per_host["host-1"]) == {10.0}


# --- bad models ------------------------------------------------------------------------------

def test_bad_models_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="speeds.*> 0"):
        simulate(None, range(3), hosts=2, speeds=-1, duration=1.0)
    with pytest.raises(ModelError, match="3 value.*2 host"):
        simulate(None, range(3), hosts=2, speeds=[1, 2, 3], duration=1.0)
    with pytest.raises(ModelError, match="lognormal"):
        simulate(None, range(3), hosts=2, speeds="lognormal:fast", duration=1.0)
    with pytest.raises(ModelError, match="failure_rate"):
        simulate(None, range(3), hosts=2, failure_rate=1.0, duration=1.0)
    empty = tmp_path / "empty.csv"
    empty.write_text("# no intervals\n")
    with pytest.raises(ModelError, match="empty"):
        simulate(None, range(3), hosts=2, availability=str(empty), duration=1.0)

    def broken(x):
        return 1 / x
    with pytest.raises(ModelError, match=r"raised ZeroDivisionError: division by zero on input \(0\)"):
        simulate(None, [1, 0], hosts=1, duration=broken)
    with pytest.raises(ModelError, match="returned 'long'.*finite number of seconds"):
        simulate(lambda x: "long", [1], hosts=1)


def test_bad_models_on_the_backend(tmp_path):
    with pytest.raises(ValueError, match="speeds.*lognormal:MEDIAN,SIGMA"):
        Master("simulator", workers=2, speeds="fast")
    with pytest.raises(ValueError, match="speeds.*> 0"):
        Master("simulator", workers=2, speeds=[1, -2])
    with pytest.raises(ValueError, match="failure_rate"):
        Master("simulator", workers=2, failure_rate=2)
    empty = tmp_path / "empty.tab"
    empty.write_text("")
    with pytest.raises(ModelError, match="empty"):
        Master("simulator", workers=2, availability=str(empty))

    def broken(x):
        return 1 / x
    with Master("simulator", workers=2, duration=broken) as m:
        results = m.map_async(work, [1, 0, 2]).result(timeout=30, return_exceptions=True)
    assert results[0] == 1.0 and results[2] == 0.5
    assert isinstance(results[1], ModelError) and "ZeroDivisionError" in str(results[1])


# --- traces, network, overhead -----------------------------------------------------------------

#: The FTA's event_trace columns as its format page (FTAFormat) lists them,
#: written out here, not imported from the parser
DOCUMENTED_EVENT_TRACE = ["event_id", "component_id", "node_id", "platform_id", "node_name", "event_type",
                          "event_start_time", "event_stop_time", "event_end_reason"]
FTA_EVENTS = [  # node 7: up 1000-1010, then down; node 8: up 1000-1100
    dict(event_id=1, component_id=1, node_id=7, platform_id=1, node_name="n7", event_type=1,
         event_start_time=1000.0, event_stop_time=1010.0, event_end_reason=0),
    dict(event_id=2, component_id=1, node_id=7, platform_id=1, node_name="n7", event_type=0,
         event_start_time=1010.0, event_stop_time=1100.0, event_end_reason=1),
    dict(event_id=3, component_id=2, node_id=8, platform_id=1, node_name="n8", event_type=1,
         event_start_time=1000.0, event_stop_time=1100.0, event_end_reason=0),
]


def _fta(path, columns, header=False, events=FTA_EVENTS):
    lines = ["\t".join(columns)] if header else []
    lines += ["\t".join(str(e.get(c, 0)) for c in columns) for e in events]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_csv_and_fta_traces(tmp_path):
    csv_trace = tmp_path / "hosts.csv"
    csv_trace.write_text("host,start,end\nalpha,100,105\nalpha,110,120\nbeta,100,120\n")
    assert load_trace(str(csv_trace)) == {"alpha": [(0.0, 5.0), (10.0, 20.0)], "beta": [(0.0, 20.0)]}
    # alpha goes down at t=5 in the middle of its 3rd task: that attempt is
    # lost and re-run, not charged to the task (an outage is not its fault)
    r = simulate(None, range(8), hosts=2, duration=2.0, availability=str(csv_trace), retries=0)
    assert r.hosts == ["alpha", "beta"] and r.done == 8 and r.failed_tasks == 0
    assert (r.failures, r.lost, r.retries) == (0, 1, 0)
    expected = {"7": [(0.0, 10.0)], "8": [(0.0, 100.0)]}
    # the documented layout: headerless, and with its header line
    assert load_trace(_fta(tmp_path / "a.tab", DOCUMENTED_EVENT_TRACE)) == expected
    assert load_trace(_fta(tmp_path / "b.tab", DOCUMENTED_EVENT_TRACE, header=True)) == expected
    # a header names the columns, in any order (and event_end_time for the stop time)
    shuffled = ["node_name", "event_type", "node_id", "event_start_time", "event_stop_time", "event_id"]
    assert load_trace(_fta(tmp_path / "c.tab", shuffled, header=True)) == expected
    renamed = tmp_path / "d.tab"
    _fta(renamed, DOCUMENTED_EVENT_TRACE, header=True)
    renamed.write_text(renamed.read_text().replace("event_stop_time", "event_end_time"))
    assert load_trace(str(renamed)) == expected
    # headerless with a component_type column after event_id: told apart by the count
    ten = DOCUMENTED_EVENT_TRACE[:1] + ["component_type"] + DOCUMENTED_EVENT_TRACE[1:]
    assert load_trace(_fta(tmp_path / "e.tab", ten)) == expected
    r = simulate(None, range(4), hosts=2, duration=4.0, availability=_fta(tmp_path / "f.tab", DOCUMENTED_EVENT_TRACE))
    assert r.hosts == ["7", "8"] and r.done == 4
    # another column count is said as such, not as "the trace is empty"
    seven = _fta(tmp_path / "g.tab", DOCUMENTED_EVENT_TRACE[:7])
    with pytest.raises(ModelError, match=r"line 1: 7 tab-separated column\(s\).* has 9 \(event_id, component_id"):
        load_trace(seven)
    ragged = tmp_path / "h.tab"
    _fta(ragged, DOCUMENTED_EVENT_TRACE)
    ragged.write_text(ragged.read_text() + "4\t1\t7\t1\tn7\t1\t1100\n")
    with pytest.raises(ModelError, match=r"line 4: 7 column\(s\), expected 9"):
        load_trace(str(ragged))
    down_only = _fta(tmp_path / "i.tab", DOCUMENTED_EVENT_TRACE, events=FTA_EVENTS[1:2])
    with pytest.raises(ModelError, match="no up intervals.*event_type 1"):
        load_trace(down_only)
    bad = tmp_path / "bad.tab"
    bad.write_text("1\t0\t1\t7\n")
    with pytest.raises(ModelError, match="line 1"):
        load_trace(str(bad))


def test_an_outage_does_not_use_up_a_tasks_retries():
    # 3-second tasks in 5-second windows: the second task of each window is
    # cut at its end; with retries=0 a charged outage would fail it
    r = simulate(None, range(20), hosts=1, duration=3.0, availability="periodic:5,5", retries=0)
    assert (r.done, r.failed_tasks, r.failures, r.lost) == (20, 0, 0, 19)
    assert set(r.task_attempts) == {1} and r.makespan == 19 * 10 + 3
    with Master("simulator", workers=1, duration=3.0, availability="periodic:5,5", retries=0) as m:
        job = m.map_async(work, range(20))
        assert job.result(timeout=60) == [3.0] * 20
        assert job.report().to_csv() == r.to_csv()
    # failures are still charged: with retries=0 a failed attempt fails its task
    f = simulate(None, range(200), hosts=2, duration=1.0, failure_rate=0.2, retries=0, seed=1)
    assert f.failed_tasks == f.failures > 0


def test_host_churn_closed_form():
    # A host lives an exponential lifetime (mean L) and is then replaced: a
    # d-second attempt survives with probability exp(-d/L), so a task takes
    # exp(d/L) attempts on average; the lost ones are not charged.
    n, d, life = 20000, 1.0, 2.0
    r = simulate(None, range(n), hosts=10, duration=d, churn=life, retries=0, seed=3)
    assert r.done == n and r.failed_tasks == 0 and r.failures == 0
    assert r.lost / n == pytest.approx(math.exp(d / life) - 1, rel=0.04)
    assert simulate(None, range(n), hosts=10, duration=d, churn=life, retries=0, seed=3).to_csv() == r.to_csv()
    # the backend takes it too, with the same trace
    with Master("simulator", workers=3, duration=d, churn=life, retries=0, seed=2) as m:
        job = m.map_async(work, range(300))
        job.wait(timeout=60)
        assert job.report().to_csv() == simulate(None, range(300), hosts=3, duration=d, churn=life,
                                                 retries=0, seed=2).to_csv()
    with pytest.raises(ModelError, match="churn"):
        simulate(None, range(3), hosts=1, duration=1.0, churn=-1)
    with pytest.raises(ValueError, match="churn"):
        Master("simulator", workers=1, churn="often")


def test_when_no_host_will_ever_come_back_the_rest_fails_clearly(tmp_path):
    trace = tmp_path / "short.csv"
    trace.write_text("h,0,3\n")
    r = simulate(None, range(5), hosts=1, duration=1.0, availability=str(trace))
    assert r.done == 3 and r.failed_tasks == 2 and "ever be available again" in r.note
    with Master("simulator", workers=1, duration=1.0, availability=str(trace)) as m:
        results = m.map_async(work, range(5)).result(timeout=30, return_exceptions=True)
    assert results[:3] == [1.0] * 3
    assert all(isinstance(e, SimulationError) and "available again" in str(e) for e in results[3:])


def test_latency_and_master_overhead_closed_forms():
    # one host: each task costs overhead + latency in + work + latency out
    r = simulate(None, range(10), hosts=1, duration=1.0, latency=0.25, overhead=0.5, chunksize=1)
    assert r.makespan == pytest.approx(10 * (0.5 + 0.25 + 1.0 + 0.25))
    # instant tasks: the master's dispatches are the bottleneck, one after another
    r = simulate(None, range(100), hosts=8, duration=0.0, overhead=0.01, chunksize=1)
    assert r.makespan == pytest.approx(100 * 0.01)
    # chunking amortises it
    r = simulate(None, range(100), hosts=4, duration=0.0, overhead=0.01, chunksize=25)
    assert r.makespan == pytest.approx(4 * 0.01)


def test_bandwidth_charges_the_real_payload_sizes():
    small = simulate(work, [1.0] * 4, hosts=1, duration=work, bandwidth=1000.0, chunksize=1)
    large = simulate(lambda a: 1.0, [b"x" * 10_000] * 4, hosts=1, bandwidth=1000.0, chunksize=1)
    # 10 kB arguments at 1 kB/s: over 10 s each; a float argument: a few ms
    assert large.makespan - 4.0 > 4 * 10.0 > small.makespan - 4.0 > 0


# --- reports --------------------------------------------------------------------------------------

def test_report_statistics_csv_comparison_and_timeline():
    r = simulate(None, range(4), hosts=2, duration=1.0, label="demo")
    assert r.waiting == {"mean": 0.5, "median": 0.5, "p90": 1.0, "max": 1.0}
    assert r.utilization == {"host-0": 1.0, "host-1": 1.0} and r.throughput == 2.0
    lines = r.to_csv().splitlines()
    assert lines[0] == "task,host,start,end,outcome" and len(lines) == 5
    assert lines[1] == "0,host-0,0.0,1.0,done"
    other = simulate(None, range(4), hosts=1, duration=1.0, label="one host")
    table = compare(r, other)
    assert "demo" in str(table) and "one host" in str(table) and table.best().label == "demo"
    assert "<table" in table._repr_html_()
    svg = r.timeline().to_svg()
    assert svg.startswith("<svg") and svg.count('class="done"') == 1 and "host-0" in svg
    assert isinstance(r, Report) and "makespan 2 s" in repr(r)


def test_report_of_a_real_local_job(master):
    job = master.map_async(work, range(6))
    job.result(timeout=60)
    r = job.report()
    assert r.clock == "wall" and r.done == 6 and r.makespan > 0
    # its hosts are the workers that ran its tasks, each row on its own worker
    assert set(r.hosts) == {t.worker for t in job.tasks}
    assert set(r.hosts) <= set(master.tasks_per_worker)
    assert [r.hosts[h] for h in r.task_host] == [t.worker for t in job.tasks]
    assert list(r.task_start) == [t.started for t in job.tasks]
    assert r.makespan == max(t.finished for t in job.tasks) - min(t.submitted for t in job.tasks)
    assert "<svg" in r.timeline().to_svg()


def test_compare_reports_the_labels_it_was_given():
    fast = simulate(None, range(4), hosts=4, duration=1.0)
    slow = simulate(None, range(4), hosts=1, duration=1.0)
    table = compare([slow, fast], labels=["one host", "four hosts"])
    best = table.best()
    assert best.label == "four hosts" and best.makespan == 1.0
    assert fast.label == "fifo"                         # the report itself is left alone
    assert table.best("throughput").label == "four hosts"


# --- the fast path ----------------------------------------------------------------------------

def _uniform_items(n, lo, hi, seed=1):
    rng = random.Random(seed)
    return [rng.uniform(lo, hi) for _ in range(n)]


FAST_CASES = {
    # the benchmark's scenario, small: constant work, heterogeneous speeds
    "constant": dict(fn=None, items=range(3000), hosts=50, speeds="lognormal:1,0.5", duration=1.0),
    # work from a model of the item; the fastest hosts served first on ties
    "model, fastest-first": dict(fn=None, items=_uniform_items(4000, 0.5, 1.5), hosts=64,
                                 speeds="lognormal:1,0.8", duration=work, policy="fastest-first"),
    # PyMW's convention: the function is called for the length, its value kept
    "pymw values": dict(fn=pymw_task, items=_uniform_items(2000, 0.1, 2.0), hosts=30,
                        speeds="uniform:0.5,4"),
    # equal hosts and equal tasks: every event is a tie, broken by rank
    "ties": dict(fn=None, items=range(2500), hosts=40, duration=1.0),
    "ties, fastest-first": dict(fn=None, items=range(2500), hosts=40, speeds=[1.0, 2.0] * 20,
                                duration=1.0, policy="fastest-first"),
    # a fixed chunksize of one: tiny tasks never batched
    "chunksize 1": dict(fn=None, items=range(3000), hosts=20, speeds="lognormal:1,0.5", duration=0.001,
                        chunksize=1),
    # fewer tasks than hosts: most hosts never work
    "few tasks": dict(fn=None, items=range(7), hosts=50, speeds="lognormal:1,0.5", duration=2.0),
    "no tasks": dict(fn=None, items=[], hosts=5, duration=1.0),
}

#: cases where the tasks become tiny part-way: adaptive chunking starts
#: batching, so the fast path hands over to the general loop mid-run
HAND_OVER_CASES = {
    "tasks turn tiny": dict(fn=None, items=[1.0] * 1500 + [0.001] * 3000 + [0.5] * 500, hosts=25,
                            speeds="lognormal:1,0.5", duration=work),
    "tiny from the start": dict(fn=None, items=range(3000), hosts=10, speeds="lognormal:1,0.5",
                                duration=0.002),
    # the estimate lands exactly on half the chunking target (0.01 s): batching starts there
    "at the threshold": dict(fn=None, items=range(400), hosts=4, duration=0.01),
    # idle hosts already (fewer tasks than hosts) when the general loop takes over
    "few tiny tasks": dict(fn=None, items=range(7), hosts=50, speeds="lognormal:1,0.5", duration=0.001),
}


class SameAsFIFO(FIFO):
    """FIFO by another class: the fast path does not vouch for subclasses."""


class SameAsFastestFirst(FastestFirst):
    """FastestFirst by another class (likewise)."""


def _both_paths(monkeypatch, opts):
    """The same simulation on the fast path and on the general loop, and
    how often the fast path ran and handed over."""
    from pymw_magic.simulation import engine
    calls = {"run_fast": 0, "hand_over": 0}

    def counted(name):
        real = getattr(engine, name)

        def wrapper(*args, **kwargs):
            calls[name.strip("_")] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(engine, name, wrapper)

    counted("run_fast")
    counted("_hand_over")
    opts = dict(opts)
    fn, items = opts.pop("fn"), opts.pop("items")
    fast = simulate(fn, list(items), seed=7, **opts)
    # the same order from a subclass, which the fast path leaves to the general loop
    same_order = {"fifo": SameAsFIFO, "fastest-first": SameAsFastestFirst}[opts.pop("policy", "fifo")]
    counts = dict(calls)
    general = simulate(fn, list(items), seed=7, policy=same_order(), **opts)
    assert calls == counts     # (it did take the general loop)
    return fast, general, calls


def _assert_same_report(fast, general):
    assert fast.makespan == general.makespan
    assert fast.utilization == general.utilization
    assert list(fast.task_host) == list(general.task_host)
    assert list(fast.task_start) == list(general.task_start)
    assert list(fast.task_end) == list(general.task_end)
    assert list(fast.task_state) == list(general.task_state)
    assert list(fast.task_attempts) == list(general.task_attempts)
    assert fast.values == general.values
    assert fast.waste == general.waste == []
    assert fast.to_csv() == general.to_csv()


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_the_fast_path_gives_the_general_loops_report(monkeypatch, case):
    fast, general, calls = _both_paths(monkeypatch, FAST_CASES[case])
    assert calls == {"run_fast": 1, "hand_over": 0}   # chosen on its own, ran to the end
    _assert_same_report(fast, general)
    if case == "constant":
        assert len(set(general.speeds)) == 50 and fast.done == 3000


@pytest.mark.parametrize("case", list(HAND_OVER_CASES))
def test_the_fast_path_hands_over_to_the_general_loop_when_chunking_starts(monkeypatch, case):
    fast, general, calls = _both_paths(monkeypatch, HAND_OVER_CASES[case])
    assert calls == {"run_fast": 1, "hand_over": 1}
    _assert_same_report(fast, general)


def test_the_fast_path_is_not_taken_where_it_would_differ(monkeypatch):
    from pymw_magic.simulation import engine
    taken = []
    real = engine.run_fast
    monkeypatch.setattr(engine, "run_fast", lambda *a: taken.append(1) or real(*a))
    base = dict(hosts=4, speeds=[1, 2, 3, 4], duration=1.0)
    for opts in [dict(policy="random"), dict(policy="longest-first"), dict(chunksize=3),
                 dict(failure_rate=0.1), dict(availability="periodic:10,5"), dict(latency=0.01),
                 dict(overhead=0.001), dict(duration=lambda x, host: 1.0 / (1 + host.index))]:
        simulate(None, range(50), **{**base, **opts})
    assert taken == []
    simulate(None, range(50), **base)
    assert taken == [1]


# --- no progress, failed tasks counted once, timeouts ----------------------------------------

#: hosts never up long enough for a task: 4000 s tasks in 3600 s windows;
#: 1 s tasks on hosts that live 1 ms on average
NEVER_FITS = {
    "periodic": (4000.0, dict(availability="periodic:3600,600")),
    "churn": (1.0, dict(churn=1e-3)),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(NEVER_FITS))
def test_no_host_up_long_enough_fails_the_tasks_instead_of_hanging(case):
    length, opts = NEVER_FITS[case]
    r = simulate(lambda n: length, range(3), hosts=2, **opts)
    assert r.done == 0 and r.failed_tasks == 3
    assert "no task can finish" in r.note and "cut short by their host" in r.note
    assert r.lost >= 10_000 and r.failures == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(NEVER_FITS))
def test_no_host_up_long_enough_on_the_backend_fails_the_job_and_serves_the_next(case):
    length, opts = NEVER_FITS[case]
    with Master("simulator", workers=2, duration=length, **opts) as m:
        job = m.map_async(work, range(3))
        results = job.result(timeout=30, return_exceptions=True)
        assert all(isinstance(e, SimulationError) and "no task can finish" in str(e) for e in results)
        assert job.report().failed_tasks == 3
        # the backend goes on: a later submission is served (and fails as clearly)
        later = m.submit(work, 0)
        assert isinstance(later.exception(timeout=30), SimulationError)


@pytest.mark.timeout(60)
def test_a_task_that_never_fits_does_not_stop_the_others():
    # one 4000 s task among 1 s ones in 3600 s windows: the others finish,
    # then that one fails alone
    r = simulate(work, [1.0] * 5 + [4000.0] + [1.0] * 5, hosts=2, duration=work,
                 availability="periodic:3600,600")
    assert r.done == 10 and r.failed_tasks == 1 and list(r.task_state).index(1) == 5


@pytest.mark.parametrize("seed", range(12))
def test_a_task_that_fails_for_good_is_counted_once(seed):
    r = simulate(lambda n: 1.0, range(4), hosts=1, failure_rate=0.5, retries=0, seed=seed)
    rows = r.to_csv().splitlines()[1:]
    assert len(rows) == len(set(rows)) == 4                  # one attempt each, once
    assert r.utilization["host-0"] <= 1.0 + 1e-12
    assert r.done + r.failed_tasks == 4 and r.failures == r.failed_tasks
    # with retries, every attempt once: a row per attempt charged
    r = simulate(lambda n: 1.0, range(30), hosts=3, failure_rate=0.5, retries=1, seed=seed)
    rows = r.to_csv().splitlines()[1:]
    assert len(rows) == len(set(rows)) == sum(r.task_attempts) == r.done + r.failures
    assert all(u <= 1.0 + 1e-12 for u in r.utilization.values())
    assert r.failures == r.retries + r.failed_tasks


def test_a_task_that_fails_for_good_is_counted_once_on_the_backend():
    one_call = simulate(work, [1.0] * 20, hosts=2, duration=work, failure_rate=0.5, retries=0, seed=3)
    with Master("simulator", workers=2, duration=work, failure_rate=0.5, retries=0, seed=3) as m:
        job = m.map_async(work, [1.0] * 20)
        assert job.wait(timeout=30)
        r = job.report()
    rows = r.to_csv().splitlines()[1:]
    assert len(rows) == len(set(rows)) == 20 and r.failed_tasks == r.failures > 0
    assert all(u <= 1.0 + 1e-12 for u in r.utilization.values())
    assert r.to_csv() == one_call.to_csv() and r.failures == one_call.failures


def test_a_timeout_stops_a_task_at_its_deadline_in_virtual_time():
    # one host: the 100 s task is stopped at 1 + 5 and the host takes the next
    r = simulate(work, [1.0, 100.0, 2.0], hosts=1, duration=work, timeout=5)
    assert list(r.task_state) == [0, 1, 0] and r.failures == 1 and r.failed_tasks == 1
    assert (r.task_start[1], r.task_end[1]) == (1.0, 6.0) and r.task_start[2] == 6.0 and r.makespan == 8.0
    assert r.utilization["host-0"] == 1.0 and r.retries == 0        # not retried, as on a real pool
    # every 100 s task fails at 5 s
    r = simulate(lambda n: 100.0, range(3), hosts=2, timeout=5)
    assert r.failed_tasks == 3 and r.makespan == 10.0
    assert [e - s for s, e in zip(r.task_start, r.task_end)] == [5.0] * 3
    # a task that fits is untouched, and a batch mate of a timed-out task is re-run uncharged
    r = simulate(work, [1.0, 9.0, 1.0, 1.0], hosts=1, duration=work, timeout=5, chunksize=2)
    assert list(r.task_state) == [1 if x == 9.0 else 0 for x in [1.0, 9.0, 1.0, 1.0]]
    assert r.task_attempts == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="timeout"):
        simulate(work, [1.0], duration=work, timeout=0)


def test_a_timeout_on_the_backend_fails_the_task_with_task_timeout():
    from pymw_magic.errors import TaskTimeout
    one_call = simulate(work, [1.0, 100.0, 2.0, 100.0], hosts=2, duration=work, timeout=5)
    with Master("simulator", workers=2, duration=work, timeout=5) as m:
        job = m.map_async(work, [1.0, 100.0, 2.0, 100.0])
        results = job.result(timeout=30, return_exceptions=True)
        assert results[0] == 1.0 and results[2] == 2.0
        assert all(isinstance(results[i], TaskTimeout) and "timeout of 5" in str(results[i]) for i in (1, 3))
        r = job.report()
        assert r.to_csv() == one_call.to_csv() and r.makespan == one_call.makespan
        assert r.failures == 2 and r.failed_tasks == 2
        # a job's own timeout wins over the master's, both ways
        assert m.map_async(work, [100.0], timeout=200).result(timeout=30) == [100.0]
        assert isinstance(m.submit(work, 100.0).exception(timeout=30), TaskTimeout)
    with Master("simulator", workers=1, duration=work) as m:
        job = m.map_async(work, [1.0, 100.0, 1.0], timeout=5)
        results = job.result(timeout=30, return_exceptions=True)
        assert results[0] == results[2] == 1.0 and isinstance(results[1], TaskTimeout)
        # stopped at its deadline in virtual time; the host takes the next task then
        assert (job.tasks[1].started, job.tasks[1].finished) == (1.0, 6.0)
        assert (job.tasks[2].started, job.tasks[2].finished) == (6.0, 7.0)


@pytest.mark.timeout(60)
def test_no_progress_is_found_through_retried_failures_too():
    # failures drawn before the outage are retried for ever: not progress
    r = simulate(lambda n: 4000.0, range(3), hosts=2, availability="periodic:3600,600", failure_rate=0.3,
                 retries=math.inf, seed=1)
    assert r.done == 0 and r.failed_tasks == 3 and "no task can finish" in r.note and r.failures > 0
