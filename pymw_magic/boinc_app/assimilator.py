#!/usr/bin/env python3
"""pymw-magic's assimilator script, run by BOINC's ``script_assimilator``
(installed as the project's ``bin/pymw_assimilate``; standard library only)::

    script_assimilator --app pymw --script pymw_assimilate
        canonical result:  ../bin/pymw_assimilate WU_ID PATH...      (BOINC's default arguments)
        failed work unit:  ../bin/pymw_assimilate --error N WU_NAME WU_ID BATCH_ID

The work unit's name and batch are read from the output's file name
(``<wu>_<replica>_r<random>_<i>``; ``<wu>`` is ``pymw_<batch>_<chunk>_<attempt>``):
named tokens (``wu_name``, ``batch_id``) are never passed by server 1.6.2.

Data flow::

    upload/<fanout>/<result>_0 ──copy──▶ pymw_results/<batch>/<wu>.out   (temp file + rename)
                                         pymw_results/<batch>/events      (+ one JSON line per work unit)
    error_mask N ─────────────────────▶ events: {"wu", "ok": false, "error_mask", "reason", "stderr", "disagree"}

The output must leave ``upload/`` now: ``file_deleter`` removes it once
the work unit is assimilated.  The master follows ``events`` from an
offset (its job store keeps it).  For a failed work unit the app's stderr
is read from the project's database through BOINC's own Python library
(``bin/boinc_path_config.py`` and ``Boinc.database``) where it can be; the
validator's notes on replicas that disagreed are added.  It exits non-zero
only when the output could not be copied (the assimilator tries again).
"""

import json
import os
import re
import shutil
import sys
import time

#: BOINC's WU_ERROR_* bits (html/inc/common_defs.inc)
WU_ERRORS = {
    1: "a result could not be sent (no host could take it)",
    2: "too many error results (the app failed on the hosts, or no host answered before the deadline)",
    4: "too many success results without a quorum (the hosts' results disagree)",
    8: "too many total results",
    16: "cancelled",
    32: "no canonical result",
}
#: the most bytes of text kept per field of an event line
MAX_TEXT = 8192
RESULTS_DIR = "pymw_results"


def project_dir():
    # this script lives in the project's bin/ (the daemons' cwd is tmp_<host>/)
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def private_dir(path):
    """``path`` made (parents too) writable by its owner alone: BOINC's daemons
    run with umask 002 and the project's group holds the web server's user,
    who could otherwise plant event lines and outputs for the master."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent) and parent != path:
        private_dir(parent)
    try:
        os.mkdir(path, 0o750)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if st.st_mode & 0o022 and st.st_uid == os.geteuid():
        os.chmod(path, st.st_mode & ~0o022 & 0o7777)


def results_dir(batch):
    top = os.path.join(project_dir(), RESULTS_DIR)
    private_dir(top)  # (also one an older pymw-magic left group-writable)
    path = os.path.join(top, str(int(batch)))
    private_dir(path)
    return path


def append_event(directory, event):
    line = (json.dumps(event, separators=(",", ":"), sort_keys=True) + "\n").encode()
    fd = os.open(os.path.join(directory, "events"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    try:
        os.write(fd, line)  # (one write: lines of concurrent runs never interleave)
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_name(wu):
    if not wu or "/" in wu or wu.startswith("."):
        raise SystemExit("pymw_assimilate: bad work unit name %r" % wu)
    return wu


def wu_of(filename):
    """The work unit of an output file: ``<wu>_<replica>_r<random>_<i>``
    (older servers: ``<wu>_<replica>_<i>``)."""
    name = os.path.basename(filename)
    m = re.fullmatch(r"(.+)_\d+_r\d+_\d+", name) or re.fullmatch(r"(.+)_\d+_\d+", name)
    return m.group(1) if m else name


def batch_of(wu):
    """pymw_<batch>_<chunk>_<attempt> -> batch."""
    parts = wu.split("_")
    if len(parts) >= 4 and parts[1].isdigit():
        return int(parts[1])
    raise SystemExit("pymw_assimilate: %r is not a pymw-magic work unit (pymw_<batch>_<chunk>_<attempt>)" % wu)


def assimilate(wu, batch, files):
    wu = safe_name(wu)
    directory = results_dir(batch)
    target = os.path.join(directory, wu + ".out")
    if files:
        tmp = os.path.join(directory, ".%s.%d.tmp" % (wu, os.getpid()))
        try:
            os.unlink(tmp)  # (a leftover, or something planted: never written through)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "wb") as out, open(files[0], "rb") as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp, target)
        event = {"wu": wu, "ok": True, "file": wu + ".out", "time": time.time()}
    else:
        event = {"wu": wu, "ok": False, "error_mask": 0, "reason": "the canonical result has no output file",
                 "time": time.time()}
    append_event(directory, event)
    return 0


def disagreement(wu):
    """What the validator noted about this work unit's replicas."""
    directory = os.path.join(project_dir(), RESULTS_DIR, "disagree")
    notes = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return ""
    for name in names:
        if wu_of(name) == wu:
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    notes.append(f.read(MAX_TEXT).decode("utf-8", "replace"))
            except OSError:
                pass
    return "\n".join(notes)[:MAX_TEXT]


