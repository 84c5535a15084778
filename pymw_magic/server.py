"""The Jupyter server extension: the job store and the exporter over REST.

This module owns the HTTP API the JupyterLab sidebar and the "Export as
batch script" command talk to, under ``{base_url}pymw/api/``::

    GET    jobs                       every stored job, newest first
    GET    jobs/{id}/tasks            a page of a job's tasks: ?offset=&limit=&state=
    POST   jobs/{id}/cancel           a pool job: asks its owner through the store;
                                      a batch job: asks the process following it, if
                                      one does, else cancelled through its backend
    DELETE jobs/{id}                  forget a job that has ended (409 if it runs)
    POST   export                     {"path": "dir/analysis.ipynb", "overwrite": false,
                                       "comment_unsupported": false} -> dir/analysis.py

Data flow::

    browser ──HTTP──▶ handlers (tornado loop) ──thread──▶ Store (SQLite, re-read per request)
                            │                                ▲ rows of every kernel and script
                            └─ export ──▶ python -m pymw_magic.server export-json (a child
                                          process: the exporter needs IPython, the server
                                          does not load it) ──JSON──▶ the script written here

Every handler is an authenticated ``APIHandler`` (no token or cookie: 403;
POST/DELETE with a cookie need Jupyter's XSRF token).  The store is read on
each request, so jobs of kernels started before the server, and of scripts,
appear; a job's text (names, hosts, errors) is returned as JSON strings and
never interpreted here.  ``export`` only touches files inside the server's
root directory: ``..``, absolute paths and symlinks leading out are refused.

Its layer: front ends (drawn in ``pymw_magic/__init__.py``).  It imports no
IPython.  Enabled by ``jupyter-config/jupyter_server_config.d/pymw_magic.json``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import os
import re
import stat
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from . import store as _store
from .errors import PymwError
from .session import reattach_module

#: the page size the task table asks for at most
MAX_PAGE = 1000
#: offsets and limits beyond this are refused (SQLite's integers are 64-bit)
MAX_INDEX = 2 ** 62
#: seconds the exporter may take
EXPORT_TIMEOUT = 120.0
#: the first lines of a script the exporter wrote say so (a previous export may be overwritten)
EXPORT_MARK = "Exported by pymw-magic"


class _Handler(APIHandler):
    """What every pymw handler shares: the store, JSON replies, errors as JSON."""

    @property
    def db(self) -> _store.Store:
        return _store.open_store()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if isinstance(exc, _store.UnknownJob):
            return self.fail(404, str(exc))
        if isinstance(exc, _store.StoreError):  # unreadable, damaged, locked: its message says what to do
            self.log.warning("pymw: %s", exc)
            return self.fail(503, str(exc))
        super().write_error(status_code, **kwargs)

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        # "<" as \u003c: text from other machines can never read as markup, even if sniffed
        self.finish(json.dumps(body, allow_nan=False).replace("<", "\\u003c"))

    def fail(self, status: int, message: str, **extra: Any) -> None:
        self.reply({"message": message, **extra}, status)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on a thread: SQLite may wait for another process's lock."""
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))

    def body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except ValueError:
            raise tornado.web.HTTPError(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise tornado.web.HTTPError(400, "the request body must be a JSON object")
        return data

    async def record(self, job_id: str) -> _store.JobRecord | None:
        """The stored job, or None after replying 404."""
        try:
            return await self.run(self.db.job, job_id)
        except _store.UnknownJob as exc:
            self.fail(404, str(exc))
            return None


_JOB_FIELDS = [f.name for f in dataclasses.fields(_store.JobRecord) if f.name != "handle"]
_OWNER_FIELDS = [f.name for f in dataclasses.fields(_store.Owner)]


def job_json(rec: _store.JobRecord) -> dict[str, Any]:
    """A job as the sidebar shows it: the record plus what it derives."""
    # Its fields as they are (read from the store for this request: nothing
    # shared), not as_dict()'s deep copy, which cost milliseconds a job; but
    # without the handle: a batch job's engine bookkeeping (its chunk map,
    # about 60 bytes a task, megabytes for a big job), polled every second.
    d = {name: getattr(rec, name) for name in _JOB_FIELDS}
    d["owner"] = {name: getattr(rec.owner, name) for name in _OWNER_FIELDS}
    elapsed = rec.elapsed
    finished = rec.finished_tasks
    d["finished_tasks"] = finished
    d["elapsed"] = elapsed
    d["rate"] = finished / elapsed if elapsed > 0 and finished else None
    left = None if rec.total is None else rec.total - finished
    d["eta"] = left / d["rate"] if d["rate"] and left is not None and rec.state == "active" else None
    d["owner_text"] = str(rec.owner)
    return d


class JobsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self) -> None:
        active_only = self.get_query_argument("active", "0") in ("1", "true", "yes")
        limit = self.get_query_argument("limit", None)
        try:
            n = None if limit in (None, "") else int(limit)
            if n is not None and not 0 <= n <= MAX_INDEX:
                raise ValueError
        except ValueError:
            return self.fail(400, f"limit must be a whole number >= 0 (at most 2**62), not {limit!r}")
        records = await self.run(self.db.jobs, all=not active_only, limit=n)
        self.reply({"jobs": [job_json(r) for r in records], "store": str(self.db.path)})


