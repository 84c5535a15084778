"""A hostile user's attacks on three changes: a store write's wait bounded
by its patience, a map iterator collected inside the scheduler's lock,
and HTCondor's ``max_transfer_output_mb`` (the backend and the stand-in
schedd's file transfer).  Every test here failed on the code before its
fix."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time

import pytest

from conftest import wait_until
from pymw_magic import Master
from pymw_magic import store as st
from pymw_magic.store import Store


def square(x):
    return x * x


def nap(x):
    time.sleep(x)
    return x


# --- the store: a write's patience bounds every wait ------------------------------------------
@pytest.fixture
def store_home(tmp_path, monkeypatch):
    path = tmp_path / "h16 home"
    monkeypatch.setenv("PYMW_HOME", str(path))
    monkeypatch.delenv("PYMW_STORE", raising=False)
    return path


class _Locker:
    """Another process holding the store's write lock (BEGIN EXCLUSIVE)
    until :meth:`release`."""

    CODE = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read(); "
            "c.execute('COMMIT')")

    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _a_stored_job(home) -> str:
    with Master("local", workers=1) as m:
        m.map_async(square, range(2), name="mine").result(timeout=60)
        st.recorder().flush()
    return st.jobs()[0].uid


def test_a_short_patience_is_not_spent_waiting_behind_this_process_s_own_patient_writer(store_home):
    """A write with 0.5 s of patience, made while another thread of this
    process waits (default patience) for another process's lock, gives up
    in about 0.5 s, not after the other thread's whole busy wait; and the
    patient writer still goes through once the lock is let go ~2 s later."""
    uid = _a_stored_job(store_home)
    store = Store(store_home)
    for trial in range(3):
        locker = _Locker(store_home / st.DB_NAME)
        try:
            patient: dict = {}

            def write_patiently():
                try:
                    patient["out"] = store.request_cancel(uid)
                except BaseException as exc:  # noqa: BLE001  (reported below)
                    patient["out"] = exc
            held_since = time.monotonic()
            t = threading.Thread(target=write_patiently)
            t.start()

            def patient_waits() -> bool:  # (inside the store's lock, in SQLite's busy wait)
                if store._lock.acquire(blocking=False):
                    store._lock.release()
                    return False
                return True
            wait_until(patient_waits, timeout=30, what="the patient write waiting for the lock")
            hasty = []
            lock = threading.Barrier(4)

            def write_hastily(patience):
                lock.wait(timeout=30)
                began = time.monotonic()
                try:
                    store.request_cancel(uid, patience=patience)
                    hasty.append(("went through", patience, time.monotonic() - began))
                except st.StoreBusy:
                    hasty.append(("busy", patience, time.monotonic() - began))
            hs = [threading.Thread(target=write_hastily, args=(p,)) for p in (0.0, -1.0, 0.5, 1.0)]
            for h in hs:
                h.start()
            for h in hs:
                h.join(60)
            assert sorted(w for w, *_ in hasty) == ["busy"] * 4, (trial, hasty)
            slow = [(p, round(took, 2)) for _, p, took in hasty if took > max(p, 0) + 1.5]
            assert not slow, f"trial {trial}: waited far past their patience: {slow}"
            assert t.is_alive(), f"trial {trial}: the patient write gave up: {patient}"
            time.sleep(max(0.0, held_since + 2.0 - time.monotonic()))  # (the scenario: locked ~2 s)
        finally:
            locker.release()
        t.join(60)
        assert patient["out"] is False, f"trial {trial}: {patient['out']!r}"  # (the job had ended)
    store.close()
