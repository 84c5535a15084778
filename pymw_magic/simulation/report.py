"""What a simulated (or real) job amounts to: :class:`Report`, and
:func:`compare` for a table of several.

A report is columnar — per task: host, start, end, outcome, attempts,
submitted (a task's last attempt, even a failed one); per wasted attempt
(failed and retried, or lost with its batch or its host): task, host,
start, end, kind — each attempt once — so a million-task simulation builds
one without a Task object per task.  Statistics are computed when first
read:

* ``makespan`` — from the job's arrival to the last result back;
* ``utilization`` — per host, the fraction of the makespan it computed
  (wasted attempts included: the host was busy);
* ``throughput`` — finished tasks per second of makespan;
* ``waiting`` — per task, its first start minus its submission: mean,
  median, p90, max;
* ``failures`` (failed attempts, charged to their task), ``lost``
  (attempts lost through no fault of their own: finished but lost with
  their batch, or cut by the host going down or away — re-run, not
  charged), ``retries`` (attempts beyond each task's first),
  ``failed_tasks`` (tasks that never finished);
* ``timeline()`` — the per-host Gantt chart
  (:class:`~pymw_magic.widgets.timeline.Timeline`);
* ``to_csv()`` — the whole trace, one row per attempt.

:func:`job_report` builds one for any :class:`~pymw_magic.job.Job` — a
simulated job (with the simulator's hosts, speeds and wasted attempts; it
waits for the job, virtual time costs nothing) or a real one (wall-clock
times, workers as hosts; one made while the job still runs covers what
has ended and is marked ``partial``, in its text too).
"""

from __future__ import annotations

import copy
import csv
import html
import io
import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    from ..job import Job
    from ..widgets.timeline import Timeline

__all__ = ["Report", "Comparison", "compare", "job_report", "OUTCOMES"]

