"""Shared-memory frames, hostile and odd cases (written for frames hashed in
chunks on two threads; they hold for either transport): every
chunk is checked before anything is unpickled, chunks cannot be moved,
odd sizes and layouts arrive exact, copy semantics hold, many threads
send at once, a frame abandoned mid-way holds nothing, a worker killed
mid-transfer leaves nothing behind, and nothing grows over many frames."""

from __future__ import annotations

import gc
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
from pymw_magic.transport import (SHM_THRESHOLD, Borrower, ConnectionLost, FrameReader, FrameWriter,
                                  Lender, channel_pair, enlarge_pipe)

SEGMENT = "memfd:pymw-buffers"
MiB = 1 << 20
CHUNK = MiB   # a frame's chunk (cut from each buffer's start)

# -- helpers ---------------------------------------------------------------

_unpickled: list = []


class Canary:
    """Records its own unpickling: nothing may be unpickled from a frame
    that does not verify."""

    def __reduce__(self):
        return (_hatch, ())


def _hatch():
    _unpickled.append(1)
    return "canary"


def _pair():
    key = new_key()
    r, w = os.pipe()
    enlarge_pipe(w)
    enlarge_pipe(r)
    a, b = channel_pair()
    return FrameWriter(w, Signer(key), Lender(a)), FrameReader(r, Signer(key), Borrower(b)), (r, w, a, b)


def _close(writer, reader, fds):
    writer.lender.close()
    reader.borrower.close()
    for fd in fds[:2]:
        os.close(fd)
    for s in fds[2:]:
        s.close()


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


def largest_segment(pid: int) -> int:
    sizes = [0]
    for fd in segment_fds(pid):
        try:
            sizes.append(os.stat(f"/proc/{pid}/fd/{fd}").st_size)
        except OSError:
            pass
    return max(sizes)


