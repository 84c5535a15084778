"""pymw-magic: a Jupyter notebook as the master of a master–worker computation.

``from pymw_magic import Master`` and run functions on local processes (and,
as they arrive, MPI, HTCondor, a grid simulator or BOINC); ``%load_ext
pymw_magic`` for the ``%%pymw`` cell magic.  The package imports light: no
IPython or widget module is loaded until a notebook feature is used.
"""

from __future__ import annotations

from typing import Any

from .errors import PayloadError, PymwError, RemoteTraceback, SignatureError, TaskFailed, TaskTimeout, WorkerLost
from .job import Job
from .master import Master
from .task import Task, TaskState

__version__ = "0.1.0"

__all__ = [
    "Master", "Job", "Task", "TaskState",
    "PymwError", "TaskFailed", "WorkerLost", "PayloadError", "TaskTimeout", "SignatureError",
    "RemoteTraceback", "__version__", "dashboard", "sweep", "simulate", "tune",
]


def __getattr__(name: str) -> Any:
    # issue 5: the simulator's one-call form and the tuning widget, imported
    # on first use so ``import pymw_magic`` stays light.
    if name == "simulate":
        from .simulation import simulate
        return simulate
    if name == "tune":
        from .widgets.tuning import tune
        return tune
    raise AttributeError(f"module 'pymw_magic' has no attribute {name!r}")


# issue 4: the widgets, imported (with ipywidgets) only when called.
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
    from . import magics
    from .simulation import magic as _tune  # noqa: F401  (issue 5: registers %pymw tune)
    magics.load_ipython_extension(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from . import magics
    magics.unload_ipython_extension(ipython)
