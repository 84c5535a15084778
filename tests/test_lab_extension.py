"""The JupyterLab extension (labextension/) in a real JupyterLab, driven in
Debian's headless Chromium by Playwright (never ``playwright install``),
and the wheel that ships it prebuilt.

The Lab server runs with the package's server extension (pymw_magic.server)
and a job store of its own (``PYMW_HOME`` in a temp dir): its kernels
record there, and so do the masters this test process runs (a recorder on
that store).  The built extension is found through ``JUPYTER_PATH`` (a
link to ``pymw_magic/labextension``; built first when a source is newer).

Covered: the sidebar lists the jobs of this process and of a kernel, live,
grouped running / finished; its Cancel stops a pool job owned by a kernel
(which learns of it through the store); Show tasks pages a job's tasks;
Remove forgets a finished job; the toolbar's Export writes and opens the
script, which runs; an unsupported magic is listed in a dialog and exported
commented out; the status bar shows the kernel's backend and follows
``%pymw use``; names, hosts and errors holding HTML stay text.  The wheel
(built by ``pip wheel .`` into a temp dir, installed into a throwaway
environment) holds the extension and the server config, and ``jupyter
labextension list`` / ``jupyter server extension list`` show both enabled.

Every wait is on a condition with a timeout; the server and the browser
are stopped after the module, kernels after each test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT as _ROOT
from conftest import wait_until

ROOT = Path(_ROOT)
CHROMIUM = "/usr/bin/chromium"
OUTPUT = ROOT / "test-output"
LABEXT_SOURCE = ROOT / "labextension"
LABEXT_BUILD = ROOT / "pymw_magic" / "labextension"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (make test installs Debian's chromium)", allow_module_level=True)
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the test extra has it)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra has it)")
nbformat = pytest.importorskip("nbformat")
expect = sync_api.expect

from pymw_magic import Master  # noqa: E402
from pymw_magic import store as st  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Markup from machines we do not control: it must show as text, never run.
EVIL_NAME = "<img src=x onerror=alert(1)>"
EVIL = '<img src=x onerror="window.__pymwXss=(window.__pymwXss||0)+1">'


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"bad input {EVIL}")
    return x


def slow_then_gated(x, gate):
    """Takes 0.25 s; tasks from 100 on also wait for the file ``gate`` (at most 120 s)."""
    time.sleep(0.25)
    deadline = time.monotonic() + 120
    while x >= 100 and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return x


# --- the extension's build ----------------------------------------------------------------
def _sources() -> list[Path]:
    files = [p for d in ("src", "style") for p in (LABEXT_SOURCE / d).rglob("*") if p.is_file()]
    return files + [LABEXT_SOURCE / n for n in ("package.json", "yarn.lock", "tsconfig.json")]


@pytest.fixture(scope="session")
def built_extension() -> Path:
    """pymw_magic/labextension, built now if missing or older than a source
    (``make test`` builds it at install; a plain pytest run may not have)."""
    marker = LABEXT_BUILD / "package.json"
    newest = max(p.stat().st_mtime for p in _sources())
    if marker.exists() and marker.stat().st_mtime >= newest:
        return LABEXT_BUILD
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: the JupyterLab extension cannot be built (make test needs it)")
    bindir = Path(sys.executable).parent
    jlpm = bindir / "jlpm" if (bindir / "jlpm").exists() else shutil.which("jlpm")
    assert jlpm, "jlpm (from jupyterlab or jupyter_builder) is missing: pip install -e '.[test]'"
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    for step, timeout in (("install", 1200), ("build:prod", 900)):
        cmd = [str(jlpm), step] if step == "install" else [str(jlpm), "run", step]
        run = subprocess.run(["nice", "-n", "10", *cmd], cwd=LABEXT_SOURCE, env=env, capture_output=True,
                             text=True, timeout=timeout)
        assert run.returncode == 0, f"jlpm {step} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert marker.exists(), "the build wrote no pymw_magic/labextension/package.json"
    return LABEXT_BUILD


# --- a JupyterLab of its own --------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str       # http://127.0.0.1:PORT, then the base URL without its last "/"
    token: str
    work: Path     # the server's root directory
    home: Path     # its PYMW_HOME: the job store the sidebar reads
    log: Path

    def api(self, path: str, method: str = "GET") -> object:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def page_url(self, path: str = "") -> str:
        return f"{self.url}/lab{'/tree/' + path if path else ''}?reset&token={self.token}"

    def delete_sessions(self) -> None:
        for session in self.api("/api/sessions") or []:  # type: ignore[union-attr]
            self.api(f"/api/sessions/{session['id']}", method="DELETE")


@contextlib.contextmanager
def running_lab(tmp: Path, built: Path, base_url: str = "/"):
    """A JupyterLab server of its own on a free port: the built extension on
    its JUPYTER_PATH, the server extension enabled, its own job store."""
    port, token = _free_port(), secrets.token_hex(16)
    jupyter = tmp / "jupyter"
    work, home, settings, config = tmp / "work", tmp / "pymw-home", jupyter / "settings", jupyter / "config"
    extensions = jupyter / "path" / "labextensions"
    for d in (work, home, settings, config, extensions):
        d.mkdir(parents=True)
    (extensions / "pymw-magic").symlink_to(built, target_is_directory=True)
    # The server extension as the wheel's jupyter-config enables it.
    shutil.copy(ROOT / "jupyter-config" / "jupyter_server_config.d" / "pymw_magic.json",
                config / "jupyter_server_config.json")
    (settings / "overrides.json").write_text(json.dumps({"@jupyterlab/apputils-extension:notification": {
        "checkForUpdates": False, "fetchNews": "false"}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(jupyter / "data"),
               JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"), IPYTHONDIR=str(jupyter / "ipython"),
               JUPYTER_PATH=str(jupyter / "path"), PYMW_HOME=str(home),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
           "--ServerApp.port_retries=0", f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}",
           f"--ServerApp.base_url={base_url}", f"--LabApp.app_settings_dir={settings}",
           # window.jupyterapp: a test can add a contents drive, as jupyter-collaboration does
           "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = tmp / "lab.log"
    log = open(log_path, "wb")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    it = Lab(f"http://127.0.0.1:{port}{base_url.rstrip('/')}", token, work, home, log_path)
    try:
        def answers() -> bool:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                it.api("/api/status")
                return True
            except OSError:
                return False
        wait_until(answers, timeout=120, what="JupyterLab to answer")
        yield it
    finally:
        try:
            it.delete_sessions()
        except OSError:
            pass
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, built_extension):
    with running_lab(tmp_path_factory.mktemp("lab"), built_extension) as it:
        try:
            yield it
        finally:  # the server's log, for a failure's story
            OUTPUT.mkdir(exist_ok=True)
            shutil.copy(it.log, OUTPUT / "lab_extension_server.log")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watch:
    """What a page did that it must not: dialogs, requests for ``x``;
    uncaught errors (exceptions and unhandled rejections) and what it
    logged as an error, for tests that assert there were none."""
    dialogs: list
    requests: list
    uncaught: list = field(default_factory=list)
    console_errors: list = field(default_factory=list)


@pytest.fixture
def page(lab, browser, request):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    pg = context.new_page()
    watch = Watch([], [])
    pg.on("dialog", lambda d: (watch.dialogs.append(d.message), d.dismiss()))
    pg.on("request", lambda r: watch.requests.append(r.url))
    pg.on("pageerror", lambda e: watch.uncaught.append(f"{e.name}: {e.message}\n{e.stack}"))
    pg.on("console", lambda m: watch.console_errors.append(m.text) if m.type == "error" else None)
    pg.watch = watch
    OUTPUT.mkdir(exist_ok=True)
    def shot(suffix: str) -> None:
        if context.pages:  # the test may have moved on to another page
            context.pages[-1].screenshot(path=str(OUTPUT / f"lab_extension_{request.node.name}{suffix}.png"))
    try:
        yield pg
        shot("")
    except Exception:
        shot("_failed")
        raise
    finally:
        context.close()
        try:
            lab.delete_sessions()
        except OSError:
            pass


def _notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)


def _open_notebook(page, lab: Lab, name: str) -> None:
    # Connected to the kernel before the first Shift+Enter, or it may be dropped.
    with page.expect_websocket(lambda ws: "/api/kernels/" in ws.url, timeout=120_000):
        page.goto(lab.page_url(name))
    page.locator("text=Idle >> visible=true").first.wait_for(timeout=120_000)


def _run_cell(page, index: int) -> None:
    page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def _open_sidebar(page):
    panel = page.locator("#pymw-jobs")
    if not panel.is_visible():
        page.locator('.jp-SideBar li[data-id="pymw-jobs"]').click()
    panel.wait_for(state="visible", timeout=30_000)
    return panel


def _path(request_or_response) -> str:
    """The URL's path: JupyterLab adds a query (against caches) to every API request."""
    return urllib.parse.urlsplit(request_or_response.url).path


