"""What crosses a process boundary: pickling, function payloads, signatures.

This module owns three things and nothing else:

* **pickling** — cloudpickle with protocol 5 and out-of-band buffers, so a
  large NumPy array travels as raw bytes beside the pickle rather than
  inside it (``dumps``/``loads``);
* **function payloads** — a job's function pickled *once* in the master
  (:class:`FunctionPayload`) with the environment it runs in (the master's
  directory, ``sys.path``, the stamps of the user modules it uses:
  :func:`modules_used`), shipped once to each worker and kept there; the
  master's :class:`FunctionCache` is thread-safe and bounded, and
  :class:`WorkerFunctions` tracks what each worker holds and should
  forget; if a function cannot be pickled, :func:`diagnose` finds the
  captured global, closure cell or default that is to blame and
  :class:`PayloadError` names it and its type;
* **signatures** — :class:`Signer`, HMAC-SHA256 with a per-master key.
  Every frame carries a MAC over all its bytes and the receiver checks it
  before unpickling anything, because unpickling is code execution.  Bulk
  bytes (a frame's large out-of-band buffers) are authenticated with
  Poly1305 under a one-time key derived from the master's key and a fresh
  nonce, and that tag is covered by the frame's HMAC: every byte is still
  authenticated, at 5 GB/s instead of SHA-256's 1.3.

Transports (``transport.py`` for pipes, the MPI backend for MPI messages)
move the bytes; they never pickle or verify by themselves.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import sys
import threading
import types
import weakref
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Iterable

import cloudpickle

from .environment import EnvWatch, ModuleWatch, Stamp, WorkerEnv, user_module_file
from .errors import PayloadError, SignatureError

PROTOCOL = 5
MAC_SIZE = 32
KEY_SIZE = 32
NONCE_SIZE = 16

try:  # the fast bulk MAC; without it every byte goes through HMAC-SHA256
    from cryptography.hazmat.primitives.poly1305 import Poly1305
except ImportError:  # pragma: no cover - cryptography is a core dependency
    Poly1305 = None

#: frames whose out-of-band buffers reach this size use the bulk MAC
BULK_THRESHOLD = 256 * 1024


def new_key() -> bytes:
    """A fresh random per-master signing key."""
    return os.urandom(KEY_SIZE)


def dumps(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj``; large contiguous buffers (NumPy arrays, bytearrays
    wrapped in PickleBuffer) come back out-of-band, uncopied.

    Plain data goes through the C pickler, three times faster than
    cloudpickle's for the small frames that dominate.  Anything the C
    pickler cannot do, or would do by reference to ``__main__`` (a notebook's
    functions and classes do not exist by that name in a worker), goes
    through cloudpickle, which pickles it by value.
    """
    buffers: list[pickle.PickleBuffer] = []
    if not _by_value_modules():
        try:
            body = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
            if b"__main__" not in body:
                return body, buffers
        except Exception:
            pass
        buffers.clear()
    body = cloudpickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    return body, buffers


def _by_value_modules() -> bool:
    """True if the user asked cloudpickle to pickle some module by value
    (``cloudpickle.register_pickle_by_value``): then only cloudpickle will do."""
    return bool(getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None))


def loads(body: bytes | bytearray | memoryview, buffers: Iterable[Any] = ()) -> Any:
    """Unpickle what :func:`dumps` made. Only call on verified bytes."""
    return pickle.loads(body, buffers=buffers)


