"""PyMW compatibility (``pymw_magic.compat``): PyMW's API on real workers
(local processes, MPI ranks, the simulator), user-written interfaces driven
by PyMW's loop, the command line, and the example programs run as PyMW
programs are run."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import ROOT
from pymw_magic.backends import backend_names
from pymw_magic.compat import interfaces, pymw
from pymw_magic.compat.errors import BackendMissing
from pymw_magic.compat.interfaces.grid_simulator import GridSimulatorInterface, SimWorker

WAIT = 60  # seconds any single result may take on a loaded machine
EXAMPLES = os.path.join(ROOT, "examples", "pymw")


# --- task functions (importable by the workers) -----------------------------------------

def null_worker(x):
    return x


def err_worker():
    return 1 / 0


def print_worker(text):
    sys.stdout.write(f"out:{text}")
    sys.stderr.write(f"err:{text}")
    return len(text)


def wait_for_file(path, limit=WAIT):
    """Finish once ``path`` exists (the test creates it when it wants)."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return path


def uses_unimported_module():
    # ``fractions`` is not imported by this module: modules=("fractions",) provides it
    return str(fractions.Fraction(1, 3))  # noqa: F821


def calls_dep(x):
    return helper_from_deps(x) + 1  # noqa: F821  (given by dep_funcs=)


def read_data_files(names):
    out = []
    for name in names:
        with open(name) as f:
            out.append(f.read())
    return out, os.getcwd()


def square_all(xs):
    return [x * x for x in xs]


def total(xs):
    return sum(xs)


def sim_length(worker, length=10.0):
    return length


@pytest.fixture
def master():
    m = pymw.PyMW_Master(interface=interfaces.GenericInterface(num_workers=2))
    try:
        yield m
    finally:
        m.shutdown()


# --- the import surface --------------------------------------------------------------

def test_pymw_imports_map_one_to_one():
    ns: dict = {}
    exec("from pymw_magic.compat import *", ns)
    assert ns["pymw"] is pymw and ns["interfaces"] is interfaces
    # where PyMW kept things (worker_sim.py reaches the simulator through ``pymw``)
    assert pymw.interfaces.grid_simulator.GridSimulatorInterface is GridSimulatorInterface
    assert interfaces.generic.GenericInterface is interfaces.GenericInterface
    assert interfaces.multicore.MulticoreInterface is interfaces.MulticoreInterface
    assert interfaces.mpi.MPIInterface is interfaces.MPIInterface
    assert interfaces.condor.CondorInterface is interfaces.CondorInterface
    assert interfaces.boinc.BOINCInterface is interfaces.BOINCInterface
    from pymw_magic.compat import InterfaceException, PyMW_Master, TaskException
    assert PyMW_Master is pymw.PyMW_Master
    assert TaskException is pymw.TaskException and InterfaceException is pymw.InterfaceException


def test_nothing_below_imports_the_front_end():
    pkg = os.path.join(ROOT, "pymw_magic")
    offenders = []
    for dirpath, _, files in os.walk(pkg):
        if os.path.join(pkg, "compat") in dirpath:
            continue
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name)) as f:
                    if re.search(r"^\s*(from|import)\s+\S*compat\b", f.read(), re.M):
                        offenders.append(name)
    assert offenders == []


# --- get_result in every form ------------------------------------------------------------

def test_get_result_one_list_and_any(master):
    one = [master.submit_task(null_worker, input_data=(i,)) for i in range(5)]
    two = [master.submit_task(null_worker, input_data=(i,)) for i in range(5)]
    three = [master.submit_task(null_worker, input_data=(i,)) for i in range(5)]
    assert [master.get_result(t, timeout=WAIT) for t in one] == [(t, i) for i, t in enumerate(one)]
    got = {}
    for _ in range(5):
        task, value = master.get_result(two, timeout=WAIT)
        assert task in two and task not in got
        got[task] = value
    assert sorted(got.values()) == list(range(5))
    rest = [master.get_result(timeout=WAIT) for _ in range(5)]
    assert {t for t, _ in rest} == set(three) and sorted(v for _, v in rest) == list(range(5))
    for task in one + two + three:
        assert task._task_state == task.TASK_FINISHED
        assert task.get_total_time() >= task.get_execution_time() >= 0
    # everything was taken: PyMW would block for ever, we say so
    with pytest.raises(pymw.TaskException, match="taken already"):
        master.get_result(timeout=WAIT)
    with pytest.raises(pymw.TaskException, match="taken already"):
        master.get_result(one[0], timeout=WAIT)


