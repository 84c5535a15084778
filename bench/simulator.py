"""The simulator side by side with SimPy and SimGrid on one scenario, in one run.

    python bench/simulator.py [--quick] [--tasks N] [--hosts M] [--simgrid-tasks N]

Scenario (the same for every engine): N tasks of 1 s of work at speed 1 on M
hosts whose speeds are drawn once from ``lognormal:1,0.5`` (seed 1) and given
to every engine; FIFO self-scheduling — a free host takes the next task;
always up, no failures, free network (the engines' common ground).  Each
engine records each task's host, start and end, and reports its makespan,
so the runs can be checked against each other.

* **pymw-magic**: ``pymw_magic.simulate(None, range(N), hosts=M, speeds=..., duration=1.0)``;
* **SimPy** (``pip install simpy``, the ``bench`` extra): one process per host
  pulling from a shared ``simpy.Store``, ``env.timeout(work / speed)``;
* **SimGrid** (Debian's ``python3-simgrid``, for ``/usr/bin/python3``): one
  actor per host executing ``work * 1e9`` flops on a host of ``speed`` Gf,
  pulling from a shared queue (no network: a ``routing="None"`` zone), in a
  child ``/usr/bin/python3``.  Skipped, with the reason, where it cannot run.

Also measured: the tuning widget's redraw (re-simulate, report, timeline
SVG) for 10,000 tasks on 1,000 hosts.  Targets (the simulator's design goals): 1,000,000 tasks
on 10,000 hosts under 10 s; at least 5x SimPy's speed on the same scenario;
a redraw under 0.5 s.  Nothing here asserts a time; the table is printed
and written to ``bench/out/simulator.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, ROOT)


def speeds_for(m: int) -> list[float]:
    rng = random.Random(1)
    return [math.exp(0.5 * rng.gauss(0.0, 1.0)) for _ in range(m)]


def run_pymw(n: int, m: int) -> dict[str, Any]:
    from pymw_magic import simulate
    speeds = speeds_for(m)
    t0 = time.perf_counter()
    report = simulate(None, range(n), hosts=m, speeds=speeds, duration=1.0, keep_values=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "makespan": report.makespan, "done": report.done}


def run_simpy(n: int, m: int) -> dict[str, Any]:
    try:
        import simpy
    except ImportError:
        return {"skipped": "simpy is not installed (pip install simpy; it is in the bench extra)"}
    speeds = speeds_for(m)
    works = [1.0] * n
    t0 = time.perf_counter()
    env = simpy.Environment()
    store = simpy.Store(env)
    store.items.extend(range(n))
    host_of, start, end = [0] * n, [0.0] * n, [0.0] * n

    def worker(h: int):
        sp = speeds[h]
        while store.items:
            i = yield store.get()
            start[i] = env.now
            host_of[i] = h
            yield env.timeout(works[i] / sp)
            end[i] = env.now

    for h in range(m):
        env.process(worker(h))
    env.run()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "makespan": max(end), "done": n, "version": simpy.__version__}


SIMGRID_CHILD = textwrap.dedent('''
    import json, math, random, sys, tempfile, time, collections
    import simgrid
    from simgrid import Engine, Actor, Host, this_actor
    n, m = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(1)
    speeds = [math.exp(0.5 * rng.gauss(0.0, 1.0)) for _ in range(m)]
    t0 = time.perf_counter()
    hosts = "".join(f'<host id="h{i}" speed="{s!r}Gf"/>' for i, s in enumerate(speeds))
    xml = ("<?xml version='1.0'?><!DOCTYPE platform SYSTEM \\"https://simgrid.org/simgrid.dtd\\">"
           f'<platform version="4.1"><zone id="z" routing="None">{hosts}</zone></platform>')
    path = tempfile.mktemp(suffix=".xml")
    open(path, "w").write(xml)
    e = Engine(["bench", "--log=root.thres:critical"])
    e.load_platform(path)
    queue = collections.deque(range(n))
    end = [0.0] * n
    def worker():
        while queue:
            i = queue.popleft()
            this_actor.execute(1e9)
            end[i] = Engine.clock
    for i in range(m):
        Actor.create(f"w{i}", Host.by_name(f"h{i}"), worker)
    e.run()
    print(json.dumps({"seconds": time.perf_counter() - t0, "makespan": max(end), "done": n,
                      "version": getattr(simgrid, "__version__", "?")}))
''')


def run_simgrid(n: int, m: int, python: str = "/usr/bin/python3") -> dict[str, Any]:
    if not os.path.exists(python):
        return {"skipped": f"{python} not found"}
    probe = subprocess.run([python, "-c", "import simgrid"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"skipped": f"`import simgrid` fails under {python} (apt-get install python3-simgrid): "
                           + (probe.stderr.strip().splitlines() or ["?"])[-1]}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(SIMGRID_CHILD)
    try:
        out = subprocess.run([python, f.name, str(n), str(m)], capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"skipped": "SimGrid did not finish within 30 minutes"}
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        return {"skipped": "SimGrid run failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def duration_model(x: int) -> float:
    """The backend scenario's duration model: a task's work (seconds at speed 1) from its argument."""
    return 0.5 + (x % 7) * 0.25


def _task(x: int) -> int:
    return x


def scenario_simpy(n: int, m: int) -> dict[str, Any]:
    """SimPy on the backend scenario: one process per host pulling from a
    shared store, each task's work from the duration model."""
    import simpy
    speeds = speeds_for(m)
    t0 = time.perf_counter()
    env = simpy.Environment()
    store = simpy.Store(env)
    store.items.extend(range(n))
    host_of, start, end = [0] * n, [0.0] * n, [0.0] * n

    def worker(h: int):
        sp = speeds[h]
        while store.items:
            i = yield store.get()
            start[i] = env.now
            host_of[i] = h
            yield env.timeout(duration_model(i) / sp)
            end[i] = env.now

    for h in range(m):
        env.process(worker(h))
    env.run()
    return {"seconds": time.perf_counter() - t0, "makespan": max(end)}


