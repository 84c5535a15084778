"""``StandInProject``: a faithful stand-in of a BOINC project, without a server.

Data flow::

    StandInProject(root, hosts=N, faults={...}).create()
        -> root/ laid out as BOINC's make_project does: config.xml (daemons:
           feeder, transitioner, file_deleter), project.xml (the platform),
           bin/ (create_work, dir_hier_path, stage_file_native, stage_file, xadd,
           update_versions, cancel_jobs, start, stop, status: real executables
           with BOINC's command lines), templates/, apps/, download/ and upload/
           (hierarchies with config.xml's fanout), keys/, html/inc/, db/ (SQLite)
    bin/start -> the daemon (_boinc_daemon, a process of its own, found again
           through root's pid_<host>/) plays BOINC's daemons and N volunteer hosts

A backend uses it exactly as a real project: through ``bin/`` and the
files (``Master("boinc", project_home=root)``); nothing in the package's
backends knows it.  ``faults`` names hosts by index that misbehave:
``{"wrong": [0], "error": [1], "vanish": [2], "tamper": [3], "pickle": [4]}`` (see
:mod:`._boinc_daemon`).  What a test reads: :meth:`workunits`,
:meth:`results` (BOINC's columns: server_state, outcome, validate_state,
error_mask, stderr_out...).

Reproduced from BOINC's source (server 1.6): create_work's options and
``--stdin`` lines (template values win over the command line), the download
hierarchy's md5 fanout and ``.md5`` files, stage_file's refusal of a
same-named file with other contents, update_versions (``version.xml``,
signatures required: a ``.sig`` or ``keys/code_sign_private``, files staged),
the app_version_num pin, result names ``<wu>_<n>`` and output files
``<result>_r<random>_0``, the transitioner's error limits, replicas sent
to one host unless ``one_result_per_user_per_wu``, script_validator's and
script_assimilator's command lines and working directory (with server
1.6.2's broken named tokens: a script given tokens gets no argument; named
alone, BOINC's defaults), file_deleter honouring ``<no_delete/>``,
cancel_jobs (exactly its two forms: ``MIN_ID MAX_ID``, every work unit in
the range whoever's, atoi() of each, 0 a usage error; ``--name WU``), a
result the transitioner adds after disagreeing replicas staying unsent for
ever when every host already had one of its work unit (one result per user
per work unit: as run live with 2 hosts), ``<host>`` in config.xml, app version files staged at the top
of ``download/``, make_project's config.xml defaults, bin/start's locks (a
second daemon of one program name without its own ``<output>`` never
starts) and pid files (``pid_<host>/<pid_file>``).

Not reproduced: the database is SQLite (not MySQL), there is no web
server (uploads are copies), no credit, no feeder shared memory (hosts ask
every 50 ms, no back-off), one platform (x86_64-pc-linux-gnu), no code
signature checks on the host; BOINC's Python library (``py/Boinc``) has
only ``database.connect/close``, ``db_base.dbconnection.cursor()`` (SQL with
``%s``, rows as dicts, text as bytes) and ``Workunits``/``Results.find``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Union

from . import _boinc_db as db

__all__ = ["StandInProject"]

TOOLS = ("create_work", "dir_hier_path", "stage_file_native", "stage_file", "xadd", "update_versions",
         "cancel_jobs", "start", "stop", "status")
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])

_TOOL = """#!{python}
# stand-in of BOINC's bin/{name} (pymw_magic.testing.boinc)
import sys, types
sys.path.insert(0, {parent!r})
pkg = types.ModuleType("pymw_magic"); pkg.__path__ = [{package!r}]; sys.modules["pymw_magic"] = pkg
from pymw_magic.testing import _boinc_tools
sys.exit(_boinc_tools.main({name!r}, sys.argv[1:]))
"""

_CONFIG = """<?xml version="1.0" ?>
<boinc>
  <config>
    <host>{host}</host>
    <db_name>standin</db_name>
    <master_url>http://localhost/standin/</master_url>
    <long_name>pymw-magic stand-in project</long_name>
    <download_url>http://localhost/standin/download</download_url>
    <download_dir>{root}/download</download_dir>
    <upload_url>http://localhost/standin_cgi/file_upload_handler</upload_url>
    <upload_dir>{root}/upload</upload_dir>
    <uldl_dir_fanout>1024</uldl_dir_fanout>
    <key_dir>{root}/keys/</key_dir>
    <app_dir>{root}/apps</app_dir>
    <cache_md5_info>1</cache_md5_info>
    <one_result_per_user_per_wu>0</one_result_per_user_per_wu>
    <send_result_abort>1</send_result_abort>
    <min_sendwork_interval>6</min_sendwork_interval>
  </config>
  <daemons>
    <daemon>
      <cmd>feeder -d 3</cmd>
    </daemon>
    <daemon>
      <cmd>transitioner -d 3</cmd>
    </daemon>
    <daemon>
      <cmd>file_deleter -d 3</cmd>
    </daemon>
  </daemons>
  <tasks>
  </tasks>
