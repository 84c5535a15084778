"""PyMW's ``pymw`` module on pymw-magic: ``PyMW_Master``, ``PyMW_Task``,
``PyMW_MapReduce`` and PyMW's exceptions, so a PyMW program runs with only
its imports changed (``from pymw_magic.compat import pymw``).

A translation layer, not a second engine.  ``PyMW_Master`` turns the
interface it is given into one :class:`pymw_magic.Master` (generic and
multicore → ``local``, MPI → ``mpi``, the grid simulator → ``simulator``,
Condor → ``condor``, BOINC → ``boinc``), started at the first
``submit_task``; each ``submit_task`` is one ``Master.submit`` of
:func:`pymw_magic.compat.runtime.call_task` around the task's function, and
each finished Future becomes PyMW's finished task, taken by ``get_result``.
A ``scheduler_func(tasks, workers)`` becomes the master's policy (it sees
PyMW tasks; workers are the backend's names, or PyMW ``SimWorker`` objects on
the simulator).  A user-written, duck-typed interface (``get_available_workers``,
``reserve_worker``, ``worker_finished``, ``execute_task``, ``get_status``)
is driven as PyMW drove it: a thread runs PyMW's matching loop and calls
``execute_task(task, worker)`` in a thread per task, and its failures come
back as PyMW reported them (:mod:`pymw_magic.compat.driver`).

Where this differs from PyMW on purpose:

* no task scripts and no ``./tasks`` files: functions, arguments and
  results travel as signed pickles to long-lived workers (PyMW ran unsigned
  generated scripts, one Python interpreter per task, and polled result
  files).  ``delete_files`` is accepted and has nothing to delete, except
  for a user-written interface that reads a task's ``_executable_name``,
  ``_input_arg`` or ``_output_arg``: those files are then written (to
  ``./tasks``, PyMW's protocol ``python SCRIPT IN OUT``) and removed at
  exit unless ``delete_files=False``;
* ``modules=`` are imported on the worker and ``dep_funcs=`` given to the
  task's globals there (as PyMW's script did); the function itself is
  pickled by value (cloudpickle), so what it uses travels with it;
* ``data_files=`` are read at submit and unpacked into a fresh directory
  that is the task's working directory while it runs; ``input_from_file``
  is accepted and changes nothing (as with PyMW's own local interfaces);
* ``get_result`` raises :class:`TaskException` where PyMW would block for
  ever (every task asked for has had its result taken already) and takes
  an optional ``timeout=`` (seconds; ``TimeoutError``); results come in
  the order tasks finished;
* a task's error is re-raised with its own type (PyMW raised a plain
  ``Exception`` holding the worker's stderr), except a task's
  ``SystemExit`` or ``KeyboardInterrupt``: that is a :class:`TaskException`
  (from it), so a task cannot end or interrupt the master program;
* ``get_result()`` for any task never takes one of a ``PyMW_MapReduce``'s
  own map or reduce tasks (in PyMW it could, and the MapReduce hung): only
  its main task, or a call naming them;
* a task's times: ``execute_time`` is when the function started on the
  worker, ``finish_time`` when the master learnt it ended (virtual seconds
  on the simulator);
* ``loglevel`` sets the level of the ``pymw_magic.compat`` logger (PyMW
  reconfigured the root logger);
* ``PyMW_Master.shutdown()`` (and ``with PyMW_Master(...)``) release the
  workers at once; otherwise they go when the master is garbage-collected
  or the program exits, as in PyMW.
"""

from __future__ import annotations

import linecache
import logging
import os
import threading
import time
import types
import weakref
from typing import Any, Callable, Iterable

from ..cellfunc import BoundCell
from ..master import Master
from . import interfaces  # noqa: F401  (PyMW's ``pymw.interfaces``: worker_sim.py uses it)
from .backing import BackendInterface
from .driver import InterfaceDriver
from .errors import InterfaceException, TaskException
from .interfaces import generic
from .runtime import call_task, run_script

