"""What this machine can do at all, with no framework: the floors the
array and latency figures are read against.

    python bench/floor.py            # prints JSON

* ``pipe_echo_ms``: 10 MB of bytes written down an OS pipe to another
  process, which writes them back up a second pipe (pipes enlarged to
  1 MiB, as pymw-magic's are); median milliseconds.  No pickling, no
  signing, no copies beyond the kernel's;
* ``pipe_pingpong_us``: an 8-byte message there and back over the same
  kind of pipes; median microseconds;
* ``hmac_sha256_ms``: HMAC-SHA256 of 10 MB (what signing or verifying one
  10 MB frame costs); median milliseconds;
* ``copy_ms``: one copy of 10 MB in memory (``bytearray(b)``); median.

``run.py`` runs this once per run (when the array or latency case is
selected) and prints the figures under the tables.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import time

SIZE = 10_000_000
F_SETPIPE_SZ = 1031


def _enlarge(fd: int) -> None:
    try:
        import fcntl
        fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
    except (OSError, ImportError, AttributeError):
        pass


def _read_exact(fd: int, n: int) -> bytearray | None:
    out = bytearray(n)
    mv = memoryview(out)
    got = 0
    while got < n:
        k = os.readv(fd, [mv[got:]])
        if k == 0:
            return None
        got += k
    return out


def _write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        k = os.write(fd, mv)
        mv = mv[k:]


def echo_server() -> None:
    """Child side: read a 4-byte length and that many bytes, send them back."""
    rd, wr = 0, 1
    _enlarge(rd)
    _enlarge(wr)
    while True:
        head = _read_exact(rd, 4)
        if head is None:
            return
        body = _read_exact(rd, int.from_bytes(head, "little"))
        if body is None:
            return
        _write_all(wr, head)
        _write_all(wr, body)


def measure(runs: int = 15, pings: int = 300) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--echo"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        wr, rd = proc.stdin.fileno(), proc.stdout.fileno()
        _enlarge(wr)
        _enlarge(rd)

        def roundtrip(payload: bytes) -> None:
            # The child reads the whole message before answering: no deadlock.
            _write_all(wr, len(payload).to_bytes(4, "little"))
            _write_all(wr, payload)
            head = _read_exact(rd, 4)
            _read_exact(rd, int.from_bytes(head, "little"))

        big = os.urandom(SIZE)
        roundtrip(big)
        echo = []
        for _ in range(runs):
            t = time.perf_counter()
            roundtrip(big)
            echo.append(time.perf_counter() - t)
        small = b"12345678"
        for _ in range(50):
            roundtrip(small)
        ping = []
        for _ in range(pings):
            t = time.perf_counter()
            roundtrip(small)
            ping.append(time.perf_counter() - t)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    macs, copies = [], []
    key = os.urandom(32)
    for _ in range(5):
        t = time.perf_counter()
        hmac.new(key, big, hashlib.sha256).digest()
        macs.append(time.perf_counter() - t)
        t = time.perf_counter()
        bytearray(big)
        copies.append(time.perf_counter() - t)
    return {"pipe_echo_ms": statistics.median(echo) * 1e3,
            "pipe_pingpong_us": statistics.median(ping) * 1e6,
            "hmac_sha256_ms": statistics.median(macs) * 1e3,
            "copy_ms": statistics.median(copies) * 1e3}


if __name__ == "__main__":
    if sys.argv[1:] == ["--echo"]:
        echo_server()
    else:
        print(json.dumps(measure()))
