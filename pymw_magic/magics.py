"""The IPython magics: ``%pymw`` (line) and ``%%pymw`` (cell).

This module owns the IPython side of the notebook surface:

* the two magics and the ``%pymw`` subcommands, kept in a registry
  (:func:`subcommand`) so other modules add theirs (``export``, ``tune``)
  without touching this file;
* running a cell as a job: the cell body becomes a task function through
  :mod:`pymw_magic.cellfunc`, tasks' output is printed in input order, and
  a failing task is raised with its input and remote traceback while the
  finished results stay bound in the notebook;
* how errors show in IPython: a bad option as a UsageError (the grammar
  and its validation are :mod:`pymw_magic.options`'), a task's error from
  the cell's own line on, without this module's frames or the line IPython
  rewrote the cell into.

The kernel's masters are a :class:`~pymw_magic.session.Session`.  The
``%%pymw`` line is Python (``--map x in range(n)``, ``--name job``): it is
taken as written, never expanded like a shell line (``$name``, ``{expr}``),
so the exported script reads it the same way.  See docs/architecture.md.

Its layer: front ends (the layers are drawn in ``pymw_magic/__init__.py``
and docs/architecture.md).

``load_ipython_extension``/``unload_ipython_extension`` live here.
"""

from __future__ import annotations

import asyncio
import atexit
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand

from . import cellfunc
from . import options as _options
from . import session as _sessions
from .awaiting import CellAwaiter
from .cellfunc import MapSpec
from .errors import PayloadError
from .simulation.models import ModelError
from .options import (  # noqa: F401 - DEFAULT_BACKEND and check_backend stay importable from here
    DEFAULT_BACKEND, JOB_LEVEL, OptionError, ParsedLine, backend_names, backend_options, cell_options,
    check_backend, flag, master_options,
)
from .session import (
    Session, check_map_items, counts_text, describe_input, job_state, master_text, print_task_output,
    stop_widgets,
)

__all__ = [
    "PymwMagics", "Session", "Subcommand", "SUBCOMMANDS", "subcommand",
    "load_ipython_extension", "unload_ipython_extension", "parse_options",
]


# The grammar and the validation are options.py's; these keep their names
# here (users imported them from the magics) and raise IPython's UsageError.

def parse_options(line: str) -> ParsedLine:
    """Split a magic line (see :func:`pymw_magic.options.parse_options`)."""
    try:
        return _options.parse_options(line)
    except OptionError as exc:
        raise UsageError(str(exc)) from None


def validate(options: Mapping[str, str | bool], *, backend: str,
             cell: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check and convert options (see :func:`pymw_magic.options.validate`)."""
    try:
        return _options.validate(options, backend=backend, cell=cell)
    except OptionError as exc:
        raise UsageError(str(exc)) from None


def parse_use(args: str) -> tuple[str, dict[str, Any], ParsedLine]:
    """``%pymw use``'s arguments (see :func:`pymw_magic.options.parse_use`)."""
    try:
        return _options.parse_use(args)
    except OptionError as exc:
        raise UsageError(str(exc)) from None


# --- subcommands ----------------------------------------------------------------------

@dataclass(frozen=True)
class Subcommand:
    """One ``%pymw NAME ...`` subcommand: ``handler(magics, args)`` gets the
    :class:`PymwMagics` instance and the rest of the line."""

    name: str
    handler: Callable[["PymwMagics", str], Any]
    usage: str
    summary: str


#: ``%pymw`` subcommands by name; add one with :func:`subcommand`.
SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, usage: str, summary: str) -> Callable:
    """Register a ``%pymw`` subcommand (a decorator)::

        @subcommand("dashboard", "%pymw dashboard", "show the live dashboard")
        def _dashboard(magics, args): ...
    """
    def register(handler: Callable[["PymwMagics", str], Any]) -> Callable:
        SUBCOMMANDS[name] = Subcommand(name, handler, usage, summary)
        return handler
    return register



