"""What the dashboard costs: jobs run with and without it displayed.

    python bench/dashboard.py [--workers 2] [--rounds 21] [--long-rounds 11]
                              [--tasks 20000] [--long-tasks 20000] [--long-task-ms 0.1]
                              [--chunksize N] [--lead-ms MS] [--profile N]
                              [--markdown PATH] [--json PATH]

Everything runs in a real Jupyter kernel (started here with this
interpreter, through jupyter_client), the way a notebook runs it; this
script plays the front end and reads every IOPub message, as JupyterLab
would.  Two jobs:

* **short** — the issue's case: 20,000 tiny tasks (``return x``).  It lasts
  well under one 0.25 s refresh of the widgets, so it mostly measures what
  showing a widget costs once per job;
* **long** — 20,000 tasks of 0.1 ms of computation each: a job that spans
  several refreshes, so the dashboard's updates while a job runs are
  measured too.

Each round runs the job four ways, in rotating order:

* **plain** — ``master.map_async(fn, range(N)).wait()``, nothing displayed;
* **dashboard** — the same with ``%pymw dashboard`` displayed (backend
  form, a row per job, the task table of the selected job, following the
  new job);
* **inline** — the inline job widget only, as a blocking ``%%pymw`` cell
  shows it;
* **dashboard+inline** — both: a ``%%pymw`` cell with the dashboard open.

A dashboard is made and displayed in a cell of its own before the job's
cell, and closed (with every widget in it) in one after, so no other run
has one listening; the widget update messages counted are those the front
end received during the job's cell.
Before each job the earlier jobs are dropped and garbage is collected, so
no run pays for another's task records.  Times are measured inside the
kernel (submit to last result), with the kernel process's CPU time (every
thread: the scheduler's, the widgets' ticker) beside them.  The figures are
per-round ratios — a variant's time divided by plain's *in the same round*
— summarised by their median and quartiles; the dashboard's cost is
dashboard / plain (and dashboard+inline / inline for a ``%%pymw`` cell).
Every tick of the dashboard (and of its rows) is timed in the kernel: the
tables say in how many jobs a tick fell, how much of the jobs' time the
ticks overlapped and their CPU; ``--profile N`` prints a cProfile of the
ticks that ran during the short jobs, and ``--lead-ms MS`` submits each
job MS before the ticker's next tick, so a tick falls during every job
(the worst case for a job shorter than a refresh).
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETUP = """
import cProfile
import gc
import time
from IPython.display import display
from pymw_magic.widgets.dashboard import Dashboard, use_master
from pymw_magic.widgets.jobview import TICKER, JobView
# Every tick of the dashboard and its rows is timed (wall and the ticking
# thread's CPU); those that start while a job runs are profiled.
TICKS = []          # (start, end, thread CPU seconds) of each tick of the dashboard or a row of it
JOB = [None, None]  # the timed job's (start, end)
INLINE = set()      # id() of the inline JobView (not the dashboard's; not held: it would hold its job)
PROFILE = cProfile.Profile()
def _timed(tick):
    def timed(self):
        if id(self) in INLINE:
            return tick(self)
        running = JOB[0] is not None and JOB[1] is None
        s, c = time.perf_counter(), time.thread_time()
        if running:
            PROFILE.enable()
        try:
            return tick(self)
        finally:
            if running:
                PROFILE.disable()
            TICKS.append((s, time.perf_counter(), time.thread_time() - c))
    return timed
Dashboard.tick = _timed(Dashboard.tick)
JobView.tick = _timed(JobView.tick)
master = use_master("local", {{"workers": {workers}}})
def tiny(x):
    return x
def spin(x, seconds={spin}):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return x
FNS = {{"tiny": tiny, "spin": spin}}
for fn in FNS.values():   # warm: workers started, functions sent, durations known
    master.map_async(fn, range(2000)).result()
