"""One adapter per system under test: pymw-magic and its peers.

Every adapter has the same small surface, so ``run.py`` runs the same cases
on each:

* ``start(workers)`` / ``stop()`` — start the pool or cluster (before any
  timing) and shut it down completely, workers included;
* ``variants()`` — the ways of running a batch of tasks, each
  ``(label, kind, run)`` where ``kind`` is ``"submit"`` (one call per task,
  then wait for all) or ``"map"`` (one call for all tasks) and
  ``run(fn, items)`` returns the results in input order;
* ``roundtrip(fn, arg)`` — one task, submitted and waited for (the latency
  and large-argument cases).

An adapter whose library is missing raises ``Unavailable`` from ``start``;
``run.py`` reports it as skipped.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable


class Unavailable(Exception):
    """The system cannot be run here (not installed, failed to start)."""


def _version(module_name: str) -> str:
    try:
        from importlib.metadata import version
        return version(module_name)
    except Exception:
        return "?"


class System:
    key = ""            # name on the command line (--skip)
    name = ""           # name in the tables
    aliases: tuple[str, ...] = ()

    def version(self) -> str:
        return ""

    def start(self, workers: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def variants(self) -> list[tuple[str, str, Callable]]:
        raise NotImplementedError

    def roundtrip(self, fn: Callable, arg: Any) -> Any:
        raise NotImplementedError


# --- pymw-magic ------------------------------------------------------------------
class PymwMagic(System):
    key = "pymw"
    name = "pymw-magic"
    aliases = ("pymw-magic", "pymw_magic")

    def version(self):
        return _version("pymw-magic")

    def start(self, workers):
        try:
            from pymw_magic import Master
        except ImportError as e:
            raise Unavailable(f"pymw_magic not importable: {e}")
        self.master = Master("local", workers=workers)

    def stop(self):
        m = getattr(self, "master", None)
        if m is not None:
            m.shutdown(wait=True)

    def submit(self, fn, items):
        futures = [self.master.submit(fn, x) for x in items]
        return [f.result() for f in futures]

    def map(self, fn, items):
        return list(self.master.map(fn, items))

    def variants(self):
        return [("submit", "submit", self.submit), ("map (auto batching)", "map", self.map)]

    def roundtrip(self, fn, arg):
        return self.master.submit(fn, arg).result()


# --- concurrent.futures.ProcessPoolExecutor ------------------------------------------
class ProcessPool(System):
    key = "processpool"
    name = "ProcessPoolExecutor"
    aliases = ("ppe", "processpoolexecutor", "concurrent.futures")

    def version(self):
        import platform
        return "stdlib " + platform.python_version()

    def start(self, workers):
        from concurrent.futures import ProcessPoolExecutor
        self.ex = ProcessPoolExecutor(max_workers=workers)

    def stop(self):
        ex = getattr(self, "ex", None)
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn, items):
        futures = [self.ex.submit(fn, x) for x in items]
        return [f.result() for f in futures]

    def map(self, fn, items):
        return list(self.ex.map(fn, items))

    def variants(self):
        return [("submit", "submit", self.submit), ("map (chunksize=1)", "map", self.map)]

    def roundtrip(self, fn, arg):
        return self.ex.submit(fn, arg).result()


# --- multiprocessing.Pool ------------------------------------------------------------
class MPPool(System):
    key = "pool"
    name = "multiprocessing.Pool"
    aliases = ("multiprocessing", "mp", "mp.pool", "multiprocessing.pool")

    def version(self):
        import platform
        return "stdlib " + platform.python_version()

    def start(self, workers):
        import multiprocessing
        self.pool = multiprocessing.Pool(processes=workers)

    def stop(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
            pool.join()

    def submit(self, fn, items):
        handles = [self.pool.apply_async(fn, (x,)) for x in items]
        return [h.get() for h in handles]

    def map1(self, fn, items):
        return self.pool.map(fn, items, chunksize=1)

    def map_default(self, fn, items):
        return self.pool.map(fn, items)

    def variants(self):
        return [("apply_async", "submit", self.submit),
                ("map (chunksize=1)", "map", self.map1),
                ("map (default chunking)", "map", self.map_default)]

    def roundtrip(self, fn, arg):
        return self.pool.apply_async(fn, (arg,)).get()


# --- loky ------------------------------------------------------------------------------
class Loky(System):
    key = "loky"
    name = "loky"

    def version(self):
        return _version("loky")

    def start(self, workers):
        try:
            from loky import get_reusable_executor
        except ImportError as e:
            raise Unavailable(f"loky not installed ({e})")
        # A long idle timeout: workers must not time out and restart between cases.
        self.ex = get_reusable_executor(max_workers=workers, timeout=3600)

    def stop(self):
        ex = getattr(self, "ex", None)
        if ex is not None:
            ex.shutdown(wait=True, kill_workers=True)

    def submit(self, fn, items):
        futures = [self.ex.submit(fn, x) for x in items]
        return [f.result() for f in futures]

    def map(self, fn, items):
        return list(self.ex.map(fn, items))

    def variants(self):
        return [("submit", "submit", self.submit), ("map (chunksize=1)", "map", self.map)]

    def roundtrip(self, fn, arg):
        return self.ex.submit(fn, arg).result()


# --- Dask distributed -------------------------------------------------------------------
class Dask(System):
    key = "dask"
    name = "Dask LocalCluster"
    aliases = ("distributed", "dask.distributed")

    def version(self):
        return "distributed " + _version("distributed")

    def start(self, workers):
        try:
            from distributed import Client, LocalCluster
        except ImportError as e:
            raise Unavailable(f"dask[distributed] not installed ({e})")
        warnings.filterwarnings("ignore", module="distributed")
        for name in ("distributed", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(workers, timeout=120)

    def stop(self):
        client = getattr(self, "client", None)
        cluster = getattr(self, "cluster", None)
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()

    # pure=False: every call is a new task (with pure=True equal arguments
    # would share one key and return a cached result).
    def submit(self, fn, items):
        futures = [self.client.submit(fn, x, pure=False) for x in items]
        return self.client.gather(futures)

    def map(self, fn, items):
        return self.client.gather(self.client.map(fn, items, pure=False))

    def variants(self):
        return [("client.submit", "submit", self.submit), ("client.map", "map", self.map)]

    def roundtrip(self, fn, arg):
        return self.client.submit(fn, arg, pure=False).result()


# --- ipyparallel -------------------------------------------------------------------------
class IPyParallel(System):
    key = "ipyparallel"
    name = "ipyparallel"
    aliases = ("ipp",)

    def version(self):
        return _version("ipyparallel")

    def start(self, workers):
        try:
            import ipyparallel as ipp
        except ImportError as e:
            raise Unavailable(f"ipyparallel not installed ({e})")
        self.cluster = ipp.Cluster(n=workers, log_level=logging.ERROR)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(workers, timeout=120)
        self.view = self.rc.load_balanced_view()

    def stop(self):
        rc = getattr(self, "rc", None)
        cluster = getattr(self, "cluster", None)
        try:
            if rc is not None:
                rc.close()
        finally:
            if cluster is not None:
                cluster.stop_cluster_sync()

    def submit(self, fn, items):
        handles = [self.view.apply_async(fn, x) for x in items]
        return [h.get() for h in handles]

    def map(self, fn, items):
        return self.view.map_async(fn, items).get()

    def variants(self):
        return [("apply_async", "submit", self.submit), ("map (load-balanced)", "map", self.map)]

    def roundtrip(self, fn, arg):
        return self.view.apply_async(fn, arg).get()


SYSTEMS: list[type[System]] = [PymwMagic, ProcessPool, MPPool, Loky, Dask, IPyParallel]


def find_system(name: str) -> type[System]:
    n = name.strip().lower()
    for cls in SYSTEMS:
        if n in (cls.key, cls.name.lower(), *cls.aliases):
            return cls
    valid = ", ".join(cls.key for cls in SYSTEMS)
    raise ValueError(f"unknown system {name!r}; valid: {valid}")

