"""The part of the notebook's environment a job carries to long-lived workers.

Workers outlive many cells: without this they would keep the directory,
``sys.path`` and module code they started with while the notebook moves on
(``%cd``, ``sys.path.insert``, ``importlib.reload``).  This module owns that
following, on both sides:

* master side — :class:`EnvWatch` gives the master's current directory and
  ``sys.path`` as a :class:`WorkerEnv` (the same object while nothing
  changed, so comparing is cheap); :func:`user_module_file` says whether a
  module is the user's own (a source file outside the standard library,
  site-packages and this package: the ones that get edited and reloaded);
  :class:`ModuleWatch` records each such module's file as ``(mtime_ns,
  size)`` when the master (re)loads it;
* worker side — :class:`Follower` applies a job's :class:`WorkerEnv`
  (``os.chdir``, prepending the ``sys.path`` entries it lacks) and, before a
  job's function is unpickled, reloads (:func:`importlib.reload`) every user
  module whose stamp differs from the one its copy in this worker matches.
  A module that cannot be reloaded raises :class:`StaleModule` saying which
  and why: the job's tasks fail with it rather than run old code.

What a function *uses* is found in :mod:`.payload`, which knows what a
function captures; this module only deals with modules, files and paths.
"""

from __future__ import annotations

import functools
import importlib
import os
import socket
import sys
import time
from typing import Any, Callable, NamedTuple

from .errors import PayloadError

#: a module file as (st_mtime_ns, st_size); None when it cannot be read
Stamp = tuple[int, int]


class WorkerEnv(NamedTuple):
    """The master's working directory and ``sys.path`` (absolute entries)."""
    cwd: str
    path: tuple[str, ...]


class StaleModule(PayloadError):
    """A module a job uses changed since this worker imported it, and the
    worker could not reload it."""


def _absolute(entry: str, cwd: str) -> str:
    # "" and relative entries mean "relative to the current directory" at
    # import time: for a worker that is the master's directory now.
    return os.path.normpath(os.path.join(cwd, entry)) if entry else cwd


#: os.chdir/os.fchdir calls seen so far (see :func:`_count_chdirs`)
_cwd_changes = 0
#: seconds between real checks of the directory, for changes made around os.chdir
_RECHECK = 0.05


def _count_chdirs() -> None:
    """Wrap ``os.chdir``/``os.fchdir`` so each call bumps a counter.

    Asking the kernel for the directory at every submit costs more than the
    rest of a submit: a system call releases the GIL, and with serving
    threads busy getting it back takes tens of microseconds.  The counter
    tells at once that ``%cd`` or ``os.chdir`` ran; a real check every
    :data:`_RECHECK` seconds covers a change made some other way."""
    def counting(real: Callable[[Any], None]) -> Callable[[Any], None]:
        @functools.wraps(real)
        def chdir(path: Any) -> None:
            global _cwd_changes
            try:
                real(path)
            finally:
                _cwd_changes += 1
        chdir._pymw_counts = True  # type: ignore[attr-defined]
        return chdir

    for name in ("chdir", "fchdir"):
        real = getattr(os, name, None)
        if real is not None and not getattr(real, "_pymw_counts", False):
            setattr(os, name, counting(real))


class EnvWatch:
    """The master's :class:`WorkerEnv`, rebuilt only when the directory or
    ``sys.path`` changed: the same object otherwise, found without a system
    call (a counter of ``os.chdir`` calls, a list comparison)."""

    __slots__ = ("_raw", "_env", "_changes", "_recheck")

    def __init__(self) -> None:
        _count_chdirs()
        self._raw: list[str] | None = None
        self._env: WorkerEnv | None = None
        self._changes = -1
        self._recheck = 0.0

    def current(self) -> WorkerEnv:
        env = self._env
        path = sys.path
        now = time.monotonic()
        if (env is not None and self._changes == _cwd_changes and now < self._recheck
                and self._raw == path):
            return env
        self._changes = _cwd_changes  # (read before the directory: a change after it shows next time)
        self._recheck = now + _RECHECK
        try:
            cwd = os.getcwd()
        except OSError:  # the directory was removed under us
            cwd = env.cwd if env is not None else "/"
        if env is not None and env.cwd == cwd and self._raw == path:
            return env
        entries = dict.fromkeys(_absolute(p, cwd) for p in path if isinstance(p, str))
        env = WorkerEnv(cwd, tuple(entries))
        self._raw, self._env = list(path), env
        return env