def test_non_blocking_and_times(master, tmp_path):
    gate = str(tmp_path / "go")
    task = master.submit_task(wait_for_file, input_data=(gate,))
    assert master.get_result(task, blocking=False) == (None, None)
    assert master.get_result(blocking=False) == (None, None)
    assert task.get_total_time() is None and task.get_execution_time() is None
    assert master.get_progress(task) == [0.0]
    with pytest.raises(TimeoutError):
        master.get_result(task, timeout=0.05)
    open(gate, "w").close()
    assert master.get_result(task, timeout=WAIT) == (task, gate)
    assert master.get_progress([task]) == [1.0]
    times = task._times
    assert times["submit_time"] <= times["execute_time"] <= times["finish_time"]
    assert task.get_total_time() == times["finish_time"] - times["submit_time"]


def test_task_error_is_reraised_with_its_type(master):
    task = master.submit_task(err_worker)
    with pytest.raises(ZeroDivisionError) as info:
        master.get_result(task, timeout=WAIT)
    assert task._task_state == task.TASK_ERROR and task.get_total_time() >= 0
    assert any(str(task) in note for note in info.value.__notes__)
    assert "err_worker" in str(info.value.__cause__)   # the worker's traceback
    # a failing task does not stop the others
    ok = master.submit_task(null_worker, input_data=(7,))
    assert master.get_result(ok, timeout=WAIT) == (ok, 7)


def test_pymw_error_cases(master):
    with pytest.raises(pymw.TaskException, match="No tasks have been submitted"):
        master.get_result()
    with pytest.raises(pymw.TaskException, match="No tasks have been submitted"):
        master.get_progress([])
    task = master.submit_task(executable=null_worker, input_data=(1,))
    with pytest.raises(pymw.TaskException, match="either a task"):
        master.get_result(1234)
    with pytest.raises(pymw.TaskException, match="either a task"):
        master.get_result([1, 2, 3, 4])
    with pymw.PyMW_Master(interface=interfaces.GenericInterface(1)) as other:
        foreign = other.submit_task(null_worker, input_data=(2,))
        with pytest.raises(pymw.TaskException, match="not been submitted"):
            master.get_result(foreign)
        assert other.get_result(foreign, timeout=WAIT) == (foreign, 2)
    for bad in (1, 2.5, None):
        with pytest.raises(pymw.TaskException, match="filename or function"):
            master.submit_task(executable=bad)
    missing = master.submit_task(executable="dead_parrot")
    with pytest.raises(pymw.TaskException, match="dead_parrot"):
        master.get_result(missing, timeout=WAIT)
    with pytest.raises(pymw.TaskException, match="trailing comma"):
        master.submit_task(null_worker, input_data=(1,), modules="math")
    with pytest.raises(pymw.TaskException, match=r"trailing comma: \(5,\)"):
        master.submit_task(null_worker, input_data=5)
    assert master.get_result(task, timeout=WAIT) == (task, 1)


def test_interface_must_have_execute_task():
    with pytest.raises(pymw.InterfaceException, match="execute_task"):
        pymw.PyMW_Master(interface=object())

    class NotCallable:
        execute_task = 5
    with pytest.raises(pymw.InterfaceException, match="must be a function"):
        pymw.PyMW_Master(interface=NotCallable())


def test_bad_python_fails_the_tasks_not_the_master():
    iface = interfaces.generic.GenericInterface(python_loc="/usr/local/dead_parrot/python")
    with pymw.PyMW_Master(iface) as m:
        task = m.submit_task(null_worker, input_data=(1,))
        with pytest.raises(ValueError, match="dead_parrot"):
            m.get_result(task, timeout=WAIT)


def test_stdout_stderr_and_script_tasks(master, tmp_path):
    task = master.submit_task(print_worker, input_data=("hi",), modules=("sys",))
    assert master.get_result(task, timeout=WAIT) == (task, 2)
    assert (task._stdout, task._stderr) == ("out:hi", "err:hi")
    script = tmp_path / "double.py"
    script.write_text(textwrap.dedent("""\
        import pickle, sys
        with open(sys.argv[1], "rb") as f:
            (x,) = pickle.load(f)
        print("doubling")
        with open(sys.argv[2], "wb") as f:
            pickle.dump([2 * x, "said", ""], f)
    """))
    st = master.submit_task(str(script), input_data=(21,))
    assert master.get_result(st, timeout=WAIT) == (st, 42)
    assert st._stdout == "said"


def test_modules_and_dep_funcs_reach_the_worker(master):
    bare = master.submit_task(uses_unimported_module)
    with pytest.raises(NameError, match="fractions"):
        master.get_result(bare, timeout=WAIT)
    task = master.submit_task(uses_unimported_module, modules=("fractions",))
    assert master.get_result(task, timeout=WAIT) == (task, "1/3")
    missing = master.submit_task(null_worker, input_data=(1,), modules=("no_such_module_xyz",))
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        master.get_result(missing, timeout=WAIT)

    def helper_from_deps(x):
        return x * 10
    dep = master.submit_task(calls_dep, input_data=(4,), dep_funcs=(helper_from_deps,))
    assert master.get_result(dep, timeout=WAIT) == (dep, 41)


