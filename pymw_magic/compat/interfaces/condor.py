"""PyMW's ``CondorInterface``, on pymw-magic's HTCondor backend (``condor``).

Until that backend is registered, constructing the interface raises
:class:`~pymw_magic.compat.errors.BackendMissing` naming it.  Its options
map onto the backend's: ``python_loc`` → ``python``, ``condor_submit_loc`` →
``condor_submit`` (each passed only if the backend declares it).
"""

from __future__ import annotations

from ..backing import BackendInterface

__all__ = ["CondorInterface"]


class CondorInterface(BackendInterface):
    """``CondorInterface(python_loc="", condor_submit_loc="")``."""

    backend = "condor"
    pymw_name = "CondorInterface"

    def __init__(self, python_loc: str = "", condor_submit_loc: str = ""):
        super().__init__(None, python=python_loc, condor_submit=condor_submit_loc)
        self._python_loc = python_loc
        self._condor_submit_loc = condor_submit_loc