def close_tree(widget):
    for child in getattr(widget, "children", ()):
        close_tree(child)
    widget.close()
board = None
def prepare(mode):
    global board
    gc.collect()   # earlier jobs (held by nobody, so gone from master.jobs) and their task records
    if "dashboard" in mode:
        board = Dashboard()
        display(board)
def finish():
    global board
    if board is not None:
        board.refresh()
        close_tree(board)
        board = None
def run(mode, fn, tasks, chunksize, lead):
    if lead is not None and board is not None:
        # Submit ``lead`` s before the ticker's next tick is due: a tick
        # falls during every job (the worst case for a short job).
        n = len(TICKS)
        while len(TICKS) == n:
            time.sleep(0.001)
        time.sleep(max(0.0, TICKS[-1][1] + TICKER.interval - lead - time.perf_counter()))
    elif lead is not None:
        time.sleep(TICKER.interval / 2)   # idle workers before the job, as with the dashboard
    del TICKS[:]
    INLINE.clear()
    JOB[:] = [time.perf_counter(), None]
    t0, c0 = time.perf_counter(), time.process_time()
    job = master.map_async(FNS[fn], range(tasks), chunksize=chunksize)
    view = None
    if "inline" in mode:
        view = JobView(job)
        INLINE.add(id(view))
        display(view)
    job.wait()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    JOB[1] = time.perf_counter()
    # the dashboard's ticks during the job: how many drew, their time in it, their CPU
    during = [(s, e, c) for s, e, c in list(TICKS) if s < JOB[1] and e > t0]
    in_job = sum(min(e, JOB[1]) - max(s, t0) for s, e, c in during)
    if view is not None:
        view.refresh()
    assert job.counts()["done"] == tasks
    print("RESULT", elapsed, cpu, len(during), in_job, sum(c for s, e, c in during))
def profile_stats(limit):
    import io, pstats
    out = io.StringIO()
    pstats.Stats(PROFILE, stream=out).sort_stats("cumulative").print_stats(limit)
    print(out.getvalue())