def test_dep_funcs_and_modules_of_a_script(tmp_path):
    """A program's own functions (``__main__``) as dep_funcs of a function
    from a module that does not define them, as PyMW's scripts allowed."""
    (tmp_path / "mymod.py").write_text("def compute(x):\n    return helper(x) + math.floor(0.5)\n")
    (tmp_path / "prog.py").write_text(textwrap.dedent("""\
        from pymw_magic.compat import pymw, interfaces
        import mymod

        def helper(x):
            return x * 3

        m = pymw.PyMW_Master(interfaces.GenericInterface(2))
        tasks = [m.submit_task(mymod.compute, input_data=(i,), modules=("math",), dep_funcs=(helper,))
                 for i in range(4)]
        print(sorted(m.get_result(t, timeout=60)[1] for t in tasks))
    """))
    out = _run([sys.executable, "prog.py"], cwd=tmp_path)
    assert out.strip() == "[0, 3, 6, 9]"


def test_data_files_unpacked_for_the_task(master, tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"booga{i}.txt"
        p.write_text(f"booga {i}")
        paths.append(str(p))
    task = master.submit_task(read_data_files, input_data=([os.path.basename(p) for p in paths],),
                              data_files=tuple(paths))
    _, (texts, cwd) = master.get_result(task, timeout=WAIT)
    assert texts == ["booga 0", "booga 1", "booga 2"]
    assert cwd != os.getcwd() and not os.path.exists(cwd)   # a fresh directory, removed after
    after = master.submit_task(os.getcwd)
    assert master.get_result(after, timeout=WAIT)[1] != cwd  # the worker went back
    with pytest.raises(pymw.TaskException, match="cannot be read"):
        master.submit_task(read_data_files, input_data=([],), data_files=(str(tmp_path / "nope"),))


def test_map_reduce(master):
    mr = pymw.PyMW_MapReduce(master)
    task = mr.submit_task_mapreduce(square_all, total, 10, input_data=list(range(1, 21)))
    got_task, result = master.get_result(task, timeout=WAIT)
    assert got_task is task and sum(result) == 2870 and len(result) == 10
    task2 = mr.submit_task_mapreduce(square_all, total, 4, input_data=list(range(1, 21)), red_worker=2)
    _, result2 = master.get_result(task2, timeout=WAIT)
    assert sum(result2) == 2870 and len(result2) == 2
    bad = mr.submit_task_mapreduce(square_all, err_worker, 2, input_data=[1, 2])
    with pytest.raises(TypeError):   # err_worker takes no argument: the reduce fails
        master.get_result(bad, timeout=WAIT)


def test_status_and_scheduler_func():
    seen = []

    def last_first(task_list, worker_list):
        seen.append((list(task_list), list(worker_list)))
        return task_list[-1], worker_list[0]

    with pymw.PyMW_Master(interfaces.GenericInterface(1), scheduler_func=last_first) as m:
        tasks = [m.submit_task(null_worker, input_data=(i,)) for i in range(6)]
        for t in tasks:
            assert m.get_result(t, timeout=WAIT) == (t, tasks.index(t))
        status = m.get_status()
    assert status["tasks"] == tasks and status["num_total_workers"] == 1
    assert seen and all(isinstance(t, pymw.PyMW_Task) for ts, _ in seen for t in ts)
    assert all(isinstance(w, str) for _, ws in seen for w in ws)
    # the last task offered first was the one run first
    order = sorted(tasks, key=lambda t: t._times["execute_time"])
    assert order[0] is seen[0][0][-1]


def test_failing_scheduler_func_falls_back_to_first_task():
    def broken(task_list, worker_list):
        raise RuntimeError("no opinion")

    with pymw.PyMW_Master(interfaces.GenericInterface(2), scheduler_func=broken) as m:
        tasks = [m.submit_task(null_worker, input_data=(i,)) for i in range(4)]
        assert sorted(m.get_result(tasks, timeout=WAIT)[1] for _ in tasks) == [0, 1, 2, 3]


#: scheduler_func answers PyMW could not unpack as (task, worker): it ran the first task
#: on the first worker (only (None, None) meant "nothing for now")
UNPACKABLE_ANSWERS = {
    "three-tuple": lambda tasks, workers: (tasks[0], workers[0], "extra"),
    "bare None": lambda tasks, workers: None,
    "a number": lambda tasks, workers: 7,
    "a lone task in a list": lambda tasks, workers: [tasks[0]],
}


@pytest.mark.parametrize("answer", sorted(UNPACKABLE_ANSWERS))
@pytest.mark.parametrize("where", ["local backend", "user interface"])
def test_scheduler_func_answer_pymw_could_not_unpack_runs_the_first_task(answer, where):
    iface = interfaces.GenericInterface(2) if where == "local backend" else ThreadInterface()
    with pymw.PyMW_Master(iface, scheduler_func=UNPACKABLE_ANSWERS[answer]) as m:
        tasks = [m.submit_task(null_worker, input_data=(i,)) for i in range(4)]
        assert sorted(m.get_result(tasks, timeout=WAIT)[1] for _ in tasks) == [0, 1, 2, 3]


def exits_worker():
    sys.exit(3)


def interrupted_worker():
    raise KeyboardInterrupt


@pytest.mark.parametrize("fn, raised", [(exits_worker, SystemExit), (interrupted_worker, KeyboardInterrupt)])
def test_task_exit_or_interrupt_is_a_task_exception_in_the_master(master, fn, raised):
    """A task's sys.exit() must not end the PyMW program (nor its
    KeyboardInterrupt look like a Ctrl-C): PyMW reported a failed task."""
    task = master.submit_task(fn)
    with pytest.raises(pymw.TaskException, match=f"raised {raised.__name__}") as info:
        master.get_result(task, timeout=WAIT)
    assert type(info.value.__cause__) is raised
    later = master.submit_task(null_worker, input_data=(5,))
    assert master.get_result(later, timeout=WAIT) == (later, 5)


@pytest.mark.parametrize("trial", range(3))
def test_get_result_for_any_task_leaves_a_map_reduce_its_own_tasks(master, trial):
    """get_result() takes the program's tasks and the MapReduce's main task,
    never one of its map or reduce tasks (the MapReduce would starve)."""
    mine = [master.submit_task(null_worker, input_data=(i,)) for i in range(3)]
    mr = pymw.PyMW_MapReduce(master).submit_task_mapreduce(square_all, total, 4, input_data=list(range(1, 21)))
    got = {}
    for _ in range(4):
        task, result = master.get_result(timeout=WAIT)
        got[id(task)] = result
    assert got == {**{id(t): i for i, t in enumerate(mine)}, id(mr): got[id(mr)]}
    assert sum(got[id(mr)]) == 2870 and len(got[id(mr)]) == 4
    with pytest.raises(pymw.TaskException, match="taken already"):
        master.get_result(timeout=WAIT)


def test_loglevel_sets_the_compat_logger_only():
    root = logging.getLogger().level
    with pymw.PyMW_Master(loglevel=logging.INFO):
        assert logging.getLogger("pymw_magic.compat").level == logging.INFO
    assert logging.getLogger().level == root


# --- user-written interfaces, driven by PyMW's loop -----------------------------------------

class ThreadInterface:
    """A PyMW interface of the kind users wrote: two workers, tasks run in
    the calling thread, results handed back with task_finished."""

    def __init__(self):
        self.free = ["A", "B"]
        self.log = []
        self.lock = threading.Lock()

    def get_available_workers(self):
        return list(self.free)

    def reserve_worker(self, worker):
        with self.lock:
            self.free.remove(worker)
            self.log.append(("reserve", worker))

    def worker_finished(self, worker):
        with self.lock:
            self.free.append(worker)
            self.log.append(("finished", worker))

    def execute_task(self, task, worker):
        args = task.input_data or ()
        try:
            result = task._raw_exec(*args)
        except Exception as exc:
            task.task_finished(exc)
        else:
            task.task_finished(None, result)

    def get_status(self):
        return {"num_total_workers": 2, "free": list(self.free)}


class BadInterface:
    def __init__(self, worker_err=0, execute_err=0, status_err=0):
        self.worker_err, self.execute_err, self.status_err = worker_err, execute_err, status_err

    def get_available_workers(self):
        if self.worker_err:
            return 5

    def reserve_worker(self, worker):
        if self.worker_err:
            raise Exception()

    def worker_finished(self, worker):
        if self.worker_err:
            raise Exception()

    def execute_task(self, task, worker):
        if self.execute_err:
            raise Exception("execution error")
        task.task_finished(Exception("no problem"))

    def get_status(self):
        if self.status_err == 1:
            return 1
        if self.status_err == 2:
            raise Exception()
        return {"fine": True}


def test_user_interface_driven_like_pymw():
    iface = ThreadInterface()
    seen = []

    def pick_b(task_list, worker_list):
        seen.append(list(worker_list))
        return task_list[0], ("B" if "B" in worker_list else worker_list[0])

    with pymw.PyMW_Master(interface=iface, scheduler_func=pick_b) as m:
        tasks = [m.submit_task(null_worker, input_data=(i,)) for i in range(20)]
        assert sorted(m.get_result(tasks, timeout=WAIT)[1] for _ in tasks) == list(range(20))
        bad = m.submit_task(err_worker)
        with pytest.raises(ZeroDivisionError):
            m.get_result(bad, timeout=WAIT)
        status = m.get_status()
    assert status["num_total_workers"] == 2 and len(status["tasks"]) == 21
    assert all(set(ws) <= {"A", "B"} for ws in seen)
    with iface.lock:
        reserves = [w for what, w in iface.log if what == "reserve"]
        assert len(reserves) == 21 and reserves.count("B") >= 11   # B whenever it was free
        assert sorted(iface.free) == ["A", "B"]                    # every worker given back
    assert all(t._assigned_worker in ("A", "B") for t in tasks)


@pytest.mark.parametrize("trial", range(5))
def test_bad_interface_failures_reported_as_pymw_did(trial):
    m = pymw.PyMW_Master(interface=BadInterface(status_err=1))
    assert m.get_status()["interface_status"] == "error"
    m = pymw.PyMW_Master(interface=BadInterface(status_err=2))
    assert m.get_status()["interface_status"] == "error"
    m = pymw.PyMW_Master(interface=BadInterface(execute_err=1))
    task = m.submit_task(null_worker)
    with pytest.raises(Exception, match="execution error") as info:
        m.get_result(task, timeout=WAIT)
    assert type(info.value) is Exception
    m = pymw.PyMW_Master(interface=BadInterface(worker_err=1))
    tasks = [m.submit_task(null_worker) for _ in range(10)]
    for t in tasks:
        with pytest.raises(Exception, match="no problem"):
            m.get_result(t, timeout=WAIT)


def test_user_interface_running_task_scripts(tmp_path, monkeypatch):
    """An interface that runs PyMW's ``python SCRIPT IN OUT`` and then calls
    task_finished() with nothing: the result is read from the output file."""
    monkeypatch.chdir(tmp_path)

    class ScriptInterface:
        def execute_task(self, task, worker):
            proc = subprocess.run([sys.executable, task._executable_name, task._input_arg, task._output_arg],
                                  capture_output=True, text=True, timeout=WAIT,
                                  env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(__file__)])))
            if proc.returncode:
                raise Exception("Executable failed with error " + str(proc.returncode) + "\n" + proc.stderr)
            task.task_finished()

    m = pymw.PyMW_Master(interface=ScriptInterface())
    tasks = [m.submit_task(print_worker, input_data=(f"t{i}",)) for i in range(3)]
    for t in tasks:
        assert m.get_result(t, timeout=WAIT)[1] == 2
        assert t._stdout == t.input_data[0].join(["out:", ""])
    bad = m.submit_task(err_worker)
    with pytest.raises(Exception, match="ZeroDivisionError"):
        m.get_result(bad, timeout=WAIT)
    assert os.listdir(tmp_path / "tasks")
    m.shutdown()
    assert not os.path.exists(tmp_path / "tasks")   # delete_files=True: PyMW removed them at exit


