"""The Jupyter server extension (pymw_magic/server.py) in a real
``jupyter server`` process: enabled by the package's own
jupyter-config file, behind JupyterHub's kind of prefix, on a free port
with a token and a temporary root directory; driven over HTTP.

Its job store is filled by real masters of this test process recording
into the server's ``PYMW_HOME``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from conftest import ROOT, by_value, wait_until
from pymw_magic import Master
from pymw_magic import store as st
from pymw_magic.store import Store

EVIL = "<img src=x onerror=alert(1)>"
PREFIX = "/user/alice/"


def nap(seconds):
    time.sleep(seconds)
    return seconds


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"three is bad {EVIL}")
    return x * 10


@dataclass
class Server:
    proc: subprocess.Popen
    url: str          # http://127.0.0.1:PORT{base_url}
    token: str
    root: Path
    home: Path
    log: Path

    def api(self, path: str) -> str:
        return self.url + "pymw/api/" + path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.api(path), headers=self.auth, timeout=30, **kw)

    def post(self, path: str, body=None, **kw) -> requests.Response:
        return requests.post(self.api(path), headers=self.auth, json=body, timeout=60, **kw)

    def delete(self, path: str, **kw) -> requests.Response:
        return requests.delete(self.api(path), headers=self.auth, timeout=30, **kw)

    def job(self, name_or_uid: str) -> dict | None:
        for j in self.get("jobs").json()["jobs"]:
            if name_or_uid in (j["name"], j["uid"]):
                return j
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, base_url: str = "/", home: Path | None = None) -> Server:
    root, home = base / "root", home or base / "pymw-home"
    root.mkdir(parents=True)
    for d in ("config", "data", "runtime", "ipython"):
        (base / d).mkdir()
    env = dict(os.environ, PYMW_HOME=str(home), PYTHONPATH=ROOT,
               JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_DATA_DIR=str(base / "data"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"), IPYTHONDIR=str(base / "ipython"),
               # the extension is enabled by the file the wheel ships, nothing else
               JUPYTER_CONFIG_PATH=os.path.join(ROOT, "jupyter-config"))
    env.pop("PYMW_STORE", None)
    token = os.urandom(12).hex()
    log = base / "server.log"
    for attempt in range(3):  # the free port may be taken between choosing and binding it
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jupyter_server", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                 "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                 f"--ServerApp.root_dir={root}", f"--ServerApp.base_url={base_url}", "--allow-root"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(root), start_new_session=True)
        server = Server(proc, f"http://127.0.0.1:{port}{base_url}", token, root, home, log)

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            try:
                return requests.get(server.url + "api/status", headers=server.auth, timeout=5).status_code == 200
            except requests.ConnectionError:
                return False
        try:
            wait_until(ready, timeout=120, what="the jupyter server to answer")
        except BaseException:
            stop_server(server)
            raise
        if proc.poll() is None:
            return server
    raise AssertionError(f"the jupyter server did not start:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=30)
    try:  # nothing of its process group may stay
        os.killpg(server.proc.pid, 0)
    except ProcessLookupError:
        return
    raise AssertionError("processes of the jupyter server's group outlived it")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), PREFIX)
    try:
        yield s
    finally:
        stop_server(s)


@pytest.fixture
def local():
    m = Master("local", workers=2)
    try:
        yield m
    finally:
        m.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def recorder(server):
    """A recorder of this process writing into the server's store."""
    rec = st.recorder(server.home)
    assert rec is not None
    return rec


ROUTES = [("GET", "jobs"), ("GET", "jobs/abc/tasks"), ("POST", "jobs/abc/cancel"), ("DELETE", "jobs/abc"),
          ("POST", "export")]


# --- authentication -----------------------------------------------------------------------------
def test_every_route_refuses_a_request_without_a_valid_token_or_cookie(server):
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "token wrong"}):
            r = requests.request(method, server.api(path), headers=headers, json={"path": "a.ipynb"}, timeout=30)
            assert r.status_code == 403, (method, path, headers, r.status_code, r.text)
        r = requests.request(method, server.api(path) + "?token=wrong", timeout=30)
        assert r.status_code == 403, (method, path)


