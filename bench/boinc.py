"""The BOINC backend's costs before any task runs, the time to a first
result, and the safe codec's cost against pickle: on the stand-in project
(or a real one: ``--project PATH``).

    python bench/boinc.py [--tasks 10000] [--rounds 3] [--project PATH] [--markdown PATH]

(a) **Creating a 10,000-task map's work**: ``Master("boinc", ...)``,
    ``map_async(abs, range(N))``, timed from the call until every work unit
    is in the project's database (the stand-in's, read directly: the
    backend's one ``bin/create_work --stdin`` has returned), twice: one work
    unit per task (``chunksize=1``: 10,000 staged inputs and 10,000 lines)
    and the automatic chunking (at most 1,000 work units).  The project's
    setup is done before (its first use) and timed apart.  Each round uses a
    fresh stand-in project whose daemon is stopped as soon as the work is
    created (nothing is cancelled: 10,000 ``cancel_jobs --name`` would be
    timed otherwise).
(b) **Time to first result**: from ``map_async`` to the first task done,
    on a stand-in project with 2 hosts, for a map of 20 tiny tasks, one
    per work unit (a volunteer's slot directory, the launcher, Python's start,
    the verification, our validator and assimilator, the master reading the
    events file).
(c) **The safe codec against pickle** on typical results: ``codec.encode``
    + ``codec.decode`` vs ``pickle.dumps`` + ``pickle.loads`` (protocol 5),
    per value, best of 5 runs.
(d) **Cancelling a job of N work units** (``--cancel N``, default 300):
    ``job.cancel()`` of a map of N one-task work units (tasks that would
    sleep), timed until every work unit of it has BOINC's CANCELLED bit in
    the stand-in's database, and the ``bin/cancel_jobs`` processes counted
    (``--only cancel`` runs this alone).

Nothing here asserts a time; the figures are printed and, with
``--markdown``, written as a table.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pymw_magic import Master  # noqa: E402
from pymw_magic.backends.batch import chunk_size  # noqa: E402
from pymw_magic.codec import decode, encode  # noqa: E402
from pymw_magic.testing.boinc import StandInProject  # noqa: E402


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def creation(tasks: int, chunksize: int | None, work: Path) -> dict:
    root = work / f"p{time.time_ns()}"
    project = StandInProject(root, hosts=1, idle_timeout=120).create()
    try:
        t0 = time.perf_counter()
        m = Master("boinc", project_home=str(root), chunksize=chunksize)
        setup = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            job = m.map_async(abs, range(tasks), name="bench")
            size = chunk_size(tasks, chunksize=chunksize, mean=None, delay=m.backend.delay())
            expect = math.ceil(tasks / size)

            def created():
                n = len(project.workunits())
                return n if n >= expect else None
            n = wait(created, 1800, "the work units")
            took = time.perf_counter() - t0
            project.stop()
        finally:
            m.shutdown(wait=False)
        return {"setup": setup, "create": took, "workunits": n}
    finally:
        project.stop()
        shutil.rmtree(root, ignore_errors=True)


def first_result(work: Path) -> float:
    root = work / f"f{time.time_ns()}"
    project = StandInProject(root, hosts=2, idle_timeout=120).create()
    try:
        with Master("boinc", project_home=str(root), chunksize=1) as m:
            m.map_async(abs, [0]).result(timeout=600)   # (setup, and a warm runtime cache)
            t0 = time.perf_counter()
            job = m.map_async(abs, range(20), name="first")
            wait(lambda: job.counts()["done"] >= 1, 600, "a first result")
            took = time.perf_counter() - t0
            job.result(timeout=600)
        return took
    finally:
        project.stop()
        shutil.rmtree(root, ignore_errors=True)


def _nap(x):
    import time
    time.sleep(600)
    return x


def cancelling(n: int, work: Path) -> tuple[float, int]:
    """(seconds from job.cancel() until all N work units are cancelled, cancel_jobs processes)."""
    from pymw_magic.backends import boinc as backend
    root = work / f"c{time.time_ns()}"
    project = StandInProject(root, hosts=1, idle_timeout=120).create()
    calls = []
    real = backend.Project.tool

    def counting(self, argv, *a, **kw):
        calls.append(argv[0])
        return real(self, argv, *a, **kw)
    backend.Project.tool = counting
    try:
        with Master("boinc", project_home=str(root), chunksize=1) as m:
            job = m.map_async(_nap, range(n), name="to-cancel")
            wait(lambda: len(project.workunits()) >= n, 1800, "the work units")
            del calls[:]
            t0 = time.perf_counter()
            job.cancel()
            wait(lambda: all(w["error_mask"] & 16 for w in project.workunits()), 1800, "the work units cancelled")
            took = time.perf_counter() - t0
        return took, calls.count("cancel_jobs")
    finally:
        backend.Project.tool = real
        project.stop()
        shutil.rmtree(root, ignore_errors=True)


def codec_costs() -> list[tuple[str, float, float, int, int]]:
    values = {"a float": 3.14159, "a list of 1,000 floats": [i * 0.5 for i in range(1000)],
              "a dict of 100 str -> int": {f"k{i}": i for i in range(100)},
              "a tuple (int, str, [floats])": (7, "label", [1.5, 2.5, float("nan")])}
    try:
        import numpy as np
        values["a 1,000 x 1,000 float64 array"] = np.random.default_rng(0).random((1000, 1000))
    except ImportError:
        pass
    out = []
    for name, value in values.items():
        def best(fn, n):
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                runs.append((time.perf_counter() - t0) / n)
            return min(runs)
        n = 5 if "array" in name else 2000
        safe = best(lambda: decode(encode(value)), n)
        pick = best(lambda: pickle.loads(pickle.dumps(value, protocol=5)), n)
        out.append((name, safe, pick, len(encode(value)), len(pickle.dumps(value, protocol=5))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markdown")
    ap.add_argument("--cancel", type=int, default=300)
    ap.add_argument("--only", choices=["cancel"])
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pymw-bench-boinc-"))
    os.environ.setdefault("PYMW_HOME", str(work / "home"))
    os.environ.setdefault("PYMW_CONFIG", str(work / "config"))
    lines = []
    try:
        rows = [cancelling(ns.cancel, work) for _ in range(ns.rounds)]
        took = [r[0] for r in rows]
        line = (f"| cancelling a job of {ns.cancel:,} work units | {statistics.median(took):.2f} s (min {min(took):.2f}, "
                f"max {max(took):.2f}) | {rows[0][1]} `cancel_jobs` process(es) |")
        print(line, flush=True)
        lines.append(line)
        if ns.only == "cancel":
            return
        for chunksize, label in ((1, "one work unit per task"), (None, "automatic chunks")):
            rows = [creation(ns.tasks, chunksize, work) for _ in range(ns.rounds)]
            create = [r["create"] for r in rows]
            line = (f"| creating {ns.tasks:,} tasks' work, {label} ({rows[0]['workunits']:,} work units) | "
                    f"{statistics.median(create):.2f} s (min {min(create):.2f}, max {max(create):.2f}) | "
                    f"setup on first use {statistics.median(r['setup'] for r in rows):.2f} s |")
            print(line, flush=True)
            lines.append(line)
        firsts = [first_result(work) for _ in range(ns.rounds)]
        line = (f"| time to first result (20 tasks, 2 stand-in hosts) | {statistics.median(firsts):.2f} s "
                f"(min {min(firsts):.2f}, max {max(firsts):.2f}) | |")
        print(line, flush=True)
        lines.append(line)
        for name, safe, pick, nsafe, npick in codec_costs():
            line = (f"| encode+decode {name}: safe codec vs pickle | {safe * 1e6:.1f} µs vs {pick * 1e6:.1f} µs "
                    f"({safe / pick:.1f}x) | {nsafe:,} vs {npick:,} bytes |")
            print(line, flush=True)
            lines.append(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if ns.markdown:
        Path(ns.markdown).write_text(
            "# BOINC backend (stand-in project)\n\n"
            f"`python bench/boinc.py --tasks {ns.tasks} --rounds {ns.rounds}` on {os.uname().nodename} "
            f"({os.cpu_count()} cores, shared), {time.strftime('%Y-%m-%d %H:%M')}.\n\n"
            "| what | time | notes |\n|---|---|---|\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