# --- the grid simulator -----------------------------------------------------------------------

def test_grid_simulator_times_follow_speeds_and_availability():
    grid = GridSimulatorInterface()
    seen = []

    def fastest(task_list, worker_list):
        seen.append(list(worker_list))
        return task_list[0], max(worker_list, key=lambda w: w._speed)

    with pymw.PyMW_Master(interface=grid, scheduler_func=fastest) as m:
        grid.add_worker(SimWorker("slow", 1.0))
        grid.add_worker(SimWorker("late", 2.0, [5.0, 100.0], [0.0, 1.0]))   # up from t=5
        tasks = [m.submit_task(sim_length, input_data=(10.0,)) for _ in range(2)]
        results = {t: m.get_result(t, timeout=WAIT)[1] for t in tasks}
        status = m.get_status()
        with pytest.raises(pymw.InterfaceException, match="before the first submit_task"):
            grid.add_worker(SimWorker("too-late", 1.0))
    assert set(results.values()) == {10.0}   # the length the function returned
    by_worker = {t._assigned_worker._name: t for t in tasks}
    assert set(by_worker) == {"slow", "late"}
    assert by_worker["slow"]._times["finish_time"] == pytest.approx(10.0)
    assert by_worker["late"]._times["execute_time"] == pytest.approx(5.0)
    assert by_worker["late"]._times["finish_time"] == pytest.approx(10.0)   # 10 at speed 2, from 5
    assert by_worker["late"].get_execution_time() == pytest.approx(5.0)
    assert status["num_executed_tasks"] == 2 and status["num_total_workers"] == 2
    assert status["cur_sim_time"] == pytest.approx(10.0)
    assert status["total_cpu_time"] == pytest.approx(20.0)
    assert status["total_wall_time"] == pytest.approx(15.0)
    assert seen and all(isinstance(w, SimWorker) for ws in seen for w in ws)


