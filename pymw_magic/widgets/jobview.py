"""The inline job widget, and the throttle every live widget shares.

This module owns:

* :class:`JobSnapshot` — one consistent reading of a job (counts by state,
  finished/total, throughput, elapsed, ETA, status) and its rendering as a
  progress bar split by state; the dashboard's job rows reuse both;
* :class:`Ticker` — the one daemon thread per process that pushes widget
  state, at most every ``interval`` seconds (0.25 s: 4 Hz).  The views
  subscribe to no event: at each tick a view reads its job's counts and
  redraws if they changed, so nothing is built, rendered or sent per batch
  (an event bus with a listener has every batch build and send events),
  and a 100,000-task job costs a few messages a second;
* :class:`JobView` — the compact widget a blocking ``%%pymw`` cell (or any
  :class:`~pymw_magic.job.Job`) shows: the split bar, counts, tasks/s,
  elapsed, ETA and a Cancel button; it settles into a one-line summary when
  the job ends and then stops listening;
* :func:`show_progress` — the widget in a widget-capable kernel, the text
  progress bar (:class:`~pymw_magic.progress.TextProgress`) on a terminal;
  :func:`job_mimebundle` — how a displayed ``Job`` shows itself.

The widget's state is pushed from the ticker's thread, so updates flow
whatever the kernel's main thread does.  A click on Cancel is a message the
kernel handles on its main thread: a blocking ``%%pymw`` cell therefore
*awaits* its job in a kernel (:mod:`pymw_magic.awaiting`), and the click is
handled while the cell waits.
"""

from __future__ import annotations

import html
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import ipywidgets
from ipywidgets.widgets.widget_string import HTMLStyle

from .timeline import COLORS

if TYPE_CHECKING:
    from ..job import Job

__all__ = ["JobSnapshot", "JobView", "Ticker", "TICKER", "show_progress", "job_mimebundle", "STATE_COLORS"]

#: Colours of the split bar, in the tasks' display order (``task.STATE_ORDER``).
STATE_COLORS = {
    "pending": "#d9d9d9",
    "running": COLORS["running"],
    "retrying": COLORS["lost"],
    "done": COLORS["done"],
    "failed": COLORS["failed"],
    "cancelled": COLORS["cancelled"],
}
_SUMMARY_MARK = {"finished": "\u2714", "failed": "\u2716", "cancelled": "\u25a0", "active": "\u25b6"}


# --- one reading of a job ------------------------------------------------------------------

def _seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    return f"{m}:{s:02d} min" if m < 60 else f"{m // 60}:{m % 60:02d} h"


