"""Tests of the %pymw / %%pymw magics on IPython's InteractiveShell.

The magics run real local workers (2 at most: the machine has 2 cores).
Every test unloads the extension at the end, which shuts its masters down;
the ``no_workers_left`` checks make sure no worker process survives that.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback

import psutil
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython

from pymw_magic import Job, PayloadError, TaskFailed
from pymw_magic import magics as magics_mod

WORKERS = 2


def get_ipython() -> InteractiveShell:
    """IPython's test shell (made once per process; later calls reuse it)."""
    return start_ipython() or InteractiveShell.instance()


def _children() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:  # a process that exits while listed is left out
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids: set[int], limit: float = 30.0) -> set[int]:
    """The pids of ``pids`` still alive after waiting up to ``limit`` s."""
    deadline = time.monotonic() + limit
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if alive:
            time.sleep(0.05)
    return alive


@pytest.fixture
def ip():
    shell = get_ipython()
    before = _children()
    shell.run_line_magic("load_ext", "pymw_magic")
    # Names the tests define are removed afterwards, so tests stay independent.
    names = set(shell.user_ns)
    try:
        yield shell
    finally:
        shell.run_line_magic("unload_ext", "pymw_magic")
        for name in set(shell.user_ns) - names:
            del shell.user_ns[name]
        assert not _wait_gone(_children() - before), "a worker process outlived its master"


def session(shell) -> magics_mod.Session:
    return magics_mod.loaded_magics(shell).session


def cell(shell, line: str, body: str):
    return shell.run_cell_magic("pymw", line, body)


def use_local(shell) -> None:
    shell.run_line_magic("pymw", f"use local --workers {WORKERS}")


# --- registration -------------------------------------------------------------------

def test_load_ext_registers_line_and_cell_magic_and_unload_removes_them():
    shell = get_ipython()
    shell.run_line_magic("load_ext", "pymw_magic")
    try:
        assert "pymw" in shell.magics_manager.magics["line"]
        assert "pymw" in shell.magics_manager.magics["cell"]
    finally:
        shell.run_line_magic("unload_ext", "pymw_magic")
    assert "pymw" not in shell.magics_manager.magics["line"]
    assert "pymw" not in shell.magics_manager.magics["cell"]


# --- the cell magic -----------------------------------------------------------------

def test_map_cell_calls_notebook_function_and_lambda_and_binds_results(ip, capsys):
    use_local(ip)
    ip.run_cell("k = 10\ndef scale(v):\n    return v * k\nshift = lambda v: v + 1\n")
    assert cell(ip, "--map x in range(6) --out res", "print('item', x)\nscale(shift(x))\n") is None
    assert ip.user_ns["res"] == [10, 20, 30, 40, 50, 60]
    out = capsys.readouterr().out
    # Each task's output, printed after the job in input order.
    assert [line for line in out.splitlines() if line.startswith("item")] == [
        f"item {i}" for i in range(6)]


def test_tuple_target_maps_over_zip(ip):
    use_local(ip)
    ip.user_ns.update(xs=[1, 2, 3], ys=[10, 20, 30])
    cell(ip, "--map a, b in zip(xs, ys) --out sums", "a + b\n")
    assert ip.user_ns["sums"] == [11, 22, 33]


def test_without_map_the_cell_runs_once_remotely(ip):
    use_local(ip)
    value = cell(ip, "", "import os\nos.getpid()\n")
    assert isinstance(value, int) and value != os.getpid()
    cell(ip, "--out pid", "import os\nos.getpid()\n")
    assert ip.user_ns["pid"] != os.getpid()


def test_assigned_names_stay_in_the_task_and_reads_are_captured_at_submit(ip):
    use_local(ip)
    ip.user_ns.update(y="notebook", base=5)
    cell(ip, "--map x in range(3) --out res", "y = x + base\ny\n")
    assert ip.user_ns["res"] == [5, 6, 7]
    assert ip.user_ns["y"] == "notebook"


