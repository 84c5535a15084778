"""The stand-in BOINC project's database (SQLite, in ``db/boinc.sqlite``):
BOINC's tables, cut down to the columns the stand-in's tools and daemon use,
with BOINC's names and constants."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# server_state
UNSENT, IN_PROGRESS, OVER = 2, 4, 5
# outcome
SUCCESS, COULDNT_SEND, CLIENT_ERROR, NO_REPLY, DIDNT_NEED, VALIDATE_ERROR = 1, 2, 3, 4, 5, 6
# validate_state
V_INIT, V_VALID, V_INVALID, V_NO_CHECK, V_INCONCLUSIVE = 0, 1, 2, 3, 4
# WU error_mask bits
WU_ERROR_COULDNT_SEND, WU_ERROR_TOO_MANY_ERRORS, WU_ERROR_TOO_MANY_SUCCESS = 1, 2, 4
WU_ERROR_TOO_MANY_TOTAL, WU_ERROR_CANCELLED, WU_ERROR_NO_CANONICAL = 8, 16, 32
# assimilate_state / file_delete_state
A_INIT, A_READY, A_DONE = 0, 1, 2

SCHEMA = """
create table if not exists app (id integer primary key, name text unique, create_time real, min_version int default 0);
create table if not exists platform (id integer primary key, name text unique);
create table if not exists app_version (id integer primary key, appid int, version_num int, platform text,
    files text, dir text, create_time real, unique(appid, version_num, platform));
create table if not exists workunit (id integer primary key, name text unique, appid int, batch int,
    files text, command_line text, result_template text, max_nbytes real, target_nresults int, min_quorum int,
    max_error_results int, max_total_results int, max_success_results int, delay_bound real,
    rsc_fpops_est real, app_version_num int, priority int, canonical_resultid int default 0,
    error_mask int default 0, assimilate_state int default 0, file_delete_state int default 0,
    need_validate int default 0, create_time real);
create table if not exists result (id integer primary key, name text unique, workunitid int,
    server_state int, outcome int default 0, validate_state int default 0, hostid int default 0,
    sent_time real, received_time real, report_deadline real, exit_status int default 0,
    stderr_out text default '', elapsed_time real default 0, out_files text default '', create_time real,
    batch int default 0);
"""


def connect(root: str | os.PathLike) -> sqlite3.Connection:
    path = Path(root) / "db" / "boinc.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=60, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("pragma journal_mode=wal")
    conn.execute("pragma busy_timeout=60000")
    conn.executescript(SCHEMA)
    return conn


def config(root: str | os.PathLike) -> ET.Element:
    """config.xml's <config> section (what BOINC's tools parse)."""
    path = Path(root) / "config.xml"
    if not path.exists():
        raise SystemExit(f"Can't parse config.xml: {path}: file not found")
    return ET.parse(path).getroot().find("config")


def dir_hier_path(name: str, root: str, fanout: int, create: bool = True) -> str:
    """BOINC's sched_util_basic.cpp dir_hier_path: md5 of the name, chars 1..7
    as hex, modulo the fanout, as a hex directory name."""
    if fanout == 0:
        return os.path.join(root, name)
    x = int(hashlib.md5(name.encode()).hexdigest()[1:8], 16)
    d = os.path.join(root, "%x" % (x % fanout))
    if create:
        os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)


def fanout(cfg: ET.Element) -> int:
    return int((cfg.findtext("uldl_dir_fanout") or "1024").strip())


def now() -> float:
    return time.time()


def strip_tags(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
