"""Batch jobs found again from the job store: ``attach`` and ``remove``.

::

    attach(name) ──▶ store: the job's record, its handle (job dir, chunks, engine state),
                     its tasks that ended without an output
                 ──▶ Master(backend, **stored options, **reconnect options, **yours)
                 ──▶ master.adopt(...) ──▶ the backend follows the engine again from the
                                            saved log offset; outputs already written are read
                 ──▶ a live Job (result(), as_completed(), cancel(), the widget)

    remove(name, cancel) ──▶ refuse an unfinished job unless cancel ──▶ its procs leave the
                             engine's queue ──▶ its job directory ──▶ its rows

Who does what: this module joins the store (records) to the engine (a
master and its batch backend); it also wires the batch family to the store
(``backends.batch.set_store_hooks``) and ``Job.remove`` (``job.set_remover``)
when imported, which the package's facade does.
"""

from __future__ import annotations

import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from . import job as _job_module
from . import store
from .backends import get_backend, master_options
from .backends.batch import BatchBackend, set_store_hooks
from .errors import PymwError
from .job import Job
from .master import Master, live_masters

#: seconds remove(cancel=True) waits for a live job's cancellation to settle
CANCEL_PATIENCE = 30.0


def _recorder_for(job: Job) -> Any:
    """The recorder of ``job``'s master (subscribed to its events)."""
    rec = store.recorder()
    if rec is not None:
        master = getattr(job, "master", None)
        if master is not None and getattr(master, "events", None) is not None:
            rec.attach(master)
    return rec


def _jobs_root() -> Path:
    return store.default_home() / "jobs"


set_store_hooks(_recorder_for, _jobs_root)


def attach(name_or_id: str, **backend_options: Any) -> Job:
    """A live :class:`Job` for the stored batch job ``name_or_id`` (its uid,
    a uid prefix, or its name: the newest of that name).

    Results written while no process watched are read from the job
    directory; unfinished procs are followed again from the saved event-log
    offset.  ``backend_options`` override the stored ones (e.g. another
    ``schedd`` object); the stored schedd is reconnected otherwise.
    """
    uid = _submitted(name_or_id)  # (waits outside the lock: other jobs attach meanwhile)
    with _attach_lock:  # (two threads attaching one job get one Job)
        return _attach(uid, backend_options)


_attach_lock = threading.RLock()

#: seconds attach waits for a job its owner is still submitting to reach the store
SUBMIT_PATIENCE = 10.0


def _reached(record: store.JobRecord) -> bool:
    handle = record.handle or {}
    return bool(handle.get("dir") and handle.get("chunks"))


def _store_with_ours() -> store.Store:
    """The job store, with what this process's recorder still had to
    write in it: a job submitted here a moment ago is found by its name
    (not an older job of that name, nor "no such job")."""
    rec = store.recorder()
    if rec is not None:
        rec.flush(SUBMIT_PATIENCE)
    return store.open_store()


def _submitted(name_or_id: str) -> str:
    """The uid of the stored batch job ``name_or_id`` once its job directory
    is recorded.  A job whose owner is still submitting it (alive, the
    job active, nothing recorded yet) is waited for up to
    :data:`SUBMIT_PATIENCE` seconds; after that, or for a job whose owner
    ended first, a PymwError says which of the two it is."""
    st = _store_with_ours()
    record = st.job(name_or_id)
    if record.family != "batch":
        raise PymwError(f"job {record.name!r} ran on the {record.backend} backend, whose tasks ran in their "
                        f"process ({record.owner}): only batch jobs (condor, boinc) can be attached")
    if _reached(record) or _attached(record.uid) is not None or _live_job(record) is not None:
        return record.uid
    deadline = time.monotonic() + SUBMIT_PATIENCE
    while record.state == "active" and record.owner.alive() is not False and time.monotonic() < deadline:
        time.sleep(0.1)
        record = st.job(record.uid)
        if _reached(record):
            return record.uid
    alive = record.owner.alive()
    if record.state == "active" and alive:
        raise PymwError(f"job {record.name!r} ({record.uid[:8]}) is still being submitted by {record.owner}: "
                        f"its job directory is not recorded yet. Try again in a moment (while that process "
                        f"follows the job, it is attached there)")
    if record.state == "active" and alive is None:
        raise PymwError(f"job {record.name!r} ({record.uid[:8]}) has no job directory recorded yet: its owner, "
                        f"{record.owner}, runs on another host. If it is still submitting the job, try again "
                        f"in a moment; if it ended, the job never reached its engine")
    ended = "ended" if record.state == "active" else f"ended it as {record.state}"
    raise PymwError(f"job {record.name!r} ({record.uid[:8]}) has no job directory recorded: {record.owner} "
                    f"{ended} before submitting it, so it never reached its engine and there is nothing to "
                    f"attach to. Run it again")


