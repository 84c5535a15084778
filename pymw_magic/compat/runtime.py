"""What a PyMW task runs as on a worker: the call wrapper of the compat layer.

PyMW wrote each task into a script that imported the task's ``modules``,
defined its ``dep_funcs``, unpacked its ``data_files`` into the worker's
directory, captured stdout and stderr and called the function.  Here the
same happens in-process, inside pymw-magic's long-lived worker, around one
call: :func:`call_task` is the function every compat task submits (it is
imported by reference, so this module imports nothing heavy).  It returns
``(result, stdout, stderr, start_time)``; an exception from the task
propagates unchanged, so the master re-raises it with its own type.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable


def call_task(fn: Callable, args: tuple, modules: tuple = (), dep_funcs: tuple = (),
              data_files: tuple = (), key: Any = None) -> tuple[Any, str, str, float]:
    """Run ``fn(*args)`` the way PyMW's worker script did (``key`` names
    the task for the master's scheduling function; unused here)."""
    start = time.time()
    _provide(fn, modules, dep_funcs)
    workdir = _unpack(data_files) if data_files else None
    old_cwd = os.getcwd() if workdir else None
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    try:
        if workdir:
            os.chdir(workdir)   # PyMW tasks open their data files by bare name
        sys.stdout, sys.stderr = out, err
        result = fn(*args)
    finally:
        sys.stdout, sys.stderr = saved
        if workdir:
            os.chdir(old_cwd)
            shutil.rmtree(workdir, ignore_errors=True)
    return result, out.getvalue(), err.getvalue(), start


def _provide(fn: Callable, modules: tuple, dep_funcs: tuple) -> None:
    """PyMW's script imported ``modules`` and defined ``dep_funcs`` at its
    top level, so a task could use them as globals without capturing them:
    give them to the function's globals where it lacks them."""
    tops = []
    for name in modules:
        importlib.import_module(name)   # ImportError: the task fails, naming the module
        tops.append(name.partition(".")[0])
    spaces = [getattr(fn, "__globals__", None)] + [getattr(d, "__globals__", None) for d in dep_funcs]
    for glb in {id(g): g for g in spaces if g is not None}.values():
        for top in tops:
            glb.setdefault(top, sys.modules[top])
        for dep in dep_funcs:
            glb.setdefault(dep.__name__, dep)


def _unpack(data_files: tuple) -> str:
    """A fresh directory holding the task's data files (name, bytes)."""
    workdir = tempfile.mkdtemp(prefix="pymw-task-")
    for name, data in data_files:
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(data)
    return workdir


def run_script(source: str, name: str, input_data: Any) -> Any:
    """A PyMW task given as a script: run it with PyMW's file protocol
    (``python SCRIPT IN OUT``: IN holds the pickled argument tuple, the
    script writes ``[result, stdout, stderr]`` pickled to OUT)."""
    workdir = tempfile.mkdtemp(prefix="pymw-script-")
    try:
        script = os.path.join(workdir, os.path.basename(name) or "task.py")
        with open(script, "w") as f:
            f.write(source)
        in_file, out_file = os.path.join(workdir, "in.dat"), os.path.join(workdir, "out.dat")
        with open(in_file, "wb") as f:
            pickle.dump(input_data, f)
        proc = subprocess.run([sys.executable, script, in_file, out_file], cwd=workdir,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"script {name} failed with exit status {proc.returncode}\n{proc.stderr}")
        try:
            with open(out_file, "rb") as f:
                result, out, err = pickle.load(f)
        except (OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
            raise RuntimeError(f"script {name} wrote no result [result, stdout, stderr] to its output "
                               f"file ({exc})") from None
        sys.stdout.write(out or "")
        sys.stderr.write(err or "")
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def script_main(in_file: str, out_file: str) -> None:
    """``python SCRIPT IN OUT`` for a user-written PyMW interface that runs
    task scripts: IN holds the task (written by the master), OUT receives
    ``[result, stdout, stderr]`` (PyMW's protocol)."""
    import cloudpickle
    with open(in_file, "rb") as f:
        fn, args, modules, dep_funcs, data_files = cloudpickle.load(f)
    result, out, err, _ = call_task(fn, args, modules, dep_funcs, data_files)
    with open(out_file, "wb") as f:
        pickle.dump([result, out, err], f)
