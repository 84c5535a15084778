"""Task functions for ``bench/mpi.py`` (importable, so MPIPoolExecutor's
workers can unpickle them by reference without cloudpickle)."""

from __future__ import annotations

import time

from bench_tasks import square, spin_1ms  # noqa: F401  (re-exported)


def spin_10ms(x):
    """A 10 ms task: busy-waits (burns CPU, does not sleep) for 10 ms."""
    end = time.perf_counter() + 0.010
    while time.perf_counter() < end:
        pass
    return x
