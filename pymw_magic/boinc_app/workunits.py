#!/usr/bin/env python3
"""pymw-magic's work-unit lister (installed as the project's ``bin/pymw_wus``;
standard library plus the project's own ``py/Boinc``), so the master can
cancel a job's work units with few ``bin/cancel_jobs MIN_ID MAX_ID``
processes instead of one ``cancel_jobs --name`` per work unit::

    bin/pymw_wus BATCH      ->  one line per work unit of the batch not yet
                                assimilated: "ID NAME"

It reads the project's database as the assimilator does (BOINC's
``bin/boinc_path_config.py``, ``Boinc.database.connect()`` and the
connection's cursor; the object API of ``Boinc.database`` fails on
Python 3).  Exit 1 with a message when the database cannot be read: the
master then cancels by name.
"""

import os
import sys


def project_dir():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        sys.stderr.write("usage: pymw_wus BATCH\n")
        return 2
    try:
        sys.path.insert(0, os.path.join(project_dir(), "bin"))
        import boinc_path_config  # noqa: F401  (puts the project's py/ on the path)
        from Boinc import database, db_base
        database.connect()
    except Exception as exc:  # (no database access from here: the master cancels by name)
        sys.stderr.write("pymw_wus: cannot read the project's database: %s: %s\n" % (type(exc).__name__, exc))
        return 1
    try:
        cur = db_base.dbconnection.cursor()
        # (assimilate_state 2: done; such a work unit needs no cancelling)
        cur.execute("select id, name from workunit where batch=%s and assimilate_state<2 order by id",
                    (int(args[0]),))
        out = []
        for row in cur.fetchall():
            name = row["name"]
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            out.append("%d %s\n" % (int(row["id"]), name))
        sys.stdout.write("".join(out))
        return 0
    finally:
        try:
            database.close()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())
