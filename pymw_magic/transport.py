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
"""

from __future__ import annotations

import errno
import os
import select
import struct
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


_PLAIN, _BULK = 0, 1   # frame kinds: HMAC over every byte; Poly1305 for the buffers


def _parts(signer: Signer, obj: Any) -> tuple[bytes, bytes, list[memoryview], int, Any]:
    """Pickle ``obj`` into the frame's header, body and raw buffers, and
    start its MAC over the header."""
    body, buffers = dumps(obj)
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
    __slots__ = ("fd", "signer")

    def __init__(self, fd: int, signer: Signer):
        self.fd = fd
        self.signer = signer

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

    def send(self, obj: Any) -> int:
        """Pickle, sign and write ``obj``. Returns the bytes written."""
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
    __slots__ = ("fd", "signer", "_buf", "_pos", "_poller")

    def __init__(self, fd: int, signer: Signer):
        self.fd = fd
        self.signer = signer
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
        head = self._take(_HEAD.size)
        body_len, nbuf, kind = _HEAD.unpack(head)
        if nbuf > _MAX_BUFFERS or body_len > _MAX_PART:
            raise ConnectionLost("malformed frame header")  # before allocating what it claims
        lens_raw = self._take(_LEN.size * nbuf) if nbuf else b""
        lens = [_LEN.unpack_from(lens_raw, i * _LEN.size)[0] for i in range(nbuf)]
        if body_len > _MAX_PART or any(n > _MAX_PART for n in lens):
            raise ConnectionLost("malformed frame header")
        nonce = self._take(NONCE_SIZE) if kind == _BULK else None
        mac = _start_mac(self.signer, kind, head + lens_raw, nonce)
        body = self._take(body_len, mac)
        # Out-of-band buffers must be writable (NumPy arrays over them are).
        buffers = [bytearray(part) if isinstance(part, bytes) else part
                   for part in (self._take(n, mac, bulk=True) for n in lens)]
        self.signer.check(mac.digest(), self._take(MAC_SIZE))
        return _load_verified(body, buffers)