def _row(panel, uid: str):
    return panel.locator(f'li.pymw-sidebar-job[data-uid="{uid}"]')


def _evil_python(tmp: Path) -> str:
    """An interpreter for the local backend's workers that runs the real
    worker on a "host" named with markup (as a volunteer machine could)."""
    boot = tmp / "evil_host_worker.py"
    boot.write_text(
        "import runpy, socket, sys\n"
        f"socket.gethostname = lambda: {EVIL!r}\n"
        "assert sys.argv[1:3] == ['-m', 'pymw_magic.worker'], sys.argv\n"
        "sys.argv = ['pymw_magic.worker'] + sys.argv[3:]\n"
        "runpy.run_module('pymw_magic.worker', run_name='__main__', alter_sys=True)\n")
    wrapper = tmp / "evil-python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {boot} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


# --- the sidebar: this process's jobs, live; tasks; remove; hostile text ------------------------
@pytest.mark.timeout(600)
def test_sidebar_lists_jobs_live_shows_tasks_removes_and_keeps_markup_as_text(lab, page, tmp_path):
    recorder = st.JobRecorder(st.Store(lab.home))
    master = Master("local", workers=2, python=_evil_python(tmp_path))
    recorder.attach(master)
    try:
        evil = master.map_async(fail_on_three, range(5), name=EVIL_NAME)
        evil_uid = recorder.track(evil, tasks=True)
        evil.wait(timeout=120)
        recorder.flush()

        page.goto(lab.page_url())
        panel = _open_sidebar(page)
        row = _row(panel, evil_uid)
        expect(row).to_have_class(re.compile(r"pymw-sidebar-job-failed"), timeout=60_000)
        # In the finished group, with its backend, counts and where it came from.
        expect(panel.locator(".pymw-sidebar-finished").locator(f'[data-uid="{evil_uid}"]')).to_have_count(1)
        expect(row.locator(".pymw-sidebar-name")).to_have_text(EVIL_NAME)
        expect(row.locator(".pymw-sidebar-backend")).to_have_text("local")
        expect(row.locator(".pymw-sidebar-counts")).to_have_text("done 4, failed 1 (of 5)")
        owner = st.Store(lab.home).job(evil_uid).owner  # this process: a script (pytest's) or python
        expected = f"script {Path(owner.script).name}" if owner.script else f"python (pid {os.getpid()} on {owner.host})"
        expect(row.locator(".pymw-sidebar-origin")).to_have_text(expected)
        assert f"pid {os.getpid()} on {owner.host}" in row.locator(".pymw-sidebar-origin").get_attribute("title")
        # The bar is split by state in the inline widget's colours.
        assert row.locator(".pymw-seg-done").evaluate("e => getComputedStyle(e).backgroundColor") \
            == "rgb(76, 120, 168)"
        assert row.locator(".pymw-seg-failed").evaluate("e => e.style.width") == "20%"
        expect(row.get_by_role("button", name="Cancel")).to_be_hidden()
        expect(row.get_by_role("button", name="Attach in this notebook")).to_be_hidden()  # a pool job

        # A job that runs now appears under Running and its counts move.
        # (its last tasks wait for a gate: on a loaded machine the job would
        # otherwise end before the sidebar showed it running)
        gate = tmp_path / "live-gate"
        live = master.map_async(slow_then_gated, range(120), [str(gate)] * 120, name="live-squares", chunksize=1)
        live_uid = recorder.uid(live)
        live_row = _row(panel, live_uid)
        running = panel.locator(".pymw-sidebar-running").locator(f'[data-uid="{live_uid}"]')
        expect(running).to_have_count(1, timeout=60_000)
        seen = set()

        def moved() -> bool:
            if live.done():
                return False
            counts = live_row.locator(".pymw-sidebar-counts").inner_text()
            if "done" in counts:
                seen.add(counts)
            return len(seen) >= 2
        wait_until(moved, timeout=120, what="the running job's counts to change in the sidebar")
        assert re.search(r"[\d.]+ tasks/s \u00b7 .+ \u00b7 ETA ", live_row.locator(".pymw-sidebar-stats").inner_text())
        expect(live_row.get_by_role("button", name="Cancel")).to_be_visible()
        page.screenshot(path=str(OUTPUT / "lab_extension_sidebar_running.png"))
        gate.touch()
        assert live.wait(timeout=180)
        finished = panel.locator(".pymw-sidebar-finished").locator(f'[data-uid="{live_uid}"]')
        expect(finished).to_have_count(1, timeout=60_000)
        expect(live_row.locator(".pymw-sidebar-counts")).to_have_text("done 120 (of 120)")
        expect(live_row.locator(".pymw-sidebar-state")).to_have_text("finished")

        # Show tasks: a paged table of the failed job, every field as text.
        row.get_by_role("button", name="Show tasks").click()
        view = page.locator(f"#pymw-tasks-{evil_uid}")
        table = view.locator(".pymw-task-table")
        expect(table.locator("tbody tr")).to_have_count(5, timeout=60_000)
        expect(view.locator(".pymw-tasks-range")).to_have_text("tasks 1\u20135 of 5")
        failed = table.locator("tr.pymw-task-failed")
        expect(failed.locator(".pymw-task-error summary")).to_have_text(f"ValueError: bad input {EVIL}")
        failed.locator(".pymw-task-error summary").click()  # the traceback, as text
        expect(failed.locator(".pymw-task-traceback")).to_contain_text(f"bad input {EVIL}")
        for i in range(5):
            expect(table.locator(".pymw-task-host").nth(i)).to_have_text(EVIL)
        expect(table.locator(".pymw-task-attempts").first).to_have_text("1")
        durations = table.locator(".pymw-task-duration").all_inner_texts()
        stored = [(t.index, t.state, t.started, t.finished) for t in st.Store(lab.home).tasks(evil_uid)]
        assert all(re.fullmatch(r"\d+\.\d s|\d+:\d\d min", d) for d in durations), (durations, stored)
        view.locator("select.pymw-tasks-filter").select_option("failed")
        expect(table.locator("tbody tr")).to_have_count(1, timeout=30_000)
        expect(view.locator(".pymw-tasks-range")).to_have_text("tasks 1\u20131 of 1")
        page.screenshot(path=str(OUTPUT / "lab_extension_tasks.png"))

        # Nothing of the markup ran: no element made of it, no request for x, no dialog.
        assert page.locator("#pymw-jobs img, .pymw-tasks img").count() == 0
        assert page.evaluate("window.__pymwXss") is None
        assert not [u for u in page.watch.requests if re.search(r"/x(\?|$)", u)], page.watch.requests
        assert page.watch.dialogs == []

        # Remove (finished jobs only), after a confirmation that names the job as text.
        _open_sidebar(page)
        expect(live_row.get_by_role("button", name="Remove")).to_be_visible()
        row.get_by_role("button", name="Remove").click()
        dialog = page.locator(".jp-Dialog")
        expect(dialog).to_contain_text(f"Remove the finished job {EVIL_NAME}")
        dialog.get_by_role("button", name="Remove").click()
        expect(row).to_have_count(0, timeout=30_000)
        with pytest.raises(st.UnknownJob):
            st.Store(lab.home).job(evil_uid)
        assert st.Store(lab.home).job(live_uid).state == "finished"
        assert page.evaluate("window.__pymwXss") is None and page.watch.dialogs == []
    finally:
        recorder.detach(master)
        master.shutdown(wait=True, cancel_futures=True)


