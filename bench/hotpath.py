"""The hot path against its floor and its peers, interleaved in one process.

    python bench/hotpath.py [--rounds N] [--only array,latency,idle,tiny] [--json FILE]

A shared machine's load changes from second to second, so every figure
here is measured side by side with its reference *in turns*: one round is
a block of pymw-magic, then a block of the reference, and the ratio is
taken per round.  Reported: the median and the min of the rounds' medians,
and the median and best of the per-round ratios.

* ``array`` — a 10 MB float64 array sent to a worker and back
  (``submit(echo, a).result()``), against the raw pipe echo floor of
  ``bench/floor.py`` (10 MB written down a pipe to another process and
  back up a second one, 1 MiB pipe buffers); ratio = floor ms / pymw ms
  (above 1: pymw-magic is faster than the raw pipe); also the CPU
  milliseconds the master and its worker spend per round trip;
* ``latency`` — sequential ``submit(square, i).result()``, 2 workers,
  against ``ProcessPoolExecutor(2)``; ratio = pymw µs / PPE µs (below 1:
  pymw-magic is faster);
* ``idle`` — CPU seconds used by the master process (all its threads) and
  by its workers while nothing is submitted for a few seconds (and the
  same for ProcessPoolExecutor), as a percentage of one core;
* ``tiny`` — ``list(master.map(square, range(20000)))`` with automatic
  batching on 2 workers (per-task states kept; a second variant with a
  live progress observer subscribed to the master's events), against
  ``multiprocessing.Pool(2).map`` with its default chunking (no progress,
  no per-task state); tasks/s.

Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
os.environ["PYTHONPATH"] = os.pathsep.join([BENCH] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

import bench_tasks as T  # noqa: E402
import faulthandler  # noqa: E402
import floor  # noqa: E402

if os.environ.get("PYMW_BENCH_DUMP"):  # where a stuck run waits
    faulthandler.dump_traceback_later(float(os.environ["PYMW_BENCH_DUMP"]), exit=True)

SIZE = 10_000_000


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def case_array(rounds: int, per: int) -> dict:
    import numpy as np

    from pymw_magic import Master

    arr = np.random.default_rng(0).random(SIZE // 8)
    big = arr.tobytes()
    proc = subprocess.Popen([sys.executable, floor.__file__, "--echo"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, bufsize=0)
    wr, rd = proc.stdin.fileno(), proc.stdout.fileno()
    floor._enlarge(wr)
    floor._enlarge(rd)

    def pipe_echo() -> None:
        floor._write_all(wr, len(big).to_bytes(4, "little"))
        floor._write_all(wr, big)
        head = floor._read_exact(rd, 4)
        floor._read_exact(rd, int.from_bytes(head, "little"))

    import psutil

    m = Master("local", workers=1)
    try:
        for _ in range(3):
            back = m.submit(T.echo, arr).result()
            pipe_echo()
        assert np.array_equal(back, arr)
        del back
        me = psutil.Process()
        [worker] = [p for p in me.children() if "pymw_magic.worker" in " ".join(p.cmdline())]

        def cpu(p: psutil.Process) -> float:
            c = p.cpu_times()
            return c.user + c.system

        pymw, pipe, ratios, cpu_master, cpu_worker = [], [], [], [], []
        for _ in range(rounds):
            a, b = [], []
            c_m, c_w = cpu(me), cpu(worker)
            for _ in range(per):
                t = time.perf_counter()
                m.submit(T.echo, arr).result()
                a.append(time.perf_counter() - t)
            # (CPU per round trip: on a busy machine what the cores must give)
            cpu_master.append((cpu(me) - c_m) / per * 1e3)
            cpu_worker.append((cpu(worker) - c_w) / per * 1e3)
            for _ in range(per):
                t = time.perf_counter()
                pipe_echo()
                b.append(time.perf_counter() - t)
            pymw.append(statistics.median(a) * 1e3)
            pipe.append(statistics.median(b) * 1e3)
            ratios.append(pipe[-1] / pymw[-1])
    finally:
        m.shutdown()
        proc.stdin.close()
        proc.wait()
    return {"pymw_ms": summary(pymw), "pipe_floor_ms": summary(pipe), "floor_over_pymw": summary(ratios),
            "pymw_cpu_ms": {"master": summary(cpu_master), "worker": summary(cpu_worker)}}


def case_latency(rounds: int, per: int) -> dict:
    from pymw_magic import Master

    m = Master("local", workers=2)
    ppe = ProcessPoolExecutor(2)
    try:
        for i in range(50):
            m.submit(T.square, i).result()
            ppe.submit(T.square, i).result()
        pymw, peer, ratios = [], [], []
        for _ in range(rounds):
            a, b = [], []
            for i in range(per):
                t = time.perf_counter()
                m.submit(T.square, i).result()
                a.append(time.perf_counter() - t)
            for i in range(per):
                t = time.perf_counter()
                ppe.submit(T.square, i).result()
                b.append(time.perf_counter() - t)
            pymw.append(statistics.median(a) * 1e6)
            peer.append(statistics.median(b) * 1e6)
            ratios.append(pymw[-1] / peer[-1])
        # (who read the replies: the caller in result(), or a serving thread)
        reads = dict(getattr(m.backend, "reads", {}))
    finally:
        m.shutdown()
        ppe.shutdown()
    return {"pymw_us": summary(pymw), "ppe_us": summary(peer), "pymw_over_ppe": summary(ratios),
            "replies_read_by": reads}


def _cpu(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except Exception:
            pass
    return total


def case_idle(seconds: float) -> dict:
    import psutil

    from pymw_magic import Master

    out = {}
    me = psutil.Process()
    for name in ("pymw", "ppe"):
        ex = Master("local", workers=2) if name == "pymw" else ProcessPoolExecutor(2)
        try:
            for i in range(200):   # busy first: what it does once the work stops
                ex.submit(T.square, i).result()
            list(ex.map(T.square, range(2000)))
            time.sleep(0.5)
            kids = me.children(recursive=True)
            m0, w0, t0 = _cpu([me]), _cpu(kids), time.perf_counter()
            time.sleep(seconds)
            m1, w1, t1 = _cpu([me]), _cpu(kids), time.perf_counter()
            out[name] = {"master_cpu_pct": 100 * (m1 - m0) / (t1 - t0),
                         "workers_cpu_pct": 100 * (w1 - w0) / (t1 - t0),
                         "workers": len(kids), "seconds": t1 - t0}
        finally:
            ex.shutdown()
    return out


def case_tiny(rounds: int, n: int = 20_000) -> dict:
    from pymw_magic import Master
    from pymw_magic.events import TasksChanged

    items = list(range(n))
    expected = [x * x for x in items]
    # The pool first: forking while the master's threads start its workers
    # would hand the fork a copy of their exec-status pipes (Popen then waits for ever).
    pool = multiprocessing.Pool(2)
    pool.map(T.square, range(10))
    m = Master("local", workers=2)
    seen = [0]

    def progress(event) -> None:
        if isinstance(event, TasksChanged) and event.state.final:
            seen[0] += len(event.tasks)

    try:
        for _ in range(3):
            assert list(m.map(T.square, items)) == expected
            assert pool.map(T.square, items) == expected
        import psutil
        plain, live, peer = [], [], []
        me = psutil.Process()
        pool_kids = [psutil.Process(p.pid) for p in pool._pool]
        mine = [k for k in me.children(recursive=True) if k.pid not in {p.pid for p in pool_kids}]
        # CPU per task (µs): the master process (every thread) and its
        # workers; a figure a loaded machine disturbs far less than time.
        cpu: dict[str, list[float]] = {"pymw_master": [], "pymw_workers": [], "pymw_progress_master": [],
                                       "pymw_progress_workers": [], "pool_master": [], "pool_workers": []}

        def timed(fn, kids, key, out):
            c0, w0, t = time.process_time(), _cpu(kids), time.perf_counter()
            fn()
            out.append(n / (time.perf_counter() - t))
            cpu[key + "_master"].append(1e6 * (time.process_time() - c0) / n)
            cpu[key + "_workers"].append(1e6 * (_cpu(kids) - w0) / n)

        for _ in range(rounds):
            timed(lambda: list(m.map(T.square, items)), mine, "pymw", plain)
            sub = m.events.subscribe(progress)
            seen[0] = 0
            timed(lambda: list(m.map(T.square, items)), mine, "pymw_progress", live)
            sub.close()
            assert seen[0] == n, seen[0]
            timed(lambda: pool.map(T.square, items), pool_kids, "pool", peer)
    finally:
        m.shutdown()
        pool.close()
        pool.join()
    return {"pymw_map_tasks_s": summary(plain), "pymw_map_progress_tasks_s": summary(live),
            "pool_map_tasks_s": summary(peer),
            "ratio_to_pool": statistics.median(a / b for a, b in zip(plain, peer)),
            "ratio_to_pool_progress": statistics.median(a / b for a, b in zip(live, peer)),
            # (the mean: a process's CPU time is counted in 10 ms ticks, coarse for one round)
            "cpu_us_per_task": {k: statistics.fmean(v) for k, v in cpu.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--only", default="array,latency,idle,tiny")
    p.add_argument("--idle-seconds", type=float, default=5.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cases = args.only.split(",")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rounds": args.rounds,
              "load_before": os.getloadavg()[0]}
    runs = {"array": lambda: case_array(args.rounds, 5), "latency": lambda: case_latency(args.rounds, 100),
            "idle": lambda: case_idle(args.idle_seconds), "tiny": lambda: case_tiny(args.rounds)}
    for case in cases:
        t = time.perf_counter()
        result[case] = runs[case]()
        print(f"{case}: {time.perf_counter() - t:.0f} s: {json.dumps(result[case])}", file=sys.stderr, flush=True)
    result["load_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
