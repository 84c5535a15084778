"""An exported notebook run as a batch script on HTCondor, naming its
schedd on the command line: a schedd object (the stand-in) is named by
its locator ``module:Class(arguments)``, as the job store records it —
the backend knows nothing of stand-ins."""

from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import pytest

pytest.importorskip("htcondor2")

from conftest import ROOT  # noqa: E402
from pymw_magic import store  # noqa: E402
from condor_fixtures import standin  # noqa: E402,F401  (fixtures)

TIMEOUT = 240


def notebook(path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


def run(cmd, cwd, env):
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), **env), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} timed out\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("form", ["bare", "quoted", "record"])
def test_an_exported_script_names_a_stand_in_schedd_on_its_command_line(standin, tmp_path, form):
    nb = notebook(tmp_path / "analysis.ipynb",
                  "%load_ext pymw_magic\n%pymw use local --workers 1",
                  "def cube(x):\n    return x ** 3",
                  "%%pymw --map x in range(5) --out cubes --name cubes\ncube(x)",
                  "print('TOTAL', sum(cubes))")
    script = tmp_path / "analysis.py"
    exported = run([sys.executable, "-m", "pymw_magic.cli", "export", str(nb), "-o", str(script)], tmp_path, {})
    assert exported.returncode == 0, exported.stderr
    root = str(standin.root)
    locator = {"bare": f"pymw_magic.testing.condor:StandInSchedd({root})",
               "quoted": f"pymw_magic.testing.condor:StandInSchedd({root!r})",
               "record": '{"kind": "object", "class": "pymw_magic.testing.condor:StandInSchedd", "args": ["'
                         + root + '"]}'}[form]
    home = tmp_path / "home"
    done = run([sys.executable, str(script), "--backend", "condor", "--schedd", locator, "--chunksize", "2"],
               tmp_path, {"PYMW_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert "TOTAL 100" in done.stdout
    # it ran on the stand-in, as one cluster of 3 procs, recorded with its schedd
    history = standin.history(projection=["ClusterId", "ProcId"])
    assert len(history) == 3 and len({a["ClusterId"] for a in history}) == 1
    record = store.open_store(home).job("cubes")
    assert record.backend == "condor"
    assert record.handle["engine"]["schedd"] == {"kind": "object", "class": "pymw_magic.testing.condor:StandInSchedd",
                                                 "args": [root], "pool": None}


def test_a_locator_that_is_not_a_schedd_class_is_refused_before_anything_runs(tmp_path):
    nb = notebook(tmp_path / "n.ipynb", "%load_ext pymw_magic\n%pymw use local --workers 1",
                  "%%pymw --map x in range(2)\nx")
    script = tmp_path / "n.py"
    assert run([sys.executable, "-m", "pymw_magic.cli", "export", str(nb), "-o", str(script)], tmp_path,
               {}).returncode == 0
    marker = tmp_path / "ran"
    done = run([sys.executable, str(script), "--backend", "condor", "--schedd", f'os:system("touch {marker}")'],
               tmp_path, {"PYMW_HOME": str(tmp_path / "home")})
    assert done.returncode != 0 and "not a class" in done.stderr, done.stderr
    assert not marker.exists()
