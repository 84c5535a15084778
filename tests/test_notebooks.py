"""Execute the example notebooks in a real Jupyter kernel (nbclient) and
check what they show.

The kernel is this test's own interpreter (the venv's python), through a
``python3`` kernelspec written to a temporary JUPYTER_PATH — which takes
precedence over any other ``python3`` spec on the machine — so the test
never runs a kernel from some other Python.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import execute_in_kernel

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "examples" / "notebooks"


def _worker_pids() -> set[int]:
    """Every live pymw worker process on the machine."""
    pids = set()
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if (p.info["status"] != psutil.STATUS_ZOMBIE
                    and "pymw_magic.worker" in " ".join(p.info["cmdline"] or ())):
                pids.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pymw-magic tests)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel (and its workers) import pymw_magic from this checkout even
    # when it is not installed.
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))


def _kernel_workers(km) -> set[int]:
    """The pymw workers the kernel started (they are its children)."""
    kernel = psutil.Process(km.provisioner.process.pid)
    return {p.pid for p in kernel.children(recursive=True)} & _worker_pids()


def _await_workers(km, count: int, limit: float = 60.0) -> set[int]:
    """The kernel's workers once ``count`` of them run (they start in the
    background, so ``%pymw use`` returns before they exist)."""
    deadline = time.monotonic() + limit
    workers = _kernel_workers(km)
    while len(workers) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        workers = _kernel_workers(km)
    return workers


def _left_alive(pids: set[int], limit: float = 30.0) -> set[int]:
    deadline = time.monotonic() + limit
    alive = pids & _worker_pids()
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = pids & _worker_pids()
    return alive


def run_notebook(path: Path) -> tuple[nbformat.NotebookNode, set[int]]:
    """Execute a notebook; it and the pids of the workers its kernel had."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        workers = _kernel_workers(client.km)
    return nb, workers