def test_a_cookie_session_needs_the_xsrf_token_to_post_or_delete(server):
    s = requests.Session()
    assert s.get(server.url + f"api/status?token={server.token}", timeout=30).status_code == 200
    assert s.get(server.url + "login", timeout=30).status_code == 200  # sets the _xsrf cookie
    xsrf = s.cookies.get("_xsrf")
    assert xsrf
    assert s.get(server.api("jobs"), timeout=30).status_code == 200  # reading needs the cookie only
    for method, path in ROUTES[2:]:
        r = s.request(method, server.api(path), json={"path": "nothing.ipynb"}, timeout=30)
        assert r.status_code == 403 and "_xsrf" in r.json()["message"], (method, path, r.text)
        r = s.request(method, server.api(path), json={"path": "nothing.ipynb"},
                      headers={"X-XSRFToken": "not-" + xsrf}, timeout=30)
        assert r.status_code == 403 and "XSRF" in r.json()["message"], (method, path, r.text)
        r = s.request(method, server.api(path), json={"path": "nothing.ipynb"},
                      headers={"X-XSRFToken": xsrf}, timeout=30)
        assert r.status_code == 404, (method, path, r.text)  # through to the handler: no such job/notebook


# --- jobs and tasks -----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_jobs_and_paged_tasks_of_a_real_job(server, local, recorder):
    recorder.attach(local)
    job = local.map_async(fail_on_three, range(25), name="tens", chunksize=2)
    uid = recorder.track(job, tasks=True)
    job.wait(timeout=60)
    got = wait_until(lambda: (j := server.job(uid)) and j["state"] == "failed" and j, what="the job's final row")
    assert got["name"] == "tens" and got["backend"] == "local" and got["family"] == "pool"
    assert got["counts"]["done"] == 24 and got["counts"]["failed"] == 1 and got["total"] == 25
    assert got["finished_tasks"] == 25 and got["rate"] > 0 and got["eta"] is None
    assert got["owner"]["pid"] == os.getpid() and got["owner_text"] == str(st.Owner(**got["owner"]))
    assert got["options"]["chunksize"] == 2 and got["ended"] >= got["created"]
    listed = server.get("jobs").json()["jobs"]
    assert [j["created"] for j in listed] == sorted((j["created"] for j in listed), reverse=True)

    wait_until(lambda: server.get(f"jobs/{uid}/tasks").json()["count"] == 25, what="every task row")
    page = server.get(f"jobs/{uid}/tasks", params={"offset": 10, "limit": 5}).json()
    assert page["count"] == 25 and [t["index"] for t in page["tasks"]] == [10, 11, 12, 13, 14]
    assert all(t["state"] == "done" and t["duration"] >= 0 and t["attempts"] >= 1 for t in page["tasks"])
    failed = server.get(f"jobs/{uid}/tasks", params={"state": "failed"}).json()
    assert failed["count"] == 1 and [t["index"] for t in failed["tasks"]] == [3]
    assert failed["tasks"][0]["error"] == f"ValueError: three is bad {EVIL}"
    assert "fail_on_three" in failed["tasks"][0]["traceback"]
    by_name = server.get("jobs/tens/tasks", params={"limit": 100000}).json()  # a name works too; limit capped
    assert by_name["job"] == uid and by_name["limit"] == 1000 and len(by_name["tasks"]) == 25
    assert server.get(f"jobs/{uid}/tasks", params={"offset": 30}).json()["tasks"] == []

    for params, word in (({"state": "bogus"}, "state"), ({"offset": "x"}, "offset"), ({"offset": -1}, "offset"),
                         ({"limit": 0}, "limit"), ({"offset": 10 ** 30}, "offset"), ({"limit": 10 ** 30}, "limit")):
        r = server.get(f"jobs/{uid}/tasks", params=params)
        assert r.status_code == 400 and word in r.json()["message"], (params, r.text)
    r = server.get("jobs/no-such-job/tasks")
    assert r.status_code == 404 and "no job 'no-such-job'" in r.json()["message"]
    for limit in ("many", -1, 10 ** 30):
        assert server.get("jobs", params={"limit": limit}).status_code == 400
    assert [j["uid"] for j in server.get("jobs", params={"limit": 1}).json()["jobs"]] == [listed[0]["uid"]]