# --- a kernel's job: cancelled from the sidebar; the status bar ------------------------------------
@pytest.mark.timeout(600)
def test_cancel_in_the_sidebar_stops_a_kernels_job_and_the_status_bar_follows_pymw_use(lab, page):
    _notebook(lab.work / "kernel.ipynb",
              "%load_ext pymw_magic\n%pymw use local --workers 2",
              "%%pymw --map x in range(40) --out partial --name sleepy --chunksize 1\n"
              "import time\ntime.sleep(0.1 if x < 4 else 60)\nx",
              "%pymw use local --workers 3")
    _open_notebook(page, lab, "kernel.ipynb")
    status = page.locator(".pymw-status")
    expect(status).to_have_text("pymw: no master", timeout=60_000)  # asked of the kernel: nothing loaded
    _run_cell(page, 0)
    expect(status).to_have_text("pymw: local \u00b7 2 workers", timeout=120_000)

    panel = _open_sidebar(page)
    _run_cell(page, 1)
    row = panel.locator(".pymw-sidebar-running li.pymw-sidebar-job").filter(
        has=page.locator(".pymw-sidebar-name", has_text=re.compile("^sleepy$")))
    expect(row.locator(".pymw-sidebar-counts")).to_contain_text("done 4", timeout=120_000)
    expect(row.locator(".pymw-sidebar-origin")).to_have_text("notebook kernel.ipynb")
    uid = row.get_attribute("data-uid")
    assert st.Store(lab.home).job(uid).owner.kind == "kernel"
    page.screenshot(path=str(OUTPUT / "lab_extension_kernel_job.png"))
    clicked = time.monotonic()
    row.get_by_role("button", name="Cancel").click()
    # The kernel learns of it through the store and cancels its own Job.
    cell = page.locator(".jp-Notebook .jp-Cell").nth(1)
    cell.get_by_text("was cancelled: ").wait_for(timeout=60_000)
    took = time.monotonic() - clicked
    assert "CancelledError" in cell.locator(".jp-OutputArea").inner_text()
    done = _row(panel, uid)
    expect(panel.locator(".pymw-sidebar-finished").locator(f'[data-uid="{uid}"]')).to_have_count(1, timeout=60_000)
    expect(done.locator(".pymw-sidebar-state")).to_have_text("cancelled")
    rec = st.Store(lab.home).job(uid)
    assert rec.state == "cancelled" and rec.counts["done"] >= 4 and rec.counts["cancelled"] > 0, rec
    print(f"cancel: click to the kernel's cell saying so: {took:.1f} s")

    # While the sidebar is hidden it asks nothing, even while a kernel runs a cell.
    page.locator('.jp-SideBar li[data-id="filebrowser"]').click()
    expect(panel).to_be_hidden(timeout=30_000)
    asked = [u for u in page.watch.requests if "/pymw/api/jobs" in u]
    # %pymw use changes the kernel's master: the status bar follows.
    _run_cell(page, 2)
    expect(status).to_have_text("pymw: local \u00b7 3 workers", timeout=120_000)
    assert [u for u in page.watch.requests if "/pymw/api/jobs" in u] == asked
    # Clicking the status item opens the sidebar, which asks at once.
    with page.expect_request(lambda r: "/pymw/api/jobs" in r.url, timeout=30_000):
        status.click()
    expect(panel).to_be_visible(timeout=30_000)