@subcommand("use", "%pymw use BACKEND [--workers N] [--policy P] [--retries K] "
            "[--timeout S] [backend options]",
            "set the kernel's default backend (the old default master shuts down once its "
            "running jobs end)")
def _use(magics: "PymwMagics", args: str) -> None:
    backend, options, _ = parse_use(args)
    try:
        master = magics.session.use(backend, options)
    except ModelError as exc:  # a model the options' form admitted (a trace's contents): the user's
        raise UsageError(f"%pymw use: {exc}") from None
    print(f"pymw: default is now {master_text(master)}")


@subcommand("status", "%pymw status", "the masters, their workers and the jobs with their counts")
def _status(magics: "PymwMagics", args: str) -> None:
    if args.strip():
        raise UsageError("usage: %pymw status")
    session = magics.session
    retiring = list(session.retiring)
    if not session.masters and not retiring:
        print("pymw: no master yet (%pymw use BACKEND, or run a %%pymw cell)")
        return
    # A replaced default still running its jobs is listed too: its jobs are
    # the kernel's, and it holds workers until they end.
    shown = [(m, "default" if m is session.default else "cached") for m in session.masters]
    shown += [(m, "retiring (shuts down when its jobs end)") for m in retiring]
    for master, mark in shown:
        print(f"pymw {mark}: {master_text(master)}")
        jobs = list(master.jobs)
        if not jobs:
            print("  no jobs")
        for job in jobs:
            print(f"  job {job.id} {job.name!r} ({job_state(job)}): {counts_text(job.counts())}")


_JOBS_USAGE = "usage: %pymw jobs [--all] | %pymw jobs --remove NAME [--cancel]"


@subcommand("jobs", "%pymw jobs [--all] [--remove NAME [--cancel]]",
            "this kernel's jobs; --all: every job in the job store (every kernel and script, newest "
            "first); --remove: forget a stored job (--cancel: cancel it first if it runs)")
def _jobs(magics: "PymwMagics", args: str) -> None:
    parsed = parse_options(args)
    unknown = set(parsed.options) - {"all", "remove", "cancel"}
    if parsed.positional or unknown:
        raise UsageError(_JOBS_USAGE)
    if "remove" in parsed.options:
        name = parsed.options["remove"]
        if name is True or "all" in parsed.options or parsed.options.get("cancel", True) is not True:
            raise UsageError(_JOBS_USAGE)
        _remove_stored(name, cancel="cancel" in parsed.options)
        return
    if "cancel" in parsed.options or parsed.options.get("all", True) is not True:
        raise UsageError(_JOBS_USAGE)
    if "all" in parsed.options:
        from . import store
        try:
            listed = store.jobs()
        except store.StoreError as exc:
            raise UsageError(f"%pymw jobs --all: {exc}") from None
        print(listed.table() if listed else f"pymw: no jobs in the job store {store.open_store().path}")
        return
    rows = magics.session.all_jobs()
    if not rows:
        print("pymw: no jobs")
        return
    print(f"{'id':>4}  {'name':<16} {'backend':<10} {'state':<10} counts")
    for master, job in rows:
        print(f"{job.id:>4}  {_one_line(job.name):<16} {master.backend_name:<10} {job_state(job):<10} "
              f"{counts_text(job.counts())}")


