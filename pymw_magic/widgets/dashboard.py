"""The dashboard: ``%pymw dashboard`` / ``pymw_magic.dashboard()``.

This module owns:

* the kernel's *current master* as the widgets see it
  (:func:`current_master`, :func:`use_master`): the ``%pymw`` magics'
  Session when the extension is loaded, otherwise a module-level default —
  so the dashboard and sweeps work with and without ``%load_ext
  pymw_magic``; and the masters whose jobs the dashboard lists
  (:func:`kernel_masters`: every live master of the kernel, including one a
  notebook made itself with ``Master(...)``), with their jobs
  (:func:`master_jobs`: ``map_async`` jobs and the jobs grouping
  ``submit()`` calls);
* :class:`BackendForm` — a dropdown of the registered backends and, for the
  chosen one, fields generated from the options it declares
  (:func:`~pymw_magic.backends.master_options` and ``Backend.options``): a
  new backend gets its form for free.  Apply validates every field as the
  magics do (:func:`pymw_magic.options.convert`) and shows a bad value next to its field; only then is
  the kernel's master created or replaced.  Whatever making the master
  raises (a missing ``mpiexec``, a bad option) is shown in the status line
  — and beside the field it names — never as a traceback;
* :class:`TaskTable` — one HTML table of one page of a job's tasks (state,
  worker, attempts, duration, error) with prev/next and a state filter, so
  100,000 tasks never become 100,000 widgets;
* :class:`Dashboard` — the form, a row per job (a
  :class:`~pymw_magic.widgets.jobview.JobView`: progress, throughput, ETA,
  cancel), and for the selected job the task table and the per-worker
  timeline (:class:`~pymw_magic.widgets.timeline.Timeline`).  It subscribes
  to no event: the shared ticker looks at the jobs (their list, the
  selected one's counts) at most 4 times a second and redraws what changed
  — so a displayed dashboard adds nothing to a job's per-batch work (an
  event bus with a listener has every batch build and send events) — and
  the timeline — the one costly drawing — only while its tab is shown, at
  most once a second and less often when it is slow to draw (it may use
  at most 5 % of the time); while the selected job is active it is redrawn
  that often even without events, so running tasks' bars grow up to now.
  A job that appears while the dashboard is shown is drawn (row, job list,
  task table) only once it has been seen running for :data:`DELAY` or has
  ended: drawing means sending widget messages from the kernel, and a job
  shorter than a refresh would share the kernel's CPU with them — it gets
  its row once, in its final state.  Rows of jobs that drop off the list
  are reused for new jobs rather than new widgets made.
"""

from __future__ import annotations

import html
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

import ipywidgets

from ..backends import Option, backend_names, get_backend, master_options
from .. import session as sessions
from ..options import convert
from ..session import Session
from .jobview import TICKER, JobView, Ticker
from .timeline import Timeline

if TYPE_CHECKING:
    from ..job import Job
    from ..master import Master

__all__ = ["BackendForm", "DELAY", "Dashboard", "TaskTable", "dashboard", "current_master", "use_master",
           "kernel_masters", "master_jobs", "fallback_master", "set_fallback_master"]


# --- the kernel's masters ----------------------------------------------------------------

_fallback: dict[str, Any] = {"master": None}   # without %load_ext pymw_magic


def _session() -> Session | None:
    """The ``%pymw`` Session of the running IPython, when the extension is loaded."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return None
    return sessions.of(get_ipython())


def fallback_master() -> Master | None:
    """The master the widgets use without ``%load_ext pymw_magic`` (an
    exported script sets it to its own default master)."""
    return _fallback["master"]


def set_fallback_master(master: Master | None) -> None:
    """Make ``master`` the one the widgets use without the extension."""
    _fallback["master"] = master


def current_master(create: bool = True) -> Master | None:
    """The kernel's default master (a local one is made on first use when
    ``create``), as ``%%pymw`` cells see it."""
    session = _session()
    if session is not None:
        if session.default is None and create:
            return session.master_for(None, {})
        return session.default
    master = _fallback["master"]
    if (master is None or master.closed) and create:
        from ..master import Master
        master = _fallback["master"] = Master("local")
    return master


def use_master(backend: str, options: Mapping[str, Any]) -> Master:
    """Create a master and make it the kernel's default; the one it replaces
    is shut down (its pending tasks cancelled).  ValueError on a bad option.

    Without the extension the new master is built first and the old one
    shut down only once that succeeded: a backend that cannot start leaves
    the kernel's default as it was."""
    session = _session()
    if session is not None:
        return session.use(backend, dict(options))
    from ..master import Master
    new = Master(backend, **options)
    old, _fallback["master"] = _fallback["master"], new
    if old is not None:
        old.shutdown(wait=True, cancel_futures=True)
    return new