def test_nowait_binds_the_job_at_once(ip):
    use_local(ip)
    ip.user_ns["gate"] = 0.2
    assert cell(ip, "--map x in range(3) --out job --nowait --name slow",
                "import time\ntime.sleep(gate)\nx * 2\n") is None
    job = ip.user_ns["job"]
    assert isinstance(job, Job) and job.name == "slow"
    assert job.result(timeout=60) == [0, 2, 4]
    # Without --out, the job goes to _pymw_job.
    cell(ip, "--nowait", "7\n")
    assert ip.user_ns["_pymw_job"].result(timeout=60) == [7]


def test_cell_options_pass_to_the_job(ip):
    use_local(ip)
    cell(ip, "--map x in range(8) --out res --name squares --chunksize 4 --retries 0 --timeout 60",
         "x * x\n")
    assert ip.user_ns["res"] == [x * x for x in range(8)]
    job = ip.user_ns["_pymw_job"]
    assert job.name == "squares" and job.chunksize == 4
    assert job.retries == 0 and job.timeout == 60.0
    # Job-level options do not make another master.
    assert len(session(ip).masters) == 1


def test_a_cell_asking_for_other_workers_gets_a_cached_master(ip):
    use_local(ip)
    default = session(ip).default
    cell(ip, "--workers 1 --out a", "1\n")
    cell(ip, "--workers 1 --out b", "2\n")
    masters = session(ip).masters
    assert len(masters) == 2 and masters[0] is default
    assert masters[1].workers == 1 and len(masters[1].jobs) == 2
    # Asking for what the default already is uses the default.
    cell(ip, f"--workers {WORKERS} --backend local --out c", "3\n")
    assert len(session(ip).masters) == 2 and len(default.jobs) == 1


def test_first_plain_cell_makes_a_default_local_master(ip):
    assert session(ip).default is None
    cell(ip, "--out r", "41 + 1\n")
    assert ip.user_ns["r"] == 42
    assert session(ip).default.backend_name == "local"


# --- errors before any task starts --------------------------------------------------

def _no_jobs(shell) -> bool:
    return all(not m.jobs for m in session(shell).masters)


@pytest.mark.parametrize("line, expected", [
    ("--bogus 3", ["--bogus", "--map", "--workers", "--python"]),
    ("--workers many", ["--workers", "'many'"]),
    ("--workers 0", ["--workers", ">= 1"]),
    ("--policy nonsense", ["--policy", "fifo"]),
    ("--backend nowhere", ["nowhere", "local"]),
    ("--retries -1", ["--retries"]),
    ("--timeout 0", ["--timeout"]),
    ("--out 2bad", ["--out"]),
    ("--chunksize x", ["--chunksize"]),
    ("--map x range(3)", ["TARGET in EXPR"]),
    ("--map obj.attr in xs", ["target"]),
    ("--map x in xs --map y in ys", ["twice"]),
    ("--workers", ["--workers", "needs a value"]),
    ("stray", ["stray"]),
])
def test_bad_cell_options_are_usage_errors_listing_what_is_valid(ip, line, expected):
    use_local(ip)
    with pytest.raises(UsageError) as info:
        cell(ip, line, "1\n")
    for text in expected:
        assert text in str(info.value)
    assert _no_jobs(ip) and len(session(ip).masters) == 1


def test_usage_error_comes_before_evaluating_anything(ip):
    ip.user_ns["calls"] = []
    with pytest.raises(UsageError):
        cell(ip, "--map x in calls.append(1) or [1] --bogus 1", "x\n")
    assert ip.user_ns["calls"] == []
    assert session(ip).masters == []  # no master was even made


def test_syntax_error_points_at_the_cells_line(ip):
    use_local(ip)
    with pytest.raises(SyntaxError) as info:
        cell(ip, "--map x in range(3)", "y = x\nz = (y +\n")
    # Line 1 is the %%pymw line; the unclosed paren is on line 3.
    assert info.value.lineno == 3
    assert info.value.filename.startswith("<pymw-cell-")
    assert "z = (y +" in info.value.text
    assert _no_jobs(ip)


