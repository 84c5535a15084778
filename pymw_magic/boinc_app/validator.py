#!/usr/bin/env python3
"""pymw-magic's validator script, run by BOINC's ``script_validator``
(installed as the project's ``bin/pymw_validate``)::

    script_validator --app pymw --init_script pymw_validate --compare_script pymw_validate
        ../bin/pymw_validate OUT            one result: exit 0 when it is a well-formed output
        ../bin/pymw_validate OUT1 OUT2      two replicas: exit 0 when they agree

Data flow::

    OUT ──▶ layout + sha256 seal checked (pymw_runtime.pyz beside this script:
            the one-shot worker's reader and the safe codec; nothing is unpickled)
        ──▶ per task: ok or failed; a value decoded with the safe codec
    OUT1, OUT2 ──▶ the same tasks; each both succeeded or both failed (same
                   exception type); values equal, floats within
                   REL_TOL / ABS_TOL (hosts' maths libraries differ in the last bits)
               ──▶ disagreeing: a note pymw_results/disagree/<2nd result's file> for the
                   assimilator (the values, as text), and a line in
                   pymw_results/<batch>/notes for the master (it warns at once:
                   BOINC issues another replica, which may never find a host), exit 1

A result in the pickle codec (a job with trusted_results=True) is
compared byte for byte, never unpickled.  Exit 1 for an invalid or
disagreeing result (BOINC then asks other hosts, per the work unit's
quorum rules); 2 for a usage error.
"""

import json
import math
import os
import re
import sys
import time

REL_TOL = 1e-9
ABS_TOL = 1e-12
RUNTIME = "pymw_runtime.pyz"
RESULTS_DIR = "pymw_results"
#: the largest output read (the work unit's max_nbytes is enforced by BOINC before)
MAX_BYTES = 1 << 30


def _runtime():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, RUNTIME)
    if path not in sys.path:
        sys.path.insert(0, path)
    from pymw_magic import codec, oneshot
    return oneshot, codec


def read(path):
    """(codec, {seq: ("ok", value) | ("failed", type name)}) of one output; ValueError when it is not one."""
    oneshot, codec = _runtime()
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError("larger than %d bytes" % MAX_BYTES)
    try:
        header, body = oneshot.verify(data, path, "sha256", None)
    except oneshot.FileError as exc:
        raise ValueError(str(exc))
    raw = bytes(body)
    cut = raw.index(b"\n")
    meta = json.loads(raw[:cut])
    sizes = meta["blobs"]
    blobs, offset = [], cut + 1
    for size in sizes:
        if type(size) is not int or size < 0 or offset + size > len(raw):
            raise ValueError("its blob table does not match its body")
        blobs.append(raw[offset:offset + size])
        offset += size
    kind = header.get("codec")
    rows = {}
    for rec in meta["outcomes"]:
        if not isinstance(rec, list) or len(rec) not in (6, 10) or type(rec[0]) is not int:
            raise ValueError("an outcome row of the wrong shape")
        if len(rec) == 6:
            ref = rec[1]
            if type(ref) is not int or not 0 <= ref < len(blobs):
                raise ValueError("a result refers to no blob")
            if kind == "safe":
                try:
                    value = ("value", codec.decode(blobs[ref]))
                except codec.CodecError as exc:
                    if "install numpy" not in str(exc):
                        raise ValueError("task %d: %s" % (rec[0], exc))
                    value = ("bytes", blobs[ref])  # (no NumPy on this server: bytes must match)
            else:
                value = ("bytes", blobs[ref])
            rows[rec[0]] = ("ok", value)
        else:
            rows[rec[0]] = ("failed", str(rec[7]))
    error = meta.get("error")
    return kind, rows, (str(error[0]) if isinstance(error, list) and error else None)


