"""The Backend protocol and the option declarations every front end reads.

A backend owns *where* tasks run; the scheduler owns *which* tasks and
their states.  A backend is constructed with the master's scheduler, the
number of workers (which it settled itself, :meth:`Backend.settle_workers`,
before the scheduler was made), the master's signing key and its own
declared options; the master then connects it to the scheduler through the
hooks it declares (:meth:`Backend.scheduler_hooks`: stop workers, skip
tasks, shared fate, a clock, a queue wrapper) and ``start()``-s it.  It
must eventually call ``scheduler.completed`` or ``scheduler.lost`` for
every batch it ``take``-s, honour ``stop_workers``, and leave no process
behind after ``shutdown()``.  Pool and batch backends alike use only the
scheduler's public methods; none sets the scheduler's attributes.

Batch-family backends (``family = "batch"``, ``batch.py``) hand whole
jobs to an external engine: they set :attr:`Backend.job_window`, and add
what re-attaching needs (``adopt``, ``reconnect_options``,
``remove_stored``); their jobs outlive the process (``Master.detach``).

Options are declared, not parsed ad hoc: ``options`` maps a name to an
:class:`Option`, and the magics, the dashboard's form and
``Master(**backend_options)`` all validate against the same declaration.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

from ..scheduler import Scheduler, SchedulerHooks
from ..task import wait_slice


@dataclass(frozen=True)
class Option:
    """One option a backend (or the master) accepts."""
    name: str
    type: Callable[[Any], Any]
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = field(default=None, compare=False)
    requirement: str = ""   # said when ``check`` fails, e.g. "a whole number >= 1"
    #: values a form offers (a dropdown) without refusing others (the policy's names)
    suggestions: tuple | None = None

    def convert(self, value: Any) -> Any:
        """``value`` (a string from a magic, or a Python value) as this option's
        type; ValueError with the valid choices when it is not one."""
        if value is None and self.default is None:
            return None
        if self.type is bool:
            return _to_bool(self.name, value)
        if self.type in (int, float) and isinstance(value, bool):
            # (int(True) is 1: a flag given where a number belongs is a mistake, not a 1)
            raise ValueError(f"option {self.name!r} expects {self.requirement or _kind(self.type)}, not "
                             f"{value!r} (type bool)")
        if self.type is str and not isinstance(value, str):
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str):
                # (kept as it was, it fails later as a bare TypeError deep in the backend)
                raise ValueError(f"option {self.name!r} expects {self.requirement or 'a string'}, not "
                                 f"{_shown(value)} (type {type(value).__name__})")
        try:
            out = self.type(value) if isinstance(value, str) or self.type in (int, float) else value
        except (TypeError, ValueError, OverflowError) as exc:
            if self.requirement or self.type in (int, float, str) or not str(exc):
                raise ValueError(f"option {self.name!r}: {value!r} is not "
                                 f"{self.requirement or self.type.__name__}") from None
            raise ValueError(f"option {self.name!r}: {exc}") from None  # a converter's own words
        if self.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"option {self.name!r}: {value!r} is not a whole number")
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"option {self.name!r}: {value!r} is not one of {', '.join(map(str, self.choices))}")
        if self.check is not None and not self.check(out):
            raise ValueError(f"option {self.name!r}: {value!r} is not {self.requirement}")
        return out


def _kind(t: Any) -> str:
    return {int: "a whole number", float: "a number", str: "a string"}.get(t, getattr(t, "__name__", str(t)))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"option {name!r}: {value!r} is not true or false")


def _positive_or_none(x: Any) -> float | None:
    return None if x in (None, "", "none", "None") else float(x)


def _retries(x: Any) -> float | int:
    """A whole number, or infinity ("inf": retry for ever)."""
    if isinstance(x, str) and x.strip().lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(x, float) and math.isinf(x):
        return x
    value = float(x) if isinstance(x, str) else x
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(x)
    return int(value)


def master_options() -> dict[str, Option]:
    """Options every master takes, whatever its backend."""
    from ..policies import policy_names, policy_option
    return {
        "workers": Option("workers", int, None, "number of workers (default: the machine's cores)",
                          check=lambda n: n >= 1, requirement="a whole number >= 1"),
        "policy": Option("policy", policy_option, "fifo",
                         "scheduling policy: a name, or a Policy / scheduler_func of the notebook",
                         suggestions=tuple(policy_names())),
        "retries": Option("retries", _retries, 1, "times a task is re-run after its worker is lost",
                          check=lambda n: not isinstance(n, bool) and n >= 0
                          and (math.isinf(n) or float(n).is_integer()),
                          requirement="a whole number >= 0, or inf"),
        "timeout": Option("timeout", _positive_or_none, None, "seconds a task may run before it is stopped",
                          check=lambda t: t is None or t > 0, requirement="a number of seconds > 0"),
    }


def worker_env() -> dict[str, str]:
    """The environment for worker processes on this machine: ours, plus our
    sys.path so workers import what the master imports (modules beside a
    notebook, a test directory)."""
    env = dict(os.environ)
    paths = [os.getcwd() if p == "" else p for p in sys.path]
    env["PYMW_SYS_PATH"] = os.pathsep.join(p for p in paths if p)
    return env


class Backend(ABC):
    #: the name users select it by (``Master("local")``, ``%pymw use local``)
    name: ClassVar[str]
    #: "pool" (long-lived workers, policy-driven) or "batch" (external scheduler)
    family: ClassVar[str] = "pool"
    #: the backend's own options, beyond :func:`master_options`
    options: ClassVar[dict[str, Option]] = {}
    #: how many unfinished tasks of one job may exist at once (None: the
    #: scheduler's rule, a few batches per worker); a batch backend hands
    #: its engine a whole job at once, so it sets a large bound
    job_window: ClassVar[int | None] = None

    def __init__(self, scheduler: Scheduler, workers: int, key: bytes, **options: Any):
        self.scheduler = scheduler
        #: as settled by :meth:`settle_workers` (the scheduler has the same)
        self.workers = workers
        self.key = key

    @classmethod
    def settle_workers(cls, requested: int | None, options: dict[str, Any]) -> int:
        """How many workers a master with these options gets, asked once
        before the scheduler is made (``requested`` None: the default).  A
        backend whose count is fixed from outside (MPI under ``mpiexec``:
        the run's ranks) answers that."""
        return cls.default_workers() if requested is None else requested

    def scheduler_hooks(self) -> SchedulerHooks:
        """What this backend gives the scheduler (``Scheduler.connect``):
        the master passes it on once, after the backend is made, and the
        backend sets nothing on the scheduler itself."""
        return SchedulerHooks(stop_workers=self.stop_workers)

    @classmethod
    def cannot_stop_tasks(cls) -> str | None:
        """Why a running task cannot be stopped here (so ``timeout=`` cannot
        be honoured), or None: asked before the backend is made."""
        return None

    @classmethod
    def default_workers(cls) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @abstractmethod
    def start(self) -> None:
        """Begin serving the scheduler (without blocking on worker start-up)."""

    @abstractmethod
    def shutdown(self, wait: bool = True) -> None:
        """Stop every worker; with ``wait``, until their processes are gone."""

    @abstractmethod
    def stop_workers(self, names: set[str]) -> None:
        """Stop the named workers now (their running tasks were cancelled);
        the backend replaces them."""

    @abstractmethod
    def worker_info(self) -> list[dict[str, Any]]:
        """One dict per live worker: at least ``name``; ``pid``, ``host`` where known."""


def join_threads(threads: Iterable[threading.Thread], wait: bool) -> None:
    """Join a backend's threads, all but the calling one: without limit if
    ``wait`` (in slices on the main thread, so that a Ctrl-C is never held
    back: see ``task.wait_slice``), otherwise for at most 5 s each."""
    me = threading.current_thread()
    for thread in threads:
        if thread is me:
            continue
        if not wait:
            thread.join(5)
            continue
        while thread.is_alive():
            thread.join(wait_slice(None))
