"""PyMW's ``pymw.interfaces``: the interfaces, where PyMW kept them
(``interfaces.generic.GenericInterface``, ``interfaces.mpi.MPIInterface``,
``interfaces.grid_simulator.GridSimulatorInterface``, ...), and the command
line every PyMW program shares: :func:`parse_options` and
:func:`get_interface`.

PyMW's flags: ``-i/--interface`` (generic, multicore, mpi, condor, boinc,
ganga; default generic), ``-n/--num_workers`` (default 4),
``-g/--ganga_loc``, ``-p/--project_home``, ``-c/--app_path`` and
``-a/--app_args`` (BOINC).  An unknown interface, or a ``-n`` that is not
a whole number, is a usage error: a message on stderr naming what is
valid, and exit status 2 as optparse's own errors (PyMW printed a line and
exited with 0).
"""

from __future__ import annotations

import os
import sys
from optparse import OptionParser, Values
from typing import Any, NoReturn

from . import boinc, condor, ganga, generic, grid_simulator, mpi, multicore
from .boinc import BOINCInterface
from .condor import CondorInterface
from .ganga import GANGAInterface
from .generic import GenericInterface
from .grid_simulator import GridSimulatorInterface, SimWorker
from .mpi import MPIInterface
from .multicore import MulticoreInterface

__all__ = ["generic", "boinc", "condor", "ganga", "mpi", "multicore", "grid_simulator",
           "GenericInterface", "MulticoreInterface", "MPIInterface", "CondorInterface", "BOINCInterface",
           "GANGAInterface", "GridSimulatorInterface", "SimWorker", "parse_options", "get_interface"]

INTERFACES = ("generic", "multicore", "mpi", "condor", "boinc", "ganga")


def parse_options(parser: OptionParser | None = None, args: list[str] | None = None) -> tuple[Values, list[str]]:
    """Add PyMW's standard options to ``parser`` (an ``optparse.OptionParser``,
    made if None) and parse ``args`` (default ``sys.argv[1:]``); returns
    ``(options, args)``."""
    if not parser:
        parser = OptionParser(usage="usage: %prog")
    if not args:
        args = sys.argv[1:]
    parser.add_option("-i", "--interface", dest="interface", default="generic",
                      help="specify the interface (generic/multicore/mpi/condor/boinc)", metavar="INTERFACE")
    parser.add_option("-n", "--num_workers", dest="n_workers", default="4", help="number of workers",
                      metavar="N")
    parser.add_option("-g", "--ganga_loc", dest="g_loc", default="~/Ganga/bin/ganga",
                      help="directory of GANGA executable (GANGA interface)", metavar="FILE")
    parser.add_option("-p", "--project_home", dest="p_home", default="",
                      help="directory of the project (BOINC interface)", metavar="DIR")
    parser.add_option("-c", "--app_path", dest="custom_app_dir", default="",
                      help="directory of a custom worker application (BOINC interface)", metavar="DIR")
    parser.add_option("-a", "--app_args", dest="custom_app_args", default="",
                      help="arguments for a custom worker application (BOINC interface)", metavar="DIR")
    return parser.parse_args(args)


def get_interface(options: Any) -> Any:
    """The interface the parsed options ask for (generic by default)."""
    name = getattr(options, "interface", "generic") or "generic"
    try:
        n_workers = int(getattr(options, "n_workers", 4))
    except (TypeError, ValueError):
        _usage_error(f"-n/--num_workers must be a whole number, not {options.n_workers!r}")
    if name == "generic":
        return GenericInterface(num_workers=n_workers)
    if name == "multicore":
        return MulticoreInterface(num_workers=n_workers)
    if name == "mpi":
        return MPIInterface(num_workers=n_workers)
    if name == "condor":
        return CondorInterface()
    if name == "ganga":
        return GANGAInterface(ganga_loc=options.g_loc)
    if name == "boinc":
        return BOINCInterface(project_home=options.p_home, custom_app_dir=options.custom_app_dir or None,
                              custom_args=[options.custom_app_args])
    _usage_error(f"Interface {name} unknown; valid interfaces: {', '.join(INTERFACES)}")


def _usage_error(message: str) -> NoReturn:
    print(f"{os.path.basename(sys.argv[0] or 'pymw')}: error: {message}", file=sys.stderr)
    sys.exit(2)
