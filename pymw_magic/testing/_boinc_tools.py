"""The stand-in project's ``bin/`` tools, with BOINC's command lines:
``create_work`` (``--stdin`` included), ``dir_hier_path``,
``stage_file_native`` / ``stage_file``, ``xadd``, ``update_versions``,
``cancel_jobs``, ``start``, ``stop``, ``status``.  Each ``bin/`` file is a
tiny script calling :func:`main` with its name; they run in the project
directory, as BOINC's do."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import _boinc_db as db

#: create_work's defaults (BOINC since Dec 2023)
DEFAULTS = {"target_nresults": 1, "min_quorum": 1, "max_error_results": 1, "max_total_results": 1,
            "max_success_results": 1, "rsc_fpops_est": 3600e9, "delay_bound": 7 * 86400, "priority": 0}
INT_FIELDS = ("target_nresults", "min_quorum", "max_error_results", "max_total_results", "max_success_results",
              "delay_bound", "priority", "batch", "app_version_num")


def _die(message: str, code: int = 1) -> int:
    sys.stderr.write(message.rstrip("\n") + "\n")
    return code


def _project() -> Path:
    here = Path.cwd()
    if not (here / "config.xml").exists():
        raise SystemExit(_die("Can't parse config.xml: This program must be run in the project root directory."))
    return here


# --- create_work ------------------------------------------------------------------------------------
def _parse_wu_template(text: str) -> tuple[list[dict], dict]:
    root = ET.fromstring(text)
    infos = root.findall("file_info")
    wu = root.find("workunit")
    refs = wu.findall("file_ref") if wu is not None else []
    files = []
    for i, ref in enumerate(refs):
        number = ref.findtext("file_number")
        files.append({"number": int(number) if number is not None else i,
                      "open_name": (ref.findtext("open_name") or "").strip(),
                      "copy": ref.find("copy_file") is not None,
                      "no_delete": i < len(infos) and infos[i].find("no_delete") is not None})
    if len(files) != len(infos):
        raise ValueError(f"the template has {len(infos)} <file_info> but {len(files)} <file_ref>")
    values = {}
    for field in list(DEFAULTS) + ["command_line", "rsc_fpops_bound"]:
        if wu is not None and wu.find(field) is not None:
            values[field] = (wu.findtext(field) or "").strip()
    return files, values


def _max_nbytes(result_template: str) -> float:
    root = ET.fromstring(result_template)
    info = root.find("file_info")
    return float((info.findtext("max_nbytes") or "0").strip()) if info is not None else 0.0


def create_work(argv: list[str]) -> int:
    root = _project()
    opts: dict = {}
    infiles: list[str] = []
    use_stdin = False
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.lstrip("-")
        if a.startswith("-"):
            if name == "stdin":
                use_stdin = True
            elif name in ("verbose", "continue_on_error"):
                pass
            elif name in ("appname", "wu_name", "wu_template", "result_template", "command_line", "config_dir",
                          "keywords", "sub_appname") or name in DEFAULTS or name in INT_FIELDS \
                    or name in ("rsc_fpops_bound", "rsc_memory_bound", "rsc_disk_bound", "credit", "size_class",
                                "hr_class", "wu_id"):
                if i + 1 >= len(argv):
                    return _die(f"create_work: missing value for {a}")
                opts[name] = argv[i + 1]
                i += 1
            else:
                return _die(f"create_work: bad argument '{a}'")
        else:
            infiles.append(a)
        i += 1
    app = opts.get("appname")
    if not app:
        return _die("usage: create_work [options] infile1 infile2 ...")
    conn = db.connect(root)
    row = conn.execute("select id from app where name=?", (app,)).fetchone()
    if row is None:
        return _die("create_work: app not found")
    appid = row["id"]
    base = opts.get("wu_name") or f"{app}_{os.getpid()}_{time.time():f}"
    wu_template_file = opts.get("wu_template") or f"templates/{app}_in"
    result_template_file = opts.get("result_template") or f"templates/{app}_out"
    templates: dict[str, str] = {}

    def template(path: str) -> str:
        if path not in templates:
            try:
                templates[path] = (root / path).read_text()
            except OSError:
                raise SystemExit(_die(f"Can't read WU template {path}"))
        return templates[path]

    jobs = []
    if use_stdin:
        for j, line in enumerate(sys.stdin):
            if not line.strip():
                continue
            words = shlex.split(line)
            job = {"wu_name": "", "wu_template": wu_template_file, "result_template": result_template_file,
                   "files": list(infiles), "command_line": opts.get("command_line"), "priority": opts.get("priority")}
            k = 0
            while k < len(words):
                w = words[k]
                n = w.lstrip("-")
                if w.startswith("-") and n in ("command_line", "wu_name", "wu_template", "result_template",
                                               "priority", "target_host", "target_user"):
                    job[n] = words[k + 1]
                    k += 1
                elif w.startswith("-") and n == "remote_file":
                    return _die("create_work: remote files are not supported by the stand-in")
                elif w.startswith("-"):
                    return _die(f"create_work: bad stdin argument '{w}'")
                else:
                    job["files"].append(w)
                k += 1
            job["wu_name"] = job["wu_name"] or f"{base}_{j}"
            jobs.append(job)
    else:
        jobs.append({"wu_name": base, "wu_template": wu_template_file, "result_template": result_template_file,
                     "files": infiles, "command_line": opts.get("command_line"), "priority": opts.get("priority")})
    cfg = db.config(root)
    download = (cfg.findtext("download_dir") or str(root / "download")).strip()
    fan = db.fanout(cfg)
    rows = []
    for job in jobs:
        try:
            files, tvalues = _parse_wu_template(template(job["wu_template"]))
            result_template = template(job["result_template"])
            max_nbytes = _max_nbytes(result_template)
        except (ET.ParseError, ValueError) as exc:
            return _die(f"create_work: bad template for {job['wu_name']}: {exc}")
        if len(job["result_template"]) >= 64:
            return _die("create_work: result template filename is too big")
        if len(files) != len(job["files"]):
            return _die(f"create_work: the input template has {len(files)} files, {len(job['files'])} given")
        for phys in job["files"]:
            if not os.path.exists(db.dir_hier_path(phys, download, fan, create=False)):
                return _die(f"create_work: input file {phys} is not in the download hierarchy (stage it first)")
        values = dict(DEFAULTS)
        for k in list(DEFAULTS):
            if k in opts:
                values[k] = opts[k]
        if job.get("priority") is not None:
            values["priority"] = job["priority"]
        values.update({k: v for k, v in tvalues.items() if k in DEFAULTS})  # (the template's values win)
        if int(values["max_error_results"]) > int(values["max_total_results"]):
            return _die("max_error_results > max_total_results; can't create job")
        if int(values["target_nresults"]) > int(values["max_success_results"]):
            return _die(f"target_nresults {values['target_nresults']} > max_success_results "
                        f"{values['max_success_results']}; can't create job")
        if int(values["max_success_results"]) > int(values["max_total_results"]):
            return _die("max_success_results > max_total_results; can't create job")
        command_line = tvalues.get("command_line", job.get("command_line") or "")
        wu_files = [dict(f, phys=p) for f, p in zip(files, job["files"])]
        rows.append((job["wu_name"], appid, int(opts.get("batch") or 0), json.dumps(wu_files), command_line,
                     job["result_template"], max_nbytes, int(values["target_nresults"]), int(values["min_quorum"]),
                     int(values["max_error_results"]), int(values["max_total_results"]),
                     int(values["max_success_results"]), float(values["delay_bound"]),
                     float(values["rsc_fpops_est"]), int(opts.get("app_version_num") or 0),
                     int(values["priority"] or 0), db.now()))
    try:
        conn.execute("begin immediate")
        conn.executemany(
            "insert into workunit (name, appid, batch, files, command_line, result_template, max_nbytes, "
            "target_nresults, min_quorum, max_error_results, max_total_results, max_success_results, delay_bound, "
            "rsc_fpops_est, app_version_num, priority, create_time) values "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute("commit")
    except Exception as exc:
        conn.execute("rollback")
        return _die(f"create_work() failed: {exc}")
    return 0


# --- staging ------------------------------------------------------------------------------------
def dir_hier_path(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        return _die("\nUsage: dir_hier_path <filename>\n   Run this in a project's root directory.")
    root = _project()
    cfg = db.config(root)
    print(db.dir_hier_path(argv[0], (cfg.findtext("download_dir") or str(root / "download")).strip(), db.fanout(cfg)))
    return 0


def stage_file(argv: list[str]) -> int:
    root = _project()
    if not (root / "html" / "inc" / "dir_hier.inc").exists():
        return _die("This program must be run in the project root directory.")
    flags = [a for a in argv[:-1]]
    if not argv or any(f not in ("--gzip", "--copy", "--verbose") for f in flags):
        return _die("usage: stage_file [--gzip] [--copy] [--verbose] path")
    copy = "--copy" in flags
    path = argv[-1]
    cfg = db.config(root)
    download, fan = (cfg.findtext("download_dir") or str(root / "download")).strip(), db.fanout(cfg)
    paths = [os.path.join(path, n) for n in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    for p in paths:
        if not os.path.isfile(p):
            continue
        target = db.dir_hier_path(os.path.basename(p), download, fan)
        if os.path.exists(target):
            if not filecmp.cmp(p, target, shallow=False):
                return _die("There is already a file in your project's download directory with that name,\n"
                            "but with different contents. This is not allowed by BOINC, which requires that\n"
                            "files be immutable. Please use a different file name.\n"
                            f"stage_file failed for file {p}")
        else:
            tmp = target + ".tmp"
            shutil.copyfile(p, tmp) if copy else shutil.move(p, tmp)
            os.replace(tmp, target)
            if not copy and os.path.exists(p):
                os.unlink(p)
        data = Path(target).read_bytes()
        Path(target + ".md5").write_text(f"{hashlib.md5(data).hexdigest()} {len(data)}\n")
    return 0


# --- apps ------------------------------------------------------------------------------------------
def xadd(argv: list[str]) -> int:
    root = _project()
    try:
        tree = ET.parse(root / "project.xml").getroot()
    except (OSError, ET.ParseError) as exc:
        return _die(f"xadd: project.xml: {exc}")
    conn = db.connect(root)
    for app in tree.iter("app"):
        name = (app.findtext("name") or "").strip()
        min_version = int((app.findtext("min_version") or "0").strip() or 0)
        row = conn.execute("select min_version from app where name=?", (name,)).fetchone()
        if row:
            if row["min_version"] != min_version:
                conn.execute("update app set min_version=? where name=?", (min_version, name))
                print(f"updated min_version of app {name}")
            continue
        conn.execute("insert into app (name, create_time, min_version) values (?, ?, ?)", (name, db.now(), min_version))
        print(f"added app: {name}")
    for platform in tree.iter("platform"):
        name = (platform.findtext("name") or "").strip()
        conn.execute("insert or ignore into platform (name) values (?)", (name,))
    return 0


def _parse_version(v: str) -> int:
    parts = v.split(".")
    if not parts[0].isdigit() or (len(parts) > 1 and not parts[1].isdigit()):
        return -1
    return int(parts[1]) + 100 * int(parts[0]) if len(parts) > 1 else int(parts[0])


def update_versions(argv: list[str]) -> int:
    root = _project()
    for a in argv:
        if a not in ("--noconfirm", "--verbose"):
            return _die(f"unknown arg {a}")
    if "--noconfirm" not in argv:
        return _die("Found new app version: confirm? (the stand-in reads no terminal: pass --noconfirm)")
    conn = db.connect(root)
    cfg = db.config(root)
    download, fan = (cfg.findtext("download_dir") or str(root / "download")).strip(), db.fanout(cfg)
    platforms = {r["name"] for r in conn.execute("select name from platform")}
    for adir in sorted((root / "apps").glob("*")):
        app = conn.execute("select id from app where name=?", (adir.name,)).fetchone()
        if app is None:
            print(f"{adir.name} is not an app")
            continue
        for vdir in sorted(adir.glob("*")):
            vnum = _parse_version(vdir.name)
            if vnum < 0:
                print(f"{vdir.name} is not a version number; skipping")
                continue
            for pdir in sorted(vdir.glob("*")):
                platform = pdir.name.split("__")[0]
                if platform not in platforms:
                    print(f"         no such platform: {platform}")
                    continue
                if conn.execute("select 1 from app_version where appid=? and version_num=? and platform=?",
                                (app["id"], vnum, platform)).fetchone():
                    continue
                declared = {}
                vfile = pdir / "version.xml"
                if vfile.exists():
                    for f in ET.parse(vfile).getroot().iter("file"):
                        phys = (f.findtext("physical_name") or "").strip()
                        declared[phys] = {"phys": phys, "logical": (f.findtext("logical_name") or phys).strip(),
                                          "main": f.find("main_program") is not None,
                                          "copy": f.find("copy_file") is not None}
                files = []
                for p in sorted(pdir.iterdir()):
                    if p.name == "version.xml" or p.name.endswith(".sig") or p.is_dir():
                        continue
                    files.append(declared.get(p.name, {"phys": p.name, "logical": p.name, "main": False,
                                                       "copy": False}))
                missing = [n for n in declared if not (pdir / n).exists()]
                if missing:
                    print(f"   File {missing[0]} is listed in version.xml but not present")
                    continue
                if len(files) == 1:
                    files[0]["main"] = True
                if sum(f["main"] for f in files) != 1:
                    print("   No main program specified")
                    continue
                key = root / "keys" / "code_sign_private"
                for f in files:
                    if not (pdir / (f["phys"] + ".sig")).exists() and not key.exists():
                        return _die(f"   Error: no .sig file for {f['phys']}, and no code signing private key")
                    target = os.path.join(download, f["phys"])  # (the top of download/, not the hierarchy)
                    if os.path.exists(target) and not filecmp.cmp(target, pdir / f["phys"], shallow=False):
                        # (PHP's die(): the message, and exit status 0)
                        print(f"Error: files {target} and {pdir / f['phys']} differ.\nBOINC files are immutable.")
                        return 0
                    shutil.copyfile(pdir / f["phys"], target)
                    os.chmod(target, os.stat(pdir / f["phys"]).st_mode & 0o777)
                conn.execute("insert into app_version (appid, version_num, platform, files, dir, create_time) "
                             "values (?, ?, ?, ?, ?, ?)", (app["id"], vnum, platform, json.dumps(files),
                                                           str(pdir), db.now()))
                print(f"\n    App version added successfully; ID={vnum}")
    (root / "reread_db").touch()
    return 0


# --- jobs ------------------------------------------------------------------------------------------
def _atoi(text: str) -> int:
    """C's atoi(): leading blanks, a sign, digits; 0 when there are none."""
    import re
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else 0


