"""The per-worker timeline (Gantt chart): one row per worker or host, one bar
per task attempt, coloured by outcome.

Built from plain records — ``(row, start, end, kind)`` — so the same class
draws a simulated trace (:meth:`Timeline.from_report`) and a real job's
tasks (:meth:`Timeline.from_tasks`): the dashboard reuses it for live jobs.
``from_tasks`` reads ``task.worker``, ``started``, ``finished`` and
``state`` under the scheduler's contract: a RUNNING task has ``started``
set and ``finished`` None, and is drawn up to *now* (on the clock its
backend keeps: the wall clock, or the simulator's virtual one); a task
that ended — done, failed, or CANCELLED after it had started (stopped by a
cancel) — has both and is drawn by its outcome; a task that never started
(pending, or cancelled before it ran) has no bar.

It renders to a self-contained SVG string (no plotting library): in a
notebook it displays itself (``_repr_html_``), ``widget()`` wraps it in an
``ipywidgets.HTML`` and ``update(widget)`` redraws in place.  Rendering
stays cheap for large traces: bars closer than a pixel on a row are merged,
and beyond ``max_rows`` workers, neighbouring rows share a band (drawn
translucent, so a band is as dark as its hosts are busy).
"""

from __future__ import annotations

import html
import math
import time
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from ..simulation.report import Report

__all__ = ["Timeline", "COLORS"]

COLORS = {
    "done": "#4c78a8",
    "running": "#54a24b",
    "failed": "#e45756",
    "lost": "#f58518",
    "cancelled": "#9d9d9d",
}

_ENDED = ("done", "failed", "cancelled")  # the final states, as drawn