class Signer:
    """HMAC-SHA256 over a frame's parts, with one key per master.

    The keyed inner and outer hash states are computed once (RFC 2104) and
    copied per frame: a small frame is signed in about a microsecond instead
    of the several that ``hmac.new`` spends re-hashing the key each time.

    :meth:`new_bulk` is for frames with megabytes of raw buffers: those go
    through Poly1305 (``update_bulk``), keyed with
    ``HMAC(key, "pymw-bulk" + nonce)`` — a key used for one frame only, as
    Poly1305 requires — and its 16-byte tag is fed to the frame's HMAC
    before the digest.  This is the key derivation of ChaCha20-Poly1305
    with HMAC as the PRF; forging the buffers means forging that tag.
    """

    __slots__ = ("key", "_inner", "_outer")

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("a signing key needs at least 16 bytes")
        self.key = key
        block = hashlib.sha256().block_size
        padded = key.ljust(block, b"\0") if len(key) <= block else hashlib.sha256(key).digest().ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def new(self) -> "_Mac":
        return _Mac(self._inner.copy(), self._outer)

    def new_bulk(self, nonce: bytes) -> "_Mac":
        """A MAC for one frame whose bulk bytes go through Poly1305."""
        if Poly1305 is None:
            raise SignatureError("a frame uses the bulk MAC (Poly1305), which needs the 'cryptography' "
                                 "package: pip install cryptography")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a bulk nonce has {NONCE_SIZE} bytes")
        one_time = self.sign([b"pymw-bulk", nonce])
        mac = _Mac(self._inner.copy(), self._outer, Poly1305(one_time))
        mac.update(nonce)
        return mac

    def sign(self, parts: Iterable[bytes | memoryview]) -> bytes:
        mac = self.new()
        for part in parts:
            mac.update(part)
        return mac.digest()

    @staticmethod
    def check(expected: bytes, got: bytes | memoryview) -> None:
        if not hmac.compare_digest(expected, bytes(got)):
            raise SignatureError(
                "a frame's signature did not verify; it was discarded unread "
                "(it was not sent by this master, or it was altered on the way)")


class _Mac:
    """One frame's MAC in progress: ``update`` for the frame's header and
    pickle, ``update_bulk`` for its raw buffers, then ``digest``."""

    __slots__ = ("_inner", "_outer", "_bulk")

    def __init__(self, inner: Any, outer: Any, bulk: Any = None):
        self._inner = inner
        self._outer = outer
        self._bulk = bulk

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.update(data)

    def update_bulk(self, data: bytes | bytearray | memoryview) -> None:
        (self._bulk or self._inner).update(data)

    def digest(self) -> bytes:
        if self._bulk is not None:
            self._inner.update(self._bulk.finalize())
            self._bulk = None
        outer = self._outer.copy()
        outer.update(self._inner.digest())
        return outer.digest()


def type_name(value: Any) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _captured(fn: Callable, seen: set[int]) -> Iterable[tuple[str, Any]]:
    """The (name, value) pairs a function carries with it when pickled by
    value: the globals its code reads (nested code objects too), closure
    cells and defaults."""
    if id(fn) in seen:
        return
    seen.add(id(fn))
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    fn_globals = getattr(fn, "__globals__", {})

    def names(co: types.CodeType) -> Iterable[str]:
        yield from co.co_names
        for const in co.co_consts:
            if isinstance(const, types.CodeType):
                yield from names(const)

    for name in dict.fromkeys(names(code)):
        if name in fn_globals:
            yield name, fn_globals[name]
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            yield name, cell.cell_contents
        except ValueError:  # an empty cell
            continue
    for i, default in enumerate(fn.__defaults__ or ()):
        yield f"default #{i}", default
    for name, default in (fn.__kwdefaults__ or {}).items():
        yield name, default


def diagnose(fn: Callable, error: BaseException) -> PayloadError:
    """Explain why ``fn`` cannot be pickled, naming the captured value."""
    def find(f: Callable, seen: set[int]) -> str | None:
        for name, value in _captured(f, seen):
            if isinstance(value, (types.FunctionType, types.LambdaType)):
                inner = find(value, seen)
                if inner is not None:
                    return inner
                continue
            if isinstance(value, types.ModuleType):
                continue
            try:
                cloudpickle.dumps(value, protocol=PROTOCOL)
            except Exception as exc:
                return f"{name!r} ({type_name(value)}) cannot be sent to workers: {exc}"
        return None

    culprit = find(fn, set())
    fname = getattr(fn, "__qualname__", repr(fn))
    if culprit is None:
        return PayloadError(f"function {fname!r} cannot be pickled: {error}")
    return PayloadError(f"{culprit} (captured by function {fname!r}). "
                        "Create it inside the task, or pass something picklable instead.")