def test_name_error_names_the_undefined_name(ip):
    use_local(ip)
    with pytest.raises(NameError) as info:
        cell(ip, "--map x in range(3)", "y = x + not_defined_anywhere\ny\n")
    assert info.value.name == "not_defined_anywhere"
    assert "not_defined_anywhere" in str(info.value)
    # Raised "at" the cell line that reads it (line 1 is the %%pymw line).
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert last.filename.startswith("<pymw-cell-") and last.lineno == 2
    assert last.line == "y = x + not_defined_anywhere"
    assert _no_jobs(ip)


def test_unpicklable_capture_is_a_payload_error_naming_it(ip):
    use_local(ip)
    ip.run_cell("import threading\nthe_lock = threading.Lock()\n")
    with pytest.raises(PayloadError) as info:
        cell(ip, "--map x in range(3)", "with the_lock:\n    x\n")
    assert "'the_lock'" in str(info.value) and "lock" in str(info.value).lower()
    assert _no_jobs(ip)


def test_an_item_that_does_not_unpack_fails_before_any_task(ip):
    use_local(ip)
    ip.user_ns["pairs"] = [(1, 2), (3, 4, 5)]
    with pytest.raises(ValueError) as info:
        cell(ip, "--map a, b in pairs", "a + b\n")
    assert "item 1" in str(info.value) and "(3, 4, 5)" in str(info.value)
    assert _no_jobs(ip)


# --- failing tasks -------------------------------------------------------------------

def test_failing_task_raises_original_type_with_input_and_remote_traceback(ip, capsys):
    use_local(ip)
    body = "print('running', x)\nif x == 2:\n    raise ValueError(f'bad input {x}')\nx * 10\n"
    with pytest.raises(ValueError) as info:
        cell(ip, "--map x in range(4) --out res", body)
    err = info.value
    assert str(err) == "bad input 2"
    notes = "\n".join(getattr(err, "__notes__", []))
    assert "x=2" in notes and "'res'" in notes
    # The remote traceback names the cell's own line: line 1 is %%pymw, raise is line 4.
    remote = str(err.__cause__)
    assert "<pymw-cell-" in remote and "line 4, in <cell>" in remote
    assert "raise ValueError(f'bad input {x}')" in remote
    # The finished results are kept; the failed position holds its exception.
    res = ip.user_ns["res"]
    assert res[0] == 0 and res[1] == 10 and res[3] == 30
    assert res[2] is err
    # The notebook's traceback ends in the cell, at the failing line.
    last = traceback.extract_tb(err.__traceback__)[-1]
    assert last.filename.startswith("<pymw-cell-") and last.lineno == 4
    assert last.line == "raise ValueError(f'bad input {x}')"
    # The failed task's output is shown with its error.
    out = capsys.readouterr().out
    assert "output of failed task 2 (x=2)" in out and "ValueError: bad input 2" in out
    assert out.index("running 1") < out.index("output of failed task 2") < out.index("running 2")


def test_unpicklable_task_exception_becomes_task_failed(ip):
    use_local(ip)
    body = ("class Local(Exception):\n    def __reduce__(self):\n        raise TypeError('no')\n"
            "raise Local('custom failure')\n")
    with pytest.raises(TaskFailed) as info:
        cell(ip, "--out r", body)
    assert "custom failure" in str(info.value)
    assert isinstance(ip.user_ns["r"], TaskFailed)


def test_failure_shown_by_run_cell_has_the_note_and_the_cell_line(ip, capsys):
    use_local(ip)
    result = ip.run_cell("%%pymw --map x in [1, 0]\nfirst = 1\n1 / x\n")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    out = capsys.readouterr().out
    assert "line 3, in <cell>" in out
    assert "task 1 failed on input x=0" in out


# --- interrupt ----------------------------------------------------------------------