# --- a kernel that dies: the status bar and the sidebar stay quiet ----------------------------------
@pytest.mark.timeout(600)
def test_a_dead_kernel_leaves_no_uncaught_error_in_the_browser(lab, page):
    """The status bar asks the current kernel after each cell and when the
    notebook becomes current again.  A kernel connection that learnt its
    kernel is gone (culled, shut down elsewhere: JupyterLab calls its
    ``handleShutdown()`` when the server no longer has the kernel) stays
    the session's kernel for a while, with status "dead"; asking it throws
    at once ("Kernel is dead"), which escaped as an unhandled rejection."""
    _notebook(lab.work / "dies.ipynb", "%load_ext pymw_magic\n%pymw use simulator --workers 2", "print('after')")
    _notebook(lab.work / "other.ipynb", "print('other')")
    _open_notebook(page, lab, "dies.ipynb")
    panel = _open_sidebar(page)  # the sidebar polls meanwhile
    status = page.locator(".pymw-status")
    _run_cell(page, 0)
    expect(status).to_have_text("pymw: simulator \u00b7 2 workers", timeout=120_000)
    (kernel,) = [s["kernel"]["id"] for s in lab.api("/api/sessions") if s["path"].endswith("dies.ipynb")]
    lab.api(f"/api/kernels/{kernel}", method="DELETE")  # another client shuts it down
    dead = page.evaluate("""() => {
      const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
      kernel.handleShutdown();  // what JupyterLab does once it finds the kernel gone
      return [kernel.status, window.jupyterapp.shell.currentWidget.sessionContext.session.kernel === kernel];
    }""")
    assert dead == ["dead", True], dead
    expect(status).to_have_text("pymw: no master", timeout=60_000)
    # A cell run in the dead kernel, then the notebook current again: both ask the kernel.
    _run_cell(page, 1)
    page.locator('.jp-SideBar li[data-id="filebrowser"]').click()
    page.locator(".jp-DirListing-item", has_text="other.ipynb").dblclick()
    page.locator(".lm-TabBar-tab.lm-mod-current", has_text="other.ipynb").wait_for(timeout=60_000)
    page.locator(".lm-TabBar-tab", has_text="dies.ipynb").click()
    page.locator(".lm-TabBar-tab.lm-mod-current", has_text="dies.ipynb").wait_for(timeout=60_000)
    expect(status).to_have_text("pymw: no master", timeout=60_000)
    # What the page does next comes after those probes: the sidebar's next answer.
    _open_sidebar(page)
    with page.expect_response(lambda r: "/pymw/api/jobs" in r.url, timeout=30_000):
        panel.get_by_role("button", name="Refresh").click()
    # JupyterLab's own cell run in the dead kernel fails uncaught too (not ours): ours
    # are the errors whose stack passes through this extension's code.
    (OUTPUT / "lab_extension_dead_kernel_errors.txt").write_text("\n---\n".join(page.watch.uncaught))
    ours = [e for e in page.watch.uncaught if "/extensions/pymw-magic/" in e]
    assert ours == [], ours


# --- a store with many jobs -------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_a_store_with_many_jobs_shows_the_newest_and_every_running_one(lab, page):
    recorder = st.JobRecorder(st.Store(lab.home))
    master = Master("local", workers=2)
    recorder.attach(master)
    uids: list[str] = []
    try:
        old = master.map_async(time.sleep, [600], name="old-running")
        old_uid = recorder.uid(old)
        uids.append(old_uid)
        tiny = [master.map_async(abs, [-i], name=f"tiny-{i}") for i in range(300)]
        uids += [recorder.uid(j) for j in tiny]
        assert all(j.wait(timeout=300) for j in tiny)
        recorder.flush()
        page.goto(lab.page_url())
        panel = _open_sidebar(page)
        expect(panel.locator(".pymw-sidebar-group-title").nth(1)).to_have_text("Finished (300)", timeout=60_000)
        expect(panel.locator(".pymw-sidebar-running").locator(f'[data-uid="{old_uid}"]')).to_have_count(1)
        expect(panel.locator(".pymw-sidebar-message")).to_contain_text("The 300 newest jobs and every running one")
        # Its owner (this process) cancels it when asked through the store.
        _row(panel, old_uid).get_by_role("button", name="Cancel").click()
        assert old.wait(timeout=60) and old.counts()["cancelled"] == 1
        # Ended, it is older than the 300 newest: no longer listed.
        expect(_row(panel, old_uid)).to_have_count(0, timeout=60_000)
        assert st.Store(lab.home).job(old_uid).state == "cancelled"
        # The next page of older jobs: every one of the store (the earlier tests' too), nothing more to show.
        panel.get_by_role("button", name="Show older jobs").click()
        expect(panel.locator(".pymw-sidebar-finished").locator(f'[data-uid="{old_uid}"]')).to_have_count(
            1, timeout=60_000)
        expect(_row(panel, old_uid).locator(".pymw-sidebar-state")).to_have_text("cancelled")
        stored = len(st.Store(lab.home).jobs())
        assert 301 <= stored < 600
        expect(panel.locator("li.pymw-sidebar-job")).to_have_count(stored)
        expect(panel.get_by_role("button", name="Show older jobs")).to_be_hidden()
        expect(panel.locator(".pymw-sidebar-message")).to_be_hidden()
    finally:
        recorder.detach(master)
        master.shutdown(wait=True, cancel_futures=True)
        store = st.Store(lab.home)
        for uid in uids:  # the other tests' sidebar stays short
            store.remove(uid, force=True)