def test_grid_simulator_generate_workers_and_fta_trace(tmp_path):
    trace = tmp_path / "event_trace.tab"
    rows = ["event_id\tcomponent_id\tnode_id\tplatform_id\tnode_name\tevent_type\tevent_start_time\t"
            "event_stop_time\tevent_end_reason"]
    rows += [f"{i}\t0\tnode{i}\t0\tn{i}\t1\t{100 + 10 * i}\t{1000 + 10 * i}\t0" for i in range(4)]
    trace.write_text("\n".join(rows) + "\n")
    grid = GridSimulatorInterface()
    with open(trace) as f:
        grid.read_workers_from_fta_tab_files(f, num_workers=3)
    assert [w._name for w in grid._worker_list] == ["node0", "node1", "node2"]
    grid2 = GridSimulatorInterface(trace_files=[str(trace)])
    assert len(grid2._worker_list) == 4
    with pymw.PyMW_Master(interface=grid) as m:
        tasks = [m.submit_task(sim_length, input_data=(5.0,)) for _ in range(3)]
        for t in tasks:
            m.get_result(t, timeout=WAIT)
        # node i comes up at 10*i (the trace starts at 0): node0 runs two tasks, 0-5 and 5-10,
        # before another node is up; the third starts at 10
        assert sorted(t._times["finish_time"] for t in tasks) == pytest.approx([5.0, 10.0, 15.0])
        assert tasks[0]._assigned_worker._name == "node0"

    empty = GridSimulatorInterface()
    with pymw.PyMW_Master(interface=empty) as m:
        task = m.submit_task(sim_length)
        with pytest.raises(pymw.InterfaceException, match="no workers"):
            m.get_result(task, timeout=WAIT)

    gen = GridSimulatorInterface()
    gen.generate_workers(3, lambda i: i + 1.0, lambda i: ([50.0], [1.0]))
    assert [(w._name, w._speed) for w in gen._worker_list] == [("W0", 1.0), ("W1", 2.0), ("W2", 3.0)]
    with pymw.PyMW_Master(interface=gen) as m:
        t = m.submit_task(sim_length, input_data=(100.0,))   # longer than any worker is up
        with pytest.raises(Exception):   # noqa: B017  (the simulator's own error)
            m.get_result(t, timeout=WAIT)


