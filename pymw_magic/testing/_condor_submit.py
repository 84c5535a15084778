"""The submit language, as the stand-in schedd reads it.

Owns what ``condor_submit`` would do with a submit description before a job
ad exists: the queue statement and its item data (as ``htcondor2`` builds
``QUEUE k1,k2 FROM (...)``), macro expansion (done by ``htcondor2.Submit``
itself, with the proc's item variables and ``$(ClusterId)``/``$(ProcId)``
set), the old and new syntaxes of ``arguments`` and ``environment``, file
lists, output remaps and the units of ``request_memory``/``request_disk``.
Pure functions; no process, no I/O beyond ``Submit.itemdata``.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import classad2
import htcondor2

#: the sentinel htcondor2's Schedd.submit uses for "no itemdata given"
try:
    from htcondor2._schedd import DefaultItemData as DEFAULT_ITEMDATA
except ImportError:  # pragma: no cover - older bindings
    DEFAULT_ITEMDATA = object()

_TRUE = {"true", "yes", "t", "y", "1"}
_UNITS = {"": None, "k": 1, "kb": 1, "m": 1024, "mb": 1024, "g": 1024 ** 2, "gb": 1024 ** 2,
          "t": 1024 ** 3, "tb": 1024 ** 3, "b": 1 / 1024}


class SubmitError(ValueError):
    """A submit description condor_submit would refuse."""


def truthy(value: str | None, default: bool = False) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in _TRUE


def normalize_items(description: htcondor2.Submit, count: int, itemdata: Any, queue: str | None
                    ) -> tuple[int, list[str], list[list[str]]]:
    """(count per item, item variable names, rows) exactly as
    ``htcondor2.Schedd.submit`` would hand them to the schedd; the same
    TypeError/ValueError for what it refuses."""
    if not isinstance(description, htcondor2.Submit):
        raise TypeError("description must be an htcondor2.Submit object")
    count = 0 if count is None else int(count)
    given = itemdata is not DEFAULT_ITEMDATA
    if queue is not None and (given or count != 0):
        raise ValueError("queue and count/itemdata are mutually exclusive")
    if given and itemdata is None:
        return max(count, 1), [], [[]]
    if not given:
        qargs = description.getQArgs() if queue is None else queue
        qargs = qargs or ""
        if qargs.casefold().startswith("queue "):
            qargs = qargs[6:]
        m = re.match(r"\s*(\d+)", qargs)
        qcount = int(m.group(1)) if m else 1
        if count == 0:
            count = qcount
        source = description.itemdata(qargs) if qargs.strip() and not re.fullmatch(r"\s*\d+\s*", qargs) else None
        if source is None:
            return max(count, 1) if count else 1, [], [[]]
        itemdata = source
    try:
        first = next(itemdata)
    except StopIteration:
        return max(count, 1), [], []
    except TypeError:
        raise TypeError("itemdata must be an iterator (e.g. iter(list_of_dicts))") from None
    if isinstance(first, str):
        keys = ["Item"]
        rows_src: Iterator[Any] = _chain(first, itemdata)
    elif isinstance(first, dict):
        if any(not isinstance(x, str) for x in first.keys()):
            raise TypeError("itemdata dictionaries must have string keys")
        keys = list(first.keys())
        rows_src = _chain(first, itemdata)
    else:
        raise TypeError("itemdata must be a list of strings or dictionaries")
    rows: list[list[str]] = []
    for item in rows_src:
        if isinstance(item, str):
            if "\n" in item:
                raise ValueError("itemdata strings must not contain newlines")
            rows.append([item.strip()] if keys == ["Item"] else _split_row(item, len(keys)))
        elif isinstance(item, dict):
            if any("\n" in x for x in item.keys()):
                raise ValueError("itemdata keys must not contain newlines")
            values = [item.get(k, "") for k in keys]
            if any(not isinstance(v, str) for v in values):
                # htcondor2 joins the values as strings; anything else fails there
                raise TypeError("sequence item: expected str instance")
            if any("\n" in v for v in values):
                raise ValueError("itemdata values must not contain newlines")
            rows.append([v.strip() for v in values])
        else:
            raise TypeError("itemdata must be a list of strings or dictionaries")
    return max(count, 1), keys, rows


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _split_row(line: str, n: int) -> list[str]:
    parts = [p.strip() for p in re.split(r"[\x1f,\s]+", line.strip(), maxsplit=n - 1)]
    return parts + [""] * (n - len(parts))


# -- arguments and environment ------------------------------------------------

def _v2_tokens(raw: str) -> list[str]:
    """Split HTCondor's new (V2) syntax: whitespace separates, single quotes
    group, '' inside quotes is a literal quote."""
    out: list[str] = []
    cur: list[str] = []
    have = False
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c.isspace():
            if have:
                out.append("".join(cur))
                cur, have = [], False
            i += 1
        elif c == "'":
            have = True
            i += 1
            while True:
                if i >= n:
                    raise SubmitError(f"unterminated single quote in {raw!r}")
                if raw[i] == "'":
                    if i + 1 < n and raw[i + 1] == "'":
                        cur.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                cur.append(raw[i])
                i += 1
        else:
            cur.append(c)
            have = True
            i += 1
    if have:
        out.append("".join(cur))
    return out


def _unquote_v2(value: str) -> str | None:
    """The inside of a V2 string ("..." with "" for a quote), or None when
    ``value`` is in the old syntax."""
    v = value.strip()
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        inner = v[1:-1]
        if '"' in inner.replace('""', ""):
            raise SubmitError(f"{value!r}: found an illegal unescaped double quote; inside the new "
                              "syntax's double quotes write a double quote as two")
        return inner.replace('""', '"')
    return None


def parse_arguments(value: str | None) -> list[str]:
    """``arguments`` in either syntax, as the starter's argv."""
    if not value or not value.strip():
        return []
    inner = _unquote_v2(value)
    if inner is not None:
        return _v2_tokens(inner)
    # Old syntax: whitespace separates, \" is a literal quote, nothing groups.
    if '"' in value.replace('\\"', ""):
        raise SubmitError(
            f"arguments {value!r}: a double quote in the old syntax must be escaped as \\\"; "
            "write the new syntax: surround the whole value with double quotes")
    return [a.replace('\\"', '"') for a in value.split()]