def _attach(uid: str, backend_options: dict[str, Any]) -> Job:
    st = store.open_store()
    record = st.job(uid)
    attached = _attached(record.uid) or _live_job(record)
    if attached is not None:
        return attached  # (followed in this process already: never twice)
    handle = record.handle or {}
    if not Path(handle["dir"]).is_dir():
        raise PymwError(f"job {record.name!r}: its job directory {handle['dir']} is gone (removed?)")
    cls = get_backend(record.backend)
    if not issubclass(cls, BatchBackend):
        raise PymwError(f"the {record.backend} backend cannot attach jobs")
    common = master_options()
    stored = record.options or {}
    options: dict[str, Any] = dict(handle.get("options") or {})
    options.update(_reconnect_options(cls, handle, backend_options))
    options.update(backend_options)
    master_kw = {k: options.pop(k) for k in list(options) if k in common}
    options = {k: v for k, v in options.items() if k in cls.options}
    chunksize = stored.get("chunksize")
    timeout = stored.get("timeout")
    retries = stored.get("retries")
    master_kw.setdefault("retries", retries if isinstance(retries, int) else 1)
    master = Master(record.backend, **master_kw, **options)
    final = _final_tasks(st, record.uid)
    handle = dict(handle, uid=record.uid)
    total = handle.get("total") or record.total or sum(
        b - a for entry in handle["chunks"].values() for a, b in entry.get("seqs") or [])
    try:
        job = master.adopt(record.name, int(total), handle, final, function=handle.get("function", "function"),
                           chunksize=chunksize if isinstance(chunksize, int) else None,
                           timeout=timeout if isinstance(timeout, (int, float)) else None,
                           retries=retries if isinstance(retries, int) else None)
    except BaseException:
        master.shutdown(wait=False)
        raise
    _registry[record.uid] = job
    rec = store.recorder()
    if rec is not None:
        uid = rec.uid(job)
        if uid != record.uid:
            # A store whose recorder cannot keep a row's id: the new row
            # (holding the whole handle and every task) replaces the old one.
            rec.flush()
            st.remove(record.uid, force=True)
            _registry[uid] = job
    # The master goes with its job: once it is done, nothing else will run there.
    job.add_done_callback(lambda j: master.shutdown(wait=False))
    return job


def _reconnect_options(cls: type[BatchBackend], handle: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The stored way back to the engine, but for what the caller gives
    (an explicit ``schedd=`` wins without the stored one being rebuilt)."""
    return cls.reconnect_options(handle, given=set(given))


#: uid -> a job attached in this process, while someone holds it (attach
#: twice: the same Job, never two masters following one job)
_registry: "weakref.WeakValueDictionary[str, Job]" = weakref.WeakValueDictionary()


def _attached(uid: str) -> Job | None:
    return _registry.get(uid)


def _final_tasks(st: store.Store, uid: str) -> dict[int, tuple[str, str | None, str | None]]:
    """Tasks the store says ended without an output, or were running (with their host)."""
    out: dict[int, tuple[str, str | None, str | None]] = {}
    for state in ("failed", "cancelled", "running"):
        offset = 0
        while True:
            page = st.tasks(uid, offset=offset, limit=1000, state=state)
            for t in page:
                out[t.index] = (state, t.host, None) if state == "running" else (state, t.error, t.traceback)
            if len(page) < 1000:
                break
            offset += len(page)
    return out


def _unfinished(record: store.JobRecord) -> bool:
    c = record.counts
    if record.state != "active":
        return False
    return bool(c.get("pending") or c.get("running") or c.get("retrying")) or \
        record.total is None or record.finished_tasks < record.total


def remove(name_or_id: str, cancel: bool = False) -> None:
    """Delete a stored job: its job directory (batch jobs) and its rows.  An
    unfinished job is refused unless ``cancel``: then its procs are removed
    from the engine's queue first."""
    st = _store_with_ours()
    record = st.job(name_or_id)
    live = _live_job(record)
    if live is not None:
        _remove_live(live, cancel)
        return
    if _unfinished(record):
        if not cancel:
            raise PymwError(f"job {record.name!r} ({record.uid[:8]}) is still running "
                            f"({_counts_text(record.counts)}): remove({record.name!r}, cancel=True) removes its "
                            "procs from the queue, then the job")
        if record.family == "batch" and record.handle:
            cls = get_backend(record.backend)
            if issubclass(cls, BatchBackend):
                cls.remove_stored(record.handle)
    _delete(st, record.uid, (record.handle or {}).get("dir"))


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no tasks recorded yet"


def _live_job(record: store.JobRecord) -> Job | None:
    """The Job object of ``record`` in this process, if it runs here."""
    job = _attached(record.uid)
    if job is not None:
        return job
    rec = store.recorder()
    if rec is None:
        return None
    for master in live_masters():
        if master.backend.family != "batch" or not rec.attached(master):
            continue
        for job in master.jobs:
            if job.name == record.name and rec.uid(job) == record.uid:
                return job
    return None


def _remove_live(job: Job, cancel: bool) -> None:
    if not job.done():
        if not cancel:
            counts = {k: v for k, v in job.counts().items()}
            raise PymwError(f"job {job.name!r} is still running ({_counts_text(counts)}): "
                            "job.remove(cancel=True) cancels it (its procs leave the queue), then removes it")
        job.cancel()
        job.wait(CANCEL_PATIENCE)
    rec = store.recorder()
    uid = rec.uid(job) if rec is not None else None
    backend = getattr(job.master, "backend", None)
    directory = backend.job_dir(job) if isinstance(backend, BatchBackend) else None
    if isinstance(backend, BatchBackend):
        backend.forget(job)
        if directory is not None:
            backend.wait_removed(directory, CANCEL_PATIENCE)
    if rec is not None:
        rec.flush()  # (what it still had to write goes before the rows are deleted)
        rec.forget(job)  # (and nothing of it after: a racing cancel's events would write it anew)
    if uid is not None:
        _registry.pop(uid, None)
        _delete(store.open_store(), uid, str(directory) if directory else None)
    elif directory is not None:
        _remove_dir(str(directory))


def _delete(st: store.Store, uid: str, directory: str | None) -> None:
    if directory:
        _remove_dir(directory)
    st.remove(uid, force=True)


def _remove_dir(directory: str) -> None:
    from .jobdir import JobDir
    path = Path(directory)
    if not path.exists():
        return
    try:
        JobDir.open(path).remove()
    except Exception:
        # Only a directory that looks like a job directory is deleted by hand.
        if (path / "job.json").exists() and (path / "key").exists():
            shutil.rmtree(path, ignore_errors=True)


_job_module.set_remover(_remove_live)

__all__ = ["attach", "remove"]
