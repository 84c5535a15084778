"""The one-shot worker of the batch backends (HTCondor, BOINC), and the
file layout it reads and writes.

Data flow on an execute node or a volunteer host::

    key ──────────────┐  (hmac-sha256: the job's secret; ed25519: the public key)
    function.bin ─────┤ verify ─▶ unpickle fn ─┐
    <i>.in ───────────┘ verify ─▶ unpickle    ─┴▶ run each task ─▶ encode ─▶ <i>.out
                        (nothing is unpickled       (stdout/stderr,          (temp file +
                         before its tag checks)      times, failures)         rename)

``python -m pymw_magic.worker run IN OUT --function F --key K`` and the
shipped zipapp (``python3 pymw-runtime.pyz run ...``, see
:mod:`~pymw_magic.runtime`) both end in :func:`main`.  This module needs
only the standard library, cloudpickle and the package's pure modules
(errors, codec, ed25519): it runs where nothing else is installed.

Every file of the family has one layout::

    PYMW1\\n                  magic and layout version
    {header JSON}\\n          kind, scheme, codec, job, index, seqs, python, body length, ...
    body                      header["body"] bytes
    tag                       the scheme's tag over everything above

Schemes: ``hmac-sha256`` (a 32-byte HMAC with the job's secret key),
``ed25519`` (a 64-byte RFC 8032 signature, verified with a public key; the
private key never leaves the master), ``sha256`` (a plain digest: integrity
only, for outputs written by hosts that hold no secret; never trusted to
unpickle).  The scheme a node accepts is the one its *key file* names, never
the one a file claims.  Codecs say how a result travels: ``pickle`` or
``safe`` (:mod:`~pymw_magic.codec`: JSON and ``.npy``, never unpickled).

An output's body is one JSON line (the tasks' outcomes as rows, see
``OUTCOME_FIELDS``; a failure of the whole chunk) followed by the binary
blobs the rows refer to by index (each result in the job's codec, each
pickled exception under the ``pickle`` codec only).  Outputs are signed
with the job's HMAC key, or, where the node holds no secret (``ed25519``),
sealed with a plain ``sha256`` digest and decoded without pickle.

Whatever goes wrong, the node writes an output saying so (temp file +
rename: a run killed half-way leaves none): an input or function file that
does not verify fails every task with "refused: signature ..." before
anything is unpickled, and the output names no job or chunk (what the
input claimed was not verified); another Python minor than the master's
fails every task with :class:`RuntimeMismatch`; a module the node lacks,
with ModuleNotFoundError naming the host and the fix.  SIGTERM (an engine
evicting or removing the job) ends the run and the processes its tasks
started, without an output, even after a task ignored or blocked it.  A
task that calls ``os._exit()`` fails alone (:class:`TaskExited`): the
chunk's other results still come home.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import os
import pickle
import platform
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterable

import cloudpickle

from .errors import PayloadError, SignatureError, TaskFailed
from .reaper import (become_subreaper, children_of, has_children, is_runtime_helper, process_state,
                     reap_children)
from .version import __version__

MAGIC = b"PYMW1\n"
PROTOCOL = 5
#: the longest header line accepted (a chunk's seqs are in it)
MAX_HEADER = 16 << 20
#: tag length of each scheme
TAG_SIZE = {"hmac-sha256": 32, "ed25519": 64, "sha256": 32}
CODECS = ("pickle", "safe")
KEY_PREFIX = b"pymw-key 1 "
HOST = socket.gethostname()
PYTHON = platform.python_version()


class FileError(SignatureError):
    """A file of the batch family cannot be trusted or read: ``reason`` is
    one of "missing", "empty", "truncated", "not a pymw-magic file",
    "bad signature", "wrong job", "unsupported"; ``path`` names the file."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason, self.detail)


class RuntimeMismatch(TaskFailed):
    """The node cannot run the job's function: another Python minor version
    than the master's (pickled code does not cross minors)."""


# --- keys --------------------------------------------------------------------------------

def key_file_bytes(scheme: str, key: bytes) -> bytes:
    """The text of a key file: the scheme it is for, then the key in hex."""
    if scheme not in ("hmac-sha256", "ed25519"):
        raise ValueError(f"no key file for scheme {scheme!r}")
    return KEY_PREFIX + scheme.encode() + b" " + key.hex().encode() + b"\n"


