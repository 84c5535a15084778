"""The ``pymw-magic`` command line (a front end: see docs/architecture.md).

::

    pymw-magic backends                     the backends installed and their options
    pymw-magic export NOTEBOOK.ipynb [-o SCRIPT.py] [--backend B] [options] [--skip-unsupported]
                                            the notebook as a plain Python batch script

:func:`~pymw_magic.options.add_backend_arguments` turns the declared
options (the Master's and each backend's, see :mod:`pymw_magic.backends`)
into ``--backend B --workers N --failure-rate P ...`` arguments;
``pymw-magic export``, ``%pymw export`` and the exported scripts themselves
(:mod:`pymw_magic.script`) parse with it, and
:func:`~pymw_magic.options.validate` then checks each value against the
chosen backend's declaration.
"""

from __future__ import annotations

import argparse
import re
import sys

from .backends import get_backend
from .export import add_export_arguments, run_export
from .options import add_backend_arguments, backend_arguments, backend_names, master_options
from .options import backend_options as declared_options
from .version import __version__

# add_backend_arguments and backend_arguments live in pymw_magic.options;
# imported here, they keep the names users imported from the cli.
__all__ = ["main", "describe_backends", "add_backend_arguments", "backend_arguments"]


def _with_default(help_text: str, default: object) -> str:
    """An option's help with its default said once: a help that already
    says it ("(default: the machine's cores)") is left as it is."""
    if re.search(r"\(default\b", help_text):
        return help_text
    return f"{help_text} (default: {default})"


def describe_backends() -> str:
    """The backends installed, each with every option it takes."""
    common = master_options()
    lines = []
    for name in backend_names():
        cls = get_backend(name)
        lines.append(f"{name} ({cls.family})")
        for opt in list(common.values()) + list(declared_options(name).values()):
            lines.append(f"  --{opt.name.replace('_', '-'):<14} {_with_default(opt.help, opt.default)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
    add_export_arguments(export_parser)
    ns = parser.parse_args(argv)
    if ns.command == "backends":
        print(describe_backends())
        return 0
    return run_export(ns, export_parser)


if __name__ == "__main__":
    sys.exit(main())