</boinc>
"""

_PATH_CONFIG = """# This module prepends the project's py/ to the python system path (as BOINC's)
import sys, os
sys.path.insert(0, os.path.join({root!r}, 'py'))
"""

#: BOINC's Python database library (py/Boinc/database.py), cut down to what
#: scripts read: Workunits.find(...), Results.find(workunit=...)
_DATABASE = """# stand-in of BOINC's py/Boinc/database.py (SQLite; read only)
import os, sqlite3
_conn = None
_DB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "db", "boinc.sqlite")


class _Row(object):
    def __init__(self, row):
        self.__dict__.update(dict(row))


class _Table(object):
    def __init__(self, name):
        self.name = name

    def find(self, **kw):
        where, args = [], []
        for k, v in kw.items():
            if isinstance(v, _Row):
                k, v = k + "id", v.id
            where.append(k + "=?")
            args.append(v)
        q = "select * from " + self.name + (" where " + " and ".join(where) if where else "") + " order by id"
        return [_Row(r) for r in _conn.execute(q, args)]


def connect(config=None, nodb=False):
    global _conn
    from Boinc import db_base
    _conn = sqlite3.connect(_DB, timeout=60)
    _conn.row_factory = sqlite3.Row
    db_base.dbconnection = db_base._Connection(_conn)


def close():
    global _conn
    if _conn is not None:
        _conn.close()
        _conn = None


Workunits = _Table("workunit")
Results = _Table("result")
"""

#: py/Boinc/db_base.py: ``dbconnection``, a MySQLdb-like connection with a
#: dict cursor (``%s`` parameters; TEXT columns come back as bytes, as MySQLdb's)
_DB_BASE = """# stand-in of BOINC's py/Boinc/db_base.py (SQLite)
dbconnection = None


class _Cursor(object):
    def __init__(self, conn):
        self._conn, self._rows = conn, []

    def execute(self, query, args=()):
        rows = self._conn.execute(query.replace("%s", "?"), tuple(args)).fetchall()
        self._rows = [{k: (r[k].encode() if isinstance(r[k], str) else r[k]) for k in r.keys()} for r in rows]

    def fetchall(self):
        return list(self._rows)


class _Connection(object):
    def __init__(self, conn):
        self._conn = conn

    def cursor(self):
        return _Cursor(self._conn)
"""

_PROJECT = """<boinc>
  <platform>
    <name>x86_64-pc-linux-gnu</name>
    <user_friendly_name>Linux running on an AMD x86_64 or Intel EM64T CPU</user_friendly_name>
  </platform>
