"""What a front end holds: its masters and their jobs.

This module owns the :class:`Session` — the default master (``%pymw use``,
or made by the first plain cell), the masters cached per configuration for
cells that ask for another one, the jobs of every live master, and shutting
them down — and the little every front end shows of a job (its tasks'
output in input order, a task's input, a master in one line).  The magics,
the exported script's run time and the dashboard use it; it imports no
IPython, so any front end can.

Which session belongs to which IPython shell is kept here too
(:func:`attach`, :func:`of`): the widgets find the kernel's session
without importing the magics.

Its layer: what front ends share (the layers are drawn in ``pymw_magic/__init__.py``
and docs/architecture.md).
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable, Iterable, Mapping

import cloudpickle

from .errors import PayloadError, PymwError
from .options import DEFAULT_BACKEND, JOB_LEVEL, OptionError, backend_options, master_options
from .payload import PROTOCOL, type_name
from .policies import is_policy_like, policy_names

__all__ = [
    "Session", "attach", "detach", "of", "describe_input", "master_text", "counts_text", "job_state",
    "print_task_output", "check_map_items", "stop_widgets", "reattach_module", "attach_stored", "remove_stored",
]


def _say(text: str) -> None:
    print(text, flush=True)


class Session:
    """The masters of one front end: the default one (``%pymw use``, or made
    by the first plain cell) and those made for cells that asked for
    another configuration, kept for the next cell that asks the same.

    ``say`` shows the session's notices (a replaced master that keeps
    running its jobs); the magics print them, a script writes them to stderr.
    """

    def __init__(self, master_factory: Callable[..., Any] | None = None, *,
                 say: Callable[[str], None] | None = None):
        self._factory = master_factory
        self._say = say or _say
        self.default: Any | None = None
        self.masters: list[Any] = []   # the default first, when there is one
        #: the master of the job ``%pymw attach`` followed last (what the
        #: JupyterLab status bar shows when there is no default)
        self.attached: Any | None = None
        #: replaced defaults still running jobs; each is shut down when they end
        self.retiring: list[Any] = []
        self._lock = threading.Lock()
        # The policy each master was given when it was not a registered name
        # (a notebook function, class or instance): a master's options keep
        # only its name, which cannot make another master.
        self._policies: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def _make(self, backend: str, options: Mapping[str, Any]) -> Any:
        factory = self._factory
        if factory is None:
            from .master import Master
            factory = Master
        spec = options.get("policy")
        if is_policy_like(spec) and any(given is spec and not getattr(m, "closed", False)
                                        for m, given in list(self._policies.items())):
            # One instance queues one master's tasks (a copy would take the
            # other's queued tasks along): another master gets a fresh one.
            options = dict(options, policy=self._fresh_policy(spec))
        master = factory(backend=backend, **options)
        if self._factory is None:
            from . import store
            if not store.WIRED:  # a master module without the new-master hook: record it here
                store.record(master)
        if spec is not None and not isinstance(spec, str):
            try:
                self._policies[master] = spec
            except TypeError:  # a factory's master that takes no weak reference
                pass
        return master

    @staticmethod
    def _fresh_policy(spec: Any) -> Any:
        """A policy like the instance ``spec`` for another master: by its
        registered name, else a new instance of its class."""
        name = getattr(spec, "name", None)
        if isinstance(name, str) and name in policy_names():
            return name
        try:
            return type(spec)()
        except TypeError:
            shown = type(spec).__name__
            raise OptionError(
                f"the policy object (a {shown} instance) queues the tasks of a master that is still "
                f"running, and {shown}() cannot make another: a cell asking for another configuration "
                "needs a policy of its own; give the cell --policy with a name, a policy class or a "
                "scheduler_func") from None

    def config(self, master: Any) -> dict[str, Any]:
        """``master``'s options as a cell's are compared with them and built
        on: its policy as it was given (a notebook function, not its name)."""
        options = dict(master.options)
        try:
            spec = self._policies.get(master)
        except TypeError:
            spec = None
        if spec is not None:
            options["policy"] = spec
        return options

    def use(self, backend: str, options: Mapping[str, Any]) -> Any:
        """Make a new master the default.  The one it replaces takes no new
        job; it is shut down now when it is idle, else once the jobs it runs
        have ended (never cancelled for it): the session says so.  When the
        new master cannot be made, the old one stays the default."""
        # The new master first: when it cannot be made (a trace file that
        # does not parse, a backend that does not start), the old default
        # stays the default, with its workers and jobs.
        master = self._make(backend, options)
        if self.default is not None:
            old, self.default = self.default, None
            self._retire(old)
        self.default = master
        self.masters.insert(0, master)
        return master

    def _retire(self, master: Any) -> None:
        active = [job for job in list(master.jobs) if not job.done()]
        if not active:
            self._shutdown(master)
            return
        if master in self.masters:
            self.masters.remove(master)
        with self._lock:
            self.retiring.append(master)
        shown = ", ".join(f"{job.name!r} ({job.counts().get('done', 0)} of {len(job.tasks)} done)"
                          for job in active)
        self._say(f"pymw: the previous default master keeps running job{'s' if len(active) > 1 else ''} "
                  f"{shown}; it shuts down when {'they end' if len(active) > 1 else 'it ends'}")
        threading.Thread(target=self._shutdown_when_done, args=(master, active), daemon=True,
                         name="pymw-retire").start()

    def _shutdown_when_done(self, master: Any, jobs: list[Any]) -> None:
        for job in jobs:
            job.wait()
        with self._lock:
            if master not in self.retiring:  # shutdown_all took it meanwhile
                return
            self.retiring.remove(master)
        master.shutdown(wait=True)

    def default_backend(self) -> str:
        return self.default.backend_name if self.default is not None else DEFAULT_BACKEND

    def wanted(self, backend: str | None, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The full configuration a cell asks for: its options on top of
        the default master's (or, for another backend or no default yet, on
        top of the declared defaults).  Job-level options are not part of it."""
        backend = backend or self.default_backend()
        base: dict[str, Any]
        if self.default is not None and backend == self.default.backend_name:
            base = self.config(self.default)
        else:
            from .backends import get_backend
            cls = get_backend(backend)
            base = {name: opt.default for name, opt in master_options().items()}
            base.update({name: opt.default for name, opt in backend_options(backend).items()})
            base["workers"] = cls.default_workers()
        for key in JOB_LEVEL:
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
            config = self.config(master)
            if master.backend_name == backend and all(config.get(k) == v for k, v in wanted.items()):
                return master
        master = self._make(backend, {k: v for k, v in wanted.items() if v is not None})
        self.masters.append(master)
        return master

    def all_jobs(self) -> list[tuple[Any, Any]]:
        """(master, job) of every master of the session, retiring ones included."""
        with self._lock:
            retiring = list(self.retiring)
        return [(m, job) for m in self.masters + retiring for job in list(m.jobs)]

    def _shutdown(self, master: Any) -> None:
        if master in self.masters:
            self.masters.remove(master)
        # Cancel what has not run and stop what runs: unloading or leaving
        # must not leave workers (or a long wait) behind.
        if getattr(getattr(master, "backend", None), "family", None) == "batch":
            # A batch job outlives its kernel: its procs go on in the queue
            # and a later attach collects them; cancelling would remove them.
            master.detach()
            return
        master.shutdown(wait=True, cancel_futures=True)

    def shutdown_all(self) -> None:
        """Shut every master down, retiring ones included (their jobs cancelled;
        a batch master is detached: its jobs go on in their queue)."""
        errors = []
        self.default = None
        self.attached = None
        with self._lock:
            retiring, self.retiring = self.retiring, []
        for master in list(self.masters) + retiring:
            try:
                self._shutdown(master)
            except Exception as exc:  # shut the others down all the same
                errors.append(exc)
        if errors:
            raise errors[0]


