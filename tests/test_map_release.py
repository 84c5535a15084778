"""Master.map's iterator lets go of each result once it is handed out:
the caller alone decides how long a (large) result lives, as with
concurrent.futures executors (CPython checks the same with a weakref)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from pymw_magic import Master


class Big:
    """A large result that supports weak references."""

    def __init__(self, i: int):
        self.i = i
        self.data = bytearray(4 << 20)


def make_big(i: int) -> Big:
    return Big(i)


def _released(ref: weakref.ref, timeout: float = 10.0) -> bool:
    """Whether ``ref``'s object is gone within ``timeout``: a backend's
    thread may hold the batch it just completed for a moment, but the
    iterator, suspended in its ``yield``, would hold it for ever."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        if ref() is None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _assert_each_released(results, n: int) -> None:
    for expected in range(n):
        r = next(results)
        assert r.i == expected
        ref = weakref.ref(r)
        del r
        assert _released(ref), f"map's iterator still holds result {expected} it handed out"


@pytest.mark.parametrize("workers,chunksize", [(1, 1), (1, 5), (2, None)])
def test_map_releases_the_result_it_yielded(workers, chunksize):
    n = 20
    with Master("local", workers=workers) as m:
        results = m.map(make_big, range(n), chunksize=chunksize, timeout=120)
        _assert_each_released(results, n)
        assert next(results, "end") == "end"


def test_map_releases_the_result_it_yielded_on_the_simulator():
    n = 30
    with Master("simulator", workers=3, duration="measure") as m:
        results = m.map(make_big, range(n), chunksize=4, timeout=120)
        _assert_each_released(results, n)
        assert next(results, "end") == "end"
