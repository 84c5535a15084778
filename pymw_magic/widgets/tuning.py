"""The simulation tuning widget: sliders over the platform and the policy,
each change re-running the simulator and redrawing makespan, utilisation
and the timeline.

``pymw_magic.tune(fn, items, duration=...)`` (or ``%pymw tune``) returns a
:class:`Tuner`.  The workload — each task's work at speed 1 — is computed
once (a duration model, PyMW's convention, or a synthetic ``work``
distribution); every change then runs :func:`pymw_magic.simulate` on it
with the controls' values:

=================  ============================================================
hosts              number of hosts
speed spread       σ of ``lognormal:1,σ`` host speeds (0: identical hosts)
availability       long-run fraction of time a host is up (``onoff`` with mean
                   up time ``uptime``; 1: always up).  ``tune(availability=)``
                   takes that fraction or, as ``Master("simulator")`` does, a
                   spec: ``onoff:UP,DOWN`` sets the slider (and ``uptime``);
                   ``always`` is 1; ``periodic:UP,DOWN`` or a trace file is
                   used as given, the slider then disabled
failure rate       probability that a task attempt fails (then it is retried)
policy             any registered policy (``fifo``, ``longest-first``, ...)
chunk              tasks per dispatch (0: adaptive)
seed               the random draws (same seed, same trace)
=================  ============================================================

What you found is deployed with ``tuner.deploy("local", workers=...)`` (a
Master with the chosen policy) or by passing ``tuner.policy`` and
``tuner.chunksize`` yourself.  ``tuner.history`` keeps the last reports;
``tuner.compare()`` tabulates them.
"""

from __future__ import annotations

import html
import random
import time
from typing import Any, Callable, Iterable

from ..policies import policy_names
from ..simulation.engine import simulate
from ..simulation.models import DurationModel, ModelError, check_availability, check_churn, draw, iter_args
from ..simulation.report import Comparison, Report, compare

__all__ = ["Tuner", "tune"]


def _work(w: float) -> float:
    """The duration model of a precomputed workload: each item is its work."""
    return w


