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
    "RemoteTraceback", "__version__",
]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext pymw_magic``."""
    from . import magics
    magics.load_ipython_extension(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from . import magics
    magics.unload_ipython_extension(ipython)