def segment_maps(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/maps") as f:
        return sum(SEGMENT in line for line in f)


def hash_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pymw-hash"]


def _segment_file(before: list[str]):
    """The channel's one segment (the descriptors that appeared since
    ``before`` all name it), opened as an attacker would (through /proc)."""
    fd = sorted(set(segment_fds()) - set(before), key=int)[0]
    return open(f"/proc/self/fd/{fd}", "r+b")


def workers(besides: set[int] = frozenset()) -> list[psutil.Process]:
    """This process's workers, but those in ``besides`` (another master's)."""
    return [p for p in psutil.Process().children()
            if "pymw_magic.worker" in " ".join(p.cmdline()) and p.pid not in besides]


def echo(x):
    return x


def double_in_place(a):
    a *= 2
    return a


def sum_of(a):
    return float(np.asarray(a, dtype=np.float64).sum())


def big_result(n, path):
    """A result of ``n`` bytes; says when it is about to return."""
    out = np.ones(n // 8)
    open(path, "w").close()
    return out


# -- the MAC: every chunk, before anything is unpickled ---------------------

# Two buffers: 2.5 MiB (chunks 0-2) and 1 MiB + 1 (chunks 3-4); the second
# starts at a 64-byte aligned offset after the first.
FIRST, SECOND = 5 * MiB // 2, MiB + 1


@pytest.mark.parametrize("where", [
    ("first", 0), ("first", CHUNK - 1), ("first", CHUNK), ("first", 2 * CHUNK + 7), ("first", FIRST - 1),
    ("second", 0), ("second", CHUNK - 1), ("second", CHUNK)])
def test_a_changed_byte_in_any_chunk_is_refused_before_unpickling(where):
    before = segment_fds()
    writer, reader, fds = _pair()
    try:
        a = np.frombuffer(os.urandom(FIRST), dtype=np.uint8)
        b = np.frombuffer(os.urandom(SECOND), dtype=np.uint8)
        writer.send((a, Canary(), b))
        which, at = where
        position = at if which == "first" else (FIRST + 63) // 64 * 64 + at
        with _segment_file(before) as f:
            f.seek(position)
            byte = f.read(1)
            f.seek(position)
            f.write(bytes([byte[0] ^ 0x80]))
        _unpickled.clear()
        with pytest.raises(SignatureError):
            reader.recv()
        assert _unpickled == [], "something was unpickled from a frame that did not verify"
        gc.collect()
        writer.send((a, Canary(), b))   # untouched, the channel still works
        back_a, canary, back_b = reader.recv()
        assert canary == "canary" and np.array_equal(back_a, a) and np.array_equal(back_b, b)
    finally:
        _close(writer, reader, fds)


def test_chunks_swapped_in_the_segment_are_refused():
    """Each chunk's key names its place: two chunks exchanged (each still
    intact) do not verify."""
    before = segment_fds()
    writer, reader, fds = _pair()
    try:
        arr = np.frombuffer(os.urandom(3 * CHUNK), dtype=np.uint8)
        writer.send(arr)
        with _segment_file(before) as f:
            first = f.read(CHUNK)
            second = f.read(CHUNK)
            f.seek(0)
            f.write(second + first)
        with pytest.raises(SignatureError):
            reader.recv()
    finally:
        _close(writer, reader, fds)


def test_a_forged_header_naming_huge_buffers_is_refused_at_once():
    """A header (not yet authenticated when it is read) that names a
    thousand buffers of 512 GiB in a segment the receiver has mapped is
    refused before anything is allocated or cut for it."""
    import struct
    import time

    writer, reader, fds = _pair()
    try:
        writer.send(np.ones(2 * CHUNK // 8))   # segment 1 is mapped on the reading side now
        del_me = reader.recv()
        del del_me
        gc.collect()
        nbuf = 1000
        forged = (struct.pack("<QIB", 10, nbuf, 2) + struct.pack("<Q", 1 << 39) * nbuf
                  + bytes(16) + struct.pack("<I", 1))
        os.write(fds[1], forged)
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match="more bytes than its segment"):
            reader.recv()
        assert time.monotonic() - started < 5
    finally:
        _close(writer, reader, fds)


def test_a_sender_failing_mid_frame_holds_no_chunk_and_keeps_no_mapping():
    """The pipe breaks after the first chunk was announced: the sender
    raises ConnectionLost, its hashing threads hold nothing, and the
    segment unmaps at once when the channel closes."""

    class Breaks(FrameWriter):
        __slots__ = ("writes",)

        def _write_all(self, data):
            self.writes += 1
            if self.writes == 3:   # header, first announcement, then this
                raise ConnectionLost("the receiving process is gone")
            super()._write_all(data)

    key = new_key()
    r, w = os.pipe()
    enlarge_pipe(w)
    a, b = channel_pair()
    lender = Lender(a)
    writer = Breaks(w, Signer(key), lender)
    try:
        for _ in range(5):
            writer.writes = 0
            with pytest.raises(ConnectionLost):
                writer.send(np.ones(4 * CHUNK // 8))
        assert segment_maps() >= 1
    finally:
        lender.close()
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
    gc.collect()
    assert segment_maps() == 0 and segment_fds() == []


# -- exact round trips through a real worker --------------------------------

def _exact(back, value):
    if isinstance(value, np.ndarray):
        assert type(back) is np.ndarray and back.dtype == value.dtype and back.shape == value.shape
        if value.dtype == object:
            assert back.tolist() == value.tolist()
        else:
            assert back.tobytes() == value.tobytes()
            assert back.flags.f_contiguous == value.flags.f_contiguous or value.ndim < 2
    else:
        assert type(back) is type(value) and back == value


@pytest.mark.parametrize("n", [0, 1, SHM_THRESHOLD - 1, SHM_THRESHOLD, SHM_THRESHOLD + 1,
                               2 * CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 63])
def test_bytes_of_odd_sizes_round_trip_exactly(master, n):
    value = os.urandom(n)
    _exact(master.submit(echo, value).result(timeout=60), value)
    arr = np.frombuffer(value, dtype=np.uint8).copy()
    _exact(master.submit(echo, arr).result(timeout=60), arr)


@pytest.mark.parametrize("make", [
    lambda: np.arange(3 * CHUNK // 8, dtype=np.float64)[::3],                       # strided
    lambda: np.asfortranarray(np.arange(3 * CHUNK // 8, dtype=np.float64).reshape(-1, 6)),
    lambda: np.arange(3 * CHUNK // 8, dtype=np.float64).reshape(-1, 8)[:, 2:7],      # strided 2-d
    lambda: np.array([("x" * (i % 50), i) for i in range(50_000)], dtype=object),    # in-band
    lambda: [np.full(100_000 // 8, float(i)) for i in range(40)],        # many chunks under 1 MiB
    lambda: (np.ones(CHUNK // 8), np.zeros((0, 3)), os.urandom(CHUNK + 1), np.arange(5)),
], ids=["strided", "fortran", "strided-2d", "object", "many-small", "mixed"])
def test_layouts_round_trip_exactly(master, make):
    value = make()
    back = master.submit(echo, value).result(timeout=60)
    if isinstance(value, (list, tuple)):
        assert type(back) is type(value) and len(back) == len(value)
        for x, y in zip(back, value):
            _exact(x, y)
    else:
        _exact(back, value)


# -- copy semantics ---------------------------------------------------------

def test_changing_an_array_after_its_frame_was_sent_does_not_reach_the_receiver():
    """A frame is a copy from the moment ``send`` returns: the sender's
    array changed at once (the receiver may still be hashing) changes
    nothing on the other side, frame after frame in the same segments."""
    writer, reader, fds = _pair()
    try:
        arr = np.arange(3 * CHUNK // 8, dtype=np.float64)
        for i in range(6):
            arr[:] = np.arange(arr.size) + i
            writer.send(arr)
            arr[:] = -1.0
            back = reader.recv()
            assert (back == np.arange(arr.size) + i).all()
            del back
            gc.collect()
    finally:
        _close(writer, reader, fds)


def test_a_task_changing_its_argument_and_the_master_changing_results_stay_apart(master):
    arr = np.arange(2 * CHUNK // 8, dtype=np.float64)
    doubled = master.submit(double_in_place, arr).result(timeout=60)
    assert (arr == np.arange(arr.size)).all(), "the task's change reached the master's argument"
    assert (doubled == 2 * arr).all()
    held = [master.submit(echo, np.full(2 * CHUNK // 8, float(i))).result(timeout=60) for i in range(6)]
    for i, h in enumerate(held):
        h[:1] = -5.0     # the master's own copy: no later frame may overwrite it
    for _ in range(6):
        master.submit(echo, np.full(2 * CHUNK // 8, 99.0)).result(timeout=60)
    for i, h in enumerate(held):
        assert h[0] == -5.0 and (h[1:] == float(i)).all()


# -- many threads, many frames ----------------------------------------------

def test_many_transport_channels_sending_at_once_from_many_threads():
    """Eight channels, each written by its own thread and read by another,
    share the hashing threads: every frame arrives exact."""
    pairs = [_pair() for _ in range(8)]
    errors: list = []

    def write(writer, seed):
        try:
            for i in range(12):
                writer.send((seed, i, np.full(CHUNK + 8 * (seed * 13 + i), float(seed * 100 + i))))
        except BaseException as exc:   # reported below
            errors.append(exc)

    def read(reader, seed):
        try:
            for i in range(12):
                s, j, arr = reader.recv()
                assert (s, j) == (seed, i) and arr.size == CHUNK + 8 * (seed * 13 + i)
                assert (arr == float(seed * 100 + i)).all()
                del arr
        except BaseException as exc:   # reported below
            errors.append(exc)

    threads = []
    for seed, (writer, reader, _) in enumerate(pairs):
        threads += [threading.Thread(target=write, args=(writer, seed)),
                    threading.Thread(target=read, args=(reader, seed))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not [t for t in threads if t.is_alive()], "a channel hung"
        assert not errors, errors
    finally:
        for writer, reader, fds in pairs:
            _close(writer, reader, fds)
    assert len(hash_threads()) <= max(1, (os.cpu_count() or 1) - 1)


def test_many_threads_submitting_arrays_at_once_get_their_own_back():
    errors: list = []
    with Master("local", workers=2) as m:
        def client(k):
            try:
                for i in range(6):
                    arr = np.full(CHUNK // 4 + k * 1000 + i, float(k * 10 + i))
                    back = m.submit(echo, arr).result(timeout=120)
                    assert back.shape == arr.shape and (back == arr).all()
            except BaseException as exc:   # reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not [t for t in threads if t.is_alive()]
        assert not errors, errors


def test_fifty_round_trips_keep_rss_fds_threads_and_segments_flat():
    others = {p.pid for p in workers()}
    with Master("local", workers=1) as m:
        arr = np.random.default_rng(1).random(10 * MiB // 8)
        for _ in range(10):
            m.submit(echo, arr).result(timeout=60)
        gc.collect()
        me = psutil.Process()
        [worker] = workers(others)
        rss, fds, threads = me.memory_info().rss, me.num_fds(), threading.active_count()
        w_rss, w_fds = worker.memory_info().rss, worker.num_fds()
        # (a segment or two more may be in flight at a time: two descriptors each)
        slack = 4
        for series in range(2):
            for _ in range(50):
                back = m.submit(echo, arr).result(timeout=60)
                assert back[-1] == arr[-1]
                del back
            gc.collect()
            assert me.memory_info().rss < rss + 3 * arr.nbytes, "the master's memory grows per round trip"
            assert me.num_fds() <= fds + slack and threading.active_count() <= threads
            assert worker.memory_info().rss < w_rss + 3 * arr.nbytes, "the worker's memory grows"
            assert worker.num_fds() <= w_fds + slack


def test_a_worker_killed_mid_transfer_leaves_nothing_and_fails_the_task_cleanly(tmp_path):
    """SIGKILL while the worker copies and hashes a 600 MB result into its
    segment: the task fails with WorkerLost or is run again, the master
    holds no descriptor or mapping of the dead worker's segments, nothing
    is left in /dev/shm, and the replacement worker works."""
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    others = {p.pid for p in workers()}
    fds_before, maps_before = set(segment_fds()), segment_maps()   # (another master's)
    with Master("local", workers=1, retries=0) as m:
        m.submit(echo, np.ones(2 * CHUNK // 8)).result(timeout=60)
        [worker] = workers(others)
        ready = tmp_path / "returning"
        f = m.submit(big_result, 600 * MiB, str(ready))
        wait_until(ready.exists, what="the task to return its result")
        # Its new 600 MB segment is open: the transfer is under way.
        wait_until(lambda: largest_segment(worker.pid) >= 600 * MiB or f.done(), timeout=60,
                   what="the worker to open its segment")
        os.kill(worker.pid, signal.SIGKILL)
        try:
            # Killed after the task ran, while its result was on the way:
            # the master may run it again on the replacement (retried) or
            # fail it; either way cleanly.
            again = f.result(timeout=120)
            assert again.shape == (600 * MiB // 8,) and again[0] == 1.0 and again[-1] == 1.0
            del again
        except Exception as exc:
            assert type(exc).__name__ == "WorkerLost", exc
        del f   # (a result, had it come, would keep the dead worker's segment: results stay valid)
        back = m.submit(echo, np.arange(2 * CHUNK // 8, dtype=np.float64)).result(timeout=120)
        assert back[-1] == 2 * CHUNK // 8 - 1
        del back
    gc.collect()
    wait_until(lambda: set(segment_fds()) <= fds_before and segment_maps() <= maps_before, timeout=30,
               what="the master to let go of every segment")
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not [n for n in after - shm_before if "buffers" in n or n.startswith("psm_")]


def test_frames_still_verify_in_a_forked_child():
    """The helper threads do not survive a fork: the child starts its own
    (or hashes alone) and its frames arrive exact, within a time limit."""
    writer, reader, fds = _pair()
    try:
        writer.send(np.ones(3 * CHUNK // 8))   # the parent's helpers are running now
        assert (reader.recv() == 1.0).all()
    finally:
        _close(writer, reader, fds)
    gc.collect()
    pid = os.fork()
    if pid == 0:   # the child: no pytest machinery, exit status only
        code = 1
        try:
            w, r, f = _pair()
            for i in range(3):
                w.send(np.full(3 * CHUNK // 8, float(i)))
                ok = (r.recv() == float(i)).all()
                if not ok:
                    break
            else:
                code = 0
            _close(w, r, f)
        finally:
            os._exit(code)
    status: list[int] = []

    def reaped():
        got, code = os.waitpid(pid, os.WNOHANG)
        if got:
            status.append(code)
        return bool(status)

    try:
        wait_until(reaped, timeout=60, what="the forked child to finish")
    finally:
        if not status:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status[0]) == 0, "a frame did not arrive exact in the child"