# --- the session of each IPython shell ------------------------------------------------------

_sessions: dict[int, Session] = {}


def attach(shell: Any, session: Session) -> None:
    """Make ``session`` the one of ``shell`` (``%load_ext pymw_magic`` does)."""
    _sessions[id(shell)] = session


def detach(shell: Any) -> None:
    _sessions.pop(id(shell), None)


def of(shell: Any) -> Session | None:
    """The session of ``shell``, when the extension is loaded there."""
    return _sessions.get(id(shell)) if shell is not None else None


# --- stored jobs: what %pymw jobs/attach, the facade and the server share ------------------------

def reattach_module() -> Any:
    """:mod:`pymw_magic.reattach`, imported on first use; a :class:`PymwError`
    saying what is missing where this install has no reattach module."""
    try:
        import pymw_magic.reattach as reattach
    except ModuleNotFoundError as exc:
        if exc.name != "pymw_magic.reattach":
            raise  # reattach itself lacks something: its own message says what
        raise PymwError("attaching to and removing batch jobs needs pymw_magic.reattach, which this "
                        "installation of pymw-magic does not have; upgrade pymw-magic") from None
    return reattach


def attach_stored(name_or_id: str, **options: Any) -> Any:
    """A live Job for the stored batch job ``name_or_id`` (options override
    the stored ones): :func:`pymw_magic.reattach.attach`."""
    return reattach_module().attach(name_or_id, **options)