__all__ = ["PyMW_Master", "PyMW_Task", "PyMW_MapReduce", "TaskException", "InterfaceException", "interfaces"]

log = logging.getLogger("pymw_magic.compat")


class _Finished:
    """Finished tasks waiting for ``get_result`` (PyMW's ``PyMW_List``),
    and how many submitted tasks have not had their result taken.  A
    MapReduce's own map and reduce tasks (``_internal``) are given only to
    a call naming them, never to ``get_result()`` for any task: taking one
    there would starve the MapReduce (PyMW then hung)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._data: list[PyMW_Task] = []
        self._untaken = 0

    def __len__(self) -> int:
        return len(self._data)

    def expect(self, task: "PyMW_Task") -> None:
        """One more task will end here."""
        if not task._internal:
            with self._cond:
                self._untaken += 1

    def append(self, task: "PyMW_Task") -> None:
        with self._cond:
            self._data.append(task)
            self._cond.notify_all()

    def contains(self, task: "PyMW_Task") -> bool:
        with self._cond:
            return task in self._data

    def pop_specific(self, wanted: list["PyMW_Task"], blocking: bool,
                     timeout: float | None) -> "PyMW_Task | None":
        """The first finished task of ``wanted`` (any when empty); None if
        not ``blocking`` and none is ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ids = {id(t) for t in wanted}
        with self._cond:
            while True:
                for i, task in enumerate(self._data):
                    if id(task) in ids if ids else not task._internal:
                        del self._data[i]
                        if not task._taken:
                            task._taken = True
                            self._untaken -= 0 if task._internal else 1
                        return task
                if not blocking:
                    return None
                if (all(t._taken for t in wanted) if wanted else self._untaken <= 0):
                    raise TaskException("every task asked for has had its result taken already: "
                                        "get_result would wait for ever")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no result within {timeout} s")
                self._cond.wait(left)


