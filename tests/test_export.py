"""Exporting a notebook as a batch script: ``pymw-magic export``,
``%pymw export`` and the scripts they write, run for real.

How "the script computes what the notebook computes" is checked: the
notebook runs in a real kernel (nbclient) and, after its last cell, dumps
every name it bound to plain data (numbers, strings, lists, dicts,
exceptions as type and message; objects such as Jobs, masters and widgets
are left out).  The exported script runs in a subprocess (``python
SCRIPT.py``, through runpy so its globals can be dumped the same way, or
under ``mpiexec``).  Every plain name the notebook bound must be bound by
the script to an equal value, the ``--out`` variables of the ``%%pymw``
cells among them, and what the ``%%pymw`` cells' tasks printed must be
printed by the script too.  The interactive notebook (live_sweep) is
compared the same way: its slider moves are plain code (``.value = ...``),
so the script moves them too, headless, on its own master; what is
compared is what the sweep computed (the results of the last setting and
that setting), not how many stale tasks a slider move happened to cancel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, wait_gone

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from test_notebooks import NOTEBOOKS, kernel_env, text_of  # noqa: E402,F401  (kernel_env: a fixture)

EXAMPLES = ["quickstart", "mpi", "live_sweep", "simulation_tuning"]

# Shared by the kernel and the script: the names a namespace binds, as plain data.
DUMP = r'''
import json as _pymw_json

def _pymw_plain(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return ["float", repr(value)]
    if isinstance(value, BaseException):
        return ["exception", type(value).__name__, str(value)]
    if isinstance(value, (list, tuple)):  # IPython's SList is a list
        return ["list" if isinstance(value, list) else "tuple", [_pymw_plain(v) for v in value]]
    if isinstance(value, dict):
        return ["dict", [[_pymw_plain(k), _pymw_plain(v)] for k, v in value.items()]]
    raise TypeError(type(value).__name__)

def _pymw_dump(namespace):
    out = {}
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in ("In", "Out", "exit", "quit", "get_ipython"):
            continue
        try:
            out[name] = _pymw_plain(value)
        except TypeError:
            pass
    return _pymw_json.dumps(out, sort_keys=True)
'''

# Runs SCRIPT as ``python SCRIPT ARGS...`` would, then writes its globals to DUMP.
WRAPPER = DUMP + r'''
import runpy, sys
script, dump = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
namespace = runpy.run_path(script, run_name="__main__")
with open(dump, "w") as f:
    f.write(_pymw_dump(namespace))
'''


# --- helpers ----------------------------------------------------------------------------

def run(cmd: list[str], cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on a timeout the whole session
    (mpiexec and its ranks included) is killed, so nothing outlives the test."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} timed out\nstdout:\n{out}\nstderr:\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def export_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pymw_magic.cli", "export", *map(str, args)], cwd=cwd, timeout=120)


def run_script(script: Path, *args: str, cwd: Path | None = None,
               launcher: list[str] = ()) -> tuple[subprocess.CompletedProcess, dict]:
    """Run an exported script (through runpy, to read its globals after):
    the process and the plain names it bound."""
    wrapper = script.parent / "_dump_wrapper.py"
    wrapper.write_text(WRAPPER)
    dump = script.parent / (script.stem + ".names.json")
    if dump.exists():
        dump.unlink()
    proc = run([*launcher, sys.executable, str(wrapper), str(script), str(dump), *args],
               cwd=cwd or script.parent)
    names = json.loads(dump.read_text()) if dump.exists() else {}
    return proc, names


def make_notebook(path: Path, *cells: str | tuple[str, list[str]]) -> Path:
    """A notebook of code cells (``(source, tags)`` for a tagged one)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for cell in cells:
        source, tags = cell if isinstance(cell, tuple) else (cell, [])
        code = nbformat.v4.new_code_cell(source)
        if tags:
            code.metadata["tags"] = tags
        nb.cells.append(code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def export_and_run(tmp_path: Path, name: str, *cells: str | tuple[str, list[str]],
                   timeout: float = 120) -> subprocess.CompletedProcess:
    """A notebook of ``cells`` exported to ``NAME.py`` and run as ``python NAME.py``."""
    nb = make_notebook(tmp_path / f"{name}.ipynb", *cells)
    script = tmp_path / f"{name}.py"
    exported = export_cli(nb, "-o", script)
    assert exported.returncode == 0, exported.stderr
    return run([sys.executable, str(script)], cwd=tmp_path, timeout=timeout)


def execute(path: Path, cwd: Path) -> tuple[object, dict]:
    """Run the notebook at ``path`` in a real kernel (cwd ``cwd``): the
    executed notebook and the plain names it bound."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(DUMP + "\nprint('PYMW-DUMP', _pymw_dump(dict(globals())))"))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    dumped = [line for line in text_of(nb.cells[-1]).splitlines() if line.startswith("PYMW-DUMP ")]
    assert dumped, text_of(nb.cells[-1])
    nb.cells.pop()
    return nb, json.loads(dumped[0][len("PYMW-DUMP "):])


_EXECUTED: dict[str, tuple[object, dict]] = {}


def executed_example(name: str) -> tuple[object, dict]:
    """An example notebook run by nbclient, once per test session."""
    if name not in _EXECUTED:
        _EXECUTED[name] = execute(NOTEBOOKS / f"{name}.ipynb", ROOT)
    return _EXECUTED[name]


def pymw_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith("%%pymw")]


def out_names(nb) -> set[str]:
    """The --out variables of the blocking %%pymw cells (they hold results)."""
    names = set()
    for cell in pymw_cells(nb):
        first = cell.source.lstrip().splitlines()[0]
        match = re.search(r"--out[ =](\w+)", first)
        if match and "--nowait" not in first:
            names.add(match.group(1))
    return names


def stdout_of(cell) -> str:
    return "".join(o["text"] for o in cell.get("outputs", [])
                   if o["output_type"] == "stream" and o["name"] == "stdout")


def assert_same_names(notebook: dict, script: dict, must: set[str]) -> None:
    assert must <= set(notebook), f"the notebook did not bind {must - set(notebook)}"
    missing = sorted(set(notebook) - set(script))
    assert not missing, f"the script did not bind {missing}"
    differ = {name: (notebook[name], script[name]) for name in notebook if notebook[name] != script[name]}
    assert not differ, f"different values (notebook, script): {differ}"


def mpi_processes() -> list[int]:
    import psutil
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            line = " ".join(p.cmdline())
            if any(n in line for n in ("mpiexec", "hydra_pmi_proxy", "pymw_magic.worker")) \
                    and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def mpiexec() -> str:
    pytest.importorskip("mpi4py", reason="the MPI backend needs pip install 'pymw-magic[mpi]'")
    from pymw_magic.backends.mpi import find_mpiexec
    try:
        return find_mpiexec()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# --- the example notebooks ----------------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLES)
def test_exported_example_computes_what_the_notebook_computes(name, kernel_env, tmp_path):
    nb, in_notebook = executed_example(name)

    script = tmp_path / f"{name}.py"
    exported = export_cli(NOTEBOOKS / f"{name}.ipynb", "-o", script)
    assert exported.returncode == 0, exported.stderr
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env python3\n")
    assert f"{name}.ipynb" in text.split('"""')[1]  # the header names the notebook
    assert "get_ipython" not in text and "run_cell_magic" not in text

    proc, in_script = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert in_notebook, "the notebook bound no plain value to compare"
    assert_same_names(in_notebook, in_script, out_names(nb))
    # What the tasks printed, the script prints, in the same order.
    for cell in pymw_cells(nb):
        assert stdout_of(cell) in proc.stdout


def test_a_pymw_cell_becomes_a_named_function_and_a_call(tmp_path):
    script = tmp_path / "quickstart.py"
    assert export_cli(NOTEBOOKS / "quickstart.ipynb", "-o", script).returncode == 0
    text = script.read_text()
    # One readable function per %%pymw cell, named after its --out variable...
    assert "def results_task(x):\n" in text and "def labels_task(a, b):\n" in text
    assert "    return square(x) + offset\n" in text
    # ...and the call that binds the same name.
    # (named as the notebook names the job: cell-N after its In[N])
    assert "results = pymw.map(results_task, range(8), name='cell-4')" in text
    assert ("labels = pymw.starmap(labels_task, [(a, b) for a, b in zip(range(4), \"wxyz\")], "
            "name='cell-6')") in text
    assert "pymw.use('local', workers=2)" in text
    compile(text, str(script), "exec")
    # -o - writes the same script to stdout
    printed = export_cli(NOTEBOOKS / "quickstart.ipynb", "-o", "-")
    assert printed.returncode == 0 and "results = pymw.map(results_task, range(8), name='cell-4')" in printed.stdout


# --- MPI ------------------------------------------------------------------------------------

def test_exported_mpi_notebook_under_mpiexec(kernel_env, tmp_path):
    launcher = [mpiexec(), "-n", "3"]
    nb, in_notebook = executed_example("mpi")
    script = tmp_path / "mpi_run.py"
    assert export_cli(NOTEBOOKS / "mpi.ipynb", "-o", script).returncode == 0
    try:
        proc, in_script = run_script(script, "--backend", "mpi", launcher=launcher)
    finally:
        assert wait_gone(mpi_processes(), timeout=15) == [], "MPI processes left behind"
    assert proc.returncode == 0, proc.stderr
    assert "under mpiexec: rank 0 is the master, 2 worker rank(s)" in proc.stderr
    assert_same_names(in_notebook, in_script, out_names(nb))


RANKS_NOTEBOOK = [
    "%load_ext pymw_magic\n%pymw use local --workers 5",
    "import os\nprint('NOTEBOOK CODE ON RANK', os.environ.get('PMI_RANK'))",
    "%%pymw --map n in range(40) --out squares\nimport os\n(n * n, os.environ.get('PMI_RANK'))",
    "print('SQUARES', [s for s, _ in squares] == [n * n for n in range(40)])\n"
    "print('TASK RANKS', sorted({r for _, r in squares}))",
]


@pytest.mark.parametrize("args", [["--backend", "mpi"], []], ids=["backend-mpi", "mpi-by-default"])
def test_under_mpiexec_rank0_runs_the_script_and_the_other_ranks_serve(tmp_path, args):
    launcher = [mpiexec(), "-n", "3"]
    nb = make_notebook(tmp_path / "ranks.ipynb", *RANKS_NOTEBOOK)
    assert export_cli(nb, "-o", tmp_path / "ranks.py").returncode == 0
    try:
        proc = run([*launcher, sys.executable, str(tmp_path / "ranks.py"), *args], cwd=tmp_path)
    finally:
        assert wait_gone(mpi_processes(), timeout=15) == [], "MPI processes left behind"
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # The notebook's code ran once, on rank 0; the tasks ran on ranks 1 and 2
    # (the notebook's "local --workers 5" gave way to the MPI world).
    assert [l for l in lines if l.startswith("NOTEBOOK CODE")] == ["NOTEBOOK CODE ON RANK 0"]
    assert "SQUARES True" in lines
    ranks = next(l for l in lines if l.startswith("TASK RANKS"))
    assert set(eval(ranks[len("TASK RANKS "):])) <= {"1", "2"}


def test_under_mpiexec_another_backend_is_refused(tmp_path):
    launcher = [mpiexec(), "-n", "2"]
    nb = make_notebook(tmp_path / "ranks.ipynb", *RANKS_NOTEBOOK)
    assert export_cli(nb, "-o", tmp_path / "ranks.py").returncode == 0
    try:
        proc = run([*launcher, sys.executable, str(tmp_path / "ranks.py"), "--backend", "local"], cwd=tmp_path)
    finally:
        assert wait_gone(mpi_processes(), timeout=15) == [], "MPI processes left behind"
    assert proc.returncode != 0
    assert "give --backend mpi" in proc.stderr
    assert "NOTEBOOK CODE" not in proc.stdout


# --- the backend at run time --------------------------------------------------------------------

OVERRIDE_NOTEBOOK = [
    "%load_ext pymw_magic\n%pymw use local --workers 2 --retries 3",
    "%%pymw --map x in range(12) --out doubled\n2 * x",
    "%pymw status",
]


def test_backend_and_options_are_chosen_at_run_time(tmp_path):
    nb = make_notebook(tmp_path / "override.ipynb", *OVERRIDE_NOTEBOOK)
    script = tmp_path / "override.py"
    assert export_cli(nb, "-o", script).returncode == 0

    plain, names = run_script(script)
    assert plain.returncode == 0, plain.stderr
    assert "pymw default: backend 'local' with 2 worker(s)" in plain.stdout

    moved, moved_names = run_script(script, "--backend", "simulator", "--workers", "5", "--seed", "3")
    assert moved.returncode == 0, moved.stderr
    assert "pymw default: backend 'simulator' with 5 worker(s)" in moved.stdout
    assert moved_names["doubled"] == names["doubled"]

    # Without --backend, options apply to the notebook's backend.
    more, _ = run_script(script, "--workers", "3")
    assert more.returncode == 0, more.stderr
    assert "pymw default: backend 'local' with 3 worker(s)" in more.stdout


@pytest.mark.parametrize("args, message", [
    (["--workers", "none"], "bad value for --workers"),
    (["--backend", "nowhere"], "invalid choice: 'nowhere'"),
    (["--seed", "1"], "unknown option --seed"),       # the local backend has no --seed
    (["extra"], "unrecognized arguments: extra"),
])
def test_bad_run_time_options_are_usage_errors(tmp_path, args, message):
    nb = make_notebook(tmp_path / "override.ipynb", *OVERRIDE_NOTEBOOK)
    script = tmp_path / "override.py"
    assert export_cli(nb, "-o", script).returncode == 0
    proc = run([sys.executable, str(script), *args], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "doubled" not in proc.stdout  # nothing ran


def test_a_run_time_option_may_name_a_function_the_script_defines(tmp_path):
    nb = make_notebook(tmp_path / "names.ipynb", "def pick(tasks, workers):\n    return tasks[0], workers[0]",
                       "%load_ext pymw_magic\n%pymw use local --workers 2",
                       "%%pymw --map x in range(3) --out r\nx + 1")
    script = tmp_path / "names.py"
    exported = export_cli(nb, "-o", script, "--policy", "pick")  # at export time, too
    assert exported.returncode == 0, exported.stderr
    proc, names = run_script(script, "--policy", "pick")
    assert proc.returncode == 0, proc.stderr
    assert names["r"] == ["list", [1, 2, 3]]
    # A name the script never defines is an error naming it, before any task.
    proc, names = run_script(script, "--policy", "nowhere")
    assert proc.returncode != 0 and "unknown policy 'nowhere'" in proc.stderr and "r" not in names


def test_pymw_magic_backends_says_each_options_default_once():
    proc = run([sys.executable, "-m", "pymw_magic.cli", "backends"], cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert {"local (pool)", "mpi (pool)", "simulator (pool)"} <= set(lines)
    options = [line for line in lines if line.startswith("  --")]
    assert options and all(line.count("(default") == 1 for line in options), options
    assert "  --workers        number of workers (default: the machine's cores)" in lines
    assert any(line.startswith("  --retries") and line.endswith("(default: 1)") for line in lines)


def test_help_lists_the_backends_and_their_options(tmp_path):
    nb = make_notebook(tmp_path / "override.ipynb", *OVERRIDE_NOTEBOOK)
    script = tmp_path / "override.py"
    assert export_cli(nb, "-o", script).returncode == 0
    proc = run([sys.executable, str(script), "--help"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 0
    for flag in ("--backend", "--workers", "--policy", "--failure-rate", "mpiexec -n N+1"):
        assert flag in proc.stdout


def test_export_time_backend_becomes_the_script_default(tmp_path):
    nb = make_notebook(tmp_path / "override.ipynb", *OVERRIDE_NOTEBOOK)
    script = tmp_path / "sim.py"
    assert export_cli(nb, "-o", script, "--backend", "simulator", "--workers", "4").returncode == 0
    proc, names = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert "pymw default: backend 'simulator' with 4 worker(s)" in proc.stdout
    # the notebook's local-only options do not follow it; its --retries does
    assert names["doubled"] == ["list", [2 * x for x in range(12)]]
    # and the command line still has the last word
    again, _ = run_script(script, "--backend", "local", "--workers", "1")
    assert "pymw default: backend 'local' with 1 worker(s)" in again.stdout


def test_the_notebooks_options_that_the_new_backend_lacks_are_dropped_with_a_note(tmp_path):
    nb = make_notebook(tmp_path / "sim.ipynb", "%load_ext pymw_magic\n%pymw use simulator --workers 3 --seed 1",
                       "%%pymw --map x in range(5) --out ys\nx + 1")
    script = tmp_path / "sim.py"
    assert export_cli(nb, "-o", script).returncode == 0
    proc, names = run_script(script, "--backend", "local")
    assert proc.returncode == 0, proc.stderr
    assert "the notebook's --seed do(es) not apply to the 'local' backend" in proc.stderr
    assert names["ys"] == ["list", [1, 2, 3, 4, 5]]


# --- IPython-isms: shell escapes, file magics, harmless magics ---------------------------------------

ISMS_NOTEBOOK = [
    "%load_ext pymw_magic\n%matplotlib inline\n%pymw use local --workers 2",
    "import os\nword = 'hello'\n!echo {word} from the shell > greeting.txt\ngreeting = !cat greeting.txt\n"
    "%env PYMW_EXPORT_TEST=yes\nenv_value = os.environ['PYMW_EXPORT_TEST']",
    "%%writefile helper_mod.py\ndef triple(v):\n    return 3 * v\n",
    "%time import helper_mod\nlen?\ntripled = [helper_mod.triple(v) for v in range(3)]",
    "%%bash\necho bash says hi > bash.txt",
    "bash_text = open('bash.txt').read()",
    "%%time\nloop = [i for i in range(3)]\nfor i in range(2):\n    !echo loop {i}",
    "%%pymw --map v in range(4) --out cubes\nimport helper_mod\nhelper_mod.triple(v) ** 3",
    "%%pymw --nowait --out later\nsum(range(10))",
    "later_result = later.result()",
    "%%pymw --name total\nsum(cubes)",
    "shown = _pymw_job.result()\n%pymw dashboard",
]


def test_shell_escapes_file_magics_and_harmless_magics(kernel_env, tmp_path):
    nb_dir, script_dir = tmp_path / "nb", tmp_path / "script"
    script_dir.mkdir()
    nb = make_notebook(nb_dir / "isms.ipynb", *ISMS_NOTEBOOK)
    executed, in_notebook = execute(nb, nb_dir)

    script = script_dir / "isms.py"
    exported = export_cli(nb, "-o", script)
    assert exported.returncode == 0, exported.stderr
    text = script.read_text()
    assert "pymw.system(pymw.expand('echo {word} from the shell > greeting.txt'))" in text
    assert "greeting = pymw.getoutput('cat greeting.txt')" in text
    assert "os.environ['PYMW_EXPORT_TEST'] = 'yes'" in text
    assert "# %matplotlib inline  # pymw export:" in text and "# %pinfo len  # pymw export:" in text
    assert "# %pymw dashboard  # pymw export:" in text
    assert "later = pymw.run(later_task, name='cell-9', nowait=True)" in text
    assert "pymw.run(total_task, name='total', show=11)" in text  # shown as Out[11]

    proc, in_script = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert_same_names(in_notebook, in_script,
                      {"greeting", "env_value", "tripled", "bash_text", "cubes", "later_result", "shown"})
    assert in_script["greeting"] == ["list", ["hello from the shell"]]
    assert "loop 0\nloop 1\n" in proc.stdout
    # The cell without --out shows its value, as the notebook's Out[N].
    total = next(c for c in executed.cells if c.source.startswith("%%pymw --name total"))
    assert text_of(total).strip().splitlines()[-1] in proc.stdout.splitlines()


FAILING_SHELL_NOTEBOOK = [
    "import os\nos.mkdir('existing')\nprint('before')\n!exit 3\ncode = _exit_code\nprint('after')",
    "!mkdir existing\nmade = os.path.isdir('existing')",
    "lines = !ls no-such-file-here\nboth = !echo out; echo err >&2",
]


def test_a_failing_shell_command_is_reported_and_the_script_goes_on(kernel_env, tmp_path):
    """As in IPython: ``!cmd`` prints its error and the cell goes on;
    ``x = !cmd`` holds stdout and stderr lines; ``_exit_code`` is its status."""
    nb_dir, script_dir = tmp_path / "nb", tmp_path / "script"
    script_dir.mkdir()
    nb = make_notebook(nb_dir / "fails.ipynb", *FAILING_SHELL_NOTEBOOK)
    executed, in_notebook = execute(nb, nb_dir)
    script = script_dir / "fails.py"
    assert export_cli(nb, "-o", script).returncode == 0
    proc, in_script = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["before", "after"]
    assert "CalledProcessError" not in proc.stderr
    assert "existing" in proc.stderr  # mkdir's own complaint
    assert_same_names(in_notebook, in_script, {"code", "made", "lines", "both"})
    assert in_script["code"] == 3
    assert in_script["lines"][1] and "no-such-file-here" in in_script["lines"][1][0]
    assert in_script["both"] == ["list", ["out", "err"]]


def test_a_cell_tagged_raises_exception_is_reported_and_the_script_goes_on(tmp_path):
    proc = export_and_run(tmp_path, "raises", "x = 1",
                          ("print('cell two')\nraise ValueError('expected')", ["raises-exception"]),
                          "print('after', x)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["cell two", "after 1"]
    assert "ValueError: expected" in proc.stderr and "tag raises-exception" in proc.stderr


def test_a_failing_task_stops_the_script_with_its_input_and_remote_line(tmp_path):
    nb = make_notebook(tmp_path / "fail.ipynb", "%load_ext pymw_magic\n%pymw use local --workers 2",
                       "%%pymw --map x in [2, 1, 0] --out ratios\n# a comment the script keeps\n6 / x",
                       "print('never')")
    script = tmp_path / "fail.py"
    assert export_cli(nb, "-o", script).returncode == 0
    text = script.read_text()
    assert "    # a comment the script keeps\n    return 6 / x\n" in text
    proc = run([sys.executable, str(script)], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "never" not in proc.stdout
    assert "ZeroDivisionError" in proc.stderr
    assert "task 2 failed on input x=0" in proc.stderr
    # the remote traceback names the script's own file and line
    line = text.splitlines().index("    return 6 / x") + 1
    assert f'File "{script}", line {line}, in ratios_task' in proc.stderr


# --- the script binds what the notebook binds: the audit's cases -------------------------------

AGREEING_NOTEBOOKS = {
    # a name a cell assigns only in a branch, a loop or a try, not defined in the notebook
    "conditional-assignment": [
        "%load_ext pymw_magic\n%pymw use local --workers 2",
        "%%pymw --map x in [1, 2] --out r_if\nif x:\n    y = x * 2\ny",
        "%%pymw --map x in [1, 2] --out r_for\nfor i in range(x):\n    z = i\nz",
        "%%pymw --map x in [1, 2] --out r_try\ntry:\n    w = 10 // x\nexcept ZeroDivisionError:\n    pass\nw",
    ],
    # a class body in the cell reads a notebook name
    "class-body-reads": [
        "%load_ext pymw_magic\n%pymw use local --workers 2",
        "base = 5",
        "%%pymw --map x in range(2) --out r_class\nclass Model:\n    factor = base * 2\nModel.factor + x",
    ],
    # the %%pymw line is Python, taken as written in both
    "line-as-written": [
        "%load_ext pymw_magic\n%pymw use local --workers 2",
        "k, n, label = 99, 3, 'expanded'",
        '%%pymw --map s in [f"{k}" for k in range(n)] --out fs --name $label\ns',
        "job_name = _pymw_job.name",
        "%%pymw --map x in sorted({n + 1}) --out one\nx",
    ],
    # %%time and %%capture above a %%pymw cell
    "time-over-pymw": [
        "%load_ext pymw_magic\n%pymw use local --workers 2",
        "%%time\n%%pymw --map x in range(3) --out timed\nx * 3",
        "%%capture\n%%pymw --map x in range(2) --out captured\nx + 1",
        "%%time\n%%pymw --map x in range(2)\nx - 1",
        "shown_by_time = _",
    ],
    # _, __, ___, _N and Out[N] as IPython's display hook binds them
    "output-history": [
        "%load_ext pymw_magic\n%pymw use local --workers 2",
        "%%pymw --map x in range(3)\nx * 2",
        "after = _",
        "3 + 4",
        "quiet = 1;",
        "print('printed, not shown')",
        "latest, before, older = _, __, ___",
        "from_out, from_n, seven = Out[2], _2, _4",
        "%%pymw\n_ + 1",
        "task_read_under = _",
    ],
    # del of a notebook name in a cell; the jobs' names are the notebook's
    "del-and-job-names": [
        "%load_ext pymw_magic\n%pymw use local --workers 2",
        "tmp = 5",
        "%%pymw --out r_del\ndoubled = tmp * 2\ndel tmp\ndoubled",
        "name_1 = _pymw_job.name",
        "%%pymw --map x in range(2) --out r_map\nx",
        "name_2 = _pymw_job.name\nstill = tmp",
    ],
    # options naming the notebook's own functions, as the README documents
    "notebook-names-as-options": [
        "%load_ext pymw_magic",
        "def model(x):\n    return 2.0 * x",
        "%pymw use simulator --workers 2 --duration model",
        "%%pymw --map x in range(4) --out t\nx",
        "makespan = _pymw_job.report().makespan",
        "def pick(tasks, workers):\n    return tasks[-1], workers[0]",
        "%pymw use local --workers 2 --policy pick",
        "%%pymw --map x in range(3) --out picked\nx * 10",
        "%%pymw --map x in range(2) --out cell_picked --policy pick --workers 1\nx + 1",
    ],
}


@pytest.mark.parametrize("case", list(AGREEING_NOTEBOOKS))
def test_the_script_binds_what_the_notebook_binds(case, kernel_env, tmp_path):
    nb_dir, script_dir = tmp_path / "nb", tmp_path / "script"
    script_dir.mkdir()
    nb = make_notebook(nb_dir / f"{case}.ipynb", *AGREEING_NOTEBOOKS[case])
    executed, in_notebook = execute(nb, nb_dir)
    script = script_dir / f"{case}.py"
    exported = export_cli(nb, "-o", script)
    assert exported.returncode == 0, exported.stderr
    proc, in_script = run_script(script)
    assert proc.returncode == 0, proc.stderr
    must = {name for cell in AGREEING_NOTEBOOKS[case] for name in re.findall(r"--out (\w+)", cell)}
    assert_same_names(in_notebook, in_script, must)
    expected = {
        "conditional-assignment": {"r_if": ["list", [2, 4]], "r_for": ["list", [0, 1]],
                                   "r_try": ["list", [10, 5]]},
        "class-body-reads": {"r_class": ["list", [10, 11]]},
        "line-as-written": {"fs": ["list", ["0", "1", "2"]], "job_name": "$label", "one": ["list", [4]]},
        "time-over-pymw": {"timed": ["list", [0, 3, 6]], "captured": ["list", [1, 2]],
                           "shown_by_time": ["list", [-1, 0]]},
        "output-history": {"after": ["list", [0, 2, 4]], "latest": 7, "before": ["list", [0, 2, 4]],
                           "older": "", "seven": 7, "task_read_under": 8},
        "del-and-job-names": {"r_del": 10, "name_1": "cell-3", "name_2": "cell-5", "still": 5},
        "notebook-names-as-options": {"makespan": ["float", "8.0"], "picked": ["list", [0, 10, 20]],
                                      "cell_picked": ["list", [1, 2]]},
    }[case]
    assert {name: in_notebook.get(name) for name in expected} == expected


def test_script_stops_the_widgets_thread_before_it_exits(tmp_path):
    nb = make_notebook(
        tmp_path / "sweeping.ipynb", "%load_ext pymw_magic\n%pymw use local --workers 2",
        "import pymw_magic\nsw = pymw_magic.sweep(lambda seed, r=1: seed * r, over=range(20), r=(1, 3))\nsw",
        "sw.controls['r'].value = 2\nsw.job.wait()\nlast = sorted(sw.results())")
    script = tmp_path / "sweeping.py"
    assert export_cli(nb, "-o", script).returncode == 0
    wrapper = tmp_path / "threads.py"
    wrapper.write_text("import runpy, sys, threading\n"
                       "sys.argv = sys.argv[1:]\n"
                       "ns = runpy.run_path(sys.argv[0], run_name='__main__')\n"
                       "print('LAST', ns['last'] == [2 * s for s in range(20)])\n"
                       "print('ALIVE', sorted(t.name for t in threading.enumerate() if t.name == 'pymw-widgets'))\n")
    proc = run([sys.executable, str(wrapper), str(script)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LAST True" in proc.stdout
    # pymw.close() joined the ticker: nothing draws while the interpreter shuts down
    assert "ALIVE []" in proc.stdout


def test_an_unpicklable_map_item_fails_in_the_script_before_any_task(tmp_path):
    proc = export_and_run(tmp_path, "gen", "%load_ext pymw_magic\n%pymw use local --workers 1",
                          "def gen():\n    yield 1",
                          ("%%pymw --map x in [gen()] --out r\nx", ["raises-exception"]),
                          "print('went on')")
    assert proc.returncode == 0, proc.stderr
    assert "PayloadError: --map 'x': item 0 cannot be sent to workers: x=<generator" in proc.stderr
    assert "went on" in proc.stdout


# --- bad input ----------------------------------------------------------------------------------------

def test_not_a_notebook_is_a_clear_error(tmp_path):
    text = tmp_path / "notes.ipynb"
    text.write_text("just some text\n")
    proc = export_cli(text)
    assert proc.returncode == 1
    assert "is not a notebook: it is not JSON" in proc.stderr

    other = tmp_path / "other.ipynb"
    other.write_text(json.dumps({"hello": "world"}))
    proc = export_cli(other)
    assert proc.returncode == 1
    assert "is not a notebook: JSON without a list of 'cells'" in proc.stderr

    r_nb = tmp_path / "r.ipynb"
    r_nb.write_text(json.dumps({"cells": [], "metadata": {"kernelspec": {"language": "R"}},
                                "nbformat": 4, "nbformat_minor": 5}))
    proc = export_cli(r_nb)
    assert proc.returncode == 1 and "is a R notebook" in proc.stderr
    assert not list(tmp_path.glob("*.py"))


def test_cells_that_are_not_cells_are_a_clear_error(tmp_path):
    strings = tmp_path / "strings.ipynb"
    strings.write_text(json.dumps({"cells": ["print(1)"], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    proc = export_cli(strings)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is not a valid notebook: cell 1 is a JSON str" in proc.stderr
    odd = tmp_path / "odd.ipynb"
    odd.write_text(json.dumps({"cells": [{"cell_type": "code", "source": 3}], "metadata": {}}))
    proc = export_cli(odd)
    assert proc.returncode == 1 and "cell 1 has a 'source' that is neither text" in proc.stderr


def test_a_script_given_as_the_notebook_is_not_a_notebook(tmp_path):
    script = tmp_path / "some.py"
    script.write_text("print('hello')\n")
    proc = export_cli(script)
    assert proc.returncode == 1
    assert "some.py is not a notebook" in proc.stderr and "refusing" not in proc.stderr
    assert script.read_text() == "print('hello')\n"


@pytest.mark.parametrize("output, message", [
    ("/proc/pymw-export-test.py", "cannot write the script to /proc/pymw-export-test.py"),
    ("{tmp}/no/such/dir/run.py", "the directory {tmp}/no/such/dir does not exist"),
    ("{tmp}", "is a directory"),
])
def test_an_output_that_cannot_be_written_is_a_clear_error(tmp_path, output, message):
    nb = make_notebook(tmp_path / "small.ipynb", "x = 1")
    proc = export_cli(nb, "-o", output.format(tmp=tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "no").exists()  # a typo in -o makes no directories


def test_a_missing_notebook_is_a_clear_error(tmp_path):
    proc = export_cli(tmp_path / "nowhere.ipynb")
    assert proc.returncode == 1
    assert "nowhere.ipynb: no such file" in proc.stderr


UNSUPPORTED_NOTEBOOK = [
    "%load_ext pymw_magic\nx = 2",
    "y = x + 1\n%run helpers.py\nz = y * 2",
    "%%cython\ndef f(): pass",
    "%%pymw --map v in range(3) --out ws\nv + x",
    "await_me = 1\n%pip install numpy",
]


def test_unsupported_magics_are_listed_with_their_cells_and_lines(tmp_path):
    nb = make_notebook(tmp_path / "odd.ipynb", *UNSUPPORTED_NOTEBOOK)
    proc = export_cli(nb, "-o", tmp_path / "odd.py")
    assert proc.returncode == 1
    err = proc.stderr
    assert "cell 2, line 2: %run helpers.py" in err
    assert "cell 3, line 1: %%cython" in err
    assert "cell 5, line 2: %pip install numpy" in err and "install them in the environment" in err
    assert "--skip-unsupported" in err
    assert not (tmp_path / "odd.py").exists()


def test_skip_unsupported_comments_them_out_with_a_warning(tmp_path):
    nb = make_notebook(tmp_path / "odd.ipynb", *UNSUPPORTED_NOTEBOOK)
    script = tmp_path / "odd.py"
    proc = export_cli(nb, "-o", script, "--skip-unsupported")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: skipped") == 3
    text = script.read_text()
    assert "WARNING: 3 cell line(s)" in text
    assert "# %run helpers.py  # pymw export: SKIPPED" in text
    assert "# %pip install numpy  # pymw export: SKIPPED" in text
    assert "# %%cython" in text
    ran, names = run_script(script)
    assert ran.returncode == 0, ran.stderr
    assert names["z"] == 6 and names["ws"] == ["list", [2, 3, 4]]


@pytest.mark.parametrize("cell, message", [
    ("%%pymw --map v in range(3) --wokers 2\nv", "unknown option --wokers"),
    ("%%pymw --map v in range(3)\nreturn v", "'return' outside function"),
    ("%pymw use nowhere", "unknown backend 'nowhere'"),
    ("x = get_ipython().user_ns", "a script has no IPython shell"),
    ("import asyncio\nawait asyncio.sleep(0)", "wrap it in asyncio.run"),
    # the %%pymw line is Python, as the magic reads it: no $name expansion
    ("%%pymw --map x in range($n)\nx", "--map expects 'TARGET in EXPR'"),
    ("%%pymw\nfrom math import *\nsqrt(2)", "import the names the cell uses"),
])
def test_cells_the_notebook_would_reject_or_a_script_cannot_run_are_errors(tmp_path, cell, message):
    nb = make_notebook(tmp_path / "bad.ipynb", "%load_ext pymw_magic", cell)
    proc = export_cli(nb, "-o", tmp_path / "bad.py")
    assert proc.returncode == 1
    assert "cell 2, line" in proc.stderr and message in proc.stderr


# --- %pymw export in a real kernel ----------------------------------------------------------------------

EXPORTING_NOTEBOOK = [
    "%load_ext pymw_magic\n%pymw use local --workers 2",
    "base = 10",
    "%%pymw --map x in range(5) --out shifted\nbase + x",
]


def test_pymw_export_finds_the_running_notebook(kernel_env, tmp_path, monkeypatch):
    nb = make_notebook(tmp_path / "live.ipynb", *EXPORTING_NOTEBOOK, "%pymw export -o exported.py")
    monkeypatch.setenv("JPY_SESSION_NAME", str(nb))  # what jupyter-server tells its kernels
    executed, in_notebook = execute(nb, tmp_path)
    assert f"pymw: wrote exported.py from {nb}" in text_of(executed.cells[-1])
    proc, in_script = run_script(tmp_path / "exported.py")
    assert proc.returncode == 0, proc.stderr
    assert_same_names(in_notebook, in_script, {"shifted", "base"})


def test_pymw_export_without_a_front_end_asks_for_the_path(kernel_env, tmp_path, monkeypatch):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    nb = make_notebook(tmp_path / "live.ipynb", *EXPORTING_NOTEBOOK,
                       ("%pymw export -o first.py", ["raises-exception"]),
                       "%pymw export live.ipynb -o second.py")
    executed, _ = execute(nb, tmp_path)
    asked = text_of(executed.cells[-2])
    assert "UsageError" in asked and "cannot tell which notebook" in asked
    assert "%pymw export NOTEBOOK.ipynb -o SCRIPT.py" in asked
    assert not (tmp_path / "first.py").exists()
    assert "pymw: wrote second.py from live.ipynb" in text_of(executed.cells[-1])
    assert "shifted = pymw.map(shifted_task, range(5), name='cell-3')" in (tmp_path / "second.py").read_text()


def test_a_cells_function_keeps_its_comments_and_strings_exactly():
    from pymw_magic.cellfunc import UNSET, compile_cell

    body = ('# why this is done\nnote = """first\n  second"""  # kept\n'
            'data = data + [x]\nlen(note) + len(data)\n')
    cell = compile_cell(body, params=("x",))
    source = cell.to_source("demo_task")
    assert source.startswith("def demo_task(x, *, data=globals().get('data', UNSET)):\n"
                             "    if data is UNSET:  # not defined before the cell: unbound, as in the notebook\n"
                             "        del data\n"
                             "    # why this is done\n")
    assert '    note = """first\n  second"""  # kept\n' in source  # the string's text unchanged
    assert "    return len(note) + len(data)\n" in source
    namespace = {"data": [1], "UNSET": UNSET}
    exec(source, namespace)
    assert namespace["demo_task"](2) == len("first\n  second") + 2
    assert namespace["data"] == [1]