def text_of(cell) -> str:
    """Everything a code cell shows, as text: streams, results, errors."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append("\n".join(out["traceback"]))
    return "".join(parts)


def find(nb, startswith: str):
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(startswith)]
    assert cells, f"no code cell starting with {startswith!r}"
    return cells[0]


def strip_ansi(text: str) -> str:
    import re
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_quickstart_notebook(kernel_env):
    nb, workers = run_notebook(NOTEBOOKS / "quickstart.ipynb")
    assert len(workers) == 2  # %pymw use local --workers 2

    use = find(nb, "%pymw use")
    assert "backend 'local' with 2 worker(s)" in text_of(use)

    mapped = find(nb, "%%pymw --map x in range(8)")
    printed = [line for line in text_of(mapped).splitlines() if line.startswith("task ")]
    assert printed == [f"task {x}: hypot = {(5 * x * x) ** 0.5:.3f}" for x in range(8)]
    assert not [o for o in mapped.outputs if o["output_type"] == "error"]
    assert text_of(find(nb, "results")) == repr([x * x + 0.5 for x in range(8)])

    assert text_of(find(nb, "labels")) == repr(["w0", "x1", "y4", "z9"])

    failing = find(nb, "%%pymw --map x in [4, 1, 0, 2]")
    errors = [o for o in failing.outputs if o["output_type"] == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "ZeroDivisionError"
    shown = strip_ansi(text_of(failing))
    # The remote traceback names the cell (after its In[N]) and its own line...
    n = failing.execution_count
    assert f'File "<pymw-cell-{n}>", line 3, in <cell>' in shown
    # ...and the notebook's traceback ends in the cell at that line.
    assert f"File <pymw-cell-{n}>:3" in shown and "----> 3 12 / x" in shown
    assert "12 / x" in shown
    # Not the machinery: the line IPython rewrote the cell into, this package's frames.
    assert "__import__('pymw_magic')" not in shown and "magics.py" not in shown
    assert "task 2 failed on input x=0" in shown
    assert "output of failed task 2 (x=0)" in shown
    assert shown.index("dividing by 1") < shown.index("dividing by 0") < shown.index("dividing by 2")
    ratios = text_of(find(nb, "ratios"))
    assert ratios.startswith("[3.0, 12.0, ZeroDivisionError(") and ratios.endswith(", 6.0]")

    status = text_of(find(nb, "%pymw status"))
    assert "pymw default: backend 'local' with 2 worker(s)" in status
    assert "(finished): done 8" in status and "(finished): done 4" in status
    assert "(failed): done 3, failed 1" in status

    # The kernel is gone: so must be its workers.
    assert not _left_alive(workers), "workers outlived the kernel"


ERRORS_NOTEBOOK = [
    "%load_ext pymw_magic\n%pymw use local --workers 1",
    "def gen():\n    yield 1\nk, n, label = 99, 3, 'expanded'",
    ("%%pymw --map x in range(2)\ny = x\nz = (y +\n", "SyntaxError"),
    ("%%pymw --map x in [gen()]\nx\n", "PayloadError"),
    ("%%pymw --map a, b in [1, 2]\na\n", "MapError"),
    ("%%pymw --map x in range(2)\nx + nowhere_defined\n", "NameError"),
    ("%%pymw --map x in [1, 0]\n1 / x\n", "ZeroDivisionError"),
    '%%pymw --map s in [f"{k}" for k in range(n)] --out fs --name $label\ns',
    "print(fs, _pymw_job.name)",
]


def test_errors_in_a_kernel_show_the_cell_not_the_machinery(kernel_env, tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    expected = {}
    for i, cell in enumerate(ERRORS_NOTEBOOK):
        source, error = cell if isinstance(cell, tuple) else (cell, None)
        code = nbformat.v4.new_code_cell(source)
        if error:
            code.metadata["tags"] = ["raises-exception"]
            expected[i] = error
        nb.cells.append(code)
    path = tmp_path / "errors.ipynb"
    nbformat.write(nb, path)
    executed, _ = run_notebook(path)
    for i, error in expected.items():
        cell = executed.cells[i]
        errors = [o for o in cell.outputs if o["output_type"] == "error"]
        assert [o["ename"] for o in errors] == [error], text_of(cell)
        shown = strip_ansi(text_of(cell))
        assert f"<pymw-cell-{cell.execution_count}>" in shown, shown
        # neither the rewritten line (await ...run_cell) nor pymw_magic's own frames
        assert "__import__('pymw_magic')" not in shown and "pymw_magic/" not in shown, shown
    syntax = strip_ansi(text_of(executed.cells[2]))
    assert "z = (y +" in syntax and ":3" in syntax  # the body's own line (1 is %%pymw)
    assert "item 0 cannot be sent to workers: x=<generator" in text_of(executed.cells[3])
    # The %%pymw line is Python: {k} is the f-string's, $label no variable.
    assert text_of(executed.cells[-1]).strip() == "['0', '1', '2'] $label"


def _run(kc, code: str, timeout: float = 120) -> tuple[dict, str]:
    """Execute ``code`` in the kernel; its reply content and what it printed."""
    printed: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            printed.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            printed.append("\n".join(msg["content"]["traceback"]))

    reply = execute_in_kernel(kc, code, hook, timeout)
    return reply["content"], "".join(printed)


def test_interrupting_the_kernel_cancels_the_cell_and_stops_its_workers(kernel_env, tmp_path):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    spawned: set[int] = set()
    try:
        reply, out = _run(kc, "%load_ext pymw_magic\n%pymw use local --workers 2")
        assert reply["status"] == "ok", out
        workers = _await_workers(km, 2)
        assert len(workers) == 2
        marks = tmp_path / "started"
        marks.mkdir()
        kc.execute(
            f"%%pymw --map x in range(6) --out partial --name sleepy\n"
            f"import pathlib, time\n"
            f"pathlib.Path({str(marks)!r}, str(x)).touch()\n"
            f"time.sleep(120)\nx")
        # Interrupt (the stop button) once both workers are inside a task.
        deadline = time.monotonic() + 60
        while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(marks.iterdir())) == 2
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)["content"]
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        # The workers that ran the sleeping tasks were stopped...
        assert not _left_alive(workers), "a worker running an interrupted task is still alive"
        # ...no task ran past the interrupt, and the kernel goes on working.
        reply, out = _run(kc, "print(_pymw_job.counts()['cancelled'], len(partial))\n"
                              "%pymw status")
        assert reply["status"] == "ok", out
        assert out.splitlines()[0] == "6 6"
        assert "'sleepy' (cancelled)" in out
        assert len(list(marks.iterdir())) == 2
        spawned = _kernel_workers(km)  # the replacements
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert not _left_alive(spawned), "workers outlived the kernel"


@pytest.mark.timeout(1800)  # a real pool: a negotiation cycle (~10 s) per wave of procs
def test_condor_notebook_survives_a_kernel_restart(kernel_env, tmp_path, monkeypatch):
    """condor.ipynb in a real kernel, restarted where the notebook says so
    (the cell tagged ``restart-kernel``), on the stand-in schedd (or the
    pool's, where one answers)."""
    pytest.importorskip("htcondor2")
    from nbclient.util import run_sync

    home = Path(os.environ.get("PYMW_CONDOR_HOME") or tmp_path) / "home"
    monkeypatch.setenv("PYMW_HOME", str(home))
    nb = nbformat.read(NOTEBOOKS / "condor.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    pids = []
    try:
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                if "restart-kernel" in cell.metadata.get("tags", []):
                    pids.append(client.km.provisioner.process.pid)
                    run_sync(client.km.restart_kernel)(now=False)
                    run_sync(client.kc.wait_for_ready)(timeout=120)
                client.execute_cell(cell, index)
            pids.append(client.km.provisioner.process.pid)
    finally:
        from pymw_magic.testing.condor import StandInSchedd
        if (home / "standin-schedd").exists():
            StandInSchedd(home / "standin-schedd").stop()
    assert len(set(pids)) == 2, "the kernel was not restarted"

    estimates = text_of(find(nb, "job = _pymw_job"))
    assert estimates.startswith("(3.1") and estimates.endswith(", 16)"), estimates
    where = text_of(find(nb, "sorted({t.host"))
    assert where.endswith(", {1}, 16)"), where
    widget = [o for o in find(nb, "overnight").outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widget, find(nb, "overnight").outputs
    listed = text_of(find(nb, "%pymw jobs --all"))
    assert "overnight" in listed and "pi" in listed, listed
    attached = text_of(find(nb, "%pymw attach overnight"))
    assert "pymw: attached job 'overnight'" in attached, attached
    assert text_of(find(nb, "cubes = ")) == repr(([n ** 3 for n in range(8)], {1}))

    failing = find(nb, "%%pymw --map x in [4, 2, 0, 1]")
    errors = [o for o in failing.outputs if o["output_type"] == "error"]
    assert [e["ename"] for e in errors] == ["ZeroDivisionError"], text_of(failing)
    shown = strip_ansi(text_of(failing))
    assert "12 / x" in shown and "task 2 failed on input x=0" in shown, shown
    ratios = text_of(find(nb, "ratios"))
    assert ratios.startswith("[3.0, 6.0, ZeroDivisionError(") and ratios.endswith(", 12.0]"), ratios

    held = find(nb, "%%pymw --map x in range(2) --name held")
    assert [e["ename"] for e in held.outputs if e["output_type"] == "error"] == ["JobHeld"], text_of(held)
    reason = text_of(find(nb, "held = _pymw_job"))
    assert reason.startswith("JobHeld 13 2\n") and "calibration.dat" in reason, reason
    status = text_of(find(nb, "%pymw status"))
    assert "'held' (failed)" in status and "'ratios' (failed)" in status, status
    assert "removed job 'overnight'" in text_of(find(nb, "%pymw jobs --remove"))
