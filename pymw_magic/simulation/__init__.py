"""The grid simulator: PyMW's idea — try scheduling policies, worker counts and
chunk sizes on modelled hosts before deploying — on a virtual clock.

* ``models.py`` — hosts (speed, availability, network), durations, traces;
* ``engine.py`` — the one discrete-event engine and :func:`simulate`;
* ``report.py`` — :class:`Report` (makespan, utilisation, waiting, failures,
  Gantt, CSV) and :func:`compare`;
* ``calibrate.py`` — the per-dispatch master overhead, measured on a real
  local backend;
* ``magic.py`` — the ``%pymw tune`` subcommand;
* ``backends/simulator.py`` — the ``simulator`` backend, which runs the
  same engine behind ``Master("simulator", ...)``.
"""

from __future__ import annotations

from .engine import SimulationError, simulate
from .models import Host, ModelError, load_trace
from .report import Comparison, Report, compare, job_report

__all__ = ["simulate", "Report", "Comparison", "compare", "job_report", "ModelError", "SimulationError",
           "Host", "load_trace", "calibrate_overhead"]


def __getattr__(name: str):
    if name == "calibrate_overhead":
        from .calibrate import calibrate_overhead
        return calibrate_overhead
    raise AttributeError(name)
