"""PyMW's ``GANGAInterface``: pymw-magic has no GANGA backend, so
constructing it raises :class:`~pymw_magic.compat.errors.BackendMissing`
(it starts working if a ``ganga`` backend is registered)."""

from __future__ import annotations

from ..backing import BackendInterface

__all__ = ["GANGAInterface"]


class GANGAInterface(BackendInterface):
    """``GANGAInterface(ganga_loc="~/Ganga/bin/ganga")``."""

    backend = "ganga"
    pymw_name = "GANGAInterface"

    def __init__(self, ganga_loc: str = "~/Ganga/bin/ganga"):
        super().__init__(None, ganga=ganga_loc)