def _one_line(text: str) -> str:
    """``text`` as one printable cell: a control character in a job's name
    (a newline, a terminal escape, a bidi override) could otherwise forge
    rows or repaint the output, as in ``%pymw jobs --all``'s table."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _remove_stored(name: str, cancel: bool) -> None:
    from .errors import PymwError
    from .session import remove_stored
    try:
        rec = remove_stored(name, cancel=cancel)
    except PymwError as exc:  # unknown, still running, no reattach: the message says what to do
        raise UsageError(f"%pymw jobs --remove: {exc}") from None
    print(f"pymw: removed job {rec.name!r} ({rec.uid[:8]}, {rec.backend}) from the job store")


@subcommand("attach", "%pymw attach NAME [--option value ...]",
            "follow a stored batch job again in this kernel (options override the stored ones); "
            "the Job is _pymw_job")
def _attach(magics: "PymwMagics", args: str) -> Any:
    from . import store
    from .errors import PymwError
    from .session import attach_stored
    parsed = parse_options(args)
    if len(parsed.positional) != 1:
        raise UsageError("usage: %pymw attach NAME [--option value ...] (%pymw jobs --all lists the stored jobs)")
    name = parsed.positional[0]
    try:
        rec = store.job(name)
    except store.StoreError as exc:
        raise UsageError(f"%pymw attach: {exc}") from None
    try:
        check_backend(rec.backend)
    except ValueError as exc:
        raise UsageError(f"%pymw attach: job {rec.name!r} ran on the {rec.backend!r} backend: {exc}") from None
    options, _ = validate(parsed.options, backend=rec.backend, cell=False)
    try:
        job = attach_stored(rec.uid, **options)
    except PymwError as exc:
        raise UsageError(f"%pymw attach: {exc}") from None
    magics.shell.user_ns[_JOB_VAR] = job
    magics.session.attached = job.master
    print(f"pymw: attached job {rec.name!r} ({rec.uid[:8]}, {rec.backend}); the Job is {_JOB_VAR}")
    return job


@subcommand("cancel", "%pymw cancel [JOB]",
            "cancel a job by name or id (no JOB: every active job)")
def _cancel(magics: "PymwMagics", args: str) -> None:
    words = args.split()
    if len(words) > 1:
        raise UsageError("usage: %pymw cancel [JOB]")
    rows = magics.session.all_jobs()
    if words:
        wanted = words[0]
        chosen = [job for _, job in rows if job.name == wanted or str(job.id) == wanted]
        if not chosen:
            known = ", ".join(f"{job.id} ({job.name})" for _, job in rows) or "none"
            raise UsageError(f"no job {wanted!r}; jobs: {known}")
    else:
        chosen = [job for _, job in rows if not job.done()]
    if not chosen:
        print("pymw: no active job to cancel")
        return
    for job in chosen:
        n = job.cancel()
        print(f"pymw: cancelled job {job.id} {job.name!r} ({n} task(s) cancelled)")


# The widget subcommands: their modules (and ipywidgets) are imported when used.
@subcommand("dashboard", "%pymw dashboard",
            "the live dashboard: backend form, jobs, task table and per-worker timeline")
def _dashboard(magics: "PymwMagics", args: str) -> Any:
    if args.strip():
        raise UsageError("usage: %pymw dashboard")
    from .widgets.dashboard import Dashboard
    return Dashboard()


@subcommand("sweep", "%pymw sweep FN, over=EXPR, NAME=(LO, HI[, STEP]), ...",
            "a live sweep: each change of a control runs FN(item, **params) over EXPR as a job")
def _sweep(magics: "PymwMagics", args: str) -> Any:
    from .widgets.sweep import sweep_magic
    try:
        return sweep_magic(magics.shell.user_ns, args)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


@subcommand("help", "%pymw help", "this help")
def _help(magics: "PymwMagics", args: str) -> None:
    print(usage_text())


def usage_text() -> str:
    lines = ["%pymw subcommands:"]
    for sub in SUBCOMMANDS.values():
        lines.append(f"  {sub.usage}")
        lines.append(f"      {sub.summary}")
    lines.append("")
    lines.append("%%pymw [--backend B] [--workers N] [--map TARGET in EXPR] [--out VAR] "
                 "[--name JOB] [--nowait] [--retries K] [--timeout S] [--chunksize C] "
                 "[backend options]")
    lines.append("  runs the cell body as tasks; names it reads are captured by value, "
                 "its last expression is each task's result")
    for opt in [*cell_options().values(), *master_options().values()]:
        lines.append(f"  {flag(opt.name):<12} {opt.help}")
    lines.append("")
    lines.append("backends and their options:")
    for name in backend_names():
        opts = backend_options(name)
        lines.append(f"  {name}")
        for opt in opts.values():
            listed = opt.choices or opt.suggestions
            extra = f" [{'|'.join(map(str, listed))}]" if listed else ""
            lines.append(f"    {flag(opt.name):<16} {opt.help}{extra} (default {opt.default!r})")
    return "\n".join(lines)


# --- the magics -------------------------------------------------------------------------

_JOB_VAR = "_pymw_job"


class _TracebackFromCell:
    """An exception's ``_render_traceback_`` (IPython's hook): its traceback
    from the cell's own frame on.  What comes before is machinery — the line
    IPython rewrote the cell into (``await ...run_cell(...)`` or
    ``get_ipython().run_cell_magic(...)``) and this module's frames.

    Shown once: raised again later (``raise results[3]``), the exception
    shows its whole traceback.  Pickled (an exception kept in ``--out`` and
    sent on), it travels without the exception it refers to (exceptions
    take no weak references: the cycle lasts until it is shown, or collected).
    """

    __slots__ = ("filename", "error")

    def __init__(self, filename: str, error: BaseException | None = None):
        self.filename = filename
        self.error = error

    def __reduce__(self) -> tuple:
        return (_TracebackFromCell, (self.filename,))

    def __call__(self) -> list[str]:
        error, self.error = self.error, None
        if error is None:  # IPython sets sys.last_value before it asks
            error = getattr(sys, "last_value", None)
        if error is None:
            return []
        if error.__dict__.get("_render_traceback_") is self:
            del error._render_traceback_
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != self.filename:
            tb = tb.tb_next
        from IPython import get_ipython
        shell = get_ipython()
        if shell is None:
            return traceback.format_exception(type(error), error, tb or error.__traceback__)
        if tb is None:  # no frame of the cell: as IPython would show it
            return shell.InteractiveTB.structured_traceback(type(error), error, error.__traceback__)
        return shell.InteractiveTB.structured_traceback(type(error), error, tb, tb_offset=0)


def _raise_at(error: BaseException, filename: str, lineno: int) -> None:
    """Raise ``error`` from a frame at line ``lineno`` of the cell, so the
    notebook's traceback ends in the cell (whose text linecache holds)
    rather than in this module, and (in IPython) starts there too.  Line 0:
    a plain raise."""
    __tracebackhide__ = True  # noqa: F841
    try:
        error._render_traceback_ = _TracebackFromCell(filename, error)  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - an exception type without a __dict__
        pass
    if lineno < 1:
        raise error
    code = compile("\n" * (lineno - 1) + "raise __pymw_error__\n", filename, "exec")
    exec(code, {"__pymw_error__": error})  # noqa: S102 - raises, by design


def _bare(error: BaseException) -> BaseException:
    """``error`` without its traceback and chained causes: for the errors
    raised before any task starts, what is wrong is in the message."""
    error.__cause__ = None
    error.__suppress_context__ = True
    return error.with_traceback(None)


def _raise_in_cell(error: BaseException, remote_tb: str | None, filename: str) -> None:
    """Raise a task's exception at the cell line it failed on, as the
    last frame of the cell in its remote traceback says; at the ``%%pymw``
    line when no line of the cell is to blame (a timeout, a lost worker)."""
    __tracebackhide__ = True  # noqa: F841
    lines = re.findall(r'File "' + re.escape(filename) + r'", line (\d+)', remote_tb or "")
    _raise_at(error, filename, int(lines[-1]) if lines else 1)


def _show_progress(job: Any) -> Callable[[], None]:
    """The live progress of a blocking cell: the inline job widget
    in a Jupyter kernel, the text bar elsewhere; returns its ``settle``."""
    from .widgets.jobview import show_progress  # ipywidgets only when a cell runs
    return show_progress(job)


@magics_class
class PymwMagics(Magics):
    """``%pymw`` and ``%%pymw``; the kernel's masters live in ``session``."""

    def __init__(self, shell: Any = None, session: Session | None = None):
        super().__init__(shell)
        self.session = session or Session()
        self._filenames: set[str] = set()
        self._current_filename = ""
        self.awaiter: CellAwaiter | None = None  # installed by load_ipython_extension

    @line_magic
    def pymw(self, line: str) -> Any:
        """%pymw SUBCOMMAND ...  — see %pymw help."""
        __tracebackhide__ = True  # noqa: F841 - IPython hides this frame
        name, _, rest = line.strip().partition(" ")
        if not name:
            print(usage_text())
            return None
        sub = SUBCOMMANDS.get(name)
        if sub is None:
            raise UsageError(f"unknown subcommand {name!r}; valid: {', '.join(SUBCOMMANDS)}")
        try:
            return sub.handler(self, rest.strip())
        except OptionError as exc:  # a subcommand's bad option or value: a usage error
            raise UsageError(str(exc)) from None

    # The cell magic has the same name as the line magic; IPython keeps them apart.
    # Its line is Python (--map x in {1, 2}): never expanded as $name/{expr}.
    @cell_magic("pymw")
    @no_var_expand
    def pymw_cell(self, line: str, cell: str) -> Any:
        """%%pymw [options] — run the cell body as tasks; see %pymw help."""
        __tracebackhide__ = True  # noqa: F841
        return self.run_cell(line, cell)

    # -- running a cell --
    def cell_filename(self, count: int | None = None, *, reserve: bool = True) -> tuple[str, str]:
        """``<pymw-cell-N>`` after the cell's ``In[N]`` (suffixed when N
        repeats, as when cells run without history), and the default job
        name ``cell-N``; ``reserve=False`` only peeks (for a cell not run yet,
        whose ``count`` is given)."""
        if count is None:
            # The displayhook's count is the cell's In[N]/Out[N] number in every
            # IPython (9 increments execution_count before the cell runs, 8 after).
            hook = getattr(self.shell, "displayhook", None)
            count = getattr(hook, "prompt_count", None)
            if not isinstance(count, int):
                count = getattr(self.shell, "execution_count", 0) or 0
        filename, k = f"<pymw-cell-{count}>", 1
        while filename in self._filenames:
            k += 1
            filename = f"<pymw-cell-{count}.{k}>"
        if reserve:
            self._filenames.add(filename)
        return filename, filename[1:-1].replace("pymw-", "")

    def run_cell(self, line: str, cell: str) -> Any:
        """Run the cell as a job and wait for it, blocking this thread."""
        __tracebackhide__ = True  # noqa: F841
        started = self._start(line, cell)
        if started is None:
            return None
        job, spec, out_var = started
        settle = _show_progress(job)
        try:
            job.wait()
        except KeyboardInterrupt:
            self._interrupted(job, spec, out_var, settle)  # wait() has cancelled the job
            raise
        settle()  # the final state is shown before the cell's output
        return self._conclude(job, spec, out_var)

    async def run_cell_async(self, line: str, cell: str) -> Any:
        """Run the cell as a job and await it: the kernel's event loop keeps
        running, so widget messages (the Cancel button) are handled while
        the cell waits.  The kernel's stop button cancels the awaiting cell;
        that cancels the job and is reported as a KeyboardInterrupt."""
        __tracebackhide__ = True  # noqa: F841
        started = self._start(line, cell)
        if started is None:
            return None
        job, spec, out_var = started
        settle = _show_progress(job)
        try:
            await job.wait_async()
        except (asyncio.CancelledError, KeyboardInterrupt):
            self._interrupted(job, spec, out_var, settle)  # the job is cancelled
            raise KeyboardInterrupt from None
        settle()
        return self._conclude(job, spec, out_var)

    def _start(self, line: str, cell: str) -> tuple[Any, MapSpec | None, str | None] | None:
        """Validate, compile, capture and submit: the job, the map spec and
        the output variable; None for a ``--nowait`` cell (already bound)."""
        __tracebackhide__ = True  # noqa: F841
        ns = self.shell.user_ns
        # Validation first: nothing is built, evaluated or sent before it passes.
        try:
            _, backend_asked, master_kw, cell_kw = _options.parse_cell_line(
                line, default_backend=self.session.default_backend())
        except OptionError as exc:
            raise UsageError(str(exc)) from None
        job_kw = {key: master_kw.pop(key) for key in JOB_LEVEL if key in master_kw}
        spec: MapSpec | None = None
        if "map" in cell_kw:
            try:
                spec = cellfunc.parse_map(cell_kw["map"])
            except ValueError as exc:
                raise UsageError(str(exc)) from None

        filename, default_name = self.cell_filename()
        self._current_filename = filename
        params = spec.names if spec is not None else ()
        prefix = f"%%pymw {line}".rstrip() + "\n"
        # Errors before any task starts are raised without this module's
        # frames and chained causes: what is wrong is in the message.
        try:
            compiled = cellfunc.compile_cell(cell, params=params, filename=filename, prefix=prefix)
        except SyntaxError as exc:
            raise exc.with_traceback(None) from None
        # The other errors before any task starts are raised "at" the cell's
        # line to blame: the %%pymw line (1) for --map, where a name is first read.
        try:
            arguments = spec.arguments(ns) if spec is not None else [()]
            if spec is not None:
                check_map_items(spec.target, spec.names, arguments)
        except (cellfunc.MapError, PayloadError) as exc:
            _raise_at(_bare(exc), filename, 1)
        try:
            fn = compiled.bind(ns)  # capture by value, now
        except NameError as exc:
            _raise_at(_bare(exc), filename, compiled.read_lines.get(exc.name or "", 0))

        try:
            master = self.session.master_for(backend_asked, master_kw)
        except OptionError as exc:
            raise UsageError(str(exc)) from None
        try:
            job = master.starmap_async(fn, arguments, name=cell_kw.get("name") or default_name,
                                       chunksize=cell_kw.get("chunksize"), **job_kw)
        except PayloadError as exc:
            named = re.match(r"'(\w+)' ", str(exc))  # "'conn' (sqlite3.Connection) cannot be sent"
            _raise_at(_bare(exc), filename, compiled.read_lines.get(named.group(1), 1) if named else 1)
        out_var = cell_kw.get("out")
        ns[_JOB_VAR] = job
        if cell_kw.get("nowait"):
            if out_var:
                ns[out_var] = job
            where = out_var or _JOB_VAR
            print(f"pymw: job {job.name!r} started ({len(arguments)} task(s) on "
                  f"{master.backend_name!r}); the Job is {where}")
            return None
        return job, spec, out_var

    def _interrupted(self, job: Any, spec: MapSpec | None, out_var: str | None,
                     settle: Callable[[], None]) -> None:
        """After an interrupt cancelled the job: keep what finished."""
        job.wait(timeout=10)
        settle()
        results = job.result(timeout=0, return_exceptions=True) if job.done() else []
        self._show_output(job, spec.names if spec is not None else ())
        if out_var and job.done():
            self.shell.user_ns[out_var] = results if spec is not None else (results[0] if results else None)
        finished = job.counts().get("done", 0)
        print(f"pymw: interrupted; job {job.name!r} cancelled, {finished} task(s) had "
              f"finished" + (f" (their results are in {out_var})" if out_var else ""),
              file=sys.stderr)

    def _conclude(self, job: Any, spec: MapSpec | None, out_var: str | None) -> Any:
        """The ended job's outcome: output shown, results bound, the first
        failure (or the cancellation) raised in the cell."""
        __tracebackhide__ = True  # noqa: F841
        ns = self.shell.user_ns
        names = spec.names if spec is not None else ()
        results = job.result(return_exceptions=True)
        self._show_output(job, names)
        value: Any = results if spec is not None else results[0]
        if out_var:
            ns[out_var] = value
        failed = [t for t in job.tasks if t.state == "failed"]
        cancelled = [t for t in job.tasks if t.state == "cancelled"]
        if failed or cancelled:
            first = (failed or cancelled)[0]
            error = results[first.index]
            counts = f"{len(failed)} of {len(results)} task(s) failed"
            if cancelled:
                counts += f", {len(cancelled)} cancelled"
            if not failed:  # cancelled (the Cancel button, %pymw cancel, job.cancel())
                done = len(results) - len(cancelled)
                note = (f"pymw: job {job.name!r} was cancelled: {done} of {len(results)} task(s) "
                        f"had finished, {len(cancelled)} cancelled")
            elif spec is not None:
                note = f"pymw: task {first.index} failed on input {describe_input(names, first.args)}; {counts}"
            else:
                note = f"pymw: the cell's task failed (job {job.name!r})"
            if out_var:
                note += f"; the results are in {out_var!r}" + (
                    " (a failed or cancelled position holds its exception)" if spec is not None else "")
            else:
                note += f"; the job is {_JOB_VAR}: {_JOB_VAR}.result(return_exceptions=True)"
            if not isinstance(error, BaseException):  # cannot happen: result() gave a value
                raise RuntimeError(note)
            if hasattr(error, "add_note"):
                error.add_note(note)
            else:  # Python 3.10: no notes
                print(note, file=sys.stderr)
            _raise_in_cell(error, first.remote_traceback, self._current_filename)
        if out_var:
            return None
        if spec is None:
            return value
        # A list of Nones (cells ending in a statement) is not worth an Out.
        return value if any(v is not None for v in value) else None

    def _show_output(self, job: Any, names: tuple[str, ...]) -> None:
        print_task_output(job, names)

    def at_exit(self) -> None:
        """The kernel's exit: the widgets' thread stopped, every master shut down."""
        try:
            stop_widgets()
        finally:
            self.session.shutdown_all()


