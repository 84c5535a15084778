"""Calibrating the simulator's per-dispatch master ``overhead`` from a real run.

The simulator charges each dispatch ``overhead`` seconds of the master's
time, one dispatch after another (the master is one process).  On a real
local backend that cost is what bounds tiny tasks: with tasks that do
nothing, sent one per batch, the master's dispatch rate *is* the
throughput.  :func:`calibrate_overhead` measures it; pass the result as
``overhead=`` to ``simulate`` or ``Master("simulator", ...)``.
"""

from __future__ import annotations

import time
from typing import Any


def _noop(x: Any) -> Any:
    return x


def calibrate_overhead(workers: int = 2, tasks: int = 400, backend: str = "local", **options: Any) -> float:
    """Seconds of master time per dispatch on ``backend``: ``tasks`` no-op
    tasks in batches of one, after a warm-up, elapsed time / tasks."""
    from ..master import Master

    if tasks < 1:
        raise ValueError("tasks must be >= 1")
    with Master(backend, workers=workers, **options) as master:
        master.map_async(_noop, range(2 * workers), chunksize=1).result()   # workers up and warm
        t0 = time.perf_counter()
        master.map_async(_noop, range(tasks), chunksize=1).result()
        elapsed = time.perf_counter() - t0
    return elapsed / tasks