class PyMW_Task:
    """A task: PyMW's attributes and methods.

    ``get_total_time()`` (finish - submit), ``get_execution_time()``
    (finish - start of execution), ``get_progress()``; ``_stdout`` and
    ``_stderr`` (what the task printed), ``_times``, ``_task_state``
    (``TASK_SUBMITTED``, ``TASK_RUNNING``, ``TASK_ERROR``, ``TASK_FINISHED``).
    An interface ends a task with ``task_finished(task_err=None, result=None)``.
    """

    TASK_SUBMITTED = "submitted"
    TASK_RUNNING = "running"
    TASK_ERROR = "error"
    TASK_FINISHED = "finished"

    def __init__(self, task_name: str, executable: Any, finished_queue: _Finished, input_data: Any = None,
                 file_loc: str = "tasks", modules: tuple = (), dep_funcs: tuple = (),
                 data_files: tuple = (), file_input: bool = False):
        if not callable(executable) and not isinstance(executable, (str, bytes)):
            raise TypeError("executable must be a filename or Python function")
        self.executable = executable
        self.input_data = input_data
        self._raw_exec = executable
        self._task_name = task_name
        self._finished_queue = finished_queue
        self._file_loc = file_loc
        self._modules = tuple(modules)
        self._dep_funcs = tuple(dep_funcs)
        self._data_files = tuple(data_files)   # (name, bytes)
        self._file_input = file_input
        self._data_file_zip = None
        self._modules_file_zip = None
        self._output_data: Any = None
        self._error: BaseException | None = None
        self._stdout: str | None = None
        self._stderr: str | None = None
        self._assigned_worker: Any = None
        self._worker_finish_func: Callable[[Any], None] | None = None
        self._task_state = self.TASK_SUBMITTED
        self._times = {"submit_time": time.time(), "execute_time": 0, "finish_time": 0}
        self._taken = False
        self._internal = False   # a MapReduce's own map or reduce task
        self._files: dict[str, str] = {}
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return self._task_name

    __repr__ = __str__

    # --- what PyMW code reads ---------------------------------------------------------
    def _state_data(self) -> dict[str, Any]:
        return {"task_name": self._task_name, "executable": self._executable_name_or_none(),
                "input_arg": self._files.get("in"), "output_arg": self._files.get("out"),
                "times": self._times, "state": self._task_state}

    def get_total_time(self) -> float | None:
        """Time from submission to completion; None until the task ended."""
        if self._task_state in (self.TASK_FINISHED, self.TASK_ERROR):
            return self._times["finish_time"] - self._times["submit_time"]
        return None

    def get_execution_time(self) -> float | None:
        """Time from the start of execution to completion; None until the task ended."""
        if self._task_state in (self.TASK_FINISHED, self.TASK_ERROR):
            return self._times["finish_time"] - self._times["execute_time"]
        return None

    def get_progress(self) -> float:
        """1.0 once finished, 0.0 before (PyMW's tasks report no progress in between)."""
        return 1.0 if self._task_state == self.TASK_FINISHED else 0.0

    def cleanup(self, delete_files: bool) -> None:
        if delete_files:
            for path in self._files.values():
                if not path.endswith(".py"):
                    _remove(path)

    # --- the end of a task ---------------------------------------------------------------
    def task_finished(self, task_err: BaseException | None = None, result: Any = None) -> None:
        """Called by the interface when the task ended: with its error, or
        its result (without either, the result is read from ``_output_arg``,
        PyMW's file protocol)."""
        output, out, err = result, None, None
        if task_err is None and result is None and "out" in self._files:
            try:
                output, out, err = _read_pickle(self._files["out"])
            except Exception as exc:  # PyMW's words for a missing or bad result file
                task_err = Exception(f"Error reading task result {self._files['out']}: {exc}")
                output = None
        self._finish(task_err, output, out, err)
        worker_done, self._worker_finish_func = self._worker_finish_func, None
        if worker_done is not None:
            try:
                worker_done(self._assigned_worker)
            except Exception:  # PyMW ignored an interface's failing worker_finished
                pass

    def _finish(self, error: BaseException | None, output: Any, stdout: str | None = None,
                stderr: str | None = None, times: dict[str, float] | None = None) -> None:
        with self._lock:
            if self._task_state in (self.TASK_FINISHED, self.TASK_ERROR):
                return   # ended already (an interface calling task_finished twice)
            self._error = error
            self._output_data = None if error is not None else output
            if stdout is not None:
                self._stdout, self._stderr = stdout, stderr
            self._times["finish_time"] = time.time()
            if times:
                self._times.update(times)
            if not self._times["execute_time"]:
                self._times["execute_time"] = self._times["submit_time"]
            self._task_state = self.TASK_ERROR if error is not None else self.TASK_FINISHED
        log.info("Task %s %s", self, "had an error" if error is not None else "finished")
        self._finished_queue.append(self)

    # --- PyMW's file protocol, for user-written interfaces that run scripts ---------------
    def _executable_name_or_none(self) -> str | None:
        return self._files.get("exe")

    @property
    def _executable_name(self) -> str:
        """A script ``python SCRIPT IN OUT`` runs this task (written on first use)."""
        self._write_files()
        return self._files["exe"]

    @property
    def _input_arg(self) -> str:
        self._write_files()
        return self._files["in"]

    @property
    def _output_arg(self) -> str:
        self._write_files()
        return self._files["out"]

    def _write_files(self) -> None:
        with self._lock:
            if self._files:
                return
            import cloudpickle
            os.makedirs(self._file_loc, exist_ok=True)
            base = os.path.join(self._file_loc, self._task_name)
            exe, inp, out = base + ".py", base + ".in.dat", base + ".out.dat"
            with open(exe, "w") as f:
                f.write("import sys\nfrom pymw_magic.compat.runtime import script_main\n"
                        "script_main(sys.argv[1], sys.argv[2])\n")
            fn, args = _task_call(self)
            with open(inp, "wb") as f:
                cloudpickle.dump((fn, args, self._modules, self._dep_funcs, self._data_files), f)
            _remove(out)
            self._files = {"exe": exe, "in": inp, "out": out}


