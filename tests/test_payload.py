"""Signed frames: what a worker accepts, and what it refuses before
unpickling a byte."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from pymw_magic.errors import SignatureError
from pymw_magic.payload import Signer, new_key
from pymw_magic.transport import FrameReader, FrameWriter


class Tripwire:
    """Unpickling it creates ``path``: proof that a frame was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pipe_pair(send_key: bytes, recv_key: bytes):
    r, w = os.pipe()
    return FrameWriter(w, Signer(send_key)), FrameReader(r, Signer(recv_key)), (r, w)


def test_frame_round_trip_with_out_of_band_array():
    key = new_key()
    writer, reader, fds = pipe_pair(key, key)
    arr = np.arange(1_000_000, dtype=np.float64)
    import threading
    t = threading.Thread(target=writer.send, args=(("x", arr),))
    t.start()
    tag, got = reader.recv()
    t.join()
    assert tag == "x" and np.array_equal(got, arr)
    got[0] = 5.0  # arrays over received buffers are writable
    for fd in fds:
        os.close(fd)


def test_frame_signed_with_another_key_is_refused_unread(tmp_path):
    writer, reader, fds = pipe_pair(new_key(), new_key())
    trip = tmp_path / "unpickled"
    writer.send(Tripwire(trip))
    with pytest.raises(SignatureError, match="did not verify"):
        reader.recv()
    assert not trip.exists()
    for fd in fds:
        os.close(fd)


def test_tampered_frame_is_refused(tmp_path):
    key = new_key()
    r, w = os.pipe()
    r2, w2 = os.pipe()
    FrameWriter(w, Signer(key)).send(("run", 1, [1, 2, 3]))
    raw = bytearray(os.read(r, 65536))
    raw[20] ^= 0x01
    os.write(w2, bytes(raw))
    with pytest.raises(SignatureError):
        FrameReader(r2, Signer(key)).recv()
    for fd in (r, w, r2, w2):
        os.close(fd)


def test_real_worker_rejects_forged_frame_before_unpickling(tmp_path):
    key = new_key()
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    life_r, life_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pymw_magic.worker", "pipe", "--in", str(to_r), "--out", str(from_w),
         "--lifeline", str(life_r)],
        pass_fds=(to_r, from_w, life_r), stderr=subprocess.PIPE, text=True)
    for fd in (to_r, from_w, life_r):
        os.close(fd)
    try:
        os.write(to_w, key)
        hello = FrameReader(from_r, Signer(key)).recv()
        assert hello[0] == "ready" and hello[1] == proc.pid
        trip = tmp_path / "pwned"
        # A frame from someone who does not hold the key: would create a file if unpickled.
        FrameWriter(to_w, Signer(new_key())).send(("run", 1, [], [1], 1, [(Tripwire(trip),)], None))
        assert proc.wait(timeout=30) == 3
        assert "signature did not verify" in proc.stderr.read()
        assert not trip.exists()
    finally:
        proc.kill()
        proc.wait()
        for fd in (to_w, from_r, life_w):
            os.close(fd)