class TasksHandler(_Handler):
    @tornado.web.authenticated
    async def get(self, job_id: str) -> None:
        args = {}
        for name, default, low in (("offset", 0, 0), ("limit", 100, 1)):
            text = self.get_query_argument(name, str(default))
            try:
                args[name] = int(text)
            except ValueError:
                return self.fail(400, f"{name} must be a whole number, not {text!r}")
            if not low <= args[name] <= MAX_INDEX:
                return self.fail(400, f"{name} must be at least {low} (and at most 2**62), not {args[name]}")
        args["limit"] = min(args["limit"], MAX_PAGE)
        state = self.get_query_argument("state", None) or None
        if state is not None and state not in _store.TASK_STATES:
            return self.fail(400, f"state {state!r} is not one of {', '.join(_store.TASK_STATES)}")
        rec = await self.record(job_id)
        if rec is None:
            return
        tasks = await self.run(self.db.tasks, rec.uid, offset=args["offset"], limit=args["limit"], state=state)
        count = await self.run(self.db.count_tasks, rec.uid, state)
        self.reply({"job": rec.uid, "offset": args["offset"], "limit": args["limit"], "state": state,
                    "count": count, "tasks_recorded": rec.tasks_recorded,
                    "tasks": [dict(t.as_dict(), duration=t.duration) for t in tasks]})


class CancelHandler(_Handler):
    @tornado.web.authenticated
    async def post(self, job_id: str) -> None:
        rec = await self.record(job_id)
        if rec is None:
            return
        if rec.state == "lost":
            return self.fail(409, f"job {rec.name!r} is lost: its {rec.owner} is gone, nothing runs it",
                             state=rec.state)
        if rec.state != "active":
            return self.fail(409, f"job {rec.name!r} has already ended ({rec.state})", state=rec.state)
        # The owner (when alive) cancels its own Job: its state and results stay right.
        asked = await self.run(self.db.request_cancel, rec.uid)
        if rec.family != "batch":
            return self.reply({"job": rec.uid, "requested": asked, "how": "owner"}, 202)
        # A batch job followed by a live process (its submitter, or a kernel
        # that attached it) is cancelled by that process, which learns of the
        # request through the store: only one process may follow a job.
        follower = await self.run(followed_by, rec)
        if follower is not None:
            return self.reply({"job": rec.uid, "requested": asked, "how": "follower", "pid": follower}, 202)
        # Nobody follows it: cancel it through its backend from here.
        try:
            await self.run(_cancel_batch, rec.uid)
        except Exception as exc:  # the engine is another system: say what it said
            self.log.warning("pymw: cancelling job %s through its backend failed: %r", rec.uid, exc)
            return self.fail(502, f"cancelling job {rec.name!r} through its {rec.backend} backend failed: "
                                  f"{exc if isinstance(exc, PymwError) else repr(exc)}")
        self.reply({"job": rec.uid, "requested": asked, "how": "backend"}, 202)


