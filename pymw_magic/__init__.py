"""pymw-magic: a Jupyter notebook as the master of a master–worker computation.

``from pymw_magic import Master`` and run functions on local processes, MPI
ranks or a grid simulator (HTCondor and BOINC as they arrive); ``%load_ext
pymw_magic`` for the ``%%pymw`` cell magic.  The package imports light: no
IPython or widget module is loaded until a notebook feature is used.

This module is the facade, above every layer (docs/architecture.md)::

    errors task payload transport cellfunc version environment   data and the wire
    policies rules events job scheduler worker                   the core
    master backends/ simulation/                                 the engine
    options session progress store                               what front ends share
    widgets/                                                     ipywidgets
    magics awaiting export script cli compat/                    front ends

It may import any of them, and it hands lower modules what they show
through upper ones: a Job's widget and its report are registered here on
the job module, which names no upper module.
"""

from __future__ import annotations

from typing import Any

from . import job as _job_module
from . import store as _store  # records every master's jobs in the job store (the master's hook)
from . import reattach as _reattach  # noqa: F401  (wires the batch family to the store, and Job.remove)
from .errors import (PayloadError, PolicyFailed, PymwError, RemoteTraceback, ShutDownError, SignatureError, TaskFailed,
                     TaskTimeout, WorkerLost)
from .job import Job
from .master import Master
from .task import Task, TaskState

from .version import __version__

__all__ = [
    "Master", "Job", "Task", "TaskState",
    "PymwError", "TaskFailed", "WorkerLost", "PayloadError", "TaskTimeout", "SignatureError", "ShutDownError", "PolicyFailed",
    "RemoteTraceback", "__version__", "dashboard", "sweep", "simulate", "tune", "jobs", "attach", "remove",
    "JobHeld",
]


def jobs(all: bool = True, limit: int | None = None) -> _store.JobList:
    """Every job in the job store — of this and every other kernel and
    script — newest first, with its counts by state; shown as a table.
    A pool job whose kernel or process died is ``lost``, naming it.
    ``all=False``: the running ones only."""
    return _store.jobs(all=all, limit=limit)


def attach(name_or_id: str, **backend_options: Any) -> Job:
    """A live :class:`Job` for a stored batch job (by name or id): results
    that finished meanwhile are read back, running tasks followed again;
    ``backend_options`` override the stored ones (another ``schedd=``)."""
    from .session import attach_stored
    return attach_stored(name_or_id, **backend_options)


def remove(name_or_id: str, cancel: bool = False) -> None:
    """Forget a stored job (a batch job's directory is deleted too); a
    running one is refused unless ``cancel=True``, which cancels it first."""
    from .session import remove_stored
    remove_stored(name_or_id, cancel=cancel)


def __getattr__(name: str) -> Any:
    # The simulator's one-call form and the tuning widget, imported on first
    # use so ``import pymw_magic`` stays light.
    if name == "simulate":
        from .simulation import simulate
        return simulate
    if name == "tune":
        from .widgets.tuning import tune
        return tune
    if name == "JobHeld":  # a held HTCondor proc's error (importing it needs no htcondor2)
        from .backends.condor import JobHeld
        return JobHeld
    raise AttributeError(f"module 'pymw_magic' has no attribute {name!r}")


# The widgets, imported (with ipywidgets) only when called.
def dashboard() -> Any:
    """The live dashboard of this kernel's masters and jobs (a widget)."""
    from .widgets.dashboard import dashboard as make
    return make()


def sweep(fn: Any, over: Any, **kwargs: Any) -> Any:
    """A live parameter sweep (a widget): ``fn(item, **params)`` over ``over``
    for each setting of the controls; see :class:`pymw_magic.widgets.sweep.Sweep`."""
    from .widgets.sweep import sweep as make
    return make(fn, over, **kwargs)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext pymw_magic``."""
    from . import export as _export  # noqa: F401  (registers %pymw export)
    from . import magics
    from .simulation import magic as _tune  # noqa: F401  (registers %pymw tune)
    magics.load_ipython_extension(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from . import magics
    magics.unload_ipython_extension(ipython)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """Jupyter server's entry point (``jupyter server extension list``
    shows ``pymw_magic``): the REST API of :mod:`pymw_magic.server`."""
    return [{"module": "pymw_magic.server"}]


# --- what the job module shows through upper layers -----------------------------------------

def _job_view(job: Any, include: Any = None, exclude: Any = None) -> Any:
    """A Job's notebook form: the live job widget (ipywidgets imported now)."""
    from .widgets.jobview import job_mimebundle
    return job_mimebundle(job, include, exclude)


def _job_report(job: Any) -> Any:
    """A Job's report, built by the simulation package."""
    from .simulation.report import job_report
    return job_report(job)


# The job module names no upper module: the facade hands it the widget
# view and the report (both import their modules only when used).
_job_module.set_viewer(_job_view)
_job_module.set_reporter(_job_report)
