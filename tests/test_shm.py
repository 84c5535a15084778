"""Large buffers through shared memory between the master and local
workers: exact round trips, authentication of the bytes read, segments
freed whoever dies, and no growth over many runs."""

from __future__ import annotations

import gc
import mmap
import os
import signal
import threading

import numpy as np
import psutil
import pytest

from conftest import wait_until
from pymw_magic import Master
from pymw_magic.errors import SignatureError
from pymw_magic.payload import Signer, new_key
from pymw_magic.transport import (SHM_THRESHOLD, Borrower, FrameReader, FrameWriter, Lender,
                                  channel_pair, enlarge_pipe)

SEGMENT = "memfd:pymw-buffers"
BIG = SHM_THRESHOLD + 4096   # bytes: through shared memory


def echo(x):
    return x


def double_in_place(a):
    a *= 2
    return a


_kept: list = []


def keep(a):
    """Keeps its argument beyond the task (a worker-side cache)."""
    _kept.append(a)
    return float(a.sum())


def kept_back(i):
    return _kept[i]


def block(path):
    import time
    open(path, "w").close()
    time.sleep(300)


def in_shared_memory(obj) -> bool:
    """Whether ``obj`` (an array) views a shared-memory mapping."""
    base = obj
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def out_of_band(obj) -> int:
    """Bytes pickle protocol 5 carries out of band for ``obj``."""
    import pickle
    bufs = []
    pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    return sum(b.raw().nbytes for b in bufs)


def segment_fds(pid: int | None = None) -> list[str]:
    d = f"/proc/{pid or 'self'}/fd"
    out = []
    for fd in os.listdir(d):
        try:
            if os.readlink(f"{d}/{fd}").startswith("/" + SEGMENT):
                out.append(fd)
        except OSError:
            pass
    return out