def remove_stored(name_or_id: str, cancel: bool = False, patience: float = 15.0) -> Any:
    """Delete a stored job (a batch job: its job directory too) and return
    its last record.  A running job is refused unless ``cancel``: a pool job
    is then cancelled by the process that owns it (asked through the store,
    waited for up to ``patience`` seconds), a batch job through its backend.
    A store another process keeps locked is waited for about ``patience``
    seconds at each step, then :class:`~pymw_magic.store.StoreBusy`."""
    from . import store as _store

    db = _store.open_store()
    local = _store.recorder()
    if local is not None:
        local.flush(patience)  # a job of this process that just ended is in the file now
    rec = db.job(name_or_id)
    if rec.family == "batch":
        reattach_module().remove(rec.uid, cancel=cancel)
        return rec
    if rec.state == "active":
        if not cancel:
            raise _store.StoreError(
                f"job {rec.name!r} ({rec.uid[:8]}) is still running in {rec.owner}; cancel it first "
                "(%pymw jobs --remove NAME --cancel, or remove(NAME, cancel=True))")
        _cancel_pool_job(db, rec, patience)
        rec = db.job(rec.uid)
    if local is not None and local.job_of(rec.uid) is not None:
        local.flush(patience)  # what this process still had to write lands first, never after the delete
    db.remove(rec.uid, force=rec.state == "active", patience=patience)
    return rec


def _cancel_pool_job(db: Any, rec: Any, patience: float) -> None:
    """Cancel an active pool job through its owner and wait until its row ends."""
    import time

    from . import store as _store

    local = _store.recorder()
    job = local.job_of(rec.uid) if local is not None else None
    if job is not None:  # ours: no need to go through the file
        job.cancel()
        local.flush(patience)
    else:
        db.request_cancel(rec.uid, patience=patience)
    deadline = time.monotonic() + patience
    while True:
        now = db.job(rec.uid)
        if now.state != "active":
            return
        if time.monotonic() > deadline:
            raise _store.StoreError(
                f"job {rec.name!r} ({rec.uid[:8]}) was asked to cancel but is still running after "
                f"{patience:.0f} s in {rec.owner}; is that process busy? Try again, or interrupt it there")
        time.sleep(0.1)


# --- how a front end shows jobs -------------------------------------------------------------

def describe_input(names: tuple[str, ...], args: tuple, limit: int = 120) -> str:
    """A task's ``--map`` input as ``x=1, y='a'`` (cut at ``limit``)."""
    text = ", ".join(f"{n}={a!r}" for n, a in zip(names, args))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def master_text(master: Any) -> str:
    return f"backend {master.backend_name!r} with {master.workers} worker(s)"


def counts_text(counts: Mapping[str, int]) -> str:
    shown = [f"{state} {n}" for state, n in counts.items() if n]
    return ", ".join(shown) or "no tasks"


def job_state(job: Any) -> str:
    if not job.done():
        return "active"
    counts = job.counts()
    if counts.get("failed"):
        return "failed"
    if counts.get("cancelled"):
        return "cancelled"
    return "finished"


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
                what += f" ({describe_input(names, task.args)})"
            error = task.error
            label = f"{type(error).__name__}: {error}" if error is not None else "failed"
            print(f"--- pymw: output of failed {what}, which raised {label} ---")
        if out:
            sys.stdout.write(out if out.endswith("\n") else out + "\n")
        if err:
            sys.stderr.write(err if err.endswith("\n") else err + "\n")
    sys.stdout.flush()
    sys.stderr.flush()


def stop_widgets() -> None:
    """Stop the widgets' ticker thread and wait for it, if widgets were
    used: a daemon thread drawing (a sweep's matplotlib figure) while the
    interpreter shuts down can abort the process."""
    jobview = sys.modules.get("pymw_magic.widgets.jobview")  # never import ipywidgets to stop it
    if jobview is not None:
        jobview.TICKER.stop()
