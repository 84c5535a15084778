"""Live parameter sweeps: ``pymw_magic.sweep(fn, over=..., **sliders)`` and
``%pymw sweep``.

This module owns :class:`Sweep`: controls bound to ``fn``'s keyword
parameters (built from abbreviations the way ``ipywidgets.interact`` does:
``(lo, hi[, step])`` is a slider, a list a dropdown, or pass a widget).
Each change of a control runs ``fn(item, **params)`` for every ``item`` of
``over`` as one job on the kernel's current backend (or the ``master``
given); results stream into the plot as tasks finish (redrawn by the
shared ticker, at most 4 times a second); a newer change drops the stale
job's pending tasks (its running ones finish, their results unused).

The plot is drawn with matplotlib's Agg canvas into an ``ipywidgets.Image``
(safe from the ticker's thread; matplotlib comes with the ``plot`` extra);
without matplotlib a text summary is shown.
"""

from __future__ import annotations

import functools
import html
import io
import math
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import ipywidgets

from ..task import DONE
from .dashboard import current_master
from .jobview import TICKER, JobView, Ticker

if TYPE_CHECKING:
    from ..job import Job
    from ..master import Master

__all__ = ["Sweep", "sweep", "histogram", "sweep_magic"]

PlotFn = Callable[[Any, list, dict], None]


