"""The scheduler's rules as pure functions (``pymw_magic.rules``): the
window, the refill mark, the batch size and the fate of a lost batch's
tasks — each against the rule as the Scheduler and Job apply it, and the
simulator reading them from there.
"""

from __future__ import annotations

import itertools

import pytest

from pymw_magic import rules, simulate
from pymw_magic.payload import FunctionPayload
from pymw_magic.policies import Chunking


def payload(mean: float | None) -> FunctionPayload:
    """A function whose mean call length is ``mean`` (None: unknown yet)."""
    fp = FunctionPayload(0, "f", b"")
    if mean is not None:
        fp.observe(mean, 1)
        fp.mean = mean
    return fp


# --- the window and the refill mark ----------------------------------------------------------

@pytest.mark.parametrize("workers, batch, expected", [(1, 1, 64), (16, 1, 64), (17, 1, 68), (4, 8, 128),
                                                      (1000, 1, 4000), (3, 100, 1200)])
def test_window_is_four_batches_per_worker_and_at_least_64(workers, batch, expected):
    assert rules.window(workers, batch) == expected


def test_a_jobs_window_uses_the_batch_chunking_gives_one_worker_with_unlimited_work():
    chunking = Chunking()
    # unknown or long calls: batches of one
    assert rules.job_window(chunking, payload(None), None, 100) == 400
    assert rules.job_window(chunking, payload(1.0), None, 100) == 400
    # a fixed chunksize wins
    assert rules.job_window(chunking, payload(None), 8, 10) == 320
    # 1 ms calls: 0.02 s target / 1 ms = 20 per batch, capped only by the cap
    assert rules.job_window(chunking, payload(0.001), None, 10) == 4 * 10 * 20
    # tiny calls: the cap (4096)
    assert rules.job_window(chunking, payload(1e-9), None, 1) == 4 * 4096
    for mean, chunksize, workers in itertools.product([None, 1.0, 0.01, 0.001, 1e-6], [None, 1, 5], [1, 7, 64]):
        n = chunking.size(payload(mean), chunksize, 1 << 30, 1)
        assert rules.job_window(chunking, payload(mean), chunksize, workers) == max(64, 4 * workers * n)


def test_refill_below_two_per_worker_and_the_window_keeps_up_with_batches_of_one():
    assert [rules.refill_below(w) for w in (1, 2, 50)] == [2, 4, 100]
    # what the simulator's fast path relies on (see engine._window_keeps_up's docstring)
    for w in list(range(1, 200)) + [10_000, 123_457]:
        assert rules.window(w, 1) >= rules.refill_below(w) + w


# --- the batch size ----------------------------------------------------------------------------

def test_batch_size_is_the_chunking_rule_and_a_suspect_goes_alone():
    chunking = Chunking()
    fast = payload(0.001)
    assert rules.batch_size(chunking, fast, None, 1000, 4, isolate=False) == 20
    assert rules.batch_size(chunking, fast, None, 1000, 4, isolate=True) == 1
    assert rules.batch_size(chunking, fast, None, 10, 4, isolate=False) == 3      # fair share: ceil(10 / 4)
    assert rules.batch_size(chunking, payload(None), None, 1000, 4, isolate=False) == 1
    assert rules.batch_size(chunking, payload(None), 7, 2, 4, isolate=False) == 7  # fixed wins
    assert rules.batch_size(chunking, payload(None), 7, 2, 4, isolate=True) == 1
    for mean, queued, workers in itertools.product([None, 0.5, 0.01, 0.004, 1e-5], [1, 3, 50, 10_000], [1, 4]):
        fp = payload(mean)
        assert rules.batch_size(chunking, fp, None, queued, workers, False) == chunking.size(fp, None, queued,
                                                                                            workers)


def test_above_the_single_task_threshold_chunking_always_gives_one():
    chunking = Chunking()
    edge = rules.single_task_above(chunking)
    assert edge == chunking.target / 2
    for mean in (edge * 1.0001, edge * 2, 1.0, 100.0):
        assert all(chunking.size(payload(mean), None, q, w) == 1 for q in (1, 10, 1 << 30) for w in (1, 8))
    assert chunking.size(payload(edge), None, 1 << 30, 1) > 1      # at the threshold it may batch