def v2_join(args: list[str]) -> str:
    """Args back into the V2 raw form the job ad's ``Arguments`` holds."""
    out = []
    for a in args:
        if a == "" or any(ch.isspace() or ch == "'" for ch in a):
            out.append("'" + a.replace("'", "''") + "'")
        else:
            out.append(a)
    return " ".join(out)


def parse_environment(value: str | None) -> dict[str, str]:
    """``environment`` in the new (quoted, space-separated) or old
    (semicolon-separated) syntax."""
    if not value or not value.strip():
        return {}
    inner = _unquote_v2(value)
    tokens = _v2_tokens(inner) if inner is not None else [t for t in value.split(";") if t.strip()]
    env: dict[str, str] = {}
    for tok in tokens:
        name, eq, val = tok.partition("=")
        name = name.strip()
        if not eq or not name:
            raise SubmitError(f"environment entry {tok!r} is not NAME=value")
        env[name] = val
    return env


def v2_env(env: dict[str, str]) -> str:
    return v2_join([f"{k}={v}" for k, v in env.items()])


# -- files ---------------------------------------------------------------------

def file_list(value: str | None) -> list[str]:
    if not value:
        return []
    return [f.strip() for f in value.split(",") if f.strip()]


def parse_remaps(value: str | None) -> dict[str, str]:
    """``transfer_output_remaps = "name = dest; name2 = dest2"``."""
    if not value or not value.strip():
        return {}
    v = value.strip()
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        v = v[1:-1]
    out: dict[str, str] = {}
    for entry in v.split(";"):
        if not entry.strip():
            continue
        name, eq, dest = entry.partition("=")
        if not eq:
            raise SubmitError(f"transfer_output_remaps entry {entry.strip()!r} is not name = destination")
        out[name.strip()] = dest.strip()
    return out


def size_in(value: str | None, unit_kb: int, default: int) -> int | str:
    """``request_memory`` (unit_kb 1024: MB) or ``request_disk`` (unit_kb 1: KB)
    as a number of that unit; an expression is returned as is."""
    if value is None or not value.strip():
        return default
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", value)
    if not m:
        return value.strip()
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise SubmitError(f"{value!r}: unknown unit {m.group(2)!r} (use K, M, G or T)")
    factor = _UNITS[unit]
    if factor is None:
        return int(number) if number.is_integer() else int(number + 1)
    kb = number * factor
    return max(1, int(-(-kb // unit_kb)))


def literal(value: Any) -> str:
    """A Python value as ClassAd text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return "undefined"
    return classad2.quote(str(value))


def format_time_short(seconds: int) -> str:
    """HTCondor's ``format_time_short``: ``[d+]h:mm:ss`` with leading zero
    fields dropped, never less than ``mm:ss``."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{days:3d}+{hours:02d}:{minutes:02d}:{secs:02d}"
    i = 0
    while i < len(text):
        if text[i] not in " 0+":
            if text[i] == ":":
                i += 1
            break
        i += 1
    return text[i:]