# --- a hostile user: races, double clicks, a very long name -----------------------------------------
@pytest.mark.timeout(600)
def test_races_double_clicks_and_a_very_long_name(lab, page, tmp_path):
    """The sidebar's copy of a job can be a poll behind the store: a Cancel
    of a job that ended meanwhile, a Remove of a job another page removed,
    say nothing (before: an error dialog); a double click sends one request;
    a job removed while its task table is open says so and is not asked
    again; a name of 600 letters without a space keeps the row in the panel."""
    recorder = st.JobRecorder(st.Store(lab.home))
    master = Master("local", workers=2)
    recorder.attach(master)
    gate = tmp_path / "gate"
    long_name = "n" * 600
    try:
        longjob = master.map_async(abs, [-1, -2], name=long_name)
        long_uid = recorder.track(longjob, tasks=True)
        assert longjob.wait(timeout=120)  # (before the gated tasks: a worker may take tasks of both at once)
        gated = master.map_async(wait_gate, [(str(gate), i) for i in range(2)], name="ends-meanwhile", chunksize=1)
        gated_uid = recorder.track(gated, tasks=True)
        recorder.flush()
        page.goto(lab.page_url())
        panel = _open_sidebar(page)
        long_row, gated_row = _row(panel, long_uid), _row(panel, gated_uid)
        expect(long_row.locator(".pymw-sidebar-state")).to_have_text("finished", timeout=60_000)
        expect(gated_row.locator(".pymw-sidebar-state")).to_have_text("active", timeout=60_000)
        # The long name is cut, the row stays in the panel, its state and backend in view.
        assert panel.evaluate("e => e.scrollWidth <= e.clientWidth"), "the panel scrolls sideways"
        right = panel.bounding_box()["x"] + panel.bounding_box()["width"]
        backend = long_row.locator(".pymw-sidebar-backend").bounding_box()
        assert backend["x"] + backend["width"] <= right, (backend, right)
        assert long_row.locator(".pymw-sidebar-name").get_attribute("title").startswith(long_name)

        # The page's list stops moving (as if a poll behind): the job ends meanwhile.
        stale = json.dumps(lab.api("/pymw/api/jobs?limit=301"))
        listing = re.compile(r"/pymw/api/jobs(\?|$)")
        page.route(listing, lambda route: route.fulfill(status=200, content_type="application/json", body=stale))
        gate.write_text("open")
        assert gated.wait(timeout=120)
        recorder.flush()
        assert st.Store(lab.home).job(gated_uid).state == "finished"
        cancels: list = []
        page.on("request", lambda r: cancels.append(r.url) if _path(r).endswith(f"/jobs/{gated_uid}/cancel") else None)
        with page.expect_response(lambda r: _path(r).endswith(f"/jobs/{gated_uid}/cancel"), timeout=30_000) as answer:
            gated_row.get_by_role("button", name="Cancel").dblclick()
        assert answer.value.status == 409
        # Its Show tasks, then the job removed by someone else, then Remove here.
        long_row.get_by_role("button", name="Show tasks").click()
        view = page.locator(".pymw-tasks").filter(has=page.locator(".pymw-tasks-title", has_text=long_uid[:8]))
        expect(view.locator(".pymw-task-table tbody tr")).to_have_count(2, timeout=60_000)
        expect(view.locator(".pymw-tasks-title")).to_contain_text(long_name)
        assert view.evaluate("e => e.scrollWidth <= e.clientWidth"), "the task table's title scrolls sideways"
        assert st.Store(lab.home).remove(long_uid)
        _open_sidebar(page)
        long_row.get_by_role("button", name="Remove").dblclick()
        dialog = page.locator(".jp-Dialog")
        expect(dialog).to_have_count(1)
        expect(dialog.locator(".jp-Dialog-body")).to_contain_text(long_name)
        assert dialog.locator(".jp-Dialog-body").evaluate("e => e.scrollWidth <= e.clientWidth")  # it wraps
        with page.expect_response(lambda r: _path(r).endswith(f"/jobs/{long_uid}") and r.request.method == "DELETE",
                                  timeout=30_000) as answer:
            dialog.get_by_role("button", name="Remove").click()
        assert answer.value.status == 404
        page.unroute(listing)
        expect(long_row).to_have_count(0, timeout=60_000)
        expect(panel.locator(".pymw-sidebar-finished").locator(f'[data-uid="{gated_uid}"]')).to_have_count(1,
                                                                                                     timeout=60_000)
        expect(page.locator(".jp-Dialog")).to_have_count(0)  # neither race said anything
        assert len(cancels) == 1, cancels  # the double click sent one request
        # The task table of the removed job, shown again, says so, and stops asking.
        page.locator(".lm-DockPanel .lm-TabBar-addButton").first.click()  # a launcher in front of it
        expect(view).to_be_hidden(timeout=30_000)
        page.locator(".lm-TabBar-tab", has_text="Tasks: n").click()
        expect(view.locator(".pymw-tasks-note")).to_have_text(re.compile("is no longer in the job store"),
                                                               timeout=60_000)
        with pytest.raises(sync_api.TimeoutError):
            page.wait_for_event("request", predicate=lambda r: f"/jobs/{long_uid}/tasks" in r.url, timeout=6_000)
        assert page.watch.dialogs == []
    finally:
        gate.write_text("open")
        page.unroute_all()
        master.shutdown(wait=True, cancel_futures=True)
        recorder.flush()  # the jobs' ends recorded: no row left "active" for the next tests
        recorder.detach(master)


# --- a batch job: attached in a notebook, cancelled through its backend --------------------------
@pytest.mark.timeout(600)
def test_attach_in_this_notebook_and_cancel_a_batch_job_without_its_owner(lab, page, tmp_path, monkeypatch):
    htcondor2 = pytest.importorskip("htcondor2", reason="the condor extra (make test installs it)")
    del htcondor2
    from pymw_magic.testing.condor import StandInSchedd

    monkeypatch.setenv("PYMW_HOME", str(lab.home))  # this process's masters record in the Lab's store
    schedd = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=300)
    master = Master("condor", schedd=schedd, chunksize=1)
    try:
        job = master.map_async(time.sleep, [0.1] + [120] * 3, name="batchsleep")
        wait_until(lambda: job.counts()["done"] >= 1, 180, "the first proc done")
        uid = st.Store(lab.home).job("batchsleep").uid
        master.detach()  # its owner lets go (as at its exit): the job runs on, owned by nobody
        _notebook(lab.work / "attach.ipynb", "print('a notebook to attach in')")
        _open_notebook(page, lab, "attach.ipynb")
        panel = _open_sidebar(page)
        row = _row(panel, uid)
        expect(panel.locator(".pymw-sidebar-running").locator(f'[data-uid="{uid}"]')).to_have_count(1,
                                                                                                 timeout=60_000)
        expect(row.locator(".pymw-sidebar-backend")).to_have_text("condor")
        # Attach: a cell that loads the extension and attaches, run in this notebook's kernel.
        row.get_by_role("button", name="Attach in this notebook").click()
        cells = page.locator(".jp-Notebook .jp-Cell")
        expect(cells).to_have_count(2, timeout=60_000)
        expect(cells.nth(1).locator(".jp-InputArea-editor")).to_contain_text("%pymw attach batchsleep")
        cells.nth(1).get_by_text("pymw: attached job 'batchsleep'").wait_for(timeout=120_000)
        # The kernel has no default master, only the attached job's: the status bar shows its backend.
        expect(page.locator(".pymw-status")).to_have_text(re.compile(r"^pymw: condor( \u00b7 \d+ workers?)?$"),
                                                          timeout=60_000)
        page.screenshot(path=str(OUTPUT / "lab_extension_attached.png"))
        # Cancel: the kernel follows the job now (one follower at a time), so
        # the server asks it through the store; it cancels (the schedd's procs go).
        with page.expect_response(lambda r: _path(r).endswith(f"/pymw/api/jobs/{uid}/cancel"),
                                  timeout=60_000) as answer:
            row.get_by_role("button", name="Cancel").click()
        assert answer.value.status == 202 and answer.value.json()["how"] == "follower", answer.value.text()
        expect(panel.locator(".pymw-sidebar-finished").locator(f'[data-uid="{uid}"]')).to_have_count(1,
                                                                                                  timeout=120_000)
        expect(row.locator(".pymw-sidebar-state")).to_have_text("cancelled")
        expect(page.locator(".jp-Dialog")).to_have_count(0)  # no "Cannot cancel" in the way

        def gone() -> bool:
            return not [ad for ad in schedd.query(projection=["JobStatus", "Iwd"]) if ad["JobStatus"] in (1, 2)]
        wait_until(gone, 120, "the batch job's procs removed from the schedd")
        # The attached Job in the kernel ended as well.
        code = "print('attached ends:', _pymw_job.wait(60), _pymw_job.counts()['cancelled'])"
        page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-InputArea-editor").click()
        page.keyboard.press("Escape")
        page.keyboard.press("b")  # a new cell below, in command mode
        page.keyboard.press("Enter")
        page.keyboard.insert_text(code)
        page.keyboard.press("Shift+Enter")
        page.get_by_text(re.compile(r"attached ends: True [1-9]")).wait_for(timeout=120_000)
    finally:
        master.shutdown(wait=True, cancel_futures=True)
        schedd.stop()


