"""The safe result codec: results from hosts we do not control, never unpickled.

A value travels as one JSON document plus NumPy arrays in ``.npy`` form::

    PYMWSAFE1\\n
    {"v": <the value as JSON>, "a": [<byte length of each array>...]}\\n
    <array 0 .npy bytes><array 1 .npy bytes>...

It carries None, bool, int, float (NaN and the infinities too), complex,
str, bytes, lists, tuples (kept as tuples), dicts with str keys, NumPy
arrays of plain dtypes and NumPy scalars.  In the JSON, what plain JSON
cannot say is an object with one ``$`` key: ``{"$t": [...]}`` a tuple,
``{"$f": "nan"}`` a float, ``{"$c": [re, im]}`` a complex, ``{"$b":
"base64"}`` bytes, ``{"$a": i}`` array i, ``{"$s": i}`` a NumPy scalar
(array i, 0-d), ``{"$d": [[key, value], ...]}`` a dict whose keys start
with ``$``.  Decoding reads JSON and ``.npy`` headers only
(``allow_pickle=False``, each array's size checked against its bytes before
anything is allocated), within a size cap, and within a memory budget for
its lists and dicts (:data:`MAX_DECODED`, estimated by counting brackets
before parsing: ``[[],[],...]`` would take ~25 times its size); NumPy is
imported only when an array is there.  Anything else is refused with :class:`CodecError`, which
says how to opt in to pickled results where the hosts are trusted.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys
from typing import Any

from .errors import PayloadError

MAGIC = b"PYMWSAFE1\n"
#: the largest encoded value :func:`decode` reads by default
MAX_BYTES = 256 << 20
#: nesting depth of lists, tuples and dicts
MAX_DEPTH = 200
#: the longest .npy header read (numpy itself writes a few hundred bytes)
MAX_NPY_HEADER = 1 << 20
#: the memory (bytes, estimated before parsing) the lists and dicts of
#: what one read decodes may take: JSON like ``[[],[],...]`` costs ~25
#: times its size once parsed, so a host we do not control could exhaust
#: the master's memory with a file that passes every size cap.  Arrays
#: (``.npy``), numbers and strings do not count; a reader of many values
#: (a chunk's output) shares one :class:`Budget` among them.
MAX_DECODED = 512 << 20
#: what one parsed list and one parsed dict take (CPython, 64-bit: a short
#: list with its spare room, a dict with a key or two); a tagged object
#: (``{"$t": ...}``) leaves only its small result behind
LIST_COST, DICT_COST, TAGGED_COST = 88, 184, 64
#: brackets inside strings are left out of the estimate (a string at a
#: time) only for JSON of at most this many strings: past it the quick
#: count, which counts them too, decides (the exact one would take seconds)
MAX_EXACT_STRINGS = 1 << 20

_OPT_IN = ("return plain data (numbers, strings, lists, tuples, dicts with str keys, NumPy arrays), or, "
           "only on hosts you control, pass trusted_results=True to send results pickled (unpickling "
           "them runs whatever those hosts send)")


class CodecError(PayloadError):
    """A value the safe codec cannot carry, or bytes it will not read."""


class Budget:
    """The memory the containers of one or more decoded values may take
    (estimated, bytes): each :func:`decode` given it takes its share, and
    refuses a value that would overdraw it before parsing it."""

    def __init__(self, total: int, name: str = "pymw_magic.codec.MAX_DECODED",
                 advice: str = "raise pymw_magic.codec.MAX_DECODED"):
        self.total = int(total)
        self.left = int(total)
        #: the limit, and how to raise it, as the refusal says them
        self.name = name
        self.advice = advice

    def take(self, cost: int, what: str) -> None:
        if cost > self.left:
            spent = self.total - self.left
            raise CodecError(f"{what} would take about {cost} bytes of lists and dicts once parsed"
                             + (f" ({spent} already taken by earlier values)" if spent else "")
                             + f", over the limit of {self.total} bytes ({self.name}): refused unread. A "
                             f"result meant to be this big travels best as NumPy arrays (not counted), "
                             f"or {self.advice}")
        self.left -= cost


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def container_cost(raw: bytes, start: int = 0, end: int | None = None) -> int:
    """The estimated memory of the lists and dicts the JSON in
    ``raw[start:end]`` parses into, without parsing it: brackets are
    counted (at C speed; outside strings only when the quick count, which
    counts those in strings too, is over what is asked)."""
    end = len(raw) if end is None else end
    tagged = raw.count(b'{"$', start, end)  # (never inside a string: a quote there is escaped)
    return (raw.count(b"[", start, end) * LIST_COST + raw.count(b"{", start, end) * DICT_COST
            - tagged * (DICT_COST - TAGGED_COST))


def _exact_container_cost(raw: bytes, start: int, end: int) -> int:
    """:func:`container_cost` with the brackets inside strings left out
    (no copy of the text: a string at a time)."""
    cost = container_cost(raw, start, end)
    for m in _STRING.finditer(raw, start, end):
        a, b = m.span()
        cost -= raw.count(b"[", a, b) * LIST_COST + raw.count(b"{", a, b) * DICT_COST
    return cost


def _numpy_array_type(value: Any) -> str | None:
    """"array", "scalar" or None, without importing NumPy for plain data."""
    module = type(value).__module__
    if module != "numpy" and not module.startswith("numpy."):
        return None
    np = sys.modules.get("numpy")
    if np is None:
        return None
    if type(value) is np.ndarray:
        return "array"
    if isinstance(value, np.generic):
        return "scalar"
    return None


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_SCALARS = frozenset((int, str, bool, type(None)))


class _Refused(Exception):
    """Unwinds the walk; the path to the culprit is gathered on the way up."""

    def __init__(self, problem: str, path: list[str]):
        self.problem = problem
        self.path = path


def _npy_parts(arr: Any) -> list[Any]:
    """An array as .npy bytes: its header, then its data (one copy)."""
    import numpy as np
    fmt = np.lib.format
    d = fmt.header_data_from_array_1_0(arr)
    head = io.BytesIO()
    try:
        fmt.write_array_header_1_0(head, d)
    except ValueError:  # (a header too long for format 1.0: many fields)
        head = io.BytesIO()
        fmt.write_array_header_2_0(head, d)
    return [head.getvalue(), arr.tobytes(order="F" if d["fortran_order"] else "C")]


def encode(value: Any) -> bytes:
    """``value`` in the safe codec; CodecError naming the part it cannot carry."""
    arrays: list[list[Any]] = []

    def npy(arr: Any) -> int:
        if arr.dtype.hasobject:
            raise _Refused(f"is a NumPy array of Python objects (dtype {arr.dtype}), which the safe result "
                           f"codec cannot carry", [])
        arrays.append(_npy_parts(arr))
        return len(arrays) - 1

    def walk(v: Any, depth: int) -> Any:
        t = type(v)
        if t in _SCALARS:
            return v
        if t is float:
            return v if math.isfinite(v) else {"$f": repr(v)}
        if depth > MAX_DEPTH:
            raise _Refused(f"is nested deeper than {MAX_DEPTH} levels: the safe result codec stops there", [])
        if t is list or t is tuple:
            out = []
            append = out.append
            i = 0
            try:
                for i, x in enumerate(v):  # (scalars inline: no call per item)
                    tx = type(x)
                    if tx in _SCALARS:
                        append(x)
                    elif tx is float and math.isfinite(x):
                        append(x)
                    else:
                        append(walk(x, depth + 1))
            except _Refused as r:
                r.path.append(f"[{i}]")
                raise
            return out if t is list else {"$t": out}
        if t is dict:
            for k in v:
                if type(k) is not str:
                    raise _Refused(f"is a dict with a key of type {type(k).__name__} ({k!r:.40}); the safe "
                                   f"result codec carries only str keys", [])
            out_d = {}
            k = ""
            try:
                for k, x in v.items():
                    out_d[k] = walk(x, depth + 1)
            except _Refused as r:
                r.path.append(f"[{k!r}]")
                raise
            if any(k[:1] == "$" for k in out_d):
                return {"$d": [[k, x] for k, x in out_d.items()]}
            return out_d
        kind = _numpy_array_type(v)
        if kind == "array":
            return {"$a": npy(v)}
        if kind == "scalar":
            import numpy as np
            return {"$s": npy(np.asarray(v))}
        if t is complex:
            return {"$c": [walk(v.real, depth), walk(v.imag, depth)]}
        if t is bytes:
            return {"$b": base64.b64encode(v).decode("ascii")}
        # Subclasses of the plain types travel as their base type (an IntEnum as its int).
        for base in (bool, int, float, str, bytes, complex):
            if isinstance(v, base):
                return walk(base(v), depth)
        raise _Refused(f"is a {t.__module__}.{t.__qualname__}, which the safe result codec cannot carry", [])

    try:
        doc = walk(value, 0)
    except _Refused as r:
        where = "the result" + "".join(reversed(r.path))
        raise CodecError(f"{where} {r.problem}: {_OPT_IN}") from None
    try:
        head = _ENCODER.encode({"v": doc, "a": [len(a[0]) + len(a[1]) for a in arrays]}).encode("ascii")
    except ValueError as exc:  # (an int past Python's digit limit for text)
        raise CodecError(f"the result cannot be written as JSON ({exc}): {_OPT_IN}") from None
    return b"".join([MAGIC, head, b"\n", *(part for a in arrays for part in a)])


def _read_npy(data: memoryview, where: str) -> Any:
    """One ``.npy`` blob as an array: header read, size checked, no pickle."""
    try:
        import numpy as np
    except ImportError:
        raise CodecError(f"the result holds a NumPy array ({where}): install numpy to read it") from None
    fmt = np.lib.format
    # Only the header is parsed from a stream: magic (8), its length (2 or 4), the header.
    head = bytes(data[:12])
    size = 10 + int.from_bytes(head[8:10], "little") if head[6:7] == b"\x01" else 12 + int.from_bytes(head[8:12], "little")
    if size > MAX_NPY_HEADER:
        raise CodecError(f"{where}: a .npy header of {size} bytes is over the cap of {MAX_NPY_HEADER}")
    fp = io.BytesIO(bytes(data[:size]))
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ValueError(f"npy version {version}")
    except ValueError as exc:
        raise CodecError(f"{where}: not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise CodecError(f"{where}: an array of Python objects is never read (it would need pickle)")
    if any(type(n) is not int or n < 0 for n in shape):
        raise CodecError(f"{where}: not a valid .npy array (shape {shape!r:.80})")
    count = 1
    for n in shape:
        count *= n
    start = fp.tell()
    if start != size:
        raise CodecError(f"{where}: not a valid .npy array (its header ends at {start}, not {size})")
    if count * dtype.itemsize != len(data) - start:
        raise CodecError(f"{where}: its header says {count * dtype.itemsize} bytes of data, "
                         f"it has {len(data) - start}")
    if dtype.itemsize == 0:
        # (zero-size items: the bytes bound nothing, and NumPy may walk
        # every one of a huge count; only an empty array of them is read)
        if count:
            raise CodecError(f"{where}: an array of {count} zero-size items is never read "
                             f"(its size cannot be checked against its bytes)")
        try:
            return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        except (ValueError, MemoryError) as exc:
            raise CodecError(f"{where}: not a valid .npy array ({exc})") from None
    try:
        array = np.frombuffer(data[start:], dtype=dtype, count=count).copy()
        if fortran:
            return array.reshape(shape[::-1]).transpose()
        return array.reshape(shape)
    except ValueError as exc:
        raise CodecError(f"{where}: not a valid .npy array ({exc})") from None


def _hook(obj: dict) -> Any:
    if len(obj) != 1:
        return obj
    (key, val), = obj.items()
    if key[:1] != "$":
        return obj
    if key == "$t" and type(val) is list:
        return tuple(val)
    if key == "$f" and val in ("nan", "inf", "-inf"):
        return float(val)
    if key == "$c" and type(val) is list and len(val) == 2 and all(type(x) in (int, float) for x in val):
        return complex(val[0], val[1])
    if key == "$b" and type(val) is str:
        return base64.b64decode(val, validate=True)
    if key == "$d" and type(val) is list and all(type(p) is list and len(p) == 2 and type(p[0]) is str
                                                 for p in val):
        return {k: v for k, v in val}
    if key in ("$a", "$s") and type(val) is int:
        return _ArrayRef(key, val)
    raise ValueError(f"unknown tag {key!r}")


_DECODER = json.JSONDecoder(object_hook=_hook)


def decode(data: bytes | bytearray | memoryview, max_bytes: int | None = None,
           budget: Budget | None = None) -> Any:
    """The value :func:`encode` made.  Never unpickles; CodecError for
    anything else (a pickle included), more than ``max_bytes``, or lists
    and dicts that would take more memory than ``budget`` has left
    (default: a budget of :data:`MAX_DECODED` for this value alone)."""
    limit = MAX_BYTES if max_bytes is None else max_bytes
    raw = data if type(data) is bytes else bytes(data)
    if len(raw) > limit:
        raise CodecError(f"an encoded result of {len(raw)} bytes is over the cap of {limit}")
    if not raw.startswith(MAGIC):
        raise CodecError("not a safe-codec value (it was not read: pickles are never loaded from these hosts)")
    end = raw.find(b"\n", len(MAGIC))
    if end < 0:
        raise CodecError("a safe-codec value cut short (no end to its JSON line)")
    if budget is None:
        budget = Budget(MAX_DECODED)
    cost = container_cost(raw, len(MAGIC), end)
    if cost > budget.left and raw.count(b'"', len(MAGIC), end) <= 2 * MAX_EXACT_STRINGS:
        cost = _exact_container_cost(raw, len(MAGIC), end)
    budget.take(cost, f"a safe-codec value of {end - len(MAGIC)} bytes of JSON")
    line = raw[len(MAGIC):end]
    try:
        top = _DECODER.decode(line.decode("utf-8"))
        if not isinstance(top, dict) or set(top) != {"v", "a"} or type(top["a"]) is not list:
            raise ValueError("not a value document")
    except RecursionError:
        raise CodecError("a safe-codec value nested too deeply to read") from None
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as exc:  # (Overflow: a complex past float range)
        raise CodecError(f"a malformed safe-codec value ({exc})") from None
    view = memoryview(raw)
    blobs: list[Any] = []
    offset = end + 1
    for n in top["a"]:
        if type(n) is not int or n < 0 or offset + n > len(raw):
            raise CodecError("a safe-codec value whose array table does not match its bytes")
        blobs.append(view[offset:offset + n])
        offset += n
    if offset != len(raw):
        raise CodecError(f"a safe-codec value with {len(raw) - offset} bytes after its end")
    if b'"$a"' not in line and b'"$s"' not in line and b"\\u" not in line:
        return top["v"]  # (no array: nothing to resolve; a key spelled with \u escapes may be one)
    loaded: dict[int, Any] = {}

    def resolve(v: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH + 2:
            raise CodecError("a safe-codec value nested too deeply to read")
        t = type(v)
        if t is _ArrayRef:
            if not 0 <= v.index < len(blobs):
                raise CodecError(f"a reference to array {v.index}, which is not there")
            if v.index not in loaded:
                loaded[v.index] = _read_npy(blobs[v.index], f"array {v.index}")
            arr = loaded[v.index]
            if v.tag == "$s":
                if arr.ndim != 0:
                    raise CodecError(f"array {v.index} is not a scalar")
                return arr[()]
            return arr
        if t is list:
            return [resolve(x, depth + 1) for x in v]
        if t is tuple:
            return tuple(resolve(x, depth + 1) for x in v)
        if t is dict:
            return {k: resolve(x, depth + 1) for k, x in v.items()}
        return v

    return resolve(top["v"])


class _ArrayRef:
    __slots__ = ("tag", "index")

    def __init__(self, tag: str, index: int):
        self.tag = tag
        self.index = index
