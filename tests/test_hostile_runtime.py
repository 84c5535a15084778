"""A hostile execute node, volunteer or job directory against the batch
runtime: the job directory (jobdir), the one-shot worker (oneshot), the
safe codec and the Ed25519 verifier.  Each test here failed before its
fix, except the guard that empty arrays of zero-size items still round-trip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import wait_until
from pymw_magic import codec, ed25519, oneshot
from pymw_magic.jobdir import JobDir, OutputCorrupt

NESTED = b"[" * 200_000


def _identity(x):
    return x


def _job(tmp_path: Path, name: str = "j", fn=_identity, tasks=((0, (1,), {}),), **kw) -> JobDir:
    jd = JobDir.create(tmp_path / "jobs", name, **kw)
    jd.write_function(fn)
    jd.write_chunk(0, list(tasks))
    return jd


def _sandbox(jd: JobDir, tmp_path: Path, index: int = 0) -> tuple[Path, list[str]]:
    """A node's sandbox with the chunk's inputs, and the command it runs."""
    inv = jd.invocation(index, sys.executable)
    box = tmp_path / f"sandbox-{jd.name}-{index}"
    box.mkdir()
    for path in inv.inputs:
        shutil.copy(path, box / path.name)
    return box, [inv.executable, *inv.arguments]


# --- headers nested to the JSON parser's limit ----------------------------------------------

def test_deeply_nested_output_header_is_output_corrupt(tmp_path):
    jd = _job(tmp_path)
    jd.output_path(0).write_bytes(oneshot.MAGIC + NESTED + b"\n" + b"x" * 64)
    with pytest.raises(OutputCorrupt) as info:
        jd.read_output(0)
    assert info.value.reason == "not a pymw-magic file"
    assert str(jd.output_path(0)) in str(info.value)
    assert oneshot.peek_header(oneshot.MAGIC + NESTED + b"\n") == {}


def test_node_answers_a_deeply_nested_input_with_a_signed_refusal(tmp_path):
    jd = _job(tmp_path, tasks=[(0, (1,), {}), (1, (2,), {})])
    box, cmd = _sandbox(jd, tmp_path)
    (box / "0.in").write_bytes(oneshot.MAGIC + NESTED + b"\n")
    done = subprocess.run(cmd, cwd=box, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.copy(box / "0.out", jd.output_path(0))
    out = jd.read_output(0)  # (before: signed sha256 only, so the master could not even read why)
    assert out.error is not None and "refused: signature" in out.error[2]
    assert [(o.seq, o.ok) for o in out.outcomes] == [(0, False), (1, False)]


# --- output files that are not regular files ------------------------------------------------

def test_output_fifo_is_refused_not_waited_on(tmp_path):
    jd = _job(tmp_path)
    fifo = jd.output_path(0)
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def read() -> None:
        try:
            jd.read_output(0)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            result.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # (the old code blocks in open(): a writer lets it go)
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(timeout=20)
        pytest.fail("read_output() blocked on a FIFO standing where the output should be")
    assert isinstance(result[0], OutputCorrupt) and result[0].reason == "not a regular file"


def test_output_linked_to_a_device_is_refused_within_the_cap(tmp_path):
    # In a child with its address space capped: the old code read /dev/zero until memory ran out.
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from pathlib import Path
from pymw_magic.jobdir import JobDir, OutputCorrupt
from pymw_magic.ed25519 import SigningKey
jd = JobDir.create(Path({str(tmp_path)!r}) / "jobs", "dev", scheme="ed25519", codec="safe",
                   signer=SigningKey.generate())
jd.write_function(len)
jd.write_chunk(0, [(0, ("ab",), {{}})])
jd.output_path(0).symlink_to("/dev/zero")
try:
    jd.read_output(0)
except OutputCorrupt as exc:
    print("REASON", exc.reason)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert "REASON not a regular file" in done.stdout, (done.stdout, done.stderr[-2000:])


# --- the safe codec ---------------------------------------------------------------------------

def test_codec_array_tag_spelled_with_escapes_never_leaks_an_internal_object():
    with pytest.raises(codec.CodecError):
        codec.decode(codec.MAGIC + b'{"v":{"\\u0024a":0},"a":[]}\n')
    np = pytest.importorskip("numpy")
    data = codec.encode([np.arange(3)])
    escaped = data.replace(b'"$a"', b'"\\u0024\\u0061"', 1)
    assert escaped != data
    value = codec.decode(escaped)
    assert type(value) is list and type(value[0]) is np.ndarray and value[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("shape", [(-2, -1), (-1, -2)])
def test_codec_npy_with_negative_dimensions_is_a_codec_error(shape):
    np = pytest.importorskip("numpy")
    data = codec.encode(np.zeros(2, dtype="<f8"))
    old = b"'shape': (2,), }"
    text = ("'shape': " + repr(shape) + ", }").encode()
    pad = len(text) - len(old)
    bad = data.replace(old + b" " * pad, text, 1)  # (the header's padding keeps its length)
    assert bad != data and len(bad) == len(data)
    with pytest.raises(codec.CodecError):
        codec.decode(bad)


# --- Ed25519 ----------------------------------------------------------------------------------

def _torsion_encodings() -> list[bytes]:
    """The canonical encodings of the 8 points of small order: [L]Q for
    points Q of the whole curve (of order 8L) falls in the torsion group."""
    found = set()
    y = 2
    while len(found) < 8 and y < 10_000:
        for sign in (0, 1):
            q = ed25519._decode((y | (sign << 255)).to_bytes(32, "little"))
            if q is not None:
                found.add(ed25519._encode(ed25519._mul(ed25519.L, q)))
        y += 1
    return sorted(found)


def test_ed25519_public_keys_of_small_order_are_refused():
    keys = _torsion_encodings()
    assert len(keys) == 8
    s = 12345
    r = ed25519._encode(ed25519._base_mul(s))
    forged = r + s.to_bytes(32, "little")  # (a "signature" under the identity, of any message)
    for key in keys:
        assert ed25519.verify(key, b"any message at all", forged) is False, key.hex()
    # an ordinary key still verifies
    sk = ed25519.SigningKey.generate()
    assert ed25519.verify(sk.public_bytes, b"m", sk.sign(b"m"))


def test_an_ed25519_job_refuses_an_input_under_the_identity_key(tmp_path):
    sk = ed25519.SigningKey.generate()
    jd = _job(tmp_path, "ed", scheme="ed25519", codec="safe", signer=sk)
    box, cmd = _sandbox(jd, tmp_path)
    # A swapped key file (the identity) and input + function "signed" without any private key.
    identity = (1).to_bytes(32, "little")
    (box / "key").write_bytes(oneshot.key_file_bytes("ed25519", identity))

    class Forger:
        def sign(self, data: bytes) -> bytes:
            s = 777
            return ed25519._encode(ed25519._base_mul(s)) + s.to_bytes(32, "little")

    marker = tmp_path / "ran"
    import cloudpickle
    fn_body = cloudpickle.dumps(lambda x: Path(str(marker)).write_text("ran"))
    import hashlib
    head = {"kind": "function", "job": jd.job_id, "codec": "safe", "python": oneshot.PYTHON, "name": "f"}
    (box / "function.bin").write_bytes(oneshot.seal(head, fn_body, "ed25519", Forger()))
    body = cloudpickle.dumps([(0, (1,), None)])
    head = {"kind": "input", "job": jd.job_id, "codec": "safe", "python": oneshot.PYTHON, "index": 0,
            "seqs": [0], "function": hashlib.sha256(fn_body).hexdigest()}
    (box / "0.in").write_bytes(oneshot.seal(head, body, "ed25519", Forger()))
    done = subprocess.run(cmd, cwd=box, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not marker.exists()
    shutil.copy(box / "0.out", jd.output_path(0))
    out = jd.read_output(0)
    assert out.error is not None and "refused: signature" in out.error[2]


# --- a task that takes SIGTERM over -----------------------------------------------------------

@pytest.mark.parametrize("how", ["ignore", "block"])
def test_a_task_that_ignores_sigterm_does_not_keep_an_evicted_run_going(tmp_path, how):
    # (nested: pickled by value, the node has no tests module)
    def _ignore_term_then_wait(x):
        import os
        import signal
        import time
        if x == 0:
            if how == "ignore":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            else:
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            return 0
        open(os.environ["PYMW_TEST_MARK"], "w").close()
        time.sleep(300)
        return x

    jd = _job(tmp_path, "term", fn=_ignore_term_then_wait, tasks=[(0, (0,), {}), (1, (1,), {})])
    box, cmd = _sandbox(jd, tmp_path)
    mark = tmp_path / "started"
    proc = subprocess.Popen(cmd, cwd=box, env=dict(os.environ, PYMW_TEST_MARK=str(mark)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(mark.exists, timeout=60, what="the second task to start")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM was ignored for the rest of the chunk: a task had set SIG_IGN")
        assert code == 128 + signal.SIGTERM
        assert not (box / "0.out").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


# --- times a node reports -----------------------------------------------------------------

def test_non_finite_times_from_a_node_are_not_taken(tmp_path):
    jd = _job(tmp_path, tasks=[(0, (1,), {}), (1, (2,), {})])
    scheme, key = oneshot.parse_key((jd.path / "key").read_bytes())
    meta = {"outcomes": [[0, None, float("nan"), float("inf"), "", "", None, "E", "m", ""],
                         [1, None, -float("inf"), "1e999", "", "", None, "E", "m", ""]],
            "blobs": [], "error": None}
    body = json.dumps(meta).encode() + b"\n"  # (Python's json writes NaN and Infinity)
    head = {"kind": "output", "codec": "pickle", "job": jd.job_id, "index": 0, "host": "h",
            "python": oneshot.PYTHON, "started": float("nan"), "ended": float("-inf")}
    jd.output_path(0).write_bytes(oneshot.seal(head, body, scheme, key))
    out = jd.read_output(0)
    import math
    times = [out.started, out.ended] + [t for o in out.outcomes for t in (o.start, o.end)]
    assert all(math.isfinite(t) for t in times), times


# --- a task that ends its process -------------------------------------------------------------

def test_a_task_calling_os_exit_fails_alone_and_the_chunk_keeps_its_results(tmp_path):
    def task(x):
        import multiprocessing
        import os
        if x == 1:
            os._exit(3)
        if x == 2:  # (a fork's child still ends with os._exit as multiprocessing needs)
            ctx = multiprocessing.get_context("fork")
            p = ctx.Process(target=abs, args=(-1,))
            p.start()
            p.join(60)
            return p.exitcode
        return x

    jd = _job(tmp_path, "exit", fn=task, tasks=[(0, (0,), {}), (1, (1,), {}), (2, (2,), {})])
    box, cmd = _sandbox(jd, tmp_path)
    done = subprocess.run(cmd, cwd=box, capture_output=True, timeout=120)
    assert (box / "0.out").exists(), (done.returncode, done.stderr[-2000:])
    assert done.returncode == 0
    shutil.copy(box / "0.out", jd.output_path(0))
    out = {o.seq: o for o in jd.read_output(0).outcomes}
    assert (out[0].ok, out[0].value) == (True, 0)
    assert (out[2].ok, out[2].value) == (True, 0)
    assert not out[1].ok and "os._exit(3)" in out[1].failure[2]
    assert out[1].failure[1] == "pymw_magic.oneshot.TaskExited"


@pytest.mark.parametrize("descr", ["[]", "'<U0'", "'|S0'", "'|V0'"])
def test_codec_npy_of_zero_size_items_is_refused_at_once(descr):
    # In a child: NumPy walked 10**18 zero-size items without end, in C (no interrupt).
    script = f"""
from pymw_magic import codec
hdr = ("{{'descr': {descr}, 'fortran_order': False, 'shape': (1000000000, 1000000000), }}").encode()
hdr += b" " * (63 - (10 + len(hdr)) % 64) + b"\\n"
npy = b"\\x93NUMPY\\x01\\x00" + len(hdr).to_bytes(2, "little") + hdr
try:
    codec.decode(codec.MAGIC + b'{{"v":{{"$a":0}},"a":[%d]}}\\n' % len(npy) + npy)
except codec.CodecError as exc:
    print("REFUSED", exc)
"""
    pytest.importorskip("numpy")
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    except subprocess.TimeoutExpired:
        pytest.fail("decoding an array of 10**18 zero-size items did not end within 60 s")
    assert "REFUSED" in done.stdout and "zero-size items" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_codec_empty_array_of_zero_size_items_still_round_trips():
    np = pytest.importorskip("numpy")
    for original in (np.zeros((0, 3), dtype=[]), np.zeros((2, 0), dtype="<f8")):
        value = codec.decode(codec.encode(original))
        assert value.shape == original.shape and value.dtype == original.dtype