def scenario_simulate(n: int, m: int) -> dict[str, Any]:
    from pymw_magic import simulate
    t0 = time.perf_counter()
    report = simulate(None, range(n), hosts=m, speeds=speeds_for(m), duration=duration_model, keep_values=False)
    return {"seconds": time.perf_counter() - t0, "makespan": report.makespan}


def scenario_master(n: int, m: int) -> dict[str, Any]:
    """``Master("simulator")``: from making the master to having every
    result (the report, made afterwards, is timed apart)."""
    from pymw_magic import Master
    t0 = time.perf_counter()
    with Master("simulator", workers=m, speeds=speeds_for(m), duration=duration_model) as master:
        job = master.map_async(_task, range(n))
        job.result(timeout=3600)
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        makespan = job.report().makespan
        report_s = time.perf_counter() - t1
    return {"seconds": seconds, "makespan": makespan, "report": report_s}


def run_backend_scenario(n: int, m: int, reps: int) -> dict[str, Any]:
    """SimPy, ``simulate()`` and ``Master("simulator")`` on one scenario,
    interleaved ``reps`` times (rotating order); ratios per round."""
    engines = {"SimPy": scenario_simpy, "simulate()": scenario_simulate, 'Master("simulator")': scenario_master}
    names = list(engines)
    rounds: list[dict[str, dict[str, Any]]] = []
    for rep in range(reps):
        got: dict[str, dict[str, Any]] = {}
        for name in names[rep % 3:] + names[:rep % 3]:
            got[name] = engines[name](n, m)
            print(f"  round {rep + 1}: {name:<20} {got[name]['seconds']:.3f} s, makespan {got[name]['makespan']:.4f}"
                  + (f", report {got[name]['report']:.3f} s" if "report" in got[name] else ""), flush=True)
        rounds.append(got)
    return {"rounds": rounds, "n": n, "m": m}


def backend_lines(res: dict[str, Any]) -> list[str]:
    rounds, n, m = res["rounds"], res["n"], res["m"]
    lines = [f"Backend scenario: {n:,} tasks on {m:,} hosts of speeds lognormal:1,0.5 (seed 1), duration model "
             "`0.5 + (x % 7) * 0.25` s of work, FIFO; {len(rounds)} rounds, rotating order.".replace(
                 "{len(rounds)}", str(len(rounds))), "",
             "| engine | median s | min s | speed vs SimPy, per round: median (min–max) | makespan |",
             "|---|---:|---:|---:|---:|"]
    for name in rounds[0]:
        secs = [r[name]["seconds"] for r in rounds]
        ratios = [r["SimPy"]["seconds"] / r[name]["seconds"] for r in rounds]
        lines.append(f"| {name} | {statistics.median(secs):.3f} | {min(secs):.3f} | "
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}–{max(ratios):.2f}) | "
                     f"{rounds[0][name]['makespan']:.4f} |")
    reports = [r['Master("simulator")']["report"] for r in rounds]
    lines += ["", f"`job.report()` of the backend's job, made after the results: median {statistics.median(reports):.3f} s."]
    return lines


