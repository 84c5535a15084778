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


def run_notebook(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    return nb


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
    before = _worker_pids()
    nb = run_notebook(NOTEBOOKS / "quickstart.ipynb")

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
    assert "<pymw-cell-" in shown and "line 3, in <cell>" in shown  # the cell's own line
    assert "12 / x" in shown
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
    deadline = time.monotonic() + 30
    left = _worker_pids() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _worker_pids() - before
    assert not left, f"workers outlived the kernel: {sorted(left)}"
