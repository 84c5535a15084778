"""The batch family's shared parts: automatic chunking, the master hook."""

from __future__ import annotations

import warnings

import pytest

from pymw_magic import Master
from pymw_magic.backends.batch import MAX_PROCS, chunk_size
from pymw_magic.master import _new_master_callbacks, on_new_master


def test_explicit_chunksize_wins():
    assert chunk_size(10_000, chunksize=7, mean=0.001, delay=10) == 7


def test_unknown_durations_one_task_per_proc_up_to_max_procs():
    assert chunk_size(500, chunksize=None, mean=None, delay=10) == 1
    assert chunk_size(10_000, chunksize=None, mean=None, delay=10) == 10_000 // MAX_PROCS
    assert chunk_size(0, chunksize=None, mean=None, delay=10) == 1


def test_the_scheduling_delay_is_weighed():
    # 0.1 s tasks: a proc should run at least 4 x (10 s delay + 1 s start-up) = 44 s
    assert chunk_size(10_000, chunksize=None, mean=0.1, delay=10) == 440
    # a fast engine (a stand-in that starts procs at once) packs less
    assert chunk_size(10_000, chunksize=None, mean=0.1, delay=0.0) == 40
    # long tasks: one per proc
    assert chunk_size(100, chunksize=None, mean=3600, delay=10) == 1
    # never more tasks than there are
    assert chunk_size(5, chunksize=None, mean=0.001, delay=10) == 5


@pytest.fixture
def clean_callbacks():
    saved = list(_new_master_callbacks)
    yield
    _new_master_callbacks[:] = saved


def test_on_new_master_calls_back_and_never_breaks_the_master(clean_callbacks):
    seen = []
    on_new_master(seen.append)
    on_new_master(seen.append)  # once only

    def broken(master):
        raise RuntimeError("observer bug")
    on_new_master(broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Master("local", workers=1) as m:
            assert m.submit(abs, -3).result(timeout=60) == 3
    assert seen == [m]
    assert any("observer bug" in str(w.message) for w in caught)