class FunctionPayload:
    """A job's function, pickled once in the master, with what a worker
    needs to run it as the notebook would: the master's directory and
    ``sys.path`` (``env``, a :class:`~pymw_magic.environment.WorkerEnv`) and
    the stamps of the user modules it uses (``modules``), so a worker
    reloads a module edited since it imported it.

    A worker receives it once (:meth:`wire`) and keeps its bytes under
    ``id``; tasks then carry only their arguments.  It also keeps the
    running estimate of one call's duration that the chunking policy uses.
    ``retired`` is set when the master's cache drops it: workers are then
    told to forget it (a job still holding it gets it sent again).
    """

    __slots__ = ("id", "name", "data", "mean", "samples", "env", "modules", "retired")

    def __init__(self, id: int, name: str, data: bytes, env: WorkerEnv | None = None,
                 modules: tuple[tuple[str, Stamp | None], ...] = ()):
        self.id = id
        self.name = name
        self.data = data
        self.env = env
        self.modules = modules
        self.retired = False
        self.mean: float | None = None  # seconds per call, smoothed
        self.samples = 0

    def wire(self) -> tuple:
        """What a worker is sent to learn this function."""
        return self.id, self.data, self.env, self.modules

    def observe(self, seconds_per_call: float, calls: int) -> None:
        """Fold a batch's measured mean into the estimate."""
        if self.mean is None:
            self.mean = seconds_per_call
        else:
            # Heavier weight for bigger batches: they measure better.
            w = min(0.5, 0.1 + calls / 1000)
            self.mean += w * (seconds_per_call - self.mean)
        self.samples += calls


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), range, frozenset)


def _fingerprint(fn: Callable, keep: list[Any], seen: set[int] | None = None) -> tuple | None:
    """Identities of everything ``fn`` would carry if pickled by value, or
    None if any of it is mutable (then it must be pickled afresh each time,
    or a worker could run with a stale copy).

    Each object whose identity is recorded goes into ``keep``: the cache
    holds those alive, so that no new object can take the same ``id()``
    while the fingerprint is compared against (CPython reuses the address
    of a freed object at once: ``x += 1`` in a loop would otherwise look
    unchanged)."""
    seen = set() if seen is None else seen
    code = getattr(fn, "__code__", None)
    keep.append(code)
    parts: list[Any] = [id(fn), id(code)]
    for name, value in _captured(fn, seen):
        if isinstance(value, (types.FunctionType, types.LambdaType)):
            keep.append(value)
            inner = _fingerprint(value, keep, seen) if id(value) not in seen else (id(value),)
            if inner is None:
                return None
            parts.append(inner)
        elif isinstance(value, (types.ModuleType, types.BuiltinFunctionType)):
            keep.append(value)
            parts.append(id(value))
        elif isinstance(value, _IMMUTABLE) or (
                isinstance(value, tuple) and all(isinstance(v, _IMMUTABLE) for v in value)):
            keep.append(value)
            parts.append((name, id(value)))
        else:
            return None
    return tuple(parts)


#: payloads retired from any cache so far: a pool rescans what a worker
#: holds only when this moved (read without a lock: an int is read whole)
_retired_count = 0
_retire_lock = threading.Lock()


def _note_retired(n: int) -> None:
    global _retired_count
    with _retire_lock:
        _retired_count += n