def parse_key(data: bytes, path: str = "key") -> tuple[str, bytes]:
    """(scheme, key bytes) of a key file; the scheme decides how every file
    is verified, so a file cannot pick a weaker one."""
    parts = data.strip().split(b" ")
    if not data.startswith(KEY_PREFIX) or len(parts) != 4:
        raise FileError(path, "not a pymw-magic key file")
    scheme = parts[2].decode("ascii", "replace")
    try:
        key = bytes.fromhex(parts[3].decode("ascii"))
    except ValueError:
        raise FileError(path, "not a pymw-magic key file", "the key is not hex") from None
    if scheme == "hmac-sha256" and len(key) < 16:
        raise FileError(path, "unsupported", "an HMAC key needs at least 16 bytes")
    if scheme == "ed25519" and len(key) != 32:
        raise FileError(path, "unsupported", "an Ed25519 public key has 32 bytes")
    if scheme not in ("hmac-sha256", "ed25519"):
        raise FileError(path, "unsupported", f"key scheme {scheme!r}")
    return scheme, key


# --- the layout --------------------------------------------------------------------------

def seal(header: dict, body: bytes | memoryview, scheme: str, key: Any) -> bytes:
    """A whole file: magic, header (its ``body`` length filled in), body, tag.
    ``key``: the HMAC secret, an object with ``sign(data) -> bytes`` for
    ed25519, or None for sha256."""
    header = dict(header, scheme=scheme, body=len(body))
    signed = MAGIC + json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    if scheme == "hmac-sha256":
        mac = hmac.new(key, signed, hashlib.sha256)
        mac.update(body)
        tag = mac.digest()
    elif scheme == "sha256":
        h = hashlib.sha256(signed)
        h.update(body)
        tag = h.digest()
    elif scheme == "ed25519":
        tag = key.sign(signed + bytes(body))
    else:
        raise ValueError(f"unknown signature scheme {scheme!r}")
    return b"".join((signed, body, tag))


def open_file(data: bytes, path: str) -> tuple[dict, memoryview, bytes, memoryview]:
    """(header, body, signed part, tag) of a file's bytes, with nothing
    verified yet: only JSON was read (no pickle), to learn the scheme and
    lengths.  FileError for a file that is empty, foreign or truncated."""
    if not data:
        raise FileError(path, "empty")
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise FileError(path, "truncated", f"{len(data)} bytes")
        raise FileError(path, "not a pymw-magic file")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        raise FileError(path, "truncated" if len(data) < len(MAGIC) + MAX_HEADER else "not a pymw-magic file",
                        "the header line does not end")
    try:
        header = json.loads(data[len(MAGIC):end])
        if not isinstance(header, dict):
            raise ValueError("not an object")
        scheme, length = header["scheme"], header["body"]
        if scheme not in TAG_SIZE or not isinstance(length, int) or length < 0:
            raise ValueError(f"scheme {scheme!r}, body {length!r}")
    except RecursionError:  # (a header nested to the parser's limit: never ours)
        raise FileError(path, "not a pymw-magic file", "its header is nested too deeply") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FileError(path, "not a pymw-magic file", f"its header: {exc}") from None
    start = end + 1
    need = start + length + TAG_SIZE[scheme]
    if len(data) < need:
        raise FileError(path, "truncated", f"{len(data)} of {need} bytes")
    if len(data) > need:
        raise FileError(path, "bad signature", f"{len(data) - need} bytes after its end")
    view = memoryview(data)
    return header, view[start:start + length], data[:start], view[start + length:]


def peek_header(data: bytes) -> dict:
    """The header of a file as it claims to be, verified or not, damaged
    or not ({} when there is none): JSON only, for naming what a refusal
    is about."""
    if not data.startswith(MAGIC):
        return {}
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    try:
        header = json.loads(data[len(MAGIC):end if end >= 0 else None])
    except (ValueError, RecursionError):
        return {}
    return header if isinstance(header, dict) else {}


