"""Scheduling policies: the queue contract, building them from names,
classes and PyMW-style functions, and their behaviour on the *real* local
backend (the simulator's side is in test_simulator.py)."""

from __future__ import annotations

import pytest

from collections import deque

from pymw_magic import Master, simulate
from pymw_magic.policies import (FIFO, LIFO, FastestFirst, FunctionPolicy, LongestFirst, Policy, PolicyTaskError,
                                 Random, RoundRobin, ShortestFirst, make_policy, policy_names, policy_option,
                                 set_name_resolver)
from pymw_magic.task import CANCELLED, PENDING, Task

from conftest import wait_until


def tasks(n: int, sizes=None) -> list[Task]:
    sizes = sizes or list(range(n))
    return [Task(i + 1, None, i, None, (sizes[i],), {}, 0.0) for i in range(n)]


def drain(policy, worker="w", n=1) -> list[int]:
    out = []
    while True:
        got = policy.pop(worker, n)
        if not got:
            return out
        out += [t.index for t in got]


def test_fifo_lifo_random_order_and_lazy_skip_of_cancelled():
    ts = tasks(6)
    ts[2].state = CANCELLED
    fifo, lifo = FIFO(), LIFO()
    fifo.push(ts)
    lifo.push(ts)
    assert drain(fifo) == [0, 1, 3, 4, 5]
    assert drain(lifo) == [5, 4, 3, 1, 0]
    r1, r2 = Random(seed=7), Random(seed=7)
    r1.push(tasks(20))
    r2.push(tasks(20))
    first = drain(r1, n=3)
    assert sorted(first) == list(range(20)) and first == drain(r2, n=3) and first != list(range(20))


def test_push_front_puts_returning_tasks_first():
    ts = tasks(4)
    q = FIFO()
    q.push(ts[2:])
    q.push_front(ts[:2])
    assert drain(q, n=10) == [0, 1, 2, 3]


def test_longest_and_shortest_first_use_the_estimate():
    sizes = [3, 9, 1, 7, 5]
    lpt = LongestFirst(estimate=lambda x: x)
    spt = ShortestFirst(estimate=lambda x: x)
    lpt.push(tasks(5, sizes))
    spt.push(tasks(5, sizes))
    assert drain(lpt) == [1, 3, 4, 0, 2]
    assert drain(spt) == [2, 0, 4, 3, 1]


def test_length_ordering_without_an_estimate_is_a_clear_error():
    with pytest.raises(ValueError, match="longest-first.*estimate"):
        LongestFirst().push(tasks(2))
    p = LongestFirst()
    p.use_estimate(lambda task: task.args[0])   # what the simulator does
    p.push(tasks(3, [1, 5, 2]))
    assert drain(p) == [1, 2, 0]


def test_a_length_ordering_names_what_it_lacks_and_refuses_single_tasks():
    # missing_estimate(): the reason a master refuses the policy, or None
    p = LongestFirst()
    assert "longest-first" in p.missing_estimate() and "estimate" in p.missing_estimate()
    p.use_estimate(lambda task: 1.0)
    assert p.missing_estimate() is None
    p.attach(2)                       # a new master: the old backend's estimate is gone
    assert p.missing_estimate() is not None
    assert LongestFirst(estimate=len).missing_estimate() is None
    assert FIFO().missing_estimate() is None and make_policy("round-robin").missing_estimate() is None
    # a push that cannot order some tasks refuses those, by task, and queues nothing
    spt = ShortestFirst(estimate=lambda x: 1 / x)
    ts = tasks(4, [2, 0, 4, "x"])
    with pytest.raises(PolicyTaskError) as info:
        spt.push(ts)
    err = info.value
    assert [t.index for t, _ in err.failures] == [1, 3] and err.task is ts[1]
    assert "ZeroDivisionError" in str(err.failures[0][1]) and "task 1 (0)" in str(err.failures[0][1])
    assert "task 3" in str(err.failures[1][1])
    assert err.accepted == [ts[0], ts[2]] and len(spt) == 0
    spt.push(err.accepted)           # what a scheduler does next
    assert drain(spt) == [2, 0]
    nan = LongestFirst(estimate=lambda x: float("nan"))
    with pytest.raises(PolicyTaskError, match="not a number of seconds"):
        nan.push(tasks(1))


def test_a_raising_estimate_fails_that_task_alone_on_local_processes():
    items = list(range(1, 30))
    items[20] = 0
    with Master("local", workers=2, policy=LongestFirst(estimate=lambda x: 1 / x)) as m:
        results = m.map_async(ident, items, chunksize=1).result(timeout=60, return_exceptions=True)
    errors = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
    assert list(errors) == [20] and "ZeroDivisionError" in str(errors[20])
    assert [r for i, r in enumerate(results) if i != 20] == [x for i, x in enumerate(items) if i != 20]


