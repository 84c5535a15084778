"""examples/notebooks/boinc.ipynb in a real kernel, on the stand-in project
(or the real project ``PYMW_BOINC_PROJECT`` names)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_notebooks import NOTEBOOKS, find, kernel_env, strip_ansi, text_of  # noqa: E402,F401


@pytest.mark.timeout(1200)
def test_boinc_notebook(kernel_env, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PYMW_HOME", str(home))
    monkeypatch.setenv("PYMW_CONFIG", str(tmp_path / "config"))
    nb = nbformat.read(NOTEBOOKS / "boinc.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        from pymw_magic.testing.boinc import StandInProject
        if (home / "standin-boinc").exists():
            StandInProject(home / "standin-boinc").stop()
    estimates = text_of(find(nb, "job = _pymw_job"))
    assert estimates.startswith("(3.1") and estimates.endswith(", 8, 8)"), estimates
    failing = find(nb, "%%pymw --map x in [4, 2, 0, 1]")
    errors = [o for o in failing.outputs if o["output_type"] == "error"]
    assert [e["ename"] for e in errors] == ["ZeroDivisionError"], text_of(failing)
    shown = strip_ansi(text_of(failing))
    assert "12 / x" in shown and "task 2 failed on input x=0" in shown, shown
    ratios = text_of(find(nb, "ratios"))
    assert ratios.startswith("[3.0, 6.0, ZeroDivisionError(") and ratios.endswith(", 12.0]"), ratios
    sets = text_of(find(nb, "print(type(sets[0])"))
    assert "trusted_results=True" in sets, sets
    status = text_of(find(nb, "%pymw status"))
    assert "'ratios' (failed)" in status and "'pi' (finished): done 8" in status, status
    if not os.environ.get("PYMW_BOINC_PROJECT"):
        assert not (home / "standin-boinc" / f"pid_{os.uname().nodename}" / "standin_daemon.pid").exists()
