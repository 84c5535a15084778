"""Where the master's CPU goes on a map of 20,000 tiny tasks, by part.

    PYTHONPATH=<tree> python bench/tiny_parts.py [--maps 20] [--progress]

No profiler (cProfile and yappi cost more per task than the code they
measure, and misplace generator and GIL time): the scheduler's and the
pool backend's methods are wrapped to add up their thread CPU time
(``time.thread_time``, per call, so nested parts are each counted whole);
the garbage collector's passes are timed through ``gc.callbacks``; each
thread's CPU is read from ``/proc/self/task``.  Figures are µs per task,
over ``--maps`` maps of ``square`` on 2 local workers after 3 warm-up maps.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_tasks as T  # noqa: E402

from pymw_magic import Master  # noqa: E402
from pymw_magic import job as J  # noqa: E402
from pymw_magic import policies as PO  # noqa: E402
from pymw_magic import scheduler as S  # noqa: E402
from pymw_magic.backends import pool as P  # noqa: E402

N = 20_000
PARTS = [(S.Scheduler, "feed"), (J.Job, "_read"), (J.Job, "_accept"), (S.Scheduler, "_push"),
         (S.Scheduler, "_select"), (S.Scheduler, "_chunk"), (PO.FIFO, "pop"), (S.Scheduler, "_start"),
         (P.PoolBackend, "_send"), (S.Scheduler, "completed"), (J.Job, "_on_final")]


def _wrap(acc: dict[str, float], cls: type, name: str) -> None:
    f = getattr(cls, name)
    label = f"{cls.__name__}.{name}"
    clock = time.thread_time

    def timed(*a, **k):
        t = clock()
        try:
            return f(*a, **k)
        finally:
            acc[label] += clock() - t
    setattr(cls, name, timed)


def _thread_ticks() -> dict[str, int]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            out[tid] = int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--maps", type=int, default=20)
    ap.add_argument("--progress", action="store_true", help="a live progress observer subscribed")
    args = ap.parse_args()
    acc: dict[str, float] = collections.defaultdict(float)
    for cls, name in PARTS:
        _wrap(acc, cls, name)
    gcs = {g: [0, 0.0] for g in range(3)}
    began = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            gcs[info["generation"]][0] += 1
            gcs[info["generation"]][1] += time.perf_counter() - began[0]

    items = list(range(N))
    m = Master("local", workers=2)
    try:
        if args.progress:
            m.events.subscribe(lambda e: None)
        for _ in range(3):
            assert list(m.map(T.square, items)) == [x * x for x in items]
        acc.clear()
        gc.callbacks.append(on_gc)
        ticks0 = _thread_ticks()
        c0, t0, m0 = time.process_time(), time.perf_counter(), time.thread_time()
        for _ in range(args.maps):
            list(m.map(T.square, items))
        wall, cpu, main_cpu = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0
        ticks1 = _thread_ticks()
        gc.callbacks.remove(on_gc)
    finally:
        m.shutdown()
    per = 1e6 / (args.maps * N)
    hz = os.sysconf("SC_CLK_TCK")
    print(f"{N * args.maps / wall / 1e3:.0f} k tasks/s; µs per task: wall {wall * per:.2f}, "
          f"master CPU {cpu * per:.2f} (the calling thread {main_cpu * per:.2f})")
    main_tid = str(threading.main_thread().native_id)
    for tid, tk in sorted(ticks1.items()):
        d = tk - ticks0.get(tid, 0)
        if d and tid != main_tid:
            print(f"  thread {tid}: {d / hz * per:.2f}")
    for label, seconds in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {label:24s} {seconds * per:.3f}")
    for g, (count, seconds) in gcs.items():
        print(f"  gc generation {g}: {count / args.maps:.1f} passes per map, {seconds * per:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