def client_stderr(wu):
    """The failed results' stderr from the project's database (BOINC's own
    Python library, configured by the project: ``Boinc.database.connect()``
    and its connection's dict cursor; the object API of ``Boinc.database``
    fails on Python 3), or "" where it cannot be read."""
    try:
        sys.path.insert(0, os.path.join(project_dir(), "bin"))
        import boinc_path_config  # noqa: F401  (puts the project's py/ on the path)
        from Boinc import database, db_base
        database.connect()
        try:
            cur = db_base.dbconnection.cursor()
            cur.execute("select r.name, r.outcome, r.exit_status, r.stderr_out from result r join workunit w "
                        "on r.workunitid=w.id where w.name=%s order by r.id", (wu,))
            texts = []
            for row in cur.fetchall():
                text = row["stderr_out"] or ""
                if isinstance(text, bytes):
                    text = text.decode("utf-8", "replace")
                name = row["name"]
                if isinstance(name, bytes):  # (a VARBINARY-like column comes back as bytes too)
                    name = name.decode("utf-8", "replace")
                if text.strip() and row["outcome"] != 1:  # (1: success)
                    texts.append("result %s (exit status %s):\n%s" % (name, row["exit_status"], text.strip()))
            return "\n".join(texts)[-MAX_TEXT:]
        finally:
            try:
                database.close()
            except Exception:
                pass
    except Exception:  # (no database access from here: the reason alone goes home)
        return ""


def failed(mask, wu, wu_id, batch):
    wu = safe_name(wu)
    directory = results_dir(batch)
    reasons = [text for bit, text in sorted(WU_ERRORS.items()) if mask & bit] or ["error mask %d" % mask]
    event = {"wu": wu, "ok": False, "error_mask": mask, "wu_id": wu_id, "reason": "; ".join(reasons),
             "stderr": client_stderr(wu), "disagree": disagreement(wu), "time": time.time()}
    append_event(directory, event)
    return 0


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--error"]:
        if len(args) != 5:
            sys.stderr.write("usage: pymw_assimilate --error N WU_NAME WU_ID BATCH_ID\n")
            return 2
        return failed(int(args[1]), args[2], int(args[3]), int(args[4]))
    if len(args) < 2 or not args[0].isdigit():
        sys.stderr.write("usage: pymw_assimilate WU_ID FILE...  |  pymw_assimilate --error N WU_NAME WU_ID BATCH_ID\n")
        return 2
    wu = wu_of(args[1])
    return assimilate(wu, batch_of(wu), args[1:])


if __name__ == "__main__":
    sys.exit(main())
