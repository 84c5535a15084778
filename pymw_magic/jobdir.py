"""A batch job's directory: what the master writes for the nodes, and
reading back what they wrote.

Data flow::

    master                                   job directory (0o700)                    node sandbox
    write_function(fn) ── signed ─────────▶  function.bin ─────────────────┐
    write_chunk(i, tasks) ── signed ──────▶  in/<i>.in ────────────────────┤  transfer
    (created with the job) ───────────────▶  key (0o600), job.json         ├──────────▶ python3 pymw-runtime.pyz
    invocation(i) (runtime_zipapp copied) ▶  pymw-runtime.pyz ─────────────┘            run <i>.in <i>.out ...
    read_output(i) ◀── verify, then decode ─ out/<i>.out ◀───────────────────────────── <i>.out
                                             events.log (the engine's own log)

Nothing in the directory is trusted without its tag, and a tag is not
trust: a node holding the job's HMAC key can sign any output, so the job's
own codec (``job.json``), never an output's header, says how results are
read.  A job made with ``codec="safe"`` (the batch backends' default,
``trusted_results=False``) reads only safe-codec results (JSON, ``.npy``),
never a pickle; a task's failure then comes back as its type name, message
and traceback only.  Pickled results (``codec="pickle"``) are for nodes you control,
and a host that holds no secret (BOINC's ``ed25519`` scheme) may send them
only when the job was made with ``trusted_results=True``.  An output is
checked against the chunk the master wrote: tasks it did not hold are
dropped, tasks it does not report fail, and one written for another job
or chunk is :class:`OutputCorrupt`.  The function is written once, before
the chunks (each chunk is bound to it by digest).  The file layout and the
node's side are in :mod:`~pymw_magic.oneshot`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import platform
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import cloudpickle

from .errors import PayloadError, TaskFailed
from .oneshot import (CODECS, FileError, key_file_bytes, open_file, parse_key, peek_header, seal, verify,
                      write_atomically)
from .payload import check_picklable, diagnose, new_key, type_name
from .version import __version__

PROTOCOL = 5
RUNTIME_NAME = "pymw-runtime.pyz"
#: text an untrusted output may carry per field (stdout, a traceback, ...)
MAX_TEXT = 1 << 20
#: the largest output read from hosts that hold no secret, unless told otherwise
MAX_UNTRUSTED = 1 << 30
#: the lists and dicts decoded from one output may take this many times
#: its size cap in memory (at least ``codec.MAX_DECODED``): raising the
#: cap raises both
DECODED_PER_BYTE = 8


class OutputError(TaskFailed):
    """A chunk's output file cannot be used; ``path`` names it, ``reason``
    says what is wrong."""

    def __init__(self, path: str | Path, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"output file {self.path}: {reason}" + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason, self.detail)


class OutputMissing(OutputError):
    """No output file where the node should have left one (the node died,
    was evicted, or the engine did not bring it back)."""


class OutputCorrupt(OutputError):
    """An output file that is empty, truncated, not ours, signed with
    another key, or written for another job or chunk."""


class OutputTooLarge(OutputCorrupt):
    """An output file over the cap of what the master reads (refused by
    its size, unread): ``size`` and ``cap`` in bytes."""

    def __init__(self, path: str | Path, size: int, cap: int, detail: str = ""):
        self.size = size
        self.cap = cap
        super().__init__(path, "too large", detail or f"{size} bytes, over the cap of {cap} bytes")

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.size, self.cap, self.detail)


class Invocation(NamedTuple):
    """What a node runs for one chunk; paths in ``arguments`` and
    ``outputs`` are relative to the node's sandbox, ``inputs`` are the
    absolute paths to transfer there."""
    executable: str
    arguments: list[str]
    inputs: list[Path]
    outputs: list[str]


@dataclass
class TaskOutcome:
    seq: int
    ok: bool
    value: Any
    #: as worker.describe_failure: (exc_bytes | None, type name, message, traceback)
    failure: tuple[bytes | None, str, str, str] | None
    stdout: str = ""
    stderr: str = ""
    start: float = 0.0
    end: float = 0.0


@dataclass
class ChunkOutput:
    host: str
    python: str
    started: float
    ended: float
    outcomes: list[TaskOutcome] = field(default_factory=list)
    #: the failure of the whole chunk (refused input, Python mismatch, ...) or None
    error: tuple[bytes | None, str, str, str] | None = None


def _pickle_args(obj: Any) -> bytes:
    """Plain data through the C pickler; what it cannot do, or would
    pickle by reference to ``__main__``, through cloudpickle (by value)."""
    if not getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None):
        try:
            body = pickle.dumps(obj, protocol=PROTOCOL)
            if b"__main__" not in body:
                return body
        except Exception:
            pass
    return cloudpickle.dumps(obj, protocol=PROTOCOL)


def _time(value: Any) -> float:
    """A time a node reported: a finite float, else 0.0 (NaN or infinity
    would poison every duration computed from it)."""
    try:
        t = float(value or 0.0)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return t if math.isfinite(t) else 0.0


def _text(value: Any) -> str:
    if not isinstance(value, str):
        return "" if value is None else str(value)[:MAX_TEXT]
    return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + "\n[... cut: longer than 1 MiB]"


def _read_regular(path: Path, cap: int | None) -> bytes:
    """The bytes of a regular file, never more than its size when opened
    (and ``cap``): a FIFO, a device (a link to /dev/zero) or a file still
    growing never blocks or floods the reader."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputCorrupt(path, "not a regular file", "a FIFO, device or directory is never read as an output")
        if cap is not None and st.st_size > cap:
            raise OutputTooLarge(path, st.st_size, cap)
        os.set_blocking(fd, True)
        parts = []
        left = st.st_size
        while left > 0:
            part = os.read(fd, min(left, 1 << 24))
            if not part:
                break  # (cut short meanwhile: the layout check says "truncated")
            parts.append(part)
            left -= len(part)
        if os.read(fd, 1):
            raise OutputCorrupt(path, "being written", "it grew while it was read")
        return b"".join(parts)
    finally:
        os.close(fd)