# --- extension entry points ---------------------------------------------------------

_loaded: dict[int, PymwMagics] = {}


def loaded_magics(ipython: Any) -> PymwMagics | None:
    """The magics ``%load_ext pymw_magic`` registered on ``ipython``."""
    return _loaded.get(id(ipython))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext pymw_magic``: register ``%pymw``/``%%pymw``."""
    if id(ipython) in _loaded:
        return
    magics = PymwMagics(ipython)
    ipython.register_magics(magics)
    _loaded[id(ipython)] = magics
    _sessions.attach(ipython, magics.session)  # what the widgets find as the kernel's masters
    # In a kernel, blocking cells await their job so widget clicks get through;
    # in every shell, a %%pymw body's syntax is checked before the cell runs.
    if CellAwaiter.can_install(ipython):
        magics.awaiter = CellAwaiter(ipython, magics, await_cells=CellAwaiter.applies_to(ipython))
        magics.awaiter.install()
    # Kernel exit: no worker may outlive the kernel, no widget thread may
    # still draw while the interpreter is torn down.
    atexit.register(magics.at_exit)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext pymw_magic``: shut every master down, remove the magics."""
    magics = _loaded.pop(id(ipython), None)
    if magics is None:
        return
    _sessions.detach(ipython)
    if magics.awaiter is not None:
        magics.awaiter.uninstall()
    try:
        magics.session.shutdown_all()
    finally:
        atexit.unregister(magics.at_exit)
        table = ipython.magics_manager.magics
        for kind in ("line", "cell"):
            registered = table[kind].get("pymw")
            if getattr(registered, "__self__", None) is magics:
                del table[kind]["pymw"]
        ipython.magics_manager.registry.pop(type(magics).__name__, None)
