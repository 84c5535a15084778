"""A hostile user's tests of the notebook surface: the options grammar,
the session's masters (replaced while they run), the exporter and the
simulator as reached through the magics, each on a real IPython shell
with real local workers."""

from __future__ import annotations

import threading
import time

import psutil
import pytest

from test_magics import _gated_job, _wait_gone, cell, get_ipython, ip, session, use_local  # noqa: F401
from test_notebooks import kernel_env  # noqa: F401 - a fixture


def _children() -> set[int]:
    """Our live descendants (a process that exits while listed is left out)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_until(predicate, limit: float = 60.0) -> bool:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- a replaced default master that still runs a job ---------------------------------------

def test_status_lists_a_retiring_master_and_its_running_job(ip, capsys, tmp_path):
    use_local(ip)
    job = _gated_job(ip, tmp_path, n=4)
    ip.run_line_magic("pymw", "use local --workers 1")
    capsys.readouterr()
    try:
        ip.run_line_magic("pymw", "status")
        out = capsys.readouterr().out
        assert "pymw default: backend 'local' with 1 worker(s)" in out
        assert "pymw retiring (shuts down when its jobs end): backend 'local' with 2 worker(s)" in out
        assert f"job {job.id} 'long' (active)" in out
    finally:
        (tmp_path / "gate").touch()
    assert job.result(timeout=120) == list(range(4))


def test_status_with_only_a_retiring_master_does_not_say_no_master(ip, capsys, tmp_path):
    use_local(ip)
    job = _gated_job(ip, tmp_path, n=4)
    ip.run_line_magic("pymw", "use local --workers 1")
    s = session(ip)
    # The new default is dropped (as unloading would), the retiring one runs on.
    new = s.default
    s.default = None
    s.masters.remove(new)
    new.shutdown(wait=True)
    capsys.readouterr()
    try:
        ip.run_line_magic("pymw", "status")
        out = capsys.readouterr().out
        assert "no master yet" not in out and "'long' (active)" in out
    finally:
        (tmp_path / "gate").touch()
    assert job.result(timeout=120) == list(range(4))


def _pymw_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pymw")]


def test_many_uses_while_nowait_jobs_run_leave_no_worker_or_thread(ip, tmp_path):
    before = _children()
    threads_before = _pymw_threads()
    jobs = []
    for i in range(6):
        ip.run_line_magic("pymw", f"use local --workers {1 + i % 2}")
        jobs.append(_gated_job(ip, tmp_path, n=3))
    ip.run_line_magic("pymw", "use local --workers 1")
    s = session(ip)
    assert len(s.retiring) == 6 and not any(job.done() for job in jobs)
    (tmp_path / "gate").touch()
    for job in jobs:
        assert job.result(timeout=120) == [0, 1, 2]  # none cancelled by a use
    assert _wait_until(lambda: not s.retiring), "a retiring master was never shut down"
    # Only the current default's workers remain, and no retire or serving thread of the old ones.
    assert _wait_until(lambda: len(_children() - before) <= 1 + 1), _children() - before
    assert _wait_until(lambda: len(_pymw_threads()) <= len(threads_before) + 1), _pymw_threads()


def test_cancelling_a_retiring_masters_job_shuts_that_master_down(ip, capsys, tmp_path):
    use_local(ip)
    old = session(ip).default
    job = _gated_job(ip, tmp_path, n=6)
    ip.run_line_magic("pymw", "use local --workers 1")
    assert not job.done() and session(ip).retiring == [old]
    ip.run_line_magic("pymw", f"cancel {job.name}")
    assert "cancelled job" in capsys.readouterr().out
    (tmp_path / "gate").touch()  # a running task that ignores the cancel ends
    assert _wait_until(lambda: job.done() and old.closed and not session(ip).retiring)
    assert job.counts()["cancelled"] >= 1


# --- a default made with a notebook policy, and cells that ask for more ---------------------

@pytest.mark.parametrize("definition", [
    "def pick(tasks, workers):\n    return tasks[-1]\n",
    "pick = lambda tasks, workers: tasks[-1]\n",
])
def test_a_cell_with_options_over_a_default_with_a_notebook_policy(ip, definition):
    ip.run_cell(definition)
    ip.run_line_magic("pymw", "use simulator --workers 2 --policy pick")
    s = session(ip)
    default = s.default
    for _ in range(3):  # the same cell again reuses the master it made
        assert cell(ip, "--map n in range(4) --seed 5", "n * 2\n") == [0, 2, 4, 6]
    assert len(s.masters) == 2 and s.masters[0] is default
    made = s.masters[1]
    assert made.options["seed"] == 5 and made.options["policy"] == default.options["policy"]
    # The policy is the notebook's: it hands out the last queued task first.
    tasks = ip.user_ns["_pymw_job"].tasks
    first = min(t.started for t in tasks)
    assert {t.index for t in tasks if t.started == first} == {2, 3}


@pytest.mark.parametrize("definition", [
    "def pick(tasks, workers):\n    return tasks[-1]\n",
    "pick = lambda tasks, workers: tasks[-1]\n",
])
def test_the_dashboard_form_keeps_a_notebook_policy_on_apply(ip, definition):
    from pymw_magic.widgets.dashboard import BackendForm

    ip.run_cell(definition)
    ip.run_line_magic("pymw", "use simulator --workers 2 --policy pick")
    s = session(ip)
    form = BackendForm(master=s.default)
    assert form.fields["policy"].value is ip.user_ns["pick"]  # not the first suggestion (fifo)
    form.fields["workers"].value = "3"
    made = form.apply()
    assert made is not None and made is s.default, form.status.value
    assert made.workers == 3 and s.config(made)["policy"] is ip.user_ns["pick"]
    assert cell(ip, "--map n in range(4)", "n\n") == [0, 1, 2, 3]


# --- the exported script's command line reads options as a magic's line does ----------------

@pytest.mark.parametrize("argv, said", [
    (["--workers=2", "--workers", "3"], "--workers is given twice"),
    (["--backend", "simulator", "--backend", "local"], "--backend is given twice"),
    (["--availability", "onoff:0,0"], "up time must be > 0"),
])
def test_the_scripts_command_line_refuses_as_the_magics_line_does(argv, said, capsys):
    from pymw_magic.script import Runtime

    with pytest.raises(SystemExit) as raised:
        Runtime({}, default_backend="simulator", argv=argv)
    assert raised.value.code == 2
    assert said in capsys.readouterr().err


def test_the_magic_line_refuses_a_repeated_option_in_the_same_words(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="--workers is given twice"):
        ip.run_line_magic("pymw", "use simulator --workers=2 --workers 3")


@pytest.mark.parametrize("line, reason", [
    ("use simulator --availability onoff:nan,1", "up time must be > 0"),
    ("use simulator --availability periodic:10,nan", "up time must be > 0"),
    ("use simulator --latency uniform:-1,2", "uniform:LOW,HIGH needs LOW >= 0"),
    ("use simulator --latency lognormal:1,-1", "SIGMA >= 0"),
    ("use simulator --bandwidth uniform:0,5", "uniform:LOW,HIGH needs LOW > 0"),
    ("use simulator --latency inf", "--latency"),
])
def test_simulator_values_that_cannot_model_a_host_are_refused_with_the_reason(ip, line, reason):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("pymw", line)
    assert reason in str(raised.value) and "bad value for" in str(raised.value)
    assert session(ip).default is None


# --- a comment at the end of a magic's line ------------------------------------------------

def test_a_trailing_comment_on_a_magic_line_is_not_read_as_options(ip):
    ip.run_line_magic("pymw", "use local --workers 1  # one worker is enough")
    assert session(ip).default.workers == 1
    assert cell(ip, "--map x in range(3) --out r  # three tasks", "x * 2\n") is None
    assert ip.user_ns["r"] == [0, 2, 4]
    # A '#' inside a word or quotes is the value's own.
    assert cell(ip, "--map x in ['#', 'a #b'] --name 'job #1' --out s", "x\n") is None
    assert ip.user_ns["s"] == ['#', 'a #b'] and ip.user_ns["_pymw_job"].name == "job #1"


def test_the_exporter_reads_a_commented_use_line_as_the_magic_does(tmp_path):
    import nbformat

    from pymw_magic.export import export_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext pymw_magic"),
                nbformat.v4.new_code_cell("%pymw use simulator --workers 3  # three hosts"),
                nbformat.v4.new_code_cell("%%pymw --map x in range(2) --out r  # two\nx")]
    path = tmp_path / "commented.ipynb"
    nbformat.write(nb, path)
    text = export_notebook(path).script
    assert "pymw.use('simulator', workers=3)" in text


# --- --duration naming a function the notebook has not defined yet --------------------------

def test_duration_naming_an_undefined_function_says_so(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("pymw", "use simulator --duration model_not_yet")
    said = str(raised.value)
    assert "no function 'model_not_yet' is defined in the notebook (yet)" in said
    assert "before this line" in said
    with pytest.raises(UsageError, match=r"duration: -1 is not a number of seconds >= 0"):
        ip.run_line_magic("pymw", "use simulator --duration -1")
    ip.run_cell("def model_not_yet(n, host=None):\n    return 5.0\n")
    ip.run_line_magic("pymw", "use simulator --duration model_not_yet")
    assert cell(ip, "--map n in range(2)", "n\n") == [5.0, 5.0]  # the simulated run times


# --- %pymw tune: a value its sliders cannot hold is refused, not clamped ---------------------

@pytest.mark.parametrize("args, said", [
    ("--hosts 0", "hosts: 0 is outside the tuner's range"),
    ("--failure-rate 2", "failure_rate: 2.0 is outside the tuner's range for it, [0, 0.5]"),
    ("--spread 3", "spread: 3.0 is outside the tuner's range for it, [0, 1.5]"),
    ("--chunksize 100", "chunksize: 100 is outside the tuner's range for it, [0, 64]"),
    ("--availability 0.05", "availability: 0.05 is outside the tuner's range for it, [0.1, 1]"),
    ("--policy nosuch", "policy: 'nosuch' is not one the tuner offers"),
    ("--uptime -1", "uptime: -1.0 is not a host's mean up time in seconds > 0"),
])
def test_tune_refuses_what_its_controls_would_silently_clamp(ip, args, said):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError) as raised:
        ip.run_line_magic("pymw", f"tune --tasks 20 {args}")
    assert said in str(raised.value)


def test_tune_keeps_values_inside_the_ranges(ip):
    tuner = ip.run_line_magic("pymw", "tune --tasks 20 --hosts 3 --failure-rate 0.5 --spread 1.5 --chunksize 64")
    assert tuner.value("hosts") == 3 and tuner.value("failure_rate") == 0.5
    assert tuner.value("spread") == 1.5 and tuner.value("chunksize") == 64


# --- a %pymw use whose master cannot be made leaves the old default in place ------------------

def test_a_use_that_fails_keeps_the_old_default_and_its_job(ip, tmp_path):
    from IPython.core.error import UsageError

    trace = tmp_path / "broken.csv"
    trace.write_text("garbage,here\nx,y,z\n")
    ip.run_line_magic("pymw", "use local --workers 1")
    s = session(ip)
    old = s.default
    job = _gated_job(ip, tmp_path, n=2)
    with pytest.raises(UsageError, match=r"%pymw use: availability: .*broken.csv' line 1: expected host,start,end"):
        ip.run_line_magic("pymw", f"use simulator --availability {trace}")
    assert s.default is old and not old.closed and s.retiring == []
    (tmp_path / "gate").touch()
    assert job.result(timeout=120) == [0, 1]
    assert cell(ip, "--map x in range(2)", "x\n") == [0, 1]
    assert s.default is old and old.workers == 1  # the next cell ran on the user's default


# --- messages that name the likely mix-up ----------------------------------------------------

def test_another_backends_option_is_named_with_its_backend(ip):
    from IPython.core.error import UsageError

    ip.run_line_magic("pymw", "use local --workers 1")
    with pytest.raises(UsageError) as raised:
        cell(ip, "--map x in range(2) --seed 1", "x\n")
    said = str(raised.value)
    assert "unknown option --seed for %%pymw: it is an option of the 'simulator' backend, not of 'local'" in said
    assert "add --backend simulator" in said
    with pytest.raises(UsageError, match="unknown option --mpiexec for %pymw use: it is an option of the 'mpi' backend"):
        ip.run_line_magic("pymw", "use simulator --mpiexec mpiexec")
    assert cell(ip, "--map x in range(2) --backend simulator --seed 1", "x\n") == [0, 1]


def test_a_word_after_the_backend_is_named(ip):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=r"unexpected '4' after the backend"):
        ip.run_line_magic("pymw", "use local 4")


# --- a real kernel restarted while a replaced default still runs its job ---------------------

@pytest.mark.parametrize("now", [False, True], ids=["restart", "kill-and-restart"])
def test_restarting_the_kernel_leaves_no_worker_of_a_retiring_master(kernel_env, now):
    from jupyter_client.manager import start_new_kernel

    from test_notebooks import ROOT, _await_workers, _kernel_workers, _left_alive, _run

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    workers: set[int] = set()
    try:
        reply, out = _run(kc, "%load_ext pymw_magic\n%pymw use local --workers 2")
        assert reply["status"] == "ok", out
        reply, out = _run(kc, "%%pymw --map x in range(4) --nowait --out j\nimport time; time.sleep(120); x")
        assert reply["status"] == "ok", out
        reply, out = _run(kc, "%pymw use local --workers 1\n%pymw status")
        assert reply["status"] == "ok", out
        assert "pymw retiring (shuts down when its jobs end): backend 'local' with 2 worker(s)" in out
        workers = _await_workers(km, 3)
        assert len(workers) == 3
        km.restart_kernel(now=now)
        assert not _left_alive(workers), "a worker outlived the kernel it served"
        reply, out = _run(kc, "%load_ext pymw_magic\n%pymw status")
        assert reply["status"] == "ok" and "no master yet" in out, out
        workers |= _kernel_workers(km)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert not _left_alive(workers)


@pytest.mark.parametrize("definition", [
    "from pymw_magic.policies import make_policy\npick = make_policy('lifo')\n",
    "from pymw_magic.policies import LIFO\nclass Mine(LIFO):\n    name = 'mine'\npick = Mine()\n",
])
def test_a_policy_instance_is_not_shared_by_two_live_masters(ip, tmp_path, definition):
    ip.run_cell(definition)
    ip.run_line_magic("pymw", "use local --workers 1 --policy pick")
    s = session(ip)
    default = s.default
    job = _gated_job(ip, tmp_path, n=3)  # the default's queue holds tasks meanwhile
    try:
        # A cell asking for another worker count gets a master of its own,
        # with a fresh policy of the same kind: the queues never mix.
        assert cell(ip, "--map x in range(5) --workers 2", "x * 10\n") == [0, 10, 20, 30, 40]
        assert len(s.masters) == 2 and s.masters[0] is default
        made = s.masters[1]
        assert made._scheduler.policy is not ip.user_ns["pick"]
        assert type(made._scheduler.policy) is type(ip.user_ns["pick"])
        # ...and the same cell again reuses that master.
        assert cell(ip, "--map x in range(2) --workers 2", "x\n") == [0, 1] and len(s.masters) == 2
    finally:
        (tmp_path / "gate").touch()
    assert job.result(timeout=120) == [0, 1, 2]