def kernel_masters() -> list[Master]:
    """Every live master of this kernel, for the widgets to show: the
    Session's (the default first), the module default, then any other one
    not shut down — e.g. a ``Master("local")`` made in a notebook cell."""
    from ..master import live_masters
    session = _session()
    masters = list(session.masters) if session is not None else []
    if _fallback["master"] is not None:
        masters.append(_fallback["master"])
    masters += live_masters()  # (in no order: the dashboard sorts jobs by id)
    seen: set[int] = set()
    out = []
    for m in masters:
        if id(m) not in seen and not m.closed:
            seen.add(id(m))
            out.append(m)
    return out


def master_jobs(master: Master) -> list[Job]:
    """A master's jobs: those of ``map_async`` (and ``%%pymw`` cells) and the
    open-ended ones grouping its ``submit()`` calls, one per function."""
    return list(master.jobs) + master.submit_jobs


# --- the backend form --------------------------------------------------------------------

def _field(opt: Option, value: Any) -> ipywidgets.Widget:
    """An input widget for one declared option, holding ``value``."""
    style = {"description_width": "90px"}
    common = dict(description=opt.name, tooltip=opt.help, style=style,
                  layout=ipywidgets.Layout(width="300px"))
    if opt.type is bool:
        return ipywidgets.Checkbox(value=bool(value), indent=False, **common)
    listed = opt.choices or opt.suggestions
    if listed:
        entries = [(str(c), c) for c in listed]
        if opt.suggestions and value is not None and value not in listed:
            # A value the suggestions do not list (a notebook's policy) stays
            # selected: showing the first suggestion would switch to it on Apply.
            label = value if isinstance(value, str) else getattr(value, "__name__", None) or repr(value)
            entries.append((str(label), value))
            listed = (*listed, value)
        return ipywidgets.Dropdown(options=entries, value=value if value in listed else listed[0], **common)
    return ipywidgets.Text(value="" if value is None else str(value),
                           placeholder="default" if opt.default is None else str(opt.default), **common)


