"""Long-lived workers follow the notebook: its directory, its sys.path, the
modules it reloaded; and each job starts from a fresh copy of what its
function captured."""

from __future__ import annotations

import importlib
import os
import sys
import uuid

import pytest

from pymw_magic import Master
from pymw_magic.errors import PayloadError


def _module(tmp_path, body, name=None):
    """Write a module into ``tmp_path``; its name and path."""
    name = name or f"stalemod_{uuid.uuid4().hex[:10]}"
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return name, path


def _rewrite(path, body):
    """New contents, and an mtime that certainly differs from the old one
    (a file system may keep whole seconds)."""
    old = os.stat(path).st_mtime_ns
    path.write_text(body)
    os.utime(path, ns=(old + 5_000_000_000, old + 5_000_000_000))


@pytest.fixture
def importable(tmp_path, monkeypatch):
    """tmp_path on sys.path; the modules imported from it are removed after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("stalemod_"):
            del sys.modules[name]


@pytest.fixture
def master_beside(importable):
    """A master started after ``importable`` went on sys.path, as a
    notebook's workers start with the directory of its modules."""
    m = Master("local", workers=2)
    try:
        yield m
    finally:
        m.shutdown(wait=True, cancel_futures=True)


# --- modules edited and reloaded in the notebook ----------------------------------------------

def test_a_reloaded_module_runs_its_new_code_on_the_workers(master_beside, importable):
    name, path = _module(importable, "def f(x):\n    return x + 1\n")
    mod = importlib.import_module(name)
    assert list(master_beside.map(mod.f, range(4), timeout=60)) == [1, 2, 3, 4]
    _rewrite(path, "def f(x):\n    return x + 2\n")     # same size: only the mtime tells
    importlib.reload(mod)
    assert list(master_beside.map(mod.f, range(4), timeout=60)) == [2, 3, 4, 5]
    assert master_beside.submit(mod.f, 10).result(timeout=60) == 12


def test_a_function_calling_a_reloaded_module_by_reference_runs_its_new_code(master_beside, importable):
    name, path = _module(importable, "SCALE = 10\ndef g(x):\n    return x * SCALE\n")
    mod = importlib.import_module(name)
    ns = {"__name__": "__main__", "mod": mod}          # a notebook function: the same object throughout
    exec("def h(x):\n    return mod.g(x) + 1\n", ns)
    h = ns["h"]
    assert list(master_beside.map(h, range(3), timeout=60)) == [1, 11, 21]
    _rewrite(path, "SCALE = 20\ndef g(x):\n    return x * SCALE\n")
    importlib.reload(mod)
    assert list(master_beside.map(h, range(3), timeout=60)) == [1, 21, 41]
    assert master_beside.submit(h, 1).result(timeout=60) == 21


def test_a_function_imported_by_name_from_a_reloaded_module_runs_its_new_code(master_beside, importable):
    name, path = _module(importable, "def g(x):\n    return 'old'\n")
    mod = importlib.import_module(name)
    ns = {"__name__": "__main__"}
    exec(f"from {name} import g\ndef h(x):\n    return g(x)\n", ns)
    assert master_beside.submit(ns["h"], 0).result(timeout=60) == "old"
    _rewrite(path, "def g(x):\n    return 'new'\n")
    importlib.reload(mod)
    exec(f"from {name} import g\n", ns)                # as a notebook re-runs its import cell
    assert master_beside.submit(ns["h"], 0).result(timeout=60) == "new"


def test_a_module_that_cannot_be_reloaded_fails_the_job_saying_why(importable):
    # One worker, so the task lands on the worker that imported the module
    # (one that never did can only import the file, broken, as it is now).
    name, path = _module(importable, "def g(x):\n    return x\n")
    mod = importlib.import_module(name)
    ns = {"__name__": "__main__", "mod": mod}
    exec("def h(x):\n    return mod.g(x)\n", ns)
    with Master("local", workers=1) as m:
        assert list(m.map(ns["h"], range(2), timeout=60)) == [0, 1]
        _rewrite(path, "def g(x):\n    return -x\n")
        importlib.reload(mod)                              # the notebook has the new code...
        _rewrite(path, "def g(x):\n    return x +\n")     # ...and the file is broken before a worker reloads it
        with pytest.raises(PayloadError, match=rf"module '{name}' changed since worker .* reloading it there "
                                               r"failed \(SyntaxError"):
            m.submit(ns["h"], 1).result(timeout=60)


def test_a_module_edited_but_not_reloaded_in_the_notebook_is_not_reloaded_by_workers(importable):
    # One worker: the one that imported the module keeps the notebook's
    # version.  (A worker that never imported it can only import the file
    # as it is now; with two workers the second task may land there.)
    name, path = _module(importable, "def g(x):\n    return 'loaded'\n")
    mod = importlib.import_module(name)
    ns = {"__name__": "__main__", "mod": mod}
    exec("def h(x):\n    return mod.g(x)\n", ns)
    with Master("local", workers=1) as m:
        assert m.submit(ns["h"], 0).result(timeout=60) == "loaded"
        _rewrite(path, "def g(x):\n    return 'edited'\n")   # saved, not reloaded: the notebook runs 'loaded'
        assert m.submit(ns["h"], 0).result(timeout=60) == "loaded"
        importlib.reload(mod)
        assert m.submit(ns["h"], 0).result(timeout=60) == "edited"