def same(a, b):
    """Equal values, floats (and complex, arrays of them) within the tolerance."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(a, complex) and isinstance(b, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if type(a) is not type(b):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                and not isinstance(b, bool):
            return same(float(a), float(b))
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if hasattr(a, "dtype") and hasattr(a, "shape"):  # a NumPy array or scalar
        import numpy as np
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind in "fc":
            return bool(np.allclose(a, b, rtol=REL_TOL, atol=ABS_TOL, equal_nan=True))
        return bool(np.array_equal(a, b))
    return a == b


def differences(one, two):
    """Text naming the tasks whose results differ (empty: they agree)."""
    kind1, rows1, err1 = one
    kind2, rows2, err2 = two
    out = []
    if kind1 != kind2:
        out.append("codecs differ: %s / %s" % (kind1, kind2))
    if err1 != err2:
        out.append("chunk failures differ: %s / %s" % (err1, err2))
    for seq in sorted(set(rows1) | set(rows2)):
        a, b = rows1.get(seq), rows2.get(seq)
        if a is None or b is None or a[0] != b[0]:
            out.append("task %d: %s / %s" % (seq, _show(a), _show(b)))
        elif a[0] == "failed":
            if a[1] != b[1]:
                out.append("task %d: failed with %s / %s" % (seq, a[1], b[1]))
        elif a[1][0] != b[1][0] or not same(a[1][1], b[1][1]):
            out.append("task %d: %s / %s" % (seq, _show(a), _show(b)))
    return "\n".join(out)


def _show(row):
    if row is None:
        return "no result"
    if row[0] == "failed":
        return "failed (%s)" % row[1]
    text = repr(row[1][1])
    return text if len(text) <= 200 else text[:200] + "..."


#: the most bytes of the values written into a notes line
MAX_NOTE = 4000


def wu_of(filename):
    """The work unit of an output file (as the assimilator reads it):
    ``<wu>_<replica>_r<random>_<i>``, older servers ``<wu>_<replica>_<i>``."""
    name = os.path.basename(filename)
    m = re.fullmatch(r"(.+)_\d+_r\d+_\d+", name) or re.fullmatch(r"(.+)_\d+_\d+", name)
    return m.group(1) if m else name


def tell_master(path1, path2, text):
    """One JSON line in pymw_results/<batch>/notes (the directory the master
    watches): the work unit, both results' files, the values (capped)."""
    wu = wu_of(path2)
    parts = wu.split("_")
    if len(parts) < 4 or not parts[1].isdigit() or "/" in wu or wu.startswith("."):
        return  # (not one of pymw-magic's work units)
    top = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), RESULTS_DIR)
    directory = os.path.join(top, str(int(parts[1])))
    try:
        for d in (top, directory):
            try:
                os.mkdir(d, 0o750)  # (0750: the project's group holds the web server's user)
            except FileExistsError:
                pass
        line = json.dumps({"wu": wu, "kind": "disagree", "results": [os.path.basename(path1),
                           os.path.basename(path2)], "values": text[:MAX_NOTE], "time": time.time()},
                          separators=(",", ":"), sort_keys=True) + "\n"
        fd = os.open(os.path.join(directory, "notes"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, line.encode())  # (one write: concurrent lines never interleave)
        finally:
            os.close(fd)
    except OSError:
        pass


def note(path1, path2, text):
    directory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), RESULTS_DIR, "disagree")
    try:
        # (0750 each: the project's group holds the web server's user)
        os.makedirs(os.path.dirname(directory), mode=0o750, exist_ok=True)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        name = os.path.basename(path2)
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write("%s vs %s:\n%s\n" % (os.path.basename(path1), name, text[:4000]))
    except OSError:
        pass


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        sys.stderr.write("usage: pymw_validate OUT  |  pymw_validate OUT1 OUT2\n")
        return 2
    try:
        results = [read(p) for p in args]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.stderr.write("pymw_validate: invalid result: %s\n" % exc)
        return 1
    if len(results) == 1:
        return 0
    text = differences(results[0], results[1])
    if text:
        note(args[0], args[1], text)
        tell_master(args[0], args[1], text)
        # (script_validator's log: a volunteer's values are capped there too)
        shown = text if len(text) <= MAX_NOTE else "%s... (%d more characters)" % (text[:MAX_NOTE], len(text) - MAX_NOTE)
        sys.stderr.write("pymw_validate: results disagree:\n%s\n" % shown)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