def run_redraw(n: int = 10_000, m: int = 1_000, reps: int = 5) -> dict[str, Any]:
    from pymw_magic import tune
    tuner = tune(tasks=n, work="uniform:0.5,1.5", hosts=m, spread=0.5, max_hosts=2 * m)
    times = []
    for i in range(reps):
        tuner.set(policy=["fifo", "longest-first"][i % 2], spread=0.5 + 0.1 * (i % 3))
        times.append(tuner.seconds)
    return {"median": statistics.median(times), "max": max(times), "reps": reps}


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--hosts", type=int, default=None)
    ap.add_argument("--simgrid-tasks", type=int, default=None, help="SimGrid is slow: fewer tasks for it")
    ap.add_argument("--skip", action="append", default=[], help="simpy | simgrid | redraw | backend")
    ap.add_argument("--backend-only", action="store_true",
                    help="only the backend scenario (SimPy, simulate(), Master(\"simulator\") side by side)")
    ap.add_argument("--backend-tasks", type=int, default=None)
    ap.add_argument("--backend-hosts", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the backend scenario")
    args = ap.parse_args(argv)
    bn = args.backend_tasks or (20_000 if args.quick else 200_000)
    bm = args.backend_hosts or (200 if args.quick else 2_000)
    backend = None
    if "backend" not in args.skip:
        try:
            import simpy  # noqa: F401
        except ImportError:
            print("backend scenario skipped: simpy is not installed (pip install simpy)")
        else:
            backend = run_backend_scenario(bn, bm, args.rounds)
    if args.backend_only:
        text = "\n".join(backend_lines(backend)) + "\n" if backend else "(skipped)\n"
        print()
        print(text)
        return 0
    n = args.tasks or (50_000 if args.quick else 1_000_000)
    m = args.hosts or (1_000 if args.quick else 10_000)
    sg_n = args.simgrid_tasks or (10_000 if args.quick else 100_000)
    rows = []

    def record(engine: str, tasks: int, got: dict[str, Any]) -> None:
        print(f"{engine:<11} {tasks:>9,} tasks on {m:,} hosts: " +
              (got["skipped"] if "skipped" in got else
               f"{got['seconds']:.2f} s, {tasks / got['seconds']:,.0f} tasks/s, makespan {got['makespan']:.4f}"),
              flush=True)
        rows.append((engine, tasks, got))

    pym = run_pymw(n, m)
    record("pymw-magic", n, pym)
    if "simpy" not in args.skip:
        record("SimPy", n, run_simpy(n, m))
    if "simgrid" not in args.skip:
        record("SimGrid", sg_n, run_simgrid(sg_n, m))
        if sg_n != n:
            record("pymw-magic", sg_n, run_pymw(sg_n, m))
    redraw = None
    if "redraw" not in args.skip:
        redraw = run_redraw()
        print(f"tuning redraw, 10,000 tasks on 1,000 hosts: median {redraw['median']:.3f} s, "
              f"max {redraw['max']:.3f} s over {redraw['reps']}", flush=True)

    ours = {t: g["seconds"] for e, t, g in rows if e == "pymw-magic"}
    lines = [f"# Simulator benchmark ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}; "
             f"command: `python bench/simulator.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| engine | tasks | hosts | seconds | tasks/s | pymw-magic is | makespan (virtual s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for engine, tasks, got in rows:
        if "skipped" in got:
            lines.append(f"| {engine} | {tasks:,} | {m:,} | skipped: {got['skipped']} | | | |")
            continue
        ratio = "" if engine == "pymw-magic" else f"{got['seconds'] / ours[tasks]:.1f}x faster"
        lines.append(f"| {engine} | {tasks:,} | {m:,} | {got['seconds']:.2f} | {fmt(tasks / got['seconds'])} "
                     f"| {ratio} | {got['makespan']:.4f} |")
    if redraw:
        lines += ["", f"Tuning-widget redraw (simulate + report + timeline SVG), 10,000 tasks on 1,000 hosts: "
                      f"median {redraw['median']:.3f} s, max {redraw['max']:.3f} s over {redraw['reps']} changes."]
    if backend:
        lines += [""] + backend_lines(backend)
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(BENCH_DIR, "out"), exist_ok=True)
    with open(os.path.join(BENCH_DIR, "out", "simulator.md"), "w") as f:
        f.write(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
