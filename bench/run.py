"""pymw-magic side by side with its peers, on the same tasks, in one run.

    python bench/run.py [--quick] [--workers 2] [--only CASE] [--skip SYSTEM]

Systems: pymw-magic (``Master("local")``: submit, map with automatic
batching), ProcessPoolExecutor (submit, map), multiprocessing.Pool
(apply_async, map chunksize=1, map default chunking), loky
(``get_reusable_executor``: submit, map), Dask (``LocalCluster(processes=True,
threads_per_worker=1)``: client.submit, client.map) and ipyparallel
(``ipp.Cluster(n=workers)``: load-balanced apply_async, map).

Cases (``--only``): ``tiny`` (20,000 tasks ``x*x``), ``1ms`` (2,000 tasks
that busy-wait 1 ms), ``array`` (a 10 MB NumPy argument sent and returned,
MB/s = 10 MB / round-trip seconds, median), ``latency`` (sequential
``submit(...).result()`` round trips: median and p90 in microseconds).

How it runs:

* every system runs in its own child process (this script with
  ``--child``), one after the other, with the same number of workers; the
  pool or cluster is started and warmed up before any timing and shut down
  after its cases;
* throughput cases run a few times (``--reps``; no more runs once they
  have taken 20 s) and report the best run; the array case reports the
  median.  A system so slow that one run of the full count would take
  more than 30 s runs a quarter of the tasks, and the table marks it
  (``--full-counts`` turns that off);
* ``bench/floor.py`` measures what the machine does with no framework (raw
  pipe echo of 10 MB, pipe ping-pong, HMAC-SHA256 of 10 MB): the floors
  under the array and latency figures;
* a system that is not installed or fails to start is reported as
  "skipped: reason"; a child that hangs is killed after ``--peer-timeout``
  and what it measured until then is kept;
* every process a child starts carries a tag in its environment; after the
  child exits, any tagged process still alive is an orphan: it is reported
  and killed;
* the table is printed and written to ``bench/out/latest.md`` (and
  ``latest.json``; ``--render latest.json`` prints an earlier run's tables
  again without measuring).  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
TAG_VAR = "PYMW_BENCH_TAG"

CASES = ["tiny", "1ms", "array", "latency"]
CASE_ALIASES = {"1": "tiny", "2": "1ms", "3": "array", "4": "latency",
                "tiny": "tiny", "1ms": "1ms", "ms": "1ms", "array": "array", "numpy": "array",
                "latency": "latency", "roundtrip": "latency"}
ARRAY_BYTES = 10_000_000  # "10 MB": 1,250,000 float64; MB = 10**6 bytes


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"tiny_n": 2_000, "ms_n": 300, "array_runs": 5, "latency_calls": 50,
                "reps": 2, "budget_s": 5.0, "reduce_after_s": 10.0, "peer_timeout": 180.0}
    return {"tiny_n": 20_000, "ms_n": 2_000, "array_runs": 15, "latency_calls": 200,
            "reps": 5, "budget_s": 20.0, "reduce_after_s": 30.0, "peer_timeout": 360.0}


def case_title(case: str, cfg: dict[str, Any]) -> str:
    return {
        "tiny": f"{cfg['tiny_n']:,} tiny tasks (x*x)",
        "1ms": f"{cfg['ms_n']:,} tasks of 1 ms (busy-wait)",
        "array": f"{ARRAY_BYTES // 10**6} MB NumPy array argument round trip",
        "latency": "Single-task round-trip latency",
    }[case]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ======================================================================================
# Child: one system, all selected cases
# ======================================================================================
class Child:
    def __init__(self, key: str, cfg: dict[str, Any], result_path: str):
        from peers import find_system

        self.cls = find_system(key)
        self.system = self.cls()
        self.cfg = cfg
        self.path = result_path
        self.result: dict[str, Any] = {"key": self.cls.key, "system": self.cls.name, "version": "",
                                       "skipped": None, "start_s": None, "stop_s": None,
                                       "rows": [], "notes": []}

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f)
        os.replace(tmp, self.path)

    def say(self, msg: str) -> None:
        log(f"  [{self.cls.name}] {msg}")

    def run(self) -> None:
        from peers import Unavailable
        import bench_tasks as T

        try:
            self.result["version"] = self.system.version()
        except Exception:
            pass
        self.save()
        t0 = time.perf_counter()
        try:
            self.system.start(self.cfg["workers"])
            # Warm up: workers up, each task function imported.
            for fn, arg in ((T.square, 3), (T.spin_1ms, 0), (T.echo, b"x")):
                self.system.roundtrip(fn, arg)
        except Unavailable as e:
            self.result["skipped"] = str(e)
        except BaseException as e:  # noqa: BLE001 — any failure to start is a skip, never a crash
            self.result["skipped"] = f"failed to start: {type(e).__name__}: {e}".strip()
            self.say(traceback.format_exc())
        self.result["start_s"] = time.perf_counter() - t0
        self.save()
        try:
            if self.result["skipped"] is None:
                self.say(f"started in {self.result['start_s']:.2f} s")
                for case in self.cfg["cases"]:
                    getattr(self, "case_" + case.replace("1ms", "ms"))()
        finally:
            t1 = time.perf_counter()
            try:
                self.system.stop()
            except BaseException as e:  # noqa: BLE001
                self.result["notes"].append(f"shutdown raised {type(e).__name__}: {e}")
            self.result["stop_s"] = time.perf_counter() - t1
            self.check_children()
            self.save()

    def check_children(self) -> None:
        """Processes this child started that are still alive after stop()."""
        try:
            import psutil
        except ImportError:
            return
        deadline = time.time() + 5
        alive = []
        while True:
            alive = []
            for p in psutil.Process().children(recursive=True):
                try:
                    # multiprocessing's and loky's resource trackers exit with
                    # their parent (this process) by design: not leftovers.
                    if p.status() != psutil.STATUS_ZOMBIE and \
                            "resource_tracker" not in " ".join(p.cmdline()):
                        alive.append(p)
                except psutil.Error:
                    pass
            if not alive or time.time() > deadline:
                break
            time.sleep(0.2)
        if alive:
            desc = ", ".join(f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in alive)
            self.result["notes"].append(f"after shutdown, {len(alive)} child process(es) still alive "
                                        f"5 s later: {desc}")

    def add_row(self, **row: Any) -> None:
        row.setdefault("error", None)
        self.result["rows"].append(row)
        self.save()

    # --- throughput: many tasks ------------------------------------------------------
    def measure(self, run, fn, items, expected) -> tuple[list[float], str | None]:
        """Time ``run(fn, items)`` up to ``reps`` times (fewer if slow)."""
        times: list[float] = []
        spent = 0.0
        for i in range(self.cfg["reps"]):
            t = time.perf_counter()
            out = run(fn, items)
            d = time.perf_counter() - t
            times.append(d)
            spent += d
            if i == 0 and expected is not None and list(out) != expected:
                return times, "wrong results"
            if spent > self.cfg["budget_s"]:
                break
        return times, None

    def throughput_case(self, case: str, fn, n_full: int, expected_full) -> None:
        for label, kind, run in self.system.variants():
            try:
                run(fn, list(range(20)))  # warm this API path
                # A probe run says whether the full count fits the time
                # budget; a system too slow for it runs a quarter of the
                # tasks (the row says so).
                probe = min(n_full, 200)
                t = time.perf_counter()
                run(fn, list(range(probe)))
                estimate = n_full * (time.perf_counter() - t) / probe
                n, reduced = n_full, None
                if estimate > self.cfg["reduce_after_s"] and not self.cfg.get("full_counts"):
                    n = n_full // 4
                    reduced = f"one run of {n_full:,} would take about {estimate:.0f} s"
                expected = expected_full[:n] if expected_full is not None else None
                times, err = self.measure(run, fn, list(range(n)), expected)
                best = min(times)
                row = {"case": case, "variant": label, "kind": kind, "unit": "tasks/s",
                       "value": n / best, "median": n / statistics.median(times),
                       "tasks": n, "reduced": reduced, "runs_s": times, "error": err}
                self.say(f"{case} {label}: {n / best:,.0f} tasks/s (best of {len(times)}, {n:,} tasks)")
            except Exception as e:  # noqa: BLE001
                row = {"case": case, "variant": label, "kind": kind, "unit": "tasks/s", "value": None,
                       "error": f"{type(e).__name__}: {e}"}
                self.say(f"{case} {label}: ERROR {row['error']}")
            self.add_row(**row)

    def case_tiny(self) -> None:
        import bench_tasks as T
        n = self.cfg["tiny_n"]
        self.throughput_case("tiny", T.square, n, [x * x for x in range(n)])

    def case_ms(self) -> None:
        import bench_tasks as T
        n = self.cfg["ms_n"]
        self.throughput_case("1ms", T.spin_1ms, n, list(range(n)))

    # --- one task at a time ---------------------------------------------------------
    def case_array(self) -> None:
        import bench_tasks as T
        label = self.roundtrip_label()
        try:
            import numpy as np
        except ImportError:
            self.add_row(case="array", variant=label, kind="submit", unit="MB/s", value=None,
                         error="numpy not installed")
            return
        arr = np.random.default_rng(0).random(ARRAY_BYTES // 8)
        try:
            back = self.system.roundtrip(T.echo, arr)
            if not (isinstance(back, np.ndarray) and np.array_equal(back, arr)):
                raise AssertionError("the array came back different")
            self.system.roundtrip(T.echo, arr)
            times = []
            for _ in range(self.cfg["array_runs"]):
                t = time.perf_counter()
                self.system.roundtrip(T.echo, arr)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            mb = ARRAY_BYTES / 1e6
            self.add_row(case="array", variant=label, kind="submit", unit="MB/s", value=mb / med,
                         best=mb / min(times), median_ms=med * 1e3, runs_s=times)
            self.say(f"array: {mb / med:,.0f} MB/s (median of {len(times)}, {med * 1e3:.1f} ms)")
        except Exception as e:  # noqa: BLE001
            self.add_row(case="array", variant=label, kind="submit", unit="MB/s", value=None,
                         error=f"{type(e).__name__}: {e}")
            self.say(f"array: ERROR {type(e).__name__}: {e}")

    def case_latency(self) -> None:
        import bench_tasks as T
        label = self.roundtrip_label()
        try:
            for i in range(20):
                self.system.roundtrip(T.square, i)
            lat = []
            for i in range(self.cfg["latency_calls"]):
                t = time.perf_counter()
                r = self.system.roundtrip(T.square, i)
                lat.append(time.perf_counter() - t)
                if r != i * i:
                    raise AssertionError(f"square({i}) returned {r!r}")
            us = sorted(x * 1e6 for x in lat)
            p90 = us[min(len(us) - 1, int(round(0.9 * (len(us) - 1))))]
            self.add_row(case="latency", variant=label, kind="submit", unit="µs",
                         value=statistics.median(us), p90=p90, min=us[0], calls=len(us))
            self.say(f"latency: median {statistics.median(us):,.0f} µs, p90 {p90:,.0f} µs")
        except Exception as e:  # noqa: BLE001
            self.add_row(case="latency", variant=label, kind="submit", unit="µs", value=None,
                         error=f"{type(e).__name__}: {e}")
            self.say(f"latency: ERROR {type(e).__name__}: {e}")

    def roundtrip_label(self) -> str:
        return {"pool": "apply_async().get()", "ipyparallel": "apply_async().get()",
                "dask": "client.submit().result()"}.get(self.cls.key, "submit().result()")


def child_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, BENCH_DIR)
    cfg = json.loads(args.config)
    Child(args.child, cfg, args.result).run()
    return 0


# ======================================================================================
# Parent: run each system in a child, collect, report
# ======================================================================================
def tagged_processes(tag: str) -> list[Any]:
    try:
        import psutil
    except ImportError:
        return []
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(TAG_VAR) == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def run_system(key: str, name: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    tag = f"{uuid.uuid4().hex}-{key}"
    env = dict(os.environ)
    env[TAG_VAR] = tag
    # Workers of every system import bench_tasks from here.
    env["PYTHONPATH"] = os.pathsep.join([BENCH_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    fd, result_path = tempfile.mkstemp(prefix=f"pymw-bench-{key}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", key, "--config", json.dumps(cfg),
           "--result", result_path]
    log(f"== {name}")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=sys.stderr,
                            start_new_session=True)
    notes: list[str] = []
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        notes.append(f"TIMEOUT: the run did not finish within {timeout:.0f} s and was killed "
                     f"(hang?); the rows it had not measured are missing")
        log(f"  [{name}] timeout after {timeout:.0f} s: killing it")
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session we started for it
        except OSError:
            pass
        proc.wait()
    except KeyboardInterrupt:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        for p in tagged_processes(tag):
            try:
                p.kill()
            except Exception:
                pass
        raise
    elapsed = time.perf_counter() - t0
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"key": key, "system": name, "version": "", "skipped": None, "rows": [], "notes": []}
    finally:
        for p in (result_path, result_path + ".tmp"):
            try:
                os.unlink(p)
            except OSError:
                pass
    if proc.returncode not in (0, None) and not any(n.startswith("TIMEOUT") for n in notes):
        notes.append(f"the benchmark process exited with status {proc.returncode}")
        if result.get("skipped") is None and not result.get("rows"):
            result["skipped"] = f"crashed (exit status {proc.returncode})"
    # Orphans: anything that carries our tag and outlived the child.
    deadline = time.time() + 10
    orphans = tagged_processes(tag)
    while orphans and time.time() < deadline:
        time.sleep(0.5)
        orphans = tagged_processes(tag)
    if orphans:
        desc = []
        for p in orphans:
            try:
                desc.append(f"{p.pid} {' '.join(p.cmdline()[:5])}")
                p.kill()
            except Exception:
                pass
        notes.append(f"ORPHANS: {len(orphans)} process(es) outlived the run by 10 s (killed now): "
                     + "; ".join(desc))
    result["notes"] = result.get("notes", []) + notes
    result["elapsed_s"] = elapsed
    result["load_before"] = load_before
    result["load_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


# --- reporting ------------------------------------------------------------------------------
def fmt_num(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit in ("tasks/s", "MB/s"):
        return f"{v:,.0f}"
    return f"{v:,.0f}"


def fmt_ratio(v: float | None, ref: float | None) -> str:
    if v is None or not ref:
        return "–"
    r = v / ref
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        out = []
        for c, w, a in zip(cells, widths, align):
            out.append(c.rjust(w) if a == "r" else c.ljust(w))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def machine_info() -> dict[str, str]:
    cpu = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for ln in out.splitlines():
            if ln.lower().startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except Exception:
        pass
    if not cpu:
        cpu = platform.processor() or "?"
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform()}


def build_report(results: list[dict[str, Any]], cfg: dict[str, Any], command: str,
                 started: str, total_s: float, floor: dict[str, float] | None = None
                 ) -> tuple[str, dict[str, Any]]:
    m = machine_info()
    w = cfg["workers"]
    rows_by_case: dict[str, list[tuple[dict, dict]]] = {c: [] for c in cfg["cases"]}
    for res in results:
        for row in res.get("rows", []):
            rows_by_case.setdefault(row["case"], []).append((res, row))
    pymw = next((r for r in results if r["key"] == "pymw"), None)

    def pymw_row(case: str, kind: str) -> dict | None:
        if pymw is None:
            return None
        for row in pymw.get("rows", []):
            if row["case"] == case and row["kind"] == kind and row.get("value") is not None:
                return row
        return None

    out: list[str] = []
    out.append("# pymw-magic benchmarks — latest run\n")
    out.append(f"- date: {started}")
    out.append(f"- machine: {m['nproc']} CPUs (nproc), {m['cpu']}, {m['platform']}")
    out.append(f"- Python {m['python']}")
    out.append(f"- command: `{command}`")
    out.append(f"- workers: {w} for every system; mode: {'quick' if cfg['quick'] else 'full'}; "
               f"throughput = best of up to {cfg['reps']} runs (no more runs once they have taken "
               f"{cfg['budget_s']:.0f} s); total time {total_s:.0f} s")
    out.append("")
    out.append("## Systems\n")
    sys_rows = []
    for res in results:
        state = f"skipped: {res['skipped']}" if res.get("skipped") else "ran"
        load = "–"
        if res.get("load_before") is not None:
            load = f"{res['load_before']:.2f} → {res['load_after']:.2f}"
        sys_rows.append([res["system"], res.get("version") or "", state,
                         "–" if res.get("skipped") or res.get("start_s") is None else f"{res['start_s']:.2f}",
                         "–" if res.get("stop_s") is None else f"{res['stop_s']:.2f}",
                         "–" if res.get("elapsed_s") is None else f"{res['elapsed_s']:.0f}", load])
    out.append(table(["system", "version", "status", "start + warm-up s", "shutdown s", "wall s",
                      "load avg (1 min) before → after"], sys_rows, "lllrrrr"))
    out.append("")
    out.append("The load average counts everything on the machine (it is shared): above ~1 during a "
               "system's turn, someone else was using a core.")
    out.append("")

    skipped = [r for r in results if r.get("skipped")]
    n = 0
    for case in cfg["cases"]:
        n += 1
        out.append(f"## {n}. {case_title(case, cfg)}\n")
        rows = []
        if case in ("tiny", "1ms"):
            if case == "tiny":
                out.append("Tasks/s, best run and median run (higher is better). Ratio = peer / pymw-magic, against "
                           "pymw-magic's row of the same kind (per-task submit vs `submit`, one-call "
                           "map vs `map`); above 1.00x the peer is faster.\n")
            else:
                out.append(f"Tasks/s, best and median run; ideal with {w} workers is {w * 1000:,} tasks/s. "
                           "Ratio = peer / pymw-magic, same kind.\n")
            footnotes = []
            for res, row in rows_by_case.get(case, []):
                ref = pymw_row(case, row["kind"])
                value = fmt_num(row.get("value"), "tasks/s") if not row.get("error") else f"error: {row['error']}"
                cells = [res["system"], row["variant"], row["kind"], value,
                         fmt_num(row.get("median"), "tasks/s") if not row.get("error") else "–"]
                if case == "1ms":
                    cells.append("–" if row.get("value") is None else f"{100 * row['value'] / (w * 1000):.0f} %")
                cells.append(fmt_ratio(row.get("value"), ref and ref["value"]) if not row.get("error") else "–")
                tasks = f"{row['tasks']:,}" if row.get("tasks") else "–"
                if row.get("reduced"):
                    footnotes.append(f"{res['system']} {row['variant']}: {row['reduced']}, so it ran "
                                     f"{row['tasks']:,} tasks (a quarter of the count).")
                    tasks += " *"
                cells += [tasks, str(len(row.get("runs_s") or []))]
                rows.append(cells)
            for res in skipped:
                rows.append([res["system"], "–", "–", f"skipped: {res['skipped']}", "–"]
                            + (["–"] if case == "1ms" else []) + ["–", "–", "–"])
            header = ["system", "API", "kind", "tasks/s (best)", "median"] \
                + (["% of ideal"] if case == "1ms" else []) + ["peer/pymw", "tasks", "runs"]
            out.append(table(header, rows, "llllr" + ("r" if case == "1ms" else "") + "rrr"))
            if footnotes:
                out.append("")
                out.extend(f"\\* {f}" for f in footnotes)
        elif case == "array":
            out.append("MB/s = 10 MB / round-trip seconds, median of the runs (higher is better); "
                       "the array goes to a worker and comes back. Ratio = peer / pymw-magic.\n")
            ref = pymw_row("array", "submit")
            for res, row in rows_by_case.get(case, []):
                if row.get("error"):
                    rows.append([res["system"], row["variant"], f"error: {row['error']}", "–", "–", "–"])
                    continue
                rows.append([res["system"], row["variant"], fmt_num(row["value"], "MB/s"),
                             f"{row['median_ms']:.1f}", fmt_num(row["best"], "MB/s"),
                             fmt_ratio(row["value"], ref and ref["value"])])
            for res in skipped:
                rows.append([res["system"], "–", f"skipped: {res['skipped']}", "–", "–", "–"])
            out.append(table(["system", "API", "MB/s (median)", "median ms", "best MB/s", "peer/pymw"],
                             rows, "llrrrr"))
            if floor:
                out.append("")
                out.append(f"Floors on this machine, no framework (`bench/floor.py`): the same 10 MB as raw "
                           f"bytes echoed over two OS pipes (1 MiB pipe buffers) takes "
                           f"{floor['pipe_echo_ms']:.1f} ms = {10 / (floor['pipe_echo_ms'] / 1e3):,.0f} MB/s; "
                           f"one HMAC-SHA256 over 10 MB takes {floor['hmac_sha256_ms']:.1f} ms; one "
                           f"in-memory copy of 10 MB {floor['copy_ms']:.1f} ms.")
        elif case == "latency":
            out.append("Sequential `submit(square, i).result()` (or the system's equivalent), "
                       "microseconds (lower is better). Ratio = peer median / pymw-magic median: "
                       "above 1.00x the peer is slower.\n")
            ref = pymw_row("latency", "submit")
            for res, row in rows_by_case.get(case, []):
                if row.get("error"):
                    rows.append([res["system"], row["variant"], f"error: {row['error']}", "–", "–", "–"])
                    continue
                rows.append([res["system"], row["variant"], fmt_num(row["value"], "µs"),
                             fmt_num(row["p90"], "µs"), fmt_num(row["min"], "µs"),
                             fmt_ratio(row["value"], ref and ref["value"])])
            for res in skipped:
                rows.append([res["system"], "–", f"skipped: {res['skipped']}", "–", "–", "–"])
            calls = cfg["latency_calls"]
            out.append(table(["system", "API", f"median µs ({calls} calls)", "p90 µs", "min µs", "peer/pymw"],
                             rows, "llrrrr"))
            if floor:
                out.append("")
                out.append(f"Floor on this machine (`bench/floor.py`): an 8-byte message there and back "
                           f"over two OS pipes between two processes, median {floor['pipe_pingpong_us']:.0f} µs.")
        out.append("")

    # Targets from the issue, evaluated on this run (reported, never asserted).
    targets = []

    def row_of(key: str, case: str, kind: str):
        for res in results:
            if res["key"] == key:
                for row in res.get("rows", []):
                    if row["case"] == case and row["kind"] == kind and row.get("value") is not None:
                        return row
        return None

    ps, pp = row_of("pymw", "tiny", "submit"), row_of("processpool", "tiny", "submit")
    if ps and pp:
        r = ps["value"] / pp["value"]
        targets.append(["per-task submit ≥ 2x ProcessPoolExecutor's (tiny tasks)",
                        f"{ps['value']:,.0f} vs {pp['value']:,.0f} tasks/s = {r:.2f}x",
                        "reached" if r >= 2 else "not reached"])
    pm = row_of("pymw", "tiny", "map")
    if pm:
        note = "" if w == 2 else f" (measured with {w} workers; the target is for 2)"
        targets.append(["map of tiny tasks, automatic batching ≥ 300,000 tasks/s, 2 workers",
                        f"{pm['value']:,.0f} tasks/s{note}",
                        "reached" if pm["value"] >= 300_000 else "not reached"])
    pl = row_of("pymw", "latency", "submit")
    if pl:
        targets.append(["median single-task round trip < 300 µs",
                        f"median {pl['value']:,.0f} µs (p90 {pl['p90']:,.0f} µs)",
                        "reached" if pl["value"] < 300 else "not reached"])
    pa = row_of("pymw", "array", "submit")
    if pa:
        targets.append(["10 MB array round trip ≥ 1 GB/s",
                        f"{pa['value']:,.0f} MB/s (median round trip {pa['median_ms']:.1f} ms)",
                        "reached" if pa["value"] >= 1000 else "not reached"])
    if targets:
        out.append("## Targets, on this run\n")
        out.append(table(["target", "pymw-magic on this run", "status"], targets, "lll"))
        out.append("")

    notes = [(r["system"], n) for r in results for n in r.get("notes", [])]
    errors = [(res["system"], f"{row['case']} / {row['variant']}: {row['error']}")
              for res in results for row in res.get("rows", []) if row.get("error")]
    out.append("## Anomalies\n")
    try:
        import psutil  # noqa: F401
        checked = True
    except ImportError:
        checked = False
    if not checked:
        out.append("- psutil is not installed: leftover processes were NOT checked.")
    if not notes and not errors:
        out.append("None: no errors, no timeouts" + (", no process left behind by any system "
                   "(every process a system started was checked after its shutdown)." if checked else "."))
    for system, note in notes + errors:
        out.append(f"- {system}: {note}")
    out.append("")
    data = {"date": started, "machine": m, "command": command, "config": cfg, "total_s": total_s,
            "floor": floor, "results": results}
    return "\n".join(out), data


def parse_list(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(x for x in v.split(",") if x.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pymw-magic vs its peers, side by side, on the same tasks.")
    p.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    p.add_argument("--workers", type=int, default=2, help="workers for every system (default 2)")
    p.add_argument("--only", action="append", metavar="CASE",
                   help=f"run only these cases ({', '.join(CASES)}, or 1-4); repeat or comma-separate")
    p.add_argument("--skip", action="append", metavar="SYSTEM",
                   help="skip a system (pymw, processpool, pool, loky, dask, ipyparallel); repeatable")
    p.add_argument("--reps", type=int, default=None, help="runs per throughput measurement (best is kept)")
    p.add_argument("--full-counts", action="store_true",
                   help="never run fewer tasks for a slow system (by default a system for which one run "
                        "would take more than 30 s runs a quarter of the tasks)")
    p.add_argument("--peer-timeout", type=float, default=None,
                   help="seconds one system may take for all its cases before it is killed")
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "out"), help="where latest.md/json go")
    p.add_argument("--render", metavar="JSON",
                   help="measure nothing: print the tables of an earlier run from its latest.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        return child_main(args)

    sys.path.insert(0, BENCH_DIR)
    from peers import SYSTEMS, find_system

    if args.render:
        with open(args.render) as f:
            old = json.load(f)
        md, _ = build_report(old["results"], old["config"], old["command"], old["date"], old["total_s"],
                             old.get("floor"))
        print(md)
        return 0

    if args.workers < 1:
        p.error("--workers must be at least 1")
    cases = CASES
    if args.only:
        try:
            wanted = {CASE_ALIASES[c.strip().lower()] for c in parse_list(args.only)}
        except KeyError as e:
            p.error(f"unknown case {e.args[0]!r}; valid: {', '.join(CASES)} (or 1-4)")
        cases = [c for c in CASES if c in wanted]
    try:
        skip = {find_system(s).key for s in parse_list(args.skip)}
    except ValueError as e:
        p.error(str(e))
    cfg = settings(args.quick)
    if args.reps is not None:
        cfg["reps"] = max(1, args.reps)
    if args.peer_timeout is not None:
        cfg["peer_timeout"] = args.peer_timeout
    cfg.update(workers=args.workers, cases=cases, quick=args.quick, full_counts=args.full_counts)

    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT)
                                                 if sys.executable.startswith(ROOT) else sys.executable,
                                                 os.path.relpath(os.path.abspath(__file__), ROOT)]
                       + (argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    log(f"pymw-magic benchmarks: {', '.join(cases)}; {args.workers} workers; "
        f"{'quick' if args.quick else 'full'} run")
    t0 = time.perf_counter()
    results = []
    for cls in SYSTEMS:
        if cls.key in skip:
            results.append({"key": cls.key, "system": cls.name, "version": "",
                            "skipped": "--skip", "rows": [], "notes": []})
            continue
        results.append(run_system(cls.key, cls.name, cfg, cfg["peer_timeout"]))
    floor = None
    if "array" in cases or "latency" in cases:
        log("== floors (raw pipes, HMAC, copy)")
        try:
            out = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "floor.py")], capture_output=True,
                                 text=True, timeout=120, cwd=ROOT)
            floor = json.loads(out.stdout)
        except Exception as e:  # noqa: BLE001 — a reference, not a result
            log(f"  floors not measured: {type(e).__name__}: {e}")
    total = time.perf_counter() - t0

    md, data = build_report(results, cfg, command, started, total, floor)
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(data, f, indent=1)
    log(f"written {os.path.relpath(os.path.join(args.out, 'latest.md'))} and latest.json "
        f"({total:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
