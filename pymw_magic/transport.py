"""Signed frames over a pair of file descriptors (pipes), or as whole
messages (MPI).

The local backend and the worker runtime talk through this and nothing
else.  One frame is::

    u64 body_len | u32 nbuf | u8 kind | u64 buf_len * nbuf | [nonce] | body | buffers... | MAC

where ``body`` is a protocol-5 pickle, ``buffers`` its out-of-band buffers
(raw array bytes, never copied into the pickle) and ``MAC`` an HMAC-SHA256
over everything before it.  ``kind`` 1 marks a frame with at least
:data:`~pymw_magic.payload.BULK_THRESHOLD` bytes of buffers: a 16-byte
nonce follows the lengths and the buffers are authenticated with Poly1305
under a one-time key, whose tag the HMAC covers (see
:class:`~pymw_magic.payload.Signer`) — every byte is still authenticated,
four times faster.  The MAC is a trailer so that a large frame is hashed
while it streams: the sender hashes block *k+1* while the receiver reads
and hashes block *k*.  The receiver verifies the MAC before it unpickles a
single byte.

Kind 2 (a channel given a :class:`Lender` and a :class:`Borrower`: the
local backend's) carries large buffers in shared memory instead of the
pipe: the frame on the pipe is ``u64 body_len | u32 nbuf | u8 2 | lens |
nonce | u32 segment | u64 ready * k | body | MAC``, the buffers lie at
64-byte aligned offsets in a segment of the sender's, and the MAC covers
them exactly as for kind 1 (the receiver hashes the bytes it is about to
read, in the segment).  The sender copies and hashes the buffers in steps
and after each says on the pipe how many bytes are ready (``ready``, the
last one equal to their total): the receiver hashes step *k* while the
sender copies and hashes step *k+1*, so the two passes over the bytes
overlap instead of adding up.  ``ready`` is a hint, not signed: a false
one makes the MAC fail.

Segments are ``memfd`` files: they have no name (nothing in ``/dev/shm``
can be left behind, whoever dies).  A segment's descriptor goes to the
peer over a Unix socket beside the pipe the first time it is lent; the
peer maps it once and keeps the mapping for the frames that reuse the
segment (a mapping costs about as much as a copy), until the sender
drops the segment (a notice on the same socket) or the channel closes;
the kernel frees a segment when the last process mapping it lets go.
The sender reuses a segment once the receiver gave it back: when no
object viewing it there (an array argument, a result) is left.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import select
import socket
import struct
import sys
import threading
from typing import Any

from .payload import BULK_THRESHOLD, MAC_SIZE, NONCE_SIZE, Poly1305, Signer, dumps, loads

_HEAD = struct.Struct("<QIB")
_LEN = struct.Struct("<Q")
_SMALL = 256 * 1024          # below this a frame is written with one syscall
_READ = 64 * 1024            # one read; larger ones cross glibc's mmap threshold
                             # and cost ~25 us each in map/unmap
_BLOCK = 1024 * 1024         # streaming granularity for large buffers
_MAX_PART = 1 << 40          # refuse absurd lengths before allocating
_MAX_BUFFERS = 1 << 20       # out-of-band buffers in one frame, at most
_SEG = struct.Struct("<I")   # a segment's id
_ALIGN = 64                  # buffers start at this alignment in a segment (SIMD loads)
_STEP = 1024 * 1024          # a shared-memory frame's bytes are copied, hashed and announced
                             # in steps of this (the receiver hashes one while the next is copied)
_DROP = 1 << 31              # a segment id with this bit: the lender dropped that segment
#: frames whose out-of-band buffers reach this size go through shared memory
#: when the channel has it (below it the pipe is as fast: no mapping to set up)
SHM_THRESHOLD = 1 << 20


class ConnectionLost(Exception):
    """The other end closed its pipe (it exited, was killed, or crashed)."""


class UndecodableFrame(Exception):
    """A frame whose signature verified but whose pickle would not load here
    (a class or module this process cannot import).  The channel is still in
    step: only that message is lost, and its tasks fail with a clear error."""


def _load_verified(body: Any, buffers: Any) -> Any:
    try:
        return loads(body, buffers)
    except Exception as exc:
        raise UndecodableFrame(f"{type(exc).__name__}: {exc}") from exc


def enlarge_pipe(fd: int, size: int = 1 << 20) -> None:
    """Fewer context switches per megabyte: ask for a 1 MiB pipe buffer."""
    try:
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ImportError):
        pass


_PLAIN, _BULK, _SHM = 0, 1, 2   # frame kinds: HMAC over every byte; Poly1305 for the
                                # buffers; Poly1305 for buffers in shared memory


def _layout(lens: list[int]) -> tuple[list[int], int]:
    """Offsets of buffers of ``lens`` bytes in a segment, and the bytes used."""
    offsets, pos = [], 0
    for n in lens:
        offsets.append(pos)
        pos += (n + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, pos


class Lender:
    """The sending side's shared-memory segments (memfd files), lent to the
    peer one frame at a time and reused once it gives them back.

    ``sock`` is this side's end of a Unix SOCK_SEQPACKET pair: a segment's
    descriptor goes out on it the first time the segment is lent (the peer
    keeps it mapped), a notice when we drop one, and the peer's
    :class:`Borrower` sends back the ids of segments it no longer uses.
    Only the thread that writes the channel uses a lender.
    """

    #: free segments kept for reuse; more are closed
    KEEP_FREE = 4
    #: segment bytes at most (lent or free); beyond it frames use the pipe
    MAX_BYTES = 4 << 30

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._segs: dict[int, tuple[int, mmap.mmap]] = {}   # id -> (fd, our mapping)
        self._free: list[int] = []
        self._told: set[int] = set()   # segments whose descriptor the peer has
        self._next = 0
        self._bytes = 0
        self.closed = False

    @property
    def segments(self) -> int:
        """Segments held (lent or free)."""
        return len(self._segs)

    def _collect(self) -> None:
        """Take the ids the peer gave back (without waiting)."""
        while True:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            for (seg,) in _SEG.iter_unpack(data[: len(data) // _SEG.size * _SEG.size]):
                if seg in self._segs and seg not in self._free:
                    self._free.append(seg)

    def take(self, need: int) -> tuple[int, int | None, mmap.mmap] | None:
        """A segment of at least ``need`` bytes: (id, its descriptor if the
        peer does not have it yet — send it with the frame —, our mapping),
        or None when the channel should use the pipe instead."""
        if self.closed:
            return None
        self._collect()
        best = None
        for seg in self._free:
            size = len(self._segs[seg][1])
            if need <= size <= 4 * need and (best is None or size < len(self._segs[best][1])):
                best = seg
        if best is None:
            size = max(need, 1) + (1 << 20) - 1 & ~((1 << 20) - 1)
            if self._bytes + size > self.MAX_BYTES:
                return None
            self._trim(0)
            fd = os.memfd_create("pymw-buffers", getattr(os, "MFD_CLOEXEC", 1))
            try:
                os.ftruncate(fd, size)
                mm = mmap.mmap(fd, size)
            except OSError:
                os.close(fd)
                return None
            self._next += 1
            best = self._next
            self._segs[best] = (fd, mm)
            self._bytes += size
        else:
            self._free.remove(best)
        self._trim(self.KEEP_FREE)
        fd, mm = self._segs[best]
        if best in self._told:
            return best, None, mm
        self._told.add(best)
        return best, fd, mm

    def _trim(self, keep: int) -> None:
        """Close free segments beyond ``keep`` (oldest first)."""
        while len(self._free) > keep:
            seg = self._free[0]
            if not self._drop(seg):
                return   # (the peer's socket is full: later)
            self._free.remove(seg)

    def _drop(self, seg: int, tell: bool = True) -> bool:
        if tell and seg in self._told:
            # The peer keeps its mapping until told: the memory is freed
            # only once both let go.
            try:
                self.sock.send(_SEG.pack(seg | _DROP), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                pass   # the peer is gone, and its mappings with it
        self._told.discard(seg)
        fd, mm = self._segs.pop(seg)
        self._bytes -= len(mm)
        try:
            mm.close()
        except BufferError:  # (a view of ours still open: the GC unmaps it later)
            pass
        os.close(fd)
        return True

    def close(self) -> None:
        """Let go of every segment: the kernel frees each once the peer
        has unmapped it too (at once, if it is gone)."""
        self.closed = True
        self._free.clear()
        for seg in list(self._segs):
            self._drop(seg, tell=False)


class Borrower:
    """The receiving side: maps each of the peer's segments once (its
    descriptor arrives on ``sock`` before the first frame that uses it),
    keeps the mapping for the frames that reuse it, and gives a segment
    back to the peer's :class:`Lender` once nothing here views it.

    A segment's views (the arrays unpickled over it, their slices) hold
    references to its mapping; :meth:`poll` — at the start of each read,
    and before each write on the channel — gives back the segments whose
    mapping nothing but this object references any more.
    """

    #: seconds a descriptor may lag behind its frame (it is sent first)
    WAIT = 10.0

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._maps: dict[int, mmap.mmap] = {}   # the peer's segments, mapped here
        self._lent: set[int] = set()            # segments some frame here may still view
        self._pending: list[int] = []   # given back, not yet sent (the socket was full)
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        self._base = -1   # references to a mapping when nothing views it
        self.closed = False

    @property
    def mapped(self) -> int:
        """The peer's segments mapped here."""
        return len(self._maps)

    def map(self, seg: int, need: int) -> mmap.mmap:
        """The peer's segment ``seg``, mapped here (at least ``need``
        bytes), marked lent until :meth:`poll` finds nothing viewing it."""
        with self._lock:
            mm = self._maps.get(seg)
            while mm is None:
                if self.closed:
                    raise ConnectionLost("the segment channel is closed")
                if not self._poller.poll(int(self.WAIT * 1000)):
                    raise ConnectionLost("a shared-memory frame arrived without its segment")
                self._take_message(block=True)
                mm = self._maps.get(seg)
            if need > len(mm):
                raise ConnectionLost("a frame names more bytes than its segment holds")
            self._lent.add(seg)
            return mm

    def _take_message(self, block: bool) -> bool:
        """Read one message from the lender: a new segment (its descriptor)
        or a dropped one.  False when there was none waiting."""
        try:
            msg, fds = _recv_fds(self.sock, 0 if block else socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if not block:
                return False
            raise ConnectionLost(f"the segment channel failed: {exc}") from exc
        try:
            if len(msg) != _SEG.size:
                if block:
                    raise ConnectionLost("the segment channel closed" if not msg else
                                         "the segment channel is out of step with the frames")
                return False
            (seg,) = _SEG.unpack(msg)
            if seg & _DROP:
                self._forget(seg & ~_DROP)
                return True
            if not fds or seg in self._maps:
                raise ConnectionLost("the segment channel is out of step with the frames")
            fd = fds.pop(0)
            try:
                size = os.fstat(fd).st_size
                # One mapping for the segment's life here: populated now,
                # not page by page on each frame's first touch.
                self._maps[seg] = mmap.mmap(fd, max(size, 1),
                                            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            except OSError as exc:
                raise ConnectionLost(f"could not map a shared-memory segment: {exc}") from exc
            finally:
                os.close(fd)
            if self._base < 0:
                self._base = self._refs(seg)
            return True
        finally:
            for extra in fds:
                os.close(extra)

    def _refs(self, seg: int) -> int:
        return sys.getrefcount(self._maps[seg])

    def _forget(self, seg: int) -> None:
        mm = self._maps.pop(seg, None)
        self._lent.discard(seg)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # (still viewed: unmapped when the last view goes)
                pass

    def poll(self) -> None:
        """Take the lender's notices, and give back every segment nothing
        here views any more (without waiting)."""
        if not self._maps:
            return   # (nothing mapped, nothing to give back; a notice can wait for map())
        with self._lock:
            if self.closed:
                return
            while self._poller.poll(0) and self._take_message(block=False):
                pass
            for seg in [s for s in self._lent if s in self._maps and self._refs(s) <= self._base]:
                self._lent.discard(seg)
                self._pending.append(seg)
            self._lent.intersection_update(self._maps)
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(_SEG.pack(s) for s in self._pending)
        try:
            self.sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return   # sent with the next one
        except OSError:
            pass     # the peer is gone: nothing to give back to
        self._pending.clear()

    def close(self) -> None:
        """Unmap the peer's segments (those still viewed stay mapped until
        their last view goes: a result the notebook keeps stays valid)."""
        with self._lock:
            self.closed = True
            for seg in list(self._maps):
                self._forget(seg)


def _recv_fds(sock: socket.socket, flags: int) -> tuple[bytes, list[int]]:
    """One message and the descriptors it carries (``socket.recv_fds``
    ignores its flags before Python 3.12)."""
    fds = array.array("i")
    msg, ancdata, _, _ = sock.recvmsg(_SEG.size, socket.CMSG_SPACE(4 * fds.itemsize), flags)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """The two ends of one direction's segment channel."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _parts(signer: Signer, obj: Any, pickled: tuple | None = None
           ) -> tuple[bytes, bytes, list[memoryview], int, Any]:
    """Pickle ``obj`` (unless ``pickled`` is its (body, buffers) already)
    into the frame's header, body and raw buffers, and start its MAC over
    the header."""
    body, buffers = dumps(obj) if pickled is None else pickled
    raws = [b.raw() for b in buffers]
    bulk = sum(r.nbytes for r in raws)
    lens = b"".join(_LEN.pack(r.nbytes) for r in raws)
    if bulk >= BULK_THRESHOLD and Poly1305 is not None:
        nonce = os.urandom(NONCE_SIZE)
        head = _HEAD.pack(len(body), len(raws), _BULK) + lens
        mac = signer.new_bulk(nonce)
        mac.update(head)
        head += nonce
    else:
        head = _HEAD.pack(len(body), len(raws), _PLAIN) + lens
        mac = signer.new()
        mac.update(head)
    total = len(head) + len(body) + bulk + MAC_SIZE
    return head, body, raws, total, mac


def _start_mac(signer: Signer, kind: int, head: bytes | memoryview, nonce: Any) -> Any:
    """The receiver's MAC for a frame of ``kind``, fed its header."""
    if kind == _BULK:
        mac = signer.new_bulk(bytes(nonce))
    elif kind == _PLAIN:
        mac = signer.new()
    else:
        raise ConnectionLost(f"malformed frame header (kind {kind})")
    mac.update(head)
    return mac


def encode_frame(signer: Signer, obj: Any) -> bytearray:
    """One whole frame in memory, for transports that move messages rather
    than streams (MPI)."""
    head, body, raws, total, mac = _parts(signer, obj)
    frame = bytearray(total)
    view = memoryview(frame)
    view[:len(head)] = head
    pos = len(head)
    view[pos:pos + len(body)] = body
    mac.update(body)
    pos += len(body)
    for r in raws:
        view[pos:pos + r.nbytes] = r
        mac.update_bulk(r)
        pos += r.nbytes
    view[pos:] = mac.digest()
    return frame


def decode_frame(signer: Signer, frame: bytes | bytearray | memoryview) -> Any:
    """Verify a whole in-memory frame, then unpickle it; out-of-band buffers
    are views into ``frame`` (no copy)."""
    view = memoryview(frame)
    if view.nbytes < _HEAD.size + MAC_SIZE:
        raise ConnectionLost("truncated frame")
    body_len, nbuf, kind = _HEAD.unpack_from(view, 0)
    pos = _HEAD.size + _LEN.size * nbuf
    if pos + MAC_SIZE > view.nbytes:
        raise ConnectionLost("malformed frame header")
    lens = [_LEN.unpack_from(view, _HEAD.size + i * _LEN.size)[0] for i in range(nbuf)]
    if kind == _BULK and pos + NONCE_SIZE + MAC_SIZE > view.nbytes:
        raise ConnectionLost("truncated frame")
    nonce = view[pos:pos + NONCE_SIZE] if kind == _BULK else None
    mac = _start_mac(signer, kind, view[:pos], nonce)
    if nonce is not None:
        pos += NONCE_SIZE
    end = view.nbytes - MAC_SIZE
    if pos + body_len + sum(lens) != end:
        raise ConnectionLost("malformed frame header")
    mac.update(view[pos:pos + body_len])
    mac.update_bulk(view[pos + body_len:end])
    signer.check(mac.digest(), view[end:])
    body = view[pos:pos + body_len]
    pos += body_len
    buffers = []
    for n in lens:
        buffers.append(view[pos:pos + n])
        pos += n
    return _load_verified(body, buffers)


class FrameWriter:
    __slots__ = ("fd", "signer", "lender")

    def __init__(self, fd: int, signer: Signer, lender: Lender | None = None):
        self.fd = fd
        self.signer = signer
        self.lender = lender

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BrokenPipeError as exc:
                raise ConnectionLost("the receiving process is gone") from exc
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise ConnectionLost("the channel is closed") from exc
                raise
            view = view[n:]

    def _send_shared(self, body: bytes, raws: list[memoryview]) -> int:
        """Write a kind-2 frame: buffers in a lent segment, the rest on the
        pipe.  0 when no segment could be had (the caller uses the pipe)."""
        lens = [r.nbytes for r in raws]
        offsets, need = _layout(lens)
        got = self.lender.take(need)   # type: ignore[union-attr]
        if got is None:
            return 0
        seg, fd, mm = got
        nonce = os.urandom(NONCE_SIZE)
        head = _HEAD.pack(len(body), len(raws), _SHM) + b"".join(_LEN.pack(n) for n in lens)
        tail = _SEG.pack(seg)
        mac = self.signer.new_bulk(nonce)
        mac.update(head)
        mac.update(tail)
        if fd is not None:   # (the first frame in this segment: the peer maps it once)
            try:
                socket.send_fds(self.lender.sock, [tail], [fd])   # type: ignore[union-attr]
            except OSError as exc:
                raise ConnectionLost(f"the segment channel failed: {exc}") from exc
        # The header first: the receiver finds its mapping while we copy.
        self._write_all(b"".join([head, nonce, tail]))
        total = sum(lens)
        done = announced = 0
        view = memoryview(mm)
        try:
            for raw, off, n in zip(raws, offsets, lens):
                for start in range(0, n, _STEP):
                    end = min(n, start + _STEP)
                    part = view[off + start:off + end]
                    part[:] = raw[start:end]
                    mac.update_bulk(part)   # the bytes the receiver will read, still in cache
                    part.release()
                    done += end - start
                    if done - announced >= _STEP or done == total:
                        self._write_all(_LEN.pack(done))
                        announced = done
        finally:
            view.release()
        mac.update(body)
        self._write_all(body + mac.digest())
        return len(head) + NONCE_SIZE + len(tail) + 8 * ((total + _STEP - 1) // _STEP) + len(body) + MAC_SIZE + need

    def send(self, obj: Any) -> int:
        """Pickle, sign and write ``obj``. Returns the bytes written."""
        lender = self.lender
        if lender is not None:
            body, buffers = dumps(obj)
            if buffers:
                raws = [b.raw() for b in buffers]
                if sum(r.nbytes for r in raws) >= SHM_THRESHOLD and Poly1305 is not None:
                    sent = self._send_shared(body, raws)
                    if sent:
                        return sent
            head, body, raws, total, mac = _parts(self.signer, None, (body, buffers))
        else:
            head, body, raws, total, mac = _parts(self.signer, obj)
        mac.update(body)
        if total <= _SMALL:
            for r in raws:
                mac.update_bulk(r)
            self._write_all(b"".join([head, body, *raws, mac.digest()]))
            return total
        self._write_all(head + body)
        for r in raws:
            for start in range(0, r.nbytes, _BLOCK):
                block = r[start:start + _BLOCK]
                mac.update_bulk(block)
                self._write_all(block)
        self._write_all(mac.digest())
        return total


class FrameReader:
    __slots__ = ("fd", "signer", "_buf", "_pos", "_poller", "borrower")

    def __init__(self, fd: int, signer: Signer, borrower: Borrower | None = None):
        self.fd = fd
        self.signer = signer
        self.borrower = borrower
        self._buf = b""
        self._pos = 0
        self._poller = select.poll()  # one per reader: a round trip is tens of microseconds
        self._poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def readable(self, timeout: float | None) -> bool:
        """Wait until a frame has begun to arrive (or EOF); False on timeout."""
        if self._pos < len(self._buf):
            return True
        poller = self._poller
        ms = None if timeout is None else max(0, int(timeout * 1000))
        while True:
            try:
                return bool(poller.poll(ms))
            except InterruptedError:  # pragma: no cover - PEP 475 retries already
                continue

    def _fill(self) -> None:
        try:
            chunk = os.read(self.fd, _READ)
        except OSError as exc:
            raise ConnectionLost(f"read failed: {exc}") from exc
        if not chunk:
            raise ConnectionLost("the sending process closed the channel")
        rest = self._buf[self._pos:]
        self._buf = rest + chunk if rest else chunk
        self._pos = 0

    def _take(self, n: int, mac: Any = None, bulk: bool = False) -> bytes | bytearray:
        """The next ``n`` bytes. Small reads come from the buffer; a large
        part is read straight into its own bytearray (no quadratic joins)."""
        if n <= _SMALL:
            while len(self._buf) - self._pos < n:
                self._fill()
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            if mac is not None:
                (mac.update_bulk if bulk else mac.update)(out)
            return out
        target = bytearray(n)
        view = memoryview(target)
        update = None if mac is None else (mac.update_bulk if bulk else mac.update)
        have = min(len(self._buf) - self._pos, n)
        if have:
            view[:have] = self._buf[self._pos:self._pos + have]
            self._pos += have
            if update is not None:
                update(view[:have])
        done = have
        while done < n:
            try:
                got = os.readv(self.fd, [view[done:done + _BLOCK]])
            except OSError as exc:
                raise ConnectionLost(f"read failed: {exc}") from exc
            if got == 0:
                raise ConnectionLost("the sending process closed the channel mid-frame")
            if update is not None:
                update(view[done:done + got])
            done += got
        return target

    def recv(self) -> Any:
        """Read one frame, verify its MAC, then unpickle it."""
        if self.borrower is not None:
            self.borrower.poll()   # (what the last frames' objects no longer view goes back)
        head = self._take(_HEAD.size)
        body_len, nbuf, kind = _HEAD.unpack(head)
        if nbuf > _MAX_BUFFERS or body_len > _MAX_PART:
            raise ConnectionLost("malformed frame header")  # before allocating what it claims
        lens_raw = self._take(_LEN.size * nbuf) if nbuf else b""
        lens = [_LEN.unpack_from(lens_raw, i * _LEN.size)[0] for i in range(nbuf)]
        if body_len > _MAX_PART or any(n > _MAX_PART for n in lens):
            raise ConnectionLost("malformed frame header")
        if kind == _SHM:
            return self._recv_shared(head + lens_raw, body_len, lens)
        nonce = self._take(NONCE_SIZE) if kind == _BULK else None
        mac = _start_mac(self.signer, kind, head + lens_raw, nonce)
        body = self._take(body_len, mac)
        # Out-of-band buffers must be writable (NumPy arrays over them are).
        buffers = [bytearray(part) if isinstance(part, bytes) else part
                   for part in (self._take(n, mac, bulk=True) for n in lens)]
        self.signer.check(mac.digest(), self._take(MAC_SIZE))
        return _load_verified(body, buffers)

    def _recv_shared(self, head: bytes, body_len: int, lens: list[int]) -> Any:
        """The rest of a kind-2 frame: hash the buffers in the segment step
        by step as the sender announces them, verify, then unpickle over
        views of the segment (no copy)."""
        borrower = self.borrower
        if borrower is None:
            raise ConnectionLost("a shared-memory frame on a channel without shared memory")
        nonce = self._take(NONCE_SIZE)
        tail = self._take(_SEG.size)
        mac = self.signer.new_bulk(bytes(nonce))
        mac.update(head)
        mac.update(tail)
        offsets, need = _layout(lens)
        total = sum(lens)
        mm = borrower.map(_SEG.unpack(tail)[0], need)
        view = memoryview(mm)
        del mm   # (the views alone hold the mapping: given back when they go)
        buffers = None
        try:
            done = index = inside = 0   # bytes hashed; the buffer and offset in it they reach
            while done < total:
                (ready,) = _LEN.unpack(self._take(_LEN.size))
                if not done < ready <= total:
                    raise ConnectionLost("malformed shared-memory frame")
                while done < ready:
                    n = lens[index]
                    step = min(n - inside, ready - done)
                    if step:
                        start = offsets[index] + inside
                        mac.update_bulk(view[start:start + step])
                        inside += step
                        done += step
                    if inside == n:
                        index += 1
                        inside = 0
            body = self._take(body_len, mac)
            self.signer.check(mac.digest(), self._take(MAC_SIZE))
            buffers = [view[off:off + n] for off, n in zip(offsets, lens)]
        finally:
            view.release()
            if buffers is None:
                borrower.poll()   # (nothing views it: back at once)
        return _load_verified(body, buffers)
