"""The HTCondor backend's two costs that matter before any task runs, and
how quickly it follows a job: on the stand-in schedd, and on a real pool
where one answers.

    python bench/condor.py [--schedd standin|live] [--tasks 10000] [--rounds 5]
                           [--lag-tasks 60] [--lag-rounds 2] [--markdown PATH]

(a) **Submitting a 10,000-task map**: ``Master("condor", schedd=...)``,
    ``map_async(abs, range(10000))``, timed from the call to the moment the
    cluster is queued (``Schedd.submit`` has returned: the cluster exists in
    the schedd; a query then confirms its procs are there).  Each round runs
    in a fresh child process, so its RSS growth (``psutil``, before the
    master is made → cluster queued) is the job's own; one more child runs
    the same under ``tracemalloc`` for the peak of Python allocations (its
    time is not reported: tracing slows everything).  The job is cancelled
    as soon as it is queued (its procs are removed) — only the submission is
    measured here.
(b) **Lag from an event written to the log to the task's state changing**:
    a job of ``--lag-tasks`` tasks, one per proc (``chunksize=1``), each
    sleeping 0.3 s.  A watcher thread in the same process tails the job's
    event log (``events.log`` in the job directory, where the schedd writes
    it) every 2 ms and stamps each event as it appears (``time.time()``); an
    observer on ``master.events`` stamps every task state change.  For each
    execute (001) event the lag is the time until the proc's task turns
    *running*; for each terminated (005) event, until it turns *done* (its
    output read and verified in between).  A proc's task is the one its
    submit event's notes name (``pymw chunk N``; with ``chunksize=1`` chunk
    N is the task of index N, checked by the task's recorded proc id when
    the backend records one).  Target: median under 1 s.
(c) ``--schedd live``: (a) and (b) against ``htcondor2.Schedd()`` — run it
    where ``CONDOR_CONFIG`` points at a pool and as the pool's job user,
    with ``PYMW_HOME`` where that user can write (see docs/condor.md).

Nothing here asserts a time; the figures are printed and, with
``--markdown``, written as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

HEADER = re.compile(rb"^(\d{3}) \((\d+)\.(\d+)\.\d+\) ")


# --------------------------------------------------------------------------- the schedd

def make_schedd(kind: str, root: Path) -> Any:
    if kind == "live":
        import htcondor2
        return htcondor2.Schedd()
    from pymw_magic.testing.condor import StandInSchedd
    return StandInSchedd(root, slots=2, idle_timeout=120)


class TimedSchedd:
    """The schedd the backend is given, with ``submit`` stamped: when it was
    called and when it returned (the cluster queued).  Everything else is
    the wrapped schedd's."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.calls: list[dict[str, Any]] = []

    def submit(self, description: Any, count: int = 0, spool: bool = False, itemdata: Any = None,
               queue: Any = None) -> Any:
        t0 = time.time()
        kwargs: dict[str, Any] = {"count": count, "spool": spool}
        if queue is not None:
            kwargs["queue"] = queue
        if itemdata is not None:
            kwargs["itemdata"] = itemdata
        result = self._inner.submit(description, **kwargs)
        self.calls.append({"called": t0, "returned": time.time(), "cluster": result.cluster(),
                           "procs": result.num_procs(), "log": str(description.get("log", ""))})
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __reduce__(self):  # the store records "this schedd" as the wrapped one
        return self._inner.__reduce__()


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


# --------------------------------------------------------------------------- (a) submit