class JobDir:
    """One job's directory.  Make it with :meth:`create`, find it again
    with :meth:`open`.  ``scheme``: "hmac-sha256" (a fresh per-job key,
    HTCondor) or "ed25519" (``signer`` holds the private key and stays in
    the master; the ``key`` file is the public key).  ``codec``: how the
    nodes send results back ("pickle", or "safe": never unpickled)."""

    def __init__(self, path: Path, meta: dict, key: bytes, signer: Any = None):
        self.path = Path(path).absolute()  # (engines transfer by absolute path)
        self.name = self.path.name
        self.job_id: str = meta["job"]
        self.scheme: str = meta["scheme"]
        self.codec: str = meta["codec"]
        self.trusted_results: bool = bool(meta.get("trusted_results", False))
        self.python: str = meta.get("python", platform.python_version())
        self.key = key
        self.signer = signer
        self._function_digest: str | None = meta.get("function")
        self._runtime_ready = False

    # --- making and finding ------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | str, name: str, *, scheme: str = "hmac-sha256", codec: str = "pickle",
               signer: Any = None, trusted_results: bool = False) -> "JobDir":
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"a job directory's name is one path component, not {name!r}")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, not {codec!r}")
        if scheme == "hmac-sha256":
            key = new_key()
            if signer is not None:
                raise ValueError("signer= is for scheme='ed25519'")
        elif scheme == "ed25519":
            if signer is None or not hasattr(signer, "sign") or not hasattr(signer, "public_bytes"):
                raise ValueError("scheme='ed25519' needs signer= (pymw_magic.ed25519.SigningKey)")
            key = signer.public_bytes
            if codec == "pickle" and not trusted_results:
                raise ValueError("hosts that hold no secret cannot sign pickled results: use codec='safe', "
                                 "or trusted_results=True for hosts you control")
        else:
            raise ValueError(f"unknown signature scheme {scheme!r} (hmac-sha256 or ed25519)")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / name
        path.mkdir(mode=0o700)  # (FileExistsError: never reuse another job's directory)
        os.chmod(path, 0o700)
        (path / "in").mkdir(mode=0o700)
        (path / "out").mkdir(mode=0o700)
        fd = os.open(path / "key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_file_bytes(scheme, key))
        meta = {"job": uuid.uuid4().hex, "scheme": scheme, "codec": codec, "trusted_results": trusted_results,
                "python": platform.python_version(), "version": __version__, "created": time.time(),
                "name": name}
        write_atomically(str(path / "job.json"), json.dumps(meta).encode(), fsync=False)
        return cls(path, meta, key, signer)

    @classmethod
    def open(cls, path: Path | str, *, signer: Any = None) -> "JobDir":
        path = Path(path)
        try:
            meta = json.loads((path / "job.json").read_bytes())
            scheme, key = parse_key((path / "key").read_bytes(), str(path / "key"))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path} is not a pymw-magic job directory ({exc.filename} is missing)") from None
        except (ValueError, FileError) as exc:
            raise ValueError(f"{path} is not a pymw-magic job directory: {exc}") from None
        if (not isinstance(meta, dict) or meta.get("scheme") != scheme or not isinstance(meta.get("job"), str)
                or meta.get("codec") not in CODECS):
            raise ValueError(f"{path} is not a pymw-magic job directory: its job.json and key disagree")
        if signer is not None and getattr(signer, "public_bytes", None) != key:
            raise ValueError(f"the signer given is not the key job directory {path} was made with "
                             f"(public key {key.hex()[:16]}...): the nodes would refuse what it signs")
        fn = path / "function.bin"
        if fn.exists():
            try:
                header, body = verify(fn.read_bytes(), str(fn), scheme, key)
                meta["function"] = hashlib.sha256(body).hexdigest()
            except FileError:
                pass  # (written again before any new chunk, or every chunk is refused)
        return cls(path, meta, key, signer)

    @property
    def log_path(self) -> Path:
        return self.path / "events.log"

    # --- what the nodes read -----------------------------------------------------------
    def _sign_key(self) -> Any:
        if self.scheme == "hmac-sha256":
            return self.key
        if self.signer is None:
            raise ValueError(f"job directory {self.path} signs with Ed25519: open it with signer=")
        return self.signer

    def _header(self, kind: str) -> dict:
        return {"kind": kind, "job": self.job_id, "codec": self.codec, "python": platform.python_version(),
                "version": __version__}

    def write_function(self, fn: Callable | Any) -> None:
        """``function.bin``: the job's function, pickled once and signed.
        Also takes a :class:`~pymw_magic.payload.FunctionPayload` (its
        pickle is used as it is).  PayloadError naming the captured value
        if it cannot be pickled; nothing is written then."""
        data = getattr(fn, "data", None)
        if isinstance(data, (bytes, bytearray)) and not callable(fn):
            body, name = bytes(data), getattr(fn, "name", "function")
        else:
            if not callable(fn):
                raise TypeError(f"the task function must be callable, not {type_name(fn)}")
            try:
                body = cloudpickle.dumps(fn, protocol=PROTOCOL)
            except Exception as exc:
                raise diagnose(fn, exc) from exc
            name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
        header = dict(self._header("function"), name=str(name))
        write_atomically(str(self.path / "function.bin"), seal(header, body, self.scheme, self._sign_key()),
                         fsync=False)
        self._function_digest = hashlib.sha256(body).hexdigest()

    def write_chunk(self, index: int, tasks: Sequence[tuple[int, tuple, dict]]) -> Path:
        """``in/<index>.in``: the chunk's ``[(seq, args, kwargs), ...]``,
        signed and bound to the function written.  PayloadError naming the
        argument if one cannot be pickled; nothing is written then."""
        if self._function_digest is None:
            raise RuntimeError("write_function() first: a chunk is bound to its job's function")
        if type(index) is not int or index < 0:
            raise ValueError(f"a chunk index is an int >= 0, not {index!r}")
        rows = []
        for task in tasks:
            seq, args, kwargs = task
            if type(seq) is not int:
                raise TypeError(f"a task's seq is an int, not {type_name(seq)}")
            rows.append((seq, tuple(args), dict(kwargs) if kwargs else None))
        try:
            body = _pickle_args(rows)
        except Exception as exc:
            for seq, args, kwargs in rows:
                check_picklable([(f"argument {i} of task {seq}", a) for i, a in enumerate(args)])
                check_picklable([(f"keyword argument {k!r} of task {seq}", v) for k, v in (kwargs or {}).items()])
            raise PayloadError(f"the arguments of chunk {index} cannot be pickled: {exc}") from exc
        header = dict(self._header("input"), index=index, seqs=[r[0] for r in rows],
                      function=self._function_digest)
        path = self.path / "in" / f"{index}.in"
        write_atomically(str(path), seal(header, body, self.scheme, self._sign_key()), fsync=False)
        return path

    def runtime_path(self) -> Path:
        """The runtime zipapp in this directory (copied from the cache on first use)."""
        target = self.path / RUNTIME_NAME
        if not self._runtime_ready:
            from .runtime import runtime_zipapp
            source = runtime_zipapp()
            if not target.exists() or target.read_bytes() != source.read_bytes():
                write_atomically(str(target), source.read_bytes(), fsync=False)
            self._runtime_ready = True
        return target

    def invocation(self, index: int, python: str = "python3") -> Invocation:
        runtime = self.runtime_path()
        return Invocation(
            executable=python,
            arguments=[RUNTIME_NAME, "run", f"{index}.in", f"{index}.out",
                       "--function", "function.bin", "--key", "key"],
            inputs=[runtime, self.path / "function.bin", self.path / "key", self.path / "in" / f"{index}.in"],
            outputs=[f"{index}.out"],
        )

    def output_path(self, index: int) -> Path:
        return self.path / "out" / f"{index}.out"

    # --- what the nodes wrote ----------------------------------------------------------
    def chunk_seqs(self, index: int) -> list[int] | None:
        """The seqs written into chunk ``index`` (from its input's header), or None."""
        try:
            header = peek_header((self.path / "in" / f"{index}.in").read_bytes())
        except OSError:
            return None
        seqs = header.get("seqs")
        return seqs if isinstance(seqs, list) and all(type(s) is int for s in seqs) else None

    def read_output(self, index: int, max_bytes: int | None = None) -> ChunkOutput:
        """The verified, decoded output of chunk ``index``; every task the
        chunk held has an outcome (a task the node did not report fails).
        OutputMissing / OutputCorrupt name the file and what is wrong.
        ``max_bytes``: the largest file read, checked on its size before a
        byte is read (:class:`OutputTooLarge`); default: no cap for a job's
        own signed outputs, MAX_UNTRUSTED for hosts that hold no secret (the
        batch backends always give their ``max_output_mb``)."""
        return self.read_output_file(self.output_path(index), index, max_bytes)

    def read_output_file(self, path: Path | str, index: int, max_bytes: int | None = None) -> ChunkOutput:
        """:meth:`read_output` of a file elsewhere (a replica's result in an
        engine's upload area, say), checked as chunk ``index`` of this job."""
        path = Path(path)
        cap = max_bytes if max_bytes is not None else (MAX_UNTRUSTED if self.scheme == "ed25519" else None)
        try:
            data = _read_regular(path, cap)
        except FileNotFoundError:
            raise OutputMissing(path, "missing", "the node left no output (it died, was evicted, "
                                "or the file was not transferred back)") from None
        except OSError as exc:
            raise OutputMissing(path, "unreadable", str(exc)) from None
        untrusted = self.scheme == "ed25519"
        expect = "sha256" if untrusted else "hmac-sha256"
        try:
            header, body = verify(data, str(path), expect, None if untrusted else self.key)
        except FileError as exc:
            raise OutputCorrupt(path, exc.reason, self._said(data, exc.detail)) from None
        refusal = header.get("job") is None and header.get("index") is None
        if refusal:
            pass  # (a node that could not read its input at all: it says so, for this chunk)
        elif header.get("kind") != "output" or header.get("job") != self.job_id:
            raise OutputCorrupt(path, "wrong job", f"written for job {str(header.get('job'))[:40]!r}, "
                                f"this is {self.job_id!r}")
        elif header.get("index") != index:
            raise OutputCorrupt(path, "wrong job", f"written for chunk {str(header.get('index'))[:20]}, not {index}")
        codec = header.get("codec")
        # The job's codec decides, never the output's header: a node holding
        # the key can sign anything, so a "pickle" output of a safe-codec job
        # is refused unread (a safe output is always readable).
        if codec not in CODECS or (codec == "pickle" and (self.codec != "pickle"
                                                           or (untrusted and not self.trusted_results))):
            raise OutputCorrupt(path, "unsupported", f"results in codec {str(codec)[:20]!r}: this job takes "
                                f"only 'safe' results, never unpickled (a job submitted with "
                                f"trusted_results=True takes pickled ones)")
        try:
            return self._decode(path, header, body, codec, index, untrusted, refusal, cap)
        except OutputError:
            raise
        except Exception as exc:
            raise OutputCorrupt(path, "unreadable", f"{type(exc).__name__}: {exc}") from None

    def _said(self, data: bytes, detail: str) -> str:
        """``detail``, plus what the node's (unverified) output said went
        wrong, as text only: often the reason it could not sign."""
        try:
            _, body, _, _ = open_file(data, "")
            raw = bytes(body)
            meta = json.loads(raw[:raw.index(b"\n")])
            error = meta.get("error")
            if isinstance(error, list) and len(error) >= 2:
                return f"{detail}; the node said (unverified): {str(error[0])[:100]}: {str(error[1])[:500]}"
        except Exception:
            pass
        return detail

    def _decode(self, path: Path, header: dict, body: memoryview, codec: str, index: int, untrusted: bool,
                refusal: bool, cap: int | None = None) -> ChunkOutput:
        raw = bytes(body)
        cut = raw.index(b"\n")
        meta = json.loads(raw[:cut])
        if refusal:
            if not meta.get("error"):
                raise OutputCorrupt(path, "wrong job", "it names no job")
            meta["outcomes"] = []  # (the node could not know the chunk's tasks: ours say)
        sizes = meta["blobs"]
        blobs: list[bytes] = []
        offset = cut + 1
        for size in sizes:
            if type(size) is not int or size < 0 or offset + size > len(raw):
                raise ValueError("its blob table does not match its body")
            blobs.append(raw[offset:offset + size])
            offset += size
        decode: Callable[[bytes], Any]
        if codec == "pickle":
            decode = pickle.loads
        else:
            from . import codec as safe
            # (one budget for the whole output: many small values cannot add up past it)
            budget = safe.Budget(max(safe.MAX_DECODED, DECODED_PER_BYTE * cap) if cap else safe.MAX_DECODED,
                                 name=f"the decode budget of output file {path.name}",
                                 advice=f"raise the output size cap (the budget is {DECODED_PER_BYTE} x it, at "
                                        f"least pymw_magic.codec.MAX_DECODED): max_output_mb of the batch backends")

            # (the file's cap bounds each value already: a raised cap lets a big array through)
            most = max(safe.MAX_BYTES, cap or 0)

            def decode(blob: bytes) -> Any:
                return safe.decode(blob, max_bytes=most, budget=budget)
        wanted = self.chunk_seqs(index)
        allowed = set(wanted) if wanted is not None else None
        outcomes: dict[int, TaskOutcome] = {}
        for rec in meta["outcomes"]:
            if not isinstance(rec, list) or len(rec) not in (6, 10):
                raise ValueError("an outcome row of the wrong shape")
            seq = rec[0]
            if type(seq) is not int or (allowed is not None and seq not in allowed) or seq in outcomes:
                continue  # (a task this chunk did not hold: never taken from a node)
            failure = None
            value = None
            ok = len(rec) == 6
            if ok:
                try:
                    ref = rec[1]
                    if type(ref) is not int:
                        raise ValueError(f"no result blob {str(ref)[:20]}")
                    value = decode(blobs[ref])
                except Exception as exc:
                    ok = False
                    failure = (None, type_name(exc), f"the task's result could not be decoded on the master: "
                               f"{type_name(exc)}: {exc}", "")
            else:
                exc_ref = rec[6]
                exc_bytes = blobs[exc_ref] if (type(exc_ref) is int and codec == "pickle"
                                               and not untrusted) else None
                failure = (exc_bytes, _text(rec[7]), _text(rec[8]), _text(rec[9]))
            outcomes[seq] = TaskOutcome(seq, ok, value, failure, _text(rec[4]), _text(rec[5]),
                                        _time(rec[2]), _time(rec[3]))
        error = meta.get("error")
        chunk_error = None
        if isinstance(error, list) and len(error) == 3:
            chunk_error = (None, _text(error[0]), _text(error[1]), _text(error[2]))
        ended = _time(header.get("ended"))
        for seq in wanted or ():
            if seq not in outcomes:
                why = chunk_error or (None, "pymw_magic.errors.TaskFailed",
                                      f"the output of chunk {index} has no result for task {seq}", "")
                outcomes[seq] = TaskOutcome(seq, False, None, why, "", "", ended, ended)
        order = wanted if wanted is not None else sorted(outcomes)
        return ChunkOutput(host=_text(header.get("host"))[:255], python=_text(header.get("python"))[:40],
                           started=_time(header.get("started")), ended=ended,
                           outcomes=[outcomes[s] for s in order if s in outcomes], error=chunk_error)

    def remove(self) -> None:
        """Delete the directory (only one that looks like a job directory)."""
        if not (self.path / "job.json").exists() and not (self.path / "key").exists():
            if not self.path.exists():
                return
            raise ValueError(f"{self.path} does not look like a pymw-magic job directory: not removed")
        shutil.rmtree(self.path, ignore_errors=False)