def test_round_robin_is_static_and_survives_a_replaced_worker():
    rr = RoundRobin()
    rr.attach(2)
    rr.push(tasks(6))
    assert [t.index for t in rr.pop("a", 10)] == [0, 2, 4]
    assert rr.pop("a", 1) == []            # its share is done: it idles
    assert [t.index for t in rr.pop("b", 1)] == [1]
    # "b" is lost; its replacement "c" inherits the slot asked least recently
    rr.pop("a", 1)
    assert [t.index for t in rr.pop("c", 10)] == [3, 5]
    stealing = RoundRobin(steal=True)
    stealing.attach(2)
    stealing.push(tasks(4))
    assert len(stealing.pop("a", 10)) == 2 and len(stealing.pop("a", 10)) == 2


def test_attach_resets_round_robin_for_its_next_master():
    rr = RoundRobin()
    rr.attach(4)
    old = tasks(8)
    rr.push(old)
    assert drain(rr, "a") == [0, 4]
    for t in old:                     # the first master shut down: its tasks ended
        t.state = CANCELLED
    rr.attach(2)                      # a new master with 2 workers: 2 slots, no owners
    rr.push(tasks(4))
    assert drain(rr, "x", n=10) == [0, 2] and drain(rr, "y", n=10) == [1, 3]
    fixed = RoundRobin(workers=3)     # a count given by the user stays
    fixed.attach(5)
    fixed.push(tasks(6))
    assert drain(fixed, "a", n=10) == [0, 3]


def test_a_policy_object_serves_one_master_after_another():
    rr = RoundRobin()
    with Master("simulator", workers=4, duration=1.0, policy=rr) as m:
        assert m.map_async(ident, range(8)).result(timeout=30) == [1.0] * 8
    with Master("local", workers=2, policy=rr) as m:
        job = m.map_async(ident, range(8), chunksize=1)
        assert job.result(timeout=60) == list(range(8))
        assert len({t.worker for t in job.tasks}) == 2


def test_fastest_first_ranks_hosts_by_speed():
    class H:
        def __init__(self, speed):
            self.speed = speed
    hosts = [H(1), H(4), H(2)]
    ranked = sorted(hosts, key=FastestFirst().host_key)
    assert [h.speed for h in ranked] == [4, 2, 1]
    assert FIFO().host_key is None


class PlainFIFO:
    """A policy written against the four methods only, no Policy base."""

    name = "plain"

    def __init__(self):
        self.q = deque()

    def push(self, tasks):
        self.q.extend(tasks)

    def push_front(self, tasks):
        self.q.extendleft(reversed(list(tasks)))

    def pop(self, worker, n):
        out = []
        while self.q and len(out) < n:
            out.append(self.q.popleft())
        return out

    def __len__(self):
        return len(self.q)


def test_a_plain_duck_typed_policy_class_is_accepted():
    for spec in (PlainFIFO, PlainFIFO(), lambda: PlainFIFO()):
        p = make_policy(spec)
        assert isinstance(p, Policy) and p.name == "plain" and p.missing_estimate() is None
        p.attach(3)
        p.push(tasks(3))
        assert drain(p) == [0, 1, 2]
    mine = PlainFIFO()
    assert make_policy(mine).inner is mine           # the object itself is the one used
    assert simulate(None, range(5), hosts=2, duration=1.0, policy=mine).makespan == 3.0
    assert len(mine) == 0                            # simulate() worked on a copy
    with Master("local", workers=2, policy=PlainFIFO) as m:
        assert m.map_async(ident, range(10), chunksize=1).result(timeout=60) == list(range(10))
    with pytest.raises(TypeError, match="push, push_front, pop and __len__"):
        make_policy(lambda: object())


def test_a_pymw_function_reserves_a_task_for_the_free_worker_it_chose():
    def to_the_last_free(tasks, workers):
        return tasks[0], workers[-1]
    p = make_policy(to_the_last_free)
    assert p.wants_idle_workers
    p.push(tasks(4))
    p.idle_workers(["a", "b", "c"])               # what a scheduler tells before a's pop
    assert [t.index for t in p.pop("a", 1)] == [2]    # 0 to c, 1 to b, then a's own
    assert sorted(p.reserved_workers()) == ["b", "c"] and len(p) == 3
    p.idle_workers(["b", "c"])
    assert [t.index for t in p.pop("c", 1)] == [0]
    p.idle_workers(["a"])                         # b is no longer free: its task goes back
    assert p.reserved_workers() == [] and [t.index for t in p.pop("a", 5)] == [1, 3]

    def elsewhere(tasks, workers):
        return tasks[0], "nobody"
    q = make_policy(elsewhere)
    q.push(tasks(1))
    with pytest.raises(ValueError, match="returned worker 'nobody'.*not one of the free workers"):
        q.pop("w", 1)


def test_the_policy_option_takes_a_name_or_a_notebook_object():
    lpt = LongestFirst(estimate=lambda x: x)
    assert policy_option("round-robin") == "round-robin"
    set_name_resolver({"lpt": lpt, "mine": PlainFIFO})
    try:
        assert policy_option("lpt") is lpt and policy_option("mine") is PlainFIFO
        with pytest.raises(ValueError, match="unknown policy 'best'.*the name of a Policy"):
            policy_option("best")
    finally:
        set_name_resolver(None)
    with pytest.raises(ValueError, match="policy must be"):
        policy_option(42)


