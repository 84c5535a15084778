"""PyMW's ``GenericInterface``: worker processes on this machine, run by
pymw-magic's ``local`` backend (long-lived workers rather than PyMW's one
Python interpreter started per task)."""

from __future__ import annotations

import sys

from ..backing import BackendInterface

__all__ = ["GenericInterface"]


class GenericInterface(BackendInterface):
    """``GenericInterface(num_workers=1, python_loc=sys.executable)``."""

    backend = "local"
    pymw_name = "GenericInterface"

    def __init__(self, num_workers: int = 1, python_loc: str = sys.executable):
        super().__init__(num_workers, python=None if python_loc == sys.executable else python_loc)
        self._python_loc = python_loc