# --- the command line --------------------------------------------------------------------------

def test_parse_options_pymw_flags():
    from optparse import OptionParser
    opts, rest = interfaces.parse_options(args=["extra"] or None)
    assert (opts.interface, opts.n_workers, opts.g_loc, opts.p_home, opts.custom_app_dir,
            opts.custom_app_args) == ("generic", "4", "~/Ganga/bin/ganga", "", "", "")
    assert rest == ["extra"]
    parser = OptionParser()
    parser.add_option("-t", "--num_tests", dest="n_tests", default="10")
    opts, _ = interfaces.parse_options(parser, ["-i", "mpi", "-n", "3", "-t", "7", "-p", "/proj", "-c", "/app",
                                                "-a", "--x", "-g", "/g"])
    assert (opts.interface, opts.n_workers, opts.n_tests, opts.p_home, opts.custom_app_dir,
            opts.custom_app_args, opts.g_loc) == ("mpi", "3", "7", "/proj", "/app", "--x", "/g")
    long, _ = interfaces.parse_options(args=["--interface", "multicore", "--num_workers", "2"])
    assert isinstance(interfaces.get_interface(long), interfaces.MulticoreInterface)
    generic, _ = interfaces.parse_options(args=["-n", "3"])
    iface = interfaces.get_interface(generic)
    assert isinstance(iface, interfaces.GenericInterface) and iface.master_args()[:2] == ("local", 3)


@pytest.mark.parametrize("args, message", [(["-i", "nope"], "Interface nope unknown; valid interfaces: generic"),
                                           (["-n", "two"], "-n/--num_workers must be a whole number, not 'two'")])
def test_bad_command_line_is_a_usage_error(args, message, capsys):
    """Exit status 2 with the reason on stderr, as optparse's own errors."""
    with pytest.raises(SystemExit) as info:
        interfaces.get_interface(interfaces.parse_options(args=args)[0])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, backend", [("condor", "condor"), ("boinc", "boinc"), ("ganga", "ganga")])