def child_submit(kind: str, root: Path, tasks: int, trace: bool) -> dict[str, Any]:
    import tracemalloc

    from pymw_magic import Master
    schedd = TimedSchedd(make_schedd(kind, root))
    if kind == "standin":
        schedd.query()  # start the stand-in's daemon outside the measurement
    rss0 = rss()
    if trace:
        tracemalloc.start()
    with Master("condor", schedd=schedd) as m:
        t0 = time.time()
        job = m.map_async(abs, range(tasks), name="bench-submit")
        deadline = time.monotonic() + 600
        while not schedd.calls and time.monotonic() < deadline:
            time.sleep(0.001)
        if not schedd.calls:
            raise SystemExit("the cluster was not submitted within 600 s")
        queued = schedd.calls[0]["returned"] - t0
        peak = tracemalloc.get_traced_memory()[1] if trace else None
        if trace:
            tracemalloc.stop()
        rss1 = rss()
        cluster, procs = schedd.calls[0]["cluster"], schedd.calls[0]["procs"]
        in_queue = len(schedd.query(constraint=f"ClusterId == {cluster}", projection=["ProcId"]))
        job.cancel()
        gone_by = time.monotonic() + 120
        while time.monotonic() < gone_by and schedd.query(constraint=f"ClusterId == {cluster} && JobStatus != 3",
                                                           projection=["ProcId"]):
            time.sleep(0.2)
    return {"seconds": queued, "submit_call": schedd.calls[0]["returned"] - schedd.calls[0]["called"],
            "rss_growth": rss1 - rss0, "tracemalloc_peak": peak, "procs": procs, "in_queue": in_queue,
            "clusters": len(schedd.calls)}


# --------------------------------------------------------------------------- (b) lag

class LogWatcher(threading.Thread):
    """Tails an event log every ``period`` seconds and stamps each event
    (number, cluster, proc, the submit event's notes) as it appears."""

    def __init__(self, path: Path, period: float = 0.002):
        super().__init__(daemon=True)
        self.path, self.period = path, period
        self.events: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        buf, offset = b"", 0
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                now = time.time()
                offset += len(data)
                buf += data
                while b"\n...\n" in buf:
                    block, buf = buf.split(b"\n...\n", 1)
                    block = block.lstrip(b"\n")
                    m = HEADER.match(block)
                    if m:
                        lines = block.split(b"\n")
                        notes = lines[1].strip().decode() if len(lines) > 1 else ""
                        self.events.append({"type": int(m.group(1)), "cluster": int(m.group(2)),
                                            "proc": int(m.group(3)), "seen": now, "notes": notes})
            self.stop.wait(self.period)


def child_lag(kind: str, root: Path, tasks: int, sleep: float) -> dict[str, Any]:
    from pymw_magic import Master
    from pymw_magic.events import TasksChanged

    schedd = TimedSchedd(make_schedd(kind, root))
    changes: list[tuple[float, str, list[int]]] = []

    def observer(event: Any) -> None:
        if isinstance(event, TasksChanged) and event.job.name == "bench-lag":
            changes.append((time.time(), str(event.state), [t.index for t in event.tasks]))

    with Master("condor", schedd=schedd, chunksize=1) as m:
        m.events.subscribe(observer)
        job = m.map_async(time.sleep, [sleep] * tasks, name="bench-lag")
        directory = None
        deadline = time.monotonic() + 120
        while directory is None and time.monotonic() < deadline:
            directory = m.backend.job_dir(job)
            time.sleep(0.001)
        if directory is None:
            raise SystemExit("the backend made no job directory within 120 s")
        watcher = LogWatcher(Path(directory) / "events.log")
        watcher.start()
        job.result(timeout=1800)
        time.sleep(0.5)  # the last events' stamps are already taken; let the watcher read the tail
        watcher.stop.set()
        watcher.join(5)
        hosts = {t.index: t.worker for t in job.tasks}

    chunk_of_proc = {}
    for ev in watcher.events:
        if ev["type"] == 0:
            m_ = re.search(r"pymw chunk (\d+)", ev["notes"])
            if m_:
                chunk_of_proc[(ev["cluster"], ev["proc"])] = int(m_.group(1))
    lags: dict[str, list[float]] = {"running": [], "done": []}
    unmatched = 0
    for ev in watcher.events:
        state = {1: "running", 5: "done"}.get(ev["type"])
        if state is None:
            continue
        task = chunk_of_proc.get((ev["cluster"], ev["proc"]))
        hit = next((t for t, s, idx in changes if s.endswith(state) and task in idx), None)
        if hit is None:
            unmatched += 1
            continue
        lags[state].append(hit - ev["seen"])
    return {"lags": lags, "unmatched": unmatched, "events": len(watcher.events),
            "procs": len(chunk_of_proc), "workers": sorted({str(v) for v in hosts.values()})[:3]}