CANCEL_USAGE = "Usage: cancel_jobs min-ID max-ID\nor cancel_jobs --name wuname"


def cancel_jobs(argv: list[str]) -> int:
    """BOINC's tools/cancel_jobs.cpp: exactly ``MIN_ID MAX_ID`` (work unit
    ids, inclusive, whoever's; atoi() of each, 0 is a usage error) or
    ``--name WU_NAME``."""
    if len(argv) != 2:
        return _die(CANCEL_USAGE)
    root = _project()
    conn = db.connect(root)
    if argv[0] == "--name":
        rows = conn.execute("select id from workunit where name=?", (argv[1],)).fetchall()
        if not rows:
            return _die(f"No workunit named '{argv[1]}'")
    else:
        low, high = _atoi(argv[0]), _atoi(argv[1])
        if not low or not high:
            return _die(CANCEL_USAGE)
        rows = conn.execute("select id from workunit where id>=? and id<=?", (low, high)).fetchall()
    conn.execute("begin immediate")
    for r in rows:
        # (as BOINC's cancel_job(s): unsent results are over, the WU's error_mask gets
        # CANCELLED whatever its state; the transitioner then hands an open one to the assimilator)
        conn.execute("update result set server_state=?, outcome=? where workunitid=? and server_state<=?",
                     (db.OVER, db.DIDNT_NEED, r["id"], db.UNSENT))
        conn.execute("update workunit set error_mask=error_mask|? where id=?", (db.WU_ERROR_CANCELLED, r["id"]))
        conn.execute("update workunit set assimilate_state=? where id=? and assimilate_state=? and "
                     "canonical_resultid=0", (db.A_READY, r["id"], db.A_INIT))
    conn.execute("commit")
    return 0