def _task_call(task: PyMW_Task, ship: bool = True) -> tuple[Callable, tuple]:
    """The function and argument tuple that run ``task`` (a script runs as a
    subprocess); ``ship``: it goes to another process, with its source."""
    args = tuple(task.input_data) if task.input_data else ()
    if isinstance(task.executable, str):
        return run_script, (task._script_source, task.executable, args)   # type: ignore[attr-defined]
    return (with_source(task.executable) if ship else task.executable), args


#: source text shipped with a script's function for its remote tracebacks, at most
MAX_SOURCE = 1 << 20


def with_source(fn: Any) -> Any:
    """A function of the program's ``__main__`` travels by value under the
    name ``<dynamic-code>``: bound to its file's text it keeps its file name
    and lines in the worker's tracebacks (as the master does for the
    functions it is given directly)."""
    if not isinstance(fn, types.FunctionType) or fn.__module__ != "__main__":
        return fn
    filename = fn.__code__.co_filename
    text = "".join(linecache.getlines(filename, fn.__globals__))
    if not text or len(text) > MAX_SOURCE:
        return fn
    return BoundCell(fn, filename, text)


def _read_pickle(path: str) -> Any:
    import pickle
    with open(path, "rb") as f:
        return pickle.load(f)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class PyMW_Master:
    """``PyMW_Master(interface=None, loglevel=logging.CRITICAL, delete_files=True, scheduler_func=None)``:
    submit tasks with :meth:`submit_task`, collect them with :meth:`get_result`."""

    def __init__(self, interface: Any = None, loglevel: int = logging.CRITICAL, delete_files: bool = True,
                 scheduler_func: Callable[[list, list], Any] | None = None):
        log.setLevel(loglevel)
        if loglevel < logging.CRITICAL and not log.handlers and not logging.getLogger().handlers:
            # a program that set up no logging still sees PyMW's messages,
            # without the root logger (every other library's) changing level
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
        if interface is not None:
            if not hasattr(interface, "execute_task"):
                raise InterfaceException("Interface must have execute_task() function.")
            if not callable(interface.execute_task):
                raise InterfaceException("Interface execute_task must be a function.")
            self._interface = interface
        else:
            self._interface = generic.GenericInterface()
        self._backed = isinstance(self._interface, BackendInterface) and \
            type(self._interface).execute_task is BackendInterface.execute_task
        self._batched = self._backed and bool(getattr(self._interface, "batched", False))
        self._scheduler_func = scheduler_func
        self._delete_files = delete_files
        self._task_dir_name = os.path.join(os.getcwd(), "tasks")
        self._start_time_str = str(int(time.time()))
        self._cur_task_num = 0
        self._lock = threading.Lock()
        self._submitted_tasks: list[PyMW_Task] = []
        self._submitted_ids: set[int] = set()
        self._finished_tasks = _Finished()
        self._keys: dict[int, PyMW_Task] = {}    # task key (in the task's arguments) -> PyMW task
        self._held: list[tuple[PyMW_Task, Callable, tuple]] = []   # batched: not handed over yet
        self._start_error: BaseException | None = None
        self._holder: list[Master | None] = [None]
        self._starting = threading.Lock()
        self._driver = None if self._backed else InterfaceDriver(self._interface, scheduler_func)
        self._finalizer = weakref.finalize(self, _close, self._holder, self._interface, self._submitted_tasks,
                                           delete_files, self._task_dir_name)

    # --- submitting -------------------------------------------------------------------
    def submit_task(self, executable: Any, input_data: Any = None, modules: Iterable[str] = (),
                    dep_funcs: Iterable[Callable] = (), data_files: Iterable[str] = (),
                    input_from_file: bool = False) -> PyMW_Task:
        """Create and submit a task; returns it.  ``executable`` is a function
        (or a Python script's path); ``input_data`` the tuple of its arguments."""
        return self._submit(executable, input_data, modules, dep_funcs, data_files, input_from_file)

    def _submit(self, executable: Any, input_data: Any = None, modules: Iterable[str] = (),
                dep_funcs: Iterable[Callable] = (), data_files: Iterable[str] = (),
                input_from_file: bool = False, internal: bool = False) -> PyMW_Task:
        if callable(executable):
            owner = getattr(executable, "__self__", None)
            if owner is not None and not isinstance(owner, type(os)):
                cls = owner if isinstance(owner, type) else type(owner)
                exec_name = f"{cls.__module__}.{cls.__name__}.{getattr(executable, '__name__', 'call')}"
            else:
                exec_name = f"{getattr(executable, '__module__', None)}.{getattr(executable, '__name__', 'task')}"
        elif isinstance(executable, str):
            exec_name = executable
        else:
            raise TaskException("Executable must be a filename or function")
        if isinstance(modules, str) or callable(dep_funcs) or isinstance(data_files, str):  # type: ignore[arg-type]
            raise TaskException("modules, dep_funcs and data_files are tuples (a lone one needs a trailing comma)")
        if input_data is not None:
            try:
                input_data = tuple(input_data)
            except TypeError:
                raise TaskException(f"input_data must be the tuple of the task's arguments (a lone one needs "
                                    f"a trailing comma: ({input_data!r},)), not {type(input_data).__name__}") from None
        files = tuple((os.path.basename(p), _read_file(p)) for p in data_files)
        with self._lock:
            num = self._cur_task_num
            self._cur_task_num += 1
        task = PyMW_Task(f"{exec_name}_{self._start_time_str}_{num}", executable, self._finished_tasks,
                         input_data=input_data, file_loc=self._task_dir_name, modules=tuple(modules),
                         dep_funcs=tuple(dep_funcs), data_files=files, file_input=input_from_file)
        task._internal = internal
        script_error = None
        if isinstance(executable, str):
            try:
                with open(executable) as f:
                    task._script_source = f.read()   # type: ignore[attr-defined]
            except OSError as exc:   # PyMW: the task fails, get_result raises
                script_error = TaskException(f"cannot read the task script {executable!r}: {exc.strerror or exc}")
        with self._lock:
            self._submitted_tasks.append(task)
            self._submitted_ids.add(id(task))
            self._finished_tasks.expect(task)
            key = id(task)
            self._keys[key] = task
        if script_error is not None:
            task._finish(script_error, None)
        elif self._driver is not None:
            self._driver.add(task)
        else:
            self._hand_over(task, key)
        return task

    def _hand_over(self, task: PyMW_Task, key: int) -> None:
        """To the master: now, or (the simulator) at the next wait."""
        fn, args = _task_call(task, ship=not self._batched)
        if self._batched:
            with self._lock:
                self._held.append((task, fn, args))
            return
        master = self._master()
        if master is None:
            task._finish(self._start_error, None)
            return
        try:
            future = master.submit(call_task, fn, args, task._modules,
                                   tuple(with_source(d) for d in task._dep_funcs), task._data_files, key=key)
        except Exception as exc:   # e.g. the master was shut down
            task._finish(exc, None)
            return
        future.add_done_callback(lambda f: _future_done(task, f))

    def _master(self) -> Master | None:
        """The pymw-magic master, started on first use; None (with
        ``_start_error``) if it cannot start."""
        master = self._holder[0]
        if master is not None or self._start_error is not None:
            return master
        with self._starting:
            if self._holder[0] is None and self._start_error is None:
                try:
                    backend, workers, options = self._interface.master_args()
                    policy: Any = "fifo"
                    if self._scheduler_func is not None:
                        policy = _PolicyAdapter(self._keys, self._interface, self._scheduler_func)
                    self._holder[0] = Master(backend, workers, policy=policy, **options)
                except Exception as exc:
                    log.error("cannot start the %s backend: %s", getattr(self._interface, "backend", "?"), exc)
                    self._start_error = exc
        return self._holder[0]

    def _flush(self) -> None:
        """Hand the tasks held for the simulator over, as one submission."""
        with self._lock:
            held, self._held = self._held, []
        if not held:
            return
        master = self._master()
        if master is None:
            for task, _, _ in held:
                task._finish(self._start_error, None)
            return
        iface = self._interface
        arguments = []
        for task, fn, args in held:
            call, call_args = iface.task_call(fn, args, id(task))
            arguments.append(call_args)
        job = master.starmap_async(call, arguments, name="pymw")
        threading.Thread(target=self._collect, args=(job, [t for t, _, _ in held]), daemon=True,
                         name="pymw-compat-results").start()

    def _collect(self, job: Any, tasks: list[PyMW_Task]) -> None:
        """The simulator's finished tasks become PyMW's, in the order they end."""
        try:
            for t in job.as_completed():
                ptask = tasks[t.index]
                if t.state.value == "done":
                    worker = self._interface.record(t.worker, t.started, t.finished, t.result)
                    ptask._assigned_worker = worker
                    ptask._finish(None, t.result, "", "", {"submit_time": t.submitted, "execute_time": t.started,
                                                          "finish_time": t.finished})
                else:
                    ptask._finish(t.error or TaskException(f"task {ptask} was cancelled"), None)
        except Exception as exc:  # the job itself failed: every task not ended fails with it
            for ptask in tasks:
                ptask._finish(exc, None)

    # --- results ------------------------------------------------------------------------
    def _check_task_list(self, task_list: list) -> None:
        if len(self._submitted_tasks) <= 0:
            raise TaskException("No tasks have been submitted")
        for t in task_list:
            if not isinstance(t, PyMW_Task):
                raise TaskException("Function requires either a task, a list of tasks, or None")
        if any(id(t) not in self._submitted_ids for t in task_list):
            raise TaskException("Task has not been submitted")

    @staticmethod
    def _as_list(task: Any) -> list:
        if not task:
            return []
        if isinstance(task, (list, tuple)):
            return list(task)
        return [task]

    def get_result(self, task: Any = None, blocking: bool = True, *,
                   timeout: float | None = None) -> tuple[PyMW_Task | None, Any]:
        """``(task, result)`` of a finished task: any (``task=None``), the one
        given, or any of a list.  ``(None, None)`` when not ``blocking`` and
        none is ready.  Re-raises the task's error."""
        task_list = self._as_list(task)
        self._check_task_list(task_list)
        self._flush()
        my_task = self._finished_tasks.pop_specific(task_list, blocking, timeout)
        if my_task is None:
            return None, None
        error = my_task._error
        if error is not None:
            if not isinstance(error, Exception):
                # a task's sys.exit() or KeyboardInterrupt must not end or
                # interrupt this program (PyMW reported a failed executable)
                raise TaskException(f"task {my_task} raised {type(error).__name__}"
                                    + (f": {error}" if str(error) else "")) from error
            raise error
        return my_task, my_task._output_data

    def get_progress(self, task: Any) -> list[float]:
        """The progress (0 to 1) of a task or of each of a list of tasks."""
        task_list = self._as_list(task)
        self._check_task_list(task_list)
        self._flush()
        return [t.get_progress() for t in task_list]

    def get_status(self) -> dict[str, Any]:
        """The interface's status dict, plus ``"tasks"`` (every submitted task);
        ``{"interface_status": "error"}`` when the interface fails to say."""
        self._flush()
        if self._driver is not None:
            status = self._driver.status()
        else:
            try:
                status = self._interface.get_status(self._holder[0])
            except Exception:
                status = {"interface_status": "error"}
        if not isinstance(status, dict):
            status = {"interface_status": "error"}
        status["tasks"] = list(self._submitted_tasks)
        return status

    # --- the end ------------------------------------------------------------------------
    def shutdown(self, wait: bool = True) -> None:
        """Release the workers: once the tasks in hand are done (``wait``), or
        now, cancelling them.  PyMW did this at exit, which still happens if
        this is not called."""
        master = self._holder[0]
        if master is not None:
            if wait:
                master.shutdown(wait=True)
            else:
                master.terminate()
        if self._driver is not None:
            self._driver.stop()
        self._finalizer()

    def __enter__(self) -> "PyMW_Master":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _cleanup(self, signum: Any = None, frame: Any = None) -> None:
        """PyMW's exit handler."""
        self.shutdown(wait=False)