def test_interrupt_cancels_the_job_and_stops_its_workers(ip, tmp_path):
    use_local(ip)
    ip.user_ns["marks"] = str(tmp_path)  # each task marks that it is inside its sleep
    master = session(ip).default
    # Let both workers come up before taking their pids.
    cell(ip, "--map x in range(4)", "x\n")
    pids = {w["pid"] for w in master.worker_info() if w.get("pid")}
    assert pids

    def interrupt_when_running():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            job = ip.user_ns.get("_pymw_job")
            if job is not None and job.name == "sleepy" and any(tmp_path.iterdir()):
                os.kill(os.getpid(), signal.SIGINT)  # a task is sleeping now
                return
            time.sleep(0.02)

    thread = threading.Thread(target=interrupt_when_running, daemon=True)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        cell(ip, "--map x in range(6) --out partial --name sleepy",
             "import os, time\nopen(os.path.join(marks, str(x)), 'w').close()\ntime.sleep(120)\nx\n")
    thread.join()
    job = ip.user_ns["_pymw_job"]
    assert job.done()
    counts = job.counts()
    assert counts["cancelled"] == 6 and counts["done"] == 0
    assert len(ip.user_ns["partial"]) == 6
    # The workers that were running the sleeping tasks were stopped.
    assert not _wait_gone(pids), "a worker running an interrupted task is still alive"
    # The master still works afterwards (stopped workers are replaced).
    assert cell(ip, "--map x in range(2)", "x + 1\n") == [1, 2]


# --- line magic subcommands -----------------------------------------------------------

def test_use_replaces_and_shuts_down_the_old_default(ip, capsys):
    use_local(ip)
    old = session(ip).default
    old_pids = {w["pid"] for w in old.worker_info() if w.get("pid")}
    ip.run_line_magic("pymw", "use local --workers 1")
    new = session(ip).default
    assert new is not old and new.workers == 1
    assert session(ip).masters == [new]
    assert not _wait_gone(old_pids)
    assert "backend 'local' with 1 worker(s)" in capsys.readouterr().out


@pytest.mark.parametrize("line, expected", [
    ("use", ["BACKEND", "local"]),
    ("use nowhere", ["nowhere", "local"]),
    ("use local --workers x", ["--workers"]),
    ("use local --map x in y", ["--map"]),
    ("use local --nonsense 1", ["--nonsense", "--workers", "--python"]),
    ("frobnicate", ["frobnicate", "use", "status"]),
    ("cancel no-such-job", ["no-such-job"]),
])
def test_bad_line_magic_usage(ip, line, expected):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("pymw", line)
    for text in expected:
        assert text in str(info.value)
    assert session(ip).masters == []


def test_status_and_jobs_show_backend_workers_and_counts(ip, capsys):
    ip.run_line_magic("pymw", "status")
    assert "no master" in capsys.readouterr().out
    use_local(ip)
    cell(ip, "--map x in range(3) --name good", "x\n")
    with pytest.raises(ZeroDivisionError):
        cell(ip, "--map x in range(2) --name bad", "1 / x\n")
    capsys.readouterr()
    ip.run_line_magic("pymw", "status")
    out = capsys.readouterr().out
    assert f"backend 'local' with {WORKERS} worker(s)" in out
    assert "'good' (finished): done 3" in out
    assert "'bad' (failed): done 1, failed 1" in out
    ip.run_line_magic("pymw", "jobs")
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[1] for r in rows] == ["good", "bad"]
    assert rows[1][3] == "failed"


def test_cancel_by_name_and_all(ip, capsys):
    use_local(ip)
    cell(ip, "--map x in range(4) --name first --nowait", "import time\ntime.sleep(60)\n")
    cell(ip, "--map x in range(4) --name second --nowait", "import time\ntime.sleep(60)\n")
    first, second = session(ip).default.jobs
    ip.run_line_magic("pymw", "cancel first")
    assert first.wait(timeout=30) and first.counts()["cancelled"] == 4
    assert not second.done()
    ip.run_line_magic("pymw", "cancel")  # every active job
    assert second.wait(timeout=30) and second.counts()["cancelled"] == 4
    out = capsys.readouterr().out
    assert "cancelled job" in out and "'first'" in out and "'second'" in out
    # By id too; nothing left to cancel is said so.
    ip.run_line_magic("pymw", f"cancel {first.id}")
    ip.run_line_magic("pymw", "cancel")
    assert "no active job" in capsys.readouterr().out