# --- daemons ----------------------------------------------------------------------------------------
def _pid_file(root: Path) -> Path:
    return root / f"pid_{socket.gethostname()}" / "standin_daemon.pid"


def _running(root: Path) -> int | None:
    try:
        pid = int(_pid_file(root).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"_boinc_daemon" not in f.read():
                return None
    except OSError:
        return None
    return pid


def start(argv: list[str]) -> int:
    root = _project()
    cfg_root = ET.parse(root / "config.xml").getroot()
    host = (cfg_root.findtext("config/host") or "").strip()
    if host and host != socket.gethostname():
        print(f"Not starting daemons: config.xml's <host> {host} is not this host")
        return 0
    stop_file = root / "stop_daemons"
    if stop_file.exists():
        stop_file.unlink()
    if _running(root):
        print("  Daemons already running")
        return 0
    for d in (f"pid_{socket.gethostname()}", f"log_{socket.gethostname()}", f"tmp_{socket.gethostname()}"):
        (root / d).mkdir(exist_ok=True)
    log = root / f"log_{socket.gethostname()}" / "standin_daemon.log"
    package_parent = str(Path(__file__).resolve().parents[2])
    package_dir = str(Path(__file__).resolve().parents[1])
    launch = ("import os, sys\n"
              "if os.fork() > 0: os._exit(0)\n"
              "os.setsid()\n"
              "if os.fork() > 0: os._exit(0)\n"
              "fd = os.open(sys.argv[3], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
              "os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)\n"
              "sys.path.insert(0, sys.argv[1])\n"
              "import types; pkg = types.ModuleType('pymw_magic'); pkg.__path__ = [sys.argv[2]]\n"
              "sys.modules['pymw_magic'] = pkg\n"
              "from pymw_magic.testing import _boinc_daemon\n"
              "sys.argv = ['pymw_magic.testing._boinc_daemon', sys.argv[4]]\n"
              "_boinc_daemon.main(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", launch, package_parent, package_dir, str(log), str(root)],
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid = _running(root)
        if pid:
            # (one process plays every daemon: each gets BOINC's pid file, <pid_file> or
            # the program's name; a second daemon of one name is not started, as bin/start's lock)
            seen = set()
            for d in cfg_root.iter("daemon"):
                cmd = (d.findtext("cmd") or "").split()
                if not cmd:
                    continue
                name = (d.findtext("pid_file") or "").strip() or os.path.basename(cmd[0]) + ".pid"
                lock = (d.findtext("output") or "").strip() or os.path.basename(cmd[0])
                if lock in seen:
                    print(f"  Daemon already running: {' '.join(cmd)}")
                    continue
                seen.add(lock)
                (root / f"pid_{socket.gethostname()}" / name).write_text(f"{pid}\n")
            print("  Starting daemons: feeder, transitioner, file_deleter, validators, assimilators (stand-in)")
            return 0
        time.sleep(0.02)
    return _die(f"start: the stand-in daemon did not start (see {log})")


def stop(argv: list[str]) -> int:
    root = _project()
    (root / "stop_daemons").touch()
    pid = _running(root)
    if pid is None:
        print("  Daemons not running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            break
        try:  # (a zombie of nobody's: its parent exited already)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
    for f in (root / f"pid_{socket.gethostname()}").glob("*.pid"):
        try:
            f.unlink()
        except OSError:
            pass
    print("  Stopped the daemons")
    return 0


def status(argv: list[str]) -> int:
    root = _project()
    pid = _running(root)
    print(f"BOINC is {'ENABLED' if not (root / 'stop_daemons').exists() else 'DISABLED'}")
    print(f"  stand-in daemon: {'running, pid %d' % pid if pid else 'not running'}")
    return 0


TOOLS = {"create_work": create_work, "dir_hier_path": dir_hier_path, "stage_file_native": stage_file,
         "stage_file": stage_file, "xadd": xadd, "update_versions": update_versions, "cancel_jobs": cancel_jobs,
         "start": start, "stop": stop, "status": status}


def main(tool: str, argv: list[str]) -> int:
    try:
        return TOOLS[tool](argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
