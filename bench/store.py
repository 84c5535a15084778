"""What recording jobs in the job store costs: the same job with and without
the recorder attached, side by side in one run.

    python bench/store.py [--workers 2] [--tasks 20000] [--rounds 15] [--instrumented 10]
                          [--home DIR] [--markdown PATH]
    python bench/store.py --cancel-lag 20

One master (``Master("local", workers=2)``) runs ``map_async(lambda x: x*x,
range(20000))`` twice per round: *plain* (nothing listening) and
*recorded* (the process's recorder, which the store wires to every new
master through the master module's hook, left attached), in
alternating order (ABBA) so that a drift in the machine's load falls on
both.  Each run is timed from ``map_async`` to the last result, with the
process's CPU time (every thread: the scheduler's and the store's flusher)
beside it.  The figure is the per-round ratio recorded / plain, summarised
by its median and quartiles; the ratio of the medians and of the best
runs are shown too (on a loaded machine the best runs are the least
disturbed).

A last, separate pass (``--instrumented`` jobs) wraps the recorder's
observer and flush with timers — wall time and the flushing thread's own
CPU time — to show where the cost goes; that pass is not in the ratios.
On a loaded machine the wall-clock ratios scatter by more than the 2 %
they are meant to show; the recorder's own CPU time per job does not.  The store
lives in a temporary ``PYMW_HOME`` unless ``--home`` is given; nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--instrumented", type=int, default=10, help="jobs in the instrumented pass")
    ap.add_argument("--home", default=None, help="PYMW_HOME for the store (default: a temporary one)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--cancel-lag", type=int, default=0, metavar="N",
                    help="instead: N times, another process asks (through the store) to cancel a running "
                         "job of this one; the time until the owner has cancelled it")
    args = ap.parse_args()
    if args.cancel_lag:
        cancel_lag(args)
        return

    tmp = None
    if args.home is None:
        tmp = tempfile.TemporaryDirectory(prefix="pymw-bench-store-")
        args.home = os.path.join(tmp.name, "home")
    os.environ["PYMW_HOME"] = args.home

    from pymw_magic import Master
    from pymw_magic import store as st

    square = lambda x: x * x  # noqa: E731  (a notebook's lambda, pickled once per job)
    master = Master("local", workers=args.workers)
    # The store as every user gets it: the process's recorder, attached by
    # the master module's new-master hook.  "plain" runs detach it.
    rec = st.recorder()
    if rec is None or not rec.attached(master):
        sys.exit("the job store is not wired to new masters here (PYMW_STORE=0, or no hook): nothing to measure")

    def run(recorded: bool) -> tuple[float, float]:
        if recorded:
            rec.attach(master)
        else:
            rec.detach(master)
        c0, t0 = time.process_time(), time.perf_counter()
        job = master.map_async(square, range(args.tasks))
        job.result()
        t1, c1 = time.perf_counter(), time.process_time()
        rec.detach(master)
        master.jobs.clear()  # no run pays for another's task records
        if recorded:
            rec.flush()  # its last write lands before the next run starts
        return t1 - t0, c1 - c0

    for _ in range(2):  # warm-up: workers started, function cached, the store's file made
        run(False)
        run(True)

    ratios, cpu_ratios, plain_t, rec_t = [], [], [], []
    for r in range(args.rounds):
        order = (False, True, True, False) if r % 2 == 0 else (True, False, False, True)
        got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for recorded in order:
            got[recorded].append(run(recorded))
        p = statistics.mean(t for t, _ in got[False])
        q = statistics.mean(t for t, _ in got[True])
        pc = statistics.mean(c for _, c in got[False])
        qc = statistics.mean(c for _, c in got[True])
        plain_t.append(p)
        rec_t.append(q)
        ratios.append(q / p)
        cpu_ratios.append(qc / pc)
        print(f"round {r + 1:2d}: plain {p * 1000:7.1f} ms  recorded {q * 1000:7.1f} ms  ratio {q / p:.3f}  "
              f"cpu ratio {qc / pc:.3f}", flush=True)

    # Where the recorder's time goes (a separate, instrumented pass).
    spent: dict[str, float] = {"observer": 0.0, "calls": 0, "flush": 0.0, "flush_cpu": 0.0, "flushes": 0}
    observe, flush = rec.__call__, rec.flush

    class Timed:
        def __call__(self, event):
            t = time.thread_time()  # its CPU: a wall clock would count the GIL's waits
            observe(event)
            spent["observer"] += time.thread_time() - t
            spent["calls"] += 1

    def timed_flush(*args):
        t, c = time.perf_counter(), time.thread_time()
        flush(*args)
        spent["flush_cpu"] += time.thread_time() - c
        spent["flush"] += time.perf_counter() - t
        spent["flushes"] += 1

    rec.flush = timed_flush  # the process's flusher thread calls this one too
    timed = Timed()
    sub = master.events.subscribe(timed)
    job_t = 0.0
    for _ in range(args.instrumented):
        t0 = time.perf_counter()
        master.map_async(square, range(args.tasks)).result()
        job_t += time.perf_counter() - t0
        master.jobs.clear()
    sub.close()
    timed_flush()
    spent = {k: v / args.instrumented for k, v in spent.items()}
    job_t /= args.instrumented
    master.shutdown()

    lo, med, hi = quartiles(ratios)
    clo, cmed, chi = quartiles(cpu_ratios)
    stored = st.open_store().jobs()
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| job | `map_async(lambda x: x*x, range({args.tasks}))`, Master(\"local\", workers={args.workers}) |",
        f"| rounds | {args.rounds} (ABBA: 2 plain + 2 recorded runs each) |",
        f"| plain, median | {statistics.median(plain_t) * 1000:.1f} ms |",
        f"| recorded, median | {statistics.median(rec_t) * 1000:.1f} ms |",
        f"| **wall ratio recorded / plain** | **{med:.3f}** (quartiles {lo:.3f} – {hi:.3f}) |",
        f"| ratio of the medians / of the best runs | {statistics.median(rec_t) / statistics.median(plain_t):.3f} / "
        f"{min(rec_t) / min(plain_t):.3f} |",
        f"| CPU ratio recorded / plain | {cmed:.3f} (quartiles {clo:.3f} – {chi:.3f}) |",
        f"| observer calls per recorded job (mean of {args.instrumented}) | {spent['calls']:.0f} events, {spent['observer'] * 1000:.2f} ms of CPU in all "
        f"({spent['observer'] / job_t * 100:.3f} % of the job's {job_t * 1000:.0f} ms) |",
        f"| flushes per job, during and after it | {spent['flushes']:.0f}, {spent['flush'] * 1000:.2f} ms in all, "
        f"{spent['flush_cpu'] * 1000:.2f} ms of CPU (on the flusher thread; "
        f"{spent['flush_cpu'] / job_t * 100:.2f} % of the job's time) |",
        f"| **the recorder's own CPU, observer + flushes** | **{(spent['observer'] + spent['flush_cpu']) / job_t * 100:.2f} %** "
        f"of the job's time |",
        f"| jobs in the store at the end | {len(stored)} |",
        f"| machine | {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load avg {os.getloadavg()[0]:.2f} |",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if tmp is not None:
        st.open_store().close()
        tmp.cleanup()


def cancel_lag(args: argparse.Namespace) -> None:
    """The lab sidebar's Cancel of a pool job: a separate process writes the
    request into the store; the owner's flusher reads it and cancels.  Timed
    from the requester's write to the owner's job having ended cancelled."""
    import subprocess
    import threading

    tmp = tempfile.TemporaryDirectory(prefix="pymw-bench-cancel-")
    os.environ["PYMW_HOME"] = args.home or os.path.join(tmp.name, "home")
    from pymw_magic import Master
    from pymw_magic import store as st

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    requester = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pymw_magic.store import Store\ns = Store()\n"
         "for uid in sys.stdin:\n    s.request_cancel(uid.strip())\n    print(time.time(), flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")))
    lags = []
    with Master("local", workers=1) as master:
        rec = st.recorder()
        for _ in range(args.cancel_lag):
            job = master.map_async(time.sleep, [30] * 2, name="to-cancel")
            ended = threading.Event()
            job.add_done_callback(lambda j: ended.set())
            while job.counts()["running"] == 0:
                time.sleep(0.01)
            rec.flush()  # its row exists before the request
            requester.stdin.write(rec.uid(job) + "\n")
            requester.stdin.flush()
            asked = float(requester.stdout.readline())
            ended.wait(60)
            lags.append(time.time() - asked)
            print(f"cancelled {lags[-1] * 1000:.0f} ms after the request", flush=True)
    requester.stdin.close()
    requester.wait(30)
    lo, med, hi = quartiles(lags)
    print(f"\n| cancel through the store, {len(lags)} trials | median {med * 1000:.0f} ms "
          f"(quartiles {lo * 1000:.0f} – {hi * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms; "
          f"the owner polls every {st.FLUSH_INTERVAL} s) |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