def test_help_lists_subcommands_options_and_backends(ip, capsys):
    ip.run_line_magic("pymw", "help")
    out = capsys.readouterr().out
    for text in ["%pymw use", "%pymw status", "%pymw cancel", "--map", "--nowait", "--chunksize",
                 "--policy", "local", "--python"]:
        assert text in out


def test_subcommands_can_be_added_by_other_modules(ip, capsys):
    @magics_mod.subcommand("echo-test", "%pymw echo-test ARGS", "echo for the test")
    def _echo(magics, args):
        print("echo:", args, type(magics).__name__)
        return args.upper()
    try:
        assert ip.run_line_magic("pymw", "echo-test hello there") == "HELLO THERE"
        assert "echo: hello there PymwMagics" in capsys.readouterr().out
        ip.run_line_magic("pymw", "help")
        assert "%pymw echo-test ARGS" in capsys.readouterr().out
    finally:
        del magics_mod.SUBCOMMANDS["echo-test"]


# --- option parsing ---------------------------------------------------------------------

def test_map_spec_keeps_spaces_quotes_and_brackets():
    parsed = magics_mod.parse_options("--map s in ['a --b', \"c d\"] + [f(1, 2)] --out r --nowait")
    assert parsed.options == {"map": "s in ['a --b', \"c d\"] + [f(1, 2)]", "out": "r",
                              "nowait": True}
    parsed = magics_mod.parse_options("--out=r --map=a, b in zip(xs, ys)")
    assert parsed.options == {"out": "r", "map": "a, b in zip(xs, ys)"}
    assert magics_mod.parse_options("--project-home /x").options == {"project_home": "/x"}


def test_empty_map_gives_empty_results(ip):
    use_local(ip)
    cell(ip, "--map x in [] --out res", "x\n")
    assert ip.user_ns["res"] == []


def test_timeout_raises_task_timeout_pointing_at_the_magic_line(ip):
    from pymw_magic import TaskTimeout
    use_local(ip)
    with pytest.raises(TaskTimeout) as info:
        cell(ip, "--timeout 0.5 --retries 0 --out r", "import time\ntime.sleep(60)\n")
    assert isinstance(ip.user_ns["r"], TaskTimeout)
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert last.filename.startswith("<pymw-cell-") and last.lineno == 1
    assert last.line.startswith("%%pymw --timeout 0.5")


def test_task_stdout_and_stderr_are_replayed(ip, capsys):
    use_local(ip)
    capsys.readouterr()
    cell(ip, "--map x in range(2)", "import sys\nprint('out', x)\nprint('err', x, file=sys.stderr)\n")
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["out 0", "out 1"]
    assert captured.err.splitlines() == ["err 0", "err 1"]


def test_a_name_the_cell_rebinds_starts_from_the_notebook_value(ip):
    use_local(ip)
    ip.user_ns["data"] = [1, 2]
    cell(ip, "--map x in range(3) --out res", "data = data + [x]\ndata\n")
    assert ip.user_ns["res"] == [[1, 2, 0], [1, 2, 1], [1, 2, 2]]
    assert ip.user_ns["data"] == [1, 2]


def test_unpicklable_value_of_a_rebound_name_is_named(ip):
    use_local(ip)
    ip.run_cell("import threading\nguard = threading.Lock()\n")
    with pytest.raises(PayloadError) as info:
        cell(ip, "--map x in range(2)", "guard = guard if x else None\nx\n")
    assert "'guard'" in str(info.value)


# --- the %%pymw line is Python, never var-expanded ---------------------------------------

def test_the_cell_line_is_taken_as_written_not_expanded(ip):
    use_local(ip)
    ip.user_ns.update(k=99, n=3, label="expanded")
    # {k} is the f-string's own k, not the notebook's 99; $label is no variable.
    cell(ip, '--map s in [f"{k}" for k in range(n)] --out fs --name $label', "s\n")
    assert ip.user_ns["fs"] == ["0", "1", "2"]
    assert ip.user_ns["_pymw_job"].name == "$label"
    # {expr} is Python too: a set display, not the notebook's n + 1
    cell(ip, "--map x in sorted({n + 1}) --out one", "x\n")
    assert ip.user_ns["one"] == [4]
    with pytest.raises(UsageError, match="--map expects 'TARGET in EXPR'"):
        cell(ip, "--map x in range($n)", "x\n")