# --- the notebook's directory and sys.path -----------------------------------------------------

def test_tasks_run_in_the_notebooks_current_directory(master, tmp_path, monkeypatch):
    assert master.submit(os.getcwd).result(timeout=60) == os.getcwd()  # workers are up
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text("hello from data")
    monkeypatch.chdir(data)                            # %cd data
    ns = {"__name__": "__main__"}
    exec("def read(name):\n    with open(name) as f:\n        return f.read()\n", ns)
    assert list(master.map(ns["read"], ["input.txt"] * 4, timeout=60)) == ["hello from data"] * 4
    assert master.submit(os.getcwd).result(timeout=60) == str(data)
    monkeypatch.chdir(tmp_path)                        # %cd ..
    assert list(master.map(ns["read"], ["data/input.txt"] * 4, timeout=60)) == ["hello from data"] * 4


def test_a_sys_path_entry_added_after_the_master_started_is_seen_by_workers(master, tmp_path, monkeypatch):
    assert master.submit(abs, -1).result(timeout=60) == 1  # workers are up
    lib = tmp_path / "lib"
    lib.mkdir()
    name, _ = _module(lib, "def f(x):\n    return ('from lib', x)\n")
    monkeypatch.syspath_prepend(str(lib))
    try:
        mod = importlib.import_module(name)
        assert list(master.map(mod.f, range(3), timeout=60)) == [("from lib", x) for x in range(3)]
    finally:
        sys.modules.pop(name, None)


# --- what a function captured, per job ----------------------------------------------------------

_COUNTER = """
seen = []
def count(x):
    seen.append(x)
    return len(seen)
"""


def _notebook_counter():
    ns = {"__name__": "__main__"}
    exec(_COUNTER, ns)
    return ns["count"]


def test_each_job_starts_from_a_fresh_copy_of_what_it_captured():
    count = _notebook_counter()
    with Master("local", workers=1) as m:
        first = list(m.map(count, range(8), timeout=60))
        second = list(m.map(count, range(8), timeout=60))
        third = m.map_async(count, range(8), chunksize=1).result(timeout=60)
    assert first == list(range(1, 9))
    assert second == first                             # nothing left over from the first job
    assert third == first
    assert count.__globals__["seen"] == []             # and the notebook's list is untouched


def test_captured_state_does_not_leak_between_jobs_on_several_workers(master):
    count = _notebook_counter()
    for _ in range(5):
        got = list(master.map(count, range(8), timeout=60))
        # each worker's copy starts empty: counts start at 1 on each worker that ran a task
        assert 1 <= got.count(1) <= 2 and max(got) <= 8, got
        assert sorted(got) == sorted([k for n in _runs(got) for k in range(1, n + 1)])


def _runs(got):
    """The lengths of the per-worker counts 1..n that ``got`` is made of."""
    ones = got.count(1)
    if ones == 1:
        return [len(got)]
    # two workers: the longer run has the values that appear once
    twice = [v for v in set(got) if got.count(v) == 2]
    short = max(twice) if twice else 1
    return [short, len(got) - short]


def test_a_rerun_pymw_cell_starts_from_the_notebooks_values_each_time():
    from pymw_magic.cellfunc import compile_cell
    cell = compile_cell("seen.append(x)\nlen(seen)\n", params=("x",))
    notebook = {"seen": []}
    with Master("local", workers=1) as m:
        runs = [list(m.map(cell.bind(notebook), range(6), timeout=60)) for _ in range(3)]
    assert runs == [[1, 2, 3, 4, 5, 6]] * 3
    assert notebook["seen"] == []


def test_a_directory_a_worker_cannot_enter_is_said_once_not_silently_ignored(tmp_path, monkeypatch):
    from pymw_magic.environment import Follower, WorkerEnv
    monkeypatch.chdir(tmp_path)
    follower = Follower()
    gone = str(tmp_path / "not-on-this-host")
    warning = follower.apply(WorkerEnv(gone, ()))
    assert warning is not None and f"cannot enter the notebook's directory {gone!r}" in warning
    assert f"tasks run in {str(tmp_path)!r} here" in warning
    assert os.getcwd() == str(tmp_path)
    assert follower.apply(WorkerEnv(str(tmp_path), ())) is None
    assert follower.apply(WorkerEnv(gone, ())) is None          # said once per directory


def test_the_masters_directory_is_followed_at_once_and_sys_path_too(tmp_path, monkeypatch):
    import time

    from pymw_magic.environment import EnvWatch
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.chdir(a)
    watch = EnvWatch()
    first = watch.current()
    assert first.cwd == str(a) and watch.current() is first     # unchanged: the same object
    os.chdir(b)                                                  # (%cd does this)
    assert watch.current().cwd == str(b)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    assert str(tmp_path / "lib") in watch.current().path
    # a change os.chdir did not see (a C extension, a saved reference) shows within a moment
    getattr(os.chdir, "__wrapped__", os.chdir)(str(a))
    deadline = time.monotonic() + 10
    while watch.current().cwd != str(a):
        assert time.monotonic() < deadline, "the directory change was never noticed"