class Timeline:
    """``Timeline(rows, bars, t0=None, t1=None, title="")``: ``rows`` are
    the row labels (worker names), ``bars`` are ``(row index, start, end,
    kind)`` with ``kind`` one of :data:`COLORS`."""

    def __init__(self, rows: Sequence[str], bars: Iterable[tuple[int, float, float, str]], *,
                 t0: float | None = None, t1: float | None = None, title: str = "", unit: str = "s"):
        self.rows = list(rows)
        self.bars = [b for b in bars if b[2] == b[2] and b[1] == b[1]]  # drop NaN times
        starts = [b[1] for b in self.bars]
        ends = [b[2] for b in self.bars]
        self.t0 = t0 if t0 is not None else (min(starts) if starts else 0.0)
        self.t1 = t1 if t1 is not None else (max(ends) if ends else self.t0 + 1.0)
        if not self.t1 > self.t0:
            self.t1 = self.t0 + 1.0
        self.title = title
        self.unit = unit

    # --- sources ---------------------------------------------------------------------
    @classmethod
    def from_tasks(cls, tasks: Iterable[Any], *, now: float | None = None, title: str = "",
                   workers: Sequence[str] | None = None, relative: bool = True) -> "Timeline":
        """From Task records (real or simulated): attempts that ended by
        their state (``cancelled`` for a task stopped while it ran), running
        ones up to ``now`` (default: the clock the tasks are stamped with —
        their scheduler's, virtual on the simulator — else ``time.time()``).
        ``relative``: the axis starts at the earliest submission."""
        tasks = list(tasks)
        names = list(workers) if workers is not None else list(
            dict.fromkeys(t.worker for t in tasks if t.worker))
        index = {n: i for i, n in enumerate(names)}
        if now is None:
            now = _clock_of(tasks)
        bars = []
        for t in tasks:
            started = t.started
            if started is None or t.worker not in index:
                continue  # never started: nothing ran, nothing to draw
            state = getattr(t.state, "value", t.state)
            finished = t.finished
            if state == "running":
                bars.append((index[t.worker], started, max(now, started), "running"))
            elif finished is not None and state in _ENDED:
                bars.append((index[t.worker], started, max(finished, started), state))
            # pending/retrying again after a lost worker: its next run is drawn when it starts
        subs = [t.submitted for t in tasks if t.submitted is not None]
        t0 = min(subs) if subs and relative else None
        return cls(names, bars, t0=t0, title=title)

    @classmethod
    def from_report(cls, report: Report, *, title: str | None = None) -> "Timeline":
        from ..simulation.report import OUTCOMES
        bars = [(h, s, e, OUTCOMES[st]) for h, s, e, st in
                zip(report.task_host, report.task_start, report.task_end, report.task_state) if h >= 0]
        bars += [(h, s, e, kind) for _, h, s, e, kind in report.waste]
        return cls(report.hosts, bars, t0=report.t0, t1=max(report.t_end, report.t0),
                   title=report.label if title is None else title)

    # --- drawing ----------------------------------------------------------------------
    def to_svg(self, width: int = 900, height: int | None = None, max_rows: int = 150) -> str:
        """The chart as an SVG string."""
        n = max(1, len(self.rows))
        per_band = max(1, math.ceil(n / max_rows))
        bands = math.ceil(n / per_band)
        left, right, top, bottom = 110, 12, 22 if self.title else 8, 34
        if height is None:
            height = top + bottom + min(max(bands * 14, 40), 420)
        plot_w = max(10, width - left - right)
        plot_h = max(10, height - top - bottom)
        band_h = plot_h / bands
        scale = plot_w / (self.t1 - self.t0)
        t0 = self.t0
        # Merge bars less than a pixel apart on the same row and kind.
        keyed = sorted(((row, kind, (s - t0) * scale, (e - t0) * scale)
                        for row, s, e, kind in self.bars), key=lambda b: (b[0], b[1], b[2]))
        merged: list[list[Any]] = []
        for row, kind, x0, x1 in keyed:
            last = merged[-1] if merged else None
            if last is not None and last[0] == row and last[1] == kind and x0 <= last[3] + 0.75:
                if x1 > last[3]:
                    last[3] = x1
            else:
                merged.append([row, kind, x0, x1])
        opacity = "" if per_band == 1 else f' fill-opacity="{max(1.0 / per_band, 0.08):.3f}"'
        pad = 0.1 * band_h if band_h >= 4 else 0.0
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                 f'font-family="sans-serif" font-size="11" class="pymw-timeline">',
                 f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#f7f7f7"/>']
        if self.title:
            parts.append(f'<text x="{left}" y="15" font-weight="bold">{html.escape(self.title)}</text>')
        by_kind: dict[str, list[str]] = {}
        for row, kind, x0, x1 in merged:
            y = top + (row // per_band) * band_h + pad
            w = max(x1 - x0, 0.5)
            by_kind.setdefault(kind, []).append(
                f'<rect x="{left + x0:.1f}" y="{y:.2f}" width="{w:.1f}" height="{max(band_h - 2 * pad, 0.3):.2f}"/>')
        for kind, rects in by_kind.items():
            parts.append(f'<g fill="{COLORS.get(kind, "#4c78a8")}"{opacity} class="{kind}">')
            parts.extend(rects)
            parts.append("</g>")
        # row labels: every row when they fit, else a few bands
        step = max(1, math.ceil(12 / band_h))
        for b in range(0, bands, step):
            first = b * per_band
            label = self.rows[first] if first < len(self.rows) else ""
            if per_band > 1:
                last = min(first + per_band, len(self.rows)) - 1
                label = f"{label} … {self.rows[last]}" if last > first else label
            y = top + b * band_h + band_h / 2 + 4
            parts.append(f'<text x="{left - 6}" y="{y:.1f}" text-anchor="end">{html.escape(label[:18])}</text>')
        # time axis
        axis_y = top + plot_h
        parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#333"/>')
        for tick in _ticks(0.0, self.t1 - t0):
            x = left + tick * scale
            parts.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#333"/>')
            parts.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{tick:.4g}</text>')
        parts.append(f'<text x="{left + plot_w}" y="{axis_y + 30}" text-anchor="end">time ({self.unit})</text>')
        kinds = sorted({b[1] for b in merged}, key=list(COLORS).index)
        x = left
        for kind in kinds:
            parts.append(f'<rect x="{x}" y="{axis_y + 22}" width="10" height="10" fill="{COLORS[kind]}"/>'
                         f'<text x="{x + 13}" y="{axis_y + 31}">{kind}</text>')
            x += 16 + 7 * len(kind) + 10
        parts.append("</svg>")
        return "".join(parts)

    def _repr_html_(self) -> str:
        return self.to_svg()

    def widget(self, **options: Any) -> Any:
        """An ``ipywidgets.HTML`` showing the chart."""
        import ipywidgets
        return ipywidgets.HTML(self.to_svg(**options))

    def update(self, widget: Any, **options: Any) -> None:
        """Redraw into a widget made by :meth:`widget`."""
        widget.value = self.to_svg(**options)


def _clock_of(tasks: Sequence[Any]) -> float:
    """Now, on the clock ``tasks`` are stamped with: their scheduler's
    (virtual seconds on the simulator), else the wall clock."""
    for t in tasks:
        job = getattr(t, "job", None)
        if job is None:
            continue
        master = getattr(job, "master", None)
        clock = getattr(job, "_clock", None) or getattr(getattr(master, "_scheduler", None), "clock", None)
        if callable(clock):
            now = clock()
            if isinstance(now, (int, float)) and not isinstance(now, bool):
                return float(now)
        backend = getattr(master, "_backend", None)  # a backend that keeps its own clock
        now = getattr(backend, "now", None)
        if isinstance(now, (int, float)) and not isinstance(now, bool):
            return float(now)
        break
    return time.time()


def _ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    out = []
    x = first
    while x <= hi + 1e-9 * span:
        out.append(round(x, 12))
        x += step
    return out