def wait_gate(arg):
    """Hold a task until the test opens the gate (a file), at most 5 minutes."""
    gate, x = arg
    deadline = time.monotonic() + 300
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return x


# --- the task table once its job ends, the sidebar collapsed --------------------------------------
@pytest.mark.timeout(600)
def test_the_task_table_stops_asking_once_its_job_ends_while_the_sidebar_is_hidden(lab, page, tmp_path):
    """The table learns that its job ended from the store itself, not from
    the sidebar's copy (frozen while the sidebar is collapsed), and stops
    polling: before, it asked every 2 s for as long as it was shown."""
    recorder = st.JobRecorder(st.Store(lab.home))
    master = Master("local", workers=2)
    recorder.attach(master)
    gate = tmp_path / "gate"
    try:
        job = master.map_async(wait_gate, [(str(gate), i) for i in range(4)], name="gated", chunksize=1)
        uid = recorder.track(job, tasks=True)
        recorder.flush()
        page.goto(lab.page_url())
        panel = _open_sidebar(page)
        expect(panel.locator(".pymw-sidebar-running").locator(f'[data-uid="{uid}"]')).to_have_count(1,
                                                                                                 timeout=60_000)
        _row(panel, uid).get_by_role("button", name="Show tasks").click()
        view = page.locator(".pymw-tasks").filter(has=page.locator(".pymw-tasks-title", has_text=uid[:8]))
        table = view.locator(".pymw-task-table")
        expect(table.locator("tbody tr")).to_have_count(4, timeout=60_000)
        expect(page.locator(f'[id="pymw-tasks-{uid}"]')).to_have_count(1)  # one node has the tab's id
        # The user collapses the sidebar for room: its poll stands by.
        page.locator('.jp-SideBar li[data-id="pymw-jobs"]').click()
        expect(panel).to_be_hidden(timeout=30_000)
        gate.write_text("open")
        assert job.wait(timeout=120)
        recorder.flush()
        expect(table.locator("tr.pymw-task-done")).to_have_count(4, timeout=60_000)

        def asks_tasks(r) -> bool:
            return f"/jobs/{uid}/tasks" in r.url
        # At most one more request (the poll that sees the job ended), then
        # none: it asked every 2 s while the job ran.
        with contextlib.suppress(sync_api.TimeoutError):
            page.wait_for_event("request", predicate=asks_tasks, timeout=8_000)
        with pytest.raises(sync_api.TimeoutError):
            page.wait_for_event("request", predicate=asks_tasks, timeout=8_000)
        expect(view.locator(".pymw-tasks-state")).to_have_text("finished")
    finally:
        gate.write_text("open")
        recorder.detach(master)
        master.shutdown(wait=True, cancel_futures=True)


# --- Attach: the cell names that job, whatever its name ---------------------------------------------
@pytest.mark.timeout(600)
def test_attach_names_the_job_itself_whatever_its_name(lab, page, tmp_path, monkeypatch):
    """A name `%pymw attach` would read as something else (the start of
    another job's id, an option) or as code (a newline, a `;`) is not
    written into the cell: the job's id is."""
    htcondor2 = pytest.importorskip("htcondor2", reason="the condor extra (make test installs it)")
    del htcondor2
    from pymw_magic.testing.condor import StandInSchedd

    monkeypatch.setenv("PYMW_HOME", str(lab.home))
    schedd = StandInSchedd(tmp_path / "schedd", slots=2, idle_timeout=300)
    master = Master("condor", schedd=schedd, chunksize=1)
    pwned = lab.work / "PWNED"
    try:
        other = master.map_async(abs, [-1], name="other-job")
        assert other.wait(timeout=180)
        store = st.Store(lab.home)
        wait_until(lambda: [r for r in store.jobs() if r.name == "other-job"], 60, "other-job stored")
        other_uid = next(r.uid for r in store.jobs() if r.name == "other-job")
        names = [other_uid[:8], "-dashed", f"evil; import os\nos.system('touch {pwned}')"]
        jobs = [master.map_async(abs, [-2], name=n) for n in names]
        assert all(j.wait(timeout=180) for j in jobs)

        def stored() -> dict:
            by_name = {r.name: r.uid for r in store.jobs() if r.name in names}
            return by_name if len(by_name) == len(names) else {}
        uids = wait_until(stored, 60, "the three jobs stored")
        _notebook(lab.work / "attach_names.ipynb", "print('a notebook to attach in')")
        _open_notebook(page, lab, "attach_names.ipynb")
        panel = _open_sidebar(page)
        cells = page.locator(".jp-Notebook .jp-Cell")
        for i, name in enumerate(names, start=1):
            uid = uids[name]
            row = _row(panel, uid)
            expect(row.locator(".pymw-sidebar-name")).to_have_text(name.replace("\n", " "), timeout=60_000)
            row.get_by_role("button", name="Attach in this notebook").click()
            expect(cells).to_have_count(i + 1, timeout=60_000)
            # This job (its uid's start), not another, and no error.
            cells.nth(i).get_by_text(f"({uid[:8]}, condor)").wait_for(timeout=120_000)
            source = cells.nth(i).locator(".jp-InputArea-editor").inner_text()
            assert "import os" not in source and "os.system" not in source, source
        assert not pwned.exists()
    finally:
        master.shutdown(wait=True, cancel_futures=True)
        schedd.stop()