def followed_by(rec: _store.JobRecord) -> int | None:
    """The pid of the process following batch job ``rec`` (the holder of its
    job directory's follow lock; 0 when it wrote no pid), None when none does."""
    from .backends.batch import FOLLOW_LOCK
    directory = (rec.handle or {}).get("dir")
    if not isinstance(directory, str) or not directory:
        return None
    try:
        fd = os.open(Path(directory) / FOLLOW_LOCK, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # no lock file: never followed, or its directory is gone
        return None
    try:
        try:
            # A shared lock for an instant: granted only while no one holds it exclusively.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _cancel_batch(uid: str, patience: float = 30.0) -> None:
    """Cancel a stored batch job through its engine, from this process: it
    is attached here (followed again from its log), cancelled (its procs
    leave the queue) and its cancelled tasks recorded; the master made for
    it shuts down with the job."""
    reattach = reattach_module()
    cancel = getattr(reattach, "cancel", None)
    if cancel is not None:
        cancel(uid)
        return
    job = reattach.attach(uid)
    job.cancel()
    if not job.wait(timeout=patience):  # the engine did not confirm: stop following it here
        job.master.shutdown(wait=False)
    # Every proc of the job leaves the engine's queue, whatever the attached
    # job knew of them (the backend's own removal of a stored job).
    from .backends import get_backend
    rec = _store.open_store().job(uid)
    remove_stored = getattr(get_backend(rec.backend), "remove_stored", None)
    if remove_stored is not None and rec.handle:
        remove_stored(rec.handle)
    recorder = _store.recorder()
    if recorder is not None:
        recorder.flush()


class JobHandler(_Handler):
    @tornado.web.authenticated
    async def delete(self, job_id: str) -> None:
        rec = await self.record(job_id)
        if rec is None:
            return
        if rec.state == "active":
            return self.fail(409, f"job {rec.name!r} is still running ({rec.owner}); cancel it first")
        try:
            if rec.family == "batch":
                await self.run(lambda: reattach_module().remove(rec.uid, cancel=False))
            elif not await self.run(self.db.remove, rec.uid):
                # Another request (or a kernel) removed it meanwhile: say so, never "removed" twice.
                return self.fail(404, f"job {rec.name!r} ({rec.uid}) was removed meanwhile")
        except _store.StoreError as exc:
            return self.fail(409, str(exc))
        except PymwError as exc:
            return self.fail(502, f"removing job {rec.name!r} failed: {exc}")
        self.reply({"job": rec.uid, "removed": True})


# --- export ---------------------------------------------------------------------------------------
class _Refused(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.extra = status, extra


def resolve_inside(root: Path, relative: Any) -> tuple[Path, Path]:
    """The notebook at ``relative`` (a '/'-separated path under ``root``),
    resolved, and where its script goes; :class:`_Refused` (403/404/400)
    for anything that leads outside ``root`` or is not a notebook."""
    if not isinstance(relative, str) or not relative.strip():
        raise _Refused(400, 'give the notebook as {"path": "dir/analysis.ipynb"}, relative to the server root')
    if "\\" in relative or "\0" in relative:
        raise _Refused(403, f"{relative!r}: backslashes and NUL are not allowed in the path")
    posix = PurePosixPath(relative)
    if posix.is_absolute() or relative.startswith("~") or re.match(r"[A-Za-z]:", relative):
        raise _Refused(403, f"{relative!r} is not relative to the server root")
    if ".." in posix.parts:
        raise _Refused(403, f"{relative!r} leads out of the server root ('..')")
    root = root.resolve()
    lexical = root.joinpath(*posix.parts)
    try:
        notebook = lexical.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise _Refused(404, f"no notebook {relative!r} under the server root") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise _Refused(404, f"{relative!r} cannot be opened: {exc}") from None
    if not notebook.is_relative_to(root):
        raise _Refused(403, f"{relative!r} leads out of the server root (a symlink)")
    if notebook.suffix != ".ipynb" or not notebook.is_file():
        raise _Refused(400, f"{relative!r} is not a notebook (.ipynb file)")
    folder = lexical.parent.resolve()
    if not folder.is_relative_to(root):
        raise _Refused(403, f"{relative!r} lies in a folder outside the server root (a symlink)")
    return notebook, folder / (lexical.stem + ".py")


def _previous_export(target: Path) -> bool:
    try:
        with open(target, encoding="utf-8", errors="replace") as f:
            head = "".join(f.readline() for _ in range(12))
    except OSError:
        return False
    return EXPORT_MARK in head


def _write_script(target: Path, text: str, root: Path | None = None, overwrite: bool = True) -> None:
    """Write the script (through a temporary file: never half a script), no symlink followed.

    The checks made before the export are made again here, on the folder
    opened once (the exporter takes seconds: meanwhile the folder may have
    become a symlink leading out of ``root``, or a file of the user's may
    have appeared at ``target``); every later step works on that open
    folder, never on its path again."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        dfd = os.open(target.parent, flags)
    except OSError as exc:
        raise _Refused(409, f"the folder of {target.name} changed during the export "
                            f"({exc.strerror or exc}); export again") from None
    tmp = None
    try:
        if root is not None:
            where = f"/proc/self/fd/{dfd}"
            real = Path(os.readlink(where)) if os.path.exists(where) else target.parent.resolve()
            if not real.is_relative_to(root.resolve()):
                raise _Refused(403, f"the folder of {target.name} leads out of the server root (a symlink)")
        try:
            info = os.lstat(target.name, dir_fd=dfd)
        except FileNotFoundError:
            info = None
        if info is not None:
            if stat.S_ISLNK(info.st_mode):
                raise _Refused(409, f"{target.name} is a symbolic link; not overwritten")
            if not stat.S_ISREG(info.st_mode):
                raise _Refused(409, f"{target.name} exists and is not a file")
            if not overwrite and not _previous_export_at(dfd, target.name):
                raise _Refused(409, f"{target.name} appeared during the export and is not a previous export "
                                    'of the notebook; export again with {"overwrite": true} to replace it',
                               exists=True)
        tmp = f".{target.stem}-{os.urandom(6).hex()}.py.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600,
                     dir_fd=dfd)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            mode = 0o777 & ~_umask()
            os.fchmod(f.fileno(), mode | ((mode & 0o444) >> 2))  # executable where readable: it has a #! line
        os.replace(tmp, target.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
        os.close(dfd)


def _previous_export_at(dfd: int, name: str) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dfd)
    except OSError:
        return False
    with open(fd, encoding="utf-8", errors="replace") as f:
        head = "".join(f.readline() for _ in range(12))
    return EXPORT_MARK in head


def _umask() -> int:
    """The process's umask, read without changing it (other threads create files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


class ExportHandler(_Handler):
    @tornado.web.authenticated
    async def post(self) -> None:
        data = self.body()
        for flag in ("overwrite", "comment_unsupported"):
            if not isinstance(data.get(flag, False), bool):
                return self.fail(400, f'"{flag}" must be true or false, not {data[flag]!r}')
        root = Path(self.settings.get("server_root_dir") or os.getcwd()).expanduser()
        try:
            notebook, target = resolve_inside(root, data.get("path"))
            relative = target.relative_to(root.resolve()).as_posix()
            overwritten = False
            if os.path.lexists(target):
                info = os.lstat(target)
                if stat.S_ISLNK(info.st_mode):
                    raise _Refused(409, f"{relative} is a symbolic link; not overwritten", path=relative)
                if not stat.S_ISREG(info.st_mode):
                    raise _Refused(409, f"{relative} exists and is not a file", path=relative)
                if not data.get("overwrite") and not _previous_export(target):
                    raise _Refused(409, f"{relative} exists and is not a previous export of the notebook; "
                                   'export again with {"overwrite": true} to replace it',
                                   path=relative, exists=True)
                overwritten = True
        except _Refused as exc:
            return self.fail(exc.status, str(exc), **exc.extra)
        out = await _run_exporter(notebook, target.name, bool(data.get("comment_unsupported")))
        if not out.get("ok"):
            return self.fail(400, out.get("message", "the export failed"), problems=out.get("problems", []),
                             unsupported=bool(out.get("problems")))
        try:
            await self.run(_write_script, target, out["script"], root, bool(data.get("overwrite")))
        except _Refused as exc:
            return self.fail(exc.status, str(exc), path=relative, **exc.extra)
        except OSError as exc:
            return self.fail(500, f"cannot write {relative}: {exc.strerror or exc}")
        self.reply({"path": relative, "notebook": notebook.relative_to(root.resolve()).as_posix(),
                    "skipped": out.get("skipped", []), "overwritten": overwritten})


async def _run_exporter(notebook: Path, script_name: str, comment_unsupported: bool) -> dict[str, Any]:
    """The exporter's outcome, from a child process (it reads cells with IPython)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, "-m", "pymw_magic.server", "export-json", str(notebook), script_name]
    if comment_unsupported:
        argv.append("--comment-unsupported")
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env,
                                                cwd=str(notebook.parent))
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), EXPORT_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"ok": False, "message": f"the exporter took longer than {EXPORT_TIMEOUT:.0f} s"}
    try:
        out = json.loads(stdout.decode("utf-8"))
    except ValueError:
        tail = stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        return {"ok": False, "message": "the exporter failed: " + ("\n".join(tail) or f"exit {proc.returncode}")}
    return out if isinstance(out, dict) else {"ok": False, "message": "the exporter answered nonsense"}


def export_json(notebook: str, script_name: str, comment_unsupported: bool) -> dict[str, Any]:
    """The child's side: export ``notebook`` (nothing written) as a JSON-able outcome."""
    from dataclasses import asdict

    from .export import ExportError, export_notebook

    try:
        result = export_notebook(notebook, skip_unsupported=comment_unsupported,
                                 label=os.path.basename(notebook), script_name=script_name)
    except ExportError as exc:
        return {"ok": False, "message": str(exc), "problems": [asdict(p) for p in exc.problems]}
    except OSError as exc:
        return {"ok": False, "message": f"cannot read {notebook}: {exc.strerror or exc}"}
    return {"ok": True, "script": result.script, "skipped": [asdict(p) for p in result.skipped]}


# --- the extension's entry points -----------------------------------------------------------------
def handlers(base_url: str) -> list[tuple[str, type]]:
    """The routes under ``{base_url}pymw/api/``."""
    api = url_path_join(base_url, "pymw", "api")
    return [
        (url_path_join(api, "jobs"), JobsHandler),
        (url_path_join(api, "jobs", r"([^/]+)", "tasks"), TasksHandler),
        (url_path_join(api, "jobs", r"([^/]+)", "cancel"), CancelHandler),
        (url_path_join(api, "jobs", r"([^/]+)"), JobHandler),
        (url_path_join(api, "export"), ExportHandler),
    ]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "pymw_magic.server"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    base_url = web_app.settings.get("base_url", "/")
    web_app.add_handlers(".*$", handlers(base_url))
    serverapp.log.info("pymw-magic: REST API at %spymw/api/ (job store %s)", base_url,
                       _store.default_home() / _store.DB_NAME)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 3 and args[0] == "export-json":
        out = export_json(args[1], args[2], "--comment-unsupported" in args[3:])
        sys.stdout.write(json.dumps(out))
        return 0
    print("usage: python -m pymw_magic.server export-json NOTEBOOK.ipynb SCRIPT.py [--comment-unsupported]",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
