"""The base of the PyMW interfaces that pymw-magic runs on one of its
backends (generic/multicore → ``local``, MPI → ``mpi``, the grid simulator
→ ``simulator``, Condor → ``condor``, BOINC → ``boinc``).

Such an interface is a description, not an engine: ``PyMW_Master`` asks it
for ``master_args()`` — the backend's name, the number of workers and the
backend's options — and builds one :class:`pymw_magic.Master` from them.
Options a backend does not declare are left out, so an interface keeps
working whatever optional settings a backend grows or lacks.  A backend
that is not registered (``pymw_magic.backends.backend_names()``, asked at
the time, so it works as soon as one lands) is a :class:`BackendMissing`
naming it.
"""

from __future__ import annotations

from typing import Any

from ..backends import backend_names, get_backend
from .errors import BackendMissing, InterfaceException


def require_backend(backend: str, interface: str) -> None:
    """Raise :class:`BackendMissing` unless ``backend`` is registered."""
    names = backend_names()
    if backend not in names:
        raise BackendMissing(
            f"PyMW's {interface} needs pymw-magic's {backend!r} backend, which this installation does not "
            f"have (backends available: {', '.join(names)}). Install or register it "
            f"(pymw_magic.backends.register_backend({backend!r}, 'package.module:Class')), "
            "or pick another interface (-i generic, -i mpi).")


class BackendInterface:
    """A PyMW interface that maps onto a pymw-magic backend."""

    #: the pymw-magic backend this interface runs on
    backend: str = "local"
    #: the PyMW class name, for messages
    pymw_name: str = "interface"

    def __init__(self, num_workers: int | None = 1, **options: Any):
        require_backend(self.backend, self.pymw_name)
        if num_workers is not None:
            num_workers = int(num_workers)
            if num_workers < 1:
                raise InterfaceException(f"{self.pymw_name}: num_workers must be >= 1, not {num_workers}")
        self._num_workers = num_workers
        self._options = options

    def master_args(self) -> tuple[str, int | None, dict[str, Any]]:
        """(backend, workers, backend options) for ``Master(backend, workers, **options)``:
        options the backend does not declare, and unset ones, are dropped."""
        require_backend(self.backend, self.pymw_name)
        declared = get_backend(self.backend).options
        options = {k: v for k, v in self._options.items() if k in declared and v not in (None, "", [], ())}
        return self.backend, self._num_workers, options

    # PyMW_Master accepts an interface only if it has a callable execute_task.
    def execute_task(self, task: Any, worker: Any) -> None:
        raise InterfaceException(f"{self.pymw_name} runs its tasks through pymw-magic's {self.backend!r} "
                                 "backend: give it to PyMW_Master rather than calling execute_task")

    def get_status(self, master: Any = None) -> dict[str, Any]:
        """PyMW's status dict: the number of workers (and, once tasks ran, the live ones)."""
        status: dict[str, Any] = {"num_total_workers": self._num_workers, "backend": self.backend}
        if master is not None:
            status["num_total_workers"] = master.workers
            status["num_active_workers"] = len(master.worker_info())
        return status

    def _cleanup(self) -> None:
        """PyMW called this at exit; the master owns the workers here."""
