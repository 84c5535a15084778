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


def _both_ways():
    """A master's and a worker's ends of a channel both ways, wired as the
    local backend wires them."""
    key = new_key()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    for fd in (r1, w1, r2, w2):
        enlarge_pipe(fd)
    d1, d2 = channel_pair()
    u1, u2 = channel_pair()
    ends = []
    for lender, borrower, wfd, rfd in ((Lender(d1), Borrower(u2), w1, r2), (Lender(u1), Borrower(d2), w2, r1)):
        writer = FrameWriter(wfd, Signer(key), lender, borrower)
        reader = FrameReader(rfd, Signer(key), borrower, lender)
        lender.reader, borrower.writer = reader, writer
        ends.append((writer, reader))
    return ends, (r1, w1, r2, w2, d1, d2, u1, u2)


def _close_both(ends, fds):
    for writer, reader in ends:
        writer.lender.close()
        reader.borrower.close()
    for fd in fds[:4]:
        os.close(fd)
    for s in fds[4:]:
        s.close()


def test_a_result_viewing_its_argument_goes_back_without_a_copy():
    """The worker's reply names the master's own segment: the worker
    makes no segment, and the result views the master's mapping."""
    (master, worker), fds = _both_ways()
    try:
        for k in range(5):
            arr = np.full(BIG // 8, float(k))
            master[0].send(arr)
            got = worker[1].recv()
            worker[0].send(got)
            del got
            worker[1].borrower.poll()
            back = master[1].recv()
            assert np.array_equal(back, arr) and back.flags.writeable
            assert any(_mapping(back) is mm for _, mm in master[0].lender._segs.values())
            del back
        assert worker[0].lender.segments == 0
        assert master[0].lender.segments == 1
    finally:
        _close_both([master, worker], fds)
    gc.collect()
    assert segment_maps() == 0


def test_a_segment_given_back_before_the_reply_naming_it_is_read_is_not_reused():
    """The worker gives the argument's segment back right after a reply
    that views it; the master sends again before reading that reply: the
    segment must not be reused (the reply's bytes would change under it)."""
    (master, worker), fds = _both_ways()
    try:
        first = np.full(BIG // 8, 1.0)
        master[0].send(first)
        got = worker[1].recv()
        worker[0].send(got)
        del got
        worker[1].borrower.poll()   # given back: the reply naming it is still unread
        master[0].send(np.full(BIG // 8, 2.0))
        back = master[1].recv()
        assert (back == 1.0).all()
        second = worker[1].recv()
        assert (second == 2.0).all()
        worker[0].send(second)
        del second
        worker[1].borrower.poll()
        for k in range(3, 10):   # the first result kept: its segment is never reused
            master[0].send(np.full(BIG // 8, float(k)))
            assert master[1].recv()[0] == k - 1
            got = worker[1].recv()
            worker[0].send(got)
            del got
            worker[1].borrower.poll()
        assert (back == 1.0).all()
    finally:
        _close_both([master, worker], fds)


def test_a_reply_view_changed_after_it_was_signed_is_refused():
    from pymw_magic.errors import SignatureError
    (master, worker), fds = _both_ways()
    try:
        master[0].send(np.arange(BIG // 8, dtype=np.float64))
        got = worker[1].recv()
        worker[0].send(got)
        got[7] += 1   # in the master's segment, after the worker hashed it
        with pytest.raises(SignatureError):
            master[1].recv()
    finally:
        _close_both([master, worker], fds)