def availability_setting(value: Any) -> tuple[float, float | None, Any]:
    """``availability`` as the tuner takes it — a fraction of time up, or an
    availability spec — as (slider fraction, mean up time or None, spec
    used as given or None).  ValueError when it is neither."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                spec = check_availability(text)
            except ModelError as exc:
                raise ValueError(f"availability: {value!r} is neither a fraction of time up in (0, 1] nor "
                                 f"an availability spec ({exc})") from None
            if spec == "always":
                return 1.0, None, None
            kind, _, rest = text.partition(":")
            if kind.lower() in ("onoff", "periodic"):
                up, down = (float(p) for p in rest.split(","))
                fraction = up / (up + down)
                if kind.lower() == "onoff" and fraction >= 0.1:
                    return fraction, up, None
                return fraction, None, text
            return 1.0, None, text          # a trace file
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"availability: {value!r} is not a fraction of time up in (0, 1] "
                         "(or a spec: always, onoff:UP,DOWN, periodic:UP,DOWN, a trace file)")
    return float(value), None, None


def _in_range(name: str, value: Any, low: float, high: float) -> None:
    """ValueError unless ``value`` is a number in [low, high] (the range of
    ``name``'s control)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}: {value!r} is outside the tuner's range for it, [{low:g}, {high:g}]")


class Tuner:
    """See the module docstring.  Build with :func:`tune`."""

    def __init__(self, fn: Callable | None = None, items: Iterable[Any] | None = None, *,
                 duration: Any = None, tasks: int = 1000, work: Any = "uniform:0.5,1.5",
                 hosts: int = 50, spread: float = 0.0, availability: Any = 1.0,
                 uptime: float | None = None, failure_rate: float = 0.0, policy: str = "fifo",
                 chunksize: int = 0, seed: int = 0, retries: int = 10, star: bool = False,
                 max_hosts: int | None = None, width: int = 900, history: int = 20,
                 churn: Any = None):
        #: what length-ordering policies deployed elsewhere use as their estimate
        self.estimate: Callable[..., float] | None = None
        if items is not None:
            model = DurationModel(duration, fn)
            if model.kind in ("model", "pymw"):
                call = model.call
                self.estimate = (lambda *args: call(*args, host=None)) if model.host_aware else call
            self.works = [model.evaluate(args, None, None)[0] for args in iter_args(items, star)]
        else:
            self.works = draw(work, int(tasks), random.Random(f"{seed}:work"), "work", allow_min=True)
        if not self.works:
            raise ValueError("tune: there are no tasks to simulate")
        mean = sum(self.works) / len(self.works)
        availability, spec_uptime, self.fixed_availability = availability_setting(availability)
        if uptime is not None and (isinstance(uptime, bool) or not 0 < float(uptime) < float("inf")):
            raise ValueError(f"uptime: {uptime!r} is not a host's mean up time in seconds > 0")
        if uptime is None:
            uptime = spec_uptime
        self.uptime = float(uptime) if uptime is not None else max(20.0 * mean, 1e-9)
        #: mean host lifetime (churn), fixed for the tuner's runs (None: hosts stay)
        self.churn = check_churn(churn)
        self.retries = retries
        self.width = width
        self.keep = history
        self.history: list[Report] = []
        self.report: Report | None = None
        self.seconds = 0.0
        import ipywidgets as w

        top = max_hosts or max(4 * hosts, 64)
        # A slider clamps a value outside its range without a word: the
        # tuner would simulate another platform than the one asked for.
        _in_range("hosts", hosts, 1, top)
        _in_range("spread", spread, 0.0, 1.5)
        if self.fixed_availability is None:
            _in_range("availability", availability, 0.1, 1.0)
        _in_range("failure_rate", failure_rate, 0.0, 0.5)
        _in_range("chunksize", chunksize, 0, 64)
        if policy not in policy_names():
            raise ValueError(f"policy: {policy!r} is not one the tuner offers: {', '.join(policy_names())} "
                             "(a notebook's own policy can be compared with pymw_magic.simulate)")
        style = {"description_width": "110px"}
        layout = w.Layout(width="420px")
        self.controls = {
            "hosts": w.IntSlider(value=hosts, min=1, max=top, description="hosts", style=style, layout=layout,
                                 continuous_update=False),
            "spread": w.FloatSlider(value=spread, min=0.0, max=1.5, step=0.05, description="speed spread σ",
                                    style=style, layout=layout, continuous_update=False),
            "availability": w.FloatSlider(value=availability, min=0.1, max=1.0, step=0.05,
                                          description="availability", style=style, layout=layout,
                                          continuous_update=False),
            "failure_rate": w.FloatSlider(value=failure_rate, min=0.0, max=0.5, step=0.01,
                                          description="failure rate", style=style, layout=layout,
                                          continuous_update=False),
            "policy": w.Dropdown(value=policy, options=policy_names(), description="policy", style=style,
                                 layout=layout),
            "chunksize": w.IntSlider(value=chunksize, min=0, max=64, description="chunk (0=auto)", style=style,
                                     layout=layout, continuous_update=False),
            "seed": w.IntText(value=seed, description="seed", style=style, layout=layout),
        }
        if self.fixed_availability is not None:
            self.controls["availability"].disabled = True
            self.controls["availability"].description = "availability (fixed)"
        self.summary = w.HTML()
        self.chart = w.HTML()
        for control in self.controls.values():
            control.observe(self.update, names="value")
        left = list(self.controls.values())
        self.widget = w.VBox([w.HBox([w.VBox(left[:4]), w.VBox(left[4:])]), self.summary, self.chart])
        self.update()

    # --- what the controls say ---------------------------------------------------------
    def value(self, name: str) -> Any:
        return self.controls[name].value

    def set(self, **values: Any) -> Report:
        """Set several controls as a user would, then re-run once."""
        unknown = set(values) - set(self.controls)
        if unknown:
            raise ValueError(f"unknown control(s) {', '.join(sorted(unknown))}; controls: {', '.join(self.controls)}")
        for name, v in values.items():
            control = self.controls[name]
            control.unobserve(self.update, names="value")
            try:
                control.value = v
            finally:
                control.observe(self.update, names="value")
        return self.update()

    @property
    def policy(self) -> str:
        return self.value("policy")

    @property
    def chunksize(self) -> int | None:
        return self.value("chunksize") or None

    def options(self) -> dict[str, Any]:
        """The simulator options the controls stand for."""
        spread = self.value("spread")
        a = self.value("availability")
        if self.fixed_availability is not None:
            availability = self.fixed_availability
        elif a >= 1.0:
            availability = "always"
        else:
            availability = f"onoff:{self.uptime:g},{self.uptime * (1 - a) / a:g}"
        return {
            "hosts": self.value("hosts"),
            "speeds": f"lognormal:1,{spread:g}" if spread > 0 else 1.0,
            "availability": availability,
            "failure_rate": self.value("failure_rate"),
            "policy": self.policy,
            "chunksize": self.chunksize,
            "seed": self.value("seed"),
            "retries": self.retries,
            "churn": self.churn,
        }

    # --- running ---------------------------------------------------------------------
    def run(self) -> Report:
        """Simulate with the current controls (no redraw)."""
        opts = self.options()
        label = f"{opts['policy']}, {opts['hosts']} hosts"
        return simulate(_work, self.works, duration=_work, label=label, keep_values=False, **opts)

    def update(self, change: Any = None) -> Report:
        """Re-run and redraw; ``seconds`` is what it took."""
        t0 = time.perf_counter()
        report = self.run()
        self.report = report
        self.history = (self.history + [report])[-self.keep:]
        self.summary.value = self._summary_html(report)
        self.chart.value = report.timeline(title="").to_svg(width=self.width, max_rows=120)
        self.seconds = time.perf_counter() - t0
        return report

    def compare(self) -> Comparison:
        """The reports of the last changes, side by side."""
        return compare(self.history)

    def make_policy(self) -> Any:
        """A fresh instance of the chosen policy; a length-ordering one gets
        the workload's duration model as its estimate."""
        from ..policies import LongestFirst, ShortestFirst, make_policy
        policy = make_policy(self.policy)
        if self.estimate is not None and isinstance(policy, (LongestFirst, ShortestFirst)):
            policy = type(policy)(estimate=self.estimate)
        return policy

    def deploy(self, backend: str = "local", **options: Any) -> Any:
        """A Master on ``backend`` with the chosen policy (pass ``chunksize=
        tuner.chunksize`` to its map calls)."""
        from ..master import Master
        return Master(backend, policy=self.make_policy(), **options)

    def _summary_html(self, r: Report) -> str:
        w = r.waiting
        items = [("makespan", f"{r.makespan:.4g} s"), ("utilization", f"{r.mean_utilization:.1%}"),
                 ("throughput", f"{r.throughput:.4g} tasks/s"), ("mean wait", f"{w['mean']:.4g} s"),
                 ("failed attempts", f"{r.failures:,}"), ("retries", f"{r.retries:,}"),
                 ("tasks", f"{r.tasks:,}")]
        if r.failed_tasks:
            items.append(("failed tasks", f"{r.failed_tasks:,}"))
        cells = "".join(f"<td style='padding:2px 12px'><b>{html.escape(k)}</b><br>{html.escape(v)}</td>"
                        for k, v in items)
        return f"<table class='pymw-tune'><tr>{cells}</tr></table>"

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)

    def __repr__(self) -> str:
        return f"<Tuner {len(self.works)} tasks: {self.report!r}>"


def tune(fn: Callable | None = None, items: Iterable[Any] | None = None, **options: Any) -> Tuner:
    """The tuning widget over ``fn`` and ``items`` (with ``duration=`` as
    in :func:`pymw_magic.simulate`), or over ``tasks`` synthetic tasks of
    ``work`` seconds (a number or ``uniform:A,B`` / ``lognormal:M,S``).
    See :class:`Tuner` for the controls and their initial values."""
    return Tuner(fn, items, **options)