# --------------------------------------------------------------------------- driver

def run_child(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(xs: list[float]) -> str:
    if not xs:
        return "—"
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return f"median {statistics.median(xs):.3f} s (quartiles {q[0]:.3f}–{q[2]:.3f}, max {max(xs):.3f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedd", choices=("standin", "live"), default="standin")
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lag-tasks", type=int, default=60)
    ap.add_argument("--lag-rounds", type=int, default=2)
    ap.add_argument("--lag-sleep", type=float, default=0.3)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--child", choices=("submit", "trace", "lag"), help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        root = Path(args.root)
        if args.child == "lag":
            result = child_lag(args.schedd, root, args.lag_tasks, args.lag_sleep)
        else:
            result = child_submit(args.schedd, root, args.tasks, trace=args.child == "trace")
        print(json.dumps(result))
        return

    tmp = tempfile.TemporaryDirectory(prefix="pymw-bench-condor-")
    root = Path(tmp.name) / "schedd"
    if "PYMW_HOME" not in os.environ:
        os.environ["PYMW_HOME"] = str(Path(tmp.name) / "home")
    common = ["--schedd", args.schedd, "--root", str(root)]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]

    subs = [run_child([*common, "--child", "submit", "--tasks", str(args.tasks)]) for _ in range(args.rounds)]
    for i, s in enumerate(subs):
        print(f"submit round {i}: {s['seconds']:.3f} s to queued ({s['procs']} procs, "
              f"submit() {s['submit_call']:.3f} s), RSS +{s['rss_growth'] / 2**20:.1f} MiB", flush=True)
    traced = run_child([*common, "--child", "trace", "--tasks", str(args.tasks)])
    print(f"tracemalloc peak {traced['tracemalloc_peak'] / 2**20:.1f} MiB", flush=True)
    lag: dict[str, list[float]] = {"running": [], "done": []}
    unmatched = 0
    for _ in range(args.lag_rounds):
        r = run_child([*common, "--child", "lag", "--lag-tasks", str(args.lag_tasks),
                       "--lag-sleep", str(args.lag_sleep)])
        for k in lag:
            lag[k] += r["lags"][k]
        unmatched += r["unmatched"]
        print(f"lag round: running {summary(r['lags']['running'])}; done {summary(r['lags']['done'])}; "
              f"unmatched {r['unmatched']}", flush=True)
    if args.schedd == "standin":
        from pymw_magic.testing.condor import StandInSchedd
        StandInSchedd(root).stop()
    tmp.cleanup()

    secs = [s["seconds"] for s in subs]
    both = lag["running"] + lag["done"]
    rows = [
        ("schedd", "stand-in (`pymw_magic.testing.condor.StandInSchedd`, 2 slots)" if args.schedd == "standin"
         else "real (`htcondor2.Schedd()`)"),
        (f"(a) `map_async` of {args.tasks:,} tasks → cluster queued", summary(secs)),
        ("(a) of which `Schedd.submit()` itself", summary([s["submit_call"] for s in subs])),
        ("(a) procs in the one cluster (queued / submitted)",
         f"{subs[0]['in_queue']} / {subs[0]['procs']} ({subs[0]['clusters']} cluster)"),
        ("(a) RSS growth, master made → queued", summary([s["rss_growth"] / 2**20 for s in subs]).replace(" s", " MiB")),
        ("(a) tracemalloc peak (separate run)", f"{traced['tracemalloc_peak'] / 2**20:.1f} MiB"),
        (f"(b) lag execute event → task running ({args.lag_tasks} procs × {args.lag_rounds})", summary(lag["running"])),
        ("(b) lag terminate event → task done (output read)", summary(lag["done"])),
        ("(b) all events, median (target < 1 s)",
         f"**{statistics.median(both):.3f} s** ({'reached' if statistics.median(both) < 1 else 'NOT reached'})"
         if both else "—"),
        ("(b) events not matched to a state change", str(unmatched)),
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                    f"load avg {load0:.1f} → {os.getloadavg()[0]:.1f}"),
        ("date", started),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