def histogram(ax: Any, results: list, params: dict) -> None:
    """The default plot: a histogram of numeric results (else their count)."""
    values = [r for r in results if isinstance(r, (int, float)) and math.isfinite(r)]
    if values:
        ax.hist(values, bins=min(30, max(5, len(values) // 5)), color="#4c78a8")
    ax.set_xlabel("result")
    ax.set_ylabel("tasks")


def _control(name: str, abbrev: Any) -> ipywidgets.ValueWidget:
    if isinstance(abbrev, ipywidgets.ValueWidget):
        widget = abbrev
    else:
        widget = ipywidgets.interactive.widget_from_abbrev(abbrev, ipywidgets.interaction.empty)
        if widget is None:
            raise ValueError(f"sweep: cannot make a control for {name}={abbrev!r}; give (lo, hi[, step]), "
                             "a list of choices, or a widget")
    if not widget.description:
        widget.description = name
    if "continuous_update" in widget.trait_names():
        widget.continuous_update = False  # one job per release, not per pixel dragged
    return widget


def _drop_pending(job: Job) -> int:
    """Cancel ``job``'s tasks that have not started — those still queued and
    those sent ahead to a worker, which skips them — and let the running
    ones (one batch a worker at most) finish: stopping their workers costs
    more than a sweep that moves on saves."""
    return job.cancel(stop_running=False)


class Sweep(ipywidgets.VBox):
    """Controls, the current job's progress, and the plot of its results.

    ``controls`` maps a parameter name to its widget; ``runs`` lists
    ``(params, job)`` per change, newest last; ``job`` is the current one;
    ``image`` shows the plot (``summary`` the text line).
    """

    def __init__(self, fn: Callable[..., Any], over: Iterable[Any], *, master: Master | None = None,
                 plot: PlotFn = histogram, chunksize: int | None = None, ticker: Ticker = TICKER,
                 **sliders: Any):
        if not sliders:
            raise ValueError("sweep: give at least one parameter to vary, e.g. rate=(0.0, 1.0)")
        self.fn = fn
        self.over: Sequence[Any] = list(over)
        self.plot = plot
        self.chunksize = chunksize
        self._master = master
        self._ticker = ticker
        self.controls = {name: _control(name, abbrev) for name, abbrev in sliders.items()}
        self.runs: list[tuple[dict[str, Any], Job]] = []
        self.progress = ipywidgets.VBox()
        self.summary = ipywidgets.HTML()
        self.image = ipywidgets.Image(format="png", layout=ipywidgets.Layout(width="480px"))
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.image.layout.display = "none"
        self._lock = threading.RLock()
        self._dirty = False
        self._shown: tuple[int, int] | None = None  # (job id, results drawn)
        self._subs: dict[int, Any] = {}               # id(master) -> Subscription
        super().__init__(children=(ipywidgets.HBox(tuple(self.controls.values())), self.progress,
                                   self.summary, self.image))
        self.add_class("pymw-sweep")
        for widget in self.controls.values():
            widget.observe(lambda _c: self.run(), names="value")
        self.run()
        ticker.add(self)

    @property
    def job(self) -> Job | None:
        return self.runs[-1][1] if self.runs else None

    @property
    def params(self) -> dict[str, Any]:
        return {name: w.value for name, w in self.controls.items()}

    def run(self) -> Job:
        """Start a job for the controls' current values; the stale job's
        pending tasks are dropped."""
        with self._lock:
            stale = self.job
            if stale is not None and not stale.done():
                _drop_pending(stale)
            params = self.params
            master = self._master or current_master()
            name = "sweep " + ", ".join(f"{k}={v!r}" for k, v in params.items())
            job = master.map_async(functools.partial(self.fn, **params), self.over, name=name,
                                   chunksize=self.chunksize)
            self.runs.append((params, job))
            if id(master) not in self._subs:
                self._subs[id(master)] = master.events.subscribe(self._on_event)
            self.progress.children = (JobView(job, ticker=self._ticker),)
            self._dirty = True  # drawn by the ticker: a slider's callback returns at once
            return job

    def _on_event(self, event: Any) -> None:
        job = getattr(event, "job", None)
        if job is not None and job is self.job:
            self._dirty = True

    def results(self) -> list[Any]:
        """The current job's results so far, in input order."""
        job = self.job
        return [t.result for t in list(job.tasks) if t.state is DONE] if job is not None else []

    def tick(self) -> bool:
        if self._dirty:
            self.refresh()
        return True

    def refresh(self) -> None:
        """Redraw the plot and summary from the current job's results."""
        with self._lock:
            self._dirty = False
            if not self.runs:
                return
            params, job = self.runs[-1]
            results = self.results()
            if self._shown == (job.id, len(results)):
                return
            self._shown = (job.id, len(results))
            values = [r for r in results if isinstance(r, (int, float))]
            stats = ""
            if values:
                mean = sum(values) / len(values)
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                stats = f" \u00b7 mean {mean:.4g} \u00b1 {sd:.3g}"
            label = ", ".join(f"{k}={v!r}" for k, v in params.items())
            self.summary.value = (f"<span class='pymw-sweep-summary'>{html.escape(label)}: "
                                  f"{len(results)}/{len(self.over)} results{html.escape(stats)}</span>")
            if self.image.layout.display != "none":
                self.image.value = self._draw(results, params, label)

    def _draw(self, results: list, params: dict, label: str) -> bytes:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        fig = Figure(figsize=(4.8, 3.0), dpi=80)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        self.plot(ax, results, params)
        ax.set_title(f"{label} ({len(results)}/{len(self.over)})", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def close(self) -> None:
        if not hasattr(self, "_subs"):  # construction failed (ipywidgets closes on __del__)
            return super().close()
        self._ticker.discard(self)
        for sub in self._subs.values():
            sub.close()
        job = self.job
        if job is not None:
            if not job.done():
                _drop_pending(job)
        super().close()


def sweep(fn: Callable[..., Any], over: Iterable[Any], *, master: Master | None = None,
          plot: PlotFn = histogram, chunksize: int | None = None, **sliders: Any) -> Sweep:
    """A live sweep: ``fn(item, **params)`` over ``over`` for each setting
    of the controls built from ``sliders`` (see :class:`Sweep`)."""
    return Sweep(fn, over, master=master, plot=plot, chunksize=chunksize, **sliders)


def sweep_magic(namespace: dict[str, Any], args: str) -> Sweep:
    """``%pymw sweep FN, over=EXPR, NAME=CONTROL, ...``: the arguments of
    :func:`sweep`, evaluated in the notebook's namespace."""
    if not args.strip():
        raise ValueError("usage: %pymw sweep FN, over=EXPR, NAME=(LO, HI[, STEP]), ...")
    return eval(f"__pymw_sweep__({args})", dict(namespace, __pymw_sweep__=sweep))  # noqa: S307