class ModuleWatch:
    """Each user module's stamp as of the master's last (re)load of it.

    A reload is told without touching the disk: ``importlib.reload`` (and
    IPython's autoreload, which calls it) gives the module a new
    ``__spec__`` object; the file is stat-ed only then.  So a file edited
    but not reloaded in the notebook keeps its stamp: workers keep running
    what the notebook runs."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, Stamp | None]] = {}

    def stamps(self, files: tuple[tuple[str, str], ...]) -> tuple[tuple[str, Stamp | None], ...]:
        """``(module, stamp)`` for each ``(module, file)``."""
        out = []
        seen = self._seen
        for name, path in files:
            spec = getattr(sys.modules.get(name), "__spec__", None)
            got = seen.get(name)
            if got is None or got[0] is not spec:
                got = seen[name] = (spec, stamp(path))
            out.append((name, got[1]))
        return tuple(out)


def _excluded_roots() -> tuple[str, ...]:
    """Directories whose modules are not the user's: the interpreter's, its
    installed packages' and this package's own."""
    import sysconfig

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.abspath(__file__))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            roots.add(sysconfig.get_paths()[key])
        except (KeyError, OSError):
            continue
    real = {os.path.join(os.path.realpath(r), "") for r in roots if r}
    return tuple(r for r in real if r != os.sep)  # (a Python installed at / excludes nothing)


_EXCLUDED: tuple[str, ...] | None = None
#: module name -> its source file if it is a user module, else None
_FILES: dict[str, str | None] = {}


def user_module_file(name: str | None) -> str | None:
    """The source file of module ``name`` if it is a user's module (one that
    may be edited and reloaded while workers run), else None."""
    if not name or name == "__main__":
        return None
    try:
        return _FILES[name]
    except KeyError:
        pass
    global _EXCLUDED
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None) if module is not None else None
    found: str | None = None
    if isinstance(path, str) and path.endswith(".py"):
        if _EXCLUDED is None:
            _EXCLUDED = _excluded_roots()
        real = os.path.realpath(path)
        parts = real.split(os.sep)
        if (not real.startswith(_EXCLUDED) and "site-packages" not in parts
                and "dist-packages" not in parts):
            found = path
    if module is not None:  # (not yet imported: decide when it is)
        _FILES[name] = found
    return found


def stamp(path: str | None) -> Stamp | None:
    """The file's (mtime_ns, size), or None if it cannot be read."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Follower:
    """A worker's side: which :class:`WorkerEnv` it has applied, and which
    version of each user module its imported copy corresponds to."""

    def __init__(self) -> None:
        self.env: WorkerEnv | None = None
        self._interned: dict[WorkerEnv, WorkerEnv] = {}
        # module -> the master's stamp this worker's copy matches
        self._versions: dict[str, Stamp | None] = {}
        # module -> its file's stamp when this worker imported (or reloaded) it
        self._imported: dict[str, Stamp | None] = {}
        self._modules_seen = len(sys.modules)
        self._started_ns = time.time_ns()
        self._warned: set[str] = set()

    def intern(self, env: WorkerEnv | None) -> WorkerEnv | None:
        """One object per distinct env, so :meth:`apply` compares identities."""
        if env is None:
            return None
        env = WorkerEnv(*env)
        return self._interned.setdefault(env, env)

    def apply(self, env: WorkerEnv | None, force: bool = False) -> str | None:
        """Make ``env`` current; a warning to show with the tasks if the
        directory cannot be entered here (they then run where the worker is)."""
        if env is None or (env is self.env and not force):
            return None
        self.env = env
        missing = [p for p in env.path if p not in sys.path]
        if missing:
            sys.path[0:0] = missing
            importlib.invalidate_caches()
        try:
            if os.getcwd() != env.cwd:
                os.chdir(env.cwd)
        except OSError as exc:
            if env.cwd in self._warned:
                return None
            self._warned.add(env.cwd)
            here = _cwd_or_unknown()
            return (f"pymw worker {socket.gethostname()}:{os.getpid()}: cannot enter the notebook's "
                    f"directory {env.cwd!r} ({exc.strerror or exc}); tasks run in {here!r} here\n")
        return None

    def note_imports(self) -> None:
        """Record the file stamps of user modules imported since last time
        (cheap when none were: one len())."""
        if len(sys.modules) == self._modules_seen:
            return
        names = list(sys.modules)
        for name in names[self._modules_seen:]:
            if name not in self._imported:
                path = user_module_file(name)
                if path is not None:
                    self._imported[name] = stamp(path)
        self._modules_seen = len(names)

    def refresh(self, modules: tuple[tuple[str, Stamp | None], ...]) -> None:
        """Reload each module the master's copy of which differs from this
        worker's; StaleModule if one cannot be."""
        for name, wanted in modules:
            if wanted is None or self._versions.get(name) == wanted:
                continue  # (None: the master could not read the file; nothing to compare)
            module = sys.modules.get(name)
            if module is None:  # imported from the file as it is now, when needed
                self._versions[name] = wanted
                continue
            path = getattr(module, "__file__", None)
            have = self._imported.get(name)
            if have is None:
                # Imported some way we did not see: trust it only if its file
                # has not changed since this worker started.
                now = stamp(path)
                have = now if now is not None and now[0] < self._started_ns else None
            if have is not None and have == wanted:
                self._versions[name] = wanted
                continue
            try:
                importlib.invalidate_caches()
                importlib.reload(module)
            except BaseException as exc:
                raise StaleModule(
                    f"module {name!r} changed since worker {socket.gethostname()}:{os.getpid()} "
                    f"imported it, and reloading it there failed ({type(exc).__name__}: {exc}); "
                    "the job's tasks were not run with the old code") from exc
            self._imported[name] = stamp(path)
            self._versions[name] = wanted


def _cwd_or_unknown() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "(a removed directory)"