def test_make_policy_accepts_names_classes_factories_and_pymw_functions():
    assert policy_names()[:3] == ["fifo", "lifo", "random"]
    for name in policy_names():
        assert make_policy(name).name == name
    assert isinstance(make_policy(LongestFirst), LongestFirst)
    assert isinstance(make_policy(lambda: RoundRobin(steal=True)), RoundRobin)

    def last_task(tasks, workers):          # PyMW's scheduler_func shape
        return tasks[-1], workers[0]
    p = make_policy(last_task)
    assert isinstance(p, FunctionPolicy) and p.name == "last_task"
    p.push(tasks(3))
    assert drain(p) == [2, 1, 0]
    with pytest.raises(ValueError, match="unknown policy 'best'; valid policies: fifo, lifo, random"):
        make_policy("best")
    with pytest.raises(TypeError, match="policy must be"):
        make_policy(42)
    assert make_policy(FIFO) is not make_policy(FIFO)
    instance = FIFO()
    assert make_policy(instance) is instance      # an instance is used as is (not copied)

    def bad(tasks, workers):
        return "not a task"
    q = make_policy(bad)
    q.push(tasks(1))
    with pytest.raises(ValueError, match="not one of the pending tasks"):
        q.pop("w", 1)


# --- the same objects on the real local backend ------------------------------------------

def ident(x):
    return x


def test_longest_first_runs_longest_first_on_local_processes():
    sizes = [3, 9, 1, 7, 5, 2]
    with Master("local", workers=1, policy=LongestFirst(estimate=lambda x: x)) as m:
        job = m.map_async(ident, sizes, chunksize=1)
        assert job.result(timeout=60) == sizes           # results stay in input order
        order = [t.args[0] for t in sorted(job.tasks, key=lambda t: t.started)]
    assert order == sorted(sizes, reverse=True)


def test_pymw_scheduler_function_on_local_processes():
    def newest(tasks, workers):
        return tasks[-1], workers[0]
    with Master("local", workers=1, policy=newest) as m:
        job = m.map_async(ident, range(6), chunksize=1)
        assert job.result(timeout=60) == list(range(6))
        order = [t.args[0] for t in sorted(job.tasks, key=lambda t: t.started)]
    assert order == [5, 4, 3, 2, 1, 0]


def test_round_robin_deals_tasks_statically_to_local_workers():
    with Master("local", workers=2, policy="round-robin") as m:
        job = m.map_async(ident, range(10), chunksize=1)
        assert job.result(timeout=60) == list(range(10))
        evens = {t.worker for t in job.tasks if t.index % 2 == 0}
        odds = {t.worker for t in job.tasks if t.index % 2 == 1}
    assert len(evens) == 1 and len(odds) == 1 and evens != odds


@pytest.mark.parametrize("name", ["fastest-first", "shortest-first"])
def test_other_policies_run_every_task_on_local(name):
    policy = ShortestFirst(estimate=lambda x: -x) if name == "shortest-first" else name
    with Master("local", workers=2, policy=policy) as m:
        assert sorted(m.map(ident, range(50))) == list(range(50))


def test_pending_state_is_untouched_by_policies():
    ts = tasks(3)
    q = FIFO()
    q.push(ts)
    q.pop("w", 1)
    assert all(t.state is PENDING for t in ts)


# --- a policy that raises when asked for the next task ----------------------------------

def test_a_policy_raising_in_pop_fails_the_queue_clearly_and_replaces_no_worker():
    from pymw_magic import PolicyFailed

    def broken(tasks, workers):
        raise ValueError("policy broke")

    with Master("local", workers=2, policy=broken) as m:
        first = m.submit(ident, 1).exception(timeout=60)
        assert isinstance(first, PolicyFailed) and "policy broke" in str(first)
        assert isinstance(first.__cause__, ValueError)
        # (both workers connected first: under load the policy fails before
        # the second one is up, and it is not a replacement)
        wait_until(lambda: len(m.worker_info()) == 2, 60, "both workers to connect")
        pids = {w["pid"] for w in m.worker_info()}
        job = m.map_async(ident, range(5))
        results = job.result(timeout=60, return_exceptions=True)
        assert all(isinstance(r, PolicyFailed) for r in results)
        assert m.submit(ident, 2).exception(timeout=60).__class__ is PolicyFailed
        # a master-side error is not a worker's death: no worker was replaced
        assert {w["pid"] for w in m.worker_info()} <= pids


class PopRaises(FIFO):
    def pop(self, worker, n):
        if len(self):
            raise RuntimeError("my queue is corrupt")
        return []


def test_a_policy_class_raising_in_pop_fails_the_queue_clearly():
    from pymw_magic import PolicyFailed
    with Master("local", workers=1, policy=PopRaises()) as m:
        error = m.submit(ident, 1).exception(timeout=60)
    assert isinstance(error, PolicyFailed) and "my queue is corrupt" in str(error)
