"""PyMW's ``BOINCInterface``, on pymw-magic's BOINC backend (``boinc``).

Until that backend is registered, constructing the interface raises
:class:`~pymw_magic.compat.errors.BackendMissing` naming it.  Its settings
map onto the backend's options (each passed only if the backend declares
it): ``project_home``, ``custom_app_dir``, ``custom_args``, ``task_path``,
and ``set_boinc_args``' ``target_nresults``, ``min_quorum``, ``max_nbytes``.
"""

from __future__ import annotations

from typing import Any

from ..backing import BackendInterface

__all__ = ["BOINCInterface"]


class BOINCInterface(BackendInterface):
    """``BOINCInterface(project_home, custom_app_dir=None, custom_args=[], task_path="tasks")``."""

    backend = "boinc"
    pymw_name = "BOINCInterface"

    def __init__(self, project_home: str, custom_app_dir: str | None = None, custom_args: Any = (),
                 task_path: str = "tasks"):
        args = [a for a in (custom_args or ()) if a]
        super().__init__(None, project_home=project_home, custom_app_dir=custom_app_dir,
                         custom_args=args, task_path=task_path)
        self._project_home = project_home
        self.set_boinc_args()

    def set_boinc_args(self, target_nresults: int = 2, min_quorum: int = 1, max_nbytes: int = 65536) -> None:
        """How many results BOINC asks for per work unit, how many must agree,
        and the largest output file, as PyMW's ``set_boinc_args``."""
        self._target_nresults, self._min_quorum, self._max_nbytes = target_nresults, min_quorum, max_nbytes
        self._options.update(target_nresults=target_nresults, min_quorum=min_quorum, max_nbytes=max_nbytes)
