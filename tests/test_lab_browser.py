"""The widgets in a real JupyterLab, in Debian's headless Chromium driven by
Playwright (Python): a notebook runs a ``%%pymw`` cell and the page shows
the inline job widget live, then settled at done; ``%pymw dashboard``
renders with the job in it; the Cancel button of a cell that still waits
for its job stops it.  A screenshot is saved under ``test-output/``.

The server is started by the test on a free localhost port with a token and
its own config/data/runtime dirs, and stopped (sessions deleted, then the
process) afterwards.  ``make test`` installs Chromium (apt) and Playwright
and JupyterLab (the ``test`` extra); the test skips, saying why, only where
one of them is truly absent.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
OUTPUT = ROOT / "test-output"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (make test installs Debian's chromium)", allow_module_level=True)
pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the test extra has it)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra has it)")
nbformat = pytest.importorskip("nbformat")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET") -> object:
    req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server of its own: (base url, token, notebook dir)."""
    port, token = _free_port(), secrets.token_hex(16)
    home = tmp_path / "jupyter"
    work = tmp_path / "work"
    settings = home / "settings"
    for d in (work, settings):
        d.mkdir(parents=True)
    # No news or update toast over the page.
    (settings / "overrides.json").write_text(json.dumps({"@jupyterlab/apputils-extension:notification": {
        "checkForUpdates": False, "fetchNews": "false"}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), IPYTHONDIR=str(home / "ipython"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip", "127.0.0.1", "--port", str(port),
           "--ServerApp.port_retries=0", f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}",
           f"--LabApp.app_settings_dir={settings}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "wb")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "lab.log").read_text()[-3000:]
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer"
                time.sleep(0.2)
        yield base, token, work
    finally:
        try:
            for session in _api(base, token, "/api/sessions") or []:  # type: ignore[union-attr]
                _api(base, token, f"/api/sessions/{session['id']}", method="DELETE")
        except OSError:
            pass
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


def _notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext pymw_magic\n%pymw use local --workers 2"),
        nbformat.v4.new_code_cell("%%pymw --map x in range(120) --out squares --name squares --chunksize 1\n"
                                  "import time\ntime.sleep(0.05)\nx * x"),
        nbformat.v4.new_code_cell("%pymw dashboard"),
        nbformat.v4.new_code_cell("%%pymw --map x in range(40) --out partial --name sleepy --chunksize 1\n"
                                  "import time\ntime.sleep(0.1 if x < 4 else 60)\nx"),
    ]
    nbformat.write(nb, path)


def test_job_widget_and_dashboard_in_jupyterlab(lab):
    base, token, work = lab
    _notebook(work / "pymw.ipynb")
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "lab_browser.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # Connected to the kernel before the first Shift+Enter, or it may be dropped.
            with page.expect_websocket(lambda ws: "/api/kernels/" in ws.url, timeout=120_000):
                page.goto(f"{base}/lab/tree/pymw.ipynb?reset&token={token}")
            page.locator("text=Idle >> visible=true").first.wait_for(timeout=120_000)
            cells = page.locator(".jp-Notebook .jp-Cell")
            cells.nth(0).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            page.get_by_text("pymw: default is now backend 'local' with 2 worker(s)").wait_for(timeout=120_000)
            page.keyboard.press("Shift+Enter")  # the %%pymw cell, now selected
            job = cells.nth(1).locator(".pymw-jobview")
            # It appears while the job runs, with its bar and the Cancel button...
            job.locator(".pymw-job-active").wait_for(timeout=60_000)
            assert job.locator(".pymw-bar").count() == 1
            assert job.get_by_role("button", name="Cancel").is_visible()
            # Live updates (pushed by the widgets' ticker thread while the
            # cell blocks) reach the page: done tasks show before the end.
            job.locator(".pymw-job-active .pymw-seg-done").wait_for(timeout=60_000)
            page.screenshot(path=str(OUTPUT / "lab_browser_running.png"))
            # ...and settles at done.
            job.locator(".pymw-job-finished").wait_for(timeout=120_000)
            assert "job 'squares' finished: done 120" in job.inner_text()
            assert not job.get_by_role("button", name="Cancel").is_visible()
            page.keyboard.press("Shift+Enter")  # %pymw dashboard
            board = cells.nth(2).locator(".pymw-dashboard")
            board.wait_for(timeout=60_000)
            board.locator(".pymw-jobs .pymw-job-finished").wait_for(timeout=60_000)
            assert "finished: done 120" in board.locator(".pymw-jobs").inner_text()
            assert board.locator(".pymw-backend-form select").first.input_value() == "local"
            assert "tasks 1\u201320 of 120" in board.locator(".pymw-task-table").inner_text()
            page.wait_for_timeout(300)  # let the last paint land before the picture
            page.screenshot(path=str(shot), full_page=True)
            board.get_by_role("tab", name="timeline").click()
            timeline = board.locator("svg.pymw-timeline")
            timeline.wait_for(timeout=30_000)
            assert timeline.locator("g.done rect").count() > 0  # bars of finished tasks
            timeline.scroll_into_view_if_needed()
            page.screenshot(path=str(OUTPUT / "lab_browser_timeline.png"))
            # A blocking cell's Cancel button, clicked while the cell waits.
            cells.nth(3).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            sleepy = cells.nth(3).locator(".pymw-jobview")
            sleepy.locator(".pymw-job-active .pymw-seg-done").wait_for(timeout=60_000)
            sleepy.get_by_role("button", name="Cancel").click()
            sleepy.locator(".pymw-job-cancelled").wait_for(timeout=60_000)
            cells.nth(3).get_by_text("was cancelled: ").wait_for(timeout=60_000)
            assert "CancelledError" in cells.nth(3).locator(".jp-OutputArea").inner_text()
            board.locator(".pymw-jobs .pymw-job-cancelled").wait_for(timeout=30_000)
            sleepy.scroll_into_view_if_needed()
            page.screenshot(path=str(OUTPUT / "lab_browser_cancelled.png"))
        except Exception:
            page.screenshot(path=str(OUTPUT / "lab_browser_failed.png"))
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