@dataclass(frozen=True)
class JobSnapshot:
    """What a job looks like now; ``status`` is active, finished, failed
    or cancelled (the words of ``%pymw status``)."""
    name: str
    counts: dict[str, int]
    finished: int
    total: int | None
    elapsed: float
    status: str

    @classmethod
    def of(cls, job: Job) -> JobSnapshot:
        counts = job.counts()
        finished, total = job.progress
        if not job.done():
            status = "active"
        elif counts.get("failed"):
            status = "failed"
        elif counts.get("cancelled"):
            status = "cancelled"
        else:
            status = "finished"
        return cls(job.name, counts, finished, total, job.elapsed, status)

    @property
    def rate(self) -> float:
        """Finished tasks per second since the job was submitted."""
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None when unknown."""
        if self.status != "active":
            return 0.0
        if self.total is None or self.rate <= 0:
            return None
        return (self.total - self.finished) / self.rate

    def counts_text(self) -> str:
        return ", ".join(f"{state} {n}" for state, n in self.counts.items() if n) or "no tasks"

    def stats_text(self) -> str:
        return f"{self.rate:,.0f} tasks/s \u00b7 {_seconds(self.elapsed)} \u00b7 ETA {_seconds(self.eta)}"

    def summary(self) -> str:
        """The one line a finished job settles into."""
        return (f"job {self.name!r} {self.status}: {self.counts_text()} in {_seconds(self.elapsed)} "
                f"({self.rate:,.0f} tasks/s)")

    def bar_html(self, width: int = 240) -> str:
        """A bar split by state (pending is the bar's background)."""
        n = max(sum(self.counts.values()), 1)
        segs = "".join(
            f'<div class="pymw-seg pymw-seg-{state}" title="{state} {count}" '
            f'style="width:{100.0 * count / n:.3f}%;background:{STATE_COLORS[state]}"></div>'
            for state, count in self.counts.items() if count and state != "pending")
        return (f'<div class="pymw-bar" title="{html.escape(self.counts_text())}" style="display:flex;'
                f'width:{width}px;height:12px;flex:none;background:{STATE_COLORS["pending"]};'
                f'border-radius:3px;overflow:hidden">{segs}</div>')

    def html(self, *, name: bool = True) -> str:
        """The whole line: name, bar, counts and figures (or the summary)."""
        mark = _SUMMARY_MARK[self.status]
        text = self.summary() if self.status != "active" else (
            f"{self.counts_text()} \u00b7 {self.stats_text()}")
        label = f"<b>{html.escape(self.name)}</b>" if name and self.status == "active" else ""
        return (f'<div class="pymw-job pymw-job-{self.status}" style="display:flex;align-items:center;'
                f'gap:8px;white-space:nowrap;font-size:var(--jp-ui-font-size1,12px)">{mark} {label}'
                f'{self.bar_html()}<span class="pymw-job-text">{html.escape(text)}</span></div>')


# --- the throttle -------------------------------------------------------------------------

class Tickable(Protocol):
    def tick(self) -> bool:
        """Push what changed; False when the view no longer needs ticks."""


class Ticker:
    """One daemon thread calling ``tick()`` on its views every ``interval``
    seconds while any is registered (views are held weakly).

    :meth:`stop` ends the thread and waits for it: a script's end and a
    kernel's exit call it, since a daemon thread still drawing (matplotlib)
    while the interpreter shuts down can abort the process.  A later
    :meth:`add` starts a new thread."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self._views: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def add(self, view: Tickable) -> None:
        with self._lock:
            self._views.add(view)
            if self._thread is None:
                self._stopping = threading.Event()  # the new thread's own: stop() ends only it
                self._thread = threading.Thread(target=self._run, args=(self._stopping,),
                                                name="pymw-widgets", daemon=True)
                self._thread.start()

    def discard(self, view: Tickable) -> None:
        with self._lock:
            self._views.discard(view)

    def views(self) -> list[Any]:
        """The views registered now (those :meth:`stop` leaves behind too)."""
        with self._lock:
            return list(self._views)

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stop ticking and wait (up to ``timeout`` s) for the thread to end
        its current tick; True when no ticker thread runs any more.  Views
        stay registered but are no longer refreshed."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping.set()
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.interval):
            with self._lock:
                views = list(self._views)
                if not views:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
            for view in views:
                if stopping.is_set():
                    return
                try:
                    keep = view.tick()
                except Exception as exc:  # a broken view must not stop the others
                    warnings.warn(f"pymw-magic: widget {type(view).__name__} failed to refresh: {exc!r}",
                                  RuntimeWarning, stacklevel=1)
                    keep = False
                if not keep:
                    self.discard(view)


#: The process's ticker: every pymw widget pushes its state through it.
TICKER = Ticker()


# --- the inline job widget ---------------------------------------------------------------

_SHARED: dict[str, ipywidgets.Widget] = {}


def _shared(key: str, cls: type, **traits: Any) -> Any:
    """One instance of a layout or style per process, made on first use
    (and again if it was closed, e.g. by ``Widget.close_all()``)."""
    widget = _SHARED.get(key)
    if widget is None or getattr(widget, "comm", None) is None:
        widget = _SHARED[key] = cls(**traits)
    return widget


class JobView(ipywidgets.HBox):
    """``JobView(job)``: a one-line live view of ``job`` with a Cancel button.

    ``bar`` (an ``HTML``) holds the split bar, counts, tasks/s, elapsed and
    ETA; ``cancel_button`` cancels the job.  Once the job has ended the bar
    holds the summary line and the button is hidden.  :meth:`show` points
    the same widgets at another job (the dashboard reuses its rows).
    """

    def __init__(self, job: Job, *, name: bool = True, ticker: Ticker = TICKER, **kwargs: Any):
        self.job = job
        self._show_name = name
        # Layouts and styles are shared by every JobView (never mutated): a
        # view is 3 widget models, not 8 — a job's widget is made in ~1 ms.
        self.bar = ipywidgets.HTML(layout=_shared("bar", ipywidgets.Layout, flex="1 1 auto"),
                                   style=_shared("bar-style", HTMLStyle))
        self.cancel_button = ipywidgets.Button(
            description="Cancel", icon="stop", button_style="warning",
            tooltip=f"cancel job {job.name!r}: pending tasks are dropped, running ones stopped",
            layout=_shared("button", ipywidgets.Layout, width="auto", flex="none"),
            style=_shared("button-style", ipywidgets.ButtonStyle))
        self.cancel_button.on_click(self._on_cancel)
        kwargs.setdefault("layout", _shared("row", ipywidgets.Layout, align_items="center", width="100%"))
        super().__init__(children=(self.bar, self.cancel_button), **kwargs)
        self.add_class("pymw-jobview")
        self._lock = threading.RLock()
        self._dirty = True
        self._seen: Any = None    # the job's state last drawn
        self._ended = False
        self._ticker = ticker
        self.refresh()
        if not self._ended:
            ticker.add(self)

    def _state(self) -> tuple:
        job = self.job
        return job.progress, tuple(job.counts().values()), job.done()

    def tick(self) -> bool:
        if self._dirty or self._state() != self._seen:
            self.refresh()
        return not self._ended

    def refresh(self) -> JobSnapshot:
        """Push the job's current state now (and settle if it has ended)."""
        with self._lock:
            self._dirty = False
            self._seen = self._state()
            snap = JobSnapshot.of(self.job)
            self.bar.value = snap.html(name=self._show_name)
            if snap.status != "active" and not self._ended:
                self._settle()
            return snap

    def _settle(self) -> None:
        self._ended = True
        self._ticker.discard(self)
        self.cancel_button.disabled = True
        self.cancel_button.layout = _shared("hidden", ipywidgets.Layout, display="none")

    def show(self, job: Job) -> JobView:
        """Show ``job`` in this view from now on (its widgets reused: no new
        widget model is made); returns the view."""
        with self._lock:
            self.job = job
            self._dirty, self._seen, self._ended = True, None, False
            button = self.cancel_button
            button.description, button.disabled = "Cancel", False
            button.tooltip = f"cancel job {job.name!r}: pending tasks are dropped, running ones stopped"
            button.layout = _shared("button", ipywidgets.Layout, width="auto", flex="none")
            self.refresh()
            if not self._ended:
                self._ticker.add(self)
        return self

    def close(self) -> None:
        """Remove the widget (and stop following the job)."""
        if hasattr(self, "_ticker"):
            self._ticker.discard(self)
        for part in (getattr(self, "bar", None), getattr(self, "cancel_button", None)):
            if part is not None:   # its own (their layouts and styles are shared)
                part.close()
        super().close()

    def _on_cancel(self, _button: Any = None) -> None:
        self.cancel_button.disabled = True
        self.cancel_button.description = "Cancelling"
        self.job.cancel()
        self.refresh()

    def __repr__(self) -> str:
        return f"<JobView of job {self.job.name!r}>"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """The widget, and as text (where widgets do not render) a line of
        its own, so the cell's printed output still starts a line."""
        data = super()._repr_mimebundle_(**kwargs)
        if data is not None:
            data["text/plain"] = f"pymw job {self.job.name!r}\n"
        return data


def _widget_frontend() -> bool:
    """True in a Jupyter kernel (whose front end can show widgets); False in
    a plain script or a terminal IPython."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def job_mimebundle(job: Job, include: Any = None, exclude: Any = None) -> dict[str, Any]:
    """How a :class:`~pymw_magic.job.Job` shows itself: as a live
    :class:`JobView` in a Jupyter kernel, as its repr elsewhere (for
    ``Job._repr_mimebundle_``)."""
    if not _widget_frontend():
        return {"text/plain": repr(job)}
    return JobView(job)._repr_mimebundle_(include=include, exclude=exclude) or {"text/plain": repr(job)}


def show_progress(job: Job, *, widget: bool | None = None) -> Callable[[], None]:
    """Show ``job``'s live progress — a :class:`JobView` in a Jupyter kernel,
    a text bar (tqdm) on a terminal, nothing when stderr is not a terminal
    (a log or a captured stream: the bar would only be noise there) — and
    return the function that settles it once the job has ended (so the
    final state is shown before the cell returns)."""
    if widget is None:
        widget = _widget_frontend()
    if widget:
        from IPython.display import display
        view = JobView(job)
        display(view)
        return view.refresh
    isatty = getattr(sys.stderr, "isatty", None)
    if isatty is None or not isatty():
        return lambda: None
    from ..progress import TextProgress
    return TextProgress(job).close