def _future_done(task: PyMW_Task, future: Any) -> None:
    if future.cancelled():
        task._finish(TaskException(f"task {task} was cancelled"), None)
        return
    exc = future.exception()
    if exc is not None:
        _renote(exc, task)
        task._finish(exc, None)
        return
    result, out, err, started = future.result()
    now = time.time()
    # the worker's clock may differ from ours (MPI on other hosts): keep the order
    started = min(max(started, task._times["submit_time"]), now)
    task._finish(None, result, out, err, {"execute_time": started})


def _renote(exc: BaseException, task: PyMW_Task) -> None:
    """The master's note on a failed task names the compat wrapper's
    arguments: say it in the PyMW task's terms."""
    notes = getattr(exc, "__notes__", None)
    if not notes:
        return
    for i, note in enumerate(notes):
        if note.startswith("pymw: task "):
            _, on, where = note.rpartition(" on worker ")
            data = repr(task.input_data)
            data = data if len(data) <= 80 else data[:77] + "..."
            notes[i] = f"pymw: task {task} failed on input {data}" + (f" on worker {where}" if on else "")


def _close(holder: list, interface: Any, tasks: list, delete_files: bool, task_dir: str) -> None:
    """At exit or when the PyMW_Master is collected: stop the workers, let
    the interface clean up, remove any task files written."""
    master = holder[0]
    if master is not None:
        master.terminate()
    try:
        interface._cleanup()
    except Exception:
        pass
    for task in list(tasks):
        task.cleanup(delete_files)
        if delete_files and "exe" in task._files:
            _remove(task._files["exe"])
    if delete_files:
        try:
            os.rmdir(task_dir)
        except OSError:
            pass


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TaskException(f"data file {path!r} cannot be read: {exc.strerror or exc}") from None


