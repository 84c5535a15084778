"""PyMW's ``MPIInterface``: ``num_workers`` MPI ranks, run by pymw-magic's
``mpi`` backend (which starts the MPI job itself, or uses the ranks of the
``mpiexec`` the program was started under)."""

from __future__ import annotations

import importlib.util

from ..backing import BackendInterface
from ..errors import BackendMissing

__all__ = ["MPIInterface"]


class MPIInterface(BackendInterface):
    """``MPIInterface(num_workers=1)``."""

    backend = "mpi"
    pymw_name = "MPIInterface"

    def __init__(self, num_workers: int = 1):
        if importlib.util.find_spec("mpi4py") is None:
            raise BackendMissing("PyMW's MPIInterface needs mpi4py: pip install 'pymw-magic[mpi]' "
                                 "(or pip install mpi4py with an MPI library), or use -i generic")
        super().__init__(num_workers)