#: outcome codes of the per-task column
OUTCOMES = ("done", "failed", "cancelled", "pending")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class Report:
    """The record and statistics of one job; see the module docstring."""

    def __init__(self) -> None:
        raise TypeError("use Report.from_columns(...) or job.report()")

    @classmethod
    def from_columns(cls, *, hosts: Sequence[str], speeds: Sequence[float] | None,
                     task_host: Sequence[int], task_start: Sequence[float], task_end: Sequence[float],
                     task_state: Sequence[int], task_attempts: Sequence[int],
                     waste: Sequence[tuple[int, int, float, float, str]] = (),
                     task_submitted: Sequence[float] | None = None, t0: float = 0.0,
                     t_end: float | None = None, values: Sequence[Any] | None = None,
                     label: str = "", params: dict | None = None, note: str | None = None,
                     clock: str = "virtual", final_failures: int = 0,
                     partial: str | None = None) -> "Report":
        """``waste`` holds the attempts that were not a task's last (failed
        and retried, or lost); a task's last attempt is its row in the task
        columns, even when it failed — ``final_failures`` counts those rows
        whose attempt failed (so each attempt is counted once).
        ``partial``: the report was made before the job finished; what it
        says about that (e.g. "3 of 10 tasks ended")."""
        self = object.__new__(cls)
        self.hosts = list(hosts)
        self.speeds = list(speeds) if speeds is not None else None
        self.task_host = task_host
        self.task_start = task_start
        self.task_end = task_end
        self.task_state = task_state
        self.task_attempts = task_attempts
        self.task_submitted = task_submitted
        self.waste = list(waste)
        self.final_failures = final_failures
        self.t0 = t0
        if t_end is None:
            ends = [e for e in task_end if e == e] + [w[3] for w in self.waste]
            t_end = max(ends) if ends else t0
        self.t_end = t_end
        self._values = values
        self.label = label
        self.params = dict(params or {})
        self.note = note
        self.clock = clock
        #: True when made before its job finished: the figures cover only
        #: the tasks that had ended (``partial_detail`` says how many)
        self.partial = partial is not None
        self.partial_detail = partial or ""
        self._cache: dict[str, Any] = {}
        return self

    # --- counts -------------------------------------------------------------------------
    @property
    def tasks(self) -> int:
        return len(self.task_state)

    def _count(self, code: int) -> int:
        key = f"count{code}"
        if key not in self._cache:
            self._cache[key] = sum(1 for s in self.task_state if s == code)
        return self._cache[key]

    @property
    def done(self) -> int:
        return self._count(0)

    @property
    def failed_tasks(self) -> int:
        return self._count(1)

    @property
    def failures(self) -> int:
        """Attempts that failed: those retried, and the last attempts of the
        tasks that failed for good."""
        return sum(1 for w in self.waste if w[4] == "failed") + self.final_failures

    @property
    def lost(self) -> int:
        """Attempts lost through no fault of their own — finished but lost
        with their batch, or cut by the host going offline or away (churn);
        re-run, not charged."""
        return sum(1 for w in self.waste if w[4] == "lost")

    @property
    def retries(self) -> int:
        return sum(a - 1 for a in self.task_attempts if a > 1)

    @property
    def attempts_per_task(self) -> float:
        n = sum(1 for a in self.task_attempts if a > 0)
        return sum(self.task_attempts) / n if n else math.nan

    # --- time ----------------------------------------------------------------------------
    @property
    def makespan(self) -> float:
        return self.t_end - self.t0

    @property
    def throughput(self) -> float:
        """Finished tasks per second of makespan."""
        span = self.makespan
        if span <= 0:
            return math.inf if self.done else 0.0
        return self.done / span

    @property
    def busy(self) -> list[float]:
        """Seconds each host spent computing (wasted attempts included)."""
        if "busy" not in self._cache:
            busy = [0.0] * len(self.hosts)
            for h, s, e in zip(self.task_host, self.task_start, self.task_end):
                if h >= 0 and e == e and s == s:
                    busy[h] += e - s
            for _, h, s, e, _ in self.waste:
                busy[h] += e - s
            self._cache["busy"] = busy
        return self._cache["busy"]

    @property
    def utilization(self) -> dict[str, float]:
        """Per host: the fraction of the makespan it spent computing."""
        span = self.makespan
        return {name: (b / span if span > 0 else 0.0) for name, b in zip(self.hosts, self.busy)}

    @property
    def mean_utilization(self) -> float:
        span = self.makespan
        if span <= 0 or not self.hosts:
            return 0.0
        return sum(self.busy) / (span * len(self.hosts))

    @property
    def waiting(self) -> dict[str, float]:
        """Seconds from submission to first start: mean, median, p90, max."""
        if "waiting" not in self._cache:
            first = list(self.task_start)
            for t, _, s, _, _ in self.waste:
                if not first[t] <= s:   # nan (never finished) or later
                    first[t] = s
            sub = self.task_submitted
            t0 = self.t0
            waits = sorted((f - (sub[i] if sub is not None else t0)) for i, f in enumerate(first) if f == f)
            self._cache["waiting"] = {
                "mean": sum(waits) / len(waits) if waits else math.nan,
                "median": _percentile(waits, 0.5),
                "p90": _percentile(waits, 0.9),
                "max": waits[-1] if waits else math.nan,
            }
        return self._cache["waiting"]

    @property
    def values(self) -> list[Any]:
        """Each task's result: what its function returned if the simulator
        called it, otherwise its simulated run time; None for a task that
        did not succeed (it has no result, whatever its attempt returned)."""
        if self._values is not None:
            return [v if st == 0 else None for v, st in zip(self._values, self.task_state)]
        return [e - s if st == 0 and e == e else None
                for s, e, st in zip(self.task_start, self.task_end, self.task_state)]

    # --- views -----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        w = self.waiting
        return {
            "label": self.label, "tasks": self.tasks, "hosts": len(self.hosts), "makespan": self.makespan,
            "throughput": self.throughput, "utilization": self.mean_utilization,
            "wait_mean": w["mean"], "wait_p90": w["p90"], "failures": self.failures,
            "retries": self.retries, "failed_tasks": self.failed_tasks,
        }

    def rows(self) -> Iterable[tuple[int, str, float, float, str]]:
        """The trace: (task, host, start, end, outcome), one per attempt, by start."""
        names = self.hosts
        out = [(t, names[h], s, e, k) for t, h, s, e, k in self.waste]
        for i, (h, s, e, st) in enumerate(zip(self.task_host, self.task_start, self.task_end, self.task_state)):
            if h >= 0:
                out.append((i, names[h], s, e, OUTCOMES[st]))
        out.sort(key=lambda r: (r[2], r[0]))
        return out

    def to_csv(self, path: str | None = None) -> str:
        """The trace as CSV (``task,host,start,end,outcome``); written to
        ``path`` too when given."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["task", "host", "start", "end", "outcome"])
        for t, h, s, e, k in self.rows():
            w.writerow([t, h, repr(float(s)), repr(float(e)), k])
        text = buf.getvalue()
        if path is not None:
            with open(path, "w", newline="") as f:
                f.write(text)
        return text

    def timeline(self, **options: Any) -> Timeline:
        """The per-host Gantt chart of this trace."""
        from ..widgets.timeline import Timeline
        return Timeline.from_report(self, **options)

    def __repr__(self) -> str:
        s = self.summary()
        unit = "s" if self.clock == "virtual" else "s (wall)"
        head = f" (PARTIAL: {self.partial_detail})" if self.partial else ""
        text = (f"<Report {self.label!r}{head}: {s['tasks']} tasks on {s['hosts']} hosts, makespan "
                f"{s['makespan']:.6g} {unit}, utilization {s['utilization']:.1%}, throughput "
                f"{s['throughput']:.6g}/s")
        if s["failures"] or s["failed_tasks"]:
            text += f", {s['failures']} failed attempts, {s['failed_tasks']} failed tasks"
        return text + ">"

    def _repr_html_(self) -> str:
        table = compare(self)._repr_html_()
        note = f"<p><b>note:</b> {html.escape(self.note)}</p>" if self.note else ""
        if self.partial:
            note = f"<p><b>partial report:</b> {html.escape(self.partial_detail)}</p>" + note
        return table + note + self.timeline().to_svg()


# --- comparing reports -----------------------------------------------------------------------

_COLUMNS = [
    ("label", "run", "{}"), ("tasks", "tasks", "{:,}"), ("hosts", "hosts", "{:,}"),
    ("makespan", "makespan (s)", "{:.6g}"), ("throughput", "throughput (/s)", "{:.6g}"),
    ("utilization", "utilization", "{:.1%}"), ("wait_mean", "mean wait (s)", "{:.4g}"),
    ("wait_p90", "p90 wait (s)", "{:.4g}"), ("failures", "failed attempts", "{:,}"),
    ("retries", "retries", "{:,}"), ("failed_tasks", "failed tasks", "{:,}"),
]


class Comparison:
    """A table of several reports' summaries (``str()``, HTML in a notebook,
    ``to_csv()``, ``best(metric)``)."""

    def __init__(self, reports: Sequence[Report], labels: Sequence[str] | None = None):
        self.reports = list(reports)
        self.rows = []
        for i, r in enumerate(self.reports):
            row = r.summary()
            if labels is not None:
                row["label"] = labels[i]
            elif not row["label"]:
                row["label"] = f"run {i + 1}"
            self.rows.append(row)

    def best(self, metric: str = "makespan") -> Report:
        """The report with the smallest ``metric`` (largest for
        throughput/utilization), labelled as in this table (with
        ``labels=``, a copy of it bearing the label given)."""
        sign = -1 if metric in ("throughput", "utilization") else 1
        i = min(range(len(self.rows)), key=lambda k: sign * self.rows[k][metric])
        report = self.reports[i]
        label = self.rows[i]["label"]
        if report.label != label:
            report = copy.copy(report)
            report.label = label
        return report

    def _cells(self) -> list[list[str]]:
        out = []
        for row in self.rows:
            cells = []
            for key, _, fmt in _COLUMNS:
                v = row[key]
                cells.append("-" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
            out.append(cells)
        return out

    def __str__(self) -> str:
        head = [title for _, title, _ in _COLUMNS]
        cells = self._cells()
        widths = [max(len(head[j]), *(len(c[j]) for c in cells)) if cells else len(head[j])
                  for j in range(len(head))]
        lines = ["  ".join(h.ljust(w) if j == 0 else h.rjust(w) for j, (h, w) in enumerate(zip(head, widths)))]
        for c in cells:
            lines.append("  ".join(x.ljust(w) if j == 0 else x.rjust(w)
                                   for j, (x, w) in enumerate(zip(c, widths))))
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in _COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in c) + "</tr>"
                       for c in self._cells())
        return f'<table class="pymw-report"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([k for k, _, _ in _COLUMNS])
        for row in self.rows:
            w.writerow([row[k] for k, _, _ in _COLUMNS])
        return buf.getvalue()


def compare(*reports: Report, labels: Sequence[str] | None = None) -> Comparison:
    """A table comparing reports (pass them, or one list of them)."""
    if len(reports) == 1 and isinstance(reports[0], (list, tuple)):
        reports = tuple(reports[0])
    return Comparison(reports, labels)


# --- a report of any job -------------------------------------------------------------------

_STATE_CODE = {"done": 0, "failed": 1, "cancelled": 2}


def job_report(job: Job) -> Report:
    """The report of ``job``: on the simulator, with its hosts, speeds and
    wasted attempts in virtual time (the job is waited for first: virtual
    time costs nothing); on a real backend, from the tasks' wall-clock
    records, its workers as hosts — marked partial if the job is still
    running."""
    backend = job.master.backend
    record = getattr(backend, "job_record", None)
    if record is not None:
        job.wait()
    # (read before the tasks: a job seen finished has every task final)
    partial = None if job.done() else _partial_detail(job)
    tasks = list(job.tasks)
    info = record(job) if record is not None else None
    if info is not None:
        hosts, speeds = info["hosts"], info["speeds"]
        clock = "virtual"
    else:
        hosts = list(dict.fromkeys(t.worker for t in tasks if t.worker))
        speeds = None
        clock = "wall"
    index = {name: i for i, name in enumerate(hosts)}
    nan = math.nan
    task_host, task_start, task_end, task_state = [], [], [], []
    for t in tasks:
        finished = t.finished is not None and t.started is not None and t.state.value in _STATE_CODE
        task_host.append(index.get(t.worker, -1) if finished else -1)
        task_start.append(t.started if finished else nan)
        task_end.append(t.finished if finished else nan)
        task_state.append(_STATE_CODE.get(t.state.value, 3))
    submitted = [t.submitted for t in tasks]
    if info is not None:
        waste, t0, t_end = info["waste"], info["t0"], info["t_end"]
    else:
        waste = []
        t0 = min(submitted) if submitted else 0.0
        ends = [e for e in task_end if e == e]
        t_end = max(ends) if ends else t0
    values = None
    if job.done():
        values = [t.result if t.state.value == "done" else None for t in tasks]
    return Report.from_columns(
        hosts=hosts, speeds=speeds, task_host=task_host, task_start=task_start, task_end=task_end,
        task_state=task_state, task_attempts=[t.attempts for t in tasks], waste=waste,
        task_submitted=submitted, t0=t0, t_end=t_end, values=values, label=job.name,
        params=dict(job.master.options), clock=clock, note=info.get("note") if info else None,
        final_failures=info.get("final_failures", 0) if info else 0, partial=partial)


def _partial_detail(job: Job) -> str:
    ended, total = job.progress
    of = f"{ended} of {total} tasks" if total is not None else f"{ended} tasks (of a total not known yet)"
    return f"made while the job was still running: {of} had ended; job.report() waits for the job"