class BackendForm(ipywidgets.VBox):
    """Backend dropdown + generated option fields + Apply.

    ``on_apply(backend, options)`` makes the master (default:
    :func:`use_master`); any exception it raises is shown in ``status``
    (and beside the field of the option it names).  ``fields`` maps an
    option name to its input widget, ``errors`` to the ``HTML`` beside it
    that shows a bad value.
    """

    def __init__(self, on_apply: Callable[[str, dict[str, Any]], Any] | None = None, *,
                 master: Master | None = None, **kwargs: Any):
        self._on_apply = on_apply or use_master
        self._applied: list[Callable[[Any], None]] = []
        names = backend_names()
        initial = master.backend_name if master is not None and master.backend_name in names else names[0]
        self._values: dict[str, Any] = self._options_of(master) if master is not None else {}
        self.backend = ipywidgets.Dropdown(options=names, value=initial, description="backend",
                                           style={"description_width": "90px"},
                                           layout=ipywidgets.Layout(width="300px"))
        self.fields: dict[str, ipywidgets.Widget] = {}
        self.errors: dict[str, ipywidgets.HTML] = {}
        self.options: dict[str, Option] = {}
        self.fields_box = ipywidgets.VBox()
        self.apply_button = ipywidgets.Button(description="Apply", icon="check", button_style="primary",
                                              tooltip="create the kernel's master with these options "
                                                      "(replacing the current one)")
        self.apply_button.on_click(lambda _b: self.apply())
        self.status = ipywidgets.HTML()
        kwargs.setdefault("layout", ipywidgets.Layout(border="1px solid #ddd", padding="4px"))
        super().__init__(children=(self.backend, self.fields_box,
                                   ipywidgets.HBox((self.apply_button, self.status))), **kwargs)
        self.add_class("pymw-backend-form")
        self.backend.observe(lambda _c: self._build_fields(), names="value")
        self._build_fields()

    @staticmethod
    def _options_of(master: Master) -> dict[str, Any]:
        """``master``'s options as the kernel's session gave them (its
        policy the notebook's function, not only its name)."""
        session = _session()
        return session.config(master) if session is not None else dict(master.options)

    def _build_fields(self) -> None:
        backend = self.backend.value
        self.options = {**master_options(), **get_backend(backend).options}
        values = self._values if self._values.get("__backend__", self.backend.value) == backend else {}
        self.fields, self.errors = {}, {}
        rows = []
        for name, opt in self.options.items():
            self.fields[name] = _field(opt, values.get(name, opt.default))
            self.errors[name] = ipywidgets.HTML()
            self.errors[name].add_class("pymw-error")
            rows.append(ipywidgets.HBox((self.fields[name], self.errors[name])))
        self.fields_box.children = rows
        self.status.value = ""

    def values(self) -> tuple[dict[str, Any], dict[str, str]]:
        """The converted option values (fields left empty are omitted) and
        the error message of each field whose value is not valid."""
        out: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, widget in self.fields.items():
            opt, raw = self.options[name], widget.value
            if isinstance(raw, str) and not raw.strip():
                continue  # the declared default
            try:
                # Text goes through the one grammar (the converter's own reason
                # shown, as in a magic); a widget's number is converted as it is.
                value = convert(opt, raw.strip()) if isinstance(raw, str) else opt.convert(raw)
            except ValueError as exc:
                errors[name] = re.sub(r"^bad value for --[\w-]+: ", "", str(exc)).replace(f"option {name!r}: ", "")
                continue
            if value is not None and value != opt.default:
                out[name] = value
        return out, errors

    def on_applied(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(master)`` after each successful Apply."""
        self._applied.append(callback)

    def _show_errors(self, errors: Mapping[str, str]) -> None:
        for name, box in self.errors.items():
            box.value = (f'<span style="color:#c00">\u2716 {html.escape(errors[name])}</span>'
                         if name in errors else "")

    def _field_named(self, message: str) -> str | None:
        """The field an error message is about: the option it names
        (``option 'NAME'``, as ``Option.convert`` words it, or another
        quoted option name), one of the backend's own options named as a
        word (``no mpiexec found``), or the field whose value it quotes (a
        file that does not exist)."""
        for pattern in (r"option '([^']+)'", r"'([^']+)'"):
            for name in re.findall(pattern, message):
                if name in self.fields:
                    return name
        for name in get_backend(self.backend.value).options:
            if name in self.fields and re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message):
                return name
        for name, widget in self.fields.items():
            value = widget.value
            if isinstance(value, str) and value.strip() and f"'{value.strip()}'" in message:
                return name
        return None

    def apply(self) -> Any | None:
        """Validate; show bad values beside their fields, or make the master.
        Returns the master, or None when it was not made (why is shown)."""
        options, errors = self.values()
        self._show_errors(errors)
        if errors:
            self.status.value = f'<span style="color:#c00">{len(errors)} invalid value(s)</span>'
            return None
        backend = self.backend.value
        self.status.value = f"starting {html.escape(backend)}\u2026"
        try:
            master = self._on_apply(backend, options)
        except Exception as exc:  # a button's callback: shown here, never a traceback
            text = str(exc) or type(exc).__name__
            if not isinstance(exc, ValueError):
                text = f"{type(exc).__name__}: {text}"
            name = self._field_named(str(exc))
            if name is not None:
                self._show_errors({name: re.sub(rf"^option '{re.escape(name)}': ", "", str(exc))})
            self.status.value = (f'<span style="color:#c00">\u2716 backend {html.escape(backend)} '
                                 f'not started: {html.escape(text)}</span>')
            return None
        self._values = dict(self._options_of(master), __backend__=backend)
        self.status.value = (f'<span style="color:#080">\u2714 backend {html.escape(backend)!s} '
                             f'with {master.workers} worker(s)</span>')
        for callback in self._applied:
            callback(master)
        return master


# --- the task table ----------------------------------------------------------------------

_COLUMNS = ("index", "state", "worker", "attempts", "duration", "error")


def _cell(task: Any, column: str) -> str:
    if column == "state":
        return task.state.value
    if column == "duration":
        d = task.duration
        return "" if d is None else f"{d:.3g} s"
    if column == "error":
        e = task.error
        return "" if e is None else f"{type(e).__name__}: {e}"[:120]
    value = getattr(task, column)
    return "" if value is None else str(value)


class TaskTable(ipywidgets.VBox):
    """One page of a job's tasks as one HTML table, with a state filter and
    prev/next.  ``table`` holds the page; ``page_label`` says which rows of
    how many are shown."""

    def __init__(self, job: Job | None = None, *, page_size: int = 20, **kwargs: Any):
        from ..task import STATE_ORDER
        self.job = job
        self.page_size = page_size
        self.page = 0
        self.state_filter = ipywidgets.Dropdown(options=["all", *(s.value for s in STATE_ORDER)],
                                                value="all", description="state",
                                                layout=ipywidgets.Layout(width="180px"),
                                                style={"description_width": "40px"})
        self.prev_button = ipywidgets.Button(description="prev", icon="chevron-left",
                                             layout=ipywidgets.Layout(width="80px"))
        self.next_button = ipywidgets.Button(description="next", icon="chevron-right",
                                             layout=ipywidgets.Layout(width="80px"))
        self.page_label = ipywidgets.HTML()
        self.table = ipywidgets.HTML()
        self.prev_button.on_click(lambda _b: self.turn(-1))
        self.next_button.on_click(lambda _b: self.turn(+1))
        self.state_filter.observe(lambda _c: self._filter_changed(), names="value")
        super().__init__(children=(ipywidgets.HBox((self.state_filter, self.prev_button, self.next_button,
                                                    self.page_label)), self.table), **kwargs)
        self.add_class("pymw-task-table")
        self.refresh()

    def set_job(self, job: Job | None, *, refresh: bool = True) -> None:
        """Show ``job`` from its first page (``refresh=False``: drawn by the
        caller's next :meth:`refresh`)."""
        self.job, self.page = job, 0
        if refresh:
            self.refresh()

    def turn(self, step: int) -> None:
        self.page = max(0, self.page + step)
        self.refresh()

    def _filter_changed(self) -> None:
        self.page = 0
        self.refresh()

    def _rows(self) -> tuple[list[Any], int]:
        """The tasks of the current page and how many match the filter."""
        job_tasks = self.job.tasks if self.job is not None else []
        wanted = self.state_filter.value
        if wanted == "all" and isinstance(job_tasks, list):
            # (a list's slice is taken at once: no copy of 100,000 records per redraw)
            n = len(job_tasks)
            pages = max(1, -(-n // self.page_size))
            self.page = min(self.page, pages - 1)
            start = self.page * self.page_size
            return job_tasks[start:start + self.page_size], n
        tasks: list[Any] = list(job_tasks)
        if wanted != "all":
            tasks = [t for t in tasks if t.state.value == wanted]
        pages = max(1, -(-len(tasks) // self.page_size))
        self.page = min(self.page, pages - 1)
        start = self.page * self.page_size
        return tasks[start:start + self.page_size], len(tasks)

    def refresh(self) -> None:
        rows, n = self._rows()
        start = self.page * self.page_size
        self.prev_button.disabled = self.page == 0
        self.next_button.disabled = start + self.page_size >= n
        self.page_label.value = (f"tasks {start + 1:,}\u2013{start + len(rows):,} of {n:,}" if rows
                                 else f"no tasks{'' if self.job is not None else ' (no job selected)'}")
        head = "".join(f"<th style='text-align:left;padding:0 8px'>{c}</th>" for c in _COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td style='padding:0 8px'>{html.escape(_cell(t, c))}</td>" for c in _COLUMNS)
            + "</tr>" for t in rows)
        self.table.value = (f"<table class='pymw-tasks' style='font-size:12px;border-collapse:collapse'>"
                            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


# --- the dashboard ------------------------------------------------------------------------

#: A job that appears while the dashboard is shown gets its row once it has
#: been seen running this long (seconds), or at the first tick after it
#: ended: a job shorter than a refresh shares no CPU with drawing while it
#: runs (tqdm's ``delay``), and is shown once, in its final state.
DELAY = 0.25


class Dashboard(ipywidgets.VBox):
    """Backend form, jobs, and for the selected job its tasks and timeline.

    ``form`` (:class:`BackendForm`), ``jobs_box`` (a ``JobView`` per job,
    newest last, at most ``max_jobs``), ``job_select``, ``task_table``
    (:class:`TaskTable`) and ``timeline`` (an ``HTML`` holding the SVG,
    drawn only while its tab is shown).

    A job that appears while the dashboard is shown is listed by the first
    tick at which it has ended or has been seen running for ``delay``
    seconds (0: at once); :meth:`refresh` lists every job now.  Rows of
    jobs that drop off the list are reused for new ones, so a kernel
    running jobs for days keeps ``max_jobs`` rows' widgets.
    """

    def __init__(self, *, max_jobs: int = 12, ticker: Ticker = TICKER,
                 masters: Callable[[], list[Master]] = kernel_masters, delay: float = DELAY, **kwargs: Any):
        self.max_jobs = max_jobs
        self.delay = delay
        self._masters_of = masters
        self._ticker = ticker
        self.form = BackendForm(master=current_master(create=False))
        self.form.on_applied(lambda _m: self._mark(jobs=True))
        self.jobs_box = ipywidgets.VBox()
        self.jobs_box.add_class("pymw-jobs")
        self.job_select = ipywidgets.Dropdown(description="job", options=[],
                                              layout=ipywidgets.Layout(width="360px"))
        self.job_select.observe(self._on_select, names="value")
        self.task_table = TaskTable()
        self.timeline = ipywidgets.HTML()
        self.timeline.add_class("pymw-timeline-view")
        self.details = details = ipywidgets.Tab(children=(self.task_table, self.timeline))
        details.set_title(0, "tasks")
        details.set_title(1, "timeline")
        details.observe(self._on_tab, names="selected_index")
        kwargs.setdefault("layout", ipywidgets.Layout(width="100%"))
        super().__init__(children=(ipywidgets.HTML("<b>pymw dashboard</b>"), self.form,
                                   ipywidgets.HTML("<b>jobs</b>"), self.jobs_box, self.job_select, details),
                         **kwargs)
        self.add_class("pymw-dashboard")
        self._views: dict[int, JobView] = {}
        self._listed: list[Job] = []             # the jobs last drawn, oldest first
        self._first_seen: dict[int, float] = {}  # job id -> when a tick first saw it running, unlisted
        self._follow_latest = True
        self._shown_jobs: tuple[int, ...] = ()   # the job ids last drawn
        self._seen: Any = None                   # the selected job's state last drawn
        self._updating = False
        self._closed = False
        self._jobs_dirty = self._tasks_dirty = True
        self._timeline_due = 0.0
        self._timeline_cost = 0.0
        self._lock = threading.RLock()  # the ticker's thread and the kernel's both draw
        self.refresh()
        ticker.add(self)

    def _mark(self, *, jobs: bool = False, tasks: bool = False) -> None:
        self._jobs_dirty |= jobs
        self._tasks_dirty |= tasks

    @staticmethod
    def _state(job: Job) -> tuple:
        return job.progress, tuple(job.counts().values()), job.done()

    def _ready(self, jobs: list[Job]) -> list[Job]:
        """The jobs to list now, at most ``max_jobs`` of the newest: those
        already listed, those ended, and those seen running for ``delay``
        seconds — reading a few counters, nothing drawn, while a new job
        runs its first moments (nor does a job not yet listed push an
        older one off the list)."""
        if self.delay <= 0:
            return jobs[-self.max_jobs:]
        now = time.monotonic()
        first_seen, ready, waiting = self._first_seen, [], set()
        for job in reversed(jobs):   # newest first, until the list is full
            if job.id in self._views or job.done() or now - first_seen.setdefault(job.id, now) >= self.delay:
                ready.append(job)
                first_seen.pop(job.id, None)
                if len(ready) == self.max_jobs:
                    break
            else:
                waiting.add(job.id)
        for gone in [i for i in first_seen if i not in waiting]:  # dropped before they were listed
            del first_seen[gone]
        ready.reverse()
        return ready

    def _look(self, jobs: list[Job]) -> None:
        """What changed since the last drawing, read off the jobs (no
        events): the jobs listed, and the selected job's counts."""
        if tuple(j.id for j in jobs) != self._shown_jobs:
            self._jobs_dirty = True
        job = self.job_select.value
        if job is not None and self._state(job) != self._seen:
            self._tasks_dirty = True

    # -- drawing (the ticker's thread, or the caller's) --
    def _all_jobs(self) -> list[Job]:
        jobs = [job for m in self._masters_of() for job in master_jobs(m)]
        jobs.sort(key=lambda j: j.id)
        return jobs

    def jobs(self) -> list[Job]:
        """The jobs the dashboard lists (at most ``max_jobs``, the newest),
        oldest first, whether or not a tick has drawn them yet."""
        return self._all_jobs()[-self.max_jobs:]

    def tick(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            jobs = self._ready(self._all_jobs())
            self._look(jobs)
            if self._jobs_dirty:
                self._refresh_jobs(jobs)
            if self._tasks_dirty:
                self._refresh_tasks()
            elif self._timeline_live():
                self._refresh_timeline()
        return True

    def refresh(self) -> None:
        """Redraw everything now (every job listed, however new)."""
        with self._lock:
            if self._closed:
                return
            self._refresh_jobs()
            self._refresh_tasks(force_timeline=True)

    def _refresh_jobs(self, jobs: list[Job] | None = None) -> None:
        self._jobs_dirty = False
        if jobs is None:
            jobs = self.jobs()
        self._listed = list(jobs)
        self._shown_jobs = tuple(j.id for j in jobs)
        old = self._views
        views = {job.id: old[job.id] for job in jobs if job.id in old}
        spare = [view for i, view in old.items() if i not in views]
        for job in jobs:
            if job.id not in views:
                # A row whose job dropped off shows the new job: no new widget.
                views[job.id] = spare.pop().show(job) if spare else JobView(job, ticker=self._ticker)
        for view in spare:
            view.close()
        self._views = views
        children = tuple(views[j.id] for j in jobs)
        if children != self.jobs_box.children:
            self.jobs_box.children = children
        options = [(f"{j.id}: {j.name}", j) for j in reversed(jobs)]
        if [o[1] for o in options] != [o[1] for o in self.job_select.options]:
            selected = self.job_select.value
            follow = self._follow_latest or selected not in jobs
            self._updating = True  # not a user's choice
            try:
                self.job_select.options = options
                self.job_select.value = (jobs[-1] if jobs else None) if follow else selected
            finally:
                self._updating = False
            self._follow_latest = follow
            self._on_select()

    def _on_select(self, change: Any = None) -> None:
        with self._lock:
            if change is not None and not self._updating:  # a user's choice: follow the newest job only if it is one
                listed = self._listed
                self._follow_latest = bool(listed) and change["new"] is listed[-1]
            if self.task_table.job is not self.job_select.value:
                # A user's choice is drawn now; the dashboard's own (a new
                # job followed) by the redraw that follows it, once.
                self.task_table.set_job(self.job_select.value,
                                        refresh=change is not None and not self._updating)
                self._timeline_due = 0.0  # the new job's timeline: at the next tick
                self._tasks_dirty = True

    def _on_tab(self, change: Any) -> None:
        if change["new"] == 1:  # the timeline is drawn only while it is shown
            with self._lock:
                self._refresh_tasks(force_timeline=True)

    def _timeline_live(self) -> bool:
        """The timeline is shown, due, and its job active: its running
        tasks' bars have grown since it was drawn, events or not."""
        job = self.job_select.value
        return (self.details.selected_index == 1 and job is not None and not job.done()
                and time.monotonic() >= self._timeline_due)

    def _refresh_tasks(self, force_timeline: bool = False) -> None:
        self._tasks_dirty = False
        job = self.job_select.value
        self._seen = None if job is None else self._state(job)
        self.task_table.refresh()
        if self.details.selected_index != 1:
            return
        if not (force_timeline or time.monotonic() >= self._timeline_due):
            self._tasks_dirty = True  # the timeline is still due
            return
        self._refresh_timeline()

    def _refresh_timeline(self) -> None:
        now = time.monotonic()
        job = self.job_select.value
        started = time.perf_counter()
        if job is None:
            self.timeline.value = "<i>no job selected</i>"
        else:
            Timeline.from_tasks(list(job.tasks), title=f"job {job.name}").update(self.timeline, width=860)
        self._timeline_cost = time.perf_counter() - started
        # At most once a second; a slow drawing (many tasks) is drawn less often.
        self._timeline_due = now + max(1.0, 20 * self._timeline_cost)

    def close(self) -> None:
        """Remove the dashboard and its job rows; it draws nothing more
        (a tick under way on the ticker's thread finishes first)."""
        if not hasattr(self, "_lock"):  # (ipywidgets closes a half-made widget too)
            super().close()
            return
        self._ticker.discard(self)
        with self._lock:
            self._closed = True
            views, self._views = list(self._views.values()), {}
            self._first_seen.clear()
        for view in views:
            view.close()
        # Its own widgets too: an open one stays in ipywidgets' registry for
        # good, and the job list and task table hold jobs (and their tasks).
        for child in self.children:
            _close_tree(child)
        self.layout.close()
        super().close()


def _close_tree(widget: ipywidgets.Widget) -> None:
    """Close ``widget``, its children, and the layout and style it owns
    (a job row's are shared: a row is closed by its own ``close``)."""
    if isinstance(widget, JobView):
        widget.close()
        return
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if isinstance(part, ipywidgets.Widget):
            part.close()
    widget.close()


def dashboard() -> Dashboard:
    """The live dashboard of this kernel's masters and jobs."""
    return Dashboard()