# --- a lost batch ------------------------------------------------------------------------------

def fate(**kw):
    base = dict(culprit=False, reason="died", attempts=1, retries=1, requeues=0, culprit_known=True,
                several=True)
    base.update(kw)
    return rules.lost_task(**base)


def test_the_culprit_of_a_death_is_retried_alone_while_it_has_retries_then_fails():
    assert fate(culprit=True, attempts=1, retries=1) == (rules.RETRY, True)
    assert fate(culprit=True, attempts=2, retries=1) == (rules.FAIL, False)
    assert fate(culprit=True, attempts=1, retries=0) == (rules.FAIL, False)
    assert fate(culprit=True, attempts=50, retries=float("inf")) == (rules.RETRY, True)


def test_a_timed_out_culprit_fails_whatever_its_retries():
    assert fate(culprit=True, reason="timeout", attempts=1, retries=5) == (rules.TIMED_OUT, False)
    # its batch mates are requeued, not isolated (a timeout is not a death)
    assert fate(reason="timeout", culprit_known=True) == (rules.REQUEUE, False)


def test_a_stopped_worker_charges_nobody():
    assert fate(culprit=True, reason="stopped") == (rules.REQUEUE, False)
    assert fate(reason="stopped", culprit_known=False, requeues=100) == (rules.REQUEUE, False)


def test_the_others_are_requeued_isolated_only_when_the_culprit_of_a_death_is_unknown():
    assert fate(culprit_known=True) == (rules.REQUEUE, False)
    assert fate(culprit_known=False, several=True) == (rules.REQUEUE, True)
    assert fate(culprit_known=False, several=False) == (rules.REQUEUE, False)


def test_a_task_in_hand_at_too_many_deaths_is_presumed_the_cause():
    assert fate(requeues=rules.MAX_REQUEUES - 1) == (rules.REQUEUE, False)
    assert fate(requeues=rules.MAX_REQUEUES) == (rules.PRESUMED, False)
    assert fate(requeues=rules.MAX_REQUEUES, reason="timeout") == (rules.REQUEUE, False)


def test_the_decision_table_is_complete_and_pure():
    seen = set()
    for culprit, reason, attempts, retries, requeues, known, several in itertools.product(
            [False, True], ["died", "timeout", "stopped"], [1, 2, 3], [0, 1, 2], [0, 6, 7], [False, True],
            [False, True]):
        args = dict(culprit=culprit, reason=reason, attempts=attempts, retries=retries, requeues=requeues,
                    culprit_known=known, several=several)
        got = rules.lost_task(**args)
        assert got == rules.lost_task(**args)          # no state
        action, isolate = got
        seen.add(action)
        if action != rules.REQUEUE:
            assert not isolate or action == rules.RETRY
        if reason == "stopped":
            assert action == rules.REQUEUE and not isolate
    assert seen == {rules.RETRY, rules.FAIL, rules.TIMED_OUT, rules.PRESUMED, rules.REQUEUE}


# --- the simulator reads them from there -------------------------------------------------------

def test_the_simulator_reads_the_rules_from_the_rules_module(monkeypatch):
    calls = {"job_window": 0, "refill_below": 0, "lost_task": 0, "batch_size": 0}

    def counted(name):
        real = getattr(rules, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(rules, name, wrapper)
    for name in calls:
        counted(name)
    # tiny tasks (batched) with failures: every rule is used
    r = simulate(None, range(3000), hosts=4, duration=0.001, failure_rate=0.05, retries=5, seed=1)
    assert r.done == 3000 and r.failures > 0
    assert all(n > 0 for n in calls.values()), calls
    # the window read from there bounds how far the input is read ahead, on
    # the fast path and on the general loop
    for policy in ("fifo", "random"):
        for size in (64, 5):
            monkeypatch.setattr(rules, "window", lambda workers, batch, size=size: size)
            fed, ahead = [], []

            def items():
                for i in range(400):
                    fed.append(i)
                    yield i

            def duration(i):
                ahead.append(len(fed) - len(ahead))   # read, beyond those finished (one host)
                return 1.0
            r = simulate(None, items(), hosts=1, duration=duration, policy=policy)
            assert r.done == 400 and max(ahead) == size, (policy, size)