def test_interfaces_without_their_backend_say_so(flag, backend):
    if backend in backend_names():
        pytest.skip(f"the {backend} backend is registered here")
    opts, _ = interfaces.parse_options(args=["-i", flag, "-p", "/proj"])
    with pytest.raises(BackendMissing, match=f"'{backend}' backend") as info:
        interfaces.get_interface(opts)
    assert isinstance(info.value, pymw.InterfaceException)


def test_condor_and_boinc_map_onto_their_backends_once_registered(tmp_path):
    """In a fresh interpreter: backends named condor and boinc (real local
    workers, declaring the options those backends take) are registered,
    and the PyMW interfaces start using them with their settings mapped."""
    (tmp_path / "fake_backends.py").write_text(textwrap.dedent("""\
        from pymw_magic.backends.base import Option
        from pymw_magic.backends.local import LocalBackend
        seen = {}

        class Boinc(LocalBackend):
            name = "boinc"
            options = {k: Option(k, t, None) for k, t in [("project_home", str), ("target_nresults", int),
                       ("min_quorum", int), ("max_nbytes", int), ("custom_app_dir", str)]}
            def __init__(self, scheduler, workers, key, **options):
                seen["boinc"] = options
                super().__init__(scheduler, workers, key)

        class Condor(LocalBackend):
            name = "condor"
            options = {"condor_submit": Option("condor_submit", str, None)}
            def __init__(self, scheduler, workers, key, **options):
                seen["condor"] = options
                super().__init__(scheduler, workers, key)
    """))
    (tmp_path / "prog.py").write_text(textwrap.dedent("""\
        from pymw_magic.backends import register_backend
        register_backend("boinc", "fake_backends:Boinc")
        register_backend("condor", "fake_backends:Condor")
        import fake_backends
        from pymw_magic.compat import pymw, interfaces

        def f(x):
            return x + 1

        opts, _ = interfaces.parse_options(args=["-i", "boinc", "-p", "/proj", "-c", "/app"])
        boinc = interfaces.get_interface(opts)
        boinc.set_boinc_args(target_nresults=3, min_quorum=2, max_nbytes=1000)
        with pymw.PyMW_Master(boinc) as m:
            print(m.get_result(m.submit_task(f, input_data=(1,)), timeout=60)[1])
        with pymw.PyMW_Master(interfaces.CondorInterface(condor_submit_loc="/bin/cs")) as m:
            print(m.get_result(m.submit_task(f, input_data=(2,)), timeout=60)[1])
        print(sorted(fake_backends.seen["boinc"].items()))
        print(sorted(fake_backends.seen["condor"].items()))
    """))
    out = _run([sys.executable, "prog.py"], cwd=tmp_path).splitlines()
    assert out[:2] == ["2", "3"]
    assert out[2] == str(sorted({"project_home": "/proj", "custom_app_dir": "/app", "target_nresults": 3,
                                 "min_quorum": 2, "max_nbytes": 1000}.items()))
    assert out[3] == str([("condor_submit", "/bin/cs")])


# --- the example programs, run as PyMW programs are ----------------------------------------------

