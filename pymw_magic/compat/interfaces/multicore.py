"""PyMW's ``MulticoreInterface``: like the generic one, worker processes on
this machine, run by pymw-magic's ``local`` backend."""

from __future__ import annotations

import sys

from ..backing import BackendInterface

__all__ = ["MulticoreInterface"]


class MulticoreInterface(BackendInterface):
    """``MulticoreInterface(num_workers=1, python_loc=sys.executable)``."""

    backend = "local"
    pymw_name = "MulticoreInterface"

    def __init__(self, num_workers: int = 1, python_loc: str = sys.executable):
        super().__init__(num_workers, python=None if python_loc == sys.executable else python_loc)
        self._python_loc = python_loc
