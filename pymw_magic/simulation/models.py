"""The simulated platform and the task-duration model, and their string forms.

This module owns *what* is simulated; ``engine.py`` owns *how* (the event
loop).  Everything here is plain data built once per simulation:

* :class:`Host` — one modelled host: ``name``, ``index``, ``speed`` (work
  seconds per virtual second; 1 is the reference machine), ``latency``
  (seconds per message), ``bandwidth`` (bytes/s, ``inf`` = free transfers)
  and its :class:`Availability`;
* availability — :class:`AlwaysUp`, :class:`Periodic` (regular on/off),
  :class:`OnOff` (exponential up and down times with the given means,
  drawn lazily), :class:`Intervals` (a trace: CSV of ``host,start,end`` up
  intervals, or the Failure Trace Archive's tab-separated ``event_trace``),
  and :class:`Churn` on top of any of them (``churn=MEAN_LIFETIME``: each
  host leaves for good after an exponential lifetime and a fresh host of
  the same speed takes its place at once);
* :class:`Platform` — the hosts plus what is global: per-attempt
  ``failure_rate``, per-dispatch master ``overhead``, the random streams;
* :class:`DurationModel` — how long a task takes: a model
  ``duration(*args, host=...) -> seconds at speed 1``, a constant, PyMW's
  convention (the task function itself returns its length), or
  ``"measure"`` (run it once here and time it).

String forms (what ``%pymw use simulator --speeds ...`` takes)::

    speeds / latency / bandwidth:  1.5 | [1, 2, 4] | uniform:A,B | lognormal:MEDIAN,SIGMA
    availability:                  always | onoff:UP,DOWN | periodic:UP,DOWN | PATH.csv | PATH.tab
    churn:                         none | MEAN_LIFETIME (seconds)
    duration:                      measure | pymw | SECONDS

A host going away (down, or gone with churn) is not its task's fault: the
attempt it was running is lost and run again without using up the task's
retries (as a real pool treats a worker it stopped); only ``failure_rate``
failures are charged.

``lognormal:M,S`` draws ``M * exp(S * N(0, 1))``: M is the median speed,
S the spread of its logarithm (0 = every host at M).

Every random draw comes from a stream seeded by ``seed`` and the purpose
(``"7:speeds"``, ``"7:availability:12"``, ...), so changing one model (the
failure rate, say) never changes another's draws (the hosts' speeds).

Bad models are :class:`ModelError` (a ``ValueError``) naming the option, the
value and what would be valid.
"""

from __future__ import annotations

import bisect
import csv
import inspect
import io
import math
import os
import pickle
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "ModelError", "Host", "Platform", "DurationModel", "Availability", "AlwaysUp", "Periodic",
    "OnOff", "Intervals", "Churn", "build_platform", "parse_distribution", "parse_availability",
    "load_trace", "check_speeds", "check_availability", "check_churn", "check_duration",
    "DISTRIBUTION_FORMS", "FTA_COLUMNS",
]

#: what ``duration="measure"`` times a task with (a name the tests can replace)
_clock = time.perf_counter

DISTRIBUTION_FORMS = "a number, a list (one per host), uniform:A,B or lognormal:MEDIAN,SIGMA"
AVAILABILITY_FORMS = "always, onoff:UP,DOWN, periodic:UP,DOWN, or a trace file (.csv intervals, .tab FTA)"
INF = math.inf


class ModelError(ValueError):
    """A simulation model that cannot be used, with what would be valid."""