class _PolicyAdapter:
    """A PyMW ``scheduler_func(task_list, worker_list)`` as the master's
    policy function: it sees PyMW tasks, and workers as the interface shows
    them (SimWorkers on the simulator, names elsewhere).  As in PyMW, a
    function that raises, or returns something that is not a
    ``(task, worker)`` pair (a bare None included), means "the first task to
    the first worker"; ``(None, None)`` means "nothing for now"; a task or
    worker that is not one of those given means the first."""

    def __init__(self, keys: dict[int, PyMW_Task], interface: Any, fn: Callable[[list, list], Any]):
        # not the PyMW_Master itself: the pymw-magic master holds its policy,
        # and must not keep the PyMW_Master (whose collection stops it) alive
        self._keys = keys
        self._view = getattr(interface, "worker_view", lambda w: w)
        self._fn = fn
        self.__name__ = getattr(fn, "__name__", "scheduler_func")

    def __call__(self, tasks: list, workers: list) -> Any:
        keys, view = self._keys, self._view
        ptasks = [keys.get(_task_key(t), t) for t in tasks]
        pworkers = [view(w) for w in workers]
        try:
            # PyMW unpacked (task, worker) and took the first of each when
            # that failed: a bare None, a 3-tuple, an exception
            ptask, pworker = _unpack_match(self._fn(ptasks, pworkers))
        except Exception:
            ptask, pworker = ptasks[0], pworkers[0]
        if ptask is None:
            return None
        index = next((i for i, t in enumerate(ptasks) if t is ptask), 0)
        slot = next((i for i, w in enumerate(pworkers) if w is pworker or w == pworker), 0)
        return tasks[index], workers[slot]


