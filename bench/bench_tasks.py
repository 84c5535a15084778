"""The task functions every system runs in the benchmarks.

They live in an importable module (not ``__main__``) so that every peer can
run them: ProcessPoolExecutor, multiprocessing.Pool, loky, Dask and
ipyparallel pickle functions by reference and their workers import this
module.  ``bench/run.py`` puts ``bench/`` on ``PYTHONPATH`` for every worker
it starts.  pymw-magic gets the very same functions (it pickles importable
functions by reference too), so all systems do the same work.
"""

from __future__ import annotations

import time


def square(x):
    """The tiny task: ``x*x``."""
    return x * x


def spin_1ms(x):
    """A 1 ms task: busy-waits (burns CPU, does not sleep) for 1 ms."""
    end = time.perf_counter() + 0.001
    while time.perf_counter() < end:
        pass
    return x


def echo(x):
    """Returns its argument: the round trip of a large argument."""
    return x