@pytest.mark.timeout(120)
def test_untrusted_text_comes_back_as_json_text(server, local, monkeypatch):
    monkeypatch.setattr(st, "HOST", EVIL)  # the recorder's owner is "on" a host of that name
    rec = st.JobRecorder(Store(server.home))
    rec.attach(local)
    try:
        job = local.map_async(fail_on_three, range(5), name=EVIL)
        uid = rec.track(job, tasks=True)
        job.wait(timeout=60)
        rec.flush()
        wait_until(lambda: server.get(f"jobs/{uid}/tasks").json()["count"] == 5, what="the task rows")
    finally:
        rec.detach(local)
    for path in ("jobs", f"jobs/{uid}/tasks?state=failed"):
        r = server.get(path)
        assert r.headers["Content-Type"].startswith("application/json")
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        assert "<" not in r.text and "\\u003cimg src=x onerror=alert(1)>" in r.text  # escaped, never markup
    got = server.job(uid)
    assert got["name"] == EVIL and got["owner"]["host"] == EVIL and EVIL in got["owner_text"]
    task = server.get(f"jobs/{uid}/tasks?state=failed").json()["tasks"][0]
    assert task["error"] == f"ValueError: three is bad {EVIL}"
    r = server.get(f"jobs/{EVIL}/tasks")  # the name in the URL, too
    assert r.status_code == 200 and r.json()["job"] == uid


# --- cancel and delete --------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_cancel_asks_the_owner_of_a_pool_job_then_delete_forgets_it(server, local, recorder):
    recorder.attach(local)
    job = local.map_async(nap, [0.2] * 400, name="long-pool")   # (40 s on 2 workers)
    uid = recorder.uid(job)
    wait_until(lambda: (j := server.job(uid)) and j["counts"]["done"] > 0, what="the job to run")
    r = server.delete(f"jobs/{uid}")
    assert r.status_code == 409 and "still running" in r.json()["message"]
    asked = time.monotonic()
    r = server.post(f"jobs/{uid}/cancel")
    assert r.status_code == 202 and r.json() == {"job": uid, "requested": True, "how": "owner"}
    assert job.wait(timeout=30), "the owner did not cancel its job"
    # the owner polls the store twice a second: far sooner than the job's
    # own end (the margin is for a loaded machine)
    assert time.monotonic() - asked < 20 * st.FLUSH_INTERVAL
    assert job.counts()["cancelled"] > 0
    got = wait_until(lambda: (j := server.job(uid)) and j["state"] == "cancelled" and j, what="cancelled row")
    assert got["cancel_requested"] is True
    r = server.post(f"jobs/{uid}/cancel")
    assert r.status_code == 409 and "already ended (cancelled)" in r.json()["message"]
    r = server.delete(f"jobs/{uid}")
    assert r.status_code == 200 and r.json() == {"job": uid, "removed": True}
    assert server.job(uid) is None
    assert server.delete(f"jobs/{uid}").status_code == 404
    assert server.post(f"jobs/{uid}/cancel").status_code == 404


