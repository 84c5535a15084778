"""What the dashboard costs: 20,000 tiny tasks with and without it displayed.

    python bench/dashboard.py [--tasks 20000] [--workers 2] [--rounds 21]
                              [--chunksize N] [--markdown PATH] [--json PATH]

Everything runs in a real Jupyter kernel (started here with this
interpreter, through jupyter_client), the way a notebook runs it; this
script plays the front end and reads every IOPub message, as JupyterLab
would.  Each round runs the same job three ways, in rotating order:

* **plain** — ``master.map_async(tiny, range(N)).wait()``, no widget;
* **inline** — the same with the inline job widget displayed, as a
  blocking ``%%pymw`` cell shows it;
* **dashboard** — ``%pymw dashboard`` displayed too (backend form, a row
  per job, the task table of the selected job, following the new job).

Before each job the earlier jobs are dropped and garbage is collected, so
no run pays for another's task records.  Times are measured inside the
kernel (submit to last result), with the
kernel process's CPU time (every thread: the scheduler's, the widgets'
ticker) beside them — the steadier figure on a shared machine.  The figure
is the median over rounds of the per-round time ratio to plain, and the
ratio of median kernel CPU times; the widget update messages the front end received
during each dashboard job are counted too.  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETUP = """
import gc
import time
from IPython.display import display
from pymw_magic.widgets.dashboard import Dashboard, use_master
from pymw_magic.widgets.jobview import JobView
master = use_master("local", {{"workers": {workers}}})
def tiny(x):
    return x
master.map_async(tiny, range(2000)).result()   # warm: workers started, function sent
board = None
def run(mode):
    global board
    if mode == "dashboard" and board is None:
        board = Dashboard()
        display(board)
    master.jobs.clear()   # earlier jobs' task records: memory (and GC time) stays flat
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    job = master.map_async(tiny, range({tasks}), chunksize={chunksize})
    if mode != "plain":
        view = JobView(job)
        display(view)
    job.wait()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if mode != "plain":
        view.refresh()
    assert job.counts()["done"] == {tasks}
    print("RESULT", elapsed, cpu)
"""

MODES = {
    "plain": "plain (no widget)",
    "inline": "inline job widget (as a blocking %%pymw cell)",
    "dashboard": "dashboard + inline widget displayed",
}


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


def _elapsed(printed: str) -> tuple[float, float]:
    """(wall seconds, the kernel's CPU seconds — all its threads) of the job."""
    words = next(line for line in printed.splitlines() if line.startswith("RESULT")).split()
    return float(words[1]), float(words[2])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--chunksize", type=int, default=None, help="default: automatic batching")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    from jupyter_client.manager import start_new_kernel

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(_kernel_env(tmp))
        km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
        try:
            _execute(kc, SETUP.format(workers=args.workers, tasks=args.tasks, chunksize=args.chunksize))
            for mode in MODES:  # a warm-up round of each
                _execute(kc, f"run({mode!r})")
            times: dict[str, list[float]] = {m: [] for m in MODES}
            cpu: dict[str, list[float]] = {m: [] for m in MODES}
            ratios: dict[str, list[float]] = {m: [] for m in MODES if m != "plain"}
            updates: list[int] = []
            modes = list(MODES)
            for r in range(args.rounds):
                order = modes[r % 3:] + modes[:r % 3]  # rotate who goes first
                this: dict[str, float] = {}
                for mode in order:
                    printed, n = _execute(kc, f"run({mode!r})")
                    this[mode], used = _elapsed(printed)
                    cpu[mode].append(used)
                    times[mode].append(this[mode])
                    if mode == "dashboard":
                        updates.append(n)
                for mode in ratios:
                    ratios[mode].append(this[mode] / this["plain"])
            _execute(kc, "board.close()\nmaster.shutdown()")
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)

    med = statistics.median
    figures = {
        "tasks": args.tasks, "workers": args.workers, "rounds": args.rounds,
        "chunksize": args.chunksize or "auto",
        "median_s": {m: med(v) for m, v in times.items()},
        "kernel_cpu_median_s": {m: med(v) for m, v in cpu.items()},
        "ratio_median": {m: med(v) for m, v in ratios.items()},
        "cpu_ratio": {m: med(cpu[m]) / med(cpu["plain"]) for m in ratios},
        "ratios": ratios,
        "widget_updates_per_dashboard_job": updates,
    }
    rows = []
    for mode, label in MODES.items():
        ratio = "1" if mode == "plain" else f"{figures['ratio_median'][mode]:.3f}"
        cpu_ratio = "1" if mode == "plain" else f"{figures['cpu_ratio'][mode]:.3f}"
        rows.append(f"| {label} | {figures['median_s'][mode]:.3f} s | {args.tasks / figures['median_s'][mode]:,.0f} "
                    f"| {ratio} | {figures['kernel_cpu_median_s'][mode]:.3f} s | {cpu_ratio} |")
    table = "\n".join([
        f"{args.tasks:,} tiny tasks, {args.workers} local workers, chunksize {figures['chunksize']}, "
        f"{args.rounds} rounds (rotating order), in a real kernel:",
        "",
        "| variant | median time | tasks/s | time ratio (median per round) | kernel CPU (median) | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"widget update messages per dashboard job: min {min(updates)}, median {med(updates)}, "
        f"max {max(updates)}",
    ])
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