def _unpack_match(got: Any) -> tuple[Any, Any]:
    """A scheduler_func's answer as (task, worker), as PyMW unpacked it: any
    pair; a lone task (not a sequence) goes to the worker asking (None)."""
    if isinstance(got, PyMW_Task):
        return got, None
    task, worker = got   # TypeError/ValueError: the caller's fallback
    return task, worker


def _task_key(task: Any) -> Any:
    """The key the compat layer put in a task's arguments."""
    key = task.kwargs.get("key") if task.kwargs else None
    if key is None and len(task.args) >= 4:
        key = task.args[3]   # the simulator's sim_call(fn, args, workers_key, task_key)
    return key


class PyMW_MapReduce:
    """``PyMW_MapReduce(master).submit_task_mapreduce(exec_map, exec_reduce, num_worker=1,
    input_data=None, modules=(), dep_funcs=(), red_worker=-1, file_input=False)``:
    ``num_worker`` map tasks over slices of ``input_data``, then reduce tasks
    (one per map result, or ``red_worker`` of them over the concatenated map
    results); the returned task's result is the list of reduce results."""

    def __init__(self, master: PyMW_Master):
        self._master = master
        self._task_dir_name = "tasks"

    @staticmethod
    def _data_split(data: list, num: int) -> list[list]:
        q, r = divmod(len(data), num)
        out, p = [], 0
        for i in range(num):
            size = q + (1 if i < r else 0)
            out.append(data[p:p + size])
            p += size
        return out

    def submit_task_mapreduce(self, exec_map: Callable, exec_reduce: Callable, num_worker: int = 1,
                              input_data: Any = None, modules: tuple = (), dep_funcs: tuple = (),
                              red_worker: int = -1, file_input: bool = False) -> PyMW_Task:
        master = self._master
        name = f"{exec_map.__name__}_{exec_reduce.__name__}_MR"
        main = PyMW_Task(name, name, master._finished_tasks, file_loc=master._task_dir_name)
        with master._lock:
            master._submitted_tasks.append(main)
            master._submitted_ids.add(id(main))
            master._finished_tasks.expect(main)
        threading.Thread(target=self._run, daemon=True, name="pymw-mapreduce",
                         args=(main, exec_map, exec_reduce, num_worker, list(input_data or ()), modules,
                               dep_funcs, red_worker, file_input)).start()
        return main

    def _run(self, main: PyMW_Task, exec_map: Callable, exec_reduce: Callable, num_worker: int,
             data: list, modules: tuple, dep_funcs: tuple, red_worker: int, file_input: bool) -> None:
        master = self._master
        main._times["execute_time"] = time.time()
        try:
            maps = [master._submit(exec_map, (part,), modules, dep_funcs, input_from_file=file_input,
                                   internal=True)
                    for part in self._data_split(data, num_worker)]
            reduces, mapped = [], []
            while maps:
                done, result = master.get_result(maps)
                maps.remove(done)
                if red_worker == -1:
                    reduces.append(master._submit(exec_reduce, (result,), modules, dep_funcs,
                                                  input_from_file=file_input, internal=True))
                else:
                    mapped += result
            if red_worker != -1:
                reduces = [master._submit(exec_reduce, (part,), modules, dep_funcs, input_from_file=file_input,
                                          internal=True)
                           for part in self._data_split(mapped, red_worker)]
            results = []
            while reduces:
                done, result = master.get_result(reduces)
                reduces.remove(done)
                results.append(result)
        except Exception as exc:   # PyMW's thread died silently here; the main task fails instead
            main._finish(exc, None)
            return
        main._finish(None, results)