# --- errors before any task starts -----------------------------------------------------------

def test_an_unpicklable_map_item_is_a_payload_error_before_any_task(ip):
    use_local(ip)
    ip.run_cell("def gen():\n    yield 1\nitems = [1, gen()]\n")
    with pytest.raises(PayloadError) as info:
        cell(ip, "--map x in items --out r", "x\n")
    message = str(info.value)
    assert "--map 'x'" in message and "item 1" in message and "x=<generator object" in message
    assert "cannot be sent to workers" in message
    assert _no_jobs(ip) and "r" not in ip.user_ns
    # raised "at" the %%pymw line of the cell
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert last.filename.startswith("<pymw-cell-") and last.lineno == 1


def test_del_of_a_notebook_name_in_a_cell_stays_in_the_task(ip):
    use_local(ip)
    ip.user_ns["tmp"] = 5
    cell(ip, "--out r", "doubled = tmp * 2\ndel tmp\ndoubled\n")
    assert ip.user_ns["r"] == 10 and ip.user_ns["tmp"] == 5


def test_import_star_in_a_cell_says_to_import_names(ip):
    use_local(ip)
    with pytest.raises(SyntaxError) as info:
        cell(ip, "", "from math import *\nsqrt(2)\n")
    assert info.value.lineno == 2 and "import the names the cell uses" in info.value.msg
    assert _no_jobs(ip)


@pytest.mark.parametrize("setup, body, error", [
    ("import threading\nhandle = threading.Lock()\n", "%%pymw --map x in range(2)\nhandle, x\n", "PayloadError"),
    ("", "%%pymw --map a, b in [1, 2]\na\n", "MapError"),
    ("", "%%pymw --map x in range(2)\nx + nowhere_defined\n", "NameError"),
    ("", "%%pymw --map x in [1, 0]\n1 / x\n", "ZeroDivisionError"),
])
def test_shown_tracebacks_start_at_the_cell_without_the_machinery(ip, capsys, setup, body, error):
    use_local(ip)
    if setup:
        ip.run_cell(setup)
    capsys.readouterr()
    result = ip.run_cell(body)
    assert type(result.error_in_exec).__name__ == error
    shown = capsys.readouterr().out
    assert error in shown and "<pymw-cell-" in shown
    # neither the line IPython rewrote the cell into nor this package's frames
    assert "run_cell_magic" not in shown and "magics.py" not in shown
    # shown once so: raised again later, the exception shows its own traceback
    assert not hasattr(result.error_in_exec, "_render_traceback_")


def test_kernel_exit_stops_and_joins_the_widgets_thread(ip):
    from pymw_magic.widgets.jobview import TICKER

    class View:
        def __init__(self):
            self.ticked = threading.Event()

        def tick(self):
            self.ticked.set()
            return True

    def ticker_threads(settle: float = 5.0):
        # (a ticker thread of an earlier test may be ending its last tick)
        deadline = time.monotonic() + settle
        while True:
            alive = [t for t in threading.enumerate()   # the process ticker's (tests make their own)
                     if t.name == "pymw-widgets" and getattr(t, "_target", None) == TICKER._run]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.02)

    view = View()
    TICKER.add(view)
    try:
        assert view.ticked.wait(30) and ticker_threads(settle=0)
        magics_mod.loaded_magics(ip).at_exit()  # what the kernel's atexit runs
        assert ticker_threads() == []  # joined, not left drawing at interpreter shutdown
        assert view in TICKER.views()  # stopped, not forgotten: a later add starts a new thread
        view.ticked.clear()
        TICKER.add(View())
        assert view.ticked.wait(30)
    finally:
        TICKER.discard(view)
        TICKER.stop()
    assert ticker_threads() == []


def test_a_syntax_error_is_shown_at_the_body_without_the_machinery(ip, capsys):
    result = ip.run_cell("%%pymw --map x in range(2)\ny = x\nz = (y +\n")
    assert isinstance(result.error_before_exec, SyntaxError)  # found before the cell runs
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "z = (y +" in text and "<pymw-cell-" in text
    assert "run_cell_magic" not in text and "magics.py" not in text
    assert _no_jobs(ip) and session(ip).masters == []