@pytest.mark.timeout(120)
def test_a_lost_pool_job_is_not_cancelled_but_can_be_deleted(server, tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import time
        from pymw_magic import Master, store
        master = Master("local", workers=1)
        rec = store.record(master)  # (done for every master once the master module has its hook)
        job = master.map_async(time.sleep, [60] * 2, name="will-be-lost")
        print(rec.uid(job), flush=True)
        job.wait()
    """))
    env = dict(os.environ, PYMW_HOME=str(server.home), PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        uid = proc.stdout.readline().strip()
        wait_until(lambda: (j := server.job(uid)) and j["counts"]["running"] == 1, what="the child's job")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the owner and its workers die at once
        proc.wait(timeout=30)
        proc.stdout.close()
    got = server.job(uid)
    assert got["state"] == "lost" and got["owner"]["pid"] == proc.pid
    r = server.post(f"jobs/{uid}/cancel")
    assert r.status_code == 409 and "lost" in r.json()["message"] and str(proc.pid) in r.json()["message"]
    assert server.delete(f"jobs/{uid}").status_code == 200 and server.job(uid) is None


# --- export -------------------------------------------------------------------------------------
def notebook(*cells: str) -> str:
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                       "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                                  "outputs": [], "source": src} for i, src in enumerate(cells)]})


@pytest.mark.timeout(180)
def test_export_writes_the_script_beside_the_notebook_and_protects_other_files(server):
    d = server.root / "proj"
    d.mkdir()
    (d / "analysis.ipynb").write_text(notebook("xs = [1, 2, 3]", "%%pymw --map x in xs --out ys\nx * 2",
                                               "print(sum(ys))"))
    r = server.post("export", {"path": "proj/analysis.ipynb"})
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "proj/analysis.py", "notebook": "proj/analysis.ipynb", "skipped": [],
                        "overwritten": False}
    script = d / "analysis.py"
    assert "Exported by pymw-magic" in script.read_text()
    assert os.access(script, os.X_OK)
    run = subprocess.run([sys.executable, str(script), "--workers", "1"], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONPATH=ROOT), cwd=str(d))
    assert run.returncode == 0 and run.stdout.split()[-1] == "12", run.stderr
    # a previous export is replaced without asking
    r = server.post("export", {"path": "proj/analysis.ipynb"})
    assert r.status_code == 200 and r.json()["overwritten"] is True
    # a file of the user's is not, unless told
    script.write_text("# my own analysis.py, written by hand\n")
    r = server.post("export", {"path": "proj/analysis.ipynb"})
    assert r.status_code == 409 and r.json()["exists"] is True and "overwrite" in r.json()["message"]
    assert script.read_text() == "# my own analysis.py, written by hand\n"
    r = server.post("export", {"path": "proj/analysis.ipynb", "overwrite": True})
    assert r.status_code == 200 and "Exported by pymw-magic" in script.read_text()
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.timeout(180)
def test_export_lists_unsupported_lines_and_can_comment_them_out(server):
    (server.root / "magic.ipynb").write_text(notebook("x = 1", "%run other.py\ny = 2", "%pip install numpy"))
    r = server.post("export", {"path": "magic.ipynb"})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["unsupported"] is True and "cannot be exported" in body["message"]
    assert [(p["cell"], p["line"], p["source"].strip()) for p in body["problems"]] == \
        [(2, 1, "%run other.py"), (3, 1, "%pip install numpy")]
    assert all(p["reason"] for p in body["problems"])
    assert not (server.root / "magic.py").exists()
    (server.root / "broken.ipynb").write_text("{ not a notebook")
    r = server.post("export", {"path": "broken.ipynb"})
    assert r.status_code == 400 and "broken.ipynb" in r.json()["message"] and r.json()["problems"] == []
    r = server.post("export", {"path": "magic.ipynb", "comment_unsupported": "yes"})
    assert r.status_code == 400 and "comment_unsupported" in r.json()["message"]
    r = server.post("export", {"path": "magic.ipynb", "overwrite": "false"})
    assert r.status_code == 400 and "overwrite" in r.json()["message"]
    r = server.post("export", {"path": "magic.ipynb", "comment_unsupported": True})
    assert r.status_code == 200, r.text
    assert [p["cell"] for p in r.json()["skipped"]] == [2, 3]
    assert "pymw export: SKIPPED" in (server.root / "magic.py").read_text()


def test_export_refuses_paths_outside_the_root(server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.ipynb").write_text(notebook("x = 1"))
    (server.root / "link-out.ipynb").symlink_to(outside / "secret.ipynb")
    (server.root / "dir-out").symlink_to(outside, target_is_directory=True)
    (server.root / "plain.ipynb").write_text(notebook("x = 1"))
    (server.root / "notes.txt").write_text("not a notebook")
    cases = {
        "../outside/secret.ipynb": 403, "sub/../../secret.ipynb": 403, str(outside / "secret.ipynb"): 403,
        "~/secret.ipynb": 403, "link-out.ipynb": 403, "dir-out/secret.ipynb": 403, "a\\..\\b.ipynb": 403,
        "missing.ipynb": 404, "notes.txt": 400, "": 400, "plain.ipynb/x": 404,
    }
    for path, status in cases.items():
        r = server.post("export", {"path": path})
        assert r.status_code == status, (path, r.status_code, r.text)
        assert r.json()["message"]
    assert server.post("export", {"path": 5}).status_code == 400
    r = requests.post(server.api("export"), headers=server.auth, data=b"not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    assert not list(outside.glob("*.py")) and not (server.root / "link-out.py").exists()
    assert not (server.root / "plain.py").exists() and not (server.root / "notes.py").exists()
    # the script's own place, a symlink out: refused, nothing written through it
    (server.root / "plain.py").symlink_to(outside / "planted.py")
    r = server.post("export", {"path": "plain.ipynb", "overwrite": True})
    assert r.status_code == 409 and "symbolic link" in r.json()["message"]
    assert not (outside / "planted.py").exists()


# --- no prefix ----------------------------------------------------------------------------------
def test_the_api_at_the_servers_root_url_and_a_store_that_cannot_be_opened(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    s = start_server(tmp_path, "/", home=tmp_path / "a-file" / "home")
    try:
        for path in ("jobs", "jobs/abc/tasks"):
            r = s.get(path)
            assert r.status_code == 503, r.text
            assert "cannot create the job store" in r.json()["message"] and "PYMW_HOME" in r.json()["message"]
        assert s.post("jobs/abc/cancel").status_code == 503
        assert requests.get(s.api("jobs"), timeout=30).status_code == 403
        assert requests.get(s.url + "user/alice/pymw/api/jobs", headers=s.auth, timeout=30).status_code == 404
    finally:
        stop_server(s)


def test_the_server_module_imports_no_ipython():
    code = "import sys, pymw_magic.server; print(sorted(m for m in sys.modules if m.split('.')[0] == 'IPython'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# --- a batch job: cancelled through its backend, no kernel needed ------------------------------
BATCH_OWNER = """
import os, sys, time
from pymw_magic import Master, store
from pymw_magic.testing.condor import StandInSchedd
master = Master("condor", schedd=StandInSchedd(sys.argv[1]), chunksize=1)
job = master.map_async(time.sleep, [120] * 3, name="batch-to-cancel")
while job.counts()["running"] == 0:
    time.sleep(0.05)
rec = store.recorder()
rec.flush()
print(rec.uid(job), flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(240)
def test_cancel_of_a_batch_job_whose_owner_is_gone_goes_through_its_backend(server, tmp_path):
    pytest.importorskip("htcondor2")
    from pymw_magic.testing.condor import StandInSchedd

    schedd_root = tmp_path / "schedd"
    script = tmp_path / "batch_owner.py"
    script.write_text(BATCH_OWNER)
    env = dict(os.environ, PYMW_HOME=str(server.home), PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, str(script), str(schedd_root)], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        try:
            uid = proc.stdout.readline().strip()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the owner is gone; its procs run on in the schedd
            proc.wait(timeout=30)
            proc.stdout.close()
        assert uid, "the owner printed no job id"
        got = server.job(uid)
        assert got["family"] == "batch" and got["state"] == "active"  # a batch job is never lost
        schedd = StandInSchedd(schedd_root)
        assert schedd.query(), "the procs should still be queued"
        r = server.post(f"jobs/{uid}/cancel")
        assert r.status_code == 202, r.text
        assert r.json()["how"] == "backend"
        wait_until(lambda: not schedd.query(), timeout=60, what="every proc to leave the queue")
        got = wait_until(lambda: (j := server.job(uid)) and j["state"] == "cancelled" and j, timeout=60,
                         what="the job's row to read cancelled")
        assert got["counts"]["cancelled"] == 3 and got["uid"] == uid
        assert [j["uid"] for j in server.get("jobs").json()["jobs"] if j["name"] == "batch-to-cancel"] == [uid]
        r = server.delete(f"jobs/{uid}")
        assert r.status_code == 200 and server.job(uid) is None
    finally:
        StandInSchedd(schedd_root).stop()


def test_jupyter_lists_the_shipped_config_as_enabled_and_valid(tmp_path):
    config = tmp_path / "config" / "jupyter_server_config.d"
    config.mkdir(parents=True)
    shipped = Path(ROOT, "jupyter-config", "jupyter_server_config.d", "pymw_magic.json")
    assert json.loads(shipped.read_text()) == {"ServerApp": {"jpserver_extensions": {"pymw_magic": True}}}
    (config / "pymw_magic.json").write_text(shipped.read_text())
    out = subprocess.run([sys.executable, "-m", "jupyter_server.extension.serverextension", "list"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT, JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
                                  NO_COLOR="1"))
    text = out.stdout + out.stderr
    mine = text[text.index(f"Config dir: {tmp_path / 'config'}"):].split("Config dir:")[1]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", mine)
    assert "pymw_magic enabled" in plain and "Validating pymw_magic..." in plain, text
    assert re.search(r"pymw_magic\s+\S*\s*OK", plain), text


@pytest.mark.timeout(240)
def test_cancel_of_a_batch_job_a_live_process_follows_is_left_to_that_process(server, tmp_path, monkeypatch):
    """Only one process may follow a batch job: while its submitter (or a
    kernel that attached it) follows it, the server asks that process
    through the store instead of attaching it (which failed with 502)."""
    pytest.importorskip("htcondor2")
    from pymw_magic.testing.condor import StandInSchedd

    monkeypatch.setenv("PYMW_HOME", str(server.home))  # this process's masters record in the server's store
    schedd = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=300)
    master = Master("condor", schedd=schedd, chunksize=1)
    try:
        job = master.map_async(by_value(nap), [120] * 3, name="followed-batch")
        wait_until(lambda: job.counts()["running"] >= 1, 120, "a proc running")
        uid = wait_until(lambda: (j := server.job("followed-batch")) and j["uid"], 60, "the job stored")
        # The listing leaves out the engine's bookkeeping (megabytes for a big job, polled each second).
        assert "handle" not in server.job(uid) and st.Store(server.home).job(uid).handle["chunks"]
        r = server.post(f"jobs/{uid}/cancel")
        assert r.status_code == 202, r.text
        assert r.json()["how"] == "follower" and r.json()["pid"] == os.getpid(), r.json()
        # This process learns of the request through the store and cancels its own Job.
        assert job.wait(timeout=60) and job.counts()["cancelled"] == 3, [(t.state, t.error) for t in job.tasks]
        wait_until(lambda: not [ad for ad in schedd.query(projection=["JobStatus"]) if ad["JobStatus"] in (1, 2)],
                   60, "the job's procs to leave the queue")
        wait_until(lambda: server.job(uid)["state"] == "cancelled", 60, "the job's row to read cancelled")
        assert server.post(f"jobs/{uid}/cancel").status_code == 409  # ended: nothing to cancel twice
    finally:
        master.shutdown(wait=True, cancel_futures=True)
        schedd.stop()


@pytest.mark.timeout(240)
def test_a_store_file_deleted_while_the_server_runs(tmp_path):
    """Someone deletes the job store's files (``rm ~/.pymw/jobs.db*``): the
    server answers from a new, empty store (never a 500), and the jobs
    recorded after that appear."""
    server = start_server(tmp_path / "s")
    master = Master("simulator", workers=2)
    rec = st.JobRecorder(Store(server.home))
    rec.attach(master)
    try:
        before = master.map_async(abs, [-1, -2], name="before-delete")
        rec.track(before)
        assert before.wait(timeout=60)
        rec.flush()
        assert server.job("before-delete") is not None
        files = list(server.home.glob("jobs.db*"))
        assert files
        for f in files:
            f.unlink()
        r = server.get("jobs")
        assert r.status_code == 200, r.text
        assert r.json()["jobs"] == []
        after = master.map_async(abs, [-3], name="after-delete")
        rec.track(after)
        assert after.wait(timeout=60)
        rec.flush()
        got = wait_until(lambda: server.job("after-delete"), 60, "the new job listed")
        assert got["state"] == "finished" and server.get(f"jobs/{got['uid']}/tasks").status_code == 200
    finally:
        rec.detach(master)
        master.shutdown(wait=True)
        stop_server(server)