def test_large_array_round_trip_through_a_master(master):
    arr = np.random.default_rng(0).random(10 * 1024 * 1024 // 8)
    got = master.submit(np.negative, arr).result(timeout=60)
    assert np.array_equal(got, -arr)


# --- the bulk MAC: large buffers authenticated with Poly1305 under the frame's HMAC -----------

def _bulk_frame(key, payload):
    from pymw_magic.transport import encode_frame
    return bytearray(encode_frame(Signer(key), payload))


def test_large_frames_use_the_bulk_mac_and_round_trip():
    from pymw_magic.payload import BULK_THRESHOLD
    from pymw_magic.transport import _BULK, _HEAD, decode_frame
    key = new_key()
    arr = np.arange(BULK_THRESHOLD // 8 * 4, dtype=np.float64)
    frame = _bulk_frame(key, ("x", arr))
    assert _HEAD.unpack_from(frame, 0)[2] == _BULK
    tag, got = decode_frame(Signer(key), frame)
    assert tag == "x" and np.array_equal(got, arr)
    small = _bulk_frame(key, ("x", np.arange(10)))
    assert _HEAD.unpack_from(small, 0)[2] != _BULK


@pytest.mark.parametrize("where", ["buffer", "nonce", "kind"])
def test_tampered_bulk_frame_is_refused_before_unpickling(tmp_path, where):
    from pymw_magic.payload import BULK_THRESHOLD, NONCE_SIZE
    from pymw_magic.transport import _HEAD, _LEN, decode_frame
    key = new_key()
    trip = tmp_path / "unpickled"
    frame = _bulk_frame(key, (Tripwire(trip), np.zeros(BULK_THRESHOLD, dtype=np.uint8)))
    body_len, nbuf, _ = _HEAD.unpack_from(frame, 0)
    nonce_at = _HEAD.size + _LEN.size * nbuf
    if where == "buffer":
        frame[nonce_at + NONCE_SIZE + body_len + 1000] ^= 0x01   # one byte of the array
    elif where == "nonce":
        frame[nonce_at] ^= 0x01
    else:
        frame[_HEAD.size - 1] = 0                                # claim an all-HMAC frame
    with pytest.raises(Exception) as info:
        decode_frame(Signer(key), frame)
    assert "signature did not verify" in str(info.value) or "malformed" in str(info.value)
    assert not trip.exists()


def test_bulk_frame_through_a_pipe_with_a_flipped_buffer_byte_is_refused(tmp_path):
    from pymw_magic.payload import BULK_THRESHOLD
    key = new_key()
    trip = tmp_path / "unpickled"
    frame = _bulk_frame(key, (Tripwire(trip), np.ones(BULK_THRESHOLD * 2, dtype=np.uint8)))
    frame[-100] ^= 0x80   # inside the buffers, just before the MAC
    r, w = os.pipe()
    import threading
    t = threading.Thread(target=os.write, args=(w, bytes(frame)))
    t.start()
    with pytest.raises(SignatureError):
        FrameReader(r, Signer(key)).recv()
    t.join()
    assert not trip.exists()
    for fd in (r, w):
        os.close(fd)


def test_bulk_frame_without_cryptography_is_a_clear_error(monkeypatch):
    import pymw_magic.payload as payload
    from pymw_magic.transport import decode_frame
    key = new_key()
    frame = _bulk_frame(key, np.zeros(payload.BULK_THRESHOLD, dtype=np.uint8))
    monkeypatch.setattr(payload, "Poly1305", None)
    with pytest.raises(SignatureError, match="pip install cryptography"):
        decode_frame(Signer(key), frame)


def test_a_changed_captured_global_is_never_served_stale(master):
    """A notebook function reading a global that the notebook keeps
    rebinding: each submit must see the value of that moment, even when
    CPython hands the new int the address of the old one."""
    ns = {"__name__": "__main__"}
    exec("def keep(x):\n    return x > threshold\n", ns)
    ns["threshold"] = 1000
    wrong = []
    for step in range(30):
        ns["threshold"] += 100
        ns["threshold"] += 100          # frees the int of the line above: its id is reused
        got = master.submit(ns["keep"], 1500).result(timeout=30)
        if got != (1500 > ns["threshold"]):
            wrong.append(step)
    assert wrong == []


def test_an_unchanged_function_is_pickled_once(master):
    from pymw_magic.payload import FunctionCache
    ns = {"__name__": "__main__", "k": 3}
    exec("def times(x):\n    return x * k\n", ns)
    cache = FunctionCache()
    first = cache.get(ns["times"])
    assert cache.get(ns["times"]) is first          # same identities: the cached pickle
    ns["k"] = 4
    assert cache.get(ns["times"]) is not first      # a new value: pickled afresh


def test_remote_traceback_of_a_main_function_shows_its_file_and_lines(master):
    import linecache
    filename = "/tmp/ipykernel_0/cell-that-raises.py"   # as IPython names a notebook cell
    text = "def boom(x):\n    y = x + 1\n    raise ValueError(f'bad {y}')\n"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    ns = {"__name__": "__main__"}
    exec(compile(text, filename, "exec"), ns)
    with pytest.raises(ValueError, match="bad 3") as info:
        master.submit(ns["boom"], 2).result(timeout=30)
    remote = str(info.value.__cause__)
    assert f'File "{filename}", line 3, in boom' in remote
    assert "raise ValueError(f'bad {y}')" in remote
