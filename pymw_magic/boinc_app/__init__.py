"""What pymw-magic installs into a BOINC project: the app version's
launcher, and the server-side scripts BOINC's ``script_validator`` and
``script_assimilator`` run.

::

    app version (apps/<app>/<M.mm>/<platform>/)       the project's bin/
    ────────────────────────────────────────────       ────────────────────────────────────
    pymw-launcher-<h>   (main program; logical name     pymw_validate   (validator.py: init/compare
                         "launcher")                                     outputs, safe codec, floats
    pymw-runtime-<h>.pyz (logical "pymw-runtime.pyz")                    within a stated tolerance)
    pymw-key-<h>        (logical "key": the PUBLIC      pymw_assimilate (assimilator.py: canonical
                         Ed25519 key the runtime                         output -> pymw_results/<batch>/,
                         verifies every input with)                      an event line per work unit)
                                                        pymw_wus        (workunits.py: a batch's open work
                                                                         units' ids, for cancel_jobs ranges)
                                                        pymw_runtime.pyz (the validator reads outputs with it)

On a volunteer host the client lays out a slot directory (every file
copied in under its logical name), and runs the launcher with the job's
command line (the interpreter to use); the launcher runs the shipped
runtime (:mod:`~pymw_magic.oneshot`: verify, then unpickle, run, encode)
and writes ``boinc_finish_called`` so the client counts the exit as
finished.  The scripts are these modules' own source files, copied; they
need only the standard library (the validator imports the shipped runtime
from the zipapp beside it).  Physical names carry a content hash: BOINC
files are immutable, a new content is a new name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: the app version's main program: a POSIX shell script (no Python needed
#: to start it, so a host without the interpreter fails with a clear stderr)
LAUNCHER = """\
#!/bin/sh
# pymw-magic's BOINC launcher: runs the shipped runtime on this work unit.
# $1: the interpreter (the job's python= option); the slot directory holds
# function.bin and in (the signed inputs), key and pymw-runtime.pyz (the app
# version's files), and receives out.
PY="${1:-python3}"
"$PY" pymw-runtime.pyz run in out --function function.bin --key key
rc=$?
if [ "$rc" -ne 0 ]; then
    echo "pymw launcher: '$PY pymw-runtime.pyz' exited with status $rc on $(hostname 2>/dev/null)" >&2
    exit "$rc"
fi
if [ ! -f out ]; then
    echo "pymw launcher: the runtime wrote no output" >&2
    exit 1
fi
# As a BOINC API app would on boinc_finish(0): without this file the
# client takes the exit for a premature one and runs the task again.
printf 0 > boinc_finish_called
exit 0
"""

HERE = Path(__file__).resolve().parent
#: name in the project's bin/ -> the module whose source is copied there
SCRIPTS = {"pymw_validate": HERE / "validator.py", "pymw_assimilate": HERE / "assimilator.py",
           "pymw_wus": HERE / "workunits.py"}
#: where the assimilator collects outputs, under the project directory
RESULTS_DIR = "pymw_results"


def digest(data: bytes, n: int = 12) -> str:
    """A short content hash for an immutable BOINC file name."""
    return hashlib.sha256(data).hexdigest()[:n]


def script_bytes(name: str) -> bytes:
    """The bytes installed as ``bin/<name>``."""
    return SCRIPTS[name].read_bytes()


__all__ = ["LAUNCHER", "SCRIPTS", "RESULTS_DIR", "digest", "script_bytes"]
