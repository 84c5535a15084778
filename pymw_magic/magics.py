"""The IPython magics: ``%pymw`` (line) and ``%%pymw`` (cell).

This module owns the notebook surface of DESIGN.md section 3:

* option parsing and validation for both magics — every option is checked
  against its declaration (the cell's own options here; the Master's and
  each backend's in :mod:`pymw_magic.backends`) *before* any master or task
  exists, so a typo is a :class:`~IPython.core.error.UsageError` listing
  what is valid;
* the kernel's :class:`Session`: its default master (``%pymw use``), the
  masters cached per configuration for cells that ask for another backend,
  and shutting all of them down on unload and at kernel exit;
* the ``%pymw`` subcommands, kept in a registry (:func:`subcommand`) so
  later modules add theirs (``dashboard``, ``tune``, ``export``, ``sweep``)
  without touching this file;
* running a cell as a job: the cell body becomes a task function through
  :mod:`pymw_magic.cellfunc`, tasks' output is printed in input order, and
  a failing task is raised with its input and remote traceback while the
  finished results stay bound in the notebook;
* how those errors show in IPython: from the cell's own line on, without
  this module's frames or the line IPython rewrote the cell into.

The ``%%pymw`` line is Python (``--map x in range(n)``, ``--name job``): it
is taken as written, never expanded like a shell line (``$name``,
``{expr}``), so the exported script reads it the same way.

``load_ipython_extension``/``unload_ipython_extension`` live here.
"""

from __future__ import annotations

import asyncio
import atexit
import keyword
import re
import shlex
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import cloudpickle
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand

from . import cellfunc
from .cellfunc import MapSpec
from .errors import PayloadError
from .payload import PROTOCOL, type_name

__all__ = [
    "PymwMagics", "Session", "Subcommand", "SUBCOMMANDS", "subcommand",
    "load_ipython_extension", "unload_ipython_extension", "parse_options",
]


# --- option declarations ----------------------------------------------------------
# Master-level options (workers, policy, retries, timeout) and each backend's
# options are declared in pymw_magic.backends; the cell magic's own are here,
# in the same Option shape, so one code path validates them all.

def _is_identifier(text: str) -> bool:
    return text.isidentifier() and not keyword.iskeyword(text)


def cell_options() -> dict[str, Any]:
    """Options of the cell magic only (not of ``%pymw use``); ``map`` is
    parsed apart because EXPR may hold spaces."""
    from .backends import Option
    return {
        "backend": Option("backend", str, None, "backend for this cell (default: the %pymw use one)",
                          choices=_backend_names()),
        "map": Option("map", str, None, "TARGET in EXPR: one task per item (x in xs, a, b in zip(xs, ys))"),
        "out": Option("out", str, None, "variable for the results (with --nowait, the Job)",
                      check=_is_identifier, requirement="a Python variable name"),
        "name": Option("name", str, None, "the job's name (default cell-N)"),
        "nowait": Option("nowait", bool, False, "return at once; the Job goes to --out (or _pymw_job)"),
        "chunksize": Option("chunksize", int, None, "tasks handed to a worker at once (default: automatic)",
                            check=lambda n: n >= 1, requirement="a whole number >= 1"),
    }


#: Options that are per job (passed to ``map_async``) when given on a cell.
_JOB_LEVEL = ("retries", "timeout")
_FLAGS = frozenset({"nowait"})

#: Backend used when a cell runs before any ``%pymw use``.
DEFAULT_BACKEND = "local"


def _backend_names() -> tuple[str, ...]:
    from .backends import backend_names
    return tuple(backend_names())


def master_options() -> dict[str, Any]:
    """Options every backend's Master takes."""
    from .backends import master_options as declared
    return declared()


def backend_options(backend: str) -> dict[str, Any]:
    """The options ``backend`` declares (``name -> Option``)."""
    from .backends import get_backend
    return dict(getattr(get_backend(backend), "options", {}) or {})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _convert(opt: Any, raw: str | bool) -> Any:
    """An option's text converted by its declaration; a UsageError naming
    the option and what is valid when it does not fit."""
    flag = _flag(opt.name)
    if raw is True:  # given bare
        if opt.type is bool:
            return True
        raise UsageError(f"{flag} needs a value" + (f" ({opt.requirement})" if opt.requirement else ""))
    try:
        if opt.type is bool:
            return _to_bool(raw)
        return opt.convert(raw)
    except ValueError as exc:
        detail = re.sub(r"^option '[^']*': ", "", str(exc))  # we name the flag already
        if opt.choices and "one of" not in detail:
            detail += f"; valid values: {', '.join(map(str, opt.choices))}"
        raise UsageError(f"bad value for {flag}: {detail}") from None