@pytest.mark.timeout(600)
def test_attach_inserts_a_code_cell_where_new_cells_are_markdown(lab, page, tmp_path, monkeypatch):
    """With Markdown as the default cell type (a Notebook setting), Attach
    still inserts a code cell and runs it: before, it rendered Markdown."""
    htcondor2 = pytest.importorskip("htcondor2", reason="the condor extra (make test installs it)")
    del htcondor2
    from pymw_magic.testing.condor import StandInSchedd

    monkeypatch.setenv("PYMW_HOME", str(lab.home))
    schedd = StandInSchedd(tmp_path / "schedd", slots=1, idle_timeout=300)
    master = Master("condor", schedd=schedd, chunksize=1)
    setting = f"{lab.url}/lab/api/settings/@jupyterlab/notebook-extension:tracker"

    def put(raw: dict) -> None:
        req = urllib.request.Request(setting, method="PUT", data=json.dumps({"raw": json.dumps(raw)}).encode(),
                                     headers={"Authorization": f"token {lab.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30):
            pass
    try:
        job = master.map_async(abs, [-1], name="plainjob")
        assert job.wait(timeout=180)
        store = st.Store(lab.home)
        uid = wait_until(lambda: next((r.uid for r in store.jobs() if r.name == "plainjob"), None), 60,
                         "plainjob stored")
        put({"defaultCell": "markdown"})
        _notebook(lab.work / "markdown_default.ipynb", "print('a notebook to attach in')")
        _open_notebook(page, lab, "markdown_default.ipynb")
        panel = _open_sidebar(page)
        _row(panel, uid).get_by_role("button", name="Attach in this notebook").click()
        cells = page.locator(".jp-Notebook .jp-Cell")
        expect(cells).to_have_count(2, timeout=60_000)
        cells.nth(1).get_by_text(f"({uid[:8]}, condor)").wait_for(timeout=120_000)
        expect(cells.nth(1)).to_have_class(re.compile(r"\bjp-CodeCell\b"))
    finally:
        put({})
        master.shutdown(wait=True, cancel_futures=True)
        schedd.stop()


# --- Export as batch script -------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_export_as_batch_script_from_the_toolbar_and_the_unsupported_magic_dialog(lab, page):
    _notebook(lab.work / "analysis.ipynb",
              "%load_ext pymw_magic",
              "%%pymw --map x in range(4) --out squares --workers 2\nx * x",
              "print('total', sum(squares))")
    _notebook(lab.work / "magic.ipynb",
              "%load_ext pymw_magic",
              f"%run helper.py  # {EVIL}",
              "print('after the magic')")
    (lab.work / "helper.py").write_text("print('helper')\n")
    (lab.work / "keep.py").write_text("# a script of my own\n")
    _notebook(lab.work / "keep.ipynb", "print(1)")
    context = page.context

    page.goto(lab.page_url("analysis.ipynb"))
    toolbar = page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="pymw-export"]')
    toolbar.wait_for(timeout=120_000)
    toolbar.get_by_role("button").click()
    # The script opens in an editor tab, and is on disk beside the notebook.
    page.locator(".lm-TabBar-tab", has_text="analysis.py").wait_for(timeout=120_000)
    editor = page.locator(".jp-FileEditor >> visible=true")
    expect(editor).to_contain_text("Exported by pymw-magic", timeout=60_000)
    script = lab.work / "analysis.py"
    text = script.read_text()
    assert "Notebook: analysis.ipynb" in text
    run = subprocess.run([sys.executable, str(script)], cwd=lab.work, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), PYMW_HOME=str(lab.home)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "total 14" in run.stdout  # 0 + 1 + 4 + 9, as the notebook prints it

    # From the File menu: a notebook with a magic the script cannot run (in
    # a page of its own: the first one holds an open editor).
    page.close()
    page = context.new_page()
    page.goto(lab.page_url("magic.ipynb"))
    page.locator(".jp-NotebookPanel-toolbar").wait_for(timeout=120_000)
    page.locator(".lm-MenuBar-item", has_text="File").click()
    page.locator(".lm-Menu-item", has_text="Export Notebook as Batch Script").click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("cell 2, line 1:", timeout=120_000)
    expect(dialog.locator(".pymw-export-source")).to_have_text(f"%run helper.py  # {EVIL}")  # as text
    assert dialog.locator(".pymw-export-reason").inner_text().strip()  # the exporter's reason
    assert dialog.locator("img").count() == 0 and page.evaluate("window.__pymwXss") is None
    assert not (lab.work / "magic.py").exists()
    page.screenshot(path=str(OUTPUT / "lab_extension_unsupported.png"))
    dialog.get_by_role("button", name="Export with them commented out").click()
    page.locator(".lm-TabBar-tab", has_text="magic.py").wait_for(timeout=120_000)
    assert "pymw export: SKIPPED" in (lab.work / "magic.py").read_text()

    # A file in the way that is not an earlier export is replaced only when the user says so.
    page.close()
    page = context.new_page()
    page.goto(lab.page_url("keep.ipynb"))
    page.locator(".jp-NotebookPanel-toolbar").wait_for(timeout=120_000)
    page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="pymw-export"]').get_by_role("button").click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("keep.py exists and is not a previous export", timeout=120_000)
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)
    assert (lab.work / "keep.py").read_text() == "# a script of my own\n"

    # The command palette has it too.
    page.keyboard.press("Control+Shift+c")
    page.locator(".lm-CommandPalette-input").fill("Export Notebook as Batch")
    expect(page.locator(".lm-CommandPalette-item", has_text="Export Notebook as Batch Script")).to_have_count(1)
    page.keyboard.press("Escape")


@pytest.mark.timeout(600)
def test_export_of_a_notebook_opened_through_another_contents_drive(lab, page):
    """A document of another drive (jupyter-collaboration's "RTC:" drive, a
    cloud drive) has the path "DRIVE:dir/x.ipynb"; the server knows it as
    its localPath: before, Export sent the drive's path and got a 404."""
    _notebook(lab.work / "drived.ipynb", "print('from a drive')")
    page.goto(lab.page_url())
    page.wait_for_function("window.jupyterapp && window.jupyterapp.serviceManager", timeout=120_000)
    page.evaluate("""async () => {
      const app = window.jupyterapp;
      await app.restored;
      const contents = app.serviceManager.contents;
      const base = contents.defaultDrive;
      // The server's own files under another drive name, as a drive of an extension would serve them.
      contents.addDrive(new Proxy(base, {
        get: (t, k) => (k === 'name' ? 'Other' : typeof t[k] === 'function' ? t[k].bind(t) : t[k])
      }));
      await app.commands.execute('docmanager:open', { path: 'Other:drived.ipynb', factory: 'Notebook' });
    }""")
    page.locator(".lm-TabBar-tab.lm-mod-current", has_text="drived.ipynb").wait_for(timeout=120_000)
    assert page.evaluate("window.jupyterapp.shell.currentWidget.context.path") == "Other:drived.ipynb"
    toolbar = page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="pymw-export"] >> visible=true')
    with page.expect_response(lambda r: _path(r).endswith("/pymw/api/export"), timeout=120_000) as answer:
        toolbar.get_by_role("button").click()
    assert answer.value.status == 200, answer.value.text()
    assert json.loads(answer.value.request.post_data)["path"] == "drived.ipynb"
    page.locator(".lm-TabBar-tab.lm-mod-current", has_text="drived.py").wait_for(timeout=120_000)
    assert "Exported by pymw-magic" in (lab.work / "drived.py").read_text()
    # The script opens in the notebook's drive, as the notebook did.
    assert page.evaluate("window.jupyterapp.shell.currentWidget.context.path") == "Other:drived.py"
    assert page.locator(".jp-Dialog").count() == 0


