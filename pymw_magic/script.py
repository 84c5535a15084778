"""The run-time side of a notebook exported as a script (see :mod:`pymw_magic.export`).

An exported script makes ``pymw = Runtime(globals(), ...)`` before any of
the notebook's code, then calls ``pymw.use(...)`` where the notebook had
``%pymw use`` and ``pymw.map``/``pymw.starmap``/``pymw.run`` where it had
``%%pymw`` cells.  This module owns what those calls mean in a plain
``python`` process:

* **the command line** — ``--backend B`` and the master's and backends'
  options override the notebook's choice for every master the script makes
  (parsed by :func:`pymw_magic.options.add_backend_arguments`, checked by
  :func:`~pymw_magic.options.validate` before anything starts); a value
  naming one of the notebook's objects (``--policy pick``, ``--duration
  model``) is looked up in the script's globals when the master is made,
  as the notebook looks it up in its namespace;
* **the masters** — a :class:`~pymw_magic.session.Session`, so a
  script keeps a kernel's rules (one default master, cells asking for
  another configuration get a cached one).  Under ``mpiexec -n N+1`` the one
  ``Master("mpi")`` is made here, before any notebook code: ranks 1..N
  become its workers and never run the script, rank 0 runs it as the master;
* **a cell's job** — a text progress bar (tqdm, on stderr) where the
  notebook shows its widget, what tasks printed shown in input order, the
  names the cell bound in the notebook bound the same way, the first
  failure raised with the task's input;
* the little a notebook has and a script lacks — a cell's shown value
  (``Out[N]``, printed as IPython's text form, and bound to ``_``, ``__``,
  ``___``, ``_N`` and ``Out`` as IPython's display hook binds it), shell
  commands as IPython runs them (``!cmd`` prints a failure and goes on,
  ``x = !cmd`` gets stdout and stderr lines; ``$name``/``{expr}``
  expanded), the other ``%pymw`` subcommands, and cells the notebook
  expects to raise (tagged ``raises-exception``);
* the end — jobs still running waited for, the widgets' ticker thread
  stopped and joined (a thread drawing a sweep's figure while the
  interpreter shuts down can abort it), the masters shut down.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import inspect
import linecache
import os
import subprocess
import sys
import traceback
import types
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

from .cellfunc import BoundCell, with_class_reads
from .job import Job
from .magics import SUBCOMMANDS
from .options import (
    DEFAULT_BACKEND, JOB_LEVEL, OptionError, add_backend_arguments, backend_arguments, backend_options,
    convert_now, master_options, validate,
)
from .policies import set_name_resolver
from .progress import TextProgress
from .session import (
    Session, check_map_items, describe_input, master_text, print_task_output, stop_widgets,
)

__all__ = ["Runtime", "subcommands"]

# What mpiexec launchers put in a rank's environment (the MPI backend's own
# check then asks MPI for the world's size).
_MPIEXEC_KEYS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "HYDRA_CONTROL_FD")


# How objects show themselves in a notebook only (HTML, images, widgets).
_RICH = ("_repr_html_", "_repr_png_", "_repr_svg_", "_repr_mimebundle_", "_ipython_display_")


def subcommands() -> dict[str, Any]:
    """Every ``%pymw`` subcommand, those of optional modules included (the
    extension registers them when loaded; a script has no extension)."""
    from .simulation import magic as _tune  # noqa: F401  (registers %pymw tune)
    return SUBCOMMANDS


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Runtime:
    """The masters and cells of one exported script.

    ``namespace`` is the script's ``globals()`` (what ``%pymw`` subcommands
    and shell commands read); ``default_backend`` the one the notebook's
    first ``%pymw use`` names (command-line options are checked against it
    when no ``--backend`` is given); ``backend`` and ``options`` are the
    overrides chosen at export time, which the command line overrides in
    turn.  ``argv`` defaults to ``sys.argv[1:]``.
    """

    def __init__(self, namespace: dict[str, Any], *, notebook: str = "",
                 default_backend: str = DEFAULT_BACKEND, argv: list[str] | None = None,
                 backend: str | None = None, **options: Any):
        self.namespace = namespace
        self.shell = SimpleNamespace(user_ns=namespace)  # what %pymw subcommands read
        self.session = Session(say=_stderr)
        self.notebook = notebook
        self.last_job: Job | None = None
        self._inputs: dict[int, tuple[str, ...]] = {}  # job id -> its --map target's names
        self._views: list[TextProgress] = []
        # IPython's output history, as a fresh kernel starts it.
        for under in ("_", "__", "___"):
            namespace.setdefault(under, "")
        self._unders = [namespace["_"], namespace["__"], namespace["___"]]
        self.out: dict[int, Any] = namespace.setdefault("Out", {})
        namespace.setdefault("_oh", self.out)
        atexit.register(stop_widgets)  # also when the script fails before close()
        cli_backend, cli_options = self._parse(sys.argv[1:] if argv is None else argv,
                                               backend or default_backend)
        self.backend = cli_backend or backend
        self.options = {**options, **cli_options}
        # Options naming the notebook's objects resolve in the script's globals
        # (defined by the time a master is made), as in the notebook's namespace.
        set_name_resolver(namespace)
        self._world = self._join_mpi_world()

    # -- the command line --
    def _parse(self, argv: list[str], backend: str) -> tuple[str | None, dict[str, Any]]:
        script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "script.py"
        source = f" (exported from {self.notebook})" if self.notebook else ""
        parser = argparse.ArgumentParser(
            prog=f"python {script}", allow_abbrev=False,
            description=f"A notebook as a batch script{source}. Without options it runs on the "
                        f"backend the notebook chose ({backend!r}); the options below override "
                        "it for every master the script makes.",
            epilog=f"Under MPI: mpiexec -n N+1 python {script} --backend mpi (rank 0 runs the "
                   "script as the master, ranks 1..N are its workers).")
        add_backend_arguments(parser)
        chosen, raw = backend_arguments(parser.parse_args(argv))
        try:
            converted, _ = validate(raw, backend=chosen or backend, cell=False, defer_names=True)
        except OptionError as exc:
            parser.error(str(exc).replace(" for %pymw use", ""))
        return chosen, converted

    # -- masters --
    def _join_mpi_world(self) -> Any | None:
        """Under ``mpiexec`` with several ranks: the MPI master, made now so
        that ranks 1..N serve as workers (and leave) before any notebook code."""
        if not any(key in os.environ for key in _MPIEXEC_KEYS):
            return None
        from .backends.mpi import under_mpiexec
        if not under_mpiexec():
            return None  # a single rank: an ordinary run
        if self.backend not in (None, "mpi"):
            raise SystemExit(f"pymw: this script runs under mpiexec, where rank 0 is the master and "
                             f"the other ranks its workers: give --backend mpi (not "
                             f"{self.backend!r}), or run it without mpiexec")
        self.backend = "mpi"
        backend, options = self._effective("mpi", {})
        master = self.session.use(backend, options)  # ranks >= 1 never return from this
        self._publish(master)
        _stderr(f"pymw: under mpiexec: rank 0 is the master, {master.workers} worker rank(s); "
                "every master of the script is this one")
        return master

    def _effective(self, backend: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The command line over the notebook: its backend replaces the
        notebook's, the notebook's options are kept where that backend takes
        them, and the command line's options win."""
        chosen = self.backend or backend
        declared = set(master_options()) | set(backend_options(chosen))
        dropped = sorted(set(options) - declared)
        if dropped:
            _stderr(f"pymw: the notebook's {', '.join('--' + d.replace('_', '-') for d in dropped)} "
                    f"do(es) not apply to the {chosen!r} backend: ignored")
        kept = {k: v for k, v in options.items() if k in declared}
        kept.update({k: v for k, v in self.options.items() if k in declared})
        try:
            return chosen, convert_now(chosen, kept)
        except OptionError as exc:
            raise SystemExit(f"pymw: {exc}") from None

    def _publish(self, master: Any) -> None:
        """Make ``master`` the one the widget helpers (``pymw_magic.sweep``,
        ``dashboard``) use outside a kernel, as a kernel's default is."""
        try:
            from .widgets import dashboard
        except ImportError:  # pragma: no cover - ipywidgets is a dependency
            return
        dashboard.set_fallback_master(master)

    def use(self, backend: str, **options: Any) -> Any:
        """``%pymw use BACKEND --options``: make the script's default master
        (the command line's backend and options win)."""
        if self._world is not None:
            return self._world
        backend, options = self._effective(backend, options)
        master = self.session.use(backend, options)
        self._publish(master)
        _stderr(f"pymw: default is now {master_text(master)}")
        return master

    def _master_for(self, backend: str | None, options: dict[str, Any]) -> Any:
        if self._world is not None:
            return self._world
        if self.session.default is None and backend in (None, DEFAULT_BACKEND) and not options:
            return self.use(DEFAULT_BACKEND)  # a cell before any %pymw use, as in a kernel
        backend, options = self._effective(backend or self.session.default_backend(), options)
        return self.session.master_for(backend, options)

    # -- %%pymw cells --
    def map(self, fn: Callable, iterable: Iterable[Any], **cell: Any) -> Any:
        """``%%pymw --map x in EXPR``: one task per item."""
        return self._cell(fn, [(item,) for item in iterable], True, **cell)

    def starmap(self, fn: Callable, arguments: Iterable[Iterable[Any]], **cell: Any) -> Any:
        """``%%pymw --map a, b in EXPR``: one task per argument tuple."""
        return self._cell(fn, [tuple(args) for args in arguments], True, **cell)

    def run(self, fn: Callable, **cell: Any) -> Any:
        """A ``%%pymw`` cell without ``--map``: the cell runs once, remotely."""
        return self._cell(fn, [()], False, **cell)

    def _cell(self, fn: Callable, arguments: list[tuple], mapped: bool, *, name: str | None = None,
              chunksize: int | None = None, nowait: bool = False, show: int | bool = False,
              return_exceptions: bool = False, backend: str | None = None, **options: Any) -> Any:
        """Run a cell's job as the magic does: the results (a list with
        ``--map``, else the one value), or the Job at once with ``nowait``.
        ``show=N``: print the value as the notebook's ``Out[N]`` (a cell
        without ``--out``; see :meth:`show`).  ``return_exceptions``: leave
        failures in place for :meth:`check` to raise."""
        job_kw = {key: options.pop(key) for key in JOB_LEVEL if key in options}
        if mapped:
            params = _parameters(fn)
            check_map_items(", ".join(params), params, arguments)
        master = self._master_for(backend, options)
        job = master.starmap_async(_traceable(fn), arguments, name=name or getattr(fn, "__name__", None),
                                   chunksize=chunksize, **job_kw)
        self.last_job = job
        self._inputs[job.id] = _parameters(fn)
        if nowait:
            _stderr(f"pymw: job {job.name!r} started ({len(arguments)} task(s) on "
                    f"{master.backend_name!r})")
            return job
        with TextProgress(job):
            job.wait()  # an interrupt cancels the job (and propagates)
        results = job.result(return_exceptions=True)
        print_task_output(job, self._inputs[job.id])
        value = results if mapped else results[0]
        if not return_exceptions:
            self.check(job)
        if show is not False and (not mapped or any(v is not None for v in value)):
            self.show(value, None if show is True else show)
        return value

    def check(self, job: Job | None = None) -> None:
        """Raise the first failure of ``job`` (default: the last one) as the
        notebook's cell does: the task's own exception, its remote traceback
        as the cause, a note naming its input."""
        job = job or self.last_job
        if job is None:
            return
        failed = [t for t in job.tasks if t.state == "failed"]
        cancelled = [t for t in job.tasks if t.state == "cancelled"]
        if not (failed or cancelled):
            return
        first = (failed or cancelled)[0]
        error = job.result(return_exceptions=True)[first.index]
        if not isinstance(error, BaseException):  # pragma: no cover - a failed task holds its error
            error = RuntimeError(f"task {first.index} of job {job.name!r} did not finish")
        total = len(job.tasks)
        if failed:
            names = self._inputs.get(job.id, ())
            what = f"on input {describe_input(names, first.args)}" if first.args else f"(job {job.name!r})"
            note = f"pymw: task {first.index} failed {what}; {len(failed)} of {total} task(s) failed"
        else:
            note = f"pymw: job {job.name!r} was cancelled: {len(cancelled)} of {total} task(s) cancelled"
        if hasattr(error, "add_note"):
            error.add_note(note)
        else:  # Python 3.10: no notes
            _stderr(note)
        raise error

    # -- the rest of a notebook --
    def show(self, value: Any, count: int | None = None) -> None:
        """A cell's last value, as the notebook shows it (``Out[N]``, N =
        ``count``): its text form on stdout, and bound as IPython's display
        hook binds it (``_``, ``__``, ``___``, ``_N``, ``Out[N]``).  A
        running Job gets a text progress bar; a widget, or an object with
        only a rich (HTML, image) form, gets a note on stderr."""
        if value is None:
            return
        if count is not None:
            self._remember(value, count)
        if isinstance(value, Job) and not value.done():
            self._views.append(TextProgress(value))  # closes itself when the job ends
            return
        widgets = sys.modules.get("ipywidgets")
        if ((widgets is not None and isinstance(value, widgets.Widget))
                or (type(value).__repr__ is object.__repr__ and any(hasattr(value, rich) for rich in _RICH))):
            _stderr(f"pymw: a {type(value).__name__} is shown in a notebook only")
            return
        from IPython.lib.pretty import pretty
        print(pretty(value, max_width=79), flush=True)

    def _remember(self, value: Any, count: int) -> None:
        """IPython's output history: ``_N`` and ``Out[N]``; ``_``, ``__``,
        ``___`` shift, unless the script assigned one of them itself."""
        ns = self.namespace
        if value is self.out:  # IPython does not keep Out in itself
            return
        mine = all(ns.get(u) is v for u, v in zip(("_", "__", "___"), self._unders))
        self._unders = [value] + self._unders[:2]
        if mine:
            ns["_"], ns["__"], ns["___"] = self._unders
        ns[f"_{count}"] = value
        self.out[count] = value

    @contextlib.contextmanager
    def keep_going(self) -> Iterator[None]:
        """A cell the notebook expects to raise (tagged ``raises-exception``):
        the error is printed and the script goes on, as the notebook did."""
        try:
            yield
        except Exception:
            traceback.print_exc()
            _stderr("pymw: the notebook expects this cell to raise (tag raises-exception); going on")

    def expand(self, command: str) -> str:
        """``$name`` and ``{expr}`` in a shell command, expanded as IPython
        does for ``!cmd``: from the caller's names; left as written when
        something does not resolve (``${HOME}``, ``awk '{print $1}'``)."""
        from IPython.utils.text import DollarFormatter

        names = dict(self.namespace)
        names.update(sys._getframe(1).f_locals)
        try:
            return DollarFormatter().vformat(command, args=[], kwargs=names)
        except Exception:
            return command

    def system(self, command: str) -> None:
        """``!cmd``: run it in the shell, its output shown, as IPython does:
        a failing command prints its own error and the script goes on; its
        exit status is ``_exit_code``."""
        sys.stdout.flush()  # what the script printed comes first, as in the notebook
        sys.stderr.flush()
        self.namespace["_exit_code"] = subprocess.run(command, shell=True).returncode

    def getoutput(self, command: str) -> list[str]:
        """``x = !cmd``: the lines the command wrote, stdout and stderr
        together, as IPython's ``getoutput`` (a failure does not raise)."""
        sys.stdout.flush()
        done = subprocess.run(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace")
        return done.stdout.splitlines()

    def magic(self, line: str) -> Any:
        """``%pymw LINE`` for a subcommand without a more direct form
        (``status``, ``jobs``, ``cancel``, ``tune``): the magic's own
        handler, on this script's masters and names."""
        name, _, rest = line.strip().partition(" ")
        subs = subcommands()
        if name not in subs:
            raise ValueError(f"unknown %pymw subcommand {name!r}; valid: {', '.join(subs)}")
        return subs[name].handler(self, rest.strip())

    def sweep(self, fn: Callable, over: Iterable[Any], **kwargs: Any) -> Any:
        """``%pymw sweep FN, over=EXPR, ...``: :func:`pymw_magic.sweep` on the
        script's default master."""
        from .widgets.sweep import sweep
        kwargs.setdefault("master", self._master_for(None, {}))
        return sweep(fn, over, **kwargs)

    def close(self) -> None:
        """The end of the script: wait for the jobs still running (started
        with ``--nowait`` or by a widget), stop the widgets (the ticker's
        thread joined, sweeps closed), then shut every master down."""
        running = [job for _, job in self.session.all_jobs() if not job.done()]
        if running:
            _stderr(f"pymw: waiting for {len(running)} job(s) still running: "
                    + ", ".join(repr(job.name) for job in running))
        for job in running:
            job.wait()
        for view in self._views:
            view.close()
        stop_widgets()
        _close_sweeps()
        try:
            self.session.shutdown_all()
        finally:
            from .widgets import dashboard
            fallback = dashboard.fallback_master()
            if fallback is not None and fallback.closed:
                dashboard.set_fallback_master(None)


def _close_sweeps() -> None:
    """Close the live sweeps the script made (``pymw.sweep`` or
    ``pymw_magic.sweep``; each is a view of the widgets' ticker): they stop
    following their jobs."""
    jobview = sys.modules.get("pymw_magic.widgets.jobview")
    sweep_module = sys.modules.get("pymw_magic.widgets.sweep")
    if jobview is None or sweep_module is None:  # no widget was made
        return
    for view in jobview.TICKER.views():
        if isinstance(view, sweep_module.Sweep):
            view.close()


def _traceable(fn: Any) -> Any:
    """The script's function as it travels to the workers: with its file's
    name and text (:class:`~pymw_magic.cellfunc.BoundCell`, as the magic
    sends a cell), so a remote traceback shows the script's own lines where
    cloudpickle would say ``<dynamic-code>``; names only its class bodies
    read travel with it, as with the magic's cells."""
    if not isinstance(fn, types.FunctionType) or fn.__module__ != "__main__":
        return fn
    fn = with_class_reads(fn)
    filename = fn.__code__.co_filename
    lines = linecache.getlines(filename)
    return BoundCell(fn, filename, "".join(lines)) if lines else fn


def _parameters(fn: Any) -> tuple[str, ...]:
    """The positional parameter names of a cell's function: its ``--map`` target."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