# --- parsing a magic's line ---------------------------------------------------------

_OPTION_START = re.compile(r"\s--[A-Za-z]")


def _map_spec_end(line: str, start: int) -> int:
    """Where a ``--map`` spec starting at ``start`` ends: at the first
    `` --option`` outside brackets and strings (EXPR may hold spaces,
    commas and quotes), else at the end of the line."""
    depth = 0
    quote: str | None = None
    i = start
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if line.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
        elif ch in "'\"":
            quote = line[i:i + 3] if line[i:i + 3] in ('"""', "'''") else ch
            i += len(quote)
            continue
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth <= 0 and _OPTION_START.match(line, i):
            return i
        i += 1
    return len(line)


@dataclass
class ParsedLine:
    """A magic line split into positional words and ``--option`` values
    (raw text, or True for a bare flag); option names use underscores."""

    positional: list[str] = field(default_factory=list)
    options: dict[str, str | bool] = field(default_factory=dict)


def parse_options(line: str) -> ParsedLine:
    """Split a magic line. ``--map`` takes the rest of its spec verbatim;
    everything else is shell-like words (quotes group)."""
    parsed = ParsedLine()
    rest = line
    m = re.search(r"(?:^|\s)--map(?:=|\s+|$)", rest)
    if m:
        end = _map_spec_end(rest, m.end())
        spec = rest[m.end():end].strip()
        if not spec:
            raise UsageError("--map needs 'TARGET in EXPR', e.g. --map x in range(10)")
        parsed.options["map"] = spec
        rest = rest[:m.start()] + " " + rest[end:]
        if re.search(r"(?:^|\s)--map(?:=|\s|$)", rest):
            raise UsageError("--map is given twice")
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise UsageError(f"cannot parse the options: {exc}") from None
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--") and len(word) > 2:
            name, eq, value = word[2:].partition("=")
            key = name.replace("-", "_")
            raw: str | bool
            if eq:
                raw = value
            elif key in _FLAGS:
                raw = True
            elif i + 1 < len(words) and not words[i + 1].startswith("--"):
                i += 1
                raw = words[i]
            else:
                raw = True
            if key in parsed.options:
                raise UsageError(f"--{name} is given twice")
            parsed.options[key] = raw
        elif word.startswith("-") and len(word) > 1:
            raise UsageError(f"unknown option {word!r}; options are written --name VALUE")
        else:
            parsed.positional.append(word)
        i += 1
    return parsed


def _describe_options(decls: Mapping[str, Any]) -> str:
    return ", ".join(_flag(n) for n in decls)


