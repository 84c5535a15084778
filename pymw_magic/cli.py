"""The ``pymw-magic`` command line, and the command-line form of the backend
options that every pymw command line shares.

::

    pymw-magic backends                     the backends installed and their options
    pymw-magic export NOTEBOOK.ipynb [-o SCRIPT.py] [--backend B] [options] [--skip-unsupported]
                                            the notebook as a plain Python batch script

:func:`add_backend_arguments` turns the declared options (the Master's and
each backend's, see :mod:`pymw_magic.backends`) into ``--backend B
--workers N --failure-rate P ...`` arguments; ``pymw-magic export``,
``%pymw export`` and the exported scripts themselves
(:mod:`pymw_magic.script`) parse with it, and the magics' validation then
checks each value against the chosen backend's declaration.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def describe_backends() -> str:
    """The backends installed, each with every option it takes."""
    from .backends import backend_names, get_backend, master_options

    common = master_options()
    lines = []
    for name in backend_names():
        cls = get_backend(name)
        lines.append(f"{name} ({cls.family})")
        for opt in list(common.values()) + list(cls.options.values()):
            lines.append(f"  --{opt.name.replace('_', '-'):<14} {opt.help} (default: {opt.default})")
    return "\n".join(lines)


_DEST = "pymw_option_"  # argparse dests of the declared options, apart from a parser's own


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--backend`` and one ``--NAME VALUE`` per declared option (the
    Master's, then each backend's).  Values stay text: the magics'
    :func:`~pymw_magic.magics.validate` converts them against the backend
    finally chosen, so a bad value is named with what is valid."""
    from .backends import backend_names, get_backend, master_options

    group = parser.add_argument_group(
        "backend and options", "the master's options, then each backend's (validated against --backend)")
    group.add_argument("--backend", choices=backend_names(), default=None,
                       help="the backend to run on (default: the notebook's %%pymw use)")
    owners: dict[str, list[str]] = {}
    helps: dict[str, str] = {}
    for opt in master_options().values():
        helps[opt.name] = opt.help
        owners[opt.name] = []
    for backend in backend_names():
        for opt in get_backend(backend).options.values():
            helps.setdefault(opt.name, opt.help)
            owners.setdefault(opt.name, []).append(backend)
    for name, help_text in helps.items():
        where = f" [{', '.join(owners[name])}]" if owners[name] else ""
        group.add_argument("--" + name.replace("_", "-"), dest=_DEST + name, metavar=name.upper(),
                           default=argparse.SUPPRESS, help=(help_text + where).replace("%", "%%"))


def backend_arguments(ns: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """The ``--backend`` given (or None) and the options given, as text."""
    options = {key[len(_DEST):]: value for key, value in vars(ns).items() if key.startswith(_DEST)}
    return getattr(ns, "backend", None), options


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="pymw-magic", description="pymw-magic command line")
    parser.add_argument("--version", action="version", version=f"pymw-magic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help="list the backends and their options")
    export_parser = sub.add_parser(
        "export", allow_abbrev=False, help="write a notebook as a plain Python batch script",
        description="Write NOTEBOOK as a plain Python script: each %%pymw cell becomes a function "
                    "and a map/run call, %pymw use becomes the master, plain cells are kept in "
                    "order. The script runs with `python SCRIPT.py [--backend B] [options]` or "
                    "`mpiexec -n N+1 python SCRIPT.py --backend mpi`.")
    from .export import add_export_arguments, run_export
    add_export_arguments(export_parser)
    ns = parser.parse_args(argv)
    if ns.command == "backends":
        print(describe_backends())
        return 0
    return run_export(ns, export_parser)


if __name__ == "__main__":
    sys.exit(main())