class FunctionCache:
    """Pickles functions for one master and deduplicates identical payloads,
    so resubmitting the same function reuses the copy workers already hold.

    Pickling a notebook function by value costs tens of microseconds, more
    than the rest of a submit; so a function whose captured values are all
    immutable and unchanged (same identities) reuses its last pickle.  One
    that captures anything mutable is pickled again at every submit, so
    workers always see the values as they were at submit time.  Either way
    a payload is new when the master's directory, ``sys.path`` or the file
    of a user module the function uses changed (see :mod:`.environment`).

    Safe to call from many threads: ids are unique.  The cache is bounded
    (least recently used first out, by count and by bytes; the newest entry
    always stays): a payload dropped from it is ``retired``, which tells
    the pools to have workers forget it.  Jobs hold their payload object,
    so dropping it here never breaks a job still running.
    """

    #: default bounds: payloads kept, and their total pickled bytes
    MAX_ENTRIES = 256
    MAX_BYTES = 32 << 20

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        self.max_entries = self.MAX_ENTRIES if max_entries is None else max_entries
        self.max_bytes = self.MAX_BYTES if max_bytes is None else max_bytes
        if self.max_entries < 1 or self.max_bytes < 0:
            raise ValueError("a function cache keeps at least one payload and a byte count >= 0")
        # One lock for the tables and the id counter; pickling happens outside it.
        self._lock = threading.Lock()
        # id -> (payload, its key), least recently used first
        self._lru: OrderedDict[int, tuple[FunctionPayload, tuple]] = OrderedDict()
        self._by_key: dict[tuple, FunctionPayload] = {}   # (pickle, env, module stamps) -> payload
        self._nbytes = 0
        # fn -> (fingerprint or None, the objects it identifies, kept alive,
        #        payload id, the user modules' files)
        self._by_fn: "weakref.WeakKeyDictionary[Callable, tuple]" = weakref.WeakKeyDictionary()
        self._builtins: dict[Callable, tuple] = {}
        self._next_id = 0
        self._env = EnvWatch()
        self._modules = ModuleWatch()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        """Pickled bytes of the payloads kept."""
        return self._nbytes

    def get(self, fn: Callable) -> FunctionPayload:
        if not callable(fn):
            raise TypeError(f"the task function must be callable, not {type_name(fn)}")
        with self._lock:
            env = self._env.current()
            try:
                cached = self._by_fn.get(fn)
            except TypeError:  # not weak-referenceable (a builtin) or not hashable
                cached = self._builtins.get(fn) if isinstance(fn, types.BuiltinFunctionType) else None
            entry = self._lru.get(cached[2]) if cached is not None else None
            if entry is not None:  # used now, even if found stale below: harmless
                self._lru.move_to_end(cached[2])
        by_ref = _by_reference(fn)
        files = cached[3] if cached is not None else ()
        fresh = (entry is not None and (entry[0].env is env or entry[0].env == env)
                 and (not files or self._modules.stamps(files) == entry[0].modules))
        if fresh and by_ref:
            return entry[0]  # pickled by reference: its pickle cannot go stale
        keep: list[Any] = []
        print_ = _fingerprint(fn, keep) if isinstance(fn, types.FunctionType) else None
        if fresh and print_ is not None and cached[0] == print_:
            return entry[0]
        try:
            data = cloudpickle.dumps(_with_source(fn), protocol=PROTOCOL)
        except Exception as exc:
            raise diagnose(fn, exc) from exc
        files = modules_used(fn)
        key = (data, env, self._modules.stamps(files))
        with self._lock:
            fp = self._by_key.get(key)
            if fp is None:
                self._next_id += 1
                name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
                fp = self._by_key[key] = FunctionPayload(self._next_id, name, data, env, key[2])
                self._lru[fp.id] = (fp, key)
                self._nbytes += len(data)
                self._evict()
            else:
                self._lru.move_to_end(fp.id)
            if print_ is not None or by_ref:
                try:
                    self._by_fn[fn] = (print_, keep, fp.id, files)
                except TypeError:
                    if isinstance(fn, types.BuiltinFunctionType):  # (a module's: lives for ever anyway)
                        self._builtins[fn] = (print_, keep, fp.id, files)
        return fp

    def _evict(self) -> None:
        """Drop the least recently used payloads beyond the bounds (the
        newest always stays, however big).  Under the lock."""
        dropped = 0
        while len(self._lru) > 1 and (len(self._lru) > self.max_entries or self._nbytes > self.max_bytes):
            _, (old, key) = self._lru.popitem(last=False)
            del self._by_key[key]
            self._nbytes -= len(old.data)
            old.retired = True  # before the count moves: a pool that sees the count sees this
            dropped += 1
        if dropped:
            _note_retired(dropped)