def validate(options: Mapping[str, str | bool], *, backend: str,
             cell: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check and convert options against their declarations, before
    anything is built.  Returns (master and backend options, cell options)."""
    copts = cell_options() if cell else {}
    mopts = master_options()
    bopts = backend_options(backend)
    master_kw: dict[str, Any] = {}
    cell_kw: dict[str, Any] = {}
    for key, raw in options.items():
        if key in copts:
            cell_kw[key] = raw if key == "map" else _convert(copts[key], raw)
        elif key in mopts or key in bopts:
            master_kw[key] = _convert(bopts.get(key) or mopts[key], raw)
        else:
            where = "%%pymw" if cell else "%pymw use"
            parts = []
            if cell:
                parts.append("cell options: " + _describe_options(copts))
            parts.append("master options: " + _describe_options(mopts))
            parts.append(f"{backend!r} backend options: " + (_describe_options(bopts) or "none"))
            raise UsageError(f"unknown option {_flag(key)} for {where}; valid are " + "; ".join(parts))
    return master_kw, cell_kw


def parse_use(args: str) -> tuple[str, dict[str, Any], ParsedLine]:
    """``%pymw use BACKEND [options]``'s arguments: the backend, its
    validated options, and the parsed line (the options' text)."""
    parsed = parse_options(args)
    if len(parsed.positional) != 1:
        raise UsageError("usage: %pymw use BACKEND [options]; backends: "
                         + ", ".join(_backend_names()))
    backend = _check_backend(parsed.positional[0])
    options, _ = validate(parsed.options, backend=backend, cell=False)
    return backend, options, parsed


def _check_backend(name: str) -> str:
    names = _backend_names()
    if name not in names:
        raise UsageError(f"unknown backend {name!r}; valid backends: {', '.join(names)}")
    return name


# --- the kernel's masters --------------------------------------------------------------

class Session:
    """The masters of one kernel: the default one (``%pymw use``, or made
    by the first plain cell) and those made for cells that asked for
    another configuration, kept for the next cell that asks the same."""

    def __init__(self, master_factory: Callable[..., Any] | None = None):
        self._factory = master_factory
        self.default: Any | None = None
        self.masters: list[Any] = []   # the default first, when there is one

    def _make(self, backend: str, options: Mapping[str, Any]) -> Any:
        factory = self._factory
        if factory is None:
            from .master import Master
            factory = Master
        return factory(backend=backend, **options)

    def use(self, backend: str, options: Mapping[str, Any]) -> Any:
        """Make a new master the default; the one it replaces is shut down."""
        if self.default is not None:
            old, self.default = self.default, None
            self._shutdown(old)
        master = self._make(backend, options)
        self.default = master
        self.masters.insert(0, master)
        return master

    def default_backend(self) -> str:
        return self.default.backend_name if self.default is not None else DEFAULT_BACKEND

    def wanted(self, backend: str | None, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The full configuration a cell asks for: its options on top of
        the default master's (or, for another backend or no default yet, on
        top of the declared defaults).  Job-level options are not part of it."""
        backend = backend or self.default_backend()
        base: dict[str, Any]
        if self.default is not None and backend == self.default.backend_name:
            base = dict(self.default.options)
        else:
            from .backends import get_backend
            cls = get_backend(backend)
            base = {name: opt.default for name, opt in master_options().items()}
            base.update({name: opt.default for name, opt in backend_options(backend).items()})
            base["workers"] = cls.default_workers()
        for key in _JOB_LEVEL:
            base.pop(key, None)
        base.update(options)
        return backend, base

    def master_for(self, backend: str | None, options: Mapping[str, Any]) -> Any:
        """The master a cell runs on: the default when the cell asks for
        nothing else, else a cached master of the configuration it asks
        for, made on first use."""
        if self.default is None and backend in (None, DEFAULT_BACKEND) and not options:
            return self.use(DEFAULT_BACKEND, {})
        backend, wanted = self.wanted(backend, options)
        for master in self.masters:
            if master.backend_name == backend and all(
                    master.options.get(k) == v for k, v in wanted.items()):
                return master
        master = self._make(backend, {k: v for k, v in wanted.items() if v is not None})
        self.masters.append(master)
        return master

    def all_jobs(self) -> list[tuple[Any, Any]]:
        return [(m, job) for m in self.masters for job in list(m.jobs)]

    def _shutdown(self, master: Any) -> None:
        if master in self.masters:
            self.masters.remove(master)
        # Cancel what has not run and stop what runs: replacing a master or
        # unloading must not leave workers (or a long wait) behind.
        master.shutdown(wait=True, cancel_futures=True)

    def shutdown_all(self) -> None:
        errors = []
        self.default = None
        for master in list(self.masters):
            try:
                self._shutdown(master)
            except Exception as exc:  # shut the others down all the same
                errors.append(exc)
        if errors:
            raise errors[0]


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


def _counts_text(counts: Mapping[str, int]) -> str:
    shown = [f"{state} {n}" for state, n in counts.items() if n]
    return ", ".join(shown) or "no tasks"


def _job_state(job: Any) -> str:
    if not job.done():
        return "active"
    counts = job.counts()
    if counts.get("failed"):
        return "failed"
    if counts.get("cancelled"):
        return "cancelled"
    return "finished"


def _master_text(master: Any) -> str:
    return f"backend {master.backend_name!r} with {master.workers} worker(s)"


@subcommand("use", "%pymw use BACKEND [--workers N] [--policy P] [--retries K] "
            "[--timeout S] [backend options]",
            "set the kernel's default backend (the old default master is shut down)")
def _use(magics: "PymwMagics", args: str) -> None:
    backend, options, _ = parse_use(args)
    master = magics.session.use(backend, options)
    print(f"pymw: default is now {_master_text(master)}")


@subcommand("status", "%pymw status", "the masters, their workers and the jobs with their counts")
def _status(magics: "PymwMagics", args: str) -> None:
    if args.strip():
        raise UsageError("usage: %pymw status")
    session = magics.session
    if not session.masters:
        print("pymw: no master yet (%pymw use BACKEND, or run a %%pymw cell)")
        return
    for master in session.masters:
        mark = "default" if master is session.default else "cached"
        print(f"pymw {mark}: {_master_text(master)}")
        jobs = list(master.jobs)
        if not jobs:
            print("  no jobs")
        for job in jobs:
            print(f"  job {job.id} {job.name!r} ({_job_state(job)}): {_counts_text(job.counts())}")


@subcommand("jobs", "%pymw jobs", "list the jobs of every master")
def _jobs(magics: "PymwMagics", args: str) -> None:
    if args.strip():
        raise UsageError("usage: %pymw jobs")
    rows = magics.session.all_jobs()
    if not rows:
        print("pymw: no jobs")
        return
    print(f"{'id':>4}  {'name':<16} {'backend':<10} {'state':<10} counts")
    for master, job in rows:
        print(f"{job.id:>4}  {job.name:<16} {master.backend_name:<10} {_job_state(job):<10} "
              f"{_counts_text(job.counts())}")


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


# issue 4: the widget subcommands; their modules are imported when used.
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


# issue 7: the notebook as a batch script (pymw_magic/export.py).
@subcommand("export", "%pymw export [NOTEBOOK.ipynb] [-o SCRIPT.py] [--backend B] [options] "
            "[--skip-unsupported]",
            "write this notebook (as last saved) as a plain Python script: python SCRIPT.py")
def _export(magics: "PymwMagics", args: str) -> None:
    from .export import ExportError, export_magic
    try:
        export_magic(magics.shell.user_ns, args)
    except ExportError as exc:
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
        lines.append(f"  {_flag(opt.name):<12} {opt.help}")
    lines.append("")
    lines.append("backends and their options:")
    for name in _backend_names():
        opts = backend_options(name)
        lines.append(f"  {name}")
        for opt in opts.values():
            listed = opt.choices or opt.suggestions
            extra = f" [{'|'.join(map(str, listed))}]" if listed else ""
            lines.append(f"    {_flag(opt.name):<16} {opt.help}{extra} (default {opt.default!r})")
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
    """The live progress of a blocking cell (issue 4): the inline job widget
    in a Jupyter kernel, the text bar elsewhere; returns its ``settle``."""
    from .widgets.jobview import show_progress  # ipywidgets only when a cell runs
    return show_progress(job)


def _describe_input(names: tuple[str, ...], args: tuple, limit: int = 120) -> str:
    text = ", ".join(f"{n}={a!r}" for n, a in zip(names, args))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_map_items(target: str, names: tuple[str, ...], arguments: Iterable[tuple]) -> None:
    """Test-pickle the ``--map`` items before any task starts: the first
    item, and the first of each other combination of types (a PayloadError
    naming the item, the target's name and the value's type).  Pickling
    every item twice would double a job's cost; items of one type rarely
    differ in whether they pickle."""
    seen: set[tuple[type, ...]] = set()
    for i, args in enumerate(arguments):
        kinds = tuple(type(a) for a in args)
        if kinds in seen:
            continue
        seen.add(kinds)
        for name, value in zip(names, args):
            try:
                cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=lambda b: None)
            except Exception as exc:
                shown = repr(value)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise PayloadError(
                    f"--map {target!r}: item {i} cannot be sent to workers: {name}={shown} "
                    f"({type_name(value)}): {exc}. Map over picklable values (a list, not a "
                    "generator; data rather than open handles).") from None


def print_task_output(job: Any, names: tuple[str, ...]) -> None:
    """Print what ``job``'s tasks printed, in input order; a failed task's
    output comes under a header naming it (its ``--map`` input by
    ``names``) and its error."""
    for task in sorted(job.tasks, key=lambda t: t.index):
        out, err = task.stdout or "", task.stderr or ""
        if task.state == "failed":
            if not (out or err):
                continue
            what = f"task {task.index}"
            if names:
                what += f" ({_describe_input(names, task.args)})"
            error = task.error
            label = f"{type(error).__name__}: {error}" if error is not None else "failed"
            print(f"--- pymw: output of failed {what}, which raised {label} ---")
        if out:
            sys.stdout.write(out if out.endswith("\n") else out + "\n")
        if err:
            sys.stderr.write(err if err.endswith("\n") else err + "\n")
    sys.stdout.flush()
    sys.stderr.flush()


@magics_class
class PymwMagics(Magics):
    """``%pymw`` and ``%%pymw``; the kernel's masters live in ``session``."""

    def __init__(self, shell: Any = None, session: Session | None = None):
        super().__init__(shell)
        self.session = session or Session()
        self._filenames: set[str] = set()
        self._current_filename = ""
        self.awaiter: Any = None  # the shell's CellAwaiter (pymw_magic.awaiting)

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
        return sub.handler(self, rest.strip())

    # The cell magic has the same name as the line magic; IPython keeps them apart.
    # Its line is Python (--map x in {1, 2}): never expanded as $name/{expr}.
    @cell_magic("pymw")
    @no_var_expand
    def pymw_cell(self, line: str, cell: str) -> Any:
        """%%pymw [options] — run the cell body as tasks; see %pymw help."""
        __tracebackhide__ = True  # noqa: F841
        return self.run_cell(line, cell)

    # -- running a cell --
    def _filename(self, count: int | None = None, *, reserve: bool = True) -> tuple[str, str]:
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
        settle()  # the final state is shown before the cell's output (issue 4)
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
        parsed = parse_options(line)
        if parsed.positional:
            raise UsageError(f"unexpected {' '.join(parsed.positional)!r}: %%pymw takes only "
                             "--options (see %pymw help)")
        # Validation first: nothing is built, evaluated or sent before it passes.
        raw_backend = parsed.options.get("backend")
        if raw_backend is True:
            raise UsageError("--backend needs a value; valid backends: " + ", ".join(_backend_names()))
        backend_asked = _check_backend(raw_backend) if isinstance(raw_backend, str) else None
        master_kw, cell_kw = validate(parsed.options, cell=True,
                                      backend=backend_asked or self.session.default_backend())
        cell_kw.pop("backend", None)
        job_kw = {key: master_kw.pop(key) for key in _JOB_LEVEL if key in master_kw}
        spec: MapSpec | None = None
        if "map" in cell_kw:
            try:
                spec = cellfunc.parse_map(cell_kw["map"])
            except ValueError as exc:
                raise UsageError(str(exc)) from None

        filename, default_name = self._filename()
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

        master = self.session.master_for(backend_asked, master_kw)
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
                note = f"pymw: task {first.index} failed on input {_describe_input(names, first.args)}; {counts}"
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
    # In a kernel, blocking cells await their job so widget clicks get through;
    # in every shell, a %%pymw body's syntax is checked before the cell runs.
    from .awaiting import CellAwaiter
    if CellAwaiter.can_install(ipython):
        magics.awaiter = CellAwaiter(ipython, magics, await_cells=CellAwaiter.applies_to(ipython))
        magics.awaiter.install()
    # Kernel exit: no worker may outlive the kernel, no widget thread may
    # still draw while the interpreter is torn down.
    atexit.register(magics.at_exit)


def stop_widgets() -> None:
    """Stop the widgets' ticker thread and wait for it, if widgets were
    used: a daemon thread drawing (a sweep's matplotlib figure) while the
    interpreter shuts down can abort the process."""
    jobview = sys.modules.get("pymw_magic.widgets.jobview")  # never import ipywidgets to stop it
    if jobview is not None:
        jobview.TICKER.stop()


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext pymw_magic``: shut every master down, remove the magics."""
    magics = _loaded.pop(id(ipython), None)
    if magics is None:
        return
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