def segment_maps(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/maps") as f:
        return sum(SEGMENT in line for line in f)


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


ARRAYS = [
    np.arange(BIG // 8, dtype=np.float64),
    np.arange(BIG, dtype=np.int8),
    (np.arange(BIG // 16) * (1 + 2j)).astype(np.complex128),
    np.arange(BIG // 4, dtype=np.int32).reshape(-1, 4),
    np.asfortranarray(np.arange(BIG // 8, dtype=np.float64).reshape(-1, 8)),
    np.arange(BIG // 8, dtype=np.float64)[::2],                     # not contiguous
    np.arange(BIG // 8, dtype=np.float64).reshape(-1, 8)[:, 1:5],   # not contiguous
    np.zeros((0, 7), dtype=np.float32),                              # zero-size
    np.zeros(BIG, dtype=bool),
    np.array(["x" * 10] * (BIG // 40), dtype="U10"),
    np.zeros(BIG // 16, dtype=[("a", "<i8"), ("b", "<f4"), ("c", "u1")]),
    np.arange(BIG // 8).astype("datetime64[s]"),
    np.arange(BIG // 2, dtype=">u2"),                                # big-endian
    np.full((), 3.5),                                                # 0-d
    np.arange(100, dtype=np.float64),                                # small: the pipe
]


def _check_array(back, arr):
    assert type(back) is type(arr)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert back.tobytes() == arr.tobytes()
    if out_of_band(arr) >= SHM_THRESHOLD:
        assert in_shared_memory(back), "a large contiguous array should come back in shared memory"
        assert back.flags.writeable
    if arr.flags.f_contiguous and not arr.flags.c_contiguous:
        assert back.flags.f_contiguous


def test_arrays_round_trip_exactly(master):
    """Many dtypes and shapes, contiguous or not, zero-size and 0-d, alone
    and several in one batch (map)."""
    for arr in ARRAYS:
        _check_array(master.submit(echo, arr).result(timeout=60), arr)
    for arr, back in zip(ARRAYS, master.map(echo, ARRAYS, chunksize=len(ARRAYS))):
        _check_array(back, arr)


@pytest.mark.parametrize("value", [
    os.urandom(BIG), bytearray(os.urandom(BIG)), b"", bytearray(),
    [np.arange(BIG // 8, dtype=np.float64), bytearray(b"abc") * (BIG // 3), np.arange(10)],
], ids=["bytes", "bytearray", "empty-bytes", "empty-bytearray", "mixed-list"])
def test_bytes_and_mixed_round_trip_exactly(master, value):
    back = master.submit(echo, value).result(timeout=60)
    assert type(back) is type(value)
    if isinstance(value, list):
        for a, b in zip(value, back):
            assert type(a) is type(b) and bytes(memoryview(a).cast("B")) == bytes(memoryview(b).cast("B"))
    else:
        assert back == value


def test_memoryviews_arrive_as_their_bytes(master):
    """A memoryview travels as its bytes (cloudpickle's rule, as on the
    pipe), small or large, read-only or not."""
    for view in (memoryview(os.urandom(BIG)), memoryview(bytearray(os.urandom(BIG))),
                 memoryview(b"abc"), memoryview(np.arange(BIG // 8, dtype=np.float64)).cast("B")):
        back = master.submit(echo, view).result(timeout=60)
        assert type(back) is bytes and back == view.tobytes()


def test_in_place_change_by_the_task_comes_back_and_leaves_the_argument_alone(master):
    a = np.arange(BIG // 8, dtype=np.float64)
    before = a.copy()
    back = master.submit(double_in_place, a).result(timeout=60)
    assert np.array_equal(back, before * 2)
    assert np.array_equal(a, before), "the master's own array must not change"


def test_an_argument_a_worker_keeps_is_never_overwritten():
    """A task that keeps its argument keeps its segment: the master must
    not reuse it for later arguments."""
    with Master("local", workers=1) as m:
        first = np.full(BIG // 8, 1.0)
        assert m.submit(keep, first).result(timeout=60) == first.sum()
        for k in range(2, 12):
            assert m.submit(echo, np.full(BIG // 8, float(k))).result(timeout=60)[0] == k
        again = m.submit(kept_back, 0).result(timeout=60)
        assert np.array_equal(again, first)


def test_results_stay_valid_after_the_master_shut_down_and_the_worker_died():
    m = Master("local", workers=1)
    arr = np.random.default_rng(1).random(BIG // 8)
    back = m.submit(echo, arr).result(timeout=60)
    assert in_shared_memory(back)
    m.shutdown(wait=True)
    gc.collect()
    assert np.array_equal(back, arr)
    back[:] = 0   # still writable, still ours
    assert not back.any()
    del back
    gc.collect()
    assert segment_maps() == 0


def _pair():
    key = new_key()
    r, w = os.pipe()
    enlarge_pipe(w)
    a, b = channel_pair()
    writer = FrameWriter(w, Signer(key), Lender(a))
    reader = FrameReader(r, Signer(key), Borrower(b))
    return writer, reader, (r, w, a, b)


def _close(writer, reader, fds):
    writer.lender.close()
    reader.borrower.close()
    r, w, a, b = fds
    os.close(r)
    os.close(w)
    a.close()
    b.close()


def test_a_tampered_segment_is_refused_before_unpickling():
    """An attacker who opens the sender's segment (through /proc, as one
    can open a pipe) and changes a byte after it was signed: the receiver
    raises SignatureError and unpickles nothing."""
    writer, reader, fds = _pair()
    try:
        arr = np.arange(BIG // 8, dtype=np.float64)
        for position in (0, arr.nbytes // 2, arr.nbytes - 1):
            writer.send(("x", arr))
            fd = segment_fds()[0]   # (ours, and the dup that our mapping holds)
            with open(f"/proc/self/fd/{fd}", "r+b") as f:
                f.seek(position)
                byte = f.read(1)
                f.seek(position)
                f.write(bytes([byte[0] ^ 0x01]))
            with pytest.raises(SignatureError):
                reader.recv()
            gc.collect()
        # Untouched, the same channel still works (the segment came back).
        writer.send(("y", arr))
        tag, got = reader.recv()
        assert tag == "y" and np.array_equal(got, arr)
        assert writer.lender.segments == 1
    finally:
        _close(writer, reader, fds)


def test_a_frame_with_a_changed_segment_id_or_length_is_refused():
    """The header (segment id, lengths) is covered by the MAC too."""
    writer, reader, fds = _pair()
    r, w, a, b = fds
    try:
        arr = np.arange(BIG // 8, dtype=np.float64)
        raw_r, raw_w = os.pipe()
        inner = FrameWriter(raw_w, writer.signer, writer.lender)
        inner.send(arr)
        frame = bytearray(os.read(raw_r, 1 << 16))
        os.close(raw_r)
        os.close(raw_w)
        frame[-40] ^= 1   # inside the body
        os.write(w, bytes(frame))
        with pytest.raises(SignatureError):
            reader.recv()
    finally:
        _close(writer, reader, fds)


def test_many_round_trips_do_not_grow_segments_fds_or_mappings():
    """Segments are reused: after a first series of round trips (several
    in flight at once), a longer one adds no descriptor, mapping or memory
    beyond what the first reached, on either side."""
    def workers():
        return [p.pid for p in psutil.Process().children() if "pymw_magic.worker" in " ".join(p.cmdline())]

    def series(m, arr, rounds):
        for i in range(rounds):
            futures = [m.submit(echo, arr + i) for _ in range(3)]
            for f in futures:
                assert f.result(timeout=60)[0] == i
            del futures, f
        gc.collect()

    # Per channel direction at most: KEEP_FREE free segments, two batches
    # in flight, one still held by the worker; two descriptors each (ours,
    # and the one our mapping holds).
    bound = 2 * 2 * (Lender.KEEP_FREE + 3)
    with Master("local", workers=2) as m:
        arr = np.arange(BIG // 8, dtype=np.float64)
        series(m, arr, 30)
        fds, maps = len(segment_fds()), segment_maps()
        worker_fds = {pid: len(segment_fds(pid)) for pid in workers()}
        rss = psutil.Process().memory_info().rss
        series(m, arr, 90)
        assert len(segment_fds()) <= max(fds, bound)
        assert segment_maps() <= max(maps, bound)
        for pid, before in worker_fds.items():
            assert len(segment_fds(pid)) <= max(before, bound)
        assert psutil.Process().memory_info().rss < rss + 20 * BIG, "memory grows with each round trip"
    gc.collect()
    assert segment_fds() == [] and segment_maps() == 0


def test_segments_are_freed_after_a_worker_is_sigkilled(tmp_path):
    """A worker killed while it holds a large argument: nothing is left
    in /dev/shm, and once the master let go of the lost worker's channel
    no descriptor or mapping of its segments remains here."""
    shm_before = dev_shm()
    with Master("local", workers=1, retries=0) as m:
        m.submit(echo, np.ones(BIG // 8)).result(timeout=60)
        started = tmp_path / "started"
        f = m.submit(block_with, np.ones(BIG // 8), str(started))
        wait_until(started.exists, what="the task to start")
        [worker] = [p for p in psutil.Process().children() if "pymw_magic.worker" in " ".join(p.cmdline())]
        assert segment_maps(worker.pid) >= 1
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(Exception) as info:
            f.result(timeout=60)
        assert type(info.value).__name__ == "WorkerLost"
        # The replacement works through shared memory too.
        back = m.submit(echo, np.arange(BIG // 8, dtype=np.float64)).result(timeout=60)
        assert in_shared_memory(back)
        del back
    gc.collect()
    wait_until(lambda: segment_fds() == [] and segment_maps() == 0, timeout=30,
               what="the master to let go of every segment")
    # (other processes on the machine come and go in /dev/shm: only a
    # segment of ours, or multiprocessing's, would count)
    assert not [n for n in dev_shm() - shm_before if "buffers" in n or n.startswith("psm_")]


def block_with(a, path):
    block(path)


def test_results_dropped_from_many_threads_give_their_segments_back():
    """Results dropped (garbage-collected) on many threads at once: each
    segment goes back to its worker, none twice, and the worker reuses them."""
    with Master("local", workers=2) as m:
        arr = np.arange(BIG // 8, dtype=np.float64)
        errors = []

        def client():
            try:
                for _ in range(15):
                    back = m.submit(echo, arr).result(timeout=60)
                    assert back[-1] == arr[-1]
                    del back
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        gc.collect()
        workers = [p.pid for p in psutil.Process().children() if "pymw_magic.worker" in " ".join(p.cmdline())]
        for pid in workers:
            # 8 clients, each with at most one result in hand at a time
            assert len(segment_fds(pid)) <= 8 + Lender.KEEP_FREE + 2
