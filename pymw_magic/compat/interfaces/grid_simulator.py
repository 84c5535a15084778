"""PyMW's ``GridSimulatorInterface`` and ``SimWorker``, on pymw-magic's
``simulator`` backend.

PyMW's convention is kept: a task function is called with the *worker*
(a :class:`SimWorker`, with ``_name`` and ``_speed``) followed by the task's
``input_data``, and returns the task's length in instructions; the worker
runs it at ``_speed`` instructions per second while it is available.  The
virtual clock, the hosts and their availability are the simulator's
(:mod:`pymw_magic.simulation`); the ``scheduler_func`` given to
``PyMW_Master`` sees PyMW tasks and these SimWorkers.

Differences from PyMW, on purpose:

* availability fractions are on/off: an interval with a fraction > 0 is
  "up" at the worker's full speed, 0 is "down" (the simulator has no
  partial speed); after its last interval a worker never comes back
  (PyMW ran off the end of its array);
* ``get_result`` gives the task's length (what the function returned)
  rather than None, and the task's times are virtual seconds;
* the tasks submitted between two ``get_result`` (or ``get_status``,
  ``get_progress``) calls arrive together, at the virtual time the
  previous ones ended: that is when the simulator sees them;
* ``trace_files`` and ``read_workers_from_fta_tab_files`` read the Failure
  Trace Archive's ``event_trace.tab`` (or ``host,start,end`` CSV) with the
  simulator's own reader: one worker of speed 1 per node (PyMW's reader was
  unfinished).
"""

from __future__ import annotations

import array
import bisect
import itertools
import os
import tempfile
import threading
from typing import Any, Callable, Iterable

from ...simulation.models import Availability, load_trace
from ..backing import BackendInterface
from ..errors import InterfaceException

__all__ = ["SimWorker", "GridSimulatorInterface"]

#: live interfaces' worker lists by key: the task arguments carry the key, not the workers
_WORKERS: dict[int, list["SimWorker"]] = {}
_keys = itertools.count(1)


class SimWorker:
    """``SimWorker(worker_name, worker_speed, worker_avail_lens, worker_avail_fracs)``:
    a worker of ``worker_speed`` instructions per second, available during
    the intervals of ``worker_avail_lens`` seconds whose fraction is > 0."""

    def __init__(self, worker_name: str, worker_speed: float, worker_avail_lens: Iterable[float] = (),
                 worker_avail_fracs: Iterable[float] = ()):
        self._name = str(worker_name)
        self._speed = float(worker_speed)
        if not self._speed > 0:
            raise InterfaceException(f"SimWorker {worker_name}: speed must be > 0, not {worker_speed!r}")
        self._avail_lens = array.array("d", worker_avail_lens)
        self._avail_fracs = array.array("d", worker_avail_fracs)
        if len(self._avail_lens) != len(self._avail_fracs):
            raise InterfaceException(f"SimWorker {worker_name}: {len(self._avail_lens)} availability lengths "
                                     f"but {len(self._avail_fracs)} fractions")
        self._intervals: tuple[array.array, array.array] | None = None
        # PyMW's statistics, filled as this worker's tasks finish
        self._cur_time = 0.0
        self._task_wall_times: list[float] = []
        self._task_cpu_times: list[float] = []

    @classmethod
    def from_intervals(cls, name: str, speed: float, intervals: Iterable[tuple[float, float]]) -> "SimWorker":
        """A worker up during the given (start, end) intervals (seconds)."""
        lens, fracs, t = [], [], 0.0
        for s, e in sorted(intervals):
            if s > t:
                lens.append(s - t)
                fracs.append(0.0)
            if e > max(s, t):
                lens.append(e - max(s, t))
                fracs.append(1.0)
                t = e
        return cls(name, speed, lens, fracs)

    def up_intervals(self) -> tuple[array.array, array.array] | None:
        """(starts, ends) of the up intervals, consecutive ones merged; None: always up."""
        if not len(self._avail_lens):
            return None
        if self._intervals is None:
            starts, ends = array.array("d"), array.array("d")
            t = 0.0
            for length, frac in zip(self._avail_lens, self._avail_fracs):
                if frac > 0 and length > 0:
                    if len(ends) and ends[-1] == t:
                        ends[-1] = t + length
                    else:
                        starts.append(t)
                        ends.append(t + length)
                t += length
            self._intervals = (starts, ends)
        return self._intervals

    def __str__(self) -> str:
        return self._name

    __repr__ = __str__