class WorkerFunctions:
    """The master's record of the payloads one worker holds, by id: which a
    batch must send along, and which the worker should forget (retired
    from the master's cache and not used by this batch)."""

    __slots__ = ("held", "_seen")

    def __init__(self) -> None:
        self.held: dict[int, FunctionPayload] = {}
        self._seen = -1  # the retirement count last scanned at

    def plan(self, fns: dict[int, FunctionPayload]) -> tuple[list[int], list[int], int]:
        """(ids to send, ids to forget, the retirement count it saw)."""
        held = self.held
        new = [i for i in fns if i not in held]
        seen = _retired_count  # read before the flags: see _evict
        if seen == self._seen or not held:
            return new, [], seen
        return new, [i for i, fp in held.items() if fp.retired and i not in fns], seen

    def commit(self, fns: dict[int, FunctionPayload], plan: tuple[list[int], list[int], int]) -> None:
        """The batch planned was sent."""
        new, forget, seen = plan
        held = self.held
        for i in forget:
            held.pop(i, None)
        for i in new:
            held[i] = fns[i]
        # A retired payload a job still uses stays until a batch goes without it.
        self._seen = -1 if any(fp.retired for fp in fns.values()) else seen


#: source text shipped with a ``__main__`` function for its tracebacks, at most
_MAX_SOURCE = 1 << 20


def _with_source(fn: Callable) -> Any:
    """What to pickle for ``fn``.  A function of ``__main__`` (a notebook's,
    a script's) travels by value, and cloudpickle renames its file
    ``<dynamic-code>``: wrapped in a :class:`~pymw_magic.cellfunc.BoundCell`
    it keeps its file name and takes its source along (from linecache,
    where IPython keeps its cells), so a remote traceback shows the lines
    that failed.  Anything else is pickled as it is."""
    if not isinstance(fn, types.FunctionType) or fn.__module__ != "__main__":
        return fn
    import linecache

    from .cellfunc import BoundCell

    filename = fn.__code__.co_filename
    text = "".join(linecache.getlines(filename, fn.__globals__))
    if not text or len(text) > _MAX_SOURCE:
        return fn
    return BoundCell(fn, filename, text)


def _by_reference(fn: Callable) -> bool:
    """True if cloudpickle pickles ``fn`` as a reference (module + name),
    which cannot change: a plain function of an importable module, not of
    ``__main__`` nor of a module registered to be pickled by value."""
    if isinstance(fn, types.BuiltinFunctionType):  # operator.neg, math.sqrt: by reference too
        module = fn.__self__
        return (isinstance(module, types.ModuleType) and not _by_value_modules()
                and getattr(module, fn.__name__, None) is fn)
    if not isinstance(fn, types.FunctionType) or fn.__module__ in (None, "__main__"):
        return False
    module = sys.modules.get(fn.__module__)
    if module is None or _by_value_modules():
        return False
    return getattr(module, fn.__qualname__, None) is fn


def modules_used(fn: Callable) -> tuple[tuple[str, str], ...]:
    """``(module, file)`` of each user module (see
    :func:`~pymw_magic.environment.user_module_file`) that ``fn`` uses by
    reference: its own module, and those of the modules, functions, classes
    and instances it captures (through the functions it captures by value
    and those of its own module, whose globals it shares).  A worker must
    reload these when their files change, or it runs their old code."""
    found: dict[str, str] = {}
    seen: set[int] = set()

    def add(name: Any) -> None:
        if isinstance(name, str) and name not in found:
            path = user_module_file(name)
            if path is not None:
                found[name] = path

    def visit(f: Any) -> None:
        while isinstance(f, partial):
            for value in (*f.args, *f.keywords.values()):
                add(type(value).__module__)
            f = f.func
        if isinstance(f, types.MethodType):
            add(type(f.__self__).__module__)
            f = f.__func__
        if getattr(f, "__code__", None) is None:  # a class, or an instance with __call__
            add(getattr(f, "__module__", None) if isinstance(f, type) else type(f).__module__)
            return
        add(getattr(f, "__module__", None))
        for _, value in _captured(f, seen):
            if isinstance(value, types.FunctionType):
                if id(value) not in seen:
                    visit(value)
            elif isinstance(value, types.ModuleType):
                add(value.__name__)
            elif isinstance(value, type):
                add(value.__module__)
            else:
                add(type(value).__module__)

    visit(fn)
    return tuple(found.items())


def check_picklable(values: Iterable[tuple[str, Any]]) -> None:
    """Raise PayloadError naming the first value that cannot be pickled."""
    for label, value in values:
        try:
            cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=lambda b: None)
        except Exception as exc:
            raise PayloadError(f"{label} ({type_name(value)}) cannot be sent to workers: {exc}") from exc
