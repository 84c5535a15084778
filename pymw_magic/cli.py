"""The ``pymw-magic`` command line: information about this installation now;
notebook export (``pymw-magic export``) arrives with the exporter."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import __version__
    from .backends import backend_names, get_backend, master_options

    parser = argparse.ArgumentParser(prog="pymw-magic", description="pymw-magic command line")
    parser.add_argument("--version", action="version", version=f"pymw-magic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help="list the backends and their options")
    ns = parser.parse_args(argv)
    if ns.command == "backends":
        common = master_options()
        for name in backend_names():
            cls = get_backend(name)
            print(f"{name} ({cls.family})")
            for opt in list(common.values()) + list(cls.options.values()):
                print(f"  --{opt.name:<10} {opt.help} (default: {opt.default})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