def verify(data: bytes, path: str, scheme: str, key: Any) -> tuple[dict, memoryview]:
    """(header, body) of a file whose tag checks under ``scheme`` and
    ``key`` (the scheme the *reader* expects: the file cannot choose it).
    FileError otherwise; nothing was unpickled."""
    header, body, signed, tag = open_file(data, path)
    if header["scheme"] != scheme:
        raise FileError(path, "bad signature", f"it says {header['scheme']!r}, this reader expects {scheme!r}")
    if scheme == "hmac-sha256":
        mac = hmac.new(key, signed, hashlib.sha256)
        mac.update(body)
        ok = hmac.compare_digest(mac.digest(), bytes(tag))
    elif scheme == "sha256":
        h = hashlib.sha256(signed)
        h.update(body)
        ok = hmac.compare_digest(h.digest(), bytes(tag))
    else:
        from .ed25519 import verify as ed_verify
        ok = ed_verify(key, bytes(data[:len(data) - len(tag)]), bytes(tag))
    if not ok:
        raise FileError(path, "bad signature",
                        "it was altered, truncated, or signed with another key")
    return header, body


#: an output's outcome rows: the first six for a task that succeeded, all ten for one that failed
OUTCOME_FIELDS = ("seq", "value", "start", "end", "stdout", "stderr", "exc", "type", "message", "traceback")


def encode_value(value: Any, codec: str) -> bytes:
    if codec == "pickle":
        # Plain data through the C pickler (several times faster per value);
        # what it cannot do, or would name by ``__main__``, through cloudpickle.
        try:
            data = pickle.dumps(value, protocol=PROTOCOL)
            if b"__main__" not in data:
                return data
        except Exception:
            pass
        return cloudpickle.dumps(value, protocol=PROTOCOL)
    from .codec import encode
    return encode(value)


# --- running a chunk ---------------------------------------------------------------------

