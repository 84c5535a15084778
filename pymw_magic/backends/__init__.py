"""The registry of backends: a backend is one module in this package that
defines a :class:`~pymw_magic.backends.base.Backend` subclass, listed here by
name and imported only when chosen (so an optional engine's import cost, or
its absence, touches nobody who does not use it)."""

from __future__ import annotations

import importlib

from .base import Backend, Option, master_options

#: name -> "module:Class"; later backends add a line here.
_REGISTRY: dict[str, str] = {
    "local": "pymw_magic.backends.local:LocalBackend",
    "mpi": "pymw_magic.backends.mpi:MPIBackend",
    # the grid simulator (a pool backend on a virtual clock)
    "simulator": "pymw_magic.backends.simulator:SimulatorBackend",
    # HTCondor (a batch backend; htcondor2 from the extra "condor")
    "condor": "pymw_magic.backends.condor:CondorBackend",
    # BOINC (a batch backend on a project of this machine; no extra needed)
    "boinc": "pymw_magic.backends.boinc:BoincBackend",
}


def backend_names() -> list[str]:
    return list(_REGISTRY)


def register_backend(name: str, target: str) -> None:
    """Register a third-party backend as ``"package.module:Class"``."""
    _REGISTRY[name] = target


def get_backend(name: str) -> type[Backend]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(backend_names())}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Backend", "Option", "backend_names", "get_backend", "master_options", "register_backend"]
