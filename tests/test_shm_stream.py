"""Shared-memory frames as a stream: the receiver maps each of the
sender's segments once and keeps it across frames, unmaps it when the
sender drops it, gives it back once nothing views it, and refuses a
frame whose step announcements do not add up (before unpickling)."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from pymw_magic.payload import Signer, new_key
from pymw_magic.transport import (SHM_THRESHOLD, Borrower, ConnectionLost, FrameReader, FrameWriter,
                                  Lender, channel_pair, enlarge_pipe)

SEGMENT = "memfd:pymw-buffers"
BIG = SHM_THRESHOLD + 4096


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


def _mapping(arr):
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj


def segment_maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(SEGMENT in line for line in f)


def test_a_segment_is_mapped_once_across_frames():
    """Frames that reuse a segment reuse the receiver's mapping of it (no
    map and page-table fill per frame), and their bytes are each frame's."""
    writer, reader, fds = _pair()
    try:
        seen = set()
        for k in range(20):
            arr = np.full(BIG // 8, float(k))
            writer.send(arr)
            back = reader.recv()
            assert back[0] == k and back[-1] == k and back.nbytes == arr.nbytes
            seen.add(id(_mapping(back)))
            del back
        assert writer.lender.segments <= 2   # (given back at the receiver's next read)
        assert reader.borrower.mapped == writer.lender.segments
        assert len(seen) == writer.lender.segments
    finally:
        _close(writer, reader, fds)
    gc.collect()
    assert segment_maps() == 0


def test_a_kept_result_keeps_its_segment_from_reuse():
    writer, reader, fds = _pair()
    try:
        writer.send(np.full(BIG // 8, 1.0))
        first = reader.recv()
        for k in range(2, 30):
            writer.send(np.full(BIG // 8, float(k)))
            assert reader.recv()[0] == k
        assert (first == 1.0).all(), "a segment still viewed here was overwritten"
    finally:
        _close(writer, reader, fds)
    assert (first == 1.0).all()   # still mapped after the channel closed
    del first
    gc.collect()
    assert segment_maps() == 0


def test_segments_the_sender_drops_are_unmapped_by_the_receiver():
    """Many sizes (each needs a segment of its own): the lender keeps a few
    free and drops the rest; the receiver lets go of the dropped ones."""
    writer, reader, fds = _pair()
    try:
        for k in range(1, 25):
            writer.send(np.zeros(k * (1 << 20) // 8 + 8))
            del_me = reader.recv()
            assert del_me.nbytes == k * (1 << 20) + 64
            del del_me
        reader.borrower.poll()
        assert writer.lender.segments <= Lender.KEEP_FREE + 2
        assert reader.borrower.mapped <= Lender.KEEP_FREE + 2
        assert segment_maps() <= 2 * (Lender.KEEP_FREE + 2)
    finally:
        _close(writer, reader, fds)
    gc.collect()
    assert segment_maps() == 0


def _raw_frame(writer, obj) -> bytes:
    raw_r, raw_w = os.pipe()
    enlarge_pipe(raw_w)
    try:
        FrameWriter(raw_w, writer.signer, writer.lender).send(obj)
        return os.read(raw_r, 1 << 20)
    finally:
        os.close(raw_r)
        os.close(raw_w)


@pytest.mark.parametrize("change", ["past-the-end", "backwards", "zero"])
def test_a_false_step_announcement_is_refused_before_unpickling(change):
    """The announcements are hints outside the MAC: one that claims more
    than the frame holds, goes backwards or stands still is refused."""
    writer, reader, fds = _pair()
    try:
        arr = np.arange(3 * (1 << 20) // 8, dtype=np.float64)   # three steps
        frame = bytearray(_raw_frame(writer, arr))
        body_len, nbuf = int.from_bytes(frame[0:8], "little"), int.from_bytes(frame[8:12], "little")
        first = 13 + 8 * nbuf + 16 + 4        # header, lengths, nonce, segment id
        readies = [int.from_bytes(frame[first + 8 * i:first + 8 * i + 8], "little") for i in range(3)]
        assert readies == [1 << 20, 2 << 20, 3 << 20]
        bad = {"past-the-end": (3 << 20) + 1, "backwards": 1, "zero": 0}[change]
        at = first + 8 if change != "zero" else first
        frame[at:at + 8] = bad.to_bytes(8, "little")
        os.write(fds[1], bytes(frame))
        with pytest.raises(ConnectionLost, match="malformed"):
            reader.recv()
        assert body_len > 0
    finally:
        _close(writer, reader, fds)


def test_steps_announced_differently_still_verify():
    """Where the steps fall does not matter to the MAC: a frame whose
    announcements were merged still verifies and arrives intact."""
    writer, reader, fds = _pair()
    try:
        arr = np.arange(3 * (1 << 20) // 8, dtype=np.float64)
        frame = bytearray(_raw_frame(writer, arr))
        nbuf = int.from_bytes(frame[8:12], "little")
        first = 13 + 8 * nbuf + 16 + 4
        del frame[first:first + 16]   # only the last announcement is left
        os.write(fds[1], bytes(frame))
        assert np.array_equal(reader.recv(), arr)
    finally:
        _close(writer, reader, fds)


_kept: list = []


def keep(a):
    _kept.append(a)
    return None


def kept_back(i):
    return _kept[i]


def test_a_result_the_master_changes_leaves_what_the_worker_kept_alone():
    """Results are copies: a task that returns an argument it kept (a
    view of the master's segment) must not hand the master a view of that
    same memory, or changing the result would change the worker's state."""
    from pymw_magic import Master
    with Master("local", workers=1) as m:
        m.submit(keep, np.full(BIG // 8, 1.0)).result(timeout=60)
        for _ in range(3):
            again = m.submit(kept_back, 0).result(timeout=60)
            assert (again == 1.0).all()
            again[:] = 5.0
        del again
        gc.collect()