</boinc>
"""


class StandInProject:
    """A BOINC project of one's own in the directory ``root``.

    ``hosts``: volunteer hosts (threads of the daemon); ``faults``: which
    hosts misbehave; ``idle_timeout``: the daemon exits after this many
    seconds with no work unit left.  Given values update a project laid
    out before (the daemon reads them as it runs).
    """

    def __init__(self, root: Union[str, os.PathLike], *, hosts: int | None = None,
                 faults: dict[str, list[int]] | None = None, idle_timeout: float | None = None):
        self.root = Path(root).expanduser().resolve()
        if hosts is not None and int(hosts) < 1:
            raise ValueError(f"hosts must be at least 1, not {hosts!r}")
        for kind in faults or {}:
            if kind not in ("wrong", "error", "vanish", "tamper", "pickle"):
                raise ValueError(f"unknown fault {kind!r}: wrong, error, vanish, tamper or pickle")
        self._hosts, self._faults, self._idle = hosts, faults, idle_timeout
        if (self.root / "config.xml").exists() and any(v is not None for v in (hosts, faults, idle_timeout)):
            self._write_settings()

    def __reduce__(self) -> Any:
        return (StandInProject, (str(self.root),))

    def __repr__(self) -> str:
        return f"StandInProject({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    def __enter__(self) -> "StandInProject":
        self.create()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- layout -------------------------------------------------------------------------------------
    def create(self) -> "StandInProject":
        """Lay the project out (nothing is changed in one laid out before)."""
        root = self.root
        if (root / "config.xml").exists():
            return self
        root.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        for d in ("bin", "templates", "apps", "download", "upload", "keys", "html/inc", "db", f"log_{host}",
                  f"pid_{host}", f"tmp_{host}", "cgi-bin", "py"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "html" / "inc" / "dir_hier.inc").write_text("<?php // stand-in\n")
        (root / "keys" / "code_sign_private").write_text("stand-in code signing key\n")
        os.chmod(root / "keys" / "code_sign_private", 0o600)
        (root / "project.xml").write_text(_PROJECT)
        (root / "bin" / "boinc_path_config.py").write_text(_PATH_CONFIG.format(root=str(root)))
        (root / "py" / "Boinc").mkdir(parents=True, exist_ok=True)
        (root / "py" / "Boinc" / "__init__.py").write_text("")
        (root / "py" / "Boinc" / "database.py").write_text(_DATABASE)
        (root / "py" / "Boinc" / "db_base.py").write_text(_DB_BASE)
        for name in TOOLS:
            path = root / "bin" / name
            path.write_text(_TOOL.format(python=sys.executable, name=name, parent=_PACKAGE_PARENT,
                                         package=_PACKAGE_DIR))
            os.chmod(path, 0o755)
        conn = db.connect(root)
        conn.close()
        self._write_settings()
        # (last: a directory with config.xml is a project)
        (root / "config.xml").write_text(_CONFIG.format(host=host, root=root))
        subprocess.run([str(root / "bin" / "xadd")], cwd=root, check=True, capture_output=True, timeout=120)
        return self

    def _write_settings(self) -> None:
        path = self.root / "standin.json"
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {"hosts": 2, "faults": {}, "idle_timeout": 600}
        if self._hosts is not None:
            old["hosts"] = int(self._hosts)
        if self._faults is not None:
            old["faults"] = {k: [int(i) for i in v] for k, v in self._faults.items()}
        if self._idle is not None:
            old["idle_timeout"] = float(self._idle)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(old))
        os.replace(tmp, path)

    def configure(self, **options: Any) -> None:
        """Set options of config.xml's <config> (as a project's admin
        would): True writes ``<name/>``, another value ``<name>value</name>``."""
        import xml.etree.ElementTree as ET
        path = self.root / "config.xml"
        text = path.read_text()
        import re
        for name, value in options.items():
            element = f"<{name}/>" if value is True else f"<{name}>{value}</{name}>"
            text, n = re.subn(rf"<{name}\s*/>|<{name}>[^<]*</{name}>", element, text, count=1)
            if not n:
                text = text.replace("  </config>", f"    {element}\n  </config>", 1)
        ET.fromstring(text)
        path.write_text(text)

    def set_faults(self, faults: dict[str, list[int]]) -> None:
        """Change which hosts misbehave (the daemon reads it within a second)."""
        self._faults = faults
        self._write_settings()

    # -- daemons -------------------------------------------------------------------------------------
    def _tool(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.root / "bin" / name), *args], cwd=self.root, capture_output=True, text=True,
                              timeout=120)

    def start(self) -> None:
        self.create()
        proc = self._tool("start")
        if proc.returncode:
            raise RuntimeError(f"bin/start failed: {proc.stderr}")

    def stop(self) -> None:
        if (self.root / "bin" / "stop").exists():
            self._tool("stop")

    def daemon_pid(self) -> int | None:
        try:
            pid = int((self.root / f"pid_{socket.gethostname()}" / "standin_daemon.pid").read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    # -- what tests read -------------------------------------------------------------------------------
    def workunits(self, **where: Any) -> list[dict[str, Any]]:
        return self._rows("workunit", where)

    def results(self, **where: Any) -> list[dict[str, Any]]:
        return self._rows("result", where)

    def _rows(self, table: str, where: dict[str, Any]) -> list[dict[str, Any]]:
        conn = db.connect(self.root)
        try:
            q = f"select * from {table}"
            if where:
                q += " where " + " and ".join(f"{k}=?" for k in where)
            return [dict(r) for r in conn.execute(q + " order by id", list(where.values()))]
        finally:
            conn.close()

    def log(self) -> str:
        path = self.root / f"log_{socket.gethostname()}" / "standin_daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""