def _rng(seed: Any, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{purpose}")


# --- numbers per host: speeds, latency, bandwidth ------------------------------------

def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ModelError(f"{what}: {text!r} is not a number") from None


def parse_distribution(spec: Any, what: str = "speeds") -> Any:
    """Check a per-host value's form without drawing it: returns the spec
    (a float for a plain number; strings stay strings) or raises ModelError."""
    if isinstance(spec, bool):
        raise ModelError(f"{what}: {spec!r} is not {DISTRIBUTION_FORMS}")
    if isinstance(spec, (int, float)):
        return float(spec)
    if isinstance(spec, str):
        text = spec.strip()
        kind, colon, rest = text.partition(":")
        if not colon:
            if text.startswith("["):
                return [_number(x, what) for x in text.strip("[]").split(",") if x.strip()]
            if "," in text:
                return [_number(x, what) for x in text.split(",") if x.strip()]
            return _number(text, what)
        kind = kind.strip().lower()
        try:
            params = [_number(p, what) for p in rest.split(",") if p.strip()]
        except ModelError:
            params = []
        if kind in ("uniform", "lognormal") and len(params) == 2:
            return text
        raise ModelError(f"{what}: {spec!r} is not {DISTRIBUTION_FORMS}")
    if isinstance(spec, (list, tuple)):
        try:
            return [float(x) for x in spec]
        except (TypeError, ValueError):
            raise ModelError(f"{what}: {spec!r} holds something that is not a number") from None
    raise ModelError(f"{what}: {spec!r} is not {DISTRIBUTION_FORMS}")


def draw(spec: Any, n: int, rng: random.Random, what: str, *, minimum: float = 0.0,
         allow_min: bool = False, allow_inf: bool = False) -> list[float]:
    """``n`` values from a spec, each checked to be > ``minimum`` (or >= it
    with ``allow_min``)."""
    spec = parse_distribution(spec, what)
    if isinstance(spec, float):
        values = [spec] * n
    elif isinstance(spec, list):
        if len(spec) != n:
            raise ModelError(f"{what}: the list has {len(spec)} value(s) but there are {n} host(s)")
        values = spec
    else:
        kind, _, rest = spec.partition(":")
        a, b = (float(p) for p in rest.split(","))
        if kind.strip().lower() == "uniform":
            if b < a:
                raise ModelError(f"{what}: {spec!r} has its bounds reversed (uniform:LOW,HIGH)")
            values = [rng.uniform(a, b) for _ in range(n)]
        else:
            if b < 0:
                raise ModelError(f"{what}: {spec!r} has a negative spread (lognormal:MEDIAN,SIGMA, SIGMA >= 0)")
            values = [a * math.exp(b * rng.gauss(0.0, 1.0)) for _ in range(n)]
    for i, v in enumerate(values):
        bad = (v < minimum or (v == minimum and not allow_min) or math.isnan(v)
               or (math.isinf(v) and not allow_inf))
        if bad:
            need = f">= {minimum:g}" if allow_min else f"> {minimum:g}"
            where = f" (host {i})" if len(set(values)) > 1 else ""
            raise ModelError(f"{what}: {v!r}{where} is not a valid value; every value must be {need}"
                             + ("" if allow_inf else " and finite"))
    return list(values)


def check_speeds(spec: Any) -> Any:
    """Validate the form of ``speeds`` (an Option's converter)."""
    spec = parse_distribution(spec, "speeds")
    values = spec if isinstance(spec, list) else [spec] if isinstance(spec, float) else []
    if any(v <= 0 or math.isnan(v) or math.isinf(v) for v in values):
        raise ModelError(f"speeds: {spec!r} — every speed must be a finite number > 0")
    if isinstance(spec, str) and spec.lower().startswith("uniform:"):
        lo, hi = (float(p) for p in spec.partition(":")[2].split(","))
        if lo <= 0 or hi < lo:
            raise ModelError(f"speeds: {spec!r} — uniform:LOW,HIGH needs 0 < LOW <= HIGH")
    if isinstance(spec, str) and spec.lower().startswith("lognormal:"):
        m, s = (float(p) for p in spec.partition(":")[2].split(","))
        if m <= 0 or s < 0:
            raise ModelError(f"speeds: {spec!r} — lognormal:MEDIAN,SIGMA needs MEDIAN > 0 and SIGMA >= 0")
    return spec


# --- availability ---------------------------------------------------------------

class Availability:
    """When a host is up.  ``window(t)`` is the up interval ``(start, end)``
    containing ``t`` (start <= t < end), else the next one (start > t), or
    None when the host never comes up again."""

    always = False

    def window(self, t: float) -> tuple[float, float] | None:
        raise NotImplementedError


class AlwaysUp(Availability):
    always = True

    def window(self, t: float) -> tuple[float, float]:
        return (t, INF)


class Periodic(Availability):
    """Up for ``up`` seconds, down for ``down``, repeating from ``phase``."""

    def __init__(self, up: float, down: float, phase: float = 0.0):
        self.up, self.down, self.phase = up, down, phase
        self.cycle = up + down

    def window(self, t: float) -> tuple[float, float]:
        k = math.floor((t - self.phase) / self.cycle)
        start = self.phase + k * self.cycle
        if t < start + self.up:
            return (start, start + self.up)
        return (start + self.cycle, start + self.cycle + self.up)


class Intervals(Availability):
    """Explicit up intervals (sorted, non-overlapping), e.g. from a trace."""

    def __init__(self, intervals: Sequence[tuple[float, float]]):
        merged: list[list[float]] = []
        for s, e in sorted(intervals):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def window(self, t: float) -> tuple[float, float] | None:
        i = bisect.bisect_right(self.ends, t)   # first interval ending after t
        if i >= len(self.ends):
            return None
        return (self.starts[i], self.ends[i])


class OnOff(Intervals):
    """Up and down times drawn from exponentials with means ``up`` and
    ``down``; starts in the stationary state (up with probability
    up/(up+down)).  Intervals are drawn lazily as far as asked."""

    def __init__(self, up: float, down: float, rng: random.Random):
        super().__init__([])
        self.up, self.down, self.rng = up, down, rng
        self._t = 0.0
        self._is_up = rng.random() < up / (up + down)

    def _grow(self, until: float) -> None:
        rng, starts, ends = self.rng, self.starts, self.ends
        while self._t <= until or not ends or ends[-1] <= until:
            if self._is_up:
                s = self._t
                self._t = e = s + rng.expovariate(1.0 / self.up)
                starts.append(s)
                ends.append(e)
            else:
                self._t += rng.expovariate(1.0 / self.down)
            self._is_up = not self._is_up

    def window(self, t: float) -> tuple[float, float] | None:
        if not self.ends or self.ends[-1] <= t:
            self._grow(t)
        return super().window(t)


class Churn(Availability):
    """Host churn over a ``base`` availability: the host in this slot
    leaves for good after a lifetime drawn from an exponential with mean
    ``life`` seconds, and a fresh host (same name, same speed) takes the
    slot at once, itself for an exponential lifetime, and so on.  A window
    is the base's up interval cut at the departures; the work a departing
    host was running is lost (and re-run elsewhere, uncharged).

    Memoryless: an attempt of ``d`` seconds survives with probability
    ``exp(-d / life)``, so a task takes ``exp(d / life)`` attempts on
    average on an otherwise ideal platform."""

    def __init__(self, base: Availability, life: float, rng: random.Random):
        self.base, self.life, self.rng = base, life, rng
        self.departures: list[float] = []

    def _grow(self, t: float) -> None:
        deps, rng, rate = self.departures, self.rng, 1.0 / self.life
        last = deps[-1] if deps else 0.0
        while last <= t:
            last += rng.expovariate(rate)
            deps.append(last)

    def departs(self, t: float) -> bool:
        """Whether a host leaves at ``t`` (rather than going down)."""
        i = bisect.bisect_left(self.departures, t)
        return i < len(self.departures) and self.departures[i] == t

    def window(self, t: float) -> tuple[float, float] | None:
        w = self.base.window(t)
        if w is None:
            return None
        s = w[0] if w[0] > t else t
        self._grow(s)
        deps = self.departures
        i = bisect.bisect_right(deps, s)          # the first departure after s
        birth = deps[i - 1] if i else 0.0
        return (max(w[0], birth), min(w[1], deps[i]))


def check_churn(spec: Any) -> float | None:
    """Validate ``churn``: None (no churn) or a mean host lifetime in seconds > 0."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "off", "0")):
        return None
    if isinstance(spec, bool):
        raise ModelError(f"churn: {spec!r} is not a mean host lifetime (seconds > 0) or none")
    try:
        life = float(spec)
    except (TypeError, ValueError):
        raise ModelError(f"churn: {spec!r} is not a mean host lifetime (seconds > 0) or none") from None
    if life == 0:
        return None
    if not life > 0 or math.isinf(life):
        raise ModelError(f"churn: {spec!r} must be a finite mean host lifetime in seconds > 0 (or none)")
    return life


def _pair(rest: str, what: str) -> tuple[float, float]:
    parts = [p for p in rest.split(",") if p.strip()]
    if len(parts) != 2:
        raise ModelError(f"availability: {what} needs two numbers, UP,DOWN (seconds)")
    up, down = (_number(p, "availability") for p in parts)
    if not (0 < up < math.inf and 0 <= down < math.inf):  # NaN fails both (it would never end a window)
        raise ModelError(f"availability: {what}: up time must be > 0 and down time >= 0 (finite seconds)")
    return up, down


def check_availability(spec: Any) -> Any:
    """Validate the form of ``availability`` (an Option's converter): a
    trace path must exist and parse."""
    if isinstance(spec, Availability) or spec is None:
        return spec
    if isinstance(spec, (dict, list)):
        return spec
    if not isinstance(spec, str):
        raise ModelError(f"availability: {spec!r} is not {AVAILABILITY_FORMS}")
    text = spec.strip()
    kind, colon, rest = text.partition(":")
    if text.lower() in ("always", "always-on", "on"):
        return "always"
    if colon and kind.lower() in ("onoff", "periodic"):
        _pair(rest, text)
        return text
    if os.path.exists(text):
        load_trace(text)  # errors now, not mid-simulation
        return text
    raise ModelError(f"availability: {spec!r} is not {AVAILABILITY_FORMS}"
                     + ("" if colon else f" (no file {text!r})"))


def parse_availability(spec: Any, n: int, seed: Any) -> tuple[list[Availability], list[str] | None]:
    """One Availability per host, and host names when a trace gives them."""
    spec = check_availability(spec)
    if spec in (None, "always"):
        a = AlwaysUp()
        return [a] * n, None
    if isinstance(spec, Availability):
        return [spec] * n, None
    if isinstance(spec, str):
        kind, colon, rest = spec.partition(":")
        if colon and kind.lower() == "periodic":
            up, down = _pair(rest, spec)
            return [Periodic(up, down) for _ in range(n)], None
        if colon and kind.lower() == "onoff":
            up, down = _pair(rest, spec)
            if down == 0:
                return [AlwaysUp()] * n, None
            return [OnOff(up, down, _rng(seed, f"availability:{i}")) for i in range(n)], None
        traces = load_trace(spec)
    else:
        traces = _intervals_from_python(spec)
    names = list(traces)
    if len(names) < n:
        raise ModelError(f"availability: the trace has {len(names)} host(s) but {n} were asked for; "
                         f"use workers={len(names)} or fewer")
    names = names[:n]
    return [Intervals(traces[h]) for h in names], [str(h) for h in names]


def _intervals_from_python(spec: dict | list) -> dict[str, list[tuple[float, float]]]:
    items = spec.items() if isinstance(spec, dict) else enumerate(spec)
    out: dict[str, list[tuple[float, float]]] = {}
    for host, intervals in items:
        rows = []
        for iv in intervals:
            s, e = (float(x) for x in iv)
            if not e > s:
                raise ModelError(f"availability: host {host!r} has an interval ({s}, {e}) that does not "
                                 "end after it starts")
            rows.append((s, e))
        out[str(host) if isinstance(spec, dict) else f"host-{host}"] = rows
    if not out or not any(out.values()):
        raise ModelError("availability: the trace is empty (no up intervals)")
    return out


#: The Failure Trace Archive's ``event_trace`` columns, in the order its
#: format page (FTAFormat) lists them: a headerless file with 9 columns is
#: read in this order.
FTA_COLUMNS = ("event_id", "component_id", "node_id", "platform_id", "node_name", "event_type",
               "event_start_time", "event_stop_time", "event_end_reason")
#: The same with a ``component_type`` column after ``event_id``: a
#: headerless file with 10 columns is read in this order.
FTA_COLUMNS_WITH_TYPE = FTA_COLUMNS[:1] + ("component_type",) + FTA_COLUMNS[1:]
_FTA_LAYOUTS = {len(FTA_COLUMNS): FTA_COLUMNS, len(FTA_COLUMNS_WITH_TYPE): FTA_COLUMNS_WITH_TYPE}


def _fta_layouts() -> str:
    return " or ".join(f"{n} ({', '.join(cols)})" for n, cols in _FTA_LAYOUTS.items())


def load_trace(path: str) -> dict[str, list[tuple[float, float]]]:
    """Up intervals per host from a trace file, times shifted so the trace
    starts at 0.

    * CSV (``.csv`` or anything comma-separated): rows ``host,start,end``,
      one per *up* interval; a header row and ``#`` comments are skipped;
    * the Failure Trace Archive's ``event_trace`` (``.tab``, tab-separated):
      hosts are ``node_id``; rows with ``event_type`` 1 (availability) are up
      intervals, 0 (unavailability) are skipped.  A header line naming the
      columns is used when present (``event_stop_time`` or
      ``event_end_time``); otherwise the columns are those of the archive's
      format page, :data:`FTA_COLUMNS` (9 columns: event_id, component_id,
      node_id, platform_id, node_name, event_type, event_start_time,
      event_stop_time, event_end_reason), or, for 10-column files, the same
      with a ``component_type`` after ``event_id``.  A row with another
      number of columns is an error naming the line and both layouts.
    """
    try:
        with open(path, newline="") as f:
            text = f.read()
    except OSError as exc:
        raise ModelError(f"availability: cannot read trace {path!r}: {exc.strerror or exc}") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines())
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ModelError(f"availability: the trace {path!r} is empty (no up intervals)")
    tab = path.endswith(".tab") or "\t" in lines[0][1]
    raw: dict[str, list[tuple[float, float]]] = {}
    if tab:
        first = [c.strip() for c in lines[0][1].split("\t")]
        header = [c.lower() for c in first]
        if "event_start_time" in header or "node_id" in header:
            cols, body = header, lines[1:]
            width = None     # rows may carry fewer trailing columns than the header names
        else:
            layout = _FTA_LAYOUTS.get(len(first))
            if layout is None:
                raise ModelError(
                    f"availability: {path!r} line {lines[0][0]}: {len(first)} tab-separated column(s), but an "
                    f"FTA event_trace row without a header has {_fta_layouts()}"
                    + (" (host,start,end intervals go in a .csv, comma-separated)" if len(first) == 3 else ""))
            cols, body, width = list(layout), lines, len(layout)
        try:
            i_node, i_type = cols.index("node_id"), cols.index("event_type")
            i_start = cols.index("event_start_time")
            i_end = cols.index("event_stop_time") if "event_stop_time" in cols else cols.index("event_end_time")
        except ValueError:
            raise ModelError(f"availability: {path!r}: an FTA header needs node_id, event_type, "
                             "event_start_time and event_stop_time (or event_end_time)") from None
        need = max(i_node, i_type, i_start, i_end) + 1
        for lineno, line in body:
            row = line.split("\t")
            if (width is not None and len(row) != width) or len(row) < need:
                expected = f"{width}, as line {lines[0][0]}" if width is not None else f"at least {need}"
                raise ModelError(f"availability: {path!r} line {lineno}: {len(row)} column(s), expected "
                                 f"{expected} (an FTA event_trace row has {_fta_layouts()})")
            try:
                kind = int(float(row[i_type]))
                s, e = float(row[i_start]), float(row[i_end])
            except ValueError:
                raise ModelError(f"availability: {path!r} line {lineno}: event_type, event_start_time and "
                                 f"event_stop_time must be numbers, not {row[i_type]!r}, {row[i_start]!r}, "
                                 f"{row[i_end]!r}") from None
            if kind not in (0, 1):
                raise ModelError(f"availability: {path!r} line {lineno}: event_type {row[i_type]!r} is "
                                 "neither 0 (unavailability) nor 1 (availability)")
            if kind == 1:
                _add(raw, row[i_node].strip(), s, e, path, lineno)
    else:
        for lineno, line in lines:
            row = next(csv.reader(io.StringIO(line)))
            if len(row) < 3:
                raise ModelError(f"availability: {path!r} line {lineno}: expected host,start,end")
            try:
                s, e = float(row[1]), float(row[2])
            except ValueError:
                if lineno == lines[0][0]:
                    continue  # a header
                raise ModelError(f"availability: {path!r} line {lineno}: start and end must be numbers, "
                                 f"not {row[1]!r}, {row[2]!r}") from None
            _add(raw, row[0].strip(), s, e, path, lineno)
    if not raw:
        raise ModelError(f"availability: the trace {path!r} has no up intervals"
                         + (" (no row with event_type 1)" if tab else ""))
    t0 = min(s for ivs in raw.values() for s, _ in ivs)
    return {h: [(s - t0, e - t0) for s, e in ivs] for h, ivs in raw.items()}


def _add(raw: dict, host: str, s: float, e: float, path: str, lineno: int) -> None:
    if not (e > s) or math.isnan(s):
        raise ModelError(f"availability: {path!r} line {lineno}: interval ({s:g}, {e:g}) of host "
                         f"{host!r} does not end after it starts")
    raw.setdefault(host, []).append((s, e))


# --- the platform ------------------------------------------------------------------

class Host:
    """One modelled host, as duration models and policies see it."""

    __slots__ = ("index", "name", "speed", "latency", "bandwidth", "availability")

    def __init__(self, index: int, name: str, speed: float, latency: float = 0.0,
                 bandwidth: float = INF, availability: Availability | None = None):
        self.index = index
        self.name = name
        self.speed = speed
        self.latency = latency
        self.bandwidth = bandwidth
        self.availability = availability or AlwaysUp()

    def __repr__(self) -> str:
        return f"<Host {self.name} speed={self.speed:g}>"


@dataclass
class Platform:
    hosts: list[Host]
    failure_rate: float = 0.0
    overhead: float = 0.0
    seed: Any = 0
    churn: float | None = None

    @property
    def ideal_network(self) -> bool:
        return all(h.latency == 0 and h.bandwidth == INF for h in self.hosts)

    @property
    def always_up(self) -> bool:
        return all(h.availability.always for h in self.hosts)


def build_platform(n: int, *, speeds: Any = 1.0, availability: Any = "always", failure_rate: float = 0.0,
                   latency: Any = 0.0, bandwidth: Any = None, overhead: float = 0.0,
                   seed: Any = 0, churn: Any = None) -> Platform:
    """The hosts and global parameters of a simulation; ModelError when a
    model cannot be used."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ModelError(f"hosts: {n!r} is not a whole number >= 1")
    speeds = check_speeds(speeds)
    life = check_churn(churn)
    avail, names = parse_availability(availability, n, seed)
    if life is not None:
        avail = [Churn(a, life, _rng(seed, f"churn:{i}")) for i, a in enumerate(avail)]
    sp = draw(speeds, n, _rng(seed, "speeds"), "speeds")
    lat = draw(0.0 if latency is None else latency, n, _rng(seed, "latency"), "latency", allow_min=True)
    bw = [INF] * n if bandwidth in (None, "none", "inf") else draw(
        bandwidth, n, _rng(seed, "bandwidth"), "bandwidth", allow_inf=True)
    fr = _probability(failure_rate)
    ov = float(overhead or 0.0)
    if ov < 0 or math.isnan(ov) or math.isinf(ov):
        raise ModelError(f"overhead: {overhead!r} must be a number of seconds >= 0")
    names = names or [f"host-{i}" for i in range(n)]
    hosts = [Host(i, names[i], sp[i], lat[i], bw[i], avail[i]) for i in range(n)]
    return Platform(hosts, fr, ov, seed, life)


def _probability(p: Any) -> float:
    try:
        x = float(p or 0.0)
    except (TypeError, ValueError):
        raise ModelError(f"failure_rate: {p!r} is not a probability (a number in [0, 1))") from None
    if not 0.0 <= x < 1.0:
        raise ModelError(f"failure_rate: {p!r} is not a probability in [0, 1) (1 would never finish)")
    return x


# --- durations ----------------------------------------------------------------------

def _accepts_host(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "host" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_duration(spec: Any) -> Any:
    """Validate the form of ``duration`` (an Option's converter)."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, bool):
        raise ModelError(f"duration: {spec!r} is not a duration model")
    if isinstance(spec, (int, float)):
        if spec < 0 or math.isnan(spec) or math.isinf(spec):
            raise ModelError(f"duration: {spec!r} must be a finite number of seconds >= 0")
        return float(spec)
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("measure", "pymw"):
            return text
        try:
            return check_duration(float(text))
        except ValueError as exc:
            if isinstance(exc, ModelError):
                raise
    raise ModelError(f"duration: {spec!r} is not a duration model: a function "
                     "duration(*args, host=...) -> seconds at speed 1, a number of seconds, "
                     "'measure' (run each task once here and time it) or 'pymw' (the task "
                     "function returns its own length)")


class DurationModel:
    """How long each task is, in seconds of work at speed 1.

    ``evaluate(args, kwargs, host) -> (work, value)``: ``value`` is what the
    task's result will be — the function's return value when the simulator
    called the function ("pymw", "measure"), otherwise None (the caller then
    uses the simulated run time).  ``host`` is None when only an estimate is
    wanted (a length-ordering policy asks before the task has a host).
    """

    def __init__(self, spec: Any, fn: Callable | None):
        spec = check_duration(spec)
        self.spec = spec
        self.fn = fn
        if spec is None or spec == "pymw":
            if fn is None:
                raise ModelError("duration: with no duration model the task function must return the "
                                 "task's length (PyMW's convention), but there is no function")
            self.kind, self.call = "pymw", fn
        elif spec == "measure":
            if fn is None:
                raise ModelError("duration='measure' needs the task function to run and time")
            self.kind, self.call = "measure", fn
        elif isinstance(spec, float):
            self.kind, self.call = "constant", None
        else:
            self.kind, self.call = "model", spec
        self.host_aware = self.call is not None and self.kind != "measure" and _accepts_host(self.call)
        #: the function's return value is the task's result
        self.gives_value = self.kind in ("pymw", "measure")

    @property
    def label(self) -> str:
        if self.kind == "constant":
            return f"{self.spec:g} s"
        if self.kind == "model":
            return getattr(self.call, "__name__", "model")
        return self.kind

    def evaluate(self, args: tuple, kwargs: dict | None, host: Host | None,
                 describe: Callable[[], str] | None = None) -> tuple[float, Any]:
        kind = self.kind
        if kind == "constant":
            return self.spec, None
        call = self.call
        try:
            if kind == "measure":
                t0 = _clock()
                value = call(*args, **(kwargs or {}))
                return _clock() - t0, value
            if self.host_aware:
                value = call(*args, **(kwargs or {}), host=host)
            else:
                value = call(*args, **(kwargs or {}))
        except Exception as exc:
            what = "task function" if kind == "pymw" else "duration model"
            where = describe() if describe else ", ".join(map(repr, args))
            raise ModelError(f"the {what} {getattr(call, '__name__', call)!r} raised "
                             f"{type(exc).__name__}: {exc} on input ({where})") from exc
        try:
            work = float(value)
        except (TypeError, ValueError):
            work = math.nan
        if not work >= 0 or math.isinf(work):
            what = ("the task function (PyMW's convention: it returns the task's length in seconds)"
                    if kind == "pymw" else "the duration model")
            where = describe() if describe else ", ".join(map(repr, args))
            raise ModelError(f"{what} returned {value!r} on input ({where}); a task's length must be a "
                             "finite number of seconds >= 0")
        return work, (value if kind == "pymw" else None)


def payload_size(args: tuple, kwargs: dict | None = None) -> int:
    """Bytes a task's arguments take on the wire (pickle protocol 5;
    cloudpickle for what plain pickle refuses)."""
    obj = (args, kwargs or None)
    try:
        return len(pickle.dumps(obj, protocol=5))
    except Exception:
        import cloudpickle
        return len(cloudpickle.dumps(obj, protocol=5))


def value_size(value: Any) -> int:
    try:
        return len(pickle.dumps(value, protocol=5))
    except Exception:
        return 0


def iter_args(items: Iterable[Any], star: bool) -> Iterable[tuple]:
    """Items as argument tuples (``star``: each item already is one)."""
    if star:
        return (tuple(a) for a in items)
    return ((a,) for a in items)