def _run(cmd, cwd=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _example(name, *args):
    return _run([sys.executable, os.path.join(EXAMPLES, name), *args])


def test_loglevel_in_a_program_without_logging_leaves_the_root_logger_alone(tmp_path):
    script = tmp_path / "logs.py"
    script.write_text(textwrap.dedent("""
        import logging
        from pymw_magic.compat import pymw
        def f(x):
            return x
        m = pymw.PyMW_Master(loglevel=logging.INFO)
        t = m.submit_task(f, input_data=(1,))
        m.get_result(t, timeout=60)
        logging.getLogger("another.library").info("another library's INFO")
        print("root level", logging.getLevelName(logging.getLogger().level))
    """))
    proc = subprocess.run([sys.executable, str(script)], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "root level WARNING" in proc.stdout
    assert re.search(r"INFO Task \S+ finished", proc.stderr)        # PyMW's own messages show
    assert "another library's INFO" not in proc.stderr


def test_example_monte_pi():
    out = _example("monte_pi.py", "-i", "generic", "-n", "2", "-t", "200000")
    estimate = float(re.search(r"Estimate of pi: ([\d.]+)", out).group(1))
    assert abs(estimate - math.pi) < 0.05
    assert "Number of tasks: 2" in out and "Darts per task: 100000" in out


def test_example_prime_finder():
    out = _example("prime_finder.py", "-i", "generic", "-n", "2", "-s", "20000")
    assert "Primes between 1 and 20000: 2262" in out
    assert "[19961, 19963, 19973, 19979, 19991, 19993, 19997]"[-30:] in out


def test_example_string_counter(tmp_path):
    data = tmp_path / "words.txt"
    data.write_text("task task a\nbb task\n")
    out = _example("string_counter.py", "-i", "generic", "-n", "2", "-f", str(data), "-w", "task,a,b,z")
    assert re.findall(r"Counted (\d+) instances of '(\w+)'", out) == [("3", "task"), ("4", "a"), ("2", "b"),
                                                                     ("0", "z")]


def test_example_genetic_algorithm():
    out = _example("genetic_algorithm.py", "-i", "generic", "-n", "2", "-m", "10", "-l", "12", "-t", "4")
    gens = re.findall(r"Generation (\d+) max fitness (\d+)", out)
    assert [g for g, _ in gens] == ["0", "1", "2", "3"]
    best = int(re.search(r"Best individual: (\d+) / 12", out).group(1))
    assert best == max(int(f) for _, f in gens) and 0 < best <= 12


def test_example_worker_sim():
    out = _example("worker_sim.py", "-i", "generic", "-n", "4", "-t", "10")
    stats = dict(re.findall(r"^(\w+): (\S+)$", out, re.M))
    assert stats["num_executed_tasks"] == "20" and stats["num_total_workers"] == "4"
    assert float(stats["total_cpu_time"]) == pytest.approx(10 * 60 + 10 * 15)
    assert float(stats["cur_sim_time"]) > 0


def _mpi_missing() -> str | None:
    """Why the MPI examples cannot run here, or None."""
    if importlib.util.find_spec("mpi4py") is None:
        return "the MPI backend needs pip install 'pymw-magic[mpi]'"
    from pymw_magic.backends.mpi import find_mpiexec   # imports no mpi4py.MPI
    try:
        find_mpiexec()
    except FileNotFoundError as exc:
        return str(exc)
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


@needs_mpi
def test_example_monte_pi_on_mpi():
    out = _example("monte_pi.py", "-i", "mpi", "-n", "2", "-t", "100000")
    estimate = float(re.search(r"Estimate of pi: ([\d.]+)", out).group(1))
    assert abs(estimate - math.pi) < 0.05


@needs_mpi
def test_example_prime_finder_on_mpi():
    out = _example("prime_finder.py", "-i", "mpi", "-n", "2", "-s", "5000")
    assert "Primes between 1 and 5000: 669" in out


@pytest.mark.parametrize("scheduler_func", [None, lambda tasks, workers: (tasks[0], workers[0])])
def test_dropped_master_releases_its_workers(scheduler_func):
    """PyMW programs never shut their master down: dropping it (or the
    program's end) stops the workers, with or without a scheduler_func."""
    import gc

    from conftest import wait_gone, worker_processes
    before = {p.pid for p in worker_processes()}
    m = pymw.PyMW_Master(interfaces.GenericInterface(2), scheduler_func=scheduler_func)
    task = m.submit_task(null_worker, input_data=(1,))
    assert m.get_result(task, timeout=WAIT) == (task, 1)
    mine = [p.pid for p in worker_processes() if p.pid not in before]
    assert mine
    del m, task
    gc.collect()
    assert wait_gone(mine, timeout=15) == []


@pytest.mark.parametrize("trial", range(3))
def test_get_result_from_many_threads_delivers_each_task_once(master, trial):
    per_thread, n_threads = 25, 8
    delivered: list = []
    errors: list = []
    lock = threading.Lock()

    def own_tasks(k):
        try:
            tasks = [master.submit_task(null_worker, input_data=((k, i),)) for i in range(per_thread)]
            got = [master.get_result(tasks, timeout=WAIT) for _ in tasks]
            assert sorted(v for _, v in got) == [(k, i) for i in range(per_thread)]
            with lock:
                delivered.extend(t for t, _ in got)
        except BaseException as exc:  # noqa: BLE001  (reported below, with the thread's own error)
            errors.append(exc)

    def any_tasks(k):
        try:
            tasks = [master.submit_task(null_worker, input_data=((k, i),)) for i in range(per_thread)]
            with lock:
                delivered.extend(tasks)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=own_tasks, args=(k,)) for k in range(n_threads)]
    threads += [threading.Thread(target=any_tasks, args=(k,)) for k in range(n_threads, n_threads + 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * WAIT)
    assert not any(t.is_alive() for t in threads) and errors == []
    # the tasks of the "any" threads are still to be taken: each exactly once
    rest = [master.get_result(timeout=WAIT) for _ in range(2 * per_thread)]
    assert len({id(t) for t, _ in rest}) == 2 * per_thread
    assert len({id(t) for t in delivered}) == len(delivered) == (n_threads + 2) * per_thread
    with pytest.raises(pymw.TaskException, match="taken already"):
        master.get_result(timeout=WAIT)