# --- behind JupyterHub's kind of prefix ------------------------------------------------------------
@pytest.mark.timeout(600)
def test_behind_a_base_url_prefix(tmp_path, built_extension, browser):
    with running_lab(tmp_path / "prefixed", built_extension, base_url="/user/alice/") as lab:
        recorder = st.JobRecorder(st.Store(lab.home))
        master = Master("local", workers=1)
        recorder.attach(master)
        context = browser.new_context(viewport={"width": 1500, "height": 1000})
        try:
            job = master.map_async(abs, [-1, -2, -3], name="behind-prefix")
            uid = recorder.track(job, tasks=True)
            assert job.wait(timeout=120)
            recorder.flush()
            _notebook(lab.work / "prefixed.ipynb", "%load_ext pymw_magic\n%pymw use local --workers 1")
            page = context.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            _open_notebook(page, lab, "prefixed.ipynb")
            panel = _open_sidebar(page)
            row = _row(panel, uid)
            expect(row.locator(".pymw-sidebar-counts")).to_have_text("done 3 (of 3)", timeout=60_000)
            row.get_by_role("button", name="Show tasks").click()
            expect(page.locator(f"#pymw-tasks-{uid} .pymw-task-table tbody tr")).to_have_count(3, timeout=60_000)
            _open_sidebar(page)
            row.get_by_role("button", name="Remove").click()  # a DELETE: the XSRF cookie under the prefix
            page.locator(".jp-Dialog").get_by_role("button", name="Remove").click()
            expect(row).to_have_count(0, timeout=30_000)
            page.locator(".lm-TabBar-tab", has_text="prefixed.ipynb").click()  # back from the task table
            page.locator(".jp-NotebookPanel-toolbar").wait_for(timeout=60_000)
            _run_cell(page, 0)
            expect(page.locator(".pymw-status")).to_have_text("pymw: local \u00b7 1 worker", timeout=120_000)
            page.locator('.jp-NotebookPanel-toolbar [data-jp-item-name="pymw-export"]').get_by_role("button").click()
            page.locator(".lm-TabBar-tab", has_text="prefixed.py").wait_for(timeout=120_000)
            assert (lab.work / "prefixed.py").exists()
            api = [u for u in requests if "/pymw/api/" in u]
            assert api and all(u.startswith(f"{lab.url}/pymw/api/") for u in api), api
            page.screenshot(path=str(OUTPUT / "lab_extension_prefix.png"))
        finally:
            context.close()
            recorder.detach(master)
            master.shutdown(wait=True, cancel_futures=True)


# --- the wheel ------------------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_the_wheel_ships_the_prebuilt_extension_enabled(tmp_path, built_extension):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("pymw_magic-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = next(n.split("/data/")[0] for n in names if "/data/" in n) + "/data/"
    share = data + "share/jupyter/labextensions/pymw-magic/"
    assert share + "package.json" in names and share + "install.json" in names
    assert any(re.fullmatch(re.escape(share) + r"static/remoteEntry\.[0-9a-f]+\.js", n) for n in names)
    assert data + "etc/jupyter/jupyter_server_config.d/pymw_magic.json" in names
    assert not [n for n in names if n.startswith("pymw_magic/labextension/")]  # shipped once
    assert not [n for n in names if "node_modules" in n]

    # A throwaway environment: this wheel (no Node involved), plus the test
    # environment's packages for jupyterlab itself.
    python, site = _throwaway_env(tmp_path / "venv")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    _assert_enabled(python, tmp_path / "venv", tmp_path)
    where = subprocess.run([str(python), "-c", "import pymw_magic; print(pymw_magic.__file__)"],
                           capture_output=True, text=True, env=_clean_env(tmp_path), cwd=tmp_path, timeout=60).stdout
    assert where.startswith(site), where  # the wheel's package, not the work tree


@pytest.mark.timeout(900)
def test_the_editable_install_has_the_extension_enabled(tmp_path, built_extension):
    """What ``make test`` does (``pip install -e``): the build hook runs, and
    the extension is installed with the package (hatchling copies shared
    data in editable mode too)."""
    python, site = _throwaway_env(tmp_path / "venv")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              "-e", str(ROOT)], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    _assert_enabled(python, tmp_path / "venv", tmp_path)
    where = subprocess.run([str(python), "-c", "import pymw_magic; print(pymw_magic.__file__)"],
                           capture_output=True, text=True, env=_clean_env(tmp_path), cwd=tmp_path, timeout=60).stdout
    assert where.strip() == str(ROOT / "pymw_magic" / "__init__.py"), where  # the work tree's package


def _throwaway_env(env_dir: Path) -> tuple[Path, str]:
    """A venv without pip whose only packages beyond the test environment's
    (reached through a .pth file, for jupyterlab) are what gets installed;
    the tools are run as ``python -m``: it has no scripts of its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    import jupyterlab
    (Path(site) / "outer.pth").write_text(str(Path(jupyterlab.__file__).parent.parent) + "\n")
    return python, site


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """Ours without PYTHONPATH (the work tree) and Jupyter's paths; config and data in tmp."""
    home = tmp_path / "jupyter"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER") and k != "PYTHONPATH"}
    env.update(JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_PLATFORM_DIRS="0")
    return env


def _assert_enabled(python: Path, env_dir: Path, tmp_path: Path) -> None:
    """`jupyter labextension list` and `jupyter server extension list` in
    that environment show pymw-magic enabled, found in its own prefix."""
    env = _clean_env(tmp_path)
    labext = subprocess.run([str(python), "-m", "jupyterlab.labextensions", "list"], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=300)
    out = re.sub(r"\x1b\[[0-9;]*m", "", labext.stdout + labext.stderr)  # no colours
    assert re.search(r"pymw-magic v0\.1\.0 .*enabled.*OK", out), out
    assert f"{env_dir}/share/jupyter/labextensions" in out, out  # the environment's own copy
    server = subprocess.run([str(python), "-m", "jupyter_server", "extension", "list"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    out = re.sub(r"\x1b\[[0-9;]*m", "", server.stdout + server.stderr)
    assert re.search(r"pymw_magic\s.*enabled", out) and re.search(r"pymw_magic\s.*OK", out), out