"""

MODES = {
    "plain": "plain (nothing displayed)",
    "dashboard": "dashboard displayed",
    "inline": "inline job widget (a %%pymw cell)",
    "dashboard+inline": "dashboard + inline widget (a %%pymw cell, dashboard open)",
}
#: (variant, baseline): the ratios reported, per round
RATIOS = [("dashboard", "plain"), ("dashboard+inline", "inline"), ("inline", "plain"),
          ("dashboard+inline", "plain")]
TARGET = 1.05  # the issue: the dashboard costs under 5 %


def _kernel_env(tmp: str) -> dict[str, str]:
    spec = Path(tmp, "kernels", "python3")
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (bench)", "language": "python"}))
    path = os.environ.get("PYTHONPATH")
    return {"JUPYTER_PATH": tmp, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _execute(kc, code: str) -> tuple[str, int]:
    """Run ``code``; what it printed and the widget updates received."""
    msg_id = kc.execute(code)
    printed, updates = [], 0
    while True:
        msg = kc.get_iopub_msg(timeout=600)
        kind = msg["msg_type"]
        if kind == "stream":
            printed.append(msg["content"]["text"])
        elif kind == "error":
            raise RuntimeError("\n".join(msg["content"]["traceback"]))
        elif kind == "comm_msg" and msg["content"]["data"].get("method") == "update":
            updates += 1
        elif (kind == "status" and msg["content"]["execution_state"] == "idle"
              and msg["parent_header"].get("msg_id") == msg_id):
            return "".join(printed), updates


def _elapsed(printed: str) -> tuple[float, float, int, float, float]:
    """(wall seconds, the kernel's CPU seconds — all its threads) of the job,
    and the dashboard's ticks during it: how many, their wall seconds inside
    the job, their thread's CPU seconds."""
    words = next(line for line in printed.splitlines() if line.startswith("RESULT")).split()
    return float(words[1]), float(words[2]), int(words[3]), float(words[4]), float(words[5])


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0]
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def run_case(kc, *, fn: str, tasks: int, rounds: int, chunksize: int | None,
             lead: float | None = None) -> dict:
    def once(mode: str) -> tuple[str, int]:
        """One job: set up (untimed, its own cell), run, clean up (untimed)."""
        _execute(kc, f"prepare({mode!r})")
        printed, updates = _execute(kc, f"run({mode!r}, {fn!r}, {tasks}, {chunksize!r}, {lead!r})")
        _execute(kc, "finish()")
        return printed, updates

    for mode in MODES:  # a warm-up run of each
        once(mode)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    updates: dict[str, list[int]] = {m: [] for m in MODES}
    ticks: dict[str, list[tuple[int, float, float]]] = {m: [] for m in MODES}
    modes = list(MODES)
    for r in range(rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate who goes first
        for mode in order:
            printed, n = once(mode)
            wall, used, n_ticks, tick_wall, tick_cpu = _elapsed(printed)
            ticks[mode].append((n_ticks, tick_wall, tick_cpu))
            times[mode].append(wall)
            cpu[mode].append(used)
            updates[mode].append(n)
    ratios = {f"{a}/{b}": [x / y for x, y in zip(times[a], times[b])] for a, b in RATIOS}
    cpu_ratios = {f"{a}/{b}": [x / y for x, y in zip(cpu[a], cpu[b])] for a, b in RATIOS}
    return {"fn": fn, "tasks": tasks, "rounds": rounds, "chunksize": chunksize or "auto", "lead": lead,
            "times": times, "cpu": cpu, "updates": updates, "ticks": ticks, "ratios": ratios,
            "cpu_ratios": cpu_ratios}


def table(case: dict, title: str) -> str:
    med = statistics.median
    rows = []
    for mode, label in MODES.items():
        t = med(case["times"][mode])
        ticks = case["ticks"][mode]
        during = sum(1 for n, _w, _c in ticks if n)
        share = sum(w for _n, w, _c in ticks) / sum(case["times"][mode])
        tick_cpu = sum(c for _n, _w, c in ticks) / len(ticks)
        rows.append(f"| {label} | {t:.3f} s | {case['tasks'] / t:,.0f} | {med(case['cpu'][mode]):.3f} s "
                    f"| {med(case['updates'][mode]):.0f} | {during}/{len(ticks)} | {100 * share:.2f} % "
                    f"| {1000 * tick_cpu:.2f} ms |")
    ratio_rows = []
    for key in case["ratios"]:
        q1, q2, q3 = _quartiles(case["ratios"][key])
        c1, c2, c3 = _quartiles(case["cpu_ratios"][key])
        ratio_rows.append(f"| {key} | **{q2:.3f}** ({q1:.3f}\u2013{q3:.3f}) | {c2:.3f} ({c1:.3f}\u2013{c3:.3f}) |")
    plain = med(case["times"]["plain"])
    dash = _quartiles(case["ratios"]["dashboard/plain"])[1]
    cell = _quartiles(case["ratios"]["dashboard+inline/inline"])[1]
    verdict = (f"Dashboard vs no dashboard: {100 * (dash - 1):+.1f} % (bare job), "
               f"{100 * (cell - 1):+.1f} % (a %%pymw cell's job, inline widget in both): the < 5 % target is "
               f"{'met' if max(dash, cell) < TARGET else 'NOT met'}"
               + ("" if (dash < TARGET) == (cell < TARGET) else
                  f" ({'met' if dash < TARGET else 'not met'} for the bare job, "
                  f"{'met' if cell < TARGET else 'not met'} for the cell)") + "."
               f" (By wall-clock time; the kernel's CPU time: "
               f"{100 * (_quartiles(case['cpu_ratios']['dashboard/plain'])[1] - 1):+.1f} % and "
               f"{100 * (_quartiles(case['cpu_ratios']['dashboard+inline/inline'])[1] - 1):+.1f} %.)")
    return "\n".join([
        f"### {title}",
        "",
        f"{case['tasks']:,} tasks ({case['fn']}), chunksize {case['chunksize']}, {case['rounds']} rounds "
        f"(rotating order); the plain job lasts {plain:.3f} s = {plain / 0.25:.1f} widget refreshes (0.25 s)"
        + (f"; each job submitted {case['lead'] * 1000:.0f} ms before the ticker's next tick "
           "(a tick falls in every dashboard job: the worst case)." if case.get("lead") is not None else "."),
        "",
        "| variant | median time | tasks/s | kernel CPU (median) | widget updates per job (median) "
        "| jobs with a dashboard tick in them | the dashboard's ticks' time inside jobs / jobs' time "
        "| their CPU per job (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Per-round ratios (a variant's time over its baseline's in the same round): median (quartiles).",
        "",
        "| ratio | time | kernel CPU |",
        "|---|---:|---:|",
        *ratio_rows,
        "",
        verdict,
    ])


def in_process(rounds: int, tasks: int, workers: int) -> str:
    """Without a kernel (no widget message is sent): the job alone, with a
    no-op listener on its master's event bus, and with a Dashboard; then
    what one tick showing a new job costs.  Per-round ratios to plain."""
    import gc
    import time
    sys.path.insert(0, str(ROOT))
    from pymw_magic import Master, store
    from pymw_magic.widgets.dashboard import Dashboard
    from pymw_magic.widgets.jobview import Ticker

    def close_tree(widget):
        for child in getattr(widget, "children", ()):
            close_tree(child)
        widget.close()
    master = Master("local", workers=workers)
    rec = store.recorder()   # the job store's recorder, attached to every master (PYMW_STORE=0: None)
    attached = rec is not None and rec.attached(master)
    try:
        for _ in range(3):
            master.map_async(abs, range(2000)).result()
        times: dict[str, list[float]] = {"plain": [], "listener": [], "dashboard": []}
        if attached:
            times["no-store"] = []
        cpu: dict[str, list[float]] = {mode: [] for mode in times}
        for r in range(rounds):
            for mode in (list(times) if r % 2 else list(times)[::-1]):
                gc.collect()
                board = sub = None
                if mode == "dashboard":
                    board = Dashboard(masters=lambda: [master])
                elif mode == "listener":
                    sub = master.events.subscribe(lambda _event: None)
                elif mode == "no-store":
                    rec.detach(master)
                t0, c0 = time.perf_counter(), time.process_time()
                master.map_async(abs, range(tasks)).wait()
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)   # (this process: every thread)
                if mode == "no-store":
                    rec.attach(master)
                if board is not None:
                    close_tree(board)
                if sub is not None:
                    sub.close()
        board = Dashboard(masters=lambda: [master], ticker=Ticker(3600))
        ticks = []
        for _ in range(rounds):
            master.map_async(abs, range(tasks)).wait()
            t0 = time.perf_counter()
            board.tick()
            ticks.append(time.perf_counter() - t0)
        close_tree(board)
    finally:
        master.shutdown()
    med = statistics.median
    lines = [f"In-process, {tasks:,} tiny tasks, {workers} local workers, {rounds} rounds (no kernel); "
             f"the job store's recorder {'attached to the master' if attached else 'OFF'}"
             f"{' (task events: ' + str(master.events.tasks) + ')' if attached else ''}; "
             f"load average {os.getloadavg()[0]:.1f}:", ""]
    pairs = [("listener", "plain"), ("dashboard", "plain")]
    if attached:
        pairs.append(("plain", "no-store"))
    for mode, base in pairs:
        ratios = [a / b for a, b in zip(times[mode], times[base])]
        cpus = [a / b for a, b in zip(cpu[mode], cpu[base])]
        lines.append(f"* {mode} / {base}: time median {med(ratios):.3f} (quartiles "
                     f"{_quartiles(ratios)[0]:.3f}\u2013{_quartiles(ratios)[2]:.3f}), master CPU median "
                     f"{med(cpus):.3f} ({_quartiles(cpus)[0]:.3f}\u2013{_quartiles(cpus)[2]:.3f}); {mode} job "
                     f"{med(times[mode]) * 1000:.1f} ms ({med(cpu[mode]) * 1000:.1f} ms CPU), {base} job "
                     f"{med(times[base]) * 1000:.1f} ms ({med(cpu[base]) * 1000:.1f} ms CPU)")
    lines.append(f"* a dashboard tick showing a new job: median {med(ticks) * 1000:.2f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=20_000, help="tasks of the short job")
    ap.add_argument("--rounds", type=int, default=21, help="rounds of the short job")
    ap.add_argument("--long-tasks", type=int, default=20_000)
    ap.add_argument("--long-task-ms", type=float, default=0.1, help="computation per task of the long job")
    ap.add_argument("--long-rounds", type=int, default=11, help="0: no long job")
    ap.add_argument("--chunksize", type=int, default=None, help="default: automatic batching")
    ap.add_argument("--markdown", type=Path, help="also write the tables here")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--lead-ms", type=float, default=None,
                    help="submit each dashboard job this long before the ticker's next tick, so a tick "
                         "falls in every job (the worst case for a short job); default: whenever")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N costliest calls (cumulative) of the dashboard's ticks "
                         "that ran during the jobs (cProfile of the ticking thread)")
    ap.add_argument("--in-process", action="store_true",
                    help="only the in-process figures (no kernel): a listener's cost and a tick's")
    args = ap.parse_args(argv)
    if args.in_process:
        text = in_process(args.rounds, args.tasks, args.workers)
        print(text)
        return {"in_process": text}

    from jupyter_client.manager import start_new_kernel

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(_kernel_env(tmp))
        km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
        try:
            _execute(kc, SETUP.format(workers=args.workers, spin=args.long_task_ms / 1000))
            short = run_case(kc, fn="tiny", tasks=args.tasks, rounds=args.rounds, chunksize=args.chunksize,
                             lead=None if args.lead_ms is None else args.lead_ms / 1000)
            profile = _execute(kc, f"profile_stats({args.profile})")[0] if args.profile else ""
            long = (run_case(kc, fn="spin", tasks=args.long_tasks, rounds=args.long_rounds,
                             chunksize=args.chunksize) if args.long_rounds else None)
            _execute(kc, "master.shutdown()")
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)
    load_after = os.getloadavg()
    ended = datetime.datetime.now(datetime.timezone.utc)

    import ipykernel
    import ipywidgets
    header = (f"Run {started:%Y-%m-%d %H:%M}\u2013{ended:%H:%M} UTC, {args.workers} local workers, "
              f"Python {platform.python_version()}, ipykernel {ipykernel.__version__}, "
              f"ipywidgets {ipywidgets.__version__}, {os.cpu_count()} cores; load average (1, 5, 15 min) "
              f"{' '.join(f'{x:.2f}' for x in load_before)} before, "
              f"{' '.join(f'{x:.2f}' for x in load_after)} after.")
    text = "\n\n".join([
        header,
        table(short, f"Short job: the issue's case ({args.tasks:,} tiny tasks)"),
        *([f"Profile of the dashboard's ticks during the short jobs (cumulative):\n\n```\n"
           f"{profile.strip()}\n```"] if profile else []),
        *([table(long, f"Long job: {args.long_tasks:,} tasks of {args.long_task_ms:g} ms")] if long else []),
    ])
    print(text)
    figures = {"started": started.isoformat(), "ended": ended.isoformat(), "load_before": load_before,
               "load_after": load_after, "workers": args.workers, "short": short, "long": long}
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