class _UpIntervals(Availability):
    """A worker's up intervals as two arrays (compact for long traces)."""

    def __init__(self, starts: array.array, ends: array.array):
        self.starts, self.ends = starts, ends

    def window(self, t: float) -> tuple[float, float] | None:
        i = bisect.bisect_right(self.ends, t)
        if i >= len(self.ends):
            return None
        return (self.starts[i], self.ends[i])


def sim_call(fn: Callable, args: tuple, workers_key: int, task_key: int, host: Any = None) -> Any:
    """The simulator's task function: PyMW's ``fn(worker, *input_data)``,
    whose value is the task's length (``host`` is the simulator's host)."""
    workers = _WORKERS.get(workers_key, [])
    if host is None:   # only an estimate is asked for: a worker of speed 1
        worker: Any = SimWorker("estimate", 1.0)
    else:
        worker = workers[host.index]
    return fn(worker, *args)


class GridSimulatorInterface(BackendInterface):
    """``GridSimulatorInterface(trace_files=[])``; add workers with
    :meth:`add_worker`, :meth:`generate_workers` or
    :meth:`read_workers_from_fta_tab_files` before the first task."""

    backend = "simulator"
    pymw_name = "GridSimulatorInterface"
    #: PyMW_Master hands the simulator the tasks submitted since the last wait together
    batched = True

    def __init__(self, trace_files: Iterable[str] = ()):
        super().__init__(None)
        self._worker_list: list[SimWorker] = []
        self._lock = threading.Lock()
        self._started = False
        self._host_index: dict[str, int] = {}
        self._num_executed_tasks = 0
        self._key = next(_keys)
        _WORKERS[self._key] = self._worker_list
        for path in trace_files or ():
            self.read_workers_from_fta_tab_files(path)

    def __del__(self) -> None:
        _WORKERS.pop(getattr(self, "_key", None), None)

    # --- PyMW's worker set-up -------------------------------------------------------
    def add_worker(self, worker: SimWorker) -> None:
        if self._started:
            raise InterfaceException("GridSimulatorInterface: add workers before the first submit_task "
                                     "(the simulated platform is fixed when the simulation starts)")
        self._worker_list.append(worker)

    def generate_workers(self, num_workers: int, speed_func: Callable[[int], float],
                         avail_func: Callable[[int], tuple[list, list]]) -> None:
        for wnum in range(num_workers):
            lens, fracs = avail_func(wnum)
            self.add_worker(SimWorker("W" + str(wnum), speed_func(wnum), lens, fracs))

    def read_workers_from_fta_tab_files(self, event_trace_file: Any, num_workers: int | None = None) -> None:
        """Workers (speed 1) from an FTA ``event_trace.tab`` (an open file or a path)."""
        path, tmp = event_trace_file, None
        if not isinstance(path, (str, os.PathLike)):
            name = getattr(event_trace_file, "name", None)
            if isinstance(name, str) and os.path.exists(name):
                path = name
            else:
                fd, tmp = tempfile.mkstemp(suffix=".tab")
                with os.fdopen(fd, "w") as f:
                    f.write(event_trace_file.read())
                path = tmp
        try:
            traces = load_trace(os.fspath(path))
        finally:
            if tmp:
                os.unlink(tmp)
        for i, (node, intervals) in enumerate(traces.items()):
            if num_workers is not None and i >= num_workers:
                break
            self.add_worker(SimWorker.from_intervals(node, 1.0, intervals))

    # --- what PyMW_Master asks -------------------------------------------------------
    def master_args(self) -> tuple[str, int | None, dict[str, Any]]:
        workers = self._worker_list
        if not workers:
            raise InterfaceException("GridSimulatorInterface has no workers: call add_worker, generate_workers "
                                     "or read_workers_from_fta_tab_files before submitting tasks")
        self._started = True
        self._host_index = {f"host-{i}": i for i in range(len(workers))}
        return "simulator", len(workers), {"speeds": [w._speed for w in workers],
                                           "availability": self._availability()}

    def _availability(self) -> Any:
        """The simulator's ``availability`` (host names, when it gives them, in ``_host_index``)."""
        # workers generated alike share one pattern: convert it once
        patterns: dict[tuple[bytes, bytes], Any] = {}
        ups = []
        for w in self._worker_list:
            key = (w._avail_lens.tobytes(), w._avail_fracs.tobytes())
            if key not in patterns:
                patterns[key] = w.up_intervals()
            ups.append(patterns[key])
        if all(u is None for u in ups):
            return "always"
        first = ups[0]
        if first is not None and all(u is first for u in ups):
            return _UpIntervals(*first)   # one shared object: workers with the same trace
        names = _unique([w._name for w in self._worker_list])
        self._host_index = {name: i for i, name in enumerate(names)}
        return {name: (list(zip(u[0], u[1])) if u is not None else [(0.0, float("inf"))])
                for name, u in zip(names, ups)}

    def task_call(self, fn: Callable, args: tuple, task_key: int) -> tuple[Callable, tuple]:
        """The simulator job's function and this task's arguments."""
        return sim_call, (fn, args, self._key, task_key)

    def worker_view(self, worker: Any) -> Any:
        """The SimWorker a simulator host stands for (for a scheduler_func)."""
        index = getattr(worker, "index", None)
        return self._worker_list[index] if index is not None else worker

    def record(self, host: str | None, started: float, finished: float, cpu: Any) -> SimWorker | None:
        """A task ran on the simulator's host ``host`` from ``started`` to
        ``finished`` (virtual seconds): PyMW's per-worker statistics; returns
        the SimWorker."""
        with self._lock:
            self._num_executed_tasks += 1
            host_index = self._host_index.get(host) if host is not None else None
            if host_index is None or not 0 <= host_index < len(self._worker_list):
                return None
            w = self._worker_list[host_index]
            w._task_wall_times.append(finished - started)
            w._cur_time = max(w._cur_time, finished)
            try:
                w._task_cpu_times.append(float(cpu))
            except (TypeError, ValueError):
                pass
            return w

    def get_status(self, master: Any = None) -> dict[str, Any]:
        """PyMW's statistics: workers, tasks run, virtual time, and the total,
        mean, median and standard deviation of the tasks' wall and CPU times."""
        with self._lock:
            wall = [t for w in self._worker_list for t in w._task_wall_times]
            cpu = [t for w in self._worker_list for t in w._task_cpu_times]
            status: dict[str, Any] = {"num_total_workers": len(self._worker_list),
                                      "num_executed_tasks": self._num_executed_tasks,
                                      "cur_sim_time": max([w._cur_time for w in self._worker_list] + [0.0])}
        for label, values in (("wall", wall), ("cpu", cpu)):
            total, mean, median, stddev = _stats(values)
            status.update({f"total_{label}_time": total, f"mean_{label}_time": mean,
                           f"median_{label}_time": median, f"stddev_{label}_time": stddev})
        return status


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0, 0.0
    values = sorted(values)
    total = sum(values)
    mean = total / len(values)
    median = values[len(values) // 2]
    stddev = (sum((mean - v) ** 2 for v in values) / len(values)) ** 0.5
    return total, mean, median, stddev


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}#{k}")
    return out