# --- replacing the default master while it runs a job -----------------------------------

def _gated_job(ip, tmp_path, n: int = 10) -> Job:
    """A --nowait job of ``n`` tasks that each wait for the file ``gate``
    (so the job runs until the test opens it)."""
    gate = tmp_path / "gate"
    ip.user_ns["gate"] = str(gate)
    cell(ip, f"--map x in range({n}) --nowait --name long",
         "import os, time\ndeadline = time.time() + 120\n"
         "while not os.path.exists(gate) and time.time() < deadline:\n    time.sleep(0.01)\nx\n")
    return ip.user_ns["_pymw_job"]


def test_use_keeps_the_old_master_until_its_running_job_ends(ip, capsys, tmp_path):
    use_local(ip)
    old = session(ip).default
    job = _gated_job(ip, tmp_path)
    capsys.readouterr()
    ip.run_line_magic("pymw", "use local --workers 1")
    out = capsys.readouterr().out
    new = session(ip).default
    assert new is not old and session(ip).masters == [new]
    assert "the previous default master keeps running job 'long' (" in out
    assert " of 10 done); it shuts down when it ends" in out
    assert "default is now backend 'local' with 1 worker(s)" in out
    # The old master takes no new cell, but its job goes on and is listed.
    assert cell(ip, "--map x in range(3)", "x\n") == [0, 1, 2]
    assert not job.done() and not old.closed and job.counts()["cancelled"] == 0
    ip.run_line_magic("pymw", "jobs")
    assert "long" in capsys.readouterr().out
    (tmp_path / "gate").touch()
    assert job.result(timeout=120) == list(range(10))  # every task ran: none was cancelled
    deadline = time.monotonic() + 60
    while not old.closed and time.monotonic() < deadline:  # shut down once its job ended
        time.sleep(0.02)
    assert old.closed and old not in session(ip).retiring


def test_unloading_cancels_what_a_retiring_master_has_not_started(ip, tmp_path):
    use_local(ip)
    old = session(ip).default
    job = _gated_job(ip, tmp_path, n=8)
    ip.run_line_magic("pymw", "use local --workers 1")
    assert not job.done() and session(ip).retiring == [old]
    # What %unload_ext and the kernel's exit do: the queued tasks are
    # cancelled, the running ones end (here when the gate opens).
    closing = threading.Thread(target=session(ip).shutdown_all, daemon=True)
    closing.start()
    deadline = time.monotonic() + 60
    while not job.counts()["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.counts()["cancelled"] >= 1
    (tmp_path / "gate").touch()
    closing.join(timeout=120)
    assert not closing.is_alive() and job.done() and old.closed
    counts = job.counts()
    assert counts["done"] + counts["cancelled"] == 8 and session(ip).retiring == []


# --- messages that say why ---------------------------------------------------------------

@pytest.mark.parametrize("line, reason, forms", [
    ("use simulator --availability onoff:0,0", "up time must be > 0", "onoff:UP,DOWN"),
    ("use simulator --speeds lognormal:1,-1", "SIGMA >= 0", "lognormal:MEDIAN,SIGMA"),
])
def test_a_bad_value_says_the_converters_reason_and_the_valid_forms(ip, line, reason, forms):
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("pymw", line)
    assert reason in str(info.value) and forms in str(info.value)


def test_a_continued_pymw_line_is_a_usage_error_not_an_error_in_the_body(ip, capsys):
    use_local(ip)
    with pytest.raises(UsageError, match="cannot be continued with a backslash"):
        cell(ip, "--map x in \\", "range(3) --out r\nx\n")
    # As a notebook runs it (the syntax check before the cell runs included).
    result = ip.run_cell("%%pymw --map x in \\\n    range(3)\nx\n")
    assert result.error_before_exec is None
    assert "cannot be continued with a backslash" in capsys.readouterr().err + str(result.error_in_exec)
    assert _no_jobs(ip)
