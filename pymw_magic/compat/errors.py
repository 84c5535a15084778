"""PyMW's two exceptions, with PyMW's constructors and attributes.

``TaskException`` (a task or a ``get_result`` call went wrong) and
``InterfaceException`` (an interface cannot be used).  They are also
:class:`pymw_magic.PymwError`, so code written for pymw-magic catches them.
"""

from __future__ import annotations

from ..errors import PymwError


class TaskException(PymwError):
    """Represents an exception caused by a task failure (PyMW's)."""

    def __init__(self, value: object):
        super().__init__(value)
        self.param = value

    def __str__(self) -> str:
        return str(self.param)


class InterfaceException(PymwError):
    """Represents an exception caused by an interface failure (PyMW's)."""

    def __init__(self, value: object, detail_str: str | None = None):
        super().__init__(value)
        self.param = value
        self.details = detail_str or ""

    def __str__(self) -> str:
        return str(self.param) + (f"\n{self.details}" if self.details else "")


class BackendMissing(InterfaceException, RuntimeError):
    """A PyMW interface whose pymw-magic backend is not installed or not
    registered (yet): names the backend and those that exist."""