def type_name(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def describe_failure(exc: BaseException, with_pickle: bool = True) -> tuple[bytes | None, str, str, str]:
    """An exception as it travels home, as the pool worker describes it:
    (its pickle if it has one that loads again, type name, message,
    traceback text starting at the task)."""
    frames = exc.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename == _THIS_FILE:
        frames = frames.tb_next
    try:
        tb = "".join(traceback.format_exception(type(exc), exc, frames))
    except Exception as why:  # noqa: BLE001 - a hostile exception must not lose the chunk
        tb = f"(its traceback could not be formatted: {type(why).__name__})"
    try:
        message = str(exc)
    except Exception as why:  # noqa: BLE001
        message = f"<str() of the exception failed: {type(why).__name__}>"
    data = None
    if with_pickle:
        try:
            data = cloudpickle.dumps(exc, protocol=PROTOCOL)
            pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
        except Exception:
            data = None
    return data, type_name(exc), message, tb


def _here() -> None:
    pass


#: this module's file as its code objects name it (in the zipapp: its name in the archive)
_THIS_FILE = _here.__code__.co_filename


class _Capture(io.TextIOBase):
    """sys.stdout/stderr during a task: collects its text."""

    def __init__(self, real: Any):
        self.parts: list[str] = []
        self._encoding = getattr(real, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # (as a real text stream: the task's error, not the chunk's)
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.parts.append(text)
        return len(text)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    def take(self) -> str:
        text = "".join(self.parts)
        self.parts.clear()
        return text


def _fix_hint(module: str | None) -> str:
    name = module or "the module"
    return (f"install {name!r} on the execute nodes (or volunteer hosts), choose an interpreter that "
            f"has it with the python= option, or a container image that has it with "
            f"container_image=")


def _explain_load_error(exc: BaseException, what: str) -> BaseException:
    """A clearer exception for what the node lacks to load ``what``."""
    if isinstance(exc, ModuleNotFoundError):
        new: BaseException = ModuleNotFoundError(
            f"{exc} on host {HOST} (Python {PYTHON} at {sys.executable}) while loading {what}: "
            f"{_fix_hint(exc.name)}", name=exc.name)
    else:
        new = PayloadError(
            f"{what} could not be loaded on host {HOST} (Python {PYTHON}): "
            f"{type_name(exc)}: {exc}; a function from a module needs that module importable "
            f"there: {_fix_hint(None)}")
    new.__cause__ = exc
    return new


def _explain_task_error(exc: BaseException) -> BaseException:
    """A task that failed importing a module the node lacks says so."""
    if type(exc) is ModuleNotFoundError and "on host" not in str(exc):
        new = ModuleNotFoundError(f"{exc} on host {HOST} (Python {PYTHON}): {_fix_hint(exc.name)}",
                                  name=exc.name)
        new.__traceback__ = exc.__traceback__
        return new
    return exc


# --- a task's child processes ------------------------------------------------------------
# A task's processes die with it: the one-shot worker is the child
# subreaper of what its tasks start (Linux), so orphans come back to it,
# and after each task it kills every descendant but the interpreter's own
# helpers (multiprocessing's resource tracker and forkserver).

def end_descendants(spare_helpers: bool = True, timeout: float = 3.0) -> int:
    """SIGKILL every descendant (again until none is left, for up to
    ``timeout`` s), sparing the interpreter's helpers when asked."""
    if not has_children():
        return 0  # (the common case, after every task: one system call)
    sent = 0
    deadline = time.monotonic() + timeout
    while True:
        todo = [p for p in children_of() if not (spare_helpers and is_runtime_helper(p))]
        found: list[int] = []
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children_of(pid))
        live = [p for p in found if process_state(p) not in ("Z", "X", "")]
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
                sent += 1
            except OSError:
                pass
        reap_children()
        if not live or time.monotonic() > deadline:
            return sent
        time.sleep(0.002)


# --- the run -----------------------------------------------------------------------------

class Outcome:
    __slots__ = ("seq", "ok", "value", "failure", "stdout", "stderr", "start", "end")

    def __init__(self, seq: int, ok: bool, value: Any, failure: tuple | None,
                 stdout: str, stderr: str, start: float, end: float):
        self.seq, self.ok, self.value, self.failure = seq, ok, value, failure
        self.stdout, self.stderr, self.start, self.end = stdout, stderr, start, end


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileError(path, "missing") from None
    except OSError as exc:
        raise FileError(path, "missing", str(exc)) from None


def _seqs_of(header: dict | None) -> list[int]:
    """The seqs an (unverified) input header lists: ints only, for naming
    the tasks that a refusal fails."""
    seqs = header.get("seqs") if isinstance(header, dict) else None
    if isinstance(seqs, list) and all(type(s) is int for s in seqs):
        return seqs
    return []


#: the output header of a refused input: what its own header claims (job,
#: chunk) was not verified, so the output names none; the master knows
#: which chunk it asked for
REFUSED = {"codec": "safe"}


def run_chunk(input_path: str, function_path: str, key_path: str) -> tuple[dict, list[Outcome], tuple | None, Any, str]:
    """Verify, load and run one chunk: (the input's header or {}, outcomes,
    a failure of the whole chunk or None, the key to sign the output with,
    the output's scheme)."""
    header: dict = {}
    now = time.time()

    def fail_all(exc: BaseException, with_pickle: bool) -> list[Outcome]:
        failure = describe_failure(exc, with_pickle)
        return [Outcome(s, False, None, failure, "", "", now, now) for s in _seqs_of(header)]

    # The key file decides the scheme; without it nothing can be trusted.
    try:
        scheme, key = parse_key(_read(key_path), key_path)
    except FileError as exc:
        try:
            header = peek_header(_read(input_path))
        except FileError:
            pass
        refusal = SignatureError(f"refused: signature: no usable key ({exc}); nothing was unpickled")
        return REFUSED, fail_all(refusal, False), describe_failure(refusal, False), None, "sha256"
    out_scheme, out_key = ("hmac-sha256", key) if scheme == "hmac-sha256" else ("sha256", None)
    data = b""
    try:
        data = _read(input_path)
        header, body = verify(data, input_path, scheme, key)
        fn_header, fn_body = verify(_read(function_path), function_path, scheme, key)
        if header.get("kind") != "input" or fn_header.get("kind") != "function":
            raise FileError(input_path, "bad signature", "not an input and a function file")
        if fn_header.get("job") != header.get("job"):
            raise FileError(function_path, "wrong job", "its job is not the input's")
        if header.get("function") != hashlib.sha256(fn_body).hexdigest():
            raise FileError(function_path, "wrong job", "not the function the input was written for")
    except FileError as exc:
        if not header:
            header = peek_header(data)  # (only to name its tasks and the output)
        refusal = SignatureError(f"refused: signature: {exc} on host {HOST}; nothing in it was unpickled, "
                                 "no task ran")
        return REFUSED, fail_all(refusal, False), describe_failure(refusal, False), out_key, out_scheme
    codec = header.get("codec", "pickle")
    safe = codec != "pickle"
    # Pickled code does not cross Python minor versions: say so before unpickling.
    want = str(header.get("python", ""))
    if want.split(".")[:2] != PYTHON.split(".")[:2]:
        mismatch = RuntimeMismatch(
            f"host {HOST} runs Python {PYTHON} ({sys.executable}) but the job was made with Python "
            f"{want}: the function cannot be loaded there. Run the same minor version on the nodes: "
            f"python= (an interpreter with Python {'.'.join(want.split('.')[:2])}), or "
            f"container_image= (an image with it)")
        return header, fail_all(mismatch, not safe), describe_failure(mismatch, not safe), out_key, out_scheme
    try:
        fn = pickle.loads(fn_body)
    except BaseException as exc:
        error = _explain_load_error(exc, "the task function")
        return header, fail_all(error, not safe), describe_failure(error, not safe), out_key, out_scheme
    try:
        tasks = pickle.loads(body)
    except BaseException as exc:
        error = _explain_load_error(exc, "the tasks' arguments")
        return header, fail_all(error, not safe), describe_failure(error, not safe), out_key, out_scheme
    return header, run_tasks(fn, tasks, codec), None, out_key, out_scheme


SIGTERM_BLOCKABLE = hasattr(signal, "pthread_sigmask")
_REAL_EXIT = os._exit


class _TaskExit(SystemExit):
    """os._exit() called by a task in the worker's own process: the task
    ends with a failure, the chunk's other results are kept."""


class TaskExited(TaskFailed):
    """A task called ``os._exit()``: in the one-shot worker that would end
    the whole chunk without an output, so the task fails instead."""


def _exit_guard(me: int) -> Callable[[int], Any]:
    def _exit(n: int) -> None:
        if os.getpid() != me:
            _REAL_EXIT(n)  # (a fork's child ends as asked: multiprocessing does this)
        raise _TaskExit(n)
    return _exit


def _sigmask(mask: Any) -> Any:
    """The thread's blocked signals (set to ``mask`` when given), None where unknown."""
    if not SIGTERM_BLOCKABLE:
        return None
    if mask is None:
        return signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def run_tasks(fn: Callable, tasks: Iterable[tuple[int, tuple, dict]], codec: str = "pickle") -> list[Outcome]:
    """Run each (seq, args, kwargs) with its output captured; a task's
    result that the codec cannot carry fails that task."""
    safe = codec != "pickle"
    out, err = _Capture(sys.stdout), _Capture(sys.stderr)
    outcomes: list[Outcome] = []
    clock = time.time
    me = os.getpid()
    saved = sys.stdout, sys.stderr
    on_term = signal.getsignal(signal.SIGTERM)
    mask = _sigmask(None)
    sys.stdout, sys.stderr = out, err
    os._exit = _exit_guard(me)  # (restored below: only a task's call is caught)
    try:
        for seq, args, kwargs in tasks:
            start = clock()
            try:
                value = fn(*args, **kwargs) if kwargs else fn(*args)
                ok, failure = True, None
            except BaseException as exc:  # SystemExit too: the other tasks still run
                value, ok = None, False
                if type(exc) is _TaskExit:
                    exc = TaskExited(f"the task called os._exit({exc.code}) on host {HOST}: in a batch "
                                     f"job that would end its whole chunk without results, so this task "
                                     f"fails instead (return or raise from the task)")
                failure = describe_failure(_explain_task_error(exc), not safe)
            end = clock()
            if os.getpid() != me:
                _REAL_EXIT(0)  # a fork the task made, returning here: it must not run the rest
            outcomes.append(Outcome(seq, ok, value, failure, out.take(), err.take(), start, end))
            end_descendants()
            if on_term is not None and signal.getsignal(signal.SIGTERM) is not on_term:
                # (a task that took SIGTERM over must not keep an evicted run going
                # to write an output the engine no longer expects)
                try:
                    signal.signal(signal.SIGTERM, on_term)
                except ValueError:
                    pass  # (not the main thread: only a caller in-process, never a node)
            if mask is not None and SIGTERM_BLOCKABLE and signal.SIGTERM in _sigmask(None):
                _sigmask(mask)  # (nor one that blocked it)
    finally:
        os._exit = _REAL_EXIT
        sys.stdout, sys.stderr = saved
    return outcomes


def output_bytes(header: dict, outcomes: list[Outcome], chunk_failure: tuple | None,
                 started: float, scheme: str, key: Any) -> bytes:
    """The signed output file for a run."""
    codec = header.get("codec", "pickle")
    if codec not in CODECS:
        codec = "safe"  # (an unknown codec is never answered with a pickle)
    blobs: list[bytes] = []
    records = []

    def blob(data: bytes) -> int:
        blobs.append(data)
        return len(blobs) - 1

    for o in outcomes:
        value_ref = None
        failure = o.failure
        if o.ok:
            try:
                value_ref = blob(encode_value(o.value, codec))
            except Exception as exc:
                if codec == "pickle":
                    exc = PayloadError(f"the task's result ({type_name(o.value)}) cannot be pickled to send it "
                                       f"back to the master: {exc}")
                failure = describe_failure(exc, codec == "pickle")
        exc_ref = None
        if failure is not None and failure[0] is not None and codec == "pickle":
            exc_ref = blob(failure[0])
        if failure is None:
            records.append([o.seq, value_ref, o.start, o.end, o.stdout, o.stderr])
        else:
            records.append([o.seq, None, o.start, o.end, o.stdout, o.stderr, exc_ref, *failure[1:]])
    meta = {"fields": list(OUTCOME_FIELDS), "outcomes": records, "blobs": [len(b) for b in blobs],
            "error": list(chunk_failure[1:]) if chunk_failure else None}
    body = json.dumps(meta, separators=(",", ":")).encode() + b"\n" + b"".join(blobs)
    out_header = {
        "kind": "output", "codec": codec, "job": header.get("job"), "index": header.get("index"),
        "host": HOST, "python": PYTHON, "version": __version__,
        "started": started, "ended": time.time(),
    }
    return seal(out_header, body, scheme, key)


def write_atomically(path: str, data: bytes, fsync: bool = True) -> None:
    """``data`` at ``path``, all or nothing: a temp file beside it, renamed."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pymw-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def run_files(input_path: str, output_path: str, function_path: str | None = None,
              key_path: str | None = None) -> int:
    """Run one input file into one output file. 0 when an output was written."""
    # Absolute now: a task may change the directory before the output is written.
    input_path, output_path = os.path.abspath(input_path), os.path.abspath(output_path)
    here = os.path.dirname(input_path)
    function_path = os.path.abspath(function_path or os.path.join(here, "function.bin"))
    key_path = os.path.abspath(key_path or os.path.join(here, "key"))
    started = time.time()
    become_subreaper()
    # Evicted or removed (SIGTERM): the task's processes go too, and no
    # output is written: the run did not finish, and the engine runs it again.
    signal.signal(signal.SIGTERM, _terminated)
    header: dict = {}
    scheme, key = "sha256", None
    try:
        header, outcomes, chunk_failure, key, scheme = run_chunk(input_path, function_path, key_path)
    except BaseException as exc:  # never end without an output that says why
        outcomes = []
        chunk_failure = describe_failure(exc, False)
    finally:
        end_descendants(spare_helpers=False)
    try:
        data = output_bytes(header, outcomes, chunk_failure, started, scheme, key)
    except BaseException as exc:
        data = output_bytes(header, [], describe_failure(exc, False), started, scheme, key)
    write_atomically(output_path, data)
    return 0


def _terminated(signum: int, frame: Any) -> None:
    try:
        end_descendants(spare_helpers=False, timeout=1.0)
    finally:
        _REAL_EXIT(128 + signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` command's arguments (shared with ``python -m pymw_magic.worker``)."""
    parser.add_argument("input", help="the signed input file (one chunk of tasks)")
    parser.add_argument("output", help="where to write the output file")
    parser.add_argument("--function", default=None, help="the job's function file (default: function.bin beside IN)")
    parser.add_argument("--key", default=None, help="the key file (default: key beside IN)")


def main(argv: list[str] | None = None) -> int:
    """``pymw-runtime.pyz run IN OUT [--function F] [--key K]``."""
    parser = argparse.ArgumentParser(prog="pymw-runtime.pyz", description="pymw-magic one-shot worker")
    sub = parser.add_subparsers(dest="mode", required=True)
    add_arguments(sub.add_parser("run", help="run one input file into one output file"))
    sub.add_parser("version", help="print the runtime's version and Python")
    ns = parser.parse_args(argv)
    if ns.mode == "version":
        print(f"pymw-magic {__version__} runtime, Python {PYTHON} on {HOST}")
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the batch system decides what ends us)
    return run_files(ns.input, ns.output, ns.function, ns.key)
