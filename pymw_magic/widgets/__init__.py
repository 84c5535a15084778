"""Notebook widgets: the inline job view, the dashboard (backend form, jobs,
task table), live sweeps, the per-worker timeline (Gantt) shared by the
simulator's reports, the tuning widget and the dashboard, and the tuner.

Each module imports ipywidgets only when a widget is built, so the timeline's
SVG can be drawn (and tested) without a frontend."""

from __future__ import annotations

__all__ = ["Timeline", "Tuner", "Dashboard", "JobView", "Sweep", "TaskTable", "BackendForm"]


def __getattr__(name: str):
    if name == "Timeline":
        from .timeline import Timeline
        return Timeline
    if name == "Tuner":
        from .tuning import Tuner
        return Tuner
    if name in ("Dashboard", "TaskTable", "BackendForm"):
        from . import dashboard
        return getattr(dashboard, name)
    if name == "JobView":
        from .jobview import JobView
        return JobView
    if name == "Sweep":
        from .sweep import Sweep
        return Sweep
    raise AttributeError(name)
