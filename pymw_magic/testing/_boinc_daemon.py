"""The stand-in project's daemon: BOINC's server daemons and N volunteer
hosts in one process (started by the project's ``bin/start``, stopped by
``bin/stop``).

::

    transitioner: results per work unit (target_nresults), deadlines (delay_bound -> NO_REPLY),
                  error limits (max_error_results, max_total_results, max_success_results)
    feeder + scheduler + N client threads: an unsent result goes to a host that has none of its
                  work unit; the host lays out a slot directory (the app version's files and the
                  inputs under their logical names, copied), runs the main program with the
                  work unit's command line, counts an exit without boinc_finish_called as
                  premature, enforces max_nbytes, uploads <result>_0 into upload/
    validator:    script_validator's rules: init script per result, compare script for a quorum
    assimilator:  script_assimilator's rules: ../bin/SCRIPT tokens (cwd tmp_<host>), or --error N ...
    file_deleter: outputs and inputs (not <no_delete/>) of assimilated work units

Only what ``config.xml``'s ``<daemons>`` lists runs (no feeder: no work is
sent; no assimilator for the app: nothing is collected).  ``standin.json``
holds the hosts and their faults: "wrong" (results perturbed and sealed
again, as a cheating host would), "error" (the app fails), "vanish"
(takes one result and never answers), "tamper" (an input's byte changed
before the app runs), "pickle" (results sent as pickles that would create
``<root>/pwned`` if anyone loaded them).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import _boinc_db as db

HOST = socket.gethostname()
#: seconds between two passes of the server daemons
PASS = 0.1
#: how often the client restarts an app that exited without boinc_finish_called
MAX_RESTARTS = 3
ERR_FILE_TOO_BIG = -131
ERR_FILE_MISSING = -161


class Daemon:
    def __init__(self, root: Path):
        self.root = root
        self.stop = threading.Event()
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.settings = self._settings()
        self.last_activity = time.monotonic()

    def _settings(self) -> dict:
        try:
            return json.loads((self.root / "standin.json").read_text())
        except (OSError, ValueError):
            return {"hosts": 2, "faults": {}, "idle_timeout": 600}

    def log(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    # --- config -------------------------------------------------------------------------------------
    def daemons(self) -> list[list[str]]:
        try:
            root = ET.parse(self.root / "config.xml").getroot()
        except (OSError, ET.ParseError):
            return []
        out = []
        locks = set()
        for d in root.iter("daemon"):
            if (d.findtext("disabled") or "0").strip() not in ("0", ""):
                continue
            try:
                words = shlex.split(d.findtext("cmd") or "")
            except ValueError:
                continue
            if not words:
                continue
            # (bin/start locks a daemon by its <output>, else its program's name: a
            # second daemon of one name, e.g. another app's script_validator, never starts)
            lock = (d.findtext("output") or "").strip() or os.path.basename(words[0])
            if lock in locks:
                continue
            locks.add(lock)
            out.append(words)
        return out

    def cfg(self) -> ET.Element:
        return db.config(self.root)

    def dirs(self) -> tuple[str, str, int]:
        cfg = self.cfg()
        return ((cfg.findtext("download_dir") or str(self.root / "download")).strip(),
                (cfg.findtext("upload_dir") or str(self.root / "upload")).strip(), db.fanout(cfg))

    # --- the server -------------------------------------------------------------------------------------
    def server(self) -> None:
        conn = db.connect(self.root)
        while not self.stop.is_set():
            try:
                daemons = self.daemons()
                names = {d[0] for d in daemons if d}
                if "transitioner" in names:
                    self.transition(conn)
                for d in daemons:
                    if d and d[0] == "script_validator":
                        self.validate(conn, d)
                for d in daemons:
                    if d and d[0] == "script_assimilator":
                        self.assimilate(conn, d)
                if "file_deleter" in names:
                    self.delete_files(conn)
                busy = conn.execute("select count(*) from workunit where assimilate_state!=?",
                                    (db.A_DONE,)).fetchone()[0]
                if busy:
                    self.last_activity = time.monotonic()
                elif time.monotonic() - self.last_activity > float(self.settings.get("idle_timeout") or 600):
                    self.log("idle: exiting")
                    self.stop.set()
            except Exception as exc:  # (a daemon logs and goes on, as BOINC's do)
                self.log(f"server pass failed: {type(exc).__name__}: {exc}")
            self.stop.wait(PASS)

    def transition(self, conn) -> None:
        now = db.now()
        conn.execute("update result set server_state=?, outcome=? where server_state=? and report_deadline<?",
                     (db.OVER, db.NO_REPLY, db.IN_PROGRESS, now))
        wus = conn.execute("select * from workunit where assimilate_state=? and error_mask=0 and canonical_resultid=0",
                           (db.A_INIT,)).fetchall()
        for wu in wus:
            rs = conn.execute("select * from result where workunitid=?", (wu["id"],)).fetchall()
            nerr = sum(1 for r in rs if r["outcome"] in (db.CLIENT_ERROR, db.NO_REPLY, db.VALIDATE_ERROR))
            nsucc = sum(1 for r in rs if r["outcome"] == db.SUCCESS and r["validate_state"] != db.V_INVALID)
            nlive = sum(1 for r in rs if r["server_state"] in (db.UNSENT, db.IN_PROGRESS))
            mask = 0
            if nerr > wu["max_error_results"]:
                mask |= db.WU_ERROR_TOO_MANY_ERRORS
            elif nsucc > wu["max_success_results"]:
                mask |= db.WU_ERROR_TOO_MANY_SUCCESS
            need = wu["target_nresults"] - nsucc - nlive
            if not mask and need > 0 and len(rs) + need > wu["max_total_results"]:
                if len(rs) >= wu["max_total_results"] and nlive == 0:
                    mask |= db.WU_ERROR_TOO_MANY_TOTAL
                need = max(0, wu["max_total_results"] - len(rs))
            if mask:
                conn.execute("update result set server_state=?, outcome=? where workunitid=? and server_state=?",
                             (db.OVER, db.DIDNT_NEED, wu["id"], db.UNSENT))
                conn.execute("update workunit set error_mask=error_mask|?, assimilate_state=? where id=?",
                             (mask, db.A_READY, wu["id"]))
                self.log(f"WU {wu['name']}: error mask {mask}")
                continue
            for k in range(max(0, need)):
                n = len(rs) + k
                conn.execute("insert into result (name, workunitid, server_state, create_time, batch) "
                             "values (?, ?, ?, ?, ?)", (f"{wu['name']}_{n}", wu["id"], db.UNSENT, db.now(), wu["batch"]))

    def _script(self, words: list[str], tokens: dict[str, str], raw: str = "") -> int:
        """Run ``../bin/NAME tokens`` from tmp_<host>, through the shell
        (BOINC's system()).  As server 1.6.2 does: split() keeps the
        delimiter on every word but the last, so of a spec with tokens none
        matches (the script gets no argument); a spec that is the script's
        name alone gets the defaults (``words`` then holds them, undamaged)."""
        cmd = f"../bin/{words[0].strip()}" + raw
        for w in words[1:]:
            if w in tokens:
                cmd += " " + tokens[w] if tokens[w] else ""
        cwd = self.root / f"tmp_{HOST}"
        cwd.mkdir(exist_ok=True)
        proc = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            self.log(f"script {cmd}: exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return proc.returncode

    def validate(self, conn, words: list[str]) -> None:
        opts = _options(words)
        app = conn.execute("select id from app where name=?", (opts.get("app"),)).fetchone()
        if app is None:
            return
        init = _split(opts["init_script"]) if opts.get("init_script") else []
        compare = _split(opts["compare_script"]) if opts.get("compare_script") else []
        if init and len(init) == 1:
            init.append("files")
        if compare and len(compare) == 1:
            compare += ["files", "files2"]
        wus = conn.execute("select * from workunit where appid=? and need_validate=1 and canonical_resultid=0 and "
                           "error_mask=0", (app["id"],)).fetchall()
        for wu in wus:
            conn.execute("update workunit set need_validate=0 where id=?", (wu["id"],))
            rs = conn.execute("select * from result where workunitid=? and outcome=? and validate_state!=?",
                              (wu["id"], db.SUCCESS, db.V_INVALID)).fetchall()
            good = []
            for r in rs:
                files = " ".join(json.loads(r["out_files"] or "[]"))
                if r["validate_state"] == db.V_INIT and init:
                    if self._script(init, {"files": files, "result_id": str(r["id"]),
                                           "runtime": "%f" % r["elapsed_time"]}) != 0:
                        conn.execute("update result set validate_state=?, outcome=? where id=?",
                                     (db.V_INVALID, db.VALIDATE_ERROR, r["id"]))
                        continue
                    conn.execute("update result set validate_state=? where id=?", (db.V_INCONCLUSIVE, r["id"]))
                good.append((r, files))
            if len(good) < wu["min_quorum"]:
                continue
            canonical = None
            for r, files in good:
                agree = [r]
                for o, ofiles in good:
                    if o["id"] == r["id"]:
                        continue
                    if not compare or self._script(compare, {
                            "files": files, "files2": ofiles, "result_id": str(r["id"]),
                            "result_id2": str(o["id"]), "runtime": "%f" % r["elapsed_time"],
                            "runtime2": "%f" % o["elapsed_time"]}) == 0:
                        agree.append(o)
                if len(agree) >= wu["min_quorum"]:
                    canonical = (r, agree)
                    break
            if canonical is None:
                nsucc = len(good)
                self.log(f"WU {wu['name']}: no quorum among {nsucc} results")
                if nsucc >= wu["max_success_results"]:
                    conn.execute("update workunit set error_mask=error_mask|?, assimilate_state=? where id=?",
                                 (db.WU_ERROR_TOO_MANY_SUCCESS, db.A_READY, wu["id"]))
                    conn.execute("update result set server_state=?, outcome=? where workunitid=? and server_state=?",
                                 (db.OVER, db.DIDNT_NEED, wu["id"], db.UNSENT))
                else:
                    conn.execute("update workunit set target_nresults=? where id=?",
                                 (max(wu["target_nresults"], nsucc + 1), wu["id"]))
                continue
            r, agree = canonical
            ids = {a["id"] for a in agree}
            for o, _ in good:
                conn.execute("update result set validate_state=? where id=?",
                             (db.V_VALID if o["id"] in ids else db.V_INVALID, o["id"]))
            conn.execute("update result set server_state=?, outcome=? where workunitid=? and server_state=?",
                         (db.OVER, db.DIDNT_NEED, wu["id"], db.UNSENT))
            conn.execute("update workunit set canonical_resultid=?, assimilate_state=? where id=?",
                         (r["id"], db.A_READY, wu["id"]))

    def assimilate(self, conn, words: list[str]) -> None:
        opts = _options(words)
        app = conn.execute("select id from app where name=?", (opts.get("app"),)).fetchone()
        if app is None or not opts.get("script"):
            return
        script = _split(opts["script"])
        if len(script) == 1:
            script += ["wu_id", "files"]
        wus = conn.execute("select * from workunit where appid=? and assimilate_state=?",
                           (app["id"], db.A_READY)).fetchall()
        for wu in wus:
            if wu["canonical_resultid"]:
                r = conn.execute("select * from result where id=?", (wu["canonical_resultid"],)).fetchone()
                files = json.loads(r["out_files"] or "[]")
                tokens = {"files": " ".join(files), "files2": " ".join(f"{p} out" for p in files),
                          "wu_id": str(wu["id"]), "wu_name": wu["name"], "result_id": str(r["id"]),
                          "runtime": "%f" % r["elapsed_time"], "batch_id": str(wu["batch"])}
                code = self._script(script, tokens)
            else:
                code = self._script([script[0]], {}, f" --error {wu['error_mask']} {wu['name']} {wu['id']} "
                                                     f"{wu['batch']}")
            if code == 0:
                conn.execute("update workunit set assimilate_state=?, file_delete_state=? where id=?",
                             (db.A_DONE, db.A_READY, wu["id"]))

    def delete_files(self, conn) -> None:
        download, _, fan = self.dirs()
        wus = conn.execute("select * from workunit where assimilate_state=? and file_delete_state=?",
                           (db.A_DONE, db.A_READY)).fetchall()
        for wu in wus:
            for r in conn.execute("select out_files from result where workunitid=?", (wu["id"],)):
                for path in json.loads(r["out_files"] or "[]"):
                    _unlink(path)
            for f in json.loads(wu["files"]):
                if not f.get("no_delete"):
                    path = db.dir_hier_path(f["phys"], download, fan, create=False)
                    _unlink(path)
                    _unlink(path + ".md5")
            conn.execute("update workunit set file_delete_state=? where id=?", (db.A_DONE, wu["id"]))

    # --- the volunteer hosts -------------------------------------------------------------------------------
    def faults(self, host: int) -> set[str]:
        faults = self.settings.get("faults") or {}
        return {kind for kind, hosts in faults.items() if host in (hosts or ())}

    def host(self, index: int) -> None:
        conn = db.connect(self.root)
        hostid = index + 1
        vanished = False
        while not self.stop.is_set():
            if vanished:
                self.stop.wait(1.0)
                continue
            try:
                job = self.claim(conn, hostid)
            except Exception as exc:
                self.log(f"host {index}: scheduler request failed: {type(exc).__name__}: {exc}")
                job = None
            if job is None:
                self.stop.wait(0.05)
                continue
            result, wu, version = job
            self.log(f"host {index}: got {result['name']}")
            if "vanish" in self.faults(index):
                vanished = True  # (it took the task and is never heard of again)
                continue
            try:
                report = self.run(index, result, wu, version)
            except Exception as exc:
                report = {"outcome": db.CLIENT_ERROR, "exit_status": -1,
                          "stderr_out": f"stand-in client: {type(exc).__name__}: {exc}"}
            if self.stop.is_set() and report.get("stopped"):
                return
            report.pop("stopped", None)
            self.report(conn, result, report)

    def claim(self, conn, hostid: int):
        if "feeder" not in {d[0] for d in self.daemons() if d}:
            return None
        cfg = self.cfg()
        # (BOINC sends replicas of a work unit to one host unless the project says otherwise;
        # each stand-in host is a user of its own)
        one_per_host = any(cfg.findall(k) and (cfg.findall(k)[-1].text or "").strip() in ("", "1")
                           for k in ("one_result_per_user_per_wu", "one_result_per_host_per_wu"))  # (the last wins)
        conn.execute("begin immediate")
        try:
            rows = conn.execute(
                "select r.*, w.appid, w.app_version_num from result r join workunit w on r.workunitid=w.id "
                "where r.server_state=? and w.error_mask=0 and w.canonical_resultid=0 and (? or not exists "
                "(select 1 from result o where o.workunitid=r.workunitid and o.hostid=?)) "
                "order by w.priority desc, r.id limit 20", (db.UNSENT, 0 if one_per_host else 1, hostid)).fetchall()
            for r in rows:
                # (as BOINC's feeder: only the newest version of an app is loaded,
                # unless the app has a min_version: then every version >= it)
                versions = conn.execute("select * from app_version where appid=? and platform=? order by version_num "
                                        "desc", (r["appid"], "x86_64-pc-linux-gnu")).fetchall()
                floor = conn.execute("select min_version from app where id=?", (r["appid"],)).fetchone()[0] or 0
                loaded = [v for v in versions if v["version_num"] >= floor] if floor else versions[:1]
                if r["app_version_num"]:
                    loaded = [v for v in loaded if v["version_num"] == r["app_version_num"]]
                if not loaded:
                    continue
                version = loaded[0]
                wu = conn.execute("select * from workunit where id=?", (r["workunitid"],)).fetchone()
                now = db.now()
                conn.execute("update result set server_state=?, hostid=?, sent_time=?, report_deadline=? "
                             "where id=?", (db.IN_PROGRESS, hostid, now, now + wu["delay_bound"], r["id"]))
                conn.execute("commit")
                return r, wu, version
            conn.execute("commit")
            return None
        except BaseException:
            conn.execute("rollback")
            raise

    def run(self, index: int, result, wu, version) -> dict:
        download, upload, fan = self.dirs()
        slot = self.root / "clients" / f"host{index}" / "slots" / str(result["id"])
        shutil.rmtree(slot, ignore_errors=True)
        slot.mkdir(parents=True)
        try:
            main = None
            for f in json.loads(version["files"]):
                src = os.path.join(download, f["phys"])  # (update_versions stages app files at the top)
                dst = slot / f["logical"]
                shutil.copyfile(src, dst)
                os.chmod(dst, os.stat(src).st_mode & 0o777 | 0o400)
                if f["main"]:
                    main = dst
            for f in json.loads(wu["files"]):
                src = db.dir_hier_path(f["phys"], download, fan, create=False)
                if not os.path.exists(src):
                    return {"outcome": db.CLIENT_ERROR, "exit_status": -224,
                            "stderr_out": f"download of {f['phys']} failed: 404 not found"}
                shutil.copyfile(src, slot / (f["open_name"] or f["phys"]))
            faults = self.faults(index)
            if "tamper" in faults:
                for f in json.loads(wu["files"]):
                    p = slot / (f["open_name"] or f["phys"])
                    data = bytearray(p.read_bytes())
                    data[len(data) // 2] ^= 0x01
                    p.write_bytes(bytes(data))
            start = time.time()
            if "error" in faults:
                return {"outcome": db.CLIENT_ERROR, "exit_status": 1, "elapsed_time": 0.0,
                        "stderr_out": f"<stderr_txt>\nstand-in host {index}: injected client error: the app "
                                      f"crashed\n</stderr_txt>"}
            argv = [str(main)] + shlex.split(wu["command_line"] or "")
            for attempt in range(MAX_RESTARTS):
                code = self.execute(argv, slot)
                if code is None:
                    return {"stopped": True}
                if code != 0 or (slot / "boinc_finish_called").exists():
                    break
                self.log(f"host {index}: {result['name']} exited without boinc_finish_called: restarted")
            stderr = (slot / "stderr.txt").read_text(errors="replace") if (slot / "stderr.txt").exists() else ""
            elapsed = time.time() - start
            if code != 0 or not (slot / "boinc_finish_called").exists():
                return {"outcome": db.CLIENT_ERROR, "exit_status": code or 1, "elapsed_time": elapsed,
                        "stderr_out": f"<stderr_txt>\n{stderr[-60000:]}\n</stderr_txt>"
                                      + ("" if code else "\ntoo many restarts: no boinc_finish_called")}
            out_name = _result_open_name(self.root / wu["result_template"])
            out = slot / out_name
            if not out.exists():
                return {"outcome": db.CLIENT_ERROR, "exit_status": ERR_FILE_MISSING, "elapsed_time": elapsed,
                        "stderr_out": f"<stderr_txt>\n{stderr}\n</stderr_txt>\noutput file {out_name} missing"}
            size = out.stat().st_size
            if wu["max_nbytes"] and size > wu["max_nbytes"]:
                return {"outcome": db.CLIENT_ERROR, "exit_status": ERR_FILE_TOO_BIG, "elapsed_time": elapsed,
                        "stderr_out": f"<stderr_txt>\n{stderr}\n</stderr_txt>\nOutput file {out_name} for task "
                                      f"{result['name']} exceeds size limit: file size: {size} bytes. "
                                      f"Limit: {wu['max_nbytes']:.0f} bytes"}
            if "wrong" in faults:
                _perturb(out, index + 1)
            if "pickle" in faults:
                _pickled(out, self.root / "pwned")
            # (as the server names it: <result>_r<random>_<i>)
            target = db.dir_hier_path(f"{result['name']}_r{random.randrange(1 << 31)}_0", upload, fan)
            shutil.copyfile(out, target)
            return {"outcome": db.SUCCESS, "exit_status": 0, "elapsed_time": elapsed,
                    "stderr_out": f"<stderr_txt>\n{stderr[-60000:]}\n</stderr_txt>", "out_files": json.dumps([target])}
        finally:
            shutil.rmtree(slot, ignore_errors=True)

    def execute(self, argv: list[str], slot: Path) -> int | None:
        with open(slot / "stderr.txt", "ab") as err:
            proc = subprocess.Popen(argv, cwd=slot, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        with self.lock:
            self.children.add(proc)
        try:
            while True:
                try:
                    return proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    if self.stop.is_set():
                        _kill(proc)
                        return None
        finally:
            with self.lock:
                self.children.discard(proc)

    def report(self, conn, result, report: dict) -> None:
        conn.execute("begin immediate")
        try:
            row = conn.execute("select server_state, outcome from result where id=?", (result["id"],)).fetchone()
            if row["server_state"] != db.IN_PROGRESS:
                conn.execute("commit")  # (past its deadline, or cancelled: a late result is not used)
                return
            fields = dict(report, server_state=db.OVER, received_time=db.now())
            sets = ", ".join(f"{k}=?" for k in fields)
            conn.execute(f"update result set {sets} where id=?", list(fields.values()) + [result["id"]])
            if report["outcome"] == db.SUCCESS:
                conn.execute("update workunit set need_validate=1 where id=?", (result["workunitid"],))
            conn.execute("commit")
        except BaseException:
            conn.execute("rollback")
            raise
        self.log(f"result {result['name']}: outcome {report['outcome']}")

    # --- lifetime ------------------------------------------------------------------------------------------
    def run_all(self) -> None:
        threads = [threading.Thread(target=self.server, name="server", daemon=True)]
        threads += [threading.Thread(target=self.host, args=(i,), name=f"host{i}", daemon=True)
                    for i in range(int(self.settings.get("hosts") or 1))]
        for t in threads:
            t.start()
        while not self.stop.is_set():
            self.stop.wait(0.5)
            new = self._settings()  # (faults may change while it runs)
            self.settings.update(new)
        with self.lock:
            children = list(self.children)
        for proc in children:
            _kill(proc)
        for t in threads:
            t.join(timeout=10)


def _split(text: str) -> list[str]:
    """BOINC 1.6.2's split(s, ' '): every item but the last keeps its delimiter."""
    items = text.split(" ")
    return [item + " " for item in items[:-1]] + items[-1:]


def _options(words: list[str]) -> dict[str, str]:
    out = {}
    i = 1
    while i < len(words):
        if words[i].startswith("--") and i + 1 < len(words):
            out[words[i][2:]] = words[i + 1]
            i += 2
        else:
            i += 1
    return out


def _result_open_name(template: Path) -> str:
    try:
        root = ET.parse(template).getroot()
        return (root.findtext("result/file_ref/open_name") or "out").strip()
    except (OSError, ET.ParseError):
        return "out"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _perturb(path: Path, by: int) -> None:
    """What a cheating host sends: every result changed, sealed again (a
    plain digest anyone can compute: only the quorum catches it)."""
    from ..codec import decode, encode
    from ..oneshot import open_file, seal
    data = path.read_bytes()
    header, body, _, _ = open_file(data, str(path))
    raw = bytes(body)
    cut = raw.index(b"\n")
    meta = json.loads(raw[:cut])
    blobs, offset = [], cut + 1
    for size in meta["blobs"]:
        blobs.append(raw[offset:offset + size])
        offset += size
    for rec in meta["outcomes"]:
        if len(rec) == 6 and header.get("codec") == "safe":
            value = decode(blobs[rec[1]])
            wrong = value + by if isinstance(value, (int, float)) and not isinstance(value, bool) else ["wrong", by, value]
            blobs[rec[1]] = encode(wrong)
    meta["blobs"] = [len(b) for b in blobs]
    body2 = json.dumps(meta, separators=(",", ":")).encode() + b"\n" + b"".join(blobs)
    header = {k: v for k, v in header.items() if k not in ("scheme", "body")}
    path.write_bytes(seal(header, body2, "sha256", None))


class _Pwn:
    """What a hostile host pickles: loading it creates the file ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickled(path: Path, marker: Path) -> None:
    """A hostile host's output: results in the pickle codec, each a pickle
    that creates ``marker`` when it is loaded."""
    import pickle
    from ..oneshot import open_file, seal
    header, body, _, _ = open_file(path.read_bytes(), str(path))
    raw = bytes(body)
    cut = raw.index(b"\n")
    meta = json.loads(raw[:cut])
    blob = pickle.dumps(_Pwn(str(marker)))
    blobs = []
    for rec in meta["outcomes"]:
        if len(rec) == 6:
            rec[1] = len(blobs)
            blobs.append(blob)
    meta["blobs"] = [len(b) for b in blobs]
    header = {k: v for k, v in header.items() if k not in ("scheme", "body")}
    header["codec"] = "pickle"
    body2 = json.dumps(meta, separators=(",", ":")).encode() + b"\n" + b"".join(blobs)
    path.write_bytes(seal(header, body2, "sha256", None))


def main(root: str) -> None:
    path = Path(root)
    daemon = Daemon(path)
    pid_dir = path / f"pid_{HOST}"
    pid_dir.mkdir(exist_ok=True)
    (pid_dir / "standin_daemon.pid").write_text(f"{os.getpid()}\n")
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop.set())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop.set())
    daemon.log(f"stand-in BOINC daemon for {root}, pid {os.getpid()}")
    try:
        daemon.run_all()
    finally:
        try:
            pid = int((pid_dir / "standin_daemon.pid").read_text().split()[0])
            if pid == os.getpid():
                (pid_dir / "standin_daemon.pid").unlink()
        except (OSError, ValueError, IndexError):
            pass
        daemon.log("stopped")
    sys.exit(0)
