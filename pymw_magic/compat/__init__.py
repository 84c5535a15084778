"""PyMW compatibility: PyMW 0.4 programs on pymw-magic, with only their
imports changed::

    from pymw import pymw             ->  from pymw_magic.compat import pymw
    from pymw import interfaces       ->  from pymw_magic.compat import interfaces
    from pymw import *                ->  from pymw_magic.compat import *

``pymw`` (:mod:`pymw_magic.compat.pymw`: ``PyMW_Master``, ``PyMW_Task``,
``PyMW_MapReduce``, ``TaskException``, ``InterfaceException``) and
``interfaces`` (:mod:`pymw_magic.compat.interfaces`) are the two modules;
see the first for what differs from PyMW on purpose.  This is a front end:
nothing in pymw-magic imports it, and a worker running a compat task
imports only :mod:`pymw_magic.compat.runtime` (this package loads its
submodules on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["pymw", "interfaces"]

_LAZY = {"PyMW_Master": "pymw", "PyMW_Task": "pymw", "PyMW_MapReduce": "pymw",
         "TaskException": "errors", "InterfaceException": "errors"}


def __getattr__(name: str) -> Any:
    if name in ("pymw", "interfaces"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
